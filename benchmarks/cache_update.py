"""Device cost of one layer's KV write: ``kvshard.update`` in place vs the same update copied.

``kvshard.update`` donates the cache, so XLA writes the step's tokens into the existing buffer.
The baseline is the same update jitted without donation, which is what a caller gets who
forgets to donate: XLA must copy the whole cache to produce the new one. Both run side by side
in one process, on the same 8-device mesh (simulated CPU devices unless a real backend is
present), and the benchmark first checks that both give identical caches.

Usage::

    python benchmarks/cache_update.py                    # 4 layers, 1024 pages of 16, 256 tokens
    python benchmarks/cache_update.py --num-pages 256 --tokens 64 --repeats 20

Times are the minimum (and median) over ``--repeats`` calls, in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax
import numpy as np

import kvshard
from kvshard._layout import needs_scales


def decode_slices(num_tokens: int, spec: kvshard.CacheSpec, rng: np.random.Generator):
    """One decode step: ``num_tokens`` requests write one token each on distinct pages."""
    pages = rng.choice(np.arange(1, spec.num_pages), size=num_tokens, replace=False)
    offsets = rng.integers(0, spec.page_size, size=num_tokens)
    dst = pages * spec.page_size + offsets
    slices = np.stack([dst, np.arange(num_tokens), np.ones(num_tokens)]).astype(np.int32)
    return slices, np.array([num_tokens], np.int32)


def timed(step, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times), statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--num-pages", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=256, help="decode tokens per step")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    if not 1 <= args.tokens < args.num_pages:
        parser.error(
            f"--tokens {args.tokens} must be in [1, --num-pages - 1 = {args.num_pages - 1}]: "
            "each decode token writes its own page (page 0 is the null page)"
        )

    devices = jax.devices()
    mesh = jax.make_mesh((1, len(devices)), ("data", "model"), devices=devices)
    spec = kvshard.CacheSpec(
        num_layers=args.layers,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        page_size=args.page_size,
        num_pages=args.num_pages,
        dtype=args.dtype,
        # A quantized cache needs scales: these fit the unit-normal k/v below (±4 sigma).
        **({"k_scale": 4 / 127, "v_scale": 4 / 127} if needs_scales(args.dtype) else {}),
    )
    rng = np.random.default_rng(0)
    slices, num = decode_slices(args.tokens, spec, rng)
    shape = (args.tokens, args.kv_heads, args.head_dim)
    # Real values: a quantized cache takes float k/v and quantizes them inside the update.
    kv_dtype = np.float32 if spec.quantized else spec.np_dtype
    k = rng.standard_normal(shape, dtype=np.float32).astype(kv_dtype)
    v = rng.standard_normal(shape, dtype=np.float32).astype(kv_dtype)

    # The same public call, traced in a jit that does not donate: every input is an argument
    # in both paths, so the only difference is the donation.
    copied_update = jax.jit(kvshard.update)
    in_place = kvshard.update(kvshard.init_cache(spec, mesh), 1, k, v, slices, num)
    copied = copied_update(kvshard.init_cache(spec, mesh), 1, k, v, slices, num)
    if not np.array_equal(np.asarray(in_place.kv), np.asarray(copied.kv)):
        raise SystemExit("in-place and copied updates disagree")
    del copied

    state = {"ours": in_place, "base": kvshard.init_cache(spec, mesh)}

    def ours() -> None:
        state["ours"] = kvshard.update(state["ours"], 1, k, v, slices, num)
        state["ours"].kv.block_until_ready()

    def base() -> None:
        state["base"] = copied_update(state["base"], 1, k, v, slices, num)
        state["base"].kv.block_until_ready()

    ours(), base()  # warm-up: compile outside the timed loop
    t_ours, t_base = timed(ours, args.repeats), timed(base, args.repeats)
    per_device = spec.bytes_per_device(mesh.shape["model"])
    print(
        f"devices={len(devices)}x{devices[0].platform} layers={args.layers} "
        f"kv_heads={args.kv_heads} head_dim={args.head_dim} page_size={args.page_size} "
        f"num_pages={args.num_pages} dtype={args.dtype} tokens={args.tokens} "
        f"repeats={args.repeats}"
    )
    print(f"cache: {per_device / 2**20:.0f} MiB per device, all layers")
    print(f"{'update of one layer':32} {'ms (median)':>14}")
    print(f"{'kvshard.update (donated)':32} {t_ours[0]:8.2f} ({t_ours[1]:.2f})")
    print(f"{'same update, not donated':32} {t_base[0]:8.2f} ({t_base[1]:.2f})")
    print(f"{'ratio':32} {t_base[0] / t_ours[0]:8.1f}x")


if __name__ == "__main__":
    main()
