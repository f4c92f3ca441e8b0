"""Pallas TPU kernel: ragged paged attention over one device's stacked cache block, in place.

kvshard's own read kernel, beside the update kernel. It attends the step's queries
over the pages of each request's page-table row, reading the device's whole stacked block
``[L, num_pages·page_size, C, D_pad]`` where it lies: the wrapper views it as pages
``[L·num_pages, page_size, C, D_pad]`` (a reshape of the array, free), offsets the page table
by ``layer·num_pages`` and the kernel fetches each page it needs by DMA from HBM
(``memory_space=ANY``) through the scalar-prefetched table. No layer is sliced, no page
gathered by XLA.

What it reads (everything the xla backend reads):

* both row layouts (``kv_layout``): "interleaved" (K of head ``h`` on row ``2h``, V on
  ``2h + 1``) and "packed" (K|V of head ``h`` side by side in the lanes of row ``h``);
* GQA with any number ``G`` of query heads per KV head (``Hq = H·G``);
* ragged mixed prefill + decode in one call: request ``i``'s queries are tokens
  ``[cu_q_lens[i], cu_q_lens[i+1])``, its last ``q_len`` positions;
* causal masking, a sliding window ``W`` (keys ``(p - W, p]``), chunked local attention of
  chunk ``C`` (keys ``C·(p // C) .. p``); pages wholly before a query block's first window
  are never fetched;
* attention sinks (a logit per query head joining the denominator), soft cap, ``sm_scale``;
* float32 / bfloat16 / float16 caches and int8 / float8 ones with per-tensor K/V scales,
  plus an optional per-tensor q scale.

Schedule
--------
The grid runs over **work items**: query blocks of up to ``queries_per_block`` tokens of one
request (a request of ``q_len`` queries gives ``ceil(q_len / QB)`` items; a decode request one).
The item table ``(request, first token, tokens)`` is built by one vectorized XLA op before the
kernel and prefetched into SMEM with the page table, ``kv_lens`` and the query bounds; the
grid's length is the live item count (a dynamic grid). Per item the kernel

1. DMAs the item's query rows ``[Hkv, QB·G, D]`` from HBM into VMEM;
2. walks the pages ``[first, last]`` the item may see (``first``: the page of its first
   query's window start; ``last``: the page of its last query) in blocks of
   ``kv_pages_per_block`` pages, double buffered: block ``b + 1``'s page DMAs are started
   before block ``b`` is waited for and folded (online softmax, float32);
3. writes its ``[Hkv, QB·G, D]`` output rows back to HBM with one DMA.

A block's last, partial, group of pages re-fetches the item's last page instead of leaving
the row (an index always inside the request's own pages); those duplicate keys are masked.

Fused write + attend
--------------------
:func:`fused_ragged_paged_attention` runs the same kernel in its ``fused`` mode: the step's
encoded rows ``new_kv [T, C, D_pad]`` are an input; beside each page block the kernel DMAs the
rows of the request's new positions ``[kv_len - q_len, kv_len)`` (and an int32 flag per token:
update writes it at its own position) into a second VMEM block and selects them per key slot
instead of the page's; a request all of whose tokens are written fetches only its pages' older
slots. In the last grid step, after every read, it writes the rows into their pages HBM->HBM,
one DMA per slice kept by :func:`kvshard._device.drop.writable_slices`, the block aliased to its
second output. So it equals the update kernel followed by this kernel, bit for bit.

Masking
-------
A key no query of the item may see contributes nothing, whatever its slot holds (NaN, inf,
another request's data): its score is replaced by -inf **and** its value by 0 before the
weighted sum (0·NaN would be NaN), as in the xla backend. The value mask is per key of the
item: a non-finite value in a slot that one query of the item sees (that query's output is
then non-finite anyway) can reach the item's other queries.

Interpret mode
--------------
The kernel only indexes refs (``ref.at[...]``, ``ref[...]``): no reshape or bitcast of a ref,
so Pallas TPU interpret mode runs it on CPU exactly (``interpret=True``). Every reshape
(queries to ``[Hkv, T·G, D]``, the block to pages) happens on arrays in the wrapper, where it
is free on TPU.

Beside it
---------
:mod:`kvshard.kernels.attention_checks` (``static_validate_inputs``,
``dynamic_validate_inputs``) and :mod:`kvshard.kernels.attention_reference`
(``ref_ragged_paged_attention``, the jnp reference on the same operands), both re-exported
here. The schedule documented above, the kernel and its one wrapper are read together.

Budgets ``jax.export`` cannot check
-----------------------------------
The scalar-prefetch operands must fit SMEM and the scratch VMEM; both are computed on the host
from :mod:`kvshard.kernels.budgets` (:func:`~kvshard.kernels.budgets.attention_smem_bytes`,
:func:`~kvshard.kernels.budgets.attention_vmem_bytes`), and :class:`BlockSizes` defaults are
sized to them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kvshard._device.drop import (
    live_query_bounds,
    requests_on_block,
    token_slots,
    writable_slices,
)
from kvshard.kernels.attention_checks import dynamic_validate_inputs, static_validate_inputs
from kvshard.kernels.attention_reference import ref_ragged_paged_attention
from kvshard.kernels.budgets import (
    attention_smem_bytes,
    attention_vmem_budget_bytes,
    attention_vmem_bytes,
    default_attention_blocks,
    scalar_prefetch_budget_bytes,
)
from kvshard.kernels.checks import resolve_interpret

__all__ = [
    "BlockSizes",
    "dynamic_validate_inputs",
    "fused_ragged_paged_attention",
    "ragged_paged_attention",
    "ref_ragged_paged_attention",
    "static_validate_inputs",
]

# Mask value of scores no query may see (the softmax then gives them weight exactly 0).
_MASKED = -jnp.inf
# DMA semaphores: one per K/V buffer slot (double buffering), one for the query/output rows.
_KV_SEMS, _QO_SEM = 2, 2
# Fused write + attend: the new-token rows of each buffer slot, and the page writes.
_NEW_SEM, _WRITE_SEM = 3, 5


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """The kernel's block sizes (JAX's ``BlockSizes`` role).

    Attributes:
      queries_per_block: query tokens per work item (``QB``); each item computes ``QB·G``
        score rows per KV head.
      kv_pages_per_block: pages fetched and folded per inner step (``KBP``); two blocks are in
        VMEM at once (double buffering).
    """

    queries_per_block: int
    kv_pages_per_block: int

    def __post_init__(self) -> None:
        for name in ("queries_per_block", "kv_pages_per_block"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockSizes.{name}={value!r} must be an int >= 1")


def _window_start(pos, sliding_window: int | None, chunk_size: int | None):
    """First key position a query at ``pos`` may see (non-decreasing in ``pos``)."""
    if chunk_size is not None:
        return pos // chunk_size * chunk_size
    if sliding_window is not None:
        return jnp.maximum(pos - sliding_window + 1, 0)
    return jnp.zeros_like(pos)


class _CopyWhen:
    """A DMA started and waited for only when ``cond`` (a traced bool) holds: the fused mode
    issues no zero-length descriptor (and interpret mode's race detector, in its "on_wait"
    mode, cannot wait on a copy that moved nothing)."""

    def __init__(self, copy, cond):
        self.copy, self.cond = copy, cond

    def start(self):
        pl.when(self.cond)(self.copy.start)

    def wait(self):
        pl.when(self.cond)(self.copy.wait)


def _page_copy(kv_hbm, page, dst, sem):
    """The DMA of one K/V page (HBM -> a VMEM buffer slot); every page read goes through it."""
    return pltpu.make_async_copy(kv_hbm.at[page], dst, sem)


def _head_kv(rows, slot, h, layout: str, head_dim: int):
    """K and V of KV head ``h`` in a VMEM block of rows [2, KBP, P, C, D_pad] (``slot``: the
    buffer): K|V in one row ("packed") or rows 2h, 2h+1 ("interleaved")."""
    k_row, v_row, v_lane = (h, h, head_dim) if layout == "packed" else (2 * h, 2 * h + 1, 0)
    k = rows[slot, :, :, k_row, pl.ds(0, head_dim)]
    return k, rows[slot, :, :, v_row, pl.ds(v_lane, head_dim)]


def _kernel(
    # Scalar prefetch (SMEM, int32).
    items_ref,  # [3, N]: (request, first token, tokens) of each work item
    pages_ref,  # [max_num_seqs · pages_per_seq]: page ids, offset by layer·num_pages
    kv_lens_ref,  # [max_num_seqs]
    bounds_ref,  # [max_num_seqs + 1]: live query bounds
    *operand_refs,
    layout: str,
    head_dim: int,
    group: int,
    pages_per_seq: int,
    queries_per_block: int,
    kv_pages_per_block: int,
    sm_scale: float,
    soft_cap: float | None,
    sliding_window: int | None,
    chunk_size: int | None,
    k_scale: float | None,
    v_scale: float | None,
    q_scale: float | None,
    has_sinks: bool,
    fused: bool = False,
):
    # Operands, in order: (fused: slices_ref SMEM int32[3, S], the guarded writes),
    # q_hbm HBM q.dtype[Hkv, T·G, D], kv_hbm HBM dtype[L·num_pages, P, C, D_pad] (the device's
    # stacked block as pages; aliased to the second output when fused), (sinks: VMEM
    # f32[Hkv, R, 1]), (fused: new_hbm HBM dtype[T, C, D_pad] the step's encoded rows,
    # flags_hbm HBM int32[T, 1] whether token t is written at its own position), out_hbm,
    # (fused: the aliased cache output), scratch.
    refs = list(operand_refs)
    slices_ref = refs.pop(0) if fused else None
    complete_ref = refs.pop(0) if fused else None  # SMEM int32[max_num_seqs]
    q_hbm, kv_hbm = refs.pop(0), refs.pop(0)
    sinks_ref = refs.pop(0) if has_sinks else None
    new_hbm, flags_hbm = (refs.pop(0), refs.pop(0)) if fused else (None, None)
    out_hbm = refs.pop(0)
    if fused:
        refs.pop(0)  # the cache output: the same buffer as kv_hbm
    q_vmem, o_vmem, kv_vmem = refs.pop(0), refs.pop(0), refs.pop(0)
    new_vmem, flag_vmem = (refs.pop(0), refs.pop(0)) if fused else (None, None)
    (sems,) = refs
    num_kv_heads = q_vmem.shape[0]
    page_size = kv_vmem.shape[2]
    rows = queries_per_block * group  # score rows per KV head
    keys = kv_pages_per_block * page_size
    item = pl.program_id(0)
    seq, start, count = items_ref[0, item], items_ref[1, item], items_ref[2, item]

    @pl.when(count > 0)
    def _attend():
        q_copy = pltpu.make_async_copy(
            q_hbm.at[:, pl.ds(start * group, count * group)],
            q_vmem.at[:, pl.ds(0, count * group)],
            sems.at[_QO_SEM],
        )
        q_copy.start()
        q_start = bounds_ref[seq]
        q_len = bounds_ref[seq + 1] - q_start
        first_pos = kv_lens_ref[seq] - q_len + (start - q_start)
        last_pos = first_pos + count - 1
        first_lo = _window_start(first_pos, sliding_window, chunk_size)
        first_page = first_lo // page_size
        last_page = last_pos // page_size
        num_blocks = (last_page - first_page + kv_pages_per_block) // kv_pages_per_block
        row_base = seq * pages_per_seq

        kv_len = kv_lens_ref[seq]
        new_lo = kv_len - q_len  # positions [new_lo, kv_len) are this step's tokens

        def page_copies(block, slot):
            copies = []
            for j in range(kv_pages_per_block):
                at = jnp.minimum(first_page + block * kv_pages_per_block + j, last_page)
                page = pages_ref[row_base + at]
                if not fused:
                    copies.append(_page_copy(kv_hbm, page, kv_vmem.at[slot, j], sems.at[slot]))
                else:
                    # The step's own tokens on this page come from new_hbm (the rows being
                    # written), never from the page: the page is written after every read.
                    # When update writes all of the request's tokens, only the page's older
                    # slots (a prefix: positions before new_lo) are fetched; otherwise (a
                    # dropped slice) the whole page, the flags choosing per slot.
                    page_lo = at * page_size
                    old = jnp.where(
                        complete_ref[seq] != 0,
                        jnp.clip(new_lo - page_lo, 0, page_size),
                        page_size,
                    )
                    copies.append(
                        _CopyWhen(
                            pltpu.make_async_copy(
                                kv_hbm.at[page, pl.ds(0, old)],
                                kv_vmem.at[slot, j, pl.ds(0, old)],
                                sems.at[slot],
                            ),
                            old > 0,
                        )
                    )
                    a = jnp.maximum(page_lo, new_lo)
                    n = jnp.maximum(jnp.minimum(page_lo + page_size, kv_len) - a, 0)
                    off = jnp.where(n > 0, a - page_lo, 0)
                    tok = jnp.where(n > 0, q_start + a - new_lo, 0)
                    new_sem = sems.at[_NEW_SEM + slot]
                    rows_copy = pltpu.make_async_copy(
                        new_hbm.at[pl.ds(tok, n)], new_vmem.at[slot, j, pl.ds(off, n)], new_sem
                    )
                    flags_copy = pltpu.make_async_copy(
                        flags_hbm.at[pl.ds(tok, n)], flag_vmem.at[slot, j, pl.ds(off, n)], new_sem
                    )
                    copies += [_CopyWhen(rows_copy, n > 0), _CopyWhen(flags_copy, n > 0)]
            return copies

        for copy in page_copies(0, 0):
            copy.start()

        row = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
        token = row // group
        q_pos = first_pos + token  # [R, 1]
        row_ok = token < count
        lo = _window_start(q_pos, sliding_window, chunk_size)
        q_copy.wait()
        qs = []
        for h in range(num_kv_heads):
            q_h = q_vmem[h].astype(jnp.float32)  # [R, D]
            qs.append(q_h if q_scale is None else q_h * q_scale)

        def fold(block, carry):
            slot = block % 2

            @pl.when(block + 1 < num_blocks)
            def _prefetch_next():
                for copy in page_copies(block + 1, 1 - slot):
                    copy.start()

            for copy in page_copies(block, slot):
                copy.wait()
            first_key = (first_page + block * kv_pages_per_block) * page_size
            k_pos = first_key + jax.lax.broadcasted_iota(jnp.int32, (1, keys), 1)
            # Duplicate (clamped) pages lie past last_pos >= q_pos: never seen.
            seen = row_ok & (k_pos <= q_pos) & (k_pos >= lo)  # [R, KB]
            # Keys some query of the item sees: the union of its queries' windows, the
            # contiguous [lo(first_pos), last_pos] (windows of consecutive positions overlap),
            # built as a column so no row vector is transposed.
            k_col = first_key + jax.lax.broadcasted_iota(jnp.int32, (keys, 1), 0)
            key_seen = (k_col >= first_lo) & (k_col <= last_pos)  # [KB, 1]
            if fused:
                # [KBP, P, 1]: slots holding this step's tokens that the update writes there
                # (a dropped slice's tokens keep the page's old value, as update leaves it).
                pos3 = (
                    first_key
                    + jax.lax.broadcasted_iota(jnp.int32, (kv_pages_per_block, page_size, 1), 0)
                    * page_size
                    + jax.lax.broadcasted_iota(jnp.int32, (kv_pages_per_block, page_size, 1), 1)
                )
                is_new3 = (pos3 >= new_lo) & (pos3 < kv_len) & (flag_vmem[slot] != 0)
            out = []
            for h, (m, denom, acc) in enumerate(carry):
                k, v = _head_kv(kv_vmem, slot, h, layout, head_dim)
                if fused:  # this step's keys from the new rows (written, not yet in HBM)
                    k_new, v_new = _head_kv(new_vmem, slot, h, layout, head_dim)
                    k = jnp.where(is_new3, k_new, k)
                    v = jnp.where(is_new3, v_new, v)
                k = k.reshape(keys, head_dim).astype(jnp.float32)  # a value, not a ref
                v = v.reshape(keys, head_dim).astype(jnp.float32)
                if k_scale is not None:
                    k = k * k_scale
                if v_scale is not None:
                    v = v * v_scale
                v = jnp.where(key_seen, v, 0.0)  # a slot no query sees may hold NaN or inf
                s = jax.lax.dot_general(
                    qs[h], k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
                )
                s = s * sm_scale
                if soft_cap is not None:
                    s = soft_cap * jnp.tanh(s / soft_cap)
                s = jnp.where(seen, s, _MASKED)
                m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
                base = jnp.where(m_new == _MASKED, 0.0, m_new)  # rows that saw nothing yet
                p = jnp.exp(s - base)
                alpha = jnp.exp(m - base)
                denom = alpha * denom + jnp.sum(p, axis=1, keepdims=True)
                pv = jax.lax.dot_general(
                    p, v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
                )
                out.append((m_new, denom, alpha * acc + pv))
            return tuple(out)

        init = tuple(
            (
                jnp.full((rows, 1), _MASKED, jnp.float32),
                jnp.zeros((rows, 1), jnp.float32),
                jnp.zeros((rows, head_dim), jnp.float32),
            )
            for _ in range(num_kv_heads)
        )
        carry = jax.lax.fori_loop(0, num_blocks, fold, init)
        for h, (m, denom, acc) in enumerate(carry):
            empty = denom == 0.0
            if sinks_ref is not None:
                sink = sinks_ref[h]  # [R, 1]
                top = jnp.maximum(m, sink)
                rescale = jnp.exp(jnp.where(empty, 0.0, m - top))
                denom = denom * rescale + jnp.exp(sink - top)
                acc = acc * rescale
            res = jnp.where(empty, 0.0, acc / jnp.where(empty, 1.0, denom))
            o_vmem[h] = res.astype(o_vmem.dtype)
        out_copy = pltpu.make_async_copy(
            o_vmem.at[:, pl.ds(0, count * group)],
            out_hbm.at[:, pl.ds(start * group, count * group)],
            sems.at[_QO_SEM],
        )
        out_copy.start()
        out_copy.wait()

    if fused:

        @pl.when(item == pl.num_programs(0) - 1)
        def _write_pages():
            # After every read of the kernel (each item waits for its own page DMAs): the
            # step's rows go to their pages HBM->HBM, one DMA per slice (update's "direct"
            # schedule); dropped slices were zeroed to length 0 by the wrapper's guard.
            def copy(i):
                dst, src, length = slices_ref[0, i], slices_ref[1, i], slices_ref[2, i]
                return pltpu.make_async_copy(
                    new_hbm.at[pl.ds(src, length)],
                    kv_hbm.at[dst // page_size, pl.ds(dst % page_size, length)],
                    sems.at[_WRITE_SEM],
                )

            num_slices = slices_ref.shape[1]

            def start(i, c):
                _CopyWhen(copy(i), slices_ref[2, i] > 0).start()
                return c

            def wait(i, c):
                _CopyWhen(copy(i), slices_ref[2, i] > 0).wait()
                return c

            jax.lax.fori_loop(0, num_slices, start, 0)
            jax.lax.fori_loop(0, num_slices, wait, 0)


def _work_items(bounds, num_items: int, queries_per_block: int):
    """int32[3, num_items] (request, first token, tokens) of every query block of the live
    requests (``bounds``: :func:`kvshard._device.drop.live_query_bounds`, so requests from the live
    count on own no token), in request order, then (0, 0, 0) padding; and the item count [1]."""
    max_seqs = bounds.shape[0] - 1
    q_lens = bounds[1:] - bounds[:-1]  # 0 from `live` on (live_query_bounds)
    per = (q_lens + queries_per_block - 1) // queries_per_block
    ends = jnp.cumsum(per)
    b = jnp.arange(num_items, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(ends, b, side="right"), 0, max_seqs - 1).astype(jnp.int32)
    start = bounds[seq] + (b - (ends[seq] - per[seq])) * queries_per_block
    used = b < ends[-1]
    count = jnp.where(used, jnp.minimum(queries_per_block, bounds[seq + 1] - start), 0)
    items = jnp.stack([jnp.where(used, seq, 0), jnp.where(used, start, 0), count])
    return items.astype(jnp.int32), ends[-1:].astype(jnp.int32)


class _Params(NamedTuple):
    """The static keywords of one kernel call, checked (:func:`_checked_call`)."""

    kv_layout: str
    page_size: int
    sm_scale: float
    sliding_window: int | None
    chunk_size: int | None
    soft_cap: float | None
    k_scale: float | None
    v_scale: float | None
    q_scale: float | None
    block_sizes: BlockSizes
    interpret: Any


@functools.partial(jax.jit, static_argnames=("params",))
def _ragged_paged_attention(
    q, kv_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs, sinks, writes, *, params
):
    """The kernel's call; ``writes`` (fused): (new_rows [T, C, D_pad] in the cache dtype,
    slices int32[3, S], num_slices int32[1]) written into ``layer`` as :func:`kvshard.update`
    writes them; then returns (out, kv_cache)."""
    kv_layout, page_size, sm_scale, sliding_window, chunk_size, soft_cap = params[:6]
    k_scale, v_scale, q_scale, block_sizes, interpret = params[6:]
    fused = writes is not None
    num_layers, num_slots, combined, padded = kv_cache.shape
    num_tokens, q_heads, head_dim = q.shape
    num_pages = num_slots // page_size
    kv_heads = combined // (1 if kv_layout == "packed" else 2)
    group = q_heads // kv_heads
    max_seqs, pages_per_seq = page_indices.shape
    qb, kbp = block_sizes.queries_per_block, block_sizes.kv_pages_per_block
    # THE drop rule (both backends): the first request out of contract and all after it,
    # and every request of a layer out of range, read nothing and give zeros.
    live, seq, tok_ok = requests_on_block(
        kv_cache, layer, page_indices, kv_lens, cu_q_lens, num_seqs, num_tokens, page_size
    )
    bounds = live_query_bounds(cu_q_lens, live)
    num_items = max_seqs + -(-num_tokens // qb)
    items, total = _work_items(bounds, num_items, qb)
    layer = jnp.clip(layer, 0, num_layers - 1)
    # The layer offset in the page table: page p of `layer` is page layer·num_pages + p of
    # the block's page view. Clamped so no index leaves the layer (dropped rows are unread).
    pages = (jnp.clip(page_indices, 0, num_pages - 1) + layer * num_pages).reshape(-1)
    kv_pages = kv_cache.reshape(num_layers * num_pages, page_size, combined, padded)  # free
    # Queries as [Hkv, T·G, D]: a query block's rows of one KV head are contiguous.
    q_rows = q.reshape(num_tokens, kv_heads, group, head_dim).transpose(1, 0, 2, 3)
    q_rows = q_rows.reshape(kv_heads, num_tokens * group, head_dim)
    rows = qb * group
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    in_specs = [any_spec, any_spec]
    operands = [q_rows, kv_pages]
    if sinks is not None:
        sink_rows = jnp.repeat(sinks.astype(jnp.float32).reshape(kv_heads, 1, group), qb, axis=1)
        operands.append(sink_rows.reshape(kv_heads, rows, 1))
        in_specs.append(pl.BlockSpec((kv_heads, rows, 1), lambda i, *_: (0, 0, 0)))
    prefetch = [items, pages, kv_lens, bounds]
    out_specs: Any = any_spec
    out_shape: Any = jax.ShapeDtypeStruct(q_rows.shape, q.dtype)
    scratch = [
        pltpu.VMEM((kv_heads, rows, head_dim), q.dtype),
        pltpu.VMEM((kv_heads, rows, head_dim), q.dtype),
        pltpu.VMEM((2, kbp, page_size, combined, padded), kv_pages.dtype),
    ]
    aliases = {}
    if fused:
        new_rows, slices, num_slices, write_layer = writes
        # THE drop rule of update (kvshard._device.drop), as the update kernel's wrapper applies it:
        # a dropped slice becomes (0, 0, 0), a zero-length copy.
        valid = writable_slices(
            slices,
            num_slices,
            write_layer,
            num_layers=num_layers,
            num_tokens=num_tokens,
            num_slots=num_slots,
            page_size=page_size,
        )
        write_at = jnp.clip(write_layer, 0, num_layers - 1) * num_slots
        written = jnp.stack([slices[0] + write_at, slices[1], slices[2]])
        prefetch.append(jnp.where(valid[None], written, 0).astype(jnp.int32))
        # Token t is merged from new_rows iff update writes it to its own position's slot
        # (a dropped slice's tokens are read from the page, which update leaves unchanged).
        landed = token_slots(slices, valid, num_tokens, num_slots)
        tok = jnp.arange(num_tokens, dtype=jnp.int32)
        pos = kv_lens[seq] - (bounds[seq + 1] - bounds[seq]) + tok - bounds[seq]
        row = jnp.clip(pos // page_size, 0, pages_per_seq - 1)
        own = page_indices[seq, row] * page_size + pos % page_size
        flags = (tok_ok & (pos >= 0) & (landed == own)).astype(jnp.int32)[:, None]
        # Requests all of whose tokens are written: their new slots need no page fetch.
        flagged = jnp.zeros(max_seqs, jnp.int32).at[seq].add(flags[:, 0])
        prefetch.append((flagged == bounds[1:] - bounds[:-1]).astype(jnp.int32))
        operands += [new_rows, flags]
        in_specs += [any_spec, any_spec]
        out_specs = (any_spec, any_spec)
        out_shape = (out_shape, jax.ShapeDtypeStruct(kv_pages.shape, kv_pages.dtype))
        scratch += [
            pltpu.VMEM((2, kbp, page_size, combined, padded), kv_pages.dtype),
            pltpu.VMEM((2, kbp, page_size, 1), jnp.int32),
        ]
        aliases = {len(prefetch) + 1: 1}  # kv_pages, after the prefetch operands and q_rows
    scratch.append(pltpu.SemaphoreType.DMA((_WRITE_SEM + 1 if fused else _KV_SEMS + 1,)))
    kernel = functools.partial(
        _kernel,
        layout=kv_layout,
        head_dim=head_dim,
        group=group,
        pages_per_seq=pages_per_seq,
        queries_per_block=qb,
        kv_pages_per_block=kbp,
        sm_scale=sm_scale,
        soft_cap=soft_cap,
        sliding_window=sliding_window,
        chunk_size=chunk_size,
        k_scale=k_scale,
        v_scale=v_scale,
        q_scale=q_scale,
        has_sinks=sinks is not None,
        fused=fused,
    )
    call = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            in_specs=in_specs,
            out_specs=out_specs,
            # At least one step (a kernel with no grid step is not launched on every path; the
            # fused kernel's writes run in the last step).
            grid=(jnp.maximum(total[0], 1),),
            scratch_shapes=scratch,
        ),
        out_shape=out_shape,
        input_output_aliases=aliases,
        # Items write disjoint output rows but share scratch and semaphores: in order.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=interpret,
        name="kvshard_fused_paged_attention" if fused else "kvshard_ragged_paged_attention",
    )
    out = call(*prefetch, *operands)
    if fused:
        out, kv_pages = out
        kv_cache = kv_pages.reshape(kv_cache.shape)
    out = out.reshape(kv_heads, num_tokens, group, head_dim).transpose(1, 0, 2, 3)
    out = out.reshape(num_tokens, q_heads, head_dim)
    # Tokens of no live request (padding, dropped requests) were never written.
    out = jnp.where(tok_ok[:, None, None], out, 0).astype(q.dtype)
    return (out, kv_cache) if fused else out


def ragged_paged_attention(
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
    block_sizes: BlockSizes | None = None,
    interpret: bool | Any | None = None,
    validate: bool = False,
) -> jax.Array:
    """Ragged paged attention of one layer of one device's stacked block, read in place.

    Args:
      q: float[T, Hq, D]: the step's queries, packed request by request (``Hq = H·G``; query
        head ``i`` attends KV head ``i // G``). Stored as ``q_scale`` times these values
        when ``q_scale`` is given.
      kv_cache: dtype[L, num_pages·page_size, C, D_pad]: the device's whole stacked block in
        the logical dtype (float32, bfloat16, float16, int8, float8_e4m3fn, float8_e5m2);
        ``C = 2H`` ("interleaved") or ``H`` ("packed").
      layer: int32[]: the cache layer read (out of range: every token reads nothing).
      kv_lens: int32[max_num_seqs]: tokens in the cache per request, this step's included.
      page_indices: int32[max_num_seqs, pages_per_seq]: each request's pages of ``layer``
        (the layer group's table with layer groups), ids in ``[0, num_pages)``.
      cu_q_lens: int32[max_num_seqs + 1]: request ``i``'s queries are tokens
        ``[cu_q_lens[i], cu_q_lens[i+1])``.
      num_seqs: int32[1]: live requests.
      kv_layout: "interleaved" or "packed" (``CacheSpec.kv_layout``).
      page_size: slots per page.
      sm_scale: softmax scale (> 0).
      sliding_window: W: a query at p sees keys (p - W, p]; None: no window.
      chunk_size: C: chunked local attention, keys C·(p // C) .. p; None: none.
      soft_cap: scores ``soft_cap·tanh(s / soft_cap)``; None: no cap.
      sinks: float[Hq] attention-sink logits (-inf: none for that head) or None.
      k_scale, v_scale: per-tensor dequantization scales of a quantized cache (real =
        stored · scale); None: stored unscaled.
      q_scale: per-tensor scale of quantized queries; None: q holds real values.
      block_sizes: :class:`BlockSizes`; None picks them from the VMEM budget
        (:func:`kvshard.kernels.budgets.default_attention_blocks`).
      interpret: None: Mosaic on TPU, interpret mode elsewhere; True: interpret mode (exact,
        slow, CPU tests); False: Mosaic (export for TPU from any host); or an
        ``InterpretParams``.
      validate: check concrete metadata on the host first (:func:`dynamic_validate_inputs`).

    Returns:
      q.dtype[T, Hq, D]; tokens of no live request are zero. Out-of-contract metadata inside
      ``jit`` is dropped by kvshard's drop rule (:func:`kvshard._device.drop.live_requests`).

    Raises:
      TypeError, ValueError: see :func:`static_validate_inputs` and (with ``validate``)
        :func:`dynamic_validate_inputs`; a block over the VMEM budget or operands over the
        SMEM budget (ValueError naming both numbers).
    """
    return _checked_call(dict(locals()), writes=None)  # every argument above, by name


def fused_ragged_paged_attention(
    q: jax.Array,
    new_kv: jax.Array,
    kv_cache: jax.Array,
    layer: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    slices: jax.Array,
    num_slices: jax.Array,
    *,
    write_layer: jax.Array | None = None,
    **kwargs: Any,
) -> tuple[jax.Array, jax.Array]:
    """One kernel that writes the step's K/V rows into ``layer`` and attends.

    Equal to :func:`kvshard.kernels.update.kv_cache_update` of ``new_kv`` (``slices``'
    ``kv_cache_start`` is a slot of ``layer``, ``[0, num_pages·page_size)``) followed by
    :func:`ragged_paged_attention`: the returned cache bit for bit, the output exactly. The
    step's own keys are read from ``new_kv`` (DMA'd into VMEM beside each page block and
    selected per slot), never fetched back from the pages; every page is written HBM->HBM,
    one DMA per slice, in the last grid step, after every read of the kernel (no race). The
    cache is aliased to the second output: call it inside a ``jit`` that donates it.

    The merge assumes the step's metadata agree (as :func:`kvshard.build_step` builds them):
    a slice writes token ``t`` only at the slot of ``t``'s own position in its request, and no
    slot read as an older key is written this step. A slice the drop rule drops
    (:func:`kvshard._device.drop.writable_slices`) is written nowhere and its tokens are read from
    the pages, as update + attention read them.

    Args:
      new_kv: dtype[T, C, D_pad]: the step's rows as the cache stores them
        (:func:`kvshard.cache._codec.encode` then ``combine``), ``kv_cache``'s dtype.
      slices: int32[3, S] ``(kv_cache_start, new_kv_start, slice_len)``; num_slices int32[1].
      write_layer: int32[] the layer written (None: ``layer``); a layer out of range writes
        nothing (:func:`kvshard._device.drop.writable_slices`). kvshard.fused_attention passes the
        layer update would write, and ``layer`` as attention reads it (-1 when the layer's
        type is not the one read).
      Others: as :func:`ragged_paged_attention`.

    Returns:
      (out, kv_cache): the attention output and the updated block.

    Raises:
      ValueError: new_kv's shape or dtype other than [T, C, D_pad] of the cache's dtype,
        slices not [3, S] or num_slices not [1]; and all :func:`ragged_paged_attention`
        raises.
    """
    new_kv, slices, num_slices = (jnp.asarray(x) for x in (new_kv, slices, num_slices))
    q_arr, kv_arr = jnp.asarray(q), jnp.asarray(kv_cache)
    want = (q_arr.shape[0], *kv_arr.shape[2:])
    if new_kv.shape != want or new_kv.dtype != kv_arr.dtype:
        raise ValueError(
            f"new_kv is {new_kv.dtype}{list(new_kv.shape)}; expected {kv_arr.dtype}{list(want)}"
            " (the step's T rows as kv_cache stores them)"
        )
    if slices.ndim != 2 or slices.shape[0] != 3 or num_slices.shape != (1,):
        raise ValueError(
            f"slices {list(slices.shape)} must be [3, S] and num_slices {list(num_slices.shape)}"
            " must be [1]"
        )
    for name, x in (("slices", slices), ("num_slices", num_slices)):
        if x.dtype != jnp.int32:
            raise TypeError(f"{name} must be int32, got {x.dtype}")
    write_layer = jnp.asarray(layer if write_layer is None else write_layer)
    operands = (q, kv_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs)
    arguments = _SIGNATURE.bind(*operands, **kwargs)  # refuses what ragged_paged_attention does
    arguments.apply_defaults()
    return _checked_call(arguments.arguments, writes=(new_kv, slices, num_slices, write_layer))


_OPERANDS = ("q", "kv_cache", "layer", "kv_lens", "page_indices", "cu_q_lens", "num_seqs")


def _checked_call(arguments: dict[str, Any], writes: Any) -> Any:
    """:func:`ragged_paged_attention` (``writes`` None) and :func:`fused_ragged_paged_attention`:
    the static checks, the budgets, then the one jitted call. ``arguments``: every argument of
    :func:`ragged_paged_attention`, by name."""
    keywords = dict(arguments)
    operands = [jnp.asarray(keywords.pop(name)) for name in _OPERANDS]
    q, kv_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs = operands
    sinks = keywords.pop("sinks")
    sinks = None if sinks is None else jnp.asarray(sinks)
    validate, page_size = keywords.pop("validate"), keywords.pop("page_size")
    interpret = keywords.pop("interpret")
    static_validate_inputs(  # the other keywords, by name
        q, kv_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs, sinks, **keywords
    )
    block_sizes = keywords["block_sizes"]
    if not isinstance(page_size, int) or page_size < 1 or kv_cache.shape[1] % page_size:
        raise ValueError(
            f"page_size={page_size!r} must be an int >= 1 dividing kv_cache's "
            f"{kv_cache.shape[1]} slots"
        )
    if validate:
        dynamic_validate_inputs(
            q, kv_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs, page_size=page_size
        )
    num_tokens, q_heads, head_dim = q.shape
    _, _, combined, padded = kv_cache.shape
    max_seqs, pages_per_seq = page_indices.shape
    fused = writes is not None
    if block_sizes is None:
        block_sizes = default_attention_blocks(
            fused=fused,
            page_size=page_size,
            combined_heads=combined,
            padded_head_dim=padded,
            dtype=kv_cache.dtype,
            q_heads=q_heads,
            head_dim=head_dim,
            pages_per_seq=pages_per_seq,
            num_tokens=num_tokens,
            q_dtype=q.dtype,
        )
    vmem = attention_vmem_bytes(
        block_sizes.queries_per_block,
        block_sizes.kv_pages_per_block,
        page_size=page_size,
        combined_heads=combined,
        padded_head_dim=padded,
        dtype=kv_cache.dtype,
        q_heads=q_heads,
        head_dim=head_dim,
        q_dtype=q.dtype,
        fused=fused,
    )
    if vmem > attention_vmem_budget_bytes():
        raise ValueError(
            f"block_sizes={block_sizes} need {vmem} bytes of VMEM; the budget is "
            f"{attention_vmem_budget_bytes()} (kvshard.kernels.budgets)"
        )
    smem = attention_smem_bytes(max_seqs, pages_per_seq, num_tokens, block_sizes.queries_per_block)
    if fused:
        smem += (3 * writes[1].shape[1] + max_seqs) * 4  # the slices, the complete requests
    if smem > scalar_prefetch_budget_bytes():
        raise ValueError(
            f"page_indices [{max_seqs}, {pages_per_seq}] and the work items need {smem} bytes "
            f"of SMEM; the budget is {scalar_prefetch_budget_bytes()} (kvshard.kernels.budgets)"
        )
    floats = ("sm_scale", "soft_cap", "k_scale", "v_scale", "q_scale")
    keywords.update({k: None if keywords[k] is None else float(keywords[k]) for k in floats})
    keywords.update(block_sizes=block_sizes, interpret=resolve_interpret(interpret))
    params = _Params(page_size=page_size, **keywords)
    return _ragged_paged_attention(*operands, sinks, writes, params=params)


_SIGNATURE = inspect.signature(ragged_paged_attention)
