"""Growing requests: ``allocate`` and ``allocate_batch``, copy-on-write, sliding windows.

One vectorized path serves one request or a whole step's batch: look up (or reserve) rows,
check every bound, plan copy-on-write and the sliding-window release, check the pages suffice,
and only then commit.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from itertools import repeat
from operator import itemgetter

import numpy as np

from kvshard.allocator._base import OutOfPages
from kvshard.allocator._pool import PagePool


class Growth(PagePool):
    """``allocate`` and ``allocate_batch``."""

    def allocate(self, req_id: Hashable, num_new_tokens: int) -> np.ndarray:
        """Grows ``req_id`` (created on first use) by ``num_new_tokens`` tokens.

        All or nothing: a call that raises changes nothing. With ``sliding_window=W`` the
        request's pages wholly before token ``num_tokens(req_id) - W + 1`` (counted before
        this call: the first new token attends back to there) are released first.

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
            ValueError: ``num_new_tokens`` is not an int, is negative or exceeds
                ``max_pages_per_request * page_size``; the request would exceed
                ``max_pages_per_request``; ``req_id`` is new and all ``max_requests`` rows are
                in use.
            TypeError: ``req_id`` is not hashable.
        """
        if isinstance(num_new_tokens, bool) or not isinstance(num_new_tokens, int | np.integer):
            raise ValueError(f"allocate: num_new_tokens={num_new_tokens!r} must be an int")
        # Bounded as a Python int: np.array(2**70) would overflow and 2**63-1 wraps later.
        limit = self.max_pages_per_request * self.page_size
        if num_new_tokens > limit:
            raise ValueError(
                f"allocate: num_new_tokens={int(num_new_tokens)} for req_id={req_id!r} exceeds "
                f"max_pages_per_request*page_size={limit}"
            )
        _, pages = self._grow([req_id], np.array([num_new_tokens], np.int64), "allocate")
        return pages

    def allocate_batch(
        self, req_ids: Sequence[Hashable] | np.ndarray, num_new_tokens: Sequence[int] | np.ndarray
    ) -> np.ndarray:
        """Grows every request of one step; the same as ``allocate`` on each, in order.

        All or nothing for the whole batch: a call that raises changes nothing.

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
        rows, _ = self._grow(ids, counts.astype(np.int64, copy=False), "allocate_batch")
        return rows

    def _known_rows(self, req_ids: Sequence[Hashable]) -> np.ndarray | None:
        """Returns int64[B] rows if every id is live, else None (the steady-state fast path)."""
        if len(req_ids) < 2:
            return None  # itemgetter of one key returns the value itself, not a tuple
        try:
            # One C call for all B lookups: about half the cost of map(dict.get, ...).
            found = itemgetter(*req_ids)(self._rows)
        except KeyError:
            return None
        return np.fromiter(found, dtype=np.int64, count=len(req_ids))

    def _lookup_rows(
        self, req_ids: Sequence[Hashable], where: str
    ) -> tuple[np.ndarray, list[Hashable], np.ndarray]:
        """Returns (int64[B] rows, new ids, int64[new] positions); new rows are not yet taken."""
        count = len(req_ids)
        if count > self.max_requests:
            raise ValueError(
                f"{where}: batch of {count} requests exceeds max_requests={self.max_requests}"
            )
        rows = self._known_rows(req_ids)
        if rows is None:  # some ids are new
            rows = np.fromiter(
                map(self._rows.get, req_ids, repeat(-1, count)), dtype=np.int64, count=count
            )
            new_pos = np.flatnonzero(rows < 0)
        else:
            new_pos = np.zeros(0, np.int64)
        new_ids: list[Hashable] = []
        if new_pos.size:
            new_ids = [req_ids[i] for i in new_pos.tolist()]
            if len(set(new_ids)) != len(new_ids):
                raise ValueError(f"{where}: req_ids contains duplicates")
            if len(new_ids) > self._num_free_rows:
                more = f" and {len(new_ids) - 1} other new requests" if len(new_ids) > 1 else ""
                raise ValueError(
                    f"{where}: cannot add req_id={new_ids[0]!r}{more}: only "
                    f"{self._num_free_rows} of max_requests={self.max_requests} rows are free"
                )
            top = self._num_free_rows
            rows[new_pos] = self._free_rows[top - len(new_ids) : top][::-1]
        # Distinct rows <=> distinct ids (new ids got distinct free rows above).
        iota = np.arange(count)
        self._mark[rows] = iota
        dup = np.flatnonzero(self._mark[rows] != iota)
        if dup.size:
            raise ValueError(f"{where}: req_ids contains duplicates, e.g. {req_ids[dup[0]]!r}")
        return rows, new_ids, new_pos

    def _grow(
        self, req_ids: Sequence[Hashable], counts: np.ndarray, where: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Core of allocate/allocate_batch. Returns (int32[B] rows, int32[k] new pages)."""
        if counts.ndim != 1 or counts.shape[0] != len(req_ids):
            raise ValueError(
                f"{where}: num_new_tokens must have shape ({len(req_ids)},), got {counts.shape}"
            )
        bad = np.flatnonzero(counts < 0)
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"{where}: num_new_tokens={int(counts[i])} for req_id={req_ids[i]!r} must be >= 0"
            )
        rows, new_ids, new_pos = self._lookup_rows(req_ids, where)
        size = self.page_size
        old_tokens = self._row_tokens[rows]
        old_pages = self._row_pages[rows]
        total = old_tokens + counts  # both <= max_pages_per_request * page_size <= 2**62
        need = (total + (size - 1)) // size
        over = np.flatnonzero(need > self.max_pages_per_request)
        if over.size:
            i = int(over[0])
            raise ValueError(
                f"{where}: req_id={req_ids[i]!r} would hold {int(total[i])} tokens in "
                f"{int(need[i])} pages, more than max_pages_per_request="
                f"{self.max_pages_per_request}"
            )
        grow = need - old_pages
        cow_pos, cow_src = self._plan_copy_on_write(rows, old_tokens, old_pages, counts)
        per_req = grow
        if cow_pos.size:
            per_req = grow.copy()
            per_req[cow_pos] += 1
        needed = int(per_req.sum())
        release, freed = self._plan_window_release(rows, old_tokens)
        available = self.num_free_pages + freed
        if needed > available:
            raise OutOfPages(needed, available, where)

        # ---- commit: nothing below can fail.
        for row, stop in release:  # released pages are reused by this very call
            self._release(self._page_table[row, self._row_released[row] : stop].copy())
            self._page_table[row, self._row_released[row] : stop] = 0
            self._row_released[row] = stop
        pages = self._take(needed)
        if new_ids:
            top = self._num_free_rows
            self._num_free_rows = top - len(new_ids)
            self._rows.update(zip(new_ids, rows[new_pos].tolist(), strict=True))
        if needed:
            self._refcount[pages] = 1
            start = np.cumsum(per_req) - per_req  # each request's first page in `pages`
            if cow_pos.size:
                dst = pages[start[cow_pos]]
                np.subtract.at(self._refcount, cow_src, 1)  # a page may lose several writers
                self._page_table[rows[cow_pos], old_pages[cow_pos] - 1] = dst
                self._queue_copies(cow_src, dst)
                # A cached partial page (kept by truncate) may lose its last owner here.
                orphans = cow_src[self._refcount[cow_src] == 0]
                if orphans.size:
                    unique, first = np.unique(orphans, return_index=True)
                    self._make_evictable(unique[np.argsort(first)])
                start[cow_pos] += 1
            self._place(rows, old_pages, grow, start, pages)
        self._row_pages[rows] = need
        self._row_tokens[rows] = total
        return rows.astype(np.int32), pages

    def _plan_window_release(
        self, rows: np.ndarray, old_tokens: np.ndarray
    ) -> tuple[list[tuple[int, int]], int]:
        """Returns ([(row, new released column count)], pages that the release frees).

        With ``sliding_window=W``, a request about to write token ``t = old_tokens`` (the
        first new one, which attends positions ``(t - W, t]``) never reads the pages wholly
        before token ``t - W + 1`` again. Only pages whose every owner in this batch releases
        them count as freed (a page forked into two rows of the batch is released twice).
        """
        if self.sliding_window is None:
            return [], 0
        stop = np.maximum(old_tokens - self.sliding_window + 1, 0) // self.page_size
        which = np.flatnonzero(stop > self._row_released[rows])
        if not which.size:
            return [], 0
        release = list(zip(rows[which].tolist(), stop[which].tolist(), strict=True))
        dropped = np.concatenate(
            [self._page_table[row, self._row_released[row] : end] for row, end in release]
        )
        pages, times = np.unique(dropped, return_counts=True)
        return release, int((self._refcount[pages] == times).sum())

    def _plan_copy_on_write(
        self, rows: np.ndarray, old_tokens: np.ndarray, old_pages: np.ndarray, counts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Returns (int64[c] batch positions, int32[c] src pages) of writers that must copy.

        A writer appending to a partly filled last page shared with others, or cached (a page
        that :meth:`truncate` cut back into), needs a private copy. With several writers of one
        page in a batch, the semantics are those of sequential ``allocate`` calls: each copy
        drops the refcount by one, so the first ``refcount - 1`` writers (batch order) copy and
        the last one keeps the page, unless it is cached: then every writer copies.
        """
        pos = np.flatnonzero((old_tokens % self.page_size != 0) & (counts > 0))
        if pos.size == 0:
            return pos, np.zeros(0, np.int32)
        width = self.max_pages_per_request
        last = self._page_table.reshape(-1)[rows[pos] * width + old_pages[pos] - 1]
        keep = self._cached[last].astype(np.int32)  # 1: the cache keeps the page
        refs = self._refcount[last] + keep
        shared = refs > 1
        pos, last, refs = pos[shared], last[shared], refs[shared]
        if pos.size <= 1:
            return pos, last
        order = np.argsort(last, kind="stable")  # groups writers of a page, batch order kept
        sorted_last = last[order]
        head = np.r_[True, sorted_last[1:] != sorted_last[:-1]]
        idx = np.arange(pos.size)
        rank = np.empty(pos.size, np.int64)
        rank[order] = idx - np.maximum.accumulate(np.where(head, idx, 0))
        copies = rank < refs - 1
        return pos[copies], last[copies]

    def _place(
        self,
        rows: np.ndarray,
        old_pages: np.ndarray,
        grow: np.ndarray,
        start: np.ndarray,
        pages: np.ndarray,
    ) -> None:
        """Writes ``grow[i]`` pages from ``pages[start[i]:]`` after each row's last page."""
        which = np.flatnonzero(grow)  # decode steps: few requests cross a page boundary
        if which.size == 0:
            return
        counts = grow[which]
        total = int(counts.sum())
        owner = np.repeat(which, counts)
        within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        self._page_table[rows[owner], old_pages[owner] + within] = pages[start[owner] + within]
