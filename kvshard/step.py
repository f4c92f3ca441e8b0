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
    out = kvshard.attention(cache, layer, q, step, sm_scale=D**-0.5)

Every array has a shape fixed by ``(num_tokens_padded, max_num_seqs)`` and the allocator's
page-table width, both bucketed, so a serving loop compiles a bounded number of times.

The builder is numpy only; this module imports JAX solely to register the pytree.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import numpy as np

from kvshard._geometry.int32 import INT32_MAX
from kvshard.metadata import build_update_slices, padded_num_slices

if TYPE_CHECKING:
    from kvshard._geometry.layout import CacheSpec
    from kvshard.allocator import PageAllocator

__all__ = ["StepGeometry", "StepMetadata", "build_step", "check_step", "next_bucket", "stack_steps"]

# Smallest padded sizes: below these, padding costs nothing measurable and saves compilations.
MIN_TOKENS_PADDED = 16
MIN_SEQS_PADDED = 8


class StepGeometry(NamedTuple):
    """The static shape of a step and the pool it addresses: what :func:`check_step` checks.

    Attributes:
      page_size: tokens per page of the pool the step was built for.
      num_pages: pages per pool (null page included): the allocator's ``num_pages``.
      pages_per_seq: columns of ``page_indices`` (the allocator's ``max_pages_per_request``).
      num_tokens_padded: T, the token axis of k, v and q.
      max_num_seqs: rows of ``page_indices``, ``kv_lens``; ``cu_q_lens`` has one more.
      num_groups: KV-cache groups of the pool (:class:`kvshard._geometry.layer_types.CacheGroups`):
        1 for a pool whose layers share one page table; above 1, ``page_indices`` and
        ``slices`` gain a leading ``[num_groups]`` axis (after any ``[dp]`` axis), one page
        table per group.
    """

    page_size: int
    num_pages: int
    pages_per_seq: int
    num_tokens_padded: int
    max_num_seqs: int
    num_groups: int = 1


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "slices",
        "num_slices",
        "page_indices",
        "kv_lens",
        "cu_q_lens",
        "num_seqs",
        "positions",
    ],
    meta_fields=["geometry"],
)
@dataclasses.dataclass(frozen=True)
class StepMetadata:
    """Everything one step needs on device: update slices and paged-attention metadata.

    A pytree of int32 arrays (NumPy from :func:`build_step`; put it on device once, pass it
    through ``jit``) plus its :class:`StepGeometry` as static aux data, so a step built for
    one pool cannot silently be used with a cache of another geometry: :func:`kvshard.update`
    and :func:`kvshard.attention` check it eagerly and, under ``jit``, at trace time. With a
    data-parallel page axis every array gains a leading ``[dp]`` axis (:func:`stack_steps`),
    one step per page pool; the geometry is that of each pool.

    The step's ``T = num_tokens_padded`` tokens are packed request by request in batch order
    from token 0; tokens past ``cu_q_lens[num_seqs]`` are padding (written nowhere, attended
    to by nothing, their attention output is zero).

    Padding rule: entries past ``num_seqs`` (rows of ``page_indices``/``kv_lens``, entries
    of ``cu_q_lens`` past index ``num_seqs``) and columns past ``num_slices`` are never read.
    :func:`build_step` zeroes them and repeats the token total in ``cu_q_lens``; JAX's own
    convention (zeros past ``num_seqs``) is read the same way.

    Attributes:
      slices: int32[3, S] update slices, rows (kv_cache_start, new_kv_start, slice_len);
        columns past ``num_slices`` are zero (padding). ``S = padded_num_slices(T,
        max_num_seqs, page_size)``. With ``geometry.num_groups = G > 1``: int32[G, 3, S],
        one per KV-cache group, with the same slice boundaries in every group (only
        ``kv_cache_start`` differs: each group's own pages).
      num_slices: int32[1] live columns of ``slices``.
      page_indices: int32[max_num_seqs, pages_per_seq] each request's page-table row (its
        pages in order; unused entries are the null page 0). ``pages_per_seq`` is the
        allocator's ``max_pages_per_request``. With ``G > 1`` groups: int32[G, max_num_seqs,
        pages_per_seq], each group's page table (a window group's released pages read 0).
      kv_lens: int32[max_num_seqs] tokens in the cache per request after this step (the
        step's own tokens included); 0 for padding rows.
      cu_q_lens: int32[max_num_seqs + 1] exclusive cumulative sum of the step's tokens per
        request: request ``i``'s tokens are ``[cu_q_lens[i], cu_q_lens[i + 1])``; padding
        rows repeat the total.
      num_seqs: int32[1] live requests (rows of ``page_indices``/``kv_lens``).
      positions: int32[T] position of each token in its request's sequence (for RoPE);
        0 for padding tokens.
      geometry: static :class:`StepGeometry`; None for metadata built by hand (then only the
        array shapes are checked).
    """

    slices: Any
    num_slices: Any
    page_indices: Any
    kv_lens: Any
    cu_q_lens: Any
    num_seqs: Any
    positions: Any
    geometry: StepGeometry | None = None

    @property
    def num_tokens_padded(self) -> int:
        """T: the step's padded token count (the token axis of k, v and q)."""
        return int(np.shape(self.positions)[-1])

    @property
    def max_num_seqs(self) -> int:
        """Rows of ``page_indices``: the padded request count."""
        return int(np.shape(self.kv_lens)[-1])


