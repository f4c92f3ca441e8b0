"""Host-side metadata for the KV-cache update kernel: one scheduler step -> ``slices``.

The update kernel copies contiguous runs of new tokens into cache pages. Its metadata is
``slices``: int32[3, S] with rows (kv_cache_start, new_kv_start, slice_len), one column per
(request, touched page). :func:`build_update_slices` computes it with vectorized numpy (no Python
loop over requests), column for column identical to vLLM's TPU runner
(``_get_slot_mapping_metadata``, transposed).

To keep the number of compiled shapes bounded a serving loop pads the token count to a bucket
(:func:`token_buckets`, :func:`padded_token_count`) and the slices to a count that depends only
on that bucket (:func:`padded_num_slices`); :func:`pad_slices` does both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvshard import _deprecated
from kvshard._geometry.int32 import INT32_MAX


def _counts(value: Sequence[int] | np.ndarray, name: str) -> np.ndarray:
    """Returns ``value`` as int64[B], raising ValueError naming ``name`` if it is not."""
    array = np.asarray(value)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.dtype.kind not in "iu" and array.size:  # dtype.kind: cheaper than np.issubdtype
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if array.size and array.min() < 0:
        i = int(np.argmin(array))
        raise ValueError(f"{name}[{i}]={int(array[i])} must be >= 0")
    return array


def build_update_slices(
    num_computed_tokens: Sequence[int] | np.ndarray,
    num_scheduled_tokens: Sequence[int] | np.ndarray,
    page_table: np.ndarray,
    page_size: int,
    *,
    rows: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Returns int32[3, S] update slices for one step; S = pages touched by scheduled tokens.

    Args:
        num_computed_tokens: int[B] >= 0, tokens of each request already in the cache.
        num_scheduled_tokens: int[B] >= 0, tokens each request writes this step (0: no slice).
        page_table: int[R, W], page ids; row ``i`` belongs to request ``i`` of the batch, or
            to ``rows[i]`` when ``rows`` is given.
        page_size: tokens per page (P), an int >= 1.
        rows: optional int[B] in ``[0, R)``, page-table row of each request (e.g. what
            :meth:`kvshard.allocator.PageAllocator.allocate_batch` returns), which saves
            gathering ``page_table[rows]``.

    Returns:
        int32[3, S] with rows (kv_cache_start, new_kv_start, slice_len); columns in batch
        order then page order: ``kv_cache_start = page * P + offset`` (first and last page of
        a request may be partial), ``new_kv_start`` = exclusive cumsum of ``slice_len``, so
        the new tokens are packed in batch order from 0. ``S = 0`` when nothing is scheduled.

    Preconditions (not checked): the page-table entries a request writes hold its pages
    (e.g. :class:`kvshard.allocator.PageAllocator` has grown it by ``num_scheduled_tokens``).

    Raises:
        ValueError: ``num_computed_tokens``, ``num_scheduled_tokens`` or ``rows`` is not a 1-D
            integer array of non-negative values, or their shapes differ; ``page_size`` is not
            an int >= 1; ``page_table`` is not a 2-D integer array, has fewer rows than the
            batch (without ``rows``) or fewer than ``max(rows) + 1``; a request writes past
            the page table's width; a page id read from ``page_table`` is negative, or a slice
            offset (``page id × page_size + offset``, computed in int64 whatever the table's
            dtype) overflows int32.
    """
    computed = _counts(num_computed_tokens, "num_computed_tokens")
    scheduled = _counts(num_scheduled_tokens, "num_scheduled_tokens")
    if computed.shape != scheduled.shape:
        raise ValueError(
            f"num_computed_tokens has shape {computed.shape} but num_scheduled_tokens has "
            f"shape {scheduled.shape}"
        )
    if isinstance(page_size, bool) or not isinstance(page_size, int | np.integer) or page_size < 1:
        raise ValueError(f"page_size={page_size!r} must be an int >= 1")
    table = np.asarray(page_table)
    if table.ndim != 2 or (table.size and table.dtype.kind not in "iu"):
        raise ValueError(f"page_table must be a 2-D integer array, got {table.dtype}{table.shape}")
    batch = computed.shape[0]
    if rows is None:
        if table.shape[0] < batch:
            raise ValueError(f"page_table has {table.shape[0]} rows, fewer than {batch} requests")
        row_of = None
    else:
        row_of = _counts(rows, "rows")
        if row_of.shape != computed.shape:
            raise ValueError(f"rows has shape {row_of.shape}, want {computed.shape}")
        if batch and row_of.max() >= table.shape[0]:
            raise ValueError(f"rows holds {int(row_of.max())}, beyond page_table's rows")

    page_size = int(page_size)
    width = table.shape[1]
    flat_table = table.reshape(-1)  # 1-D takes are cheaper than 2-D fancy indexing
    if scheduled.all():
        active, start, count = None, computed, scheduled  # the common case: no gathers
        flat_row = (np.arange(batch) if row_of is None else row_of) * width
    else:  # zero-token requests produce no slice
        active = np.flatnonzero(scheduled)
        start, count = computed[active], scheduled[active]
        flat_row = (active if row_of is None else row_of[active]) * width
    end = start + count
    if page_size & (page_size - 1) == 0:  # shifts and masks are several times cheaper than //, %
        shift, mask = page_size.bit_length() - 1, page_size - 1
        first_page, last_page, start_offset = start >> shift, (end - 1) >> shift, start & mask
    else:
        first_page, last_page, start_offset = start // page_size, (end - 1) // page_size, None
    if last_page.size and last_page.max() >= width:
        i = int(np.argmax(last_page))
        raise ValueError(
            f"request {i if active is None else int(active[i])} writes page index "
            f"{int(last_page[i])}, beyond page_table width {width}"
        )
    num_touched = last_page - first_page + 1  # int64[A] >= 1
    total = int(num_touched.sum())
    out = np.empty((3, total), np.int64)
    if total == num_touched.size:
        # Every request stays inside one page (decode steps): one column per request.
        # int64 before the multiply: in a small or unsigned table's own dtype the product
        # wraps (uint16 page 4097 × 16 -> 16) into another request's page, past any check.
        np.multiply(flat_table[flat_row + first_page].astype(np.int64), page_size, out=out[0])
        out[0] += start % page_size if start_offset is None else start_offset
        out[2] = count
    else:
        cum = np.cumsum(num_touched)
        first_col = cum - num_touched
        # Every touched page starts full [0, P); then trim each request's first and last page.
        lo = np.zeros(total, np.int64)
        hi = np.full(total, page_size, np.int64)
        lo[first_col] = start % page_size if start_offset is None else start_offset
        hi[cum - 1] = end - last_page * page_size
        # Column c of request r reads page-table entry first_page[r] + (c - first_col[r]).
        base = np.repeat(flat_row + first_page - first_col, num_touched)
        page_ids = flat_table[base + np.arange(total)].astype(np.int64)  # see above: no wrap
        np.multiply(page_ids, page_size, out=out[0])
        out[0] += lo
        np.subtract(hi, lo, out=out[2])
    np.cumsum(out[2], out=out[1])
    out[1] -= out[2]
    if total and out[0].min() < 0:
        i = int(np.argmin(out[0]))
        raise ValueError(
            f"slice {i}: page id {int(out[0, i]) // page_size} from page_table is negative; "
            "page ids must be >= 0"
        )
    if total and out[0].max() > INT32_MAX:
        i = int(np.argmax(out[0]))
        raise ValueError(
            f"slice {i}: kv_cache_start {int(out[0, i])} (page id × page_size {page_size} + "
            f"offset) would overflow int32 (max {INT32_MAX}); page ids must be < "
            f"{(INT32_MAX + 1) // page_size}"
        )
    if total and out[1, -1] + out[2, -1] > INT32_MAX:
        raise ValueError(
            f"new_kv_start {int(out[1, -1] + out[2, -1])} (tokens scheduled) would overflow int32 "
            f"(max {INT32_MAX})"
        )
    return out.astype(np.int32)


