"""Smoke runs of every benchmark in kvshard.benchmarks with tiny sizes: each runs and prints its
table, checks kvshard against its baseline, and writes its JSON (and PNG when matplotlib is
present).

In process (the test session already has JAX and 8 simulated CPU devices), through each
benchmark's ``main(argv)`` or ``run``; one test goes through ``kvshard bench`` itself. Timings
are not asserted (they belong to the benchmarks' own output).
"""

from __future__ import annotations

import json
import re

import pytest

from kvshard import cli
from kvshard.benchmarks import __main__ as suite
from kvshard.benchmarks import (
    allocator_latency,
    attention_decode,
    attention_prefill,
    cache_update,
    callers_jit,
    compilations,
    host_step,
    memory,
    swap_bandwidth,
    tier_trace,
    tpu_schedule,
    update_schedules,
)

pytest.importorskip("matplotlib")


def test_host_step_table_prints_every_row(capsys):
    host_step.main(
        [
            *("--batch-sizes", "8", "32", "--repeats", "2", "--context", "40"),
            *("--prefills", "2", "--prefill-chunk", "20"),
        ]
    )
    out = capsys.readouterr().out
    for row in ("metadata decode B=8", "host step decode B=32", "host step mixed B=32+2x20"):
        assert row in out


def test_host_step_sweep_writes_json_and_plot(tmp_path, capsys):
    data = host_step.sweep(
        str(tmp_path), batch_sizes=[8, 16], repeats=2, context=40, prefill_chunk=20
    )
    out = capsys.readouterr().out
    assert "host step mixed B=16" in out and "metadata decode B=8" in out
    saved = json.loads((tmp_path / "host_step.json").read_text())
    assert [r["B"] for r in saved["rows"]["host step decode"]] == [8, 16]
    assert data["rows"]["host step mixed"][1]["speedup"] > 0
    assert (tmp_path / "host_step.png").stat().st_size > 1000


def test_allocator_latency_runs_and_evicts(tmp_path, capsys):
    """Both scenarios run (the benchmark asserts the evicting one evicts)."""
    allocator_latency.main(
        ["--num-pages", "2049", "--pages", "1", "4", "--calls", "30", "--out", str(tmp_path)]
    )
    assert capsys.readouterr().out.count("ratio p99 allocate") == 2
    report = json.loads((tmp_path / "allocator_latency.json").read_text())
    assert {(r["pages"], r["scenario"]) for r in report["rows"]} == {
        (p, s) for p in (1, 4) for s in ("free stack", "evicting")
    }


@pytest.mark.extended  # slow: .ci/run's extended step
def test_cache_update_agrees_and_reports_every_row(tmp_path, capsys):
    cache_update.main(
        [
            *("--dtype", "float32", "--dtype", "bfloat16", "--tokens", "32"),
            *("--cache-mib", "2", "--repeats", "2", "--out", str(tmp_path)),
        ]
    )
    out = capsys.readouterr().out
    assert "float32 T=32" in out and "bfloat16 T=32" in out
    # Every ratio's columns are in the table, and a line says what is good.
    header = out[out.index("dtype T") :].splitlines()[0].split("  ")
    columns = [c.strip() for c in header if c.strip()]
    for ratio in ("undonated/donated", "copy/donated", "copy/in a jit"):
        assert ratio in columns and all(name in columns for name in _ratio_columns(ratio)), out
    assert "Good: undonated/donated well above 1" in out
    rows = json.loads((tmp_path / "cache_update.json").read_text())["rows"]
    assert [(r["dtype"], r["tokens"]) for r in rows] == [("float32", 32), ("bfloat16", 32)]
    assert (tmp_path / "cache_update.png").is_file()
    assert f"and {tmp_path / 'cache_update.png'}" in out


def _ratio_columns(ratio: str) -> list[str]:
    """The timed columns a ratio column divides ("copy/in a jit" -> copy ms, in a jit ms)."""
    return [f"{name} ms" for name in ratio.split("/")]