def check_step(
    step: Any, spec: CacheSpec, *, num_tokens: int, token_arg: str, lead: tuple[int, ...] = ()
) -> StepMetadata:
    """The step contract: raises unless ``step`` fits a cache and the step's tokens.

    Checks that ``step`` is a :class:`StepMetadata`, that its geometry (when it has one) is the
    cache's (``spec.page_size``, ``spec.num_pages``, ``spec.num_groups``) and matches its own
    arrays, and that its
    token axis is ``num_tokens``, the token axis of the caller's ``token_arg`` (q or k).
    ``lead`` is ``(dp,)`` with a page axis. Shapes of the fields an operation reads are
    checked by the operation. Static data only: runs eagerly and at trace time alike.

    Raises:
      TypeError: ``step`` is not a StepMetadata.
      ValueError: one pool's step for a cache with a page axis (the message says to use
        :func:`stack_steps`) or a stacked one for a cache without; a geometry field differs
        from the cache's or from the arrays, or the token axis differs; the message names the
        field, its value and what the cache expects.
    """
    page_size, num_pages = spec.page_size, spec.num_pages
    if not isinstance(step, StepMetadata):
        raise TypeError(
            f"step must be a kvshard.StepMetadata (from build_step), got {type(step).__name__}"
        )
    rank = np.ndim(step.positions)
    if rank != len(lead) + 1:
        if lead:
            raise ValueError(
                f"the cache has a page axis of {lead[0]} pools but step.positions has shape "
                f"{list(np.shape(step.positions))}, one pool's step: pass "
                "kvshard.stack_steps([one step per pool]) (a [dp, ...] step)"
            )
        raise ValueError(
            f"the cache has no page axis but step.positions has shape "
            f"{list(np.shape(step.positions))}, a stacked [dp, ...] step: pass one pool's step "
            "(from build_step), not stack_steps(...)"
        )
    geometry = step.geometry
    if geometry is not None:
        for field, expected in (("page_size", page_size), ("num_pages", num_pages)):
            value = getattr(geometry, field)
            if value != expected:
                raise ValueError(
                    f"step.geometry.{field}={value} but the cache has {field}={expected}: "
                    "build the step from the allocator of this cache's pool"
                )
        if geometry.num_groups != spec.num_groups:
            raise ValueError(
                f"step.geometry.num_groups={geometry.num_groups} but the cache has "
                f"num_groups={spec.num_groups} (the layer groups of its layer_types): build "
                "the step from an allocator with the cache's layer_types"
            )
        # Above one group, page_indices carries a [num_groups] axis after any [dp] axis.
        tables = np.shape(step.page_indices)[len(lead) :]
        shapes = {
            "num_tokens_padded": np.shape(step.positions)[len(lead) :][:1],
            "max_num_seqs": np.shape(step.kv_lens)[len(lead) :][:1],
            "pages_per_seq": tables[2:3] if spec.num_groups > 1 else tables[1:2],
        }
        if spec.num_groups > 1:
            shapes["num_groups"] = tables[:1]
        for field, shape in shapes.items():
            if tuple(shape) != (getattr(geometry, field),):
                raise ValueError(
                    f"step.geometry.{field}={getattr(geometry, field)} does not match its "
                    f"arrays (size {list(shape)}): a field was replaced by one of another shape"
                )
    steps_tokens = np.shape(step.positions)[-1] if np.ndim(step.positions) else None
    if steps_tokens != num_tokens:
        raise ValueError(
            f"{token_arg} has {num_tokens} tokens but the step was built for "
            f"num_tokens_padded={steps_tokens}: pad {token_arg} to the step's token axis"
        )
    return step


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

    An allocator with ``num_groups = G > 1`` KV-cache groups (``layer_types``) gives
    ``page_indices`` int32[G, max_num_seqs, pages_per_seq] and ``slices`` int32[G, 3, S]
    (each group's pages; the same slice boundaries), and ``geometry.num_groups = G``.

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
    if len(set(req_ids)) != batch:
        seen: set[Hashable] = set()
        dup = next(r for r in req_ids if r in seen or seen.add(r))  # type: ignore[func-returns-value]
        raise ValueError(f"req_ids holds {dup!r} twice: each request appears once per step")
    for name, value in (("num_tokens_padded", num_tokens_padded), ("max_num_seqs", max_num_seqs)):
        if value is not None and (isinstance(value, bool) or int(value) < 1):
            raise ValueError(f"{name}={value!r} must be None or an int >= 1")
    page_size = allocator.page_size
    groups = int(allocator.num_groups)
    stacked = allocator.page_table
    tables = [stacked] if groups == 1 else list(stacked)  # int32[R, M] per group
    table = tables[0]
    if table.shape[1] * page_size > INT32_MAX:
        raise ValueError(
            f"the allocator's max_pages_per_request × page_size = {table.shape[1] * page_size} "
            f"exceeds int32 ({INT32_MAX}): attention's token positions would wrap"
        )
    # The requests' own rows; given `rows` must be exactly these (a wrong row would write one
    # request's tokens into another's pages).
    row_of = np.fromiter((allocator.row(r) for r in req_ids), np.int64, count=batch)
    if rows is not None:
        given = _int_array(rows, "rows")
        if given.shape != (batch,):
            raise ValueError(f"rows has {given.shape[0]} entries for {batch} req_ids")
        wrong = np.flatnonzero(given != row_of)
        if wrong.size:
            i = int(wrong[0])
            raise ValueError(
                f"rows[{i}]={int(given[i])} is not the row of request {req_ids[i]!r} "
                f"(row {int(row_of[i])}): pass what allocate_batch returned, in req_ids order"
            )
    kv_lens = np.asarray(allocator.row_num_tokens)[row_of].astype(np.int64)
    if batch and kv_lens.max() > INT32_MAX:
        i = int(np.argmax(kv_lens))
        raise ValueError(
            f"request {req_ids[i]!r} holds {int(kv_lens[i])} tokens, past int32 ({INT32_MAX}): "
            "its kv_len and positions cannot be represented"
        )
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

    width = padded_num_slices(tokens, seqs, page_size)
    slices = np.zeros((groups, 3, width), np.int32)
    page_indices = np.zeros((groups, seqs, table.shape[1]), np.int32)
    for g, group_table in enumerate(tables):
        live = build_update_slices(computed, scheduled, group_table, page_size, rows=row_of)
        slices[g, :, : live.shape[1]] = live
        # Into the output rows directly: no fancy-index temporary (mode="clip" is unbuffered;
        # the rows are in range, looked up above).
        np.take(group_table, row_of, axis=0, out=page_indices[g, :batch], mode="clip")
    if groups == 1:
        slices, page_indices = slices[0], page_indices[0]
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
        geometry=StepGeometry(
            page_size=int(page_size),
            num_pages=int(allocator.num_pages),
            pages_per_seq=int(table.shape[1]),
            num_tokens_padded=tokens,
            max_num_seqs=seqs,
            num_groups=groups,
        ),
    )


