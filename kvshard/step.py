"""One scheduler step as device metadata: :class:`StepMetadata` and :func:`build_step`.

A serving loop grows every scheduled request in the :class:`~kvshard.PageAllocator`, then calls
:func:`build_step` once: one vectorized host call turns the allocator's page table into
everything the step needs on device, the update slices that :func:`kvshard.update` writes
through and the ragged paged-attention metadata that :func:`kvshard.attention` reads through
(the arguments of JAX's ``ragged_paged_attention``)::

    rows = alloc.allocate_batch(req_ids, num_scheduled_tokens)
    step = kvshard.build_step(alloc, req_ids, num_scheduled_tokens, rows=rows)
    # the step's tokens: request by request in req_ids order, padded to step.num_tokens_padded
    cache = kvshard.update(cache, layer, k, v, step)
    out = kvshard.attention(q, cache, layer, step, sm_scale=D**-0.5)

Every array has a shape fixed by ``(num_tokens_padded, max_num_seqs)`` and the allocator's
page-table width, both bucketed, so a serving loop compiles a bounded number of times.

The builder is numpy only; this module imports JAX solely to register the pytree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from kvshard.metadata import build_update_slices, padded_num_slices

if TYPE_CHECKING:
    from kvshard.allocator import PageAllocator

__all__ = ["StepMetadata", "build_step", "next_bucket", "stack_steps"]

# Smallest padded sizes: below these, padding costs nothing measurable and saves compilations.
MIN_TOKENS_PADDED = 16
MIN_SEQS_PADDED = 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepMetadata:
    """Everything one step needs on device: update slices and paged-attention metadata.

    A pytree of int32 arrays (NumPy from :func:`build_step`; put it on device once, pass it
    through ``jit``). With a data-parallel page axis every field gains a leading ``[dp]`` axis
    (:func:`stack_steps`), one step per page pool.

    The step's ``T = num_tokens_padded`` tokens are packed request by request in batch order
    from token 0; tokens past ``cu_q_lens[num_seqs]`` are padding (written nowhere, attended
    to by nothing, their attention output is zero).

    Attributes:
      slices: int32[3, S] update slices, rows (kv_cache_start, new_kv_start, slice_len);
        columns past ``num_slices`` are zero (padding). ``S = padded_num_slices(T,
        max_num_seqs, page_size)``.
      num_slices: int32[1] live columns of ``slices``.
      page_indices: int32[max_num_seqs, pages_per_seq] each request's page-table row (its
        pages in order; unused entries are the null page 0). ``pages_per_seq`` is the
        allocator's ``max_pages_per_request``.
      kv_lens: int32[max_num_seqs] tokens in the cache per request after this step (the
        step's own tokens included); 0 for padding rows.
      cu_q_lens: int32[max_num_seqs + 1] exclusive cumulative sum of the step's tokens per
        request: request ``i``'s tokens are ``[cu_q_lens[i], cu_q_lens[i + 1])``; padding
        rows repeat the total.
      num_seqs: int32[1] live requests (rows of ``page_indices``/``kv_lens``).
      positions: int32[T] position of each token in its request's sequence (for RoPE);
        0 for padding tokens.
    """

    slices: Any
    num_slices: Any
    page_indices: Any
    kv_lens: Any
    cu_q_lens: Any
    num_seqs: Any
    positions: Any

    @property
    def num_tokens_padded(self) -> int:
        """T: the step's padded token count (the token axis of k, v and q)."""
        return int(np.shape(self.positions)[-1])

    @property
    def max_num_seqs(self) -> int:
        """Rows of ``page_indices``: the padded request count."""
        return int(np.shape(self.kv_lens)[-1])


def next_bucket(n: int, minimum: int) -> int:
    """The smallest power of two >= max(n, minimum) (``minimum`` a power of two)."""
    return max(int(minimum), 1 << max(0, int(n) - 1).bit_length())


def _int_array(value: Any, name: str) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise ValueError(f"{name} must be a 1-D integer array, got {array.dtype}{array.shape}")
    return array.astype(np.int64, copy=False)


def build_step(
    allocator: PageAllocator,
    req_ids: Sequence[Hashable],
    num_scheduled_tokens: Sequence[int] | np.ndarray,
    *,
    num_tokens_padded: int | None = None,
    max_num_seqs: int | None = None,
    rows: Sequence[int] | np.ndarray | None = None,
) -> StepMetadata:
    """Builds a step's device metadata from the allocator, in one vectorized host call.

    Call it after the allocator has grown each request by its scheduled tokens
    (``allocate_batch(req_ids, num_scheduled_tokens)``), and after applying
    ``allocator.take_pending_copies()`` with :func:`kvshard.copy_pages`.

    Args:
      allocator: the :class:`~kvshard.PageAllocator` of the page pool (one per pool with a
        data-parallel page axis).
      req_ids: B live request ids, in the order the step's tokens are packed.
      num_scheduled_tokens: int[B] >= 0 tokens each request writes and queries this step.
        They are the request's last tokens: request i's new tokens sit at positions
        ``[num_tokens(i) - n_i, num_tokens(i))``.
      num_tokens_padded: T, the token axis of k, v and q; default the next power of two
        >= max(16, sum of scheduled tokens).
      max_num_seqs: rows of the attention metadata; default the next power of two
        >= max(8, B).
      rows: optional int[B] page-table rows of ``req_ids`` (what ``allocate_batch``
        returns), which saves looking them up.

    Returns:
      A :class:`StepMetadata` of NumPy int32 arrays.

    Raises:
      UnknownRequest: an id the allocator does not hold.
      ValueError: mismatched lengths, negative counts, a request scheduled more tokens than
        it holds, ``num_tokens_padded`` below the scheduled total, ``max_num_seqs`` below B,
        or ``rows`` that are not the requests' rows.
    """
    scheduled = _int_array(num_scheduled_tokens, "num_scheduled_tokens")
    batch = len(req_ids)
    if scheduled.shape != (batch,):
        raise ValueError(
            f"num_scheduled_tokens has {scheduled.shape[0]} entries for {batch} req_ids"
        )
    if batch and scheduled.min() < 0:
        i = int(np.argmin(scheduled))
        raise ValueError(f"num_scheduled_tokens[{i}]={int(scheduled[i])} must be >= 0")
    if rows is None:
        row_of = np.fromiter((allocator.row(r) for r in req_ids), np.int64, count=batch)
    else:
        row_of = _int_array(rows, "rows")
        if row_of.shape != (batch,):
            raise ValueError(f"rows has {row_of.shape[0]} entries for {batch} req_ids")
    table = allocator.page_table
    kv_lens = np.asarray(allocator.row_num_tokens)[row_of].astype(np.int64)
    computed = kv_lens - scheduled
    if batch and computed.min() < 0:
        i = int(np.argmin(computed))
        raise ValueError(
            f"num_scheduled_tokens[{i}]={int(scheduled[i])} exceeds the {int(kv_lens[i])} "
            f"tokens request {req_ids[i]!r} holds: grow it in the allocator first"
        )
    total = int(scheduled.sum())
    tokens = next_bucket(total, MIN_TOKENS_PADDED) if num_tokens_padded is None else None
    if tokens is None:
        tokens = int(num_tokens_padded)  # type: ignore[arg-type]
        if tokens < total:
            raise ValueError(
                f"num_tokens_padded={tokens} is below the {total} tokens scheduled this step"
            )
    seqs = next_bucket(batch, MIN_SEQS_PADDED) if max_num_seqs is None else int(max_num_seqs)
    if seqs < batch:
        raise ValueError(f"max_num_seqs={seqs} is below the {batch} requests of this step")
    page_size = allocator.page_size

    live = build_update_slices(computed, scheduled, table, page_size, rows=row_of)
    slices = np.zeros((3, padded_num_slices(tokens, seqs, page_size)), np.int32)
    slices[:, : live.shape[1]] = live

    page_indices = np.zeros((seqs, table.shape[1]), np.int32)
    page_indices[:batch] = table[row_of]
    lens = np.zeros(seqs, np.int32)
    lens[:batch] = kv_lens
    cu_q_lens = np.full(seqs + 1, total, np.int32)
    cu_q_lens[0] = 0
    np.cumsum(scheduled, out=cu_q_lens[1 : batch + 1], dtype=np.int32)
    # Token t of request i sits at position computed[i] + (t - cu_q_lens[i]).
    positions = np.zeros(tokens, np.int32)
    positions[:total] = np.arange(total) - np.repeat(cu_q_lens[:batch] - computed, scheduled)
    return StepMetadata(
        slices=slices,
        num_slices=np.array([live.shape[1]], np.int32),
        page_indices=page_indices,
        kv_lens=lens,
        cu_q_lens=cu_q_lens,
        num_seqs=np.array([batch], np.int32),
        positions=positions,
    )


def stack_steps(steps: Sequence[StepMetadata]) -> StepMetadata:
    """Stacks one step per page pool into the ``[dp, ...]`` form a page axis takes.

    Raises:
      ValueError: no steps, or their shapes differ (build them with the same
        ``num_tokens_padded`` and ``max_num_seqs``, and allocators of the same width).
    """
    if not steps:
        raise ValueError("stack_steps needs at least one StepMetadata")
    shapes = {tuple(np.shape(x) for x in dataclasses.astuple(s)) for s in steps}
    if len(shapes) > 1:
        raise ValueError(
            "steps have different shapes; build every pool's step with the same "
            "num_tokens_padded and max_num_seqs"
        )
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *steps)
