"""Smoke runs of the benchmark suite with tiny sizes: every benchmark runs and prints its table,
checks kvshard against its baseline, and writes its JSON (and PNG when matplotlib is present).

Timings are not asserted (they belong to the benchmarks' own output).
"""

from __future__ import annotations

import json

import pytest
from _scripts import ROOT, run_script, stdout_of_success

from kvshard.benchmarks import __main__ as suite
from kvshard.benchmarks import compilations, memory, tpu_schedule

pytest.importorskip("matplotlib")


def test_host_step_table_prints_every_row():
    out = stdout_of_success(
        run_script(
            ROOT / "benchmarks" / "host_step.py",
            *("--batch-sizes", "8", "32", "--repeats", "2", "--context", "40"),
            *("--prefills", "2", "--prefill-chunk", "20"),
        )
    )
    for row in ("metadata decode B=8", "host step decode B=32", "host step mixed B=32+2x20"):
        assert row in out


def test_host_step_sweep_writes_json_and_plot(tmp_path, capsys):
    from kvshard.benchmarks.host_step import sweep

    data = sweep(str(tmp_path), batch_sizes=[8, 16], repeats=2, context=40, prefill_chunk=20)
    out = capsys.readouterr().out
    assert "host step mixed B=16" in out and "metadata decode B=8" in out
    saved = json.loads((tmp_path / "host_step.json").read_text())
    assert [r["B"] for r in saved["rows"]["host step decode"]] == [8, 16]
    assert data["rows"]["host step mixed"][1]["speedup"] > 0
    assert (tmp_path / "host_step.png").stat().st_size > 1000


def test_cache_update_agrees_and_reports_every_row(tmp_path):
    out = stdout_of_success(
        run_script(
            ROOT / "benchmarks" / "cache_update.py",
            *("--dtype", "float32", "--dtype", "bfloat16", "--tokens", "32"),
            *("--cache-mib", "2", "--repeats", "2", "--out", str(tmp_path)),
        )
    )
    assert "float32 T=32" in out and "bfloat16 T=32" in out and "vs undonated" in out
    rows = json.loads((tmp_path / "cache_update.json").read_text())["rows"]
    assert [(r["dtype"], r["tokens"]) for r in rows] == [("float32", 32), ("bfloat16", 32)]
    assert (tmp_path / "cache_update.png").is_file()


def test_cache_update_rejects_tokens_off_the_page_grid(tmp_path):
    proc = run_script(ROOT / "benchmarks" / "cache_update.py", "--tokens", "20")
    assert proc.returncode == 2 and "--tokens 20 must be a positive multiple" in proc.stderr


def test_compilations_bounded_and_none_after_warmup(tmp_path, capsys):
    data = compilations.run(str(tmp_path), steps=30, budget=64)
    assert "random trace after warm-up" in capsys.readouterr().out
    assert data["trace_compilations"] == 0
    assert 1 <= data["warmup_compilations"] <= 12
    assert (tmp_path / "compilations.json").is_file()


def test_memory_tables(tmp_path, capsys):
    data = memory.run(
        str(tmp_path),
        cache_mib=4,
        tokens=32,
        dtypes=["float32", "int8"],
        pages=1000,
        requests=16,
        pages_per_request=8,
    )
    out = capsys.readouterr().out
    assert "temp / new" in out and "PageAllocator host bytes" in out
    assert [r["dtype"] for r in data["update"]] == ["float32", "int8"]
    assert data["allocator"]["bytes_after_init"] > 0


def test_tpu_schedule_counts_follow_the_rules(tmp_path, capsys):
    data = tpu_schedule.run(str(tmp_path))
    decode = data["scenarios"]["decode 256 x 1 token"]
    seed, direct = decode["seed / vmem"], decode["kvshard direct"]
    # 256 one-token slices, blocks of 64: the seed bounces (2 DMAs + 2 waits per slice slot),
    # direct copies once per slice slot and waits once per block.
    assert (seed["grid_steps"], seed["dmas"], seed["waits"]) == (4, 512, 512)
    assert (direct["grid_steps"], direct["dmas"], direct["waits"]) == (4, 256, 4)
    assert seed["hbm_bytes"] == direct["hbm_bytes"] == 2 * 256 * 16 * 128 * 2
    assert "kvshard direct" in capsys.readouterr().out


def test_suite_runs_selected_benchmarks_and_reports_failures(tmp_path, capsys, monkeypatch):
    assert suite.main(["--only", "tpu_schedule", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "tpu_schedule.json").is_file()

    def broken(out, quick):
        raise RuntimeError("boom")

    monkeypatch.setitem(suite.BENCHMARKS, "memory", broken)
    assert suite.main(["--only", "memory", "tpu_schedule", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "FAILED: memory" in captured.err and "boom" in captured.err
    assert "TPU update kernel on paper" in captured.out  # the next benchmark still ran


def test_bench_tells_tpu_users_the_schedule_ab_command():
    """`kvshard bench` prints the A/B command of the update kernel's schedules, and that
    command is the one benchmarks/update_schedules.py itself documents."""
    from pathlib import Path

    from kvshard.benchmarks.tpu_schedule import TPU_AB_COMMAND

    script = (
        Path(__file__).resolve().parents[1] / "benchmarks" / "update_schedules.py"
    ).read_text()
    assert f'TPU_COMMAND = "{TPU_AB_COMMAND}"' in script
    source = (
        Path(__file__).resolve().parents[1] / "kvshard/benchmarks/tpu_schedule.py"
    ).read_text()
    assert "{TPU_AB_COMMAND}" in source
