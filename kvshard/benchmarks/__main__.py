"""``python -m kvshard.benchmarks`` / ``kvshard bench``: runs the benchmark suite.

Usage::

    kvshard bench --quick                 # every table, small sizes (< 5 min on 2 CPU cores)
    kvshard bench --out results/          # full sizes
    kvshard bench --only cache_update memory
    kvshard bench --only attention_decode attention_prefill update_schedules
    kvshard bench --only attention_kernels  # kvshard's attention kernel vs JAX's (TPU)
    kvshard bench --only swap_bandwidth   # the host tier: swap_out/swap_in vs device_put
    kvshard bench --only tier_trace       # serving trace: recompute vs swap, host prefix hits
    kvshard bench --only serve_load       # kvshard serve: 1, 4, 16 streaming clients over HTTP

Benchmarks run one after another in this process; one that fails is reported and the others
still run (the exit status is then 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any


def _host_step(out: str, quick: bool) -> Any:
    from kvshard.benchmarks.host_step import sweep

    sizes = [64, 512, 4096, 8192] if quick else [64, 128, 256, 512, 1024, 2048, 4096, 8192]
    return sweep(out, batch_sizes=sizes, repeats=5 if quick else 30)


def _allocator_latency(out: str, quick: bool) -> Any:
    """The allocator's own benchmark (``main(argv)`` returning its report), plus a plot."""
    from kvshard.benchmarks import allocator_latency as module

    print("## allocator latency: allocate/free percentiles, free stack vs evicting")
    report = module.main((["--quick"] if quick else []) + ["--out", out])
    rows = report.get("rows", []) if isinstance(report, dict) else []
    if rows:
        from kvshard.benchmarks._common import PLOTS_NEED_MATPLOTLIB, bar_plot

        labels = [f"{r['num_pages']} pages\n{r['pages']}/call\n{r['scenario']}" for r in rows]
        png = bar_plot(
            out,
            "allocator_latency",
            "PageAllocator latency: free stack vs evicting",
            labels,
            {
                "allocate p50": [r["allocate_p50"] for r in rows],
                "allocate p99": [r["allocate_p99"] for r in rows],
                "free p99": [r["free_p99"] for r in rows],
            },
            "µs",
        )
        print(f"wrote {png}" if png else PLOTS_NEED_MATPLOTLIB)
    return report


def _cache_update(out: str, quick: bool) -> Any:
    from kvshard.benchmarks import cache_update

    args = argparse.Namespace(dtypes=None, tokens=None, cache_mib=None, repeats=None)
    return cache_update.run(out, **cache_update.settings(args, quick))


def _compilations(out: str, quick: bool) -> Any:
    from kvshard.benchmarks.compilations import run

    return run(out, steps=100 if quick else 1000)


def _memory(out: str, quick: bool) -> Any:
    from kvshard.benchmarks.memory import run

    if quick:  # the dtypes of distinct storage (float16 and float8 as bfloat16 and int8)
        return run(
            out,
            cache_mib=256,
            tokens=4096,
            dtypes=["float32", "bfloat16", "int8"],
            pages=100_000,
            requests=8192,
            pages_per_request=512,
        )
    return run(
        out,
        cache_mib=1024,
        tokens=4096,
        dtypes=["float32", "bfloat16", "float16", "int8", "float8_e4m3fn"],
        pages=1_000_000,
        requests=65_536,
        pages_per_request=512,
    )


def _callers_jit(out: str, quick: bool) -> Any:
    from kvshard.benchmarks.callers_jit import run

    return run(
        out,
        dtypes=["bfloat16"] if quick else ["float32", "bfloat16"],
        cache_mib=64 if quick else 256,  # 32 MiB has too few pages for 16 requests
        requests=16,
        rounds=3 if quick else 15,
    )


def _attention_decode(out: str, quick: bool) -> Any:
    from kvshard.benchmarks.attention_decode import run

    if quick:
        return run(out, batch=16, context=512, repeats=3)
    return run(out, batch=64, context=2048, repeats=5)


def _attention_prefill(out: str, quick: bool) -> Any:
    from kvshard.benchmarks.attention_prefill import run, settings

    return run(out, **settings(quick))


def _update_schedules(out: str, quick: bool) -> Any:
    """Interpret mode off a TPU (tiny sizes, checked against the oracle); chip sizes on one."""
    import jax

    from kvshard.benchmarks.update_schedules import run, settings

    return run(out, **settings(jax.default_backend() == "tpu"))


def _attention_kernels(out: str, quick: bool) -> Any:
    """kvshard's attention kernel vs JAX's: chip sizes on a TPU, interpret mode elsewhere."""
    import jax

    from kvshard.benchmarks.attention_kernels import run, settings

    return run(out, **settings(jax.default_backend() == "tpu"))


def _swap_bandwidth(out: str, quick: bool) -> Any:
    from kvshard.benchmarks.swap_bandwidth import run, settings

    return run(out, **settings(quick))


def _tier_trace(out: str, quick: bool) -> Any:
    from kvshard.benchmarks.tier_trace import run, settings

    return run(out, **settings(quick))


def _serve_load(out: str, quick: bool) -> Any:
    """``kvshard serve`` under 1, 4 and 16 streaming clients (needs the serve extra + httpx)."""
    from kvshard.benchmarks.serve_load import main

    sizes = ["--requests", "16", "--max-tokens", "16"] if quick else []
    if main([*sizes, "--out", out]):
        raise RuntimeError("serve_load: a request did not complete or a page leaked")


def _tpu_schedule(out: str, quick: bool) -> Any:
    from kvshard.benchmarks.tpu_schedule import run

    return run(out)


BENCHMARKS: dict[str, Callable[[str, bool], Any]] = {
    "host_step": _host_step,
    "allocator_latency": _allocator_latency,
    "cache_update": _cache_update,
    "compilations": _compilations,
    "memory": _memory,
    "callers_jit": _callers_jit,
    "attention_decode": _attention_decode,
    "swap_bandwidth": _swap_bandwidth,
    "tier_trace": _tier_trace,
    "serve_load": _serve_load,
    "attention_prefill": _attention_prefill,
    "tpu_schedule": _tpu_schedule,
    "update_schedules": _update_schedules,
    "attention_kernels": _attention_kernels,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kvshard bench", description="Runs kvshard's benchmark suite (tables, JSON, plots)."
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: < 5 min on 2 cores")
    parser.add_argument("--out", default="bench-results", help="results folder (JSON + PNG)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(BENCHMARKS),
        metavar="NAME",
        help=f"run only these: {', '.join(BENCHMARKS)}",
    )
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    failed = []
    start = time.perf_counter()
    for name in args.only or list(BENCHMARKS):
        t0 = time.perf_counter()
        try:
            BENCHMARKS[name](args.out, args.quick)
        except Exception:  # report and go on: one broken benchmark must not hide the others
            traceback.print_exc()
            failed.append(name)
        print(f"[{name}: {time.perf_counter() - t0:.1f} s]\n", flush=True)
    print(f"suite finished in {time.perf_counter() - start:.0f} s; results in {args.out}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
