"""The static parameters of one attention call, shared by both backends."""

from __future__ import annotations

from typing import Any, NamedTuple

from kvshard._layout import CacheSpec
from kvshard._types import BackendOptions

__all__ = ["Statics", "spec_scale"]


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


def spec_scale(spec: Any, which: str) -> float | None:
    """The spec's per-tensor dequantization scale for K or V (None: stored unscaled)."""
    scale = getattr(spec, f"{which}_scale", None)
    return None if scale is None else float(scale)
