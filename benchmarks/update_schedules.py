"""A/B test of the update kernel's two DMA schedules, ``"direct"`` and ``"vmem"``, on one device.

Run it on a TPU to choose a schedule there: it first checks that both schedules write exactly
the cache the numpy oracle writes (a decode step and a prefill step), then times each one
jitted with the cache donated, as ``kvshard.update`` runs it. Off a TPU the kernel runs in
Pallas interpret mode: the check is exact but the times say nothing about a chip, so the
default sizes are tiny there.

Usage::

    python benchmarks/update_schedules.py                      # sizes for the backend found
    python benchmarks/update_schedules.py --num-pages 4096 --decode-tokens 512 --repeats 50

Then pass the winner on: ``kvshard.update(..., backend="pallas", schedule="vmem")`` (or
``kv_cache_update(..., schedule=...)``). Times are min (median) over ``--repeats`` calls, ms.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvshard import reference
from kvshard.kernels import kv_cache_update
from kvshard.kernels.budgets import SCHEDULES

TPU_COMMAND = "python benchmarks/update_schedules.py --num-pages 4096 --decode-tokens 512"


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


def timed(step, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times), statistics.median(times)


def main(argv=None):
    on_tpu = jax.default_backend() == "tpu"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--combined-heads", type=int, default=16 if on_tpu else 2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16 if on_tpu else 8)
    parser.add_argument("--num-pages", type=int, default=4096 if on_tpu else 16)
    parser.add_argument("--decode-tokens", type=int, default=512 if on_tpu else 6)
    parser.add_argument("--prefill-tokens", type=int, default=2048 if on_tpu else 20)
    parser.add_argument("--block", type=int, default=None, help="slices per block (default: rule)")
    parser.add_argument("--repeats", type=int, default=50 if on_tpu else 2)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    rows = args.num_pages * args.page_size
    dtype = jnp.dtype(args.dtype)
    shape = (rows, args.combined_heads, args.head_dim)
    cache0 = rng.standard_normal(shape).astype(dtype)
    steps = {
        "decode": decode_step(rng, args.decode_tokens, args.num_pages, args.page_size),
        "prefill": prefill_step(rng, args.prefill_tokens, args.num_pages, args.page_size),
    }
    device = jax.devices()[0].device_kind
    print(f"backend {jax.default_backend()} ({device}), cache {shape} {dtype}")
    if not on_tpu:
        print("interpret mode: results are checked, times are NOT chip times")
    print(f"{'step':<8} {'schedule':<8} {'slices':>6} {'min ms':>9} {'median ms':>10}")
    for name, slices in steps.items():
        num_tokens = int(slices[1, -1] + slices[2, -1])
        new_kv = rng.standard_normal((num_tokens, *shape[1:])).astype(dtype)
        num = np.array([slices.shape[1]], np.int32)
        expected = reference.kv_cache_update(new_kv, slices, cache0, num)
        for schedule in SCHEDULES:
            step = jax.jit(
                functools.partial(
                    kv_cache_update,
                    page_size=args.page_size,
                    num_slices_per_block=args.block,
                    schedule=schedule,
                ),
                donate_argnums=(2,),
            )
            args_dev = [jnp.asarray(x) for x in (new_kv, slices, cache0, num)]
            out = np.asarray(step(*args_dev))
            if not np.array_equal(out.view(np.uint8), expected.view(np.uint8)):
                raise SystemExit(f"{name}/{schedule}: the cache differs from the oracle's")
            cache = jnp.asarray(cache0)

            def run(step=step, args_dev=args_dev):
                nonlocal cache
                cache = step(args_dev[0], args_dev[1], cache, args_dev[3])
                cache.block_until_ready()

            best, median = timed(run, args.repeats)
            print(f"{name:<8} {schedule:<8} {slices.shape[1]:>6} {best:>9.3f} {median:>10.3f}")
    print("both schedules match the oracle")
    if not on_tpu:
        print(f"on a TPU VM, A/B test the schedules with:\n  {TPU_COMMAND}")


if __name__ == "__main__":
    main()
