"""The docs' runnable code blocks run: every ```python block right after a
``<!-- test_guides: runs -->`` line, the blocks of one page in order in one namespace (a later
block uses the names an earlier one defined), as a reader pasting them would."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- test_guides: runs -->"
BLOCK = re.compile(re.escape(MARKER) + r"\n```python\n(.*?)\n```", re.S)


def runnable_blocks(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    blocks = BLOCK.findall(text)
    # A marker not followed by a python block would silently test nothing.
    assert len(blocks) == text.count(MARKER), f"{page}: a marker without a ```python block"
    return blocks


PAGES = sorted(p for p in (ROOT / "docs").rglob("*.md") if MARKER in p.read_text("utf-8"))


def test_the_serving_loop_guide_has_its_runnable_sections():
    page = ROOT / "docs" / "guides" / "serving-loop.md"
    assert page in PAGES
    blocks = runnable_blocks(page)
    assert len(blocks) >= 4
    joined = "\n".join(blocks)
    for needle in ("layer_types=", "lookup_prefix(", "swap_out(", "swap_in(", "jax.jit("):
        assert needle in joined, needle


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_runnable_blocks_run(page):
    namespace: dict[str, object] = {"__name__": f"guide:{page.name}"}
    for i, block in enumerate(runnable_blocks(page)):
        code = compile(block, f"{page.relative_to(ROOT)} (block {i + 1})", "exec")
        exec(code, namespace)
