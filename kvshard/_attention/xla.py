"""The xla attention backend: a jnp flash-decoding loop over each token's own pages.

Each loop step gathers, for every query token, a block of pages of its request (only pages the
page table names, only pages that hold keys the token may see: with a sliding window, the pages
before it are never read) and folds it into an online softmax. Temporaries are a few pages per
token, never a layer. A key the token may not see contributes nothing whatever its slot holds:
its score is -inf AND its value is zeroed before the weighted sum (0 · NaN would be NaN: a stale
page may hold anything).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvshard._attention.params import Statics, spec_scale
from kvshard._drop import requests_on_block
from kvshard._storage import from_bits
from kvshard.quant import dequantize

__all__ = ["XLA_KEYS_PER_STEP", "XLA_TOKEN_KEYS_PER_STEP", "local_xla"]

# The loop folds up to this many keys per step (a whole number of pages, at least one), and
# gathers at most about XLA_TOKEN_KEYS_PER_STEP (token, key) pairs per step.
XLA_KEYS_PER_STEP = 128
XLA_TOKEN_KEYS_PER_STEP = 2**15


def local_xla(kv, layer, q, page_indices, kv_lens, cu_q_lens, num_seqs, *, statics: Statics):
    """One device: kv [L, slots, C, D_pad], q [T, Hq_local, D] -> [T, Hq_local, D]."""
    spec, sm_scale, window, soft_cap, options = statics
    num_layers, num_slots, combined, _ = kv.shape
    num_tokens, q_heads, head_dim = q.shape
    page_size = spec.page_size
    kv_heads = combined // 2
    group = q_heads // kv_heads
    pages_per_seq = page_indices.shape[1]

    _, seq, tok_ok = requests_on_block(
        kv, layer, page_indices, kv_lens, cu_q_lens, num_seqs, num_tokens, page_size
    )
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    pos = kv_lens[seq] - q_len + (jnp.arange(num_tokens) - cu_q_lens[seq])  # int32[T]
    lo = jnp.zeros_like(pos) if window is None else jnp.maximum(pos - window + 1, 0)
    first, last = lo // page_size, pos // page_size
    # Pages per loop step: enough keys per step that the loop's per-step overhead is paid
    # rarely (decode), few enough that the per-step gather of every token's keys stays small
    # (a long prefill folds one page per step).
    keys = options.keys_per_step or max(
        1, min(XLA_KEYS_PER_STEP, XLA_TOKEN_KEYS_PER_STEP // num_tokens)
    )
    block = max(1, min(pages_per_seq, keys // page_size))
    num_steps = -(-jnp.max(jnp.where(tok_ok, last - first + 1, 0), initial=0) // block)
    rows = page_indices[seq]  # int32[T, pages_per_seq]: each token's page-table row
    layer = jnp.clip(layer, 0, num_layers - 1)
    qf = q.astype(jnp.float32).reshape(num_tokens, kv_heads, group, head_dim)
    within = jnp.arange(page_size, dtype=jnp.int32)
    offsets = jnp.arange(block, dtype=jnp.int32)
    k_scale, v_scale = spec_scale(spec, "k"), spec_scale(spec, "v")

    def fold_pages(i, carry):
        m, denom, acc = carry
        # int32[T, block]: which pages of its request each token reads in this step
        page_pos = first[:, None] + i * block + offsets
        page = jnp.take_along_axis(rows, jnp.clip(page_pos, 0, pages_per_seq - 1), 1)
        slots = (page[..., None] * page_size + within).reshape(num_tokens, -1)  # [T, keys]
        kv_block = kv[layer, jnp.clip(slots, 0, num_slots - 1)]  # [T, keys, C, D_pad]
        k_pos = (page_pos[..., None] * page_size + within).reshape(num_tokens, -1)
        in_row = jnp.repeat(page_pos <= last[:, None], page_size, axis=1)
        seen = in_row & (k_pos <= pos[:, None]) & (k_pos >= lo[:, None]) & tok_ok[:, None]
        kv_block = from_bits(kv_block, spec.np_dtype)  # only the gathered pages (_storage)
        k = dequantize(kv_block[:, :, 0::2, :head_dim], k_scale, jnp.float32)
        v = dequantize(kv_block[:, :, 1::2, :head_dim], v_scale, jnp.float32)
        v = jnp.where(seen[:, :, None, None], v, 0.0)  # unseen slots may hold NaN or inf
        s = jnp.einsum("thgd,tphd->thgp", qf, k) * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = jnp.where(seen[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        base = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # rows that saw nothing yet
        p = jnp.exp(s - base[..., None])
        alpha = jnp.exp(m - base)
        denom = alpha * denom + p.sum(axis=-1)
        acc = alpha[..., None] * acc + jnp.einsum("thgp,tphd->thgd", p, v)
        return m_new, denom, acc

    init = (
        jnp.full((num_tokens, kv_heads, group), -jnp.inf, jnp.float32),
        jnp.zeros((num_tokens, kv_heads, group), jnp.float32),
        jnp.zeros((num_tokens, kv_heads, group, head_dim), jnp.float32),
    )
    _, denom, acc = jax.lax.fori_loop(0, num_steps, fold_pages, init)
    # Tokens that saw no key (padding, dropped requests) are zero.
    empty = (denom == 0)[..., None]
    out = jnp.where(empty, 0.0, acc / jnp.where(empty, 1.0, denom[..., None]))
    return out.reshape(num_tokens, q_heads, head_dim).astype(q.dtype)