def stack_steps(steps: Sequence[StepMetadata]) -> StepMetadata:
    """Stacks one step per page pool into the ``[dp, ...]`` form a page axis takes.

    Raises:
      TypeError: an element is not a StepMetadata.
      ValueError: no steps, or they differ in geometry or in a field's shape (the message
        names the field and both values: build every pool's step with the same
        ``num_tokens_padded`` and ``max_num_seqs``, from allocators of the same geometry).
    """
    if not steps:
        raise ValueError("stack_steps needs at least one StepMetadata")
    for i, step in enumerate(steps):
        if not isinstance(step, StepMetadata):
            raise TypeError(f"steps[{i}] must be a StepMetadata, got {type(step).__name__}")
    first = steps[0]
    for i, step in enumerate(steps[1:], start=1):
        if (step.geometry is None) != (first.geometry is None):
            raise ValueError(f"steps[{i}] and steps[0] differ: one has a geometry, one not")
        if first.geometry is not None and step.geometry != first.geometry:
            field = next(
                f
                for f in StepGeometry._fields
                if getattr(step.geometry, f) != getattr(first.geometry, f)
            )
            raise ValueError(
                f"steps[{i}].geometry.{field}={getattr(step.geometry, field)} but "
                f"steps[0].geometry.{field}={getattr(first.geometry, field)}: build every "
                "pool's step with the same num_tokens_padded and max_num_seqs, from allocators "
                "of the same page_size, num_pages and max_pages_per_request"
            )
        for field in (f.name for f in dataclasses.fields(StepMetadata) if f.name != "geometry"):
            a, b = np.shape(getattr(first, field)), np.shape(getattr(step, field))
            if a != b:
                raise ValueError(
                    f"steps[{i}].{field} has shape {list(b)} but steps[0].{field} has "
                    f"{list(a)}: build every pool's step with the same num_tokens_padded and "
                    "max_num_seqs, from allocators of the same max_pages_per_request"
                )
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *steps)
