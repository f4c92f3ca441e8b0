"""MkDocs hook: render Sphinx cross-reference roles in docstrings as plain inline code.

kvshard's docstrings use reST roles (:class:`CacheSpec`, :func:`update`) that mkdocstrings
leaves as literal text; this strips the ``:role:`` prefix from the rendered HTML.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|exc|obj):(?=<code>)")


def on_page_content(html: str, **kwargs) -> str:
    return _ROLE.sub("", html)
