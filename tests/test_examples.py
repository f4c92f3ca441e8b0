"""Runs the serving examples end to end in subprocesses (several runs to one), with tiny flags.

Subprocesses because each example configures its own 8 simulated devices and jax before
importing it; the checks that matter (paged logits vs the dense model, prefix sharing vs no
sharing) run inside the examples, which exit non-zero on a mismatch.
"""

from __future__ import annotations

import re

import pytest
from _scripts import ROOT, run_script, stdout_of_success

summary = stdout_of_success


def max_abs_diff(stdout: str) -> float:
    return float(re.search(r"max abs diff:\s+(\S+)", stdout).group(1))


TINY = ("--layers", "2", "--num-requests", "4", "--steps", "8")

# Several example runs in ONE process: each is a call of an example's main with its own
# command line (sys.argv), so each builds its own model, cache and allocator; the process
# start, the imports and the compilations of the eager ops they share are paid once. The
# examples set the simulated devices when first imported, before JAX. main's SystemExit becomes
# the exit status Python itself would give it (None -> 0, an int as is, anything else -> 1).
_EXAMPLE_RUNS = """
import importlib, sys
sys.path.insert(0, {examples!r})
for script, argv in {runs!r}:
    sys.argv = [script, *argv]
    print("=== run", flush=True)
    try:
        code = importlib.import_module(script.removesuffix(".py")).main()
    except SystemExit as exit:
        code = exit.code if exit.code is None or isinstance(exit.code, int) else 1
    print("=== exit", code or 0, flush=True)
"""


def run_examples(tmp_path, runs: dict[str, tuple[str, ...]]) -> dict[str, tuple[int, str]]:
    """{name: (exit status, stdout)} of each run (script, *flags), in turn, in one process."""
    script = tmp_path / "example_runs.py"
    runs_list = [(run[0], list(run[1:])) for run in runs.values()]
    script.write_text(_EXAMPLE_RUNS.format(examples=str(ROOT / "examples"), runs=runs_list))
    out = summary(run_script(script))
    parts = re.findall(r"=== run\n(.*?)=== exit (-?\d+)\n", out, flags=re.S)
    assert len(parts) == len(runs), out
    return {name: (int(code), text) for name, (text, code) in zip(runs, parts, strict=True)}


# Documented bounds of examples/tp_decode.py --kv-dtype (its BOUNDS; figures in
# docs/guides/quantization.md): least top-1 agreement with the dense float model over every
# computed position, most mean abs logit difference. A quantizer that truncates instead of
# rounding measures 97.0% / 1.09e-2 (int8) and 94.8% / 2.69e-2 (float8_e4m3fn) on this run.
KV_BOUNDS = {"int8": (0.98, 0.008), "float8_e4m3fn": (0.95, 0.018)}


def test_tp_decode(tmp_path):
    """Float32 without and with prefix caching (and 8 KV heads: no replication), an int8
    cache within its documented bounds (float8's rounding, and the truncating quantizer's
    error, are tested where they are implemented, tests/test_quant.py, without a demo run),
    and a zero tolerance, which float32 vs the float64 oracle cannot meet: the failure path."""
    runs = run_examples(
        tmp_path,
        {
            "no prefix caching": ("tp_decode.py", *TINY, "--no-prefix-caching"),
            "prefix caching, 8 KV heads": (
                "tp_decode.py",
                *TINY,
                "--prefix-caching",
                "--kv-heads",
                "8",
            ),
            "int8": ("tp_decode.py", *TINY, "--kv-dtype", "int8"),
            "tolerance 0": (
                "tp_decode.py",
                "--layers",
                "1",
                "--num-requests",
                "2",
                "--steps",
                "2",
                "--tolerance",
                "0",
            ),
        },
    )
    for name in ("no prefix caching", "prefix caching, 8 KV heads"):
        code, out = runs[name]
        assert code == 0, f"{name}:\n{out}"
        for key in (
            "steps:",
            "tokens generated:",
            "pages used:",
            "peak usage:",
            "prefix-cache hits:",
            "compilations:",
            "max abs diff:",
            "wall time:",
        ):
            assert key in out, f"{name}: missing {key!r} in\n{out}"
        assert out.rstrip().endswith("OK")
        assert max_abs_diff(out) <= 1e-4
        assert int(re.search(r"tokens generated:\s+(\d+)", out).group(1)) > 0
        # One compilation per token bucket at most: the buckets bound the shapes.
        used = re.search(r"forward (\d+) \(buckets used \[([^\]]*)\]", out)
        assert int(used.group(1)) <= len(used.group(2).split(","))

    dtype = "int8"
    code, out = runs[dtype]
    assert code == 0 and f"({dtype})" in out and out.rstrip().endswith("OK"), out
    min_top1, max_mean = KV_BOUNDS[dtype]
    top1 = float(re.search(r"top-1 agreement:\s+(\S+)%", out).group(1)) / 100
    mean = float(re.search(r"mean abs diff:\s+(\S+)", out).group(1))
    assert top1 >= min_top1 and mean <= max_mean, out
    # Quantized, so not float-exact: the difference is real but bounded.
    assert 1e-4 < max_abs_diff(out) < 0.5

    code, out = runs["tolerance 0"]
    assert code == 1, out
    assert "FAILED" in out


