"""The public :class:`PageAllocator`: a facade over the allocator's parts.

Over 400 lines because it carries the documented contract of every public method (argument
ranges, what is raised, what changes); the logic is in the parts it delegates to
(see :mod:`kvshard.allocator`), and the prefix-cache, state and host-tier methods in the
mixins ``_prefix_api``, ``_state_api`` and ``_tier_api``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from kvshard.allocator import _grow, _swap
from kvshard.allocator._common import is_int, readonly
from kvshard.allocator._config import AllocatorConfig
from kvshard.allocator._prefix_api import PrefixMethods
from kvshard.allocator._state import AllocatorParts
from kvshard.allocator._state_api import StateMethods
from kvshard.allocator._tier_api import TierMethods


class PageAllocator(PrefixMethods, StateMethods, TierMethods):
    """Assigns KV-cache pages to requests; one page table row per live request.

    Page ``0`` is the **null page**: it is never free and never owned by a request. Unused
    page-table entries hold 0 and padding writes (slices of length 0, padded tokens) may target
    it, so a stale or padded index can never reach another request's data. Usable pages are
    ``1 .. num_pages - 1``.

    A request holding ``t`` tokens owns exactly ``ceil(t / page_size)`` pages, listed in
    ``page_table[row(req_id), :ceil(t / page_size)]``; the rest of the row is 0.

    Sharing: :meth:`fork` and prefix-cache hits share pages by reference count. A shared page
    that is only partly filled is copied on write: when :meth:`allocate` appends to a request
    whose last page is partial and shared, the request gets a private page and the pair
    ``(src_page, dst_page)`` is queued; :meth:`take_pending_copies` returns and clears the queue.
    The caller must apply those copies on the device (``kvshard.copy_pages``) before this step's
    KV update writes the new tokens.

    Prefix caching (``enable_prefix_caching=True``): :meth:`commit_prefix` registers a request's
    full pages under a chained key of their tokens and a namespace; :meth:`lookup_prefix`
    attaches cached pages to a new request (:meth:`peek_prefix` only counts them). A cached page
    whose last owner is freed stays cached (evictable) and is reused, least recently released
    by a served request first (as vLLM orders its free queue), only once the plain free stack
    is empty. :attr:`num_free_pages` counts free and evictable pages.

    Reuse order: the most recently freed page is handed out first (a stack), and of pages freed
    together (by one :meth:`free`, :meth:`truncate` or window release) the last in the row is
    reused first, as in vLLM. vLLM's free queue instead reuses pages least recently freed first
    across calls; only page ids differ.

    Sliding window (``sliding_window=W``, for a model whose every layer attends the last ``W``
    positions: token ``p`` attends ``(p - W, p]``): each :meth:`allocate` first releases the
    request's pages that lie wholly before token ``num_tokens - W + 1`` (counted before the
    call), as vLLM's sliding-window manager does. Released entries of the page table read
    :data:`NULL_PAGE`, so the table keeps its shape and column ``j`` still holds tokens
    ``[j * page_size, (j + 1) * page_size)``; attention with ``sliding_window=W`` never reads
    them. :func:`kvshard.allocator.sliding_window_pages` bounds the pages a request then holds.
    :meth:`truncate` cannot roll back into released pages; :meth:`fork` shares the released
    layout.

    Layer groups (``layer_types``: one attention type per model layer, ``("full",)``,
    ``("sliding", W)`` or ``("chunked", C)``): the layers form KV-cache groups by
    :func:`kvshard._layer_types.cache_groups` (vLLM's equal-size groups; :attr:`groups`), and
    each request has one page-table row per group, every group drawing from this one pool of
    page ids. A sliding group releases as ``sliding_window`` does; a chunked group of chunk
    ``C`` releases the pages wholly before ``C * (num_tokens // C)``, the start of the chunk
    of the next token (Llama 4's chunked local attention). Every growth sums all groups' page
    needs before it commits anything, so a refused call changes nothing. With one group
    (``layer_types`` None or of one type) shapes are as without groups; with
    :attr:`num_groups` ``G > 1``, :attr:`page_table` is ``int32[G, max_requests,
    max_pages_per_request]`` and :meth:`pages` ``int32[G, n]``. Prefix caching: each group
    caches its own page of each block, and a hit counts only where every group can serve it
    (a full group needs the hit's pages from the first, a window group only those its next
    query reads; the others are not attached and read :data:`NULL_PAGE`).

    Host tier (``num_host_pages=H``): :meth:`swap_out_request` preempts a request by moving
    the pages it alone owns to host pages, :meth:`swap_in_request` brings them back into new
    device pages; with ``host_prefix_pages > 0`` pages evicted from the prefix cache are kept
    on the host and served back by :meth:`lookup_prefix`. Both queue (device page, host page)
    pairs for :meth:`take_pending_swaps` (applied before the copy-on-write copies). Host page
    0 is the host's null page.

    Every constructor argument is kept as an attribute of the same name (a Python int, bool or
    None).

    Not thread-safe. Request ids may be any hashable; use ints, strs or tuples of them where
    :meth:`checksum` must agree across hosts (it hashes ``repr(req_id)``).

    Args:
        num_pages: pages in the pool, null page included; int in ``[2, 2**31 - 1]``.
        page_size: tokens per page; int >= 1.
        max_requests: rows of :attr:`page_table` (live requests at once); int >= 1.
        max_pages_per_request: columns of :attr:`page_table`; int >= 1, with
            ``max_pages_per_request * page_size <= 2**31 - 1`` (a request's positions are
            int32 on the device).
        enable_prefix_caching: allow :meth:`lookup_prefix` and :meth:`commit_prefix`.
        sliding_window: None, or W in ``[1, 2**31 - 1]`` to release pages out of every
            request's window.
        num_host_pages: 0 (no host tier), or the host tier's pages, host null page included
            (host page 0 is never handed out), an int in ``[2, 2**31 - 1]``: preemption by
            swap (:meth:`swap_out_request`) and the host prefix cache draw from it.
        host_prefix_pages: how many host pages may keep pages evicted from the device prefix
            cache (a second-level prefix cache); int in ``[0, num_host_pages - 1]``, > 0 only
            with prefix caching.
        enable_kv_events: queue KV-cache events for :meth:`take_kv_events`.
        layer_types: None, or one attention type per model layer: ``("full",)``,
            ``("sliding", W)`` or ``("chunked", C)`` (tuples or lists). ``sliding_window``
            may be given with it only if every layer is ``("sliding", sliding_window)``;
            layer types of one ``("sliding", W)`` set :attr:`sliding_window` to ``W``.

    Raises:
        ValueError: an argument is not an int (bools rejected), is below its minimum or past
            its bound above, ``num_host_pages`` is 1, ``host_prefix_pages`` is set without
            prefix caching or with a window on some layer, a ``layer_types`` entry is
            malformed or contradicts ``sliding_window``; the message names the argument, its
            value and the bound.
    """

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        *,
        max_requests: int,
        max_pages_per_request: int,
        enable_prefix_caching: bool = False,
        sliding_window: int | None = None,
        num_host_pages: int = 0,
        host_prefix_pages: int = 0,
        enable_kv_events: bool = False,
        layer_types: Sequence[Sequence[Any]] | None = None,
    ) -> None:
        config = AllocatorConfig.validated(
            num_pages,
            page_size,
            max_requests,
            max_pages_per_request,
            enable_prefix_caching,
            sliding_window,
            num_host_pages,
            host_prefix_pages,
            enable_kv_events,
            layer_types,
        )
        self.num_pages = config.num_pages
        self.page_size = config.page_size
        self.max_requests = config.max_requests
        self.max_pages_per_request = config.max_pages_per_request
        self.enable_prefix_caching = config.enable_prefix_caching
        self.sliding_window = config.sliding_window
        self.num_host_pages = config.num_host_pages
        self.host_prefix_pages = config.host_prefix_pages
        self.enable_kv_events = config.enable_kv_events
        self.layer_types = config.layer_types  # validated: a tuple of tuples, or None
        self.groups = config.groups
        """:class:`kvshard._layer_types.CacheGroups` of ``layer_types`` (None without)."""
        self.group_types = config.group_types
        """The attention type of each KV-cache group (one entry without ``layer_types``)."""
        self._parts = AllocatorParts.fresh(config)

    # ------------------------------------------------------------- queries

    @property
    def num_groups(self) -> int:
        """KV-cache groups, each with its own page table over the one pool (1 without
        ``layer_types`` or with one type)."""
        return len(self.group_types)

    @property
    def page_table(self) -> np.ndarray:
        """Read-only view, a row per live request: int32[max_requests, max_pages_per_request]
        with one group, int32[num_groups, max_requests, max_pages_per_request] with several."""
        stacked = self._parts.stacks["page_table"]
        return readonly(stacked[0] if self.num_groups == 1 else stacked)

    @property
    def row_num_tokens(self) -> np.ndarray:
        """int64[max_requests], read-only view: tokens held by the request in each row."""
        return readonly(self._parts.rows.row_tokens)

    @property
    def row_num_pages(self) -> np.ndarray:
        """int32[max_requests], read-only view: page-table columns in use in each row.

        ``ceil(tokens / page_size)``, the same in every group; with a window the leading ones
        may hold :data:`NULL_PAGE` (released; :attr:`row_num_released`).
        """
        return readonly(self._parts.table.row_pages)

    @property
    def row_num_released(self) -> np.ndarray:
        """Read-only view: leading columns each row's window released (null now), int32
        [max_requests] with one group, int32[num_groups, max_requests] with several."""
        stacked = self._parts.stacks["row_released"]
        return readonly(stacked[0] if self.num_groups == 1 else stacked)

    @property
    def num_free_pages(self) -> int:
        """Pages an allocation can get now: the free stack plus evictable cached pages."""
        return self._parts.pool.num_available

    @property
    def num_evictable_pages(self) -> int:
        """Cached pages nobody owns (part of :attr:`num_free_pages`)."""
        return self._parts.index.num_evictable

    @property
    def usage(self) -> float:
        """Fraction of usable pages (the null page excluded) owned by at least one request."""
        return 1.0 - self.num_free_pages / (self.num_pages - 1)

    @property
    def prefix_stats(self) -> dict[str, int]:
        """Prefix-cache counters (a copy).

        ``lookups``: :meth:`lookup_prefix` calls; ``queries``: tokens looked up; ``hits``:
        tokens found cached, in either tier (so ``hits / queries`` is the token hit rate, as in
        vLLM; :attr:`tier_stats` splits device and host hits);
        ``evictions``: cached pages dropped to satisfy an allocation. :meth:`peek_prefix`
        counts nowhere.
        """
        return dict(self._parts.index.stats)

    def __contains__(self, req_id: object) -> bool:
        try:
            return req_id in self._parts.rows.rows
        except TypeError:  # unhashable: certainly not a request id
            return False

    def __len__(self) -> int:
        return len(self._parts.rows.rows)

    def row(self, req_id: Hashable) -> int:
        """Returns the request's row in :attr:`page_table` (stable while it lives).

        Args:
            req_id: a live request id.

        Returns:
            The row index, an int in ``[0, max_requests)``.

        Raises:
            UnknownRequest: ``req_id`` is not live (never allocated, or freed).
            TypeError: ``req_id`` is not hashable.
        """
        return self._parts.rows.row_of(req_id, "row")

    def pages(self, req_id: Hashable) -> np.ndarray:
        """Returns a copy of the request's page ids, in token order.

        Args:
            req_id: a live request id.

        Returns:
            int32[ceil(num_tokens / page_size)] (``int32[num_groups, n]`` with several
            groups, a row per group): page ids in ``[1, num_pages)``, except that pages
            released by a window read :data:`NULL_PAGE` (they lead the row), and so do the
            pages of a swapped-out request that are on the host.

        Raises:
            UnknownRequest: ``req_id`` is not live (never allocated, or freed).
            TypeError: ``req_id`` is not hashable.
        """
        row = self._parts.rows.row_of(req_id, "pages")
        if self.num_groups == 1:
            return self._parts.table.pages(row)
        return np.stack([table.pages(row) for table in self._parts.tables])

    def num_tokens(self, req_id: Hashable) -> int:
        """Returns the number of tokens the request holds (released ones included).

        Args:
            req_id: a live request id.

        Returns:
            The token count, an int >= 0.

        Raises:
            UnknownRequest: ``req_id`` is not live (never allocated, or freed).
            TypeError: ``req_id`` is not hashable.
        """
        rows = self._parts.rows
        return int(rows.row_tokens[rows.row_of(req_id, "num_tokens")])

    # -------------------------------------------------------------- growth

    def allocate(self, req_id: Hashable, num_new_tokens: int) -> np.ndarray:
        """Grows ``req_id`` (created on first use) by ``num_new_tokens`` tokens.

        All or nothing: a call that raises changes nothing. With ``sliding_window=W`` the
        request's pages wholly before token ``num_tokens(req_id) - W + 1`` (counted before
        this call: the first new token attends back to there) are released first, and the
        capacity check counts them as free. A refused call keeps them (vLLM releases them even
        when it then refuses the allocation): they are released by the request's next
        successful ``allocate``, or by :meth:`free`.

        Args:
            req_id: any hashable; a new id takes a free page-table row.
            num_new_tokens: int in ``[0, max_pages_per_request * page_size]``; the request then
                holds at most ``max_pages_per_request * page_size`` tokens.

        Returns:
            int32[k]: the page ids newly written into the request's page-table row, in row
            order (a copy-on-write replacement of the last page first, if one was needed; see
            :meth:`take_pending_copies`).

        Raises:
            OutOfPages: the growth needs more pages than are free or evictable.
            ValueError: ``req_id`` is swapped out; ``num_new_tokens`` is not an int, is
                negative or exceeds
                ``max_pages_per_request * page_size``; the request would exceed
                ``max_pages_per_request``; ``req_id`` is new and all ``max_requests`` rows are
                in use.
            TypeError: ``req_id`` is not hashable.
        """
        if not is_int(num_new_tokens):
            raise ValueError(f"allocate: num_new_tokens={num_new_tokens!r} must be an int")
        # Bounded as a Python int: np.array(2**70) would overflow and 2**63-1 wraps later.
        limit = self.max_pages_per_request * self.page_size
        if num_new_tokens > limit:
            raise ValueError(
                f"allocate: num_new_tokens={int(num_new_tokens)} for req_id={req_id!r} exceeds "
                f"max_pages_per_request*page_size={limit}"
            )
        counts = np.array([num_new_tokens], np.int64)
        _, pages = _grow.grow(self._parts, [req_id], counts, "allocate")
        return pages

    def allocate_batch(
        self, req_ids: Sequence[Hashable] | np.ndarray, num_new_tokens: Sequence[int] | np.ndarray
    ) -> np.ndarray:
        """Grows every request of one step; the same as ``allocate`` on each, in order.

        All or nothing for the whole batch: a call that raises changes nothing. With a sliding
        window, every request's out-of-window pages are released before any grows.

        Args:
            req_ids: B distinct hashable ids (a list, or a numpy array whose items become
                Python scalars); new ones are created.
            num_new_tokens: int[B] in ``[0, max_pages_per_request * page_size]``, tokens each
                request grows by.

        Returns:
            int32[B]: each request's row, so ``page_table[rows]`` is the step's page table (or
            pass ``rows`` to :func:`kvshard.metadata.build_update_slices`).

        Raises:
            OutOfPages: the batch needs more pages in all than are free or evictable.
            ValueError: ``num_new_tokens`` is not an integer array of shape [B] or holds a
                count out of range; B > ``max_requests``; ``req_ids`` holds duplicates; a
                request would exceed ``max_pages_per_request``; the new ids need more rows
                than are free.
            TypeError: an id is not hashable.
        """
        # numpy scalars would become (differently printed) keys
        ids: Sequence[Hashable] = req_ids.tolist() if isinstance(req_ids, np.ndarray) else req_ids
        counts = np.asarray(num_new_tokens)
        if counts.size and not np.issubdtype(counts.dtype, np.integer):
            raise ValueError(f"allocate_batch: num_new_tokens must be integers, got {counts.dtype}")
        # Range checks in the caller's dtype: a uint64 above 2**63 would wrap in astype(int64).
        limit = self.max_pages_per_request * self.page_size
        if counts.ndim == 1 and counts.shape[0] == len(ids):
            hit = np.flatnonzero((counts < 0) | (counts > limit))
            if hit.size:
                i = int(hit[0])
                raise ValueError(
                    f"allocate_batch: num_new_tokens={int(counts[i])} for req_id={ids[i]!r} "
                    f"must be in [0, max_pages_per_request*page_size={limit}]"
                )
        counts = counts.astype(np.int64, copy=False)
        rows, _ = _grow.grow(self._parts, ids, counts, "allocate_batch")
        return rows

    # ----------------------------------------------------- whole requests

    def free(self, req_id: Hashable) -> None:
        """Releases the request's pages and its row; the row is reset to the null page.

        Pages whose last owner this was return to the free stack (the request's last page on
        top: reused first), or, when cached, become evictable (the request's last page first
        in eviction order: later pages of a prefix are the least likely to be shared). Pending
        copies and swap-ins into the freed pages are dropped. A swapped-out request's host
        pages are released too (free again once the step's pairs are taken).

        Freeing the last live request while no page is cached (always so with prefix caching
        off) also restores the fresh allocator's order of the free page and row stacks and its
        eviction clock (O(num_pages + max_requests), only then): the state is then exactly a
        fresh allocator's except the cumulative :attr:`prefix_stats` counters, so page ids
        handed out afterwards and :meth:`checksum` do not depend on past traffic.

        Args:
            req_id: a live request id.

        Raises:
            UnknownRequest: ``req_id`` is not live (never allocated, or already freed: a
                double free). Nothing changes then.
            TypeError: ``req_id`` is not hashable.
        """
        parts = self._parts
        row = parts.rows.row_of(req_id, "free")
        for table in parts.tables:
            table.free(row, undo=bool(parts.rows.row_tentative[row]))
        _swap.release_host(parts, row)
        parts.rows.remove(req_id, row)
        parts.reset_order_if_empty()

    def truncate(self, req_id: Hashable, num_tokens: int) -> None:
        """Rolls ``req_id`` back to its first ``num_tokens`` tokens (rejected draft tokens of
        speculative decoding, or a partial recompute).

        Pages past the new end are released as :meth:`free` releases them: a page other
        requests share only loses this owner, and a cached page nobody else owns becomes
        evictable (it stays in the prefix cache). A partly kept last page is copied on the
        next write if it is shared or cached (see :meth:`take_pending_copies`), so the rolled
        back tokens are overwritten only in a private page. Pending copies into released pages
        are dropped. Prefix-cache progress is reset when the cut reaches committed pages (the
        next :meth:`commit_prefix` hashes from the first page again). All or nothing: a call
        that raises changes nothing.

        Args:
            req_id: a live request id.
            num_tokens: int in ``[0, num_tokens(req_id)]``; with a sliding window ``W`` also
                such that ``num_tokens - W + 1`` does not reach into released pages.

        Raises:
            UnknownRequest: ``req_id`` is not live.
            TypeError: ``req_id`` is not hashable.
            ValueError: ``num_tokens`` is not an int or out of range, or the window it needs
                was released, or the request is swapped out.
        """
        where = "truncate"
        parts = self._parts
        row = parts.rows.row_of(req_id, where)
        held = int(parts.rows.row_tokens[row])
        if not is_int(num_tokens):
            raise ValueError(f"{where}: num_tokens={num_tokens!r} must be an int")
        if not 0 <= num_tokens <= held:
            raise ValueError(
                f"{where}: num_tokens={int(num_tokens)} for req_id={req_id!r} must be in "
                f"[0, {held}] (the tokens it holds)"
            )
        tokens = int(num_tokens)
        if parts.tier.row_swapped[row]:
            raise ValueError(f"{where}: req_id={req_id!r} is swapped out; swap it in first")
        for g, table in enumerate(parts.tables):
            released = int(table.row_released[row]) * self.page_size
            start = int(table.window_start(np.array(tokens, np.int64)))
            if released > start:
                group = f"group {g}, " if self.num_groups > 1 else ""
                raise ValueError(
                    f"{where}: num_tokens={tokens} for req_id={req_id!r} needs tokens from "
                    f"{start} on ({group}{table.layer_type}), but its pages before token "
                    f"{released} were released"
                )

        # ---- commit
        parts.rows.row_tentative[row] = False  # a truncated request counts as served
        for table in parts.tables:
            table.truncate(row, tokens)
        parts.rows.row_tokens[row] = tokens
        if parts.rows.row_committed[row] > tokens // self.page_size:
            # The last kept committed page's key may not be stored (a twin page may hold it).
            parts.rows.forget_commits(row)

    def fork(self, src_req: Hashable, dst_req: Hashable) -> None:
        """Creates ``dst_req`` sharing all of ``src_req``'s pages (reference counted).

        Both may keep appending: a write into the shared partial last page is copied on write
        (see :meth:`take_pending_copies`); full pages stay shared. ``dst_req`` also inherits
        ``src_req``'s token count and prefix-cache progress (committed pages, namespace).

        Fork a request whose tokens are computed (after the step that wrote them): tokens
        ``src_req`` was grown by in the current step are written by that step's update into
        ``src_req``'s pages only, so if ``dst_req`` also writes in that step, its copy of the
        shared partial page (taken before the update) lacks them.

        Args:
            src_req: a live request id.
            dst_req: a hashable id that is not live.

        Raises:
            UnknownRequest: ``src_req`` is not live.
            TypeError: ``src_req`` is not hashable.
            ValueError: ``dst_req`` is not hashable or already live, or all ``max_requests``
                rows are in use, or ``src_req`` is swapped out.
        """
        parts = self._parts
        src = parts.rows.row_of(src_req, "fork(src_req)")
        if parts.tier.row_swapped[src]:
            raise ValueError(f"fork: src_req={src_req!r} is swapped out; swap it in first")
        try:
            live = dst_req in parts.rows.rows
        except TypeError:
            raise ValueError(f"fork: dst_req={dst_req!r} is not hashable") from None
        if live:
            raise ValueError(f"fork: dst_req={dst_req!r} is already a live request")
        dst = parts.rows.reserve(dst_req, "fork")

        # ---- commit
        parts.rows.add([dst_req], [dst])
        parts.rows.copy(src, dst)
        for table in parts.tables:
            table.fork(src, dst)

    def take_pending_copies(self) -> np.ndarray:
        """Returns the queued copy-on-write copies and clears the queue.

        Call once per step after all allocations and before that step's KV update, and copy
        every ``src_page`` to its ``dst_page`` on the device with all reads before all writes,
        as ``kvshard.copy_pages`` does: sources are resolved to pages holding data before the
        step (a request forked after it grew in the same step copies from the page its parent
        copied from, not from the parent's new page), so the pairs are correct in that one
        order (applying them one by one in order is not guaranteed to be). A pair is dropped
        if its destination is freed before it is taken.

        Returns:
            int32[K, 2]: rows (src_page, dst_page), page ids in ``[1, num_pages)``, in the order
            the copies were queued; int32[0, 2] when none are pending. Never raises.
        """
        pairs = self._parts.pool.pending_copies()
        self._parts.pool.pending = []
        return pairs
