"""The static parameters of one attention call, shared by both backends."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from kvshard._device.options import BackendOptions
from kvshard._geometry.layout import CacheSpec
from kvshard.quant import quantize

__all__ = ["Statics", "spec_scale", "stored_query"]


class Statics(NamedTuple):
    """The static (hashable, compile-time) arguments of one attention call."""

    spec: CacheSpec
    sm_scale: float
    sliding_window: int | None
    soft_cap: float | None
    options: BackendOptions = BackendOptions()
    # Chunked local attention (Llama 4): a query at p reads keys C·(p // C) .. p (not with
    # JAX's pallas kernel).
    chunk_size: int | None = None
    # Per-tensor q scale of a quantized cache (tpu-inference's RPA v3 ``q_scale``): the
    # backends read :func:`stored_query` and multiply the scores by it. None: real q.
    q_scale: float | None = None


def spec_scale(spec: Any, which: str) -> float | None:
    """The spec's per-tensor dequantization scale for K or V (None: stored unscaled)."""
    scale = getattr(spec, f"{which}_scale", None)
    return None if scale is None else float(scale)


def stored_query(q: jax.Array, statics: Statics) -> jax.Array:
    """The queries both backends read: ``q`` itself, or with ``statics.q_scale`` q quantized
    to the cache's storage dtype as K/V are (``kvshard.quant.quantize(q, q_scale, dtype)``:
    q / q_scale, saturated) and held in q.dtype (every int8 and float8 value is exact in
    float32, bfloat16 and float16). The scores are then multiplied by ``q_scale``."""
    if statics.q_scale is None:
        return q
    return quantize(q, statics.q_scale, statics.spec.dtype).astype(q.dtype)
