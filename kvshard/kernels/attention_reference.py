"""The attention kernel's reference (:mod:`kvshard.kernels.attention`), on the same operands.

Plain jnp and deliberately naive: every token gathers its request's whole page-table row and
masks, on the score and on the value, every key it may not see. It shares no code with the
kernel but the drop rule (:mod:`kvshard._device.drop`, THE rule both backends apply), so a test can
hold the kernel to it; kvshard's float64 oracle (:func:`kvshard.reference.paged_attention`)
checks both from dense histories.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvshard._device.drop import live_query_bounds, requests_on_block

__all__ = ["ref_ragged_paged_attention"]


@functools.partial(
    jax.jit,
    static_argnames=(
        "kv_layout",
        "page_size",
        "sm_scale",
        "sliding_window",
        "chunk_size",
        "soft_cap",
        "k_scale",
        "v_scale",
        "q_scale",
    ),
)
def ref_ragged_paged_attention(
    q: jax.Array,
    kv_cache: jax.Array,
    layer: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    kv_layout: str,
    page_size: int,
    sm_scale: float,
    sliding_window: int | None = None,
    chunk_size: int | None = None,
    soft_cap: float | None = None,
    sinks: jax.Array | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
    q_scale: float | None = None,
) -> jax.Array:
    """The kernel's reference on the same operands, in plain jnp: every token gathers its
    request's whole page-table row and masks (score and value) what it may not see.

    Same arguments and result as :func:`ragged_paged_attention` (no blocks, no interpret).
    Memory grows as T · pages_per_seq · page_size: for tests.
    """
    num_layers, num_slots, combined, _ = kv_cache.shape
    num_tokens, q_heads, head_dim = q.shape
    num_pages = num_slots // page_size
    kv_heads = combined // (1 if kv_layout == "packed" else 2)
    group = q_heads // kv_heads
    pages_per_seq = page_indices.shape[1]
    live, seq, tok_ok = requests_on_block(
        kv_cache, layer, page_indices, kv_lens, cu_q_lens, num_seqs, num_tokens, page_size
    )
    bounds = live_query_bounds(cu_q_lens, live)
    t = jnp.arange(num_tokens)
    pos = kv_lens[seq] - (bounds[seq + 1] - bounds[seq]) + (t - bounds[seq])  # [T]
    k_pos = jnp.arange(pages_per_seq * page_size)  # [K]
    table = jnp.clip(page_indices[seq], 0, num_pages - 1)  # [T, pages_per_seq]
    slots = (table[:, :, None] * page_size + jnp.arange(page_size)).reshape(num_tokens, -1)
    block = kv_cache[jnp.clip(layer, 0, num_layers - 1), slots]  # [T, K, C, D_pad]
    if kv_layout == "packed":
        k, v = block[..., :head_dim], block[..., head_dim : 2 * head_dim]
    else:
        k, v = block[..., 0::2, :head_dim], block[..., 1::2, :head_dim]
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    k = k if k_scale is None else k * k_scale
    v = v if v_scale is None else v * v_scale
    seen = tok_ok[:, None] & (k_pos[None] <= pos[:, None])
    if chunk_size is not None:
        lo = pos // chunk_size * chunk_size
    elif sliding_window is not None:
        lo = pos - sliding_window + 1
    else:
        lo = jnp.zeros_like(pos)
    seen &= k_pos[None] >= lo[:, None]  # [T, K]
    v = jnp.where(seen[:, :, None, None], v, 0.0)
    qf = q.astype(jnp.float32).reshape(num_tokens, kv_heads, group, head_dim)
    qf = qf if q_scale is None else qf * q_scale
    s = jnp.einsum("thgd,tkhd->thgk", qf, k, precision="highest") * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    s = jnp.where(seen[:, None, None, :], s, -jnp.inf)
    top = s.max(axis=-1)
    if sinks is not None:
        top = jnp.maximum(top, sinks.astype(jnp.float32).reshape(kv_heads, group))
    base = jnp.where(jnp.isneginf(top), 0.0, top)
    p = jnp.exp(s - base[..., None])
    denom = p.sum(axis=-1)
    if sinks is not None:
        denom = denom + jnp.exp(sinks.astype(jnp.float32).reshape(kv_heads, group) - base)
    out = jnp.einsum("thgk,tkhd->thgd", p, v, precision="highest")
    out = jnp.where((denom > 0)[..., None], out / jnp.where(denom > 0, denom, 1)[..., None], 0)
    out = jnp.where(tok_ok[:, None, None, None], out, 0)
    return out.reshape(num_tokens, q_heads, head_dim).astype(q.dtype)
