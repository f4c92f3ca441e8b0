"""Writes random tokens through the Pallas kernel into a head-sharded cache on 8 CPU devices.

Each device holds the K/V of its own heads ([rows, combined_heads / 8, head_dim] locally) and
runs the kernel on them inside ``jax.shard_map``; the slices are replicated. The result is
checked bit-for-bit against the numpy oracle.

    python examples/kernel_demo.py [--page-size 13] [--steps 3]

Sizes stay small on purpose: with 8 simulated devices, JAX 0.10's TPU interpret mode deadlocks
once a per-device buffer reaches about 128 KiB (see docs/guides/fuzzing.md; not a kvshard bug; no
issue on a real TPU, where the kernel is compiled rather than interpreted).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("NPROC", "16")  # XLA CPU threads >= devices (interpret mode)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kvshard import reference
from kvshard.kernels import kv_cache_update
from kvshard.testing import random_values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--page-size", type=int, default=13)
    parser.add_argument("--num-pages", type=int, default=7)
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads (16 combined)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("model",), devices=devices)
    spec = P(None, "model", None)
    combined = 2 * args.kv_heads
    shape = (args.num_pages * args.page_size, combined, 128)

    def local_update(new_kv, slices, cache, num):
        return kv_cache_update(
            new_kv, slices, cache, num, page_size=args.page_size, num_slices_per_block=4
        )

    sharded_update = jax.jit(
        jax.shard_map(
            local_update,
            mesh=mesh,
            in_specs=(spec, P(), spec, P()),
            out_specs=spec,
            check_vma=False,
        ),
        donate_argnums=2,
    )

    rng = np.random.default_rng(args.seed)
    host_cache = random_values(rng, shape, np.float32)
    cache = jax.device_put(host_cache, NamedSharding(mesh, spec))
    tokens = 0
    start = time.perf_counter()
    for step in range(args.steps):
        slices, num, num_tokens = (
            _random_step(rng, args.page_size, args.num_pages)
            if step
            else _first_step(args.page_size)
        )
        new_kv = random_values(rng, (num_tokens, combined, 128), np.float32)
        cache = sharded_update(
            jax.device_put(new_kv, NamedSharding(mesh, spec)),
            jnp.asarray(slices),
            cache,
            jnp.asarray(num),
        )
        host_cache = reference.kv_cache_update(new_kv, slices, host_cache, num)
        tokens += int(slices[2, : num[0]].sum())
    elapsed = time.perf_counter() - start
    ok = np.array_equal(np.asarray(cache), host_cache)
    local = cache.addressable_shards[0].data.shape
    print(f"devices:        {len(devices)} x {devices[0].platform} (mesh axis 'model')")
    print(f"cache:          global {shape}, per device {local}, dtype float32")
    print(f"steps:          {args.steps}, tokens written {tokens}")
    print(f"kernel mode:    Pallas TPU interpret mode ({elapsed:.1f} s in all)")
    print(f"oracle check:   {'bit-identical' if ok else 'MISMATCH'}")
    raise SystemExit(0 if ok else 1)


MAX_SLICES = 6  # slice columns per step; the token count is fixed too, so one compilation


def _random_step(rng, page_size, num_pages):
    """Up to MAX_SLICES decodes and prefill chunks on distinct pages, in shuffled order."""
    count = int(rng.integers(1, MAX_SLICES + 1))
    pages = rng.permutation(num_pages)[:count]
    offsets = rng.integers(0, page_size, size=count)
    lengths = rng.integers(1, page_size - offsets + 1)  # never past the end of the page
    src = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    slices = np.zeros((3, MAX_SLICES + 4), np.int32)  # 4 padding columns, as a runner pads
    slices[:, :count] = [pages * page_size + offsets, src, lengths]
    return slices, np.array([count], np.int32), MAX_SLICES * page_size + 3


def _first_step(page_size):
    """A fixed first step: a prefill across three pages and two single-token decodes."""
    lengths = [page_size - 3, page_size, 5, 1, 1]
    starts = [3, page_size, 2 * page_size, 5 * page_size + 7, 6 * page_size]
    src = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    slices = np.zeros((3, MAX_SLICES + 4), np.int32)
    slices[:, :5] = [starts, src, lengths]
    return slices, np.array([5], np.int32), MAX_SLICES * page_size + 3


if __name__ == "__main__":
    main()
