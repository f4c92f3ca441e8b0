"""docs/api.md is the generator's output, names every public name, and holds every anchor the
other pages link to."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import kvshard
from kvshard import _api_doc

ROOT = Path(__file__).resolve().parents[1]
API_MD = ROOT / "docs" / "api.md"


def test_api_md_is_the_generators_output():
    text = API_MD.read_text(encoding="utf-8")
    assert text == _api_doc.render(), (
        f"docs/api.md is stale (a public signature or docstring changed): run "
        f"`{_api_doc.REGENERATE}` from the repository root and commit docs/api.md"
    )


def test_every_public_name_has_an_entry():
    text = API_MD.read_text(encoding="utf-8")
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', text))
    missing = [
        name
        for name in kvshard.__all__
        if name != "__version__" and f"kvshard.{name}" not in anchors
    ]
    assert not missing, f"no entry in docs/api.md for {missing}: add them to _api_doc.SECTIONS"
    assert "`kvshard.__version__`" in text


def test_every_link_into_the_reference_lands_on_an_anchor():
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', API_MD.read_text(encoding="utf-8")))
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    links = {
        (page.relative_to(ROOT).as_posix(), anchor)
        for page in pages
        for anchor in re.findall(r"api\.md#([\w.]+)", page.read_text(encoding="utf-8"))
    }
    assert links, "no page links into the reference: the pattern no longer matches"
    broken = sorted((page, a) for page, a in links if a not in anchors)
    assert not broken, f"links to anchors docs/api.md does not have: {broken}"


def test_a_public_name_without_a_section_is_refused(monkeypatch):
    monkeypatch.setattr(_api_doc, "_public_names", lambda: ["update", "brand_new_name"])
    with pytest.raises(LookupError, match="brand_new_name"):
        _api_doc.render()


def test_the_generator_imports_neither_jax_nor_flax():
    code = (
        "import sys; from kvshard import _api_doc; _api_doc.render(); "
        "print(sorted(m for m in ('jax', 'flax', 'hypothesis') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_check_mode_reports_a_stale_file(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "api.md"
    fresh = _api_doc.render()
    stale.write_text(fresh.replace("Writes new K/V tokens", "Writes tokens"))
    monkeypatch.setattr(_api_doc, "API_MD", stale)
    assert _api_doc.main(["--check"]) == 1
    assert _api_doc.REGENERATE in capsys.readouterr().err
    stale.write_text(fresh)
    assert _api_doc.main(["--check"]) == 0
