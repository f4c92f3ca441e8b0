"""One KV-cache group's page table: each request's pages, drawn from the shared pool.

The counterpart of vLLM's ``SingleTypeKVCacheManager``: the rules that depend on the group's
attention type live here (which pages a sliding window of ``W`` or a chunk of ``C`` no longer
reads, which writes need a private copy), the reference counts in
:class:`~kvshard.allocator._pool.PagePool`. A :class:`kvshard.PageAllocator` holds one table
per KV-cache group (full attention, a sliding window, chunked local attention), all indexed by
the same rows and holding the same number of columns per row (``ceil(tokens / page_size)``);
the allocator sums their page needs before it commits any (``_grow``).
"""

from __future__ import annotations

import numpy as np

from kvshard._geometry.layer_types import FULL, LayerType, layer_size
from kvshard.allocator._common import NULL_PAGE, check
from kvshard.allocator._pool import PagePool


class PageTable:
    """int32[max_requests, max_pages_per_request] page ids, columns used and released per row."""

    ARRAYS = ("page_table", "row_pages", "row_released")  # saved as-is by state_dict

    def __init__(
        self,
        pool: PagePool,
        max_requests: int,
        max_pages_per_request: int,
        page_size: int,
        layer_type: LayerType = FULL,
        arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """``arrays``: views (page_table, row_pages, row_released) into the allocator's
        stacked arrays of every group (see ``_state``); fresh zeros when None."""
        self.pool = pool
        self.page_size = page_size
        self.width = max_pages_per_request
        self.layer_type = layer_type
        self.kind = layer_type[0]
        self.size = layer_size(layer_type)  # W of a sliding window, C of a chunk, else None
        r, m = max_requests, max_pages_per_request
        if arrays is None:
            arrays = (np.zeros((r, m), np.int32), np.zeros(r, np.int32), np.zeros(r, np.int32))
        self.page_table = arrays[0]  # int32[max_requests, max_pages]
        self.row_pages = arrays[1]  # int32[max_requests]: columns in use
        # int32[max_requests]: leading columns released by the window (now NULL_PAGE).
        self.row_released = arrays[2]

    is_state = False  # a state group's table (``_state_table.StateTable``) says True

    def columns(self, tokens: np.ndarray) -> np.ndarray:
        """Page-table columns a request holding ``tokens`` uses: ``ceil(tokens / page_size)``."""
        return (tokens + (self.page_size - 1)) // self.page_size

    def written(self, old_tokens: np.ndarray) -> np.ndarray:
        """Whether a request holding ``old_tokens`` that grows writes into its last held page
        (a partly filled one), which must then be private (copy-on-write)."""
        return old_tokens % self.page_size != 0

    def pages(self, row: int) -> np.ndarray:
        """Returns a copy of the row's used columns (released ones read NULL_PAGE)."""
        return self.page_table[row, : self.row_pages[row]].copy()

    @property
    def releases(self) -> bool:
        """Whether the group releases pages no query reads again (sliding or chunked)."""
        return self.size is not None

    def window_start(self, tokens: np.ndarray) -> np.ndarray:
        """First token the next query (at position ``tokens``) of a request holding ``tokens``
        reads: ``tokens - W + 1`` (at least 0) for a sliding window ``W``, the start of its
        chunk ``C * (tokens // C)`` for chunks of ``C``, 0 for full attention."""
        if self.size is None:
            return np.zeros_like(tokens)
        if self.kind == "chunked":
            return self.size * (tokens // self.size)
        return np.maximum(tokens - self.size + 1, 0)

    # ---------------------------------------------------------------- growth

    def plan_release(
        self, rows: np.ndarray, old_tokens: np.ndarray
    ) -> tuple[list[tuple[int, int]], np.ndarray]:
        """Returns ([(row, new released column count)], int32[k] the pages those releases drop).

        A request about to write token ``t = old_tokens`` (the first new one) never reads the
        pages wholly before :meth:`window_start` of ``t`` again (``t - W + 1`` for a sliding
        window ``W``, the chunk start ``C * (t // C)`` for chunks of ``C``). A page forked
        into two rows of the batch appears twice.
        """
        empty = np.zeros(0, np.int32)
        if self.size is None:
            return [], empty
        stop = self.window_start(old_tokens) // self.page_size
        which = np.flatnonzero(stop > self.row_released[rows])
        if not which.size:
            return [], empty
        release = list(zip(rows[which].tolist(), stop[which].tolist(), strict=True))
        dropped = np.concatenate(
            [self.page_table[row, self.row_released[row] : end] for row, end in release]
        )
        return release, dropped

    def release(self, release: list[tuple[int, int]]) -> None:
        """Commits :meth:`plan_release`: the pages go back to the pool, the entries read null."""
        for row, stop in release:
            start = self.row_released[row]
            self.pool.release(self.page_table[row, start:stop].copy())
            self.page_table[row, start:stop] = NULL_PAGE
            self.row_released[row] = stop

    def plan_copy_on_write(
        self,
        rows: np.ndarray,
        old_tokens: np.ndarray,
        old_pages: np.ndarray,
        counts: np.ndarray,
        released: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Returns (int64[c] batch positions, int32[c] src pages) of writers that must copy.

        A writer appending to a partly filled last page shared with others, or cached (a page
        that :meth:`truncate` cut back into), needs a private copy. Owners are counted after
        this batch's window releases (``released``: int32[k] pages dropped, repeats allowed),
        which commit first. With several writers of one page in a batch, the semantics are
        those of sequential ``allocate`` calls: each copy drops one owner, so the first
        ``owners - 1`` writers (batch order) copy and the last keeps the page, unless it is
        cached: then every writer copies.
        """
        pos = np.flatnonzero(self.written(old_tokens) & (counts > 0))
        if pos.size == 0:
            return pos, np.zeros(0, np.int32)
        last = self.page_table.reshape(-1)[rows[pos] * self.width + old_pages[pos] - 1]
        refs = self.pool.refcount[last].astype(np.int64)
        if released.size:
            gone, times = np.unique(released, return_counts=True)
            at = np.minimum(np.searchsorted(gone, last), gone.size - 1)
            refs -= np.where(gone[at] == last, times[at], 0)
        refs += self.pool.index.cached[last]  # the cache keeps the page: one more owner
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

    def place(
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
        self.page_table[rows[owner], old_pages[owner] + within] = pages[start[owner] + within]

    # ------------------------------------------------------- whole requests

    def fork(self, src: int, dst: int) -> None:
        """Row ``dst`` shares every page of row ``src`` (released columns stay null)."""
        held = int(self.row_pages[src])
        pages = self.page_table[src, :held]
        self.page_table[dst, :held] = pages
        self.pool.share(pages)
        self.row_pages[dst] = held
        self.row_released[dst] = self.row_released[src]

    def truncate(self, row: int, tokens: int) -> None:
        """Releases the row's pages past its first ``tokens`` tokens."""
        keep = -(-tokens // self.page_size)
        stop = int(self.row_pages[row])
        self.pool.release(self.page_table[row, keep:stop].copy())
        self.page_table[row, keep:stop] = NULL_PAGE
        self.row_pages[row] = keep

    def free(self, row: int, undo: bool = False) -> None:
        """Releases every page of the row and resets it to the null page (``undo``: see
        ``PagePool.release``)."""
        self.pool.release(self.page_table[row, : self.row_pages[row]].copy(), undo)
        self.page_table[row] = NULL_PAGE
        self.row_pages[row] = 0
        self.row_released[row] = 0

    def check(self, tokens: np.ndarray, live: np.ndarray, swapped: np.ndarray) -> np.ndarray:
        """Checks the table against the rows' tokens; returns int32[owners] the owned entries.

        ``swapped``: bool[max_requests, max_pages_per_request], columns whose page is on the
        host (null here; see ``_host``)."""
        size, n = self.page_size, self.pool.num_pages
        check(
            np.array_equal(self.row_pages, (tokens + size - 1) // size),
            "row_pages: != ceil(tokens / page_size)",
        )
        released = self.row_released.astype(np.int64)
        idle = np.ones(released.size, bool)
        idle[live] = False
        check(not released[idle].any(), "row_tokens: a free row is not reset")
        if self.size is None:
            check(not released.any(), "row_released: pages released without a window")
        else:
            check(
                (released >= 0).all() and (released * size <= self.window_start(tokens)).all(),
                "row_released: releases pages the window still reads",
            )
        cols = np.arange(self.width)
        used = (cols[None, :] < self.row_pages[:, None]) & (cols[None, :] >= released[:, None])
        used &= ~swapped
        check(not self.page_table[~used].any(), "page_table: unused entry is not null")
        owned = self.page_table[used]
        check(((owned > 0) & (owned < n)).all(), "page_table: a request owns the null page or junk")
        for row in live:
            held = self.page_table[row, released[row] : self.row_pages[row]]
            held = held[held != NULL_PAGE]  # swapped-out columns
            check(np.unique(held).size == held.size, f"page_table: row {row} holds a page twice")
        return owned
