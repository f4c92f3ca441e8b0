"""A/B test of the update kernel's two DMA schedules, ``"direct"`` and ``"vmem"``, on one device.

Run it on a TPU to choose a schedule there: it first checks that both schedules write exactly
the cache the numpy oracle writes (a decode step and a prefill step), then times each one
jitted with the cache donated, as ``kvshard.update`` runs it. Off a TPU the kernel runs in
Pallas interpret mode: the check is exact but the times say nothing about a chip, so the
default sizes are tiny there.

Usage::

    kvshard bench-schedules                                   # sizes for the backend found
    kvshard bench-schedules --num-pages 4096 --decode-tokens 512 --repeats 50
    python -m kvshard.benchmarks.update_schedules ...         # the same
    kvshard bench --only update_schedules                     # in the suite, with its JSON

Then pass the winner on: ``kvshard.update(..., backend="pallas", schedule="vmem")`` (or
``kv_cache_update(..., schedule=...)``). Times are min (median) over ``--repeats`` calls, ms.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any

import numpy as np

from kvshard.benchmarks._common import (
    jax_machine,
    run_parsed,
    step_times_table,
    timed,
    write_report,
)

NAME = "update_schedules"
# What this benchmark (and `kvshard bench`'s tpu_schedule table) tells a TPU user to run.
TPU_COMMAND = "kvshard bench-schedules --num-pages 4096 --decode-tokens 512"


def decode_step(rng, num_tokens, num_pages, page_size):
    """``num_tokens`` requests write one token each, on distinct pages, at random offsets."""
    pages = rng.choice(num_pages, size=num_tokens, replace=False)
    dst = pages * page_size + rng.integers(0, page_size, size=num_tokens)
    return np.stack([dst, np.arange(num_tokens), np.ones(num_tokens)]).astype(np.int32)


def prefill_step(rng, num_tokens, num_pages, page_size):
    """One request writes ``num_tokens`` tokens from the start of fresh pages: full pages."""
    count = -(-num_tokens // page_size)
    pages = rng.choice(num_pages, size=count, replace=False)
    lengths = np.minimum(page_size, num_tokens - page_size * np.arange(count))
    src = page_size * np.arange(count)
    return np.stack([pages * page_size, src, lengths]).astype(np.int32)


def settings(on_tpu: bool) -> dict[str, Any]:
    """Default sizes: chip-sized on a TPU, tiny in interpret mode (where times mean nothing)."""
    return {
        "combined_heads": 16 if on_tpu else 2,
        "head_dim": 128,
        "page_size": 16 if on_tpu else 8,
        "num_pages": 4096 if on_tpu else 16,
        "decode_tokens": 512 if on_tpu else 6,
        "prefill_tokens": 2048 if on_tpu else 20,
        "block": None,
        "repeats": 50 if on_tpu else 2,
        "dtype": "bfloat16",
    }


def run(
    outdir: str,
    *,
    combined_heads: int,
    head_dim: int,
    page_size: int,
    num_pages: int,
    decode_tokens: int,
    prefill_tokens: int,
    block: int | None,
    repeats: int,
    dtype: str,
) -> dict[str, Any]:
    """Checks both schedules against the oracle, then times them; returns (and writes) rows.

    Raises:
      RuntimeError: a schedule wrote a cache that differs from the oracle's.
    """
    import jax
    import jax.numpy as jnp

    from kvshard import reference
    from kvshard.kernels import kv_cache_update
    from kvshard.kernels.budgets import SCHEDULES

    on_tpu = jax.default_backend() == "tpu"
    rng = np.random.default_rng(0)
    np_dtype = jnp.dtype(dtype)
    shape = (num_pages * page_size, combined_heads, head_dim)
    cache0 = rng.standard_normal(shape).astype(np_dtype)
    steps = {
        "decode": decode_step(rng, decode_tokens, num_pages, page_size),
        "prefill": prefill_step(rng, prefill_tokens, num_pages, page_size),
    }
    machine = jax_machine()
    print(f"## update kernel schedules: cache {shape} {np_dtype}\n{machine}")
    if not on_tpu:
        print("interpret mode: results are checked, times are NOT chip times")
    rows = []
    for name, slices in steps.items():
        num_tokens = int(slices[1, -1] + slices[2, -1])
        new_kv = rng.standard_normal((num_tokens, *shape[1:])).astype(np_dtype)
        num = np.array([slices.shape[1]], np.int32)
        expected = reference.kv_cache_update(new_kv, slices, cache0, num)
        for schedule in SCHEDULES:
            # The drop-in kernel in the caller's own jit, the cache donated.
            step = jax.jit(
                functools.partial(
                    kv_cache_update,
                    page_size=page_size,
                    num_slices_per_block=block,
                    schedule=schedule,  # type: ignore[arg-type]  # one of SCHEDULES
                ),
                donate_argnums=(2,),
            )
            args_dev = [jnp.asarray(x) for x in (new_kv, slices, cache0, num)]
            out = np.asarray(step(*args_dev))
            if not np.array_equal(out.view(np.uint8), expected.view(np.uint8)):
                raise RuntimeError(f"{name}/{schedule}: the cache differs from the oracle's")
            state = {"cache": jnp.asarray(cache0)}

            def once(step=step, args_dev=args_dev, state=state):
                state["cache"] = step(args_dev[0], args_dev[1], state["cache"], args_dev[3])
                state["cache"].block_until_ready()

            best, median = timed(once, repeats)
            rows.append(
                {
                    "step": name,
                    "schedule": schedule,
                    "slices": int(slices.shape[1]),
                    "min_ms": best * 1e3,
                    "median_ms": median * 1e3,
                }
            )
    print(step_times_table(rows, "schedule", "slices"))
    print("both schedules match the oracle")
    if not on_tpu:
        print(f"on a TPU VM, A/B test the schedules with:\n  {TPU_COMMAND}")
    data = {"machine": machine, "on_tpu": on_tpu, "shape": list(shape), "rows": rows}
    return write_report(outdir, NAME, data)


def main(argv: list[str] | None = None) -> int:
    """``kvshard bench-schedules``: this benchmark alone."""
    import jax

    defaults = settings(jax.default_backend() == "tpu")
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--combined-heads", type=int, default=defaults["combined_heads"])
    parser.add_argument("--head-dim", type=int, default=defaults["head_dim"])
    parser.add_argument("--page-size", type=int, default=defaults["page_size"])
    parser.add_argument("--num-pages", type=int, default=defaults["num_pages"])
    parser.add_argument("--decode-tokens", type=int, default=defaults["decode_tokens"])
    parser.add_argument("--prefill-tokens", type=int, default=defaults["prefill_tokens"])
    parser.add_argument("--block", type=int, default=None, help="slices per block (default: rule)")
    parser.add_argument("--repeats", type=int, default=defaults["repeats"])
    parser.add_argument("--dtype", default=defaults["dtype"])
    parser.add_argument("--out", default="bench-results", help="results folder")
    return run_parsed(parser, argv, run)


if __name__ == "__main__":
    sys.exit(main())
