"""The page pool: reference counts, the free stack, the null page and the copy-on-write queue.

Every page table draws from one pool (as every vLLM KV-cache group draws from one
``BlockPool``). Pages come from the free stack first and, once it is empty, from the prefix
index's evictable pages, least recently released first. Releasing a page drops one reference;
a page whose last owner let go returns to the free stack, or, when cached, becomes evictable.

Reuse order: the free stack hands out the most recently freed page first, and pages released
together are pushed in row order, so the *last* of them is reused first, as vLLM reuses a freed
request's last block first. (vLLM's free queue is FIFO across calls and evicts a cached block
as soon as it reaches the head; the stack keeps recently used pages hot and never evicts a
cached page while a plain free page is left.)
"""

from __future__ import annotations

import numpy as np

from kvshard.allocator._common import NULL_PAGE, check, pop_free, push_free
from kvshard.allocator._prefix_index import PrefixIndex
from kvshard.allocator._tier import HostTier


class PagePool:
    """Reference counts and the free stack of ``num_pages`` pages (page 0 never handed out)."""

    ARRAYS = ("refcount",)  # saved as-is by state_dict

    def __init__(self, num_pages: int, index: PrefixIndex, tier: HostTier) -> None:
        self.num_pages = num_pages
        self.index = index
        self.tier = tier  # the host tier: evicted cached pages may be kept there
        self.refcount = np.zeros(num_pages, np.int32)  # int32[num_pages]: owners of each page
        # Free stack, top at index num_free - 1; reversed so that pops hand out 1, 2, 3, ...
        self.free = np.arange(num_pages - 1, 0, -1, dtype=np.int32)
        self.num_free = num_pages - 1
        self.pending: list[np.ndarray] = []  # int32[k, 2] blocks of (src_page, dst_page)

    @property
    def num_available(self) -> int:
        """Pages a take can get now: the free stack plus evictable cached pages."""
        return self.num_free + self.index.num_evictable

    def take(self, count: int) -> np.ndarray:
        """Pops int32[count] pages owned once each: the free stack first, then evicts (LRU).

        The caller checked ``count <= num_available``.
        """
        taken, self.num_free = pop_free(self.free, self.num_free, count)
        if count > taken.size:
            victims, keys = self.index.evict(count - taken.size)
            if self.tier.enabled:
                # Pages a pending copy or swap-in has yet to fill hold no data to keep.
                unfilled = set(self.pending_copies()[:, 1].tolist())
                unfilled.update(self.tier.swap_in_pairs()[:, 0].tolist())
                self.tier.demote(victims, keys, unfilled)
                self.tier.drop_in(victims)
            taken = np.concatenate([taken, victims])
        self.refcount[taken] = 1
        return taken

    def unowned_copy_sources(self) -> np.ndarray:
        """int32[k]: sources of pending copies that no request owns (free or evictable): a
        swap-in this step must not write them before ``copy_pages`` reads them."""
        src = self.pending_copies()[:, 0]
        return src[self.refcount[src] == 0]

    def share(self, pages: np.ndarray) -> None:
        """Adds one owner to each of int32[k] distinct owned or evictable pages (null skipped).

        An evictable page (a prefix-cache hit) leaves the eviction order.
        """
        pages = pages[pages != NULL_PAGE]
        self.refcount[pages] += 1
        self.index.revive(pages)

    def freed_by(self, pages: np.ndarray) -> int:
        """Pages that releasing int32[k] ``pages`` (repeats drop several owners) would make
        free or evictable; changes nothing."""
        pages = pages[pages != NULL_PAGE]
        if not pages.size:
            return 0
        unique, times = np.unique(pages, return_counts=True)
        return int((self.refcount[unique] == times).sum())

    def release(self, pages: np.ndarray, undo: bool = False) -> None:
        """Drops one owner of each of int32[k] distinct pages (null entries are skipped).

        Pages left unowned return to the free stack (the last of them on top, so reused first),
        or, when cached, become evictable with ``pages[-1]`` the oldest (later pages of a prefix
        are the least likely to be shared). Pending copies into them are dropped.

        ``undo``: the owner is a request that was looked up and never grown (see
        ``RequestRows.row_tentative``): as vLLM never touched its hits, cached pages keep their
        stamps and return to the LRU where those place them. Otherwise every cached page
        released is stamped now, even one that others still hold: that is when vLLM, for which
        only requests it served own pages, would have let it go.
        """
        pages = pages[pages != NULL_PAGE]
        if not pages.size:
            return
        self.refcount[pages] -= 1
        cached = self.index.cached[pages]
        dead = self.refcount[pages] == 0
        if undo:
            self.index.restore(pages[dead & cached])
        else:
            self.index.stamp(pages[cached][::-1])
            self.index.link(pages[dead & cached][::-1])
        self._push(pages[dead & ~cached])
        if self.tier.pending_in:
            self.tier.drop_in(pages[dead & ~cached])
        if dead.any() and self.pending:
            pairs = np.concatenate(self.pending)
            kept = pairs[~np.isin(pairs[:, 1], pages[dead])]
            self.pending = [kept] if kept.size else []

    def release_sources(self, src: np.ndarray) -> None:
        """Drops the owner each copy-on-write writer had of its source, int32[c] in batch order
        (a page written by several writers repeats).

        Cached sources are stamped now (see :meth:`release`); one left unowned (only a cached
        one can be) becomes evictable, and a pending copy into it stays queued: it still fills
        the page with what its key promises.
        """
        if not src.size:
            return
        np.subtract.at(self.refcount, src, 1)  # a page may lose several writers
        self.index.stamp(src[self.index.cached[src]])
        dead = np.unique(src[self.refcount[src] == 0])
        cached = self.index.cached[dead]
        self.index.link(dead[cached][np.argsort(self.index.lru[dead[cached]])])
        self._push(dead[~cached])
        if self.tier.pending_in:
            self.tier.drop_in(dead[~cached])

    def _push(self, plain: np.ndarray) -> None:
        """Pushes int32[k] distinct unowned, uncached pages onto the free stack, in order."""
        self.num_free = push_free(self.free, self.num_free, plain)

    def queue_copies(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Queues copies ``src[i] -> dst[i]``, each source resolved to its original page.

        A source that is itself the destination of a copy queued this step (a request forked
        after it grew) holds nothing yet on the device: ``copy_pages`` reads every source
        before writing any destination, so the copy must read the page that one copies from.
        Queued pairs are resolved already, so one lookup suffices.
        """
        if self.pending:
            queued = np.concatenate(self.pending)
            origin = dict(zip(queued[:, 1].tolist(), queued[:, 0].tolist(), strict=True))
            src = np.array([origin.get(page, page) for page in src.tolist()], np.int32)
        self.pending.append(np.stack([src, dst], axis=1).astype(np.int32))

    def pending_copies(self) -> np.ndarray:
        """Returns int32[K, 2]: the queued (src_page, dst_page) pairs (a copy)."""
        if not self.pending:
            return np.zeros((0, 2), np.int32)
        return np.concatenate(self.pending).astype(np.int32)

    def reset_order(self) -> None:
        """Restores a fresh pool's free stack (only when every page is free)."""
        self.free[:] = np.arange(self.num_pages - 1, 0, -1, dtype=np.int32)
        self.num_free = self.num_pages - 1
        self.pending = []

    def check(self) -> None:
        """Checks the pool's own invariants (owners against page tables: see ``_state``)."""
        n = self.num_pages
        free = self.free[: self.num_free]
        check(((free > 0) & (free < n)).all(), "free_pages: the null page or junk is free")
        check(np.unique(free).size == free.size, "free_pages: a page is free twice")
        check(not self.refcount[free].any(), "free_pages: a free page is owned")
        check(not self.index.cached[free].any(), "free_pages: a free page is cached")
        evictable = self.index.cached & (self.refcount == 0)
        check(np.array_equal(self.index.evictable, evictable), "evictable: != cached and unowned")
        used = int((self.refcount > 0).sum())
        check(self.num_free + self.index.num_evictable + used == n - 1, "free_pages: pages leaked")
        pending = self.pending_copies()
        check(
            ((pending > 0) & (pending < n)).all(),
            "pending_copies: a copy touches the null page or junk",
        )
        dst = pending[:, 1]
        check(
            np.unique(dst).size == dst.size and (self.refcount[dst] > 0).all(),
            "pending_copies: a destination is doubled or unowned",
        )
