"""The page pool and reference counts: take pages, release them, rows, pending copies.

Pages come from the free stack first and, once it is empty, from the evictable cached pages
(:mod:`kvshard.allocator._lru`). Releasing a page decrements its reference count; a page whose
last owner let go returns to the free stack, or, when cached, becomes evictable.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from kvshard.allocator._base import NULL_PAGE
from kvshard.allocator._lru import EvictionOrder


class PagePool(EvictionOrder):
    """Free stack, reference counts, page-table rows and the copy-on-write queue."""

    def _take(self, count: int) -> np.ndarray:
        """Pops int32[count] pages: the free stack first, then evicts cached pages (FIFO).

        The caller checked ``count <= num_free_pages``.
        """
        plain = min(count, self._num_free)
        top = self._num_free
        taken = self._free_pages[top - plain : top][::-1].copy()
        self._num_free = top - plain
        if count > plain:
            taken = np.concatenate([taken, self._evict(count - plain)])
        return taken

    def _release(self, pages: np.ndarray) -> None:
        """Drops one reference to each of int32[k] distinct pages (NULL_PAGE entries skipped).

        Pages left unowned return to the free stack, or, when cached, become evictable with
        ``pages[-1]`` the oldest (later pages of a prefix are the least likely to be shared).
        Pending copies into them are dropped.
        """
        pages = pages[pages != NULL_PAGE]
        if not pages.size:
            return
        self._refcount[pages] -= 1
        dead = pages[self._refcount[pages] == 0]
        if not dead.size:
            return
        cached = self._cached[dead]
        self._make_evictable(dead[cached][::-1])
        plain = dead[~cached]
        self._free_pages[self._num_free : self._num_free + plain.size] = plain[::-1]
        self._num_free += int(plain.size)
        if self._pending:
            pairs = np.concatenate(self._pending)
            kept = pairs[~np.isin(pairs[:, 1], dead)]
            self._pending = [kept] if kept.size else []

    def _queue_copies(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Queues copies ``src[i] -> dst[i]``, each source resolved to its original page.

        A source that is itself the destination of a copy queued this step (a request forked
        after it grew) holds nothing yet on the device: ``copy_pages`` reads every source
        before writing any destination, so the copy must read the page that one copies from.
        Queued pairs are resolved already, so one lookup suffices.
        """
        if self._pending:
            queued = np.concatenate(self._pending)
            origin = dict(zip(queued[:, 1].tolist(), queued[:, 0].tolist(), strict=True))
            src = np.array([origin.get(page, page) for page in src.tolist()], np.int32)
        self._pending.append(np.stack([src, dst], axis=1).astype(np.int32))

    def _canonicalize_empty(self) -> None:
        """Resets the stacks, clock and stamps of an empty allocator to a fresh one's.

        Called only when no request is live and nothing is cached (every page is then on the
        free stack, every row on the free-row stack, and no copy is pending), so it only
        reorders: the result equals :meth:`_init_state` except the prefix counters. In place,
        so :attr:`page_table` views stay valid.
        """
        self._free_pages[:] = np.arange(self.num_pages - 1, 0, -1, dtype=np.int32)
        self._num_free = self.num_pages - 1
        self._free_rows[:] = np.arange(self.max_requests - 1, -1, -1, dtype=np.int32)
        self._num_free_rows = self.max_requests
        self._lru[:] = 0
        self._lru_next[:] = NULL_PAGE
        self._lru_prev[:] = NULL_PAGE
        self._clock = 0
        self._pending = []

    def _reset_row(self, row: int) -> None:
        self._page_table[row] = NULL_PAGE
        self._row_pages[row] = 0
        self._row_tokens[row] = 0
        self._row_released[row] = 0
        self._row_committed[row] = 0
        self._row_last_key[row] = 0
        self._row_ns[row] = 0
        self._row_has_ns[row] = False

    def _take_row(self, req_id: Hashable, where: str) -> int:
        """Checks a new row is available (does not take it); returns its index."""
        if self._num_free_rows == 0:
            raise ValueError(
                f"{where}: cannot add req_id={req_id!r}: all max_requests={self.max_requests} "
                "rows are in use"
            )
        return int(self._free_rows[self._num_free_rows - 1])

    def _commit_row(self, req_id: Hashable, row: int) -> None:
        self._num_free_rows -= 1
        self._rows[req_id] = row
