"""Choosing per-tensor scales for an int8 / float8 cache: error and saturation by percentile.

Draws K and V activations shaped like a real model's ([T, H, D], K with heavy-tailed outlier
channels: each (head, dim) channel has its own log-normal magnitude; V plain Gaussian),
calibrates ``k_scale, v_scale`` with :func:`kvshard.calibrate_scales` on one batch at several
percentiles, then writes a DIFFERENT held-out batch through a real sharded cache
(:func:`kvshard.update_with_stats`, :func:`kvshard.gather`) and reports, per dtype and
percentile, the scales, the fraction of held-out values that saturated (from the cache's own
counts) and the relative RMS and max absolute error of what the cache reads back. Every number
is checked against :mod:`kvshard.reference` (exits 1 on a mismatch).

    python examples/quant_scales.py [--tokens 512] [--kv-heads 4] [--head-dim 128]
                                    [--percentiles 99 99.9 99.99 100] [--plot out.png]
"""

from __future__ import annotations

import argparse
import os
import sys

# Eight simulated CPU devices; must be set before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax
import numpy as np

import kvshard
from kvshard import reference

DTYPES = ("int8", "float8_e4m3fn", "float8_e5m2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="tokens per batch")
    parser.add_argument("--kv-heads", type=int, default=4, choices=(1, 2, 4, 8))
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--percentiles", type=float, nargs="+", default=[99.0, 99.9, 99.99, 100.0])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="write a PNG of error and saturation vs percentile")
    return parser.parse_args(argv)


def activations(rng, channels, tokens):
    """K: outlier channels (log-normal per-channel magnitude); V: unit Gaussian. [T, H, D]."""
    heads, dim = channels.shape
    k = rng.standard_normal((tokens, heads, dim)) * channels
    v = rng.standard_normal((tokens, heads, dim))
    return k.astype(np.float32), v.astype(np.float32)


def measure(args, mesh, dtype, percentile, sample, held_out):
    """Calibrate on ``sample``, write ``held_out`` through a cache; returns one row of figures."""
    k_scale, v_scale = kvshard.calibrate_scales(*sample, dtype, percentile=percentile)
    tokens = args.tokens
    num_pages = tokens // args.page_size + 1  # page 0 stays the null page
    spec = kvshard.CacheSpec(
        1, args.kv_heads, args.head_dim, args.page_size, num_pages, dtype, k_scale, v_scale
    )
    cache = kvshard.init_cache(spec, mesh)
    # One slice per page, tokens in order, starting at page 1.
    pages = np.arange(tokens // args.page_size)
    slices = np.stack(
        [(pages + 1) * args.page_size, pages * args.page_size, np.full_like(pages, args.page_size)]
    ).astype(np.int32)
    num = np.array([len(pages)], np.int32)
    k, v = held_out
    cache, counts = kvshard.update_with_stats(cache, 0, k, v, slices, num)
    slots = np.arange(args.page_size, (len(pages) + 1) * args.page_size, dtype=np.int32)
    read = [np.asarray(x) for x in kvshard.gather(cache, 0, slots)]
    row = {"dtype": dtype, "percentile": percentile}
    for name, x, got, scale, count in (
        ("k", k, read[0], k_scale, counts.k),
        ("v", v, read[1], v_scale, counts.v),
    ):
        want = reference.dequantize(reference.quantize(x, scale, dtype), scale, np.float32)
        if (
            not np.array_equal(got, want)
            or int(count) != reference.saturated(x, scale, dtype).sum()
        ):
            sys.exit(f"MISMATCH with kvshard.reference: {dtype} p{percentile} {name}")
        err = got - x
        row[f"{name}_scale"] = scale
        row[f"{name}_sat"] = int(count) / x.size
        row[f"{name}_rms"] = float(np.sqrt(np.mean(err**2)) / np.sqrt(np.mean(x**2)))
        row[f"{name}_max"] = float(np.abs(err).max())
    return row


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        sel = [r for r in rows if r["dtype"] == dtype]
        xs = [100 - r["percentile"] for r in sel]  # tail left unscaled; 0 = absmax
        xs = [x if x > 0 else 1e-3 for x in xs]
        axes[0].plot(xs, [r["k_rms"] for r in sel], "o-", label=f"{dtype} K")
        axes[0].plot(xs, [r["v_rms"] for r in sel], "s--", label=f"{dtype} V")
        axes[1].plot(xs, [100 * r["k_sat"] for r in sel], "o-", label=f"{dtype} K")
        axes[1].plot(xs, [100 * r["v_sat"] for r in sel], "s--", label=f"{dtype} V")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("100 - percentile (1e-3 plotted for absmax)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("relative RMS error of reads")
    axes[1].set_yscale("symlog", linthresh=1e-3)  # absmax saturates (almost) nothing: 0 shows
    axes[1].set_ylim(bottom=0)
    axes[1].set_ylabel("% of held-out values saturated")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tokens % args.page_size:
        raise SystemExit(f"--tokens {args.tokens} must be a multiple of --page-size")
    devices = jax.devices()
    tp = min(len(devices), args.kv_heads)
    mesh = jax.make_mesh((1, tp), ("data", "model"), devices=devices[:tp])
    rng = np.random.default_rng(args.seed)
    channels = rng.lognormal(0.0, 1.0, (args.kv_heads, args.head_dim))
    sample, held_out = (activations(rng, channels, args.tokens) for _ in range(2))
    rows = [
        measure(args, mesh, dtype, p, sample, held_out)
        for dtype in args.dtypes
        for p in args.percentiles
    ]
    print(
        f"{args.tokens} tokens x {args.kv_heads} heads x {args.head_dim} dims, calibrated on one "
        f"batch, measured on another (seed {args.seed})"
    )
    print(
        "| dtype | percentile | k_scale | K saturated | K rel. RMS err | K max abs err "
        "| v_scale | V saturated | V rel. RMS err |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dtype']} | {r['percentile']:g} | {r['k_scale']:.4g} | {r['k_sat']:.3%} "
            f"| {r['k_rms']:.2e} | {r['k_max']:.3g} | {r['v_scale']:.4g} | {r['v_sat']:.3%} "
            f"| {r['v_rms']:.2e} |"
        )
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
