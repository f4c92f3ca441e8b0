"""How values are stored: the dtype conversions and the head rows, in one place.

Writes convert real values to stored values and lay them out as the rows of the cache's
``kv_layout`` (:func:`encode`; the rows themselves are :mod:`kvshard._device.kv_rows`'s, the bits of
the storage dtype :mod:`kvshard._device.storage`'s), and the pallas backend joins a head's rows into
the head axis (:func:`combine`; the xla backend writes each row straight into its place);
reads undo both (:func:`split`, :func:`to_real`). Each device picks its own heads of
the step's k/v (:func:`local_heads`). Every backend calls these, which is what makes Pallas and
XLA agree bit for bit.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from kvshard import quant
from kvshard._device.kv_rows import from_rows, join_rows, to_rows
from kvshard._device.storage import from_bits
from kvshard._geometry.layout import CacheSpec
from kvshard.cache._pytree import KVCache

__all__ = [
    "combine",
    "encode",
    "kv_in_spec",
    "local_heads",
    "read_dtype",
    "split",
    "to_real",
    "to_storage",
]


def to_storage(spec: CacheSpec, x: jax.Array, scale: float | None) -> jax.Array:
    """Real values -> stored values: the ONE place writes convert.

    Quantized dtypes: :func:`kvshard.quant.quantize` (scale, round, saturate, cast); float
    dtypes: a plain cast.
    """
    if scale is None:
        return x.astype(spec.np_dtype)
    return quant.quantize(x, scale, spec.np_dtype)


def encode(spec: CacheSpec, k: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
    """k, v [T, h, D] real values -> the rows of each head, each [T, h, D_pad]: (K, V)
    interleaved, (K|V,) packed (:func:`kvshard._device.kv_rows.to_rows`), stored values in the
    cache's logical dtype; a backend bitcasts them to the array's storage dtype
    (:func:`kvshard._device.storage.to_bits`) where it writes them."""
    return to_rows(spec, to_storage(spec, k, spec.k_scale), to_storage(spec, v, spec.v_scale))


def combine(rows: tuple[jax.Array, ...]) -> jax.Array:
    """Encoded rows (:func:`encode`), each [T, h, D_pad] -> the head axis [T, C_local, D_pad]
    as the cache stores it: interleaved 2j = K_j, 2j+1 = V_j; packed row j = K_j|V_j."""
    return join_rows(rows)


def split(spec: CacheSpec, combined: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inverse of :func:`combine` and :func:`encode`'s storage: [N, C, D_pad] stored rows ->
    k, v [N, h, D] in the cache dtype (quantized values stay quantized)."""
    return from_rows(spec, from_bits(combined, spec.np_dtype))


def local_heads(cache: KVCache, x: jax.Array) -> jax.Array:
    """This device's KV heads of x [T, h_in, D] (inside shard_map).

    Without replication the head axis arrives already split (in_spec ``head_axis``), so x holds
    exactly this device's heads. With replication r > 1 every device holds one replicated head
    and x arrives with all H heads: device i along the head axis takes head i // r — the same
    head ``jnp.repeat(k, r, axis=1)`` would put there, without materialising the repeat.
    """
    r = cache.replication
    if r == 1:
        return x
    head = jax.lax.axis_index(cache.head_axis) // r
    return jax.lax.dynamic_slice_in_dim(x, head, 1, axis=1)


def kv_in_spec(cache: KVCache) -> P:
    """in_spec of k/v [G, T, H, D]: split heads unless they are replicated (then all heads)."""
    return P(cache.page_axis, None, cache.head_axis if cache.replication == 1 else None, None)


def read_dtype(spec: CacheSpec, dtype: Any) -> np.dtype:
    """The dtype a read returns: ``dtype``, or the default (the cache dtype; float32 for a
    quantized cache)."""
    if dtype is None:
        return np.dtype(np.float32) if spec.quantized else spec.np_dtype
    try:
        out = np.dtype(jnp.dtype(dtype))
    except TypeError as err:
        raise TypeError(f"dtype={dtype!r} is not a dtype") from err
    if not jnp.issubdtype(out, jnp.floating):
        raise TypeError(f"dtype={out.name} must be a floating dtype (e.g. float32, bfloat16)")
    return out


@functools.partial(jax.jit, static_argnames=("spec", "dtype"))
def to_real(spec: CacheSpec, k: jax.Array, v: jax.Array, dtype: np.dtype):
    """Stored k, v -> real values in ``dtype`` (elementwise: keeps the input sharding)."""
    return quant.dequantize(k, spec.k_scale, dtype), quant.dequantize(v, spec.v_scale, dtype)
