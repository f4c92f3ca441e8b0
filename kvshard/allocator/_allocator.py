"""The public :class:`PageAllocator`: construction, free, fork, truncate, pending copies.

Its other methods come from the layers below (see :mod:`kvshard.allocator._base`).
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from kvshard.allocator._base import MAX_TOKENS
from kvshard.allocator._state import AllocatorState


class PageAllocator(AllocatorState):
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
    attaches cached pages to a new request. A cached page whose last owner is freed stays cached
    (evictable) and is reused, least recently freed first, only once the plain free stack is
    empty. :attr:`num_free_pages` counts free and evictable pages.

    Sliding window (``sliding_window=W``, for a model whose every layer attends the last ``W``
    positions: token ``p`` attends ``(p - W, p]``): each :meth:`allocate` first releases the
    request's pages that lie wholly before token ``num_tokens - W + 1`` (counted before the
    call), as vLLM's sliding-window manager does. Released entries of the page table read
    :data:`NULL_PAGE`, so the table keeps its shape and column ``j`` still holds tokens
    ``[j * page_size, (j + 1) * page_size)``; attention with ``sliding_window=W`` never reads
    them. :func:`kvshard.allocator.sliding_window_pages` bounds the pages a request then holds.
    Not combinable with prefix caching (a window's pages are not a prefix); :meth:`truncate`
    cannot roll back into released pages; :meth:`fork` shares the released layout.

    Not thread-safe. Request ids may be any hashable; use ints, strs or tuples of them where
    :meth:`checksum` must agree across hosts (it hashes ``repr(req_id)``).

    Args:
        num_pages: pages in the pool, null page included; int in ``[2, 2**31 - 1]``.
        page_size: tokens per page; int >= 1.
        max_requests: rows of :attr:`page_table` (live requests at once); int >= 1.
        max_pages_per_request: columns of :attr:`page_table`; int >= 1.
        enable_prefix_caching: allow :meth:`lookup_prefix` and :meth:`commit_prefix`.
        sliding_window: None, or W >= 1 to release pages out of every request's window.

    Raises:
        ValueError: an argument is not an int (bools rejected) or is below its minimum,
            ``num_pages`` does not fit int32, ``max_pages_per_request * page_size`` exceeds
            ``2**62``, or ``sliding_window`` is combined with ``enable_prefix_caching``.
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
    ) -> None:
        for name, value, low in (
            ("num_pages", num_pages, 2),
            ("page_size", page_size, 1),
            ("max_requests", max_requests, 1),
            ("max_pages_per_request", max_pages_per_request, 1),
            ("sliding_window", 1 if sliding_window is None else sliding_window, 1),
        ):
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
                raise ValueError(f"PageAllocator: {name}={value!r} must be an int >= {low}")
        if num_pages > np.iinfo(np.int32).max:
            raise ValueError(f"PageAllocator: num_pages={num_pages} does not fit int32")
        if int(max_pages_per_request) * int(page_size) > MAX_TOKENS:
            raise ValueError(
                f"PageAllocator: max_pages_per_request*page_size="
                f"{int(max_pages_per_request) * int(page_size)} must be <= 2**62"
            )
        if sliding_window is not None and enable_prefix_caching:
            raise ValueError(
                f"PageAllocator: sliding_window={sliding_window} cannot be combined with "
                "enable_prefix_caching=True (released pages would break cached prefixes)"
            )
        self.num_pages = int(num_pages)
        self.page_size = int(page_size)
        self.max_requests = int(max_requests)
        self.max_pages_per_request = int(max_pages_per_request)
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self.sliding_window = None if sliding_window is None else int(sliding_window)
        self._init_state()

    def free(self, req_id: Hashable) -> None:
        """Releases the request's pages and its row; the row is reset to the null page.

        Pages whose last owner this was return to the free stack, or, when cached, become
        evictable (the request's last page first in eviction order: later pages of a prefix
        are the least likely to be shared). Pending copies into the freed pages are dropped.

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
        row = self._row_of(req_id, "free")
        self._release(self._page_table[row, : self._row_pages[row]].copy())
        self._reset_row(row)
        self._free_rows[self._num_free_rows] = row
        self._num_free_rows += 1
        del self._rows[req_id]
        if not self._rows and self._num_evictable == 0:
            self._canonicalize_empty()

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
                was released.
        """
        where = "truncate"
        row = self._row_of(req_id, where)
        held = int(self._row_tokens[row])
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int | np.integer):
            raise ValueError(f"{where}: num_tokens={num_tokens!r} must be an int")
        if not 0 <= num_tokens <= held:
            raise ValueError(
                f"{where}: num_tokens={int(num_tokens)} for req_id={req_id!r} must be in "
                f"[0, {held}] (the tokens it holds)"
            )
        tokens = int(num_tokens)
        released = int(self._row_released[row]) * self.page_size
        if self.sliding_window is not None and released > max(tokens - self.sliding_window + 1, 0):
            raise ValueError(
                f"{where}: num_tokens={tokens} for req_id={req_id!r} needs tokens from "
                f"{max(tokens - self.sliding_window + 1, 0)} on (sliding_window="
                f"{self.sliding_window}), but its pages before token {released} were released"
            )

        # ---- commit
        keep = -(-tokens // self.page_size)
        stop = int(self._row_pages[row])
        self._release(self._page_table[row, keep:stop].copy())
        self._page_table[row, keep:stop] = 0
        self._row_pages[row] = keep
        self._row_tokens[row] = tokens
        if self._row_committed[row] > tokens // self.page_size:
            # The last kept committed page's key may not be stored (a twin page may hold it).
            self._row_committed[row] = 0
            self._row_last_key[row] = 0

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
                rows are in use.
        """
        src = self._row_of(src_req, "fork(src_req)")
        try:
            live = dst_req in self._rows
        except TypeError:
            raise ValueError(f"fork: dst_req={dst_req!r} is not hashable") from None
        if live:
            raise ValueError(f"fork: dst_req={dst_req!r} is already a live request")
        dst = self._take_row(dst_req, "fork")
        held = int(self._row_pages[src])
        self._commit_row(dst_req, dst)
        pages = self._page_table[src, :held]
        self._page_table[dst, :held] = pages
        self._refcount[pages[pages != 0]] += 1
        # Released columns hold NULL_PAGE, which nobody owns: no refcount to raise.
        for array in (
            self._row_pages,
            self._row_tokens,
            self._row_released,
            self._row_committed,
            self._row_last_key,
            self._row_ns,
            self._row_has_ns,
        ):
            array[dst] = array[src]

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
        if not self._pending:
            return np.zeros((0, 2), np.int32)
        pairs = np.concatenate(self._pending).astype(np.int32)
        self._pending = []
        return pairs