@pytest.mark.extended  # slow: .ci/run's extended step
def test_prefix_sharing_kernel_demo_serving_loop_and_packed_layout(tmp_path):
    """Four examples, tiny, in one process (each exits non-zero on a mismatch):
    prefix_sharing (cached prefix pages vs no sharing), kernel_demo (the Pallas kernel under
    shard_map on 8 devices, in interpret mode, vs the numpy oracle), serving_loop (the
    serving-loop guide's 2x4 loop under kvshard.Scheduler: a hybrid model, stack_steps, an
    idle pool, a fork, a prefix hit and swaps in the jitted step, padded pairs) and
    packed_layout (the script behind docs/layout.md's measurement: it exits 1 when the arrays'
    bytes disagree with the spec's or the two layouts' attention outputs differ)."""
    runs = run_examples(
        tmp_path,
        {
            "prefix_sharing": (
                "prefix_sharing.py",
                *("--layers", "2", "--num-requests", "4", "--steps", "24"),
                *("--system-len", "32"),
            ),
            "kernel_demo": ("kernel_demo.py", "--steps", "2", "--seed", "1"),
            "serving_loop": ("serving_loop.py",),
            "packed_layout": ("packed_layout.py", "--pages", "8", "--tp", "1", "2"),
        },
    )
    for name, (code, out) in runs.items():
        assert code == 0, f"{name}: exit {code}\n{out}"

    out = runs["prefix_sharing"][1]
    assert "generated tokens identical: True" in out
    saved = re.search(r"memory saved:\s+(\d+) pages at peak .* = (\d+) bytes per device", out)
    assert saved and int(saved.group(1)) > 0 and int(saved.group(2)) > 0, out
    hits = re.search(r"prefix cache:\s+(\d+) of (\d+) prompt tokens hit", out)
    assert hits and int(hits.group(1)) > 0, out
    assert out.rstrip().endswith("OK")

    out = runs["kernel_demo"][1]
    assert "oracle check:   bit-identical" in out
    assert "per device (91, 2, 128)" in out

    out = runs["serving_loop"][1]
    # Pool 1 idle on step 0; "a" (n = 2) forked after its prompt: one copy-on-write pair per
    # layer group (its partial prompt page in the sliding and the full group).
    assert "step 0: pools [['a0'], []], swap-out [0, 0], swap-in [0, 0]" in out, out
    assert (
        "step 1: pools [['a0', 'a1'], ['d0', 'e0']], swap-out [0, 0], swap-in [0, 0], "
        "copy-on-write [2, 0]" in out
    ), out
    assert "requests finished: ['a', 'c', 'd', 'e', 'f'], samples of 'a': 2" in out, out
    released = re.search(r"sliding group: up to (\d+) pages released", out)
    assert released and int(released.group(1)) > 0, out
    assert "prefix cache hits per pool: [8, 0] tokens" in out, out  # "c" hits the system prompt
    swaps = re.search(r"preempted per pool: by swap \[0, (\d+)\]", out)
    assert swaps and int(swaps.group(1)) > 0, out
    moved = re.search(r"pairs applied: swap-out (\d+), swap-in (\d+), copy-on-write (\d+)", out)
    assert moved and all(int(n) > 0 for n in moved.groups()), out
    diff = float(re.search(r"dense model: (\S+)", out).group(1))
    assert diff <= 1e-4, out

    out = runs["packed_layout"][1]
    # 24 layers x 8 pages x 16 slots x rows x 128 lanes x 2 B (bfloat16), by hand.
    assert "| 1 | interleaved | [24, 128, 4, 128] | 3,145,728 | 3,145,728 |" in out
    assert "| 1 | packed | [24, 128, 2, 128] | 1,572,864 | 1,572,864 | 0 of 8,192 |" in out
    # One packed head a device: half the array, but TPU tiles pad the row to 2 (the spec).
    assert "| 2 | packed | [24, 128, 1, 128] | 1,572,864 | 786,432 | 4,096 of 8,192 |" in out
    assert "tp=1: interleaved / packed array bytes = 2.00" in out
    assert out.rstrip().endswith("OK")


