"""Smoke runs of the benchmark scripts with tiny sizes: they must run and print their tables.

Timings are not asserted (they belong to the benchmarks' own output); what is asserted is that
each script finishes, checks kvshard against its baseline, and reports every row.
"""

from __future__ import annotations

from _scripts import ROOT, run_script, stdout_of_success


def run(script: str, *flags: str) -> str:
    return stdout_of_success(run_script(ROOT / "benchmarks" / script, *flags))


def test_host_step_prints_every_row():
    out = run(
        "host_step.py",
        "--batch-sizes",
        "8",
        "32",
        "--repeats",
        "2",
        "--context",
        "40",
        "--prefills",
        "2",
        "--prefill-chunk",
        "20",
    )
    for row in ("metadata decode B=8", "host step decode B=32", "host step mixed B=32+2x20"):
        assert row in out


def test_cache_update_agrees_and_reports_ratio():
    out = run(
        "cache_update.py", "--num-pages", "32", "--tokens", "8", "--layers", "2", "--repeats", "2"
    )
    assert "kvshard.update (donated)" in out and "ratio" in out


def test_plot_writes_png(tmp_path):
    png = tmp_path / "host_step.png"
    out = run("plot_host_step.py", "--batch-sizes", "8", "16", "--repeats", "2", "--out", str(png))
    assert png.stat().st_size > 1000
    assert "metadata decode B=16" in out
