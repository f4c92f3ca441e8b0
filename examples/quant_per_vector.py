"""What per-tensor scales leave on the table: per-tensor vs per-layer vs per-vector int8/fp8.

kvshard quantizes K and V with one scale per tensor (``CacheSpec.k_scale``/``v_scale``, the
convention of vLLM and of JAX's ``ragged_paged_attention``, whose ``k_scale``/``v_scale`` are
static floats). This script measures what finer scales would buy on synthetic K/V shaped like
an LLM's, so the choice is a measured one (docs/guides/quantization.md):

* K and V of ``--layers`` layers, ``--tokens`` tokens, ``--kv-heads`` heads. Every (layer,
  head) has its own magnitude, log-normal with sigma ln(10)/4 (95% of heads within a 10x
  range), and every layer a log-normal factor with sigma 0.5. K has log-normal per-channel
  magnitudes (sigma 0.5) and ``--outlier-channels`` channels per head 20x larger (the massive
  channels of LLM keys); 1% of tokens are outliers, 8x larger in V and 4x in K.
* Schemes: ``per-tensor`` (one scale per K, one per V, all layers: what a CacheSpec holds;
  :func:`kvshard.calibrate_scales` at absmax on a separate calibration batch), ``per-layer``
  (the same, one layer at a time), ``per-vector`` (one scale per token and KV head: absmax over
  head_dim / max_finite, computed from the written vector itself, as JAX's paged-attention
  tests and tpu-inference's experimental per-token kernel do).
* Quantization is :func:`kvshard.quant.quantize` / :func:`kvshard.quant.dequantize` (per-vector:
  ``quantize(x / s, 1.0)`` then ``dequantize(q, 1.0) * s``).
* Errors, relative RMS per (layer, head), averaged and worst: of K and V as read back, and of
  the output of attention (``--queries`` decode queries per layer, 2 query heads per KV head,
  each attending every token; queries scaled so the float32 logits have std 2) against the
  same attention on the float32 K/V (float64 arithmetic).
* Bytes: a page's bytes per token and KV head against the scales' (K and V, float32 or
  bfloat16), for each ``--head-dims`` (kvshard pads head_dim to 128 lanes).

    python examples/quant_per_vector.py [--tokens 1024] [--kv-heads 8] [--layers 4]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp
import numpy as np

import kvshard
from kvshard import quant

DTYPES = ("int8", "float8_e4m3fn")
SCHEMES = ("per-tensor", "per-layer", "per-vector")
SMALLEST_NORMAL = float(np.finfo(np.float32).tiny)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 64], help="for bytes")
    parser.add_argument("--outlier-channels", type=int, default=4)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def draw_kv(rng, args, head_mag, layer_mag, channels):
    """K, V: float32 [L, T, H, D] (see the module docstring for the shape of the outliers)."""
    shape = (args.layers, args.tokens, args.kv_heads, args.head_dim)
    outlier_tokens = rng.random((args.layers, args.tokens, 1, 1)) < 0.01
    mag = head_mag[:, None, :, None] * layer_mag[:, None, None, None]
    k = rng.standard_normal(shape) * channels * mag * np.where(outlier_tokens, 4, 1)
    v = rng.standard_normal(shape) * mag * np.where(outlier_tokens, 8, 1)
    return k.astype(np.float32), v.astype(np.float32)


def read_back(x, scheme, dtype, calibration):
    """(float32 [L, T, H, D] a cache with ``scheme`` scales reads back, fraction saturated)."""
    if scheme == "per-vector":
        _, hi = quant.finite_range(dtype)
        # Up by 2**-22 so that float32 rounding of x / s cannot push the absmax past the limit.
        s = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / hi * (1 + 2.0**-22), SMALLEST_NORMAL)
        y = jnp.asarray(x / s.astype(np.float32))
        read = np.asarray(quant.dequantize(quant.quantize(y, 1.0, dtype), 1.0, jnp.float32))
        return read * s.astype(np.float32), float(np.mean(quant.saturated(y, 1.0, dtype)))
    if scheme == "per-tensor":
        groups = [(slice(None), calibration)]
    else:
        groups = [(layer, calibration[layer]) for layer in range(x.shape[0])]
    out, saturated = np.empty_like(x), 0
    for index, sample in groups:
        scale, _ = kvshard.calibrate_scales(sample, sample, dtype)
        q = quant.quantize(jnp.asarray(x[index]), scale, dtype)
        out[index] = np.asarray(quant.dequantize(q, scale, jnp.float32))
        saturated += int(quant.saturated(jnp.asarray(x[index]), scale, dtype).sum())
    return out, saturated / x.size


def attend(q, k, v):
    """float64 [L, Q, Hq, D] output of every query attending every token (GQA, no mask)."""
    group = q.shape[2] // k.shape[2]
    k = np.repeat(k.astype(np.float64), group, axis=2)
    v = np.repeat(v.astype(np.float64), group, axis=2)
    logits = np.einsum("lqhd,lthd->lhqt", q, k)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("lhqt,lthd->lqhd", weights, v)


def rel_rms(got, want, head_axis):
    """(mean, max) over (layer, head) of the relative RMS error."""
    axes = tuple(a for a in range(got.ndim) if a not in (0, head_axis))
    err = np.sqrt(np.mean((got - want) ** 2, axis=axes) / np.mean(want**2, axis=axes))
    return float(err.mean()), float(err.max())


def queries(rng, args, k):
    """[L, Q, 2H, D] queries, scaled per (layer, query head) so float32 logits have std 2."""
    shape = (args.layers, args.queries, 2 * args.kv_heads, args.head_dim)
    q = rng.standard_normal(shape)
    logits = np.einsum("lqhd,lthd->lhqt", q, np.repeat(k.astype(np.float64), 2, axis=2))
    return q * (2.0 / logits.std(axis=(2, 3)))[:, None, :, None]


def bytes_table(args):
    """Rows: head_dim, page bytes per token-head, scale bytes (f32, bf16) and overheads."""
    rows = []
    for dim in args.head_dims:
        spec = kvshard.CacheSpec(1, 8, dim, 16, 2, "int8", 1.0, 1.0)
        page = spec.page_bytes_per_device(1) // (spec.page_size * spec.num_kv_heads)
        jax_broadcast = 2 * dim * 4  # JAX's paged_attention: scales broadcast to head_dim, f32
        rows.append((dim, page, 2 * dim, 8, 4, jax_broadcast))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    head_mag = rng.lognormal(0.0, np.log(10) / 4, (args.layers, args.kv_heads))
    layer_mag = rng.lognormal(0.0, 0.5, args.layers)
    channels = rng.lognormal(0.0, 0.5, (args.kv_heads, args.head_dim))
    for h in range(args.kv_heads):
        channels[h, rng.choice(args.head_dim, args.outlier_channels, replace=False)] *= 20
    calib = draw_kv(rng, args, head_mag, layer_mag, channels)
    k, v = draw_kv(rng, args, head_mag, layer_mag, channels)
    q = queries(rng, args, k)
    want = attend(q, k, v)
    print(
        f"{args.layers} layers x {args.tokens} tokens x {args.kv_heads} KV heads x "
        f"{args.head_dim} dims, {args.outlier_channels} outlier K channels per head, seed "
        f"{args.seed}; relative RMS error per (layer, head): mean / worst"
    )
    print("| dtype | scales | K read | V read | attention output | K, V saturated |")
    print("|---|---|---|---|---|---|")
    runs = [(d, s) for d in args.dtypes for s in SCHEMES] + [("bfloat16", "none (a bf16 cache)")]
    for dtype, scheme in runs:
        if dtype == "bfloat16":
            k_read, v_read = (np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in (k, v))
            k_sat = v_sat = 0.0
        else:
            k_read, k_sat = read_back(k, scheme, dtype, calib[0])
            v_read, v_sat = read_back(v, scheme, dtype, calib[1])
        cells = [
            rel_rms(k_read, k, 2),
            rel_rms(v_read, v, 2),
            rel_rms(attend(q, k_read, v_read), want, 2),
        ]
        text = " | ".join(f"{mean:.2e} / {worst:.2e}" for mean, worst in cells)
        print(f"| {dtype} | {scheme} | {text} | {k_sat:.1e}, {v_sat:.1e} |")
    print()
    print(
        "| head_dim | int8 page bytes per token-head (K+V, kvshard layout) | unpadded K+V "
        "| f32 scales (K+V) | bf16 scales | f32 overhead vs page | bf16 overhead "
        "| JAX paged_attention's broadcast f32 scales |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for dim, page, raw, f32, bf16, broadcast in bytes_table(args):
        print(
            f"| {dim} | {page} | {raw} | {f32} | {bf16} | {f32 / page:.1%} | {bf16 / page:.1%} "
            f"| {broadcast} ({broadcast / raw:.0f}x the int8 values they scale) |"
        )
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
