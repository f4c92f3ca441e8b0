"""The xla attention backend: jnp online-softmax loops over each request's own pages.

Two paths, both run every step (each loop's trip count is dynamic, so a path with nothing to
do costs a few scalar ops):

* **decode** (requests with one query): one row per request, its token's query; each loop step
  gathers a block of pages of that row's request and folds it in. The gather per row is the
  lower bound (each page read once), so this is today's flash-decoding loop over requests.
* **prefill** (requests with two or more queries): the request's queries are cut into query
  blocks of up to ``queries_per_block`` tokens (a fixed-size window of the token axis clipped
  to the request); a loop over blocks, and for each block a loop over key blocks, gathers each
  page the block may see **once per query block** and folds ``[QB, H, G, D] x [KB, H, D]``
  matmuls. Key blocks wholly after the block's last query (causal) or before its first query's
  window are never visited.

Temporaries are a few key blocks and one query block's scores, independent of the prompt
length. Only pages the page table names and that hold keys a query may see are read; a key no
query may see contributes nothing whatever its slot holds: its score is -inf AND its value is
zeroed before the weighted sum (0 · NaN would be NaN: a stale page may hold anything).
Attention sinks (a logit per query head added to the softmax denominator) are folded in once,
after the loop.

A "latent" (MLA) cache is read the same way with one KV "head": K is the whole latent row and
V its ``kv_lora_rank`` first lanes, so the output is in latent space (the absorbed form).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvshard._attention.params import Statics, spec_scale, stored_query
from kvshard._device.drop import live_query_bounds, requests_on_block
from kvshard._device.kv_rows import from_rows
from kvshard._device.storage import from_bits
from kvshard.quant import dequantize

__all__ = [
    "XLA_KEYS_PER_STEP",
    "XLA_PREFILL_KEYS_PER_STEP",
    "XLA_QUERIES_PER_BLOCK",
    "XLA_TOKEN_KEYS_PER_STEP",
    "local_xla",
]

# Decode folds up to this many keys per loop step (a whole number of pages, at least one), and
# gathers at most about XLA_TOKEN_KEYS_PER_STEP (row, key) pairs per step.
XLA_KEYS_PER_STEP = 128
XLA_TOKEN_KEYS_PER_STEP = 2**15
# Prefill: query tokens per block and keys per key block (chosen on CPU: docs/performance.md,
# prefill). Scores per step are QB x KB per query head.
XLA_QUERIES_PER_BLOCK = 256
XLA_PREFILL_KEYS_PER_STEP = 512


def read_kv(kv, layer, slots, statics: Statics):
    """The one read of the cache: slots int32[...] of ``layer`` -> float32 K, V [..., H, D].

    Slots are clamped into the block (callers mask what they may not see). Any layout: K and V are
    split from interleaved rows or from the lanes of packed ones; a latent row is K whole and V its
    first ``kv_lora_rank`` lanes (:func:`kvshard._device.kv_rows.from_rows`)."""
    block = kv[layer, jnp.clip(slots, 0, kv.shape[1] - 1)]  # [..., C, D_pad]
    spec = statics.spec
    block = from_bits(block, spec.np_dtype)  # only the gathered pages (kvshard._device.storage)
    k, v = from_rows(spec, block)
    k = dequantize(k, spec_scale(spec, "k"), jnp.float32)
    v = dequantize(v, spec_scale(spec, "v"), jnp.float32)
    return k, v


def _scores(q, k, contraction: str, statics: Statics):
    """sm_scale · q·k (times q_scale: q holds stored values, :func:`stored_query`),
    soft-capped."""
    s = jnp.einsum(contraction, q, k) * statics.sm_scale
    if statics.q_scale is not None:
        s = s * statics.q_scale
    if statics.soft_cap is not None:
        s = statics.soft_cap * jnp.tanh(s / statics.soft_cap)
    return s


def _fold(carry, s, v, contraction: str):
    """One online-softmax step: masked scores s [..., keys] (-inf: unseen), values v."""
    m, denom, acc = carry
    m_new = jnp.maximum(m, s.max(axis=-1))
    base = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # rows that saw nothing yet
    p = jnp.exp(s - base[..., None])
    alpha = jnp.exp(m - base)
    denom = alpha * denom + p.sum(axis=-1)
    acc = alpha[..., None] * acc + jnp.einsum(contraction, p, v)
    return m_new, denom, acc


def _init(rows: int, kv_heads: int, group: int, value_dim: int):
    return (
        jnp.full((rows, kv_heads, group), -jnp.inf, jnp.float32),
        jnp.zeros((rows, kv_heads, group), jnp.float32),
        jnp.zeros((rows, kv_heads, group, value_dim), jnp.float32),
    )


def _finish(carry, sinks):
    """acc / denom ([rows, H, G, D]), the sinks' exp(sink - m) added to the denominator; rows
    that saw no key (padding, dropped requests) are zero."""
    m, denom, acc = carry
    empty = denom == 0
    if sinks is not None:
        sink = sinks.reshape(m.shape[1:])  # [H, G]: query head h·G + g
        top = jnp.maximum(m, sink)
        rescale = jnp.exp(jnp.where(empty, 0.0, m - top))
        denom = denom * rescale + jnp.exp(sink - top)
        acc = acc * rescale[..., None]
    empty = empty[..., None]
    return jnp.where(empty, 0.0, acc / jnp.where(empty, 1.0, denom[..., None]))


def _query_window(pos, statics: Statics):
    """First position each query at ``pos`` may see: 0, ``pos - W + 1`` with a sliding window
    W, ``C·(pos // C)`` with chunked local attention of chunk C (non-decreasing in ``pos``)."""
    chunk, window = statics.chunk_size, statics.sliding_window
    if chunk is not None:
        return pos // chunk * chunk
    return jnp.zeros_like(pos) if window is None else jnp.maximum(pos - window + 1, 0)


def _pages_per_step(keys: int, page_size: int, pages_per_seq: int) -> int:
    return max(1, min(pages_per_seq, keys // page_size))


def _decode(kv, layer, q_rows, rows_ok, rows_seq, pos, page_indices, sinks, statics):
    """Flash decoding, one query per row: q_rows [N, H, G, D] at positions pos int32[N] of
    requests rows_seq; rows not rows_ok read nothing. -> float32 [N, H, G, Dv] (Dv:
    ``spec.value_dim``, D but for a latent cache)."""
    num_rows, kv_heads, group, _ = q_rows.shape
    page_size = statics.spec.page_size
    pages_per_seq = page_indices.shape[1]
    lo = _query_window(pos, statics)
    first, last = lo // page_size, pos // page_size
    # Enough keys per step that the loop's per-step overhead is paid rarely, few enough that
    # the per-step gather of every row's keys stays small.
    keys = statics.options.keys_per_step or max(
        1, min(XLA_KEYS_PER_STEP, XLA_TOKEN_KEYS_PER_STEP // num_rows)
    )
    block = _pages_per_step(keys, page_size, pages_per_seq)
    num_steps = -(-jnp.max(jnp.where(rows_ok, last - first + 1, 0), initial=0) // block)
    table = page_indices[rows_seq]  # int32[N, pages_per_seq]: each row's page-table row
    within = jnp.arange(page_size, dtype=jnp.int32)
    offsets = jnp.arange(block, dtype=jnp.int32)

    def fold_pages(i, carry):
        page_pos = first[:, None] + i * block + offsets  # int32[N, block]
        page = jnp.take_along_axis(table, jnp.clip(page_pos, 0, pages_per_seq - 1), 1)
        slots = (page[..., None] * page_size + within).reshape(num_rows, -1)  # [N, keys]
        k_pos = (page_pos[..., None] * page_size + within).reshape(num_rows, -1)
        in_row = jnp.repeat(page_pos <= last[:, None], page_size, axis=1)
        seen = in_row & (k_pos <= pos[:, None]) & (k_pos >= lo[:, None]) & rows_ok[:, None]
        k, v = read_kv(kv, layer, slots, statics)  # [N, keys, H, D]
        v = jnp.where(seen[:, :, None, None], v, 0.0)  # unseen slots may hold NaN or inf
        s = _scores(q_rows, k, "nhgd,nkhd->nhgk", statics)
        s = jnp.where(seen[:, None, None, :], s, -jnp.inf)
        return _fold(carry, s, v, "nhgk,nkhd->nhgd")

    init = _init(num_rows, kv_heads, group, statics.spec.value_dim)
    return _finish(jax.lax.fori_loop(0, num_steps, fold_pages, init), sinks)


def _prefill(kv, layer, q, out, bounds, is_prefill, kv_lens, page_indices, sinks, statics):
    """Blocked attention for the requests marked ``is_prefill``: writes their tokens' rows of
    ``out`` [T, H, G, Dv] (q.dtype) and returns it; other rows are left as they are."""
    num_tokens, kv_heads, group, _ = q.shape
    page_size = statics.spec.page_size
    pages_per_seq = page_indices.shape[1]
    qb = min(num_tokens, statics.options.queries_per_block or XLA_QUERIES_PER_BLOCK)
    block = _pages_per_step(
        statics.options.keys_per_step or XLA_PREFILL_KEYS_PER_STEP, page_size, pages_per_seq
    )
    starts, ends = bounds[:-1], bounds[1:]
    q_lens = ends - starts
    blocks_of = jnp.where(is_prefill, -(-q_lens // qb), 0)  # query blocks per request
    blocks_end = jnp.cumsum(blocks_of)
    within = jnp.arange(page_size, dtype=jnp.int32)
    offsets = jnp.arange(block, dtype=jnp.int32)
    rows_at = jnp.arange(qb, dtype=jnp.int32)

    def query_block(b, out):
        seq = jnp.searchsorted(blocks_end, b, side="right").astype(jnp.int32)
        start = starts[seq] + (b - (blocks_end[seq] - blocks_of[seq])) * qb
        count = jnp.minimum(qb, ends[seq] - start)
        # The window [at, at + qb) of the token axis holds the block's tokens [start,
        # start + count); clipped so it stays inside the axis (it may then begin earlier).
        at = jnp.clip(start, 0, num_tokens - qb)
        t = at + rows_at
        row_ok = (t >= start) & (t < start + count)
        pos = kv_lens[seq] - q_lens[seq] + (t - starts[seq])  # int32[qb]
        lo = _query_window(pos, statics)
        first_pos = kv_lens[seq] - q_lens[seq] + (start - starts[seq])
        first = _query_window(first_pos, statics) // page_size
        last = (first_pos + count - 1) // page_size
        table = page_indices[seq]
        q_blk = jax.lax.dynamic_slice_in_dim(q, at, qb).astype(jnp.float32)

        def key_block(i, carry):
            page_pos = first + i * block + offsets  # int32[block]
            page = table[jnp.clip(page_pos, 0, pages_per_seq - 1)]
            slots = (page[:, None] * page_size + within).reshape(-1)  # [keys]
            k_pos = (page_pos[:, None] * page_size + within).reshape(-1)
            in_row = jnp.repeat(page_pos <= last, page_size)
            seen = (
                row_ok[:, None]
                & in_row[None, :]
                & (k_pos[None, :] <= pos[:, None])
                & (k_pos[None, :] >= lo[:, None])
            )  # [qb, keys]
            k, v = read_kv(kv, layer, slots, statics)  # [keys, H, D]
            v = jnp.where(seen.any(axis=0)[:, None, None], v, 0.0)  # no query sees it
            s = _scores(q_blk, k, "qhgd,khd->qhgk", statics)
            s = jnp.where(seen[:, None, None, :], s, -jnp.inf)
            return _fold(carry, s, v, "qhgk,khd->qhgd")

        num_steps = -(-(last - first + 1) // block)
        init = _init(qb, kv_heads, group, statics.spec.value_dim)
        res = _finish(jax.lax.fori_loop(0, num_steps, key_block, init), sinks)
        old = jax.lax.dynamic_slice_in_dim(out, at, qb)
        new = jnp.where(row_ok[:, None, None, None], res.astype(out.dtype), old)
        return jax.lax.dynamic_update_slice_in_dim(out, new, at, 0)

    return jax.lax.fori_loop(0, blocks_end[-1], query_block, out)


def local_xla(
    kv, layer, q, page_indices, kv_lens, cu_q_lens, num_seqs, sinks=None, *, statics: Statics
):
    """One device: kv [L, slots, C, D_pad] (any kv_layout), q [T, Hq_local, D], sinks
    float32[Hq_local] or None -> [T, Hq_local, Dv] (Dv = ``spec.value_dim``: D, or
    kv_lora_rank for a latent cache, whose output is in latent space)."""
    num_layers, _, combined, _ = kv.shape
    num_tokens, q_heads, head_dim = q.shape
    kv_heads = combined // statics.spec.rows_per_head
    group = q_heads // kv_heads
    live, _, _ = requests_on_block(
        kv, layer, page_indices, kv_lens, cu_q_lens, num_seqs, num_tokens, statics.spec.page_size
    )
    bounds = live_query_bounds(cu_q_lens, live)
    q_lens = bounds[1:] - bounds[:-1]
    requests = jnp.arange(q_lens.shape[0], dtype=jnp.int32)
    is_live = requests < live
    layer = jnp.clip(layer, 0, num_layers - 1)
    q = stored_query(q, statics)
    q4 = q.reshape(num_tokens, kv_heads, group, head_dim)

    value_dim = statics.spec.value_dim
    out = jnp.zeros((num_tokens, kv_heads, group, value_dim), q.dtype)
    out = _prefill(
        kv, layer, q4, out, bounds, is_live & (q_lens > 1), kv_lens, page_indices, sinks, statics
    )
    # Decode: one row per request, its single query token (rows of other requests read nothing
    # and are written nowhere).
    is_decode = is_live & (q_lens == 1)
    token = jnp.clip(bounds[:-1], 0, num_tokens - 1)
    q_rows = q4[token].astype(jnp.float32)
    rows = _decode(
        kv, layer, q_rows, is_decode, requests, kv_lens - 1, page_indices, sinks, statics
    )
    out = out.at[jnp.where(is_decode, token, num_tokens)].set(rows.astype(q.dtype), mode="drop")
    return out.reshape(num_tokens, q_heads, value_dim)