def test_without_matplotlib_a_benchmark_says_plots_need_it(tmp_path, capsys, monkeypatch):
    from kvshard.benchmarks import _common

    monkeypatch.setattr(_common, "pyplot", lambda: None)  # as if matplotlib were missing
    cache_update.main(
        [
            *("--dtype", "float32", "--tokens", "32", "--cache-mib", "2"),
            *("--repeats", "1", "--out", str(tmp_path)),
        ]
    )
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'cache_update.json'}; no plot: plots need matplotlib" in out
    assert not (tmp_path / "cache_update.png").exists()
    # The suite's allocator table (its plot is drawn by the suite) printed "wrote None".
    monkeypatch.setattr(allocator_latency, "main", lambda argv: {"rows": [dict.fromkeys(ROWS, 1)]})
    suite._allocator_latency(str(tmp_path), True)
    out = capsys.readouterr().out
    assert "wrote None" not in out and "plots need matplotlib (pip install matplotlib" in out


ROWS = ("num_pages", "pages", "scenario", "allocate_p50", "allocate_p99", "free_p99")


@pytest.mark.extended  # slow: .ci/run's extended step
def test_callers_jit_eager_table_alone(capsys):
    callers_jit.main(["--eager-only", "--rounds", "2", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert "update float32" in out and "attention float32" in out and "host share" in out
    assert "load before" in out and "load after" in out


def test_interleaved_runs_each_predecessor_untimed_just_before_its_step():
    import time

    from kvshard.benchmarks._common import interleaved

    order = []
    steps = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    slow = lambda: (order.append("p"), time.sleep(0.05))
    times, loads = interleaved(steps, 2, before={"b": slow})
    assert order == ["a", "p", "b", "a", "p", "b"]
    assert len(loads) == 2 and max(times["b"]) < 0.05  # the 50 ms predecessor is not timed


def test_cache_update_rejects_tokens_off_the_page_grid(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cache_update.main(["--tokens", "20"])
    assert exit_info.value.code == 2
    assert "--tokens 20 must be a positive multiple" in capsys.readouterr().err


@pytest.mark.extended  # slow: .ci/run's extended step
def test_compilations_bounded_and_none_after_warmup(tmp_path, capsys):
    # Token budget 32: buckets 16 and 32. Warm-up compiles the cache's zeros and one update and
    # one attention executable per bucket (docs/performance.md): at most 5.
    data = compilations.run(str(tmp_path), steps=20, budget=32)
    assert "random trace after warm-up" in capsys.readouterr().out
    assert data["trace_compilations"] == 0
    assert 1 <= data["warmup_compilations"] <= 1 + 2 * 2
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
        context=256,
    )
    out = capsys.readouterr().out
    assert "temp / new" in out and "PageAllocator host bytes" in out
    assert "32 queries, 256-token context" in out
    assert [r["dtype"] for r in data["update"]] == ["float32", "int8"]
    # The caller's donating jit updates in place: the cache is aliased, not copied, and the
    # temporaries stay near the new tokens' bytes (2 x 32 tokens x 8 heads x 128, per dtype).
    for row, itemsize in zip(data["update"], (4, 1), strict=True):
        assert row["new_token_bytes"] == 2 * 32 * 8 * 128 * itemsize
        assert row["alias_bytes"] == row["cache_bytes"]
        assert row["temp_bytes"] <= 2 * row["new_token_bytes"] + 4096  # + int32 slot indices
    # Attention ran for every dtype; the context's K/V: 2 x 256 tokens x 8 heads x 128.
    assert [a["dtype"] for a in data["attention"]] == ["float32", "int8"]
    assert all("error" not in a and a["temp_bytes"] > 0 for a in data["attention"])
    assert [a["context_kv_bytes"] for a in data["attention"]] == [
        2 * 256 * 8 * 128 * s for s in (4, 1)
    ]
    assert data["allocator"]["bytes_after_init"] > 0


def test_attention_decode_agrees_with_gather_and_dense(tmp_path, capsys):
    row = attention_decode.run(str(tmp_path), batch=4, context=64, page_size=16, repeats=1)
    out = capsys.readouterr().out
    assert "kvshard.attention" in out and "gather + dense" in out
    assert row["mesh"] == "1x8"  # the test session's 8 devices: one KV head each
    assert row["max_abs_diff"] < attention_decode.TOLERANCE
    # Per device: one KV head's K and V (float32, head_dim 128) of 4 x 64 context tokens.
    assert row["pages_read_bytes_per_device"] == 4 * 64 * 2 * 128 * 4
    saved = json.loads((tmp_path / "attention_decode.json").read_text())
    assert saved["batch"] == 4 and saved["context"] == 64


def test_attention_decode_refuses_a_context_off_the_page_grid(tmp_path):
    with pytest.raises(ValueError, match="context=40 must be a multiple of page_size=16"):
        attention_decode.run(str(tmp_path), batch=2, context=40, page_size=16, repeats=1)


def test_swap_bandwidth_checks_and_reports_every_op(tmp_path, capsys):
    data = swap_bandwidth.main(
        ["--pages", "2", "--layers", "1", "--rounds", "2", "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    for op in ("swap_out", "swap_in", "device_put to pinned_host", "device_put to device"):
        assert op in out
    assert "load average" in out
    (row,) = data["rows"]
    # 2 pages x 1 layer x (16 slots x 16 combined heads x 128 x 2 bytes of bfloat16).
    assert row["bytes"] == 2 * 16 * 16 * 128 * 2
    assert row["out_vs_device_put"] > 0 and row["swap_in"]["dispatch_median_s"] >= 0
    saved = json.loads((tmp_path / "swap_bandwidth.json").read_text())
    assert saved["rounds"] == 2 and saved["rows"][0]["pages"] == 2


@pytest.mark.extended  # slow: .ci/run's extended step
def test_tier_trace_reports_both_parts(tmp_path, capsys):
    """Tiny trace under kvshard.Scheduler: 3 requests of 12 tokens (9 pages) on 6 device
    pages, preempted when the pool runs out; 3 prompts of 2 pages on 7 device pages, each
    visited twice."""
    data = tier_trace.main(["--tiny", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "load average" in out and "recompute" in out and "prefix cache" in out
    rows = data["rows"]
    recompute, swap = rows["recompute"], rows["swap"]
    assert recompute["context_pages"] > recompute["device_pages"] - 1
    assert recompute["recomputed_tokens"] > 0 and recompute["swapped_pages"] == 0
    assert recompute["preempted_recompute"] > 0 and recompute["preempted_swap"] == 0
    assert swap["recomputed_tokens"] == 0 and swap["swapped_pages"] > 0
    assert swap["preempted_swap"] > 0 and swap["preempted_recompute"] == 0
    none, host = rows["no host tier"], rows["host prefix cache"]
    # Round robin over more prompts than the device keeps: every return misses on the device.
    assert none["hit_tokens"] == 0 and host["host_hit_tokens"] > 0
    assert host["computed_tokens"] == none["computed_tokens"] - host["hit_tokens"]
    saved = json.loads((tmp_path / "tier_trace.json").read_text())
    assert saved["rounds"] == 1 and saved["rows"]["swap"]["median_s"] > 0


@pytest.mark.extended  # slow: .ci/run's extended step
def test_attention_prefill_agrees_and_reports_temporaries(tmp_path, capsys):
    """Tiny prompts: 32 timed (the three sides checked equal first), 64 compiled only."""
    flags = ["--batch", "2", "--prompts", "32", "64", "--time-up-to", "32", "--rounds", "2"]
    attention_prefill.main([*flags, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "xla/dense" in out and "load before" in out and "load after" in out
    data = json.loads((tmp_path / "attention_prefill.json").read_text())
    timed, compiled = data["rows"]
    assert (timed["prompt"], compiled["prompt"], data["mesh"]) == (32, 64, "1x8")
    assert len(timed["kvshard.attention ms"]) == 2 and timed["xla/dense"] > 0
    assert max(timed["max_abs_diff vs dense"], timed["max_abs_diff vs gather + dense"]) < (
        attention_prefill.TOLERANCE
    )
    assert "dense ms" not in compiled
    for side in attention_prefill.SIDES:
        assert compiled[f"{side} temp_bytes"] > 0


def test_attention_prefill_refuses_a_prompt_off_the_page_grid(capsys):
    with pytest.raises(SystemExit) as exit_info:
        attention_prefill.main(["--prompts", "40"])
    assert exit_info.value.code == 2
    assert "--prompts 40 must be a positive multiple of 16" in capsys.readouterr().err


def test_tpu_schedule_counts_follow_the_rules(tmp_path, capsys):
    data = tpu_schedule.run(str(tmp_path))
    decode = data["scenarios"]["decode 256 x 1 token"]
    seed, direct = decode["seed / vmem"], decode["kvshard direct"]
    # 256 one-token slices, blocks of 64: the seed bounces (2 DMAs + 2 waits per slice slot),
    # direct copies once per slice slot and waits once per block.
    assert (seed["grid_steps"], seed["dmas"], seed["waits"]) == (4, 512, 512)
    assert (direct["grid_steps"], direct["dmas"], direct["waits"]) == (4, 256, 4)
    assert seed["hbm_bytes"] == direct["hbm_bytes"] == 2 * 256 * 16 * 128 * 2
    out = capsys.readouterr().out
    assert "kvshard direct" in out
    # It tells TPU users the A/B command, a real `kvshard` command.
    assert update_schedules.TPU_COMMAND in out
    assert update_schedules.TPU_COMMAND.split()[1] in cli.SCRIPTS


@pytest.mark.slow
def test_update_schedules_check_both_and_print_the_tpu_command(tmp_path, capsys):
    flags = ["--block", "2", "--repeats", "1", "--decode-tokens", "3", "--prefill-tokens", "10"]
    assert update_schedules.main([*flags, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for step in ("decode", "prefill"):
        for schedule in ("direct", "vmem"):
            assert re.search(rf"{step}\s+{schedule}\s", out), out
    assert "both schedules match the oracle" in out
    assert "kvshard bench-schedules --num-pages 4096" in out
    rows = json.loads((tmp_path / "update_schedules.json").read_text())["rows"]
    assert len(rows) == 4


def test_update_schedules_report_a_schedule_that_differs(tmp_path, capsys, monkeypatch):
    """A kernel that writes a wrong cache fails the check before anything is timed (a stand-in
    kernel, so that no interpret-mode run is needed)."""
    import kvshard.kernels

    def wrong_kernel(new_kv, slices, kv_cache, num, **options):
        return kv_cache + 1

    monkeypatch.setattr(kvshard.kernels, "kv_cache_update", wrong_kernel)
    flags = ["--repeats", "1", "--decode-tokens", "2", "--prefill-tokens", "8"]
    assert update_schedules.main([*flags, "--out", str(tmp_path)]) == 1
    assert "decode/direct: the cache differs from the oracle's" in capsys.readouterr().err
    assert not (tmp_path / "update_schedules.json").exists()


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


def test_host_only_benchmark_sizes_bfloat16_pages_without_jax():
    """`kvshard bench --only tpu_schedule` (no JAX) failed in a fresh process: NumPy knows
    "bfloat16" only once ml_dtypes is imported, and page_bytes did not import it. A fresh
    interpreter, as the suite runs: 16 slots x 16 combined heads x 128 x 2 bytes."""
    import subprocess
    import sys

    code = (
        "import sys; from kvshard._geometry.layout import page_bytes\n"
        "print(page_bytes(16, 16, 128, 'bfloat16'), 'jax' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(16 * 16 * 128 * 2), "False"]


def test_suite_holds_every_benchmark_module():
    """One folder, every benchmark in it, each reachable from `kvshard bench --only`."""
    from pathlib import Path

    folder = Path(suite.__file__).parent
    modules = {p.stem for p in folder.glob("*.py") if not p.stem.startswith("_")}
    assert modules == set(suite.BENCHMARKS)
    assert not (Path(__file__).resolve().parents[1] / "benchmarks").exists()
