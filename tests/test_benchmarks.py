"""Smoke runs of the benchmark scripts with tiny sizes: they must run and print their tables.

Timings are not asserted (they belong to the benchmarks' own output); what is asserted is that
each script finishes, checks kvshard against its baseline, and reports every row.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *flags: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


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