def padded_num_slices(num_tokens: int, max_num_seqs: int, page_size: int) -> int:
    """Returns the slice count to pad to: ``min(2 * max_num_seqs + num_tokens // P, num_tokens)``.

    Why it bounds S: a request writing R tokens from offset o touches
    ``(o + R - 1) // P - o // P + 1 <= 2 + (R - 1) // P <= 2 + R // P`` pages (one partial page
    at each end plus the full pages between), so a step of at most ``max_num_seqs`` requests
    and ``sum(R) <= num_tokens`` tokens has ``S <= 2 * max_num_seqs + num_tokens // P``; and
    every slice holds at least one token, so ``S <= num_tokens``. With ``num_tokens`` the
    padded (bucketed) count the result depends only on the bucket, as in vLLM.

    Args:
        num_tokens: tokens in the step (usually the padded count), an int >= 0.
        max_num_seqs: the most requests a step may hold, an int >= 0.
        page_size: tokens per page (P), an int >= 1.

    Returns:
        The padded slice count ``S_pad``, an int >= 0.

    Raises:
        ValueError: ``num_tokens`` or ``max_num_seqs`` is negative, or ``page_size < 1``.
    """
    for name, value in (("num_tokens", num_tokens), ("max_num_seqs", max_num_seqs)):
        if value < 0:
            raise ValueError(f"{name}={value} must be >= 0")
    if page_size < 1:
        raise ValueError(f"page_size={page_size} must be >= 1")
    return int(min(2 * max_num_seqs + num_tokens // page_size, num_tokens))


def token_buckets(min_tokens: int = 16, max_tokens: int = 8192, gap: int = 0) -> list[int]:
    """Returns the padded token counts a serving loop compiles for, ascending.

    Powers of two from ``min_tokens`` (a power of two); with ``gap > 0`` the doubling stops
    once it would pass ``gap`` and the counts then grow by ``gap``. The last bucket is
    ``>= max_tokens``. (vLLM's ``_get_token_paddings``.) E.g. (16, 1000, 256) ->
    [16, 32, 64, 128, 256, 512, 768, 1024].

    Args:
        min_tokens: the first bucket, a power of two >= 1.
        max_tokens: the largest step to cover, an int >= 1.
        gap: 0 for powers of two throughout, else the linear step once doubling passes it.

    Returns:
        Ascending ints, the first ``min_tokens`` and the last ``>= max_tokens``.

    Raises:
        ValueError: ``min_tokens`` is not a power of two >= 1, ``max_tokens < 1``, or
            ``gap < 0``.
    """
    if min_tokens < 1 or min_tokens & (min_tokens - 1):
        raise ValueError(f"min_tokens={min_tokens} must be a power of two >= 1")
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    if gap < 0:
        raise ValueError(f"gap={gap} must be >= 0")
    buckets = [min_tokens]
    if gap == 0:
        while buckets[-1] < max_tokens:
            buckets.append(buckets[-1] * 2)
        return buckets
    while buckets[-1] * 2 <= gap and buckets[-1] < max_tokens:
        buckets.append(buckets[-1] * 2)
    while buckets[-1] < max_tokens:
        buckets.append(buckets[-1] + gap)
    return buckets


def padded_token_count(num_tokens: int, buckets: Sequence[int]) -> int:
    """Returns the smallest bucket >= ``num_tokens``.

    Args:
        num_tokens: tokens scheduled this step, an int >= 0.
        buckets: ascending padded token counts (:func:`token_buckets`), non-empty.

    Returns:
        The padded token count, an int from ``buckets``.

    Raises:
        ValueError: ``num_tokens`` is negative or exceeds the largest bucket.
        IndexError: ``buckets`` is empty.
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens={num_tokens} must be >= 0")
    index = int(np.searchsorted(np.asarray(buckets), num_tokens))
    if index == len(buckets):
        raise ValueError(f"num_tokens={num_tokens} exceeds the largest bucket {buckets[-1]}")
    return int(buckets[index])


def pad_slices(
    slices: np.ndarray,
    num_tokens: int,
    *,
    max_num_seqs: int | None = None,
    page_size: int,
    buckets: Sequence[int],
    max_num_reqs: int | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Pads one step's slices to a shape that depends only on the token bucket.

    Args:
        slices: int32[3, S] from :func:`build_update_slices`.
        num_tokens: tokens scheduled this step (the sum of slice lengths), an int >= 0.
        max_num_seqs: the most requests a step may hold (fixes the slice bound), as in
            :func:`kvshard.build_step`.
        page_size: tokens per page.
        buckets: ascending padded token counts (:func:`token_buckets`).
        max_num_reqs: deprecated spelling of ``max_num_seqs``.

    Returns:
        ``(padded, num_slices, padded_tokens)``: int32[3, S_pad] with zero columns after the S
        live ones (length 0: the kernel writes nothing for them), int32[1] holding S, and the
        padded token count (an int), with
        ``S_pad = padded_num_slices(padded_tokens, max_num_seqs, P)``.

    Raises:
        ValueError: ``slices`` is not of shape [3, S]; ``num_tokens`` is negative or exceeds
            the largest bucket; ``max_num_seqs`` is negative or ``page_size < 1``; S exceeds
            ``S_pad`` (more requests than ``max_num_seqs``).
        IndexError: ``buckets`` is empty.
    """
    max_num_seqs = _deprecated.max_num_seqs(max_num_seqs, max_num_reqs)
    if max_num_seqs is None:
        raise TypeError("pad_slices needs max_num_seqs")
    slices = np.asarray(slices)
    if slices.ndim != 2 or slices.shape[0] != 3:
        raise ValueError(f"slices must have shape (3, S), got {slices.shape}")
    padded_tokens = padded_token_count(num_tokens, buckets)
    size = padded_num_slices(padded_tokens, max_num_seqs, page_size)
    live = slices.shape[1]
    if live > size:
        raise ValueError(
            f"slices has {live} columns, more than the bound {size} for "
            f"max_num_seqs={max_num_seqs} (more requests than max_num_seqs?)"
        )
    padded = np.zeros((3, size), np.int32)
    padded[:, :live] = slices
    return padded, np.array([live], np.int32), padded_tokens
