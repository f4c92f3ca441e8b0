"""The dtype the cache array stores per platform, and the two bitcasts between it and the
cache's logical dtype: the one place that rule lives.

XLA's CPU compiler cannot compute in float8, and in JAX 0.10 not in bfloat16 either. Its
float-normalization passes rewrite every op of those types in float32, a scatter into the
donated cache or a gather of its pages included: ``convert(whole cache) -> f32 op -> convert
back``, two passes over the buffer and a temporary four times its size, on every write and
every read. A per-executable compiler option can turn the passes off, but it cannot reach a
caller's own ``jax.jit`` (where a serving loop traces kvshard), and a caller whose model has
bf16 dots cannot set it (the dot emitter needs them).

So on CPU a float8 cache (and, on JAX 0.10, a bfloat16 one:
:data:`kvshard._device.jax_compat.CPU_REWRITES_BFLOAT16`) stores its values' bits as the unsigned
integer of the same width (integer scatters and gathers are never normalized), and only the
small arrays that cross the boundary are bitcast: the new tokens on the way in, the gathered
pages on the way out. Every other dtype is stored natively, as is everything on GPU and TPU
(they compute in bf16/fp8, and the Pallas kernels read the logical dtype). Every public read
returns the logical dtype; ``cache.kv`` holds the storage dtype (docs/layout.md).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from kvshard._device.jax_compat import CPU_REWRITES_BFLOAT16

__all__ = ["PLATFORMS", "from_bits", "storage_dtype", "to_bits"]

PLATFORMS = ("cpu", "gpu", "tpu")  # jax.Device.platform of each kind kvshard runs on

# Logical dtypes whose ops XLA's CPU compiler rewrites in float32 (docs/layout.md).
_CPU_BITS: dict[str, type[np.unsignedinteger]] = {
    "float8_e4m3fn": np.uint8,
    "float8_e5m2": np.uint8,
}
if CPU_REWRITES_BFLOAT16:
    _CPU_BITS["bfloat16"] = np.uint16


def storage_dtype(dtype: Any, platform: str) -> np.dtype:
    """The dtype a cache of logical ``dtype`` stores on ``platform`` ("cpu", "gpu", "tpu")."""
    dtype = np.dtype(dtype)
    if platform == "cpu" and dtype.name in _CPU_BITS:
        return np.dtype(_CPU_BITS[dtype.name])
    return dtype


def to_bits(x: jax.Array, stored: Any) -> jax.Array:
    """Values already in the logical dtype -> the storage dtype ``stored`` (a bitcast, or x)."""
    stored = np.dtype(stored)
    return x if x.dtype == stored else jax.lax.bitcast_convert_type(x, stored)


def from_bits(x: jax.Array, logical: Any) -> jax.Array:
    """Stored values (either storage) -> the same values in the ``logical`` dtype."""
    logical = np.dtype(logical)
    return x if x.dtype == logical else jax.lax.bitcast_convert_type(x, logical)