@pytest.mark.parametrize("kv_heads", [2, 8])
def test_demo_forward_has_no_cache_collectives(kv_heads):
    """The demo's compiled step: attention reads each device's own pages, so the only
    collectives are the model's two row-parallel all-reduces per layer (wo and w2)."""

    import jax
    import numpy as np

    import kvshard
    from kvshard._demo import model as _model

    cfg = _model.ModelConfig(num_layers=2, num_kv_heads=kv_heads)
    mesh = _model.make_mesh()
    spec = kvshard.CacheSpec(
        num_layers=2,
        num_kv_heads=kv_heads,
        head_dim=128,
        page_size=16,
        num_pages=32,
        dtype="float32",
    )
    cache = kvshard.init_cache(spec, mesh)
    params = _model.shard_params(_model.init_params(cfg, 0), cfg, mesh)
    alloc = kvshard.PageAllocator(32, 16, max_requests=4, max_pages_per_request=8)
    alloc.allocate_batch([0, 1], [20, 5])
    step = kvshard.build_step(alloc, [0, 1], [20, 5], num_tokens_padded=32, max_num_seqs=4)
    forward = _model.make_forward(cfg, spec, mesh)
    hlo = forward.lower(params, cache, np.zeros(32, np.int32), step).compile().as_text()
    for op in ("all-gather", "all-to-all", "collective-permute", "reduce-scatter"):
        assert f" {op}(" not in hlo and f" {op}-start(" not in hlo, op
    # The layer loop's body holds the two projections' all-reduces; nothing else reduces.
    assert len(re.findall(r" all-reduce(?:-start)?\(", hlo)) == 2, hlo.count("all-reduce")
    del jax


def test_demo_progress_counts_the_runs_own_tokens(monkeypatch):
    """The demo's progress bar ends full when every request finishes: its total is the tokens
    the run puts in the cache (prefix hits included), not --steps (which it stopped short of)."""
    import numpy as np

    from kvshard._demo import model as _model

    seen = []

    class Recorder(_model._Progress):
        def __init__(self, total, desc):
            super().__init__(total, desc)
            seen.append(total)

        def update(self, done, **info):
            super().update(done, **info)
            seen.append(done)

    monkeypatch.setattr(_model, "_Progress", Recorder)
    cfg = _model.ModelConfig(num_layers=1, num_kv_heads=2)
    rng = np.random.default_rng(0)
    requests = _model.make_requests(
        rng,
        3,
        cfg.vocab,
        system_prompt=rng.integers(1, cfg.vocab, 16),
        suffix_len=(2, 9),
        new_tokens=(1, 6),
        arrivals=[0, 3, 4],
    )
    engine = _model.Engine(
        cfg,
        _model.init_params(cfg, 0),
        _model.make_mesh(),
        page_size=8,
        num_pages=16,
        max_requests=4,
        max_context=64,
        max_tokens_per_step=16,
        prefix_caching=True,
        check=False,
    )
    stats = engine.run(requests, max_steps=128)
    total = _model.tokens_to_serve(requests)
    assert all(r.finished for r in requests) and stats.steps < 128
    assert seen[0] == total and seen[-1] == total  # the bar ends full
    assert seen[1:] == sorted(seen[1:]) and len(seen) == stats.steps + 1
    assert stats.prefix_stats["hits"] > 0  # hits count toward the bar, not computed tokens
