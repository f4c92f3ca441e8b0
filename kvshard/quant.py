"""Per-tensor quantization of cache values: the one place a real K/V value becomes a stored one.

A cache of a quantized dtype (int8, float8_e4m3fn, float8_e5m2; see
:data:`kvshard._geometry.layout.QUANTIZED_DTYPES`) stores ``real / scale`` with one scale per tensor
(``CacheSpec.k_scale`` for K, ``CacheSpec.v_scale`` for V), the convention of vLLM and JAX's
ragged paged attention. The exact arithmetic, shared by both update backends and modelled bit
for bit by :func:`kvshard.reference.quantize`:

1. ``y = float32(x) * float32(1 / scale)``: a multiplication by the reciprocal, rounded once to
   float32 from the float64 ``1 / scale``. Not a division: XLA rewrites division by a constant
   into this multiplication anyway, so spelling it out keeps NumPy and every backend identical.
2. NaN becomes 0 (no quantized dtype should hold a NaN: attention would spread it).
3. int8: round half to even (``jnp.round``).
4. Saturate: clip to the dtype's finite range, [-128, 127] for int8, ±448 for float8_e4m3fn,
   ±57344 for float8_e5m2. Never wraps, never produces inf or NaN.
5. Cast to the storage dtype (floats round to nearest even).

Reading back is ``float32(q) * float32(scale)`` cast to the caller's compute dtype
(:func:`dequantize`). A value inside the range reads back within half a step (``scale / 2``
for int8; half a float8 spacing at its magnitude, times ``scale``, for float8).

:func:`quantize`, :func:`dequantize` and :func:`saturated` are pure ``jax.numpy`` (usable
inside ``jit`` and ``shard_map``; ``scale`` is a static Python float);
:func:`calibrate_scales` runs on the host with NumPy, since its result goes into the static
:class:`kvshard.CacheSpec`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvshard._geometry.layout import QUANTIZED_DTYPES, canonical_dtype, check_scale, scale_bounds

__all__ = ["calibrate_scales", "dequantize", "finite_range", "quantize", "saturated"]


def finite_range(dtype: Any) -> tuple[float, float]:
    """(lowest, highest) finite value of a quantized storage dtype, as Python floats.

    Raises:
      ValueError: ``dtype`` is not one of int8, float8_e4m3fn, float8_e5m2.
    """
    name = canonical_dtype(dtype)
    if name not in QUANTIZED_DTYPES:
        raise ValueError(f"dtype={name!r} is not quantized; use one of {QUANTIZED_DTYPES}")
    info = jnp.iinfo(name) if name == "int8" else jnp.finfo(name)
    return float(info.min), float(info.max)


def _inverse(scale: float) -> np.float32:
    """float32(1 / scale), computed in float64 and rounded once (the oracle does the same)."""
    return np.float32(1.0 / float(scale))


def _scaled(x: jax.Array, scale: float, name: str) -> jax.Array:
    """float32 x / scale, NaN -> 0, rounded half to even for int8 (steps 1-3, unclipped)."""
    y = x.astype(jnp.float32) * _inverse(scale)
    y = jnp.where(jnp.isnan(y), jnp.float32(0), y)
    return jnp.round(y) if name == "int8" else y


def quantize(x: jax.Array, scale: float, storage_dtype: Any) -> jax.Array:
    """Stored values of real values ``x``: round(x / scale), saturated, in ``storage_dtype``.

    Args:
      x: float[...] real values (any floating dtype; computed in float32).
      scale: the per-tensor scale, a positive finite Python float (static).
      storage_dtype: int8, float8_e4m3fn or float8_e5m2.

    Returns:
      storage_dtype[...], same shape as ``x``: NaN stored as 0, values beyond the finite range
      (±inf included) stored as its limits.
    """
    name = canonical_dtype(storage_dtype)
    lo, hi = finite_range(name)
    return jnp.clip(_scaled(x, scale, name), lo, hi).astype(name)


def saturated(x: jax.Array, scale: float, storage_dtype: Any) -> jax.Array:
    """bool[...]: the elements of ``x`` that :func:`quantize` cannot store faithfully.

    True where ``x / scale`` (rounded, for int8) lies outside the finite range (clipped to its
    limits; ±inf included) or is NaN (stored as 0). Same arguments as :func:`quantize`.
    """
    name = canonical_dtype(storage_dtype)
    lo, hi = finite_range(name)
    y = x.astype(jnp.float32) * _inverse(scale)
    if name == "int8":
        y = jnp.round(y)
    return jnp.isnan(y) | (y < lo) | (y > hi)


def dequantize(q: jax.Array, scale: float | None, dtype: Any) -> jax.Array:
    """Real values of stored values ``q``: ``float32(q) * float32(scale)`` cast to ``dtype``.

    Args:
      q: storage-dtype[...] as read from the cache.
      scale: the per-tensor scale the values were stored with, or None for an unscaled (float)
        cache, whose values are only cast.
      dtype: the compute dtype of the result (e.g. float32 or bfloat16).

    Returns:
      dtype[...], same shape as ``q``.
    """
    if scale is None:
        return q.astype(dtype)
    return (q.astype(jnp.float32) * np.float32(scale)).astype(dtype)


def calibrate_scales(
    k: Any, v: Any, dtype: Any, *, percentile: float = 100.0
) -> tuple[float, float]:
    """Per-tensor (k_scale, v_scale) for a ``dtype`` cache from sample activations.

    ``scale = percentile(|x|, percentile) / max_finite(dtype)``: the chosen percentile of the
    magnitudes lands on the dtype's largest finite value (127 for int8, 448 for
    float8_e4m3fn, 57344 for float8_e5m2). ``percentile=100`` (the default, absmax) makes
    nothing in the sample saturate; a lower percentile trades saturation of the largest
    ``100 - percentile`` percent of values for finer steps everywhere else (see
    docs/guides/quantization.md for measured trade-offs). Samples that are not finite in
    float32 are ignored.

    Args:
      k, v: float[...] sample K and V activations (any shape: e.g. [T, H, D] of one layer or
        [L, T, H, D] of every layer; one scale covers the whole tensor), NumPy or JAX arrays.
      dtype: the cache dtype: int8, float8_e4m3fn or float8_e5m2.
      percentile: in (0, 100].

    Returns:
      (k_scale, v_scale) as Python floats, ready for ``CacheSpec(..., k_scale=, v_scale=)``.

    Raises:
      ValueError: ``dtype`` is not quantized, ``percentile`` is outside (0, 100], a sample
        has no finite non-zero value at that percentile (no scale can be derived from it), or
        its magnitude needs a scale above :func:`kvshard.CacheSpec`'s bound (reads of it
        would overflow float32). A magnitude whose scale would be below the smallest normal
        float32 gets that smallest normal scale (``2**-126``), the smallest a spec accepts.
    """
    _, hi = finite_range(dtype)
    if not isinstance(percentile, int | float | np.integer | np.floating) or not (
        0 < float(percentile) <= 100
    ):
        raise ValueError(f"percentile={percentile!r} must be in (0, 100]")
    smallest, _ = scale_bounds(dtype)
    scales = []
    for name, x in (("k", k), ("v", v)):
        # float32 first: what the cache's quantizer sees (beyond float32's range is inf).
        mags = np.abs(np.asarray(x, dtype=np.float32)).astype(np.float64).ravel()
        mags = mags[np.isfinite(mags)]
        top = float(np.percentile(mags, float(percentile))) if mags.size else 0.0
        if not top > 0:
            raise ValueError(
                f"{name} sample has no finite non-zero magnitude at percentile={percentile} "
                f"({mags.size} finite values); calibrate on real activations"
            )
        # Below the smallest normal float32 a scale reads back as 0: clamp to it (values that
        # small then use a few steps, or none, of the dtype's range; they are noise).
        scale = max(top / hi, smallest)
        # quantize multiplies by float32(1 / scale) in float32: nudge the scale up until the
        # calibrated magnitude itself lands on or inside the limit (a rounding, not a
        # trade-off). The three float32 roundings (top, 1 / scale, the product) overshoot by
        # at most 3 * 2**-24 relative, so two nudges of 2**-23 always suffice; four bound it.
        for _ in range(4):
            if np.float32(top) * _inverse(scale) <= hi:
                break
            scale *= 1 + 2.0**-23
        check_scale(f"{name} scale (from the {name} sample)", scale, dtype)  # the spec's rule
        scales.append(scale)
    return scales[0], scales[1]
