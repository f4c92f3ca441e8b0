"""The public :class:`PageAllocator`: one class over the allocator's parts.

It owns its parts (one :class:`~kvshard.allocator._state.AllocatorParts`: page pool, one page
table per KV-cache group, request rows, prefix index, host tier, event queue), as vLLM's
``KVCacheManager`` owns its ``BlockPool`` and ``KVCacheCoordinator``, and every public method
validates its arguments, then delegates to the parts or to a transaction over them
(``_grow``, ``_prefix``, ``_swap``). It holds the allocator's whole public contract in one
place (each method's argument ranges, what it raises, what it changes); the logic is in the
parts (see :mod:`kvshard.allocator`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from kvshard.allocator import _grow, _preempt, _prefix
from kvshard.allocator._common import is_int, readonly
from kvshard.allocator._config import AllocatorConfig
from kvshard.allocator._events import KVEvent
from kvshard.allocator._state import AllocatorParts
from kvshard.allocator._vllm_options import eagle_groups, hybrid_disabled


class PageAllocator:
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
    :func:`kvshard._geometry.layer_types.cache_groups` (vLLM's equal-size groups; :attr:`groups`),
    and each request has one page-table row per group, every group drawing from this one pool of
    page ids. A sliding group releases as ``sliding_window`` does; a chunked group of chunk ``C``
    releases the pages wholly before ``C * (num_tokens // C)``, the start of the chunk of the next
    token (Llama 4's chunked local attention). Every growth sums all groups' page needs before it
    commits anything, so a refused call changes nothing. With one group (``layer_types`` None or of
    one type) shapes are as without groups; with :attr:`num_groups` ``G > 1``, :attr:`page_table` is
    ``int32[G, max_requests, max_pages_per_request]`` and :meth:`pages` ``int32[G, n]``. Prefix
    caching: each group caches its own page of each block, and a hit counts only where every group
    can serve it (a full group needs the hit's pages from the first, a window group only those its
    next query reads; the others are not attached and read :data:`NULL_PAGE`).

    State groups (``layer_types`` with ``("mamba",)`` or ``("linear_attention",)`` layers,
    grouped after the attention groups, :attr:`state_groups`): a request holding tokens owns
    exactly one page in each state group, column 0 of its row there (:meth:`state_pages`),
    which the model reads and writes in place; every page of the pool has the same bytes
    (the planner sizes ``page_size`` so, vLLM's unification rule). Every growth writes the
    state, so a state page shared after :meth:`fork` or cached by :meth:`commit_prefix` is
    copied on the next growth (a pair for :meth:`take_pending_copies`: the device copies the
    state before the update). :meth:`commit_prefix` caches a request's state page only when
    it holds exactly the committed whole pages' tokens (the state at a page boundary), and a
    hit counts only where every state group has the state cached at the hit's last page
    (vLLM's ``MambaManager``); the hit's state page is attached, and copied on first write.
    :meth:`truncate` to fewer tokens is refused (a state cannot be rolled back) except to 0.
    Swap-out moves a state page like any page the request alone owns.

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
        group_page_sizes: None, or one page size in tokens per KV-cache group (in
            :attr:`group_types` order), each a multiple of ``page_size`` (a state group's
            equal to it): vLLM's per-group block sizes. ``page_size`` is then the hash block:
            prefix keys chain per ``page_size`` tokens, a group's page is keyed by the key of
            its last hash block, ``max_pages_per_request`` counts hash blocks, and a prefix
            hit is a multiple of every group's page size (vLLM's alignment to the lcm). A
            group of ``k * page_size`` tokens per page holds ``ceil(tokens / (k *
            page_size))`` columns. Allocator-side only: ``build_step`` and the cache take one
            page size.
        kv_events_per_page: emit one ``PagesRemoved`` per removed page, as vLLM emits one
            ``BlockRemoved`` per block, instead of one per eviction and group (the default,
            fewer events; the same hashes in the same order either way). Not part of
            :meth:`state_dict` (events are not state).
        layer_types: None, or one attention type per model layer: ``("full",)``,
            ``("sliding", W)`` or ``("chunked", C)`` (tuples or lists). ``sliding_window``
            may be given with it only if every layer is ``("sliding", sliding_window)``;
            layer types of one ``("sliding", W)`` set :attr:`sliding_window` to ``W``.
            State layers, ``("mamba",)`` (Mamba-2) and ``("linear_attention",)`` (gated
            DeltaNet), form state groups (:attr:`state_groups`; at least one attention
            layer is needed): see "State groups" above.
        eagle_layers: None, or the indices (into ``layer_types``) of an EAGLE / MTP
            drafter's attention layers: vLLM's ``is_eagle_group``. An ``eagle=True``
            :meth:`lookup_prefix` then drops the last matched block only in the groups
            holding those layers and in every other group of their layer type (vLLM looks
            up groups of one spec together); the other groups match as without EAGLE. None
            (the default): every group drops it (vLLM's fallback when no group is flagged).
            Not part of :meth:`state_dict` (a lookup rule, not state).
        disable_hybrid: vLLM's ``disable_hybrid_kv_cache_manager``: full attention mixed
            with sliding or chunked layers is treated as full attention on every layer (one
            group, no page released; :attr:`layer_types` then reads all ``("full",)``); one
            layer type is left as it is; any other mix (state layers with attention, windows
            without full attention) is refused, as vLLM refuses it. Allocator-side only: the
            model still attends over its windows.

    Raises:
        ValueError: an argument is not an int (bools rejected), is below its minimum or past
            its bound above, ``num_host_pages`` is 1, ``host_prefix_pages`` is set without
            prefix caching or with a window on some layer, a ``layer_types`` entry is
            malformed or contradicts ``sliding_window``, an ``eagle_layers`` entry is not an
            attention layer of ``layer_types``, ``disable_hybrid`` meets layer types it cannot
            make one type; the message names the argument, its value and the bound.
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
        kv_events_per_page: bool = False,
        group_page_sizes: Sequence[int] | None = None,
        eagle_layers: Sequence[int] | None = None,
        disable_hybrid: bool = False,
    ) -> None:
        layer_types = hybrid_disabled(layer_types, disable_hybrid)
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
            group_page_sizes,
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
        self.group_page_sizes = config.group_page_sizes  # None when every group has page_size
        self.page_sizes = config.page_sizes
        """Tokens per page of each KV-cache group (``page_size`` each without
        ``group_page_sizes``)."""
        self.groups = config.groups
        """:class:`kvshard._geometry.layer_types.CacheGroups` of ``layer_types`` (None without)."""
        self.group_types = config.group_types
        """The attention type of each KV-cache group (one entry without ``layer_types``)."""
        self.eagle_groups = eagle_groups(eagle_layers, config.layer_types)
        """The groups an ``eagle=True`` lookup drops a block in (None: every group)."""
        self.eagle_layers = None if eagle_layers is None else tuple(int(i) for i in eagle_layers)
        self.disable_hybrid = disable_hybrid
        self._parts = AllocatorParts.fresh(config)
        self.kv_events_per_page = bool(kv_events_per_page)
        self._parts.events.per_page = self.kv_events_per_page

    # ------------------------------------------------------------- queries

    @property
    def state_groups(self) -> tuple[int, ...]:
        """Indices (into :attr:`group_types`) of the state groups: ``("mamba",)`` or
        ``("linear_attention",)`` layers, one state page per request each; they follow the
        attention groups. Empty without state layers."""
        return tuple(g for g, t in enumerate(self._parts.tables) if t.is_state)

    def state_pages(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Returns each row's state page in each state group: what a state layer reads and
        writes in place this step.

        The page of row ``r`` in state group ``state_groups[s]`` is
        ``page_table[state_groups[s], r, 0]``; this gathers them for a step's rows (the
        ``rows`` :meth:`allocate_batch` returns). Call it after the step's allocations (a
        growth may have moved the state to a private copy: apply
        :meth:`take_pending_copies` before the update). A page handed out fresh holds junk:
        the model treats a request with no computed tokens before the step as zero state.

        Args:
            rows: int[B] page-table rows in ``[0, max_requests)``.

        Returns:
            int32[len(state_groups), B]: page ids; :data:`NULL_PAGE` for a row that holds no
            tokens (a free row, or one only looked up with no hit) or whose state is on the
            host (swapped out).

        Raises:
            ValueError: ``rows`` is not a 1-D integer array of rows in range; nothing changes.
        """
        array = np.asarray(rows)
        if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
            raise ValueError(
                f"state_pages: rows must be a 1-D integer array, got shape {array.shape} "
                f"dtype {array.dtype}"
            )
        bad = np.flatnonzero((array < 0) | (array >= self.max_requests))
        if bad.size:
            raise ValueError(
                f"state_pages: rows[{int(bad[0])}]={int(array[bad[0]])} must be in "
                f"[0, max_requests={self.max_requests})"
            )
        array = array.astype(np.intp, copy=False)  # an empty list arrives as float64
        tables = self._parts.tables
        out = np.zeros((len(self.state_groups), array.size), np.int32)
        for s, g in enumerate(self.state_groups):
            out[s] = tables[g].page_table[array, 0]
        return out

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

        ``ceil(tokens / page_size)`` (group 0's, an attention group: the same in every
        attention group of one page size; a state group holds one column, a group of
        ``group_page_sizes[g]`` tokens per page ``ceil(tokens / group_page_sizes[g])``); with
        a window the leading ones may hold :data:`NULL_PAGE` (released;
        :attr:`row_num_released`).
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
        """Prefix-cache counters (a copy), cumulative: :meth:`free`,
        :meth:`reset_prefix_cache` and an undone lookup never lower them.

        ``lookups``: :meth:`lookup_prefix` calls that returned (a refused call counts nowhere);
        ``queries``: the tokens those calls were given (``len(token_ids)`` each, the last token
        included though it is never a hit); ``hits``: the tokens they returned, found in either
        tier (:attr:`tier_stats` splits device and host hits), counted when the lookup attaches
        them: a lookup undone by :meth:`free` before any :meth:`allocate` served the request
        (e.g. after :class:`OutOfPages`) keeps its count, so a request looked up again after
        that counts its hits twice. ``hits / queries`` is the token hit rate of lookups, as in
        vLLM, not the share of tokens served from the cache. ``evictions``: cached device pages
        dropped from the prefix index to satisfy an allocation (kept in the host prefix cache
        or not); :meth:`reset_prefix_cache` counts none. :meth:`peek_prefix` counts nowhere.
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
            groups, a row per group, ``n`` the most columns any group holds, shorter rows
            padded with :data:`NULL_PAGE`; a state group's row holds its state page in
            column 0): page ids in ``[1, num_pages)``, except that pages released by a
            window read :data:`NULL_PAGE` (they lead the row), and so do the pages of a
            swapped-out request that are on the host.

        Raises:
            UnknownRequest: ``req_id`` is not live (never allocated, or freed).
            TypeError: ``req_id`` is not hashable.
        """
        row = self._parts.rows.row_of(req_id, "pages")
        if self.num_groups == 1:
            return self._parts.table.pages(row)
        # Groups of different page sizes hold different column counts: pad with the null page.
        held = max(int(table.row_pages[row]) for table in self._parts.tables)
        return np.stack([table.page_table[row, :held].copy() for table in self._parts.tables])

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
        _preempt.release_host(parts, row)
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
        if 0 < tokens < held and self.state_groups:
            raise ValueError(
                f"{where}: num_tokens={tokens} for req_id={req_id!r} must be 0 or {held} (the "
                f"tokens it holds): state groups {self.state_groups} keep one state per request, "
                "overwritten in place, which cannot be rolled back to an earlier token"
            )
        for g, table in enumerate(parts.tables):
            released = int(table.row_released[row]) * table.page_size
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

    # -------------------------------------------------------- prefix cache

    def _require_prefix_caching(self, where: str) -> None:
        if not self.enable_prefix_caching:
            raise ValueError(f"{where}: prefix caching is disabled (enable_prefix_caching=False)")

    def _lora_query(
        self,
        where: str,
        token_ids: Sequence[int] | np.ndarray,
        namespace: str | bytes | None,
        extra_keys: Sequence[Any] | None,
        lora_id: int | None,
    ) -> tuple[_prefix.PrefixQuery, int | None]:
        """The checks and query of :meth:`commit_prefix` and :meth:`announce_prefix`."""
        self._require_prefix_caching(where)
        if lora_id is not None and not is_int(lora_id):
            raise ValueError(f"{where}: lora_id={lora_id!r} must be None or an int")
        query = _prefix.PrefixQuery(token_ids, namespace, extra_keys)
        return query, None if lora_id is None else int(lora_id)

    def peek_prefix(
        self,
        token_ids: Sequence[int] | np.ndarray,
        namespace: str | bytes | None = None,
        *,
        extra_keys: Sequence[Any] | None = None,
        eagle: bool = False,
    ) -> int:
        """Returns what :meth:`lookup_prefix` would return now, attaching and counting nothing.

        The eviction order, :attr:`prefix_stats` and every request stay as they are, so a
        scheduler can size a request before admitting it (vLLM's ``get_computed_blocks``).

        Args:
            token_ids: int[T], the prompt (any integer dtype; compared as int64).
            namespace: str, bytes or None, as for :meth:`lookup_prefix`.
            extra_keys: per-page extra keys, as for :meth:`lookup_prefix`.
            eagle: as for :meth:`lookup_prefix`.

        Returns:
            The cached prefix in tokens: a multiple of ``page_size``, at most ``T - 1``.

        Raises:
            ValueError: prefix caching is disabled; ``token_ids`` is not a 1-D integer array.
            TypeError: ``namespace`` is not str, bytes or None.
        """
        self._require_prefix_caching("peek_prefix")
        query = _prefix.PrefixQuery(
            token_ids, namespace, extra_keys, bool(eagle), self.eagle_groups
        )
        return _prefix.peek(self._parts, query)

    def lookup_prefix(
        self,
        req_id: Hashable,
        token_ids: Sequence[int] | np.ndarray,
        namespace: str | bytes | None = None,
        *,
        extra_keys: Sequence[Any] | None = None,
        eagle: bool = False,
    ) -> int:
        """Attaches the cached pages of the longest cached prefix of ``token_ids`` to a request.

        Only pages committed under the same ``namespace`` match. Counts toward
        :attr:`prefix_stats`. All or nothing: a call that raises changes nothing.

        The hit pages are attached at once (one more owner each), so nothing between this
        call and the request's :meth:`allocate` can evict them. The lookup is undone if the
        request is freed before any :meth:`allocate` (or :meth:`fork`, :meth:`truncate`)
        serves it, e.g. after :class:`OutOfPages`: its hits then return to the eviction order
        where they were, as in vLLM, which touches hits only once their allocation succeeds
        (O(num_pages) for that free). :meth:`peek_prefix` sizes a request without attaching.

        Args:
            req_id: a new id (it is created) or a live request holding no tokens.
            token_ids: int[T], the prompt (any integer dtype; compared as int64).
            namespace: str, bytes or None; None, ``""`` and ``b""`` are distinct namespaces.
            extra_keys: None, or a sequence whose item ``i`` is page ``i``'s extra key (pages
                past its end have none): None, int, str, bytes or a tuple of them, e.g. the
                hash of a multimodal input whose placeholders the page holds, or a LoRA id.
                Folded into the page's key and so into every later page's: a page matches
                only under the same extra keys as when it was committed.
            eagle: vLLM's EAGLE rule: drop the last page of the hit (an EAGLE drafter must
                recompute that page's hidden states), so a hit of ``h`` pages returns
                ``h - 1``. With several groups, an attention group serves ``h`` pages only if
                it also holds block ``h`` (vLLM matches it and drops it), a state group as
                without EAGLE; the longest ``h`` every group serves.

        With a host tier (``host_prefix_pages > 0``), a page found only in the host prefix
        cache is attached too: it gets a new device page (taking it may evict), its
        (device page, host page) pair is queued for :meth:`take_pending_swaps`, and its
        tokens count as hits (:attr:`tier_stats` splits device and host hits). The match
        stops at the first host hit for which no device page is free or evictable, and
        takes no host hit while a pending copy reads a page nobody owns (a swap-in could
        overwrite it first).

        Returns:
            The number of tokens whose KV is already in the attached pages: a multiple of
            ``page_size``, and at most ``T - 1`` so the last prompt token is always computed
            (its logits are needed).

        Raises:
            ValueError: prefix caching is disabled; ``token_ids`` is not a 1-D integer array;
                ``req_id`` already holds tokens or is swapped out; ``req_id`` is new and all
                ``max_requests`` rows are in use.
            TypeError: ``namespace`` is not str, bytes or None, or ``req_id`` is not hashable.
        """
        self._require_prefix_caching("lookup_prefix")
        query = _prefix.PrefixQuery(
            token_ids, namespace, extra_keys, bool(eagle), self.eagle_groups
        )
        return _prefix.lookup(self._parts, req_id, query)

    def commit_prefix(
        self,
        req_id: Hashable,
        token_ids: Sequence[int] | np.ndarray,
        namespace: str | bytes | None = None,
        *,
        extra_keys: Sequence[Any] | None = None,
        lora_id: int | None = None,
    ) -> int:
        """Registers the request's full pages in the prefix cache; returns how many were new.

        Pages registered earlier for this request are not hashed again. A page whose key is
        already cached on another page is left uncached (its twin serves lookups), and a page
        cached already keeps its key. All or nothing: a call that raises changes nothing.

        Args:
            req_id: a live request id.
            token_ids: int[T], the request's tokens from its first one, at least up to the
                pages to register; only full pages within ``min(T, num_tokens(req_id))`` are
                registered. Cover only tokens whose KV is computed.
            namespace: str, bytes or None; must match earlier lookups/commits of this request.
            extra_keys: per-page extra keys as for :meth:`lookup_prefix` (give the same ones
                on every commit of the request: pages hashed earlier are not hashed again).
            lora_id: None or an int: the LoRA adapter, reported on the ``PagesStored``
                events of this commit (vLLM's ``lora_id``); it does not enter the keys
                (give the adapter in ``extra_keys`` or ``namespace`` for that).

        Returns:
            The number of pages newly registered (an int >= 0).

        Raises:
            ValueError: prefix caching is disabled; ``token_ids`` is not a 1-D integer array;
                ``namespace`` differs from the one this request was looked up or committed
                with; the request is swapped out.
            UnknownRequest: ``req_id`` is not live.
            TypeError: ``namespace`` is not str, bytes or None, or ``req_id`` is not hashable.
        """
        query, lora = self._lora_query("commit_prefix", token_ids, namespace, extra_keys, lora_id)
        return _prefix.commit(self._parts, req_id, query, lora)

    # ------------------------------------------------------ state and checks

    def state_dict(self) -> dict[str, Any]:
        """Returns a deep copy of the state: numpy arrays, ints and plain dicts/lists.

        Only the live part of the stacks is kept, so equal states give equal dicts. Includes
        the :attr:`prefix_stats` counters and the pending copy-on-write copies. Never raises.

        Returns:
            A dict for :meth:`load_state_dict`: ``"version"`` (5; version 4 states, from
            before layer groups, still load), ``"config"``,
            ``"free_pages"`` (int32[num_free]), ``"free_rows"`` (int32[num_free_rows]),
            ``"rows"`` (request id -> row), ``"clock"``, ``"prefix_stats"``,
            ``"pending_copies"`` (int32[K, 2]) and the per-page and per-row arrays, e.g.
            ``"refcount"`` (int32[num_pages]), ``"page_table"``
            (int32[max_requests, max_pages_per_request]), ``"row_released"``
            (int32[max_requests], columns released by the sliding window) and
            ``"row_tentative"`` (bool[max_requests], looked up and not served since),
            ``"page_group"`` (int32[num_pages], the group of each cached page); with
            ``num_groups > 1`` the tables' arrays (``page_table``, ``row_pages``,
            ``row_released``, ``host_table``) gain a leading group axis; and the
            host tier's: ``"host_free"``, ``"host_clock"``, ``"host_stats"``,
            ``"pending_swap_out"`` / ``"pending_swap_in"`` (int32[K, 2]), ``"host_table"``
            (int32[max_requests, max_pages_per_request]), ``"row_swapped"``,
            ``"host_key"``, ``"host_cached"``, ``"host_lru"`` and ``"host_limbo"``.
        """
        return self._parts.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a :meth:`state_dict` (same configuration); validated before anything moves.

        The whole state is checked first, everything :meth:`check_invariants` checks included
        (page and row ids in range, no duplicates, each row owned once, reference counts equal
        to owners, the prefix index consistent with the page keys, the eviction clock at most
        ``2**62``), then swapped in, so every state it accepts serves every operation. The
        arrays are copied in; :attr:`page_table` views taken before the call go stale.

        Args:
            state: a dict returned by :meth:`state_dict` of an allocator with the same
                constructor arguments.

        Raises:
            TypeError: ``state`` is not a dict.
            ValueError: an entry is missing, the version or config differs, or an entry is
                malformed or inconsistent; the message names it. Nothing changes then.
        """
        self._parts = self._parts.load(state)

    def checksum(self) -> str:
        """Returns a hex blake2b digest of the whole state; equal states give equal digests.

        Deterministic across processes and hosts (request ids enter through ``repr``). The
        digest covers everything :meth:`state_dict` returns, including the cumulative
        counters :attr:`prefix_stats` and :attr:`tier_stats` (saved as ``"host_stats"``; its
        ``device_hits`` count lookup hits with or without a host tier), which :meth:`free`
        never resets. With prefix caching off those counters stay 0, so freeing every request
        restores the digest of a fresh allocator with the same arguments; with it on, the same
        holds once nothing is cached, up to both counters.

        Returns:
            32 lowercase hex characters (a 128-bit digest). Never raises.
        """
        return self._parts.checksum()

    def check_invariants(self) -> None:
        """Checks every internal invariant (O(num_pages · max_pages_per_request); for tests).

        Raises:
            AssertionError: naming the first broken invariant and its field (raised
                explicitly, so also under ``python -O``).
        """
        self._parts.check_invariants()

    # ------------------------------------------------------------ host tier

    @property
    def num_free_host_pages(self) -> int:
        """Host pages a :meth:`swap_out_request` can get now: free ones plus cached host
        prefix pages (evicted for it); 0 without a host tier."""
        return self._parts.tier.num_takeable

    @property
    def tier_stats(self) -> dict[str, int]:
        """Host-tier counters (a copy), cumulative like :attr:`prefix_stats`.

        ``device_hits`` / ``host_hits``: tokens :meth:`lookup_prefix` found in each tier (their
        sum is ``prefix_stats["hits"]``); ``demoted_pages``: pages evicted from the device
        prefix cache and kept in the host tier; ``host_evictions``: cached host pages dropped
        (for a swap-out or a newer demotion); ``swapped_out_pages`` / ``swapped_in_pages``:
        pages moved by :meth:`swap_out_request` / :meth:`swap_in_request`.
        """
        return dict(self._parts.tier.stats)

    def is_swapped_out(self, req_id: Hashable) -> bool:
        """Whether a live request is swapped out (not schedulable until swapped in).

        Raises:
            UnknownRequest: ``req_id`` is not live. TypeError: it is not hashable.
        """
        parts = self._parts
        return bool(parts.tier.row_swapped[parts.rows.row_of(req_id, "is_swapped_out")])

    def swap_out_request(self, req_id: Hashable) -> int:
        """Preempts a request by swap: its own pages move to host pages, freeing device pages.

        Moves the pages only this request owns and that are not prefix-cached; a page shared
        with another request or cached stays on device, still owned by this request (so no
        other request or lookup sees a change). The moved columns of its page-table row read
        :data:`NULL_PAGE` until :meth:`swap_in_request`; :meth:`num_tokens` is unchanged. Each
        move queues a (device page, host page) pair for :meth:`take_pending_swaps`; the device
        pages are free at once (a later allocation in the same step may take them: the step
        applies swap-outs first). While swapped out the request cannot be grown, forked,
        truncated or committed (ValueError); :meth:`free` releases it. Swap out a request that
        the current step does not schedule: the pairs move the pages as they were before the
        step's update. Host pages come from the free host stack first, then from the host
        prefix cache (least recently kept first). With several KV-cache groups every group's
        own pages move, their pairs group by group. All or nothing.

        Args:
            req_id: a live request that is not swapped out.

        Returns:
            The number of pages moved, each a device page freed (0 if it owns none alone; it
            is swapped out even then): :meth:`swap_out_frees` tells it beforehand.

        Raises:
            ValueError: there is no host tier; the request is already swapped out; one of its
                pages is read or filled by a pending copy or swap-in of this step.
            OutOfPages: more pages must move than host pages are free or evictable (the
                message says "host pages"). Nothing changes then.
            UnknownRequest: ``req_id`` is not live. TypeError: it is not hashable.
        """
        return _preempt.swap_out(self._parts, req_id)

    def swap_out_frees(self, req_id: Hashable) -> int:
        """Returns how many device pages :meth:`swap_out_request` would free now; changes
        nothing (a scheduler picks whom to preempt with it).

        The pages the request alone owns that are not prefix-cached, in every KV-cache group:
        what ``swap_out_request(req_id)`` returns and adds to :attr:`num_free_pages` if it is
        called next. 0 when every page is shared (fork, prefix hit) or cached. That call may
        still refuse: when this count exceeds :attr:`num_free_host_pages` (``OutOfPages``), or
        while a pending copy or swap-in of this step touches one of the request's pages.

        Args:
            req_id: a live request that is not swapped out.

        Returns:
            An int in ``[0, num_groups * max_pages_per_request]``.

        Raises:
            ValueError: there is no host tier; the request is swapped out.
            UnknownRequest: ``req_id`` is not live. TypeError: it is not hashable.
        """
        moving = _preempt.moving_columns(self._parts, req_id, "swap_out_frees")
        return sum(int(cols.size) for cols in moving)

    def swap_in_request(self, req_id: Hashable) -> np.ndarray:
        """Brings a swapped-out request back into NEW device pages; it is schedulable again.

        The page-table row is rewritten with the new pages at the columns that moved, and
        each (new device page, host page) pair is queued for :meth:`take_pending_swaps`. The
        host pages are free once the pairs are taken. Taking device pages may evict cached
        ones (and keep them in the host prefix cache). All or nothing.

        Returns:
            int32[k]: the new device pages, in row order (group by group with several
            KV-cache groups).

        Raises:
            ValueError: there is no host tier; the request is not swapped out; a pending
                copy-on-write reads a page nobody owns (apply the copies first).
            OutOfPages: fewer device pages are free or evictable than it needs.
            UnknownRequest: ``req_id`` is not live. TypeError: it is not hashable.
        """
        return _preempt.swap_in(self._parts, req_id)

    def take_pending_swaps(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns the queued swaps and clears them: ``(swap_out_pairs, swap_in_pairs)``.

        Each is int32[K, 2] of (device page, host page) rows, device pages in
        ``[1, num_pages)``, host pages in ``[1, num_host_pages)``, in the order queued
        (int32[0, 2] when none): for ``kvshard.swap_out(cache, host, swap_out_pairs)`` and
        ``kvshard.swap_in(cache, host, swap_in_pairs)``, as they come or padded to a fixed K
        with ``(-1, -1)`` rows (not ``(0, 0)``: see docs/tiers.md). Apply one step as: swap-out,
        then
        swap-in, then ``copy_pages(take_pending_copies())``, then the KV update:

        * swap-out first: it reads device pages that this step's swap-ins, copies and update
          may hand to others and overwrite (a page freed by a swap-out or evicted into the host
          tier is free at once);
        * swap-in before the copies: a copy may read a page swapped in this step (a request
          swapped in, then forked and grown), and a swap-in only writes pages that no pending
          copy reads (refused otherwise);
        * the copies before the update, as always.

        Host pages freed this step (swapped in, hit, freed) are handed out again only after
        this call, so no two pending pairs write one host page. Never raises.
        """
        pairs = self._parts.tier.take_pending()
        self._parts.reset_order_if_empty()  # host pages freed in a step return only now
        return pairs

    # ---------------------------------------------------- reset and events

    def reset_prefix_cache(self) -> bool:
        """Drops every cached page of both tiers, as vLLM's ``reset_prefix_cache`` (e.g. after
        a weight update); returns whether it could.

        Like vLLM it refuses (returns False, changing nothing) while any page is in use:
        owned by a request, or on the host for a swapped-out request, or while swap pairs are
        pending. Otherwise every cached page becomes plain free, an ``AllPagesCleared`` event
        is queued, and the allocator's page order is a fresh one's. Keeps :attr:`prefix_stats`.
        """
        return self._parts.reset_prefix_cache()

    def announce_cached_pages(self) -> int:
        """Queues a ``PagesStored`` event for every page cached now, in either tier (vLLM's
        cached-block events on demand: a KV-aware router that connects late learns the
        cache); returns how many pages it announced.

        One event per group of device pages and one of host pages, in page-id order, with
        ``parent_hash`` and ``token_ids`` None (the allocator keeps keys, not tokens).
        Needs ``enable_kv_events=True`` (else it queues nothing and returns 0). Changes no
        state; never raises.
        """
        return self._parts.announce_cached()

    def announce_prefix(
        self,
        req_id: Hashable,
        token_ids: Sequence[int] | np.ndarray,
        namespace: str | bytes | None = None,
        *,
        extra_keys: Sequence[Any] | None = None,
        lora_id: int | None = None,
    ) -> int:
        """Queues ``PagesStored`` events for the cached prefix a request reuses (vLLM's
        ``emit_cached_block_events``): after a :meth:`lookup_prefix` hit, a KV-aware router
        learns that those pages are cached here, as when they were first stored.

        One event per KV-cache group naming the keys of the request's first ``n`` pages,
        ``n`` the pages it holds hashed (its hit, and the pages it committed since), with
        their tokens, ``parent_hash`` None (the prefix starts at page 0), the group, and
        ``lora_id``. Changes no state (the cache, the eviction order and the counters stay).

        Args:
            req_id: a live request.
            token_ids: int[T], its tokens from the first, covering at least its ``n`` hashed
                pages (as given to :meth:`lookup_prefix` / :meth:`commit_prefix`).
            namespace, extra_keys: as given to its lookup and commits.
            lora_id: None or an int, reported on the events.

        Returns:
            The number of pages announced per group (``n``; 0 queues nothing), also without
            ``enable_kv_events`` (then nothing is queued).

        Raises:
            ValueError: prefix caching is disabled; ``token_ids`` is not a 1-D integer array
                or covers fewer than ``n`` pages; ``namespace`` differs from the request's;
                ``lora_id`` is not None or an int.
            UnknownRequest: ``req_id`` is not live. TypeError: it is not hashable.
        """
        query, lora = self._lora_query("announce_prefix", token_ids, namespace, extra_keys, lora_id)
        return _prefix.announce(self._parts, req_id, query, lora)

    def take_kv_events(self) -> list[KVEvent]:
        """Returns the queued KV-cache events, oldest first, and clears the queue.

        Needs ``enable_kv_events=True`` (else always ``[]``). The events are those of vLLM's
        KV-cache event stream, for KV-aware routers: ``PagesStored`` (pages committed to the
        device prefix cache, promoted to it by a host hit, or kept in the host tier: its
        ``medium``), ``PagesRemoved`` (evicted, moved to the other tier), ``AllPagesCleared``
        (:meth:`reset_prefix_cache`, and first after :meth:`load_state_dict`, which then
        re-announces every cached page). Not part of :meth:`state_dict`. Never raises.
        """
        return self._parts.events.take()
