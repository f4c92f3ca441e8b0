"""How a head's K and V sit in the cache's rows: the one definition of both layouts.

The cache's last two axes are [C, D_pad] per token slot (``CacheSpec.kv_layout``):

* "interleaved": rows ``2j`` (K) and ``2j + 1`` (V) of head ``j``, each ``head_dim`` values
  then zeros to ``D_pad = round_up(head_dim, 128)``;
* "packed": row ``j`` holds head ``j``'s K in lanes ``[0, head_dim)`` and its V in
  ``[head_dim, 2·head_dim)``, then zeros to ``D_pad = round_up(2·head_dim, 128)``;
* "latent" (MLA): row 0 holds the latent ``[c_kv | k_pe]`` in lanes ``[0, head_dim)``, then
  zeros to ``D_pad = round_up(head_dim, 128)``; it is K, and its first ``kv_lora_rank`` lanes
  (``c_kv``) are V: writes take no V, reads return that view.

Every write builds rows with :func:`to_rows` (and :func:`join_rows` where a backend wants the
head axis whole), every read takes K and V back with :func:`from_rows`: the update backends,
gather and the xla attention backend agree because they share these three functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvshard._geometry.layout import CacheSpec

__all__ = ["from_rows", "join_rows", "to_rows"]


def to_rows(spec: CacheSpec, k: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
    """Stored k, v [..., h, head_dim] -> the rows of each head, each [..., h, D_pad]:
    (K row, V row) interleaved, (K|V row,) packed, (latent row,) latent (``v`` unused);
    lanes past ``spec.row_dim`` are zero."""
    if spec.latent:
        rows: tuple[jax.Array, ...] = (k,)
    else:
        rows = (jnp.concatenate([k, v], axis=-1),) if spec.packed else (k, v)
    pad = [(0, 0)] * (k.ndim - 1) + [(0, spec.padded_head_dim - spec.row_dim)]
    return tuple(jnp.pad(x, pad) for x in rows)


def join_rows(rows: tuple[jax.Array, ...]) -> jax.Array:
    """:func:`to_rows`'s rows, each [T, h, D_pad] -> the head axis [T, len(rows)·h, D_pad]
    (row ``n·j + i`` is ``rows[i]`` of head ``j``)."""
    if len(rows) == 1:
        return rows[0]
    num_tokens, heads, dim = rows[0].shape
    return jnp.stack(rows, axis=2).reshape(num_tokens, heads * len(rows), dim)


def from_rows(spec: CacheSpec, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Stored rows [..., C, D_pad] -> k, v [..., C / rows_per_head, head_dim] (the same dtype:
    quantized values stay quantized); latent: k [..., C, head_dim] the whole latent and v
    [..., C, kv_lora_rank] its ``c_kv`` lanes."""
    d = spec.head_dim
    if spec.latent:
        return rows[..., :d], rows[..., : spec.value_dim]
    if spec.packed:
        return rows[..., :d], rows[..., d : 2 * d]
    return rows[..., 0::2, :d], rows[..., 1::2, :d]
