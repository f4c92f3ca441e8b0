"""The one base class of every exception kvshard defines.

``except kvshard.KvshardError`` catches any refusal kvshard itself raises (a pool out of pages,
an unknown request, a config it cannot read, allocators that diverged across hosts). Each
subclass also keeps the builtin base that describes it (``OutOfPages`` is a ``RuntimeError``,
``UnknownRequest`` a ``KeyError``, ``ConfigError`` a ``ValueError``), so existing handlers keep
working. Argument errors stay plain ``TypeError``/``ValueError``, as Python's own API does.
"""

from __future__ import annotations

__all__ = ["KvshardError"]


class KvshardError(Exception):
    """Base class of every exception kvshard defines."""
