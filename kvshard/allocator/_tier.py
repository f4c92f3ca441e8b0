"""The host tier's pages: swapped-out requests' pages, the second-level prefix cache, and the
(device page, host page) pairs a step must move.

Host page ids are ``0 .. num_host_pages - 1``; host page 0 is the host's **null page**, never
handed out (``host_table`` reads 0 for "not on the host"). Pairs are padded with ``(-1, -1)``
rows, the device side's padding (``kvshard.swap_out``): a ``(0, 0)`` row would move the null
page, and two of them write one page, which the swaps refuse (docs/tiers.md). Every usable
host page is in exactly one state:

* free (on the host free stack);
* owned by one swapped-out request (``host_tables[group, row, col]``: the page that holds
  the request's column ``col`` of that KV-cache group while it is out);
* cached: a page evicted from the device prefix cache and kept here under its key (at most
  ``capacity`` of them, in their own LRU by stamp);
* in limbo: released this step (swapped in, promoted by a prefix hit, or freed) while a pending
  pair may still read or write it. Limbo pages rejoin the free stack when the pairs are taken,
  so a page a pending swap-in reads is never the destination of another pending swap-out.

A cached host page that is the destination of a pending swap-out (demoted this step) is not
evicted before the pairs are taken, for the same reason. Finding the LRU victim is
O(num_host_pages) (a scan of stamps): host capacity is large and host evictions are far rarer
than device ones.
"""

from __future__ import annotations

import numpy as np

from kvshard.allocator._common import NULL_PAGE, check, pop_free, push_free
from kvshard.allocator._events import HOST, EventQueue
from kvshard.allocator._prefix_index import KEY_BYTES

HOST_STATS = (
    "device_hits",
    "host_hits",
    "demoted_pages",
    "host_evictions",
    "swapped_out_pages",
    "swapped_in_pages",
)


def _pairs(blocks: list[np.ndarray]) -> np.ndarray:
    if not blocks:
        return np.zeros((0, 2), np.int32)
    return np.concatenate(blocks).astype(np.int32)


class HostTier:
    """Host free stack, per-row host pages, host prefix cache and the pending swap pairs."""

    # Saved as-is by state_dict; host_tables is saved as "host_table" with the page tables.
    ARRAYS = ("row_swapped", "host_key", "host_cached", "host_lru", "host_limbo")

    def __init__(
        self,
        num_host_pages: int,
        capacity: int,
        max_requests: int,
        max_pages_per_request: int,
        events: EventQueue,
        num_groups: int = 1,
    ) -> None:
        h = self.num_host_pages = num_host_pages
        self.capacity = capacity  # host pages that may hold cached prefixes
        self.events = events
        # int32[G, max_requests, max_pages_per_request]: each group's host pages per row.
        self.host_tables = np.zeros((num_groups, max_requests, max_pages_per_request), np.int32)
        self.row_swapped = np.zeros(max_requests, bool)
        self.host_key = np.zeros((h, KEY_BYTES), np.uint8)
        self.host_cached = np.zeros(h, bool)
        self.host_lru = np.zeros(h, np.int64)  # stamp given when the page was cached here
        self.host_limbo = np.zeros(h, bool)
        self.clock = 0
        self.free = np.arange(h - 1, 0, -1, dtype=np.int32)  # stack: pops 1, 2, 3, ...
        self.num_free = max(h - 1, 0)
        self.key_to_page: dict[bytes, int] = {}
        self.pending_out: list[np.ndarray] = []  # int32[k, 2] blocks of (device, host)
        self.pending_in: list[np.ndarray] = []
        self.stats = dict.fromkeys(HOST_STATS, 0)

    # --------------------------------------------------------------- queries

    @property
    def enabled(self) -> bool:
        return self.num_host_pages > 0

    @property
    def idle(self) -> bool:
        """Nothing cached, in limbo or pending: every host page is free."""
        return self.num_free == max(self.num_host_pages - 1, 0) and not self.pending_out

    def reset_order(self) -> None:
        """Restores a fresh tier's free stack and clock (only when :attr:`idle`)."""
        self.free[:] = np.arange(self.num_host_pages - 1, 0, -1, dtype=np.int32)
        self.clock = 0
        self.host_lru[:] = 0

    def swap_out_pairs(self) -> np.ndarray:
        return _pairs(self.pending_out)

    def swap_in_pairs(self) -> np.ndarray:
        return _pairs(self.pending_in)

    def _evictable(self, filling: list[int] | None = None) -> np.ndarray:
        """bool[H]: cached host pages no pending swap-out (nor one in ``filling``) fills."""
        evictable = self.host_cached.copy()
        evictable[self.swap_out_pairs()[:, 1]] = False
        if filling:
            evictable[filling] = False
        return evictable

    @property
    def num_takeable(self) -> int:
        """Host pages a swap-out can get now: free ones, then cached ones (evicted)."""
        return self.num_free + int(self._evictable().sum()) if self.enabled else 0

    # ------------------------------------------------------------ host pages

    def _evict(self, count: int, filling: list[int] | None = None) -> np.ndarray:
        """Drops the ``count`` oldest evictable cached host pages; returns them (uncached,
        not free: the caller owns them now)."""
        candidates = np.flatnonzero(self._evictable(filling))
        victims = candidates[np.argsort(self.host_lru[candidates], kind="stable")[:count]]
        victims = victims.astype(np.int32)
        keys = [self.host_key[page].tobytes() for page in victims.tolist()]
        for key in keys:
            del self.key_to_page[key]
        self.host_key[victims] = 0
        self.host_cached[victims] = False
        self.stats["host_evictions"] += int(victims.size)
        self.events.removed(keys, HOST)
        return victims

    def take(self, count: int) -> np.ndarray:
        """Pops int32[count] host pages: the free stack first, then evicts cached ones (LRU).

        The caller checked ``count <= num_takeable``.
        """
        taken, self.num_free = pop_free(self.free, self.num_free, count)
        if count > taken.size:
            taken = np.concatenate([taken, self._evict(count - taken.size)])
        return taken

    def to_limbo(self, pages: np.ndarray) -> None:
        """Releases int32[k] host pages (owned or just uncached) until the pairs are taken."""
        self.host_limbo[pages[pages != NULL_PAGE]] = True

    # ------------------------------------------------------------- swapping

    def queue_out(self, device: np.ndarray, host: np.ndarray) -> None:
        if device.size:
            self.pending_out.append(np.stack([device, host], axis=1).astype(np.int32))

    def queue_in(self, device: np.ndarray, host: np.ndarray) -> None:
        if device.size:
            self.pending_in.append(np.stack([device, host], axis=1).astype(np.int32))

    def drop_in(self, device: np.ndarray) -> None:
        """Drops pending swap-ins into int32[k] device pages that were freed or evicted
        before the step ran (nothing reads them; their host pages stay in limbo)."""
        if not self.pending_in or not device.size:
            return
        pairs = self.swap_in_pairs()
        kept = pairs[~np.isin(pairs[:, 0], device)]
        self.pending_in = [kept] if kept.size else []

    def take_pending(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns (swap-out pairs, swap-in pairs) and clears them; limbo pages become free."""
        out, into = self.swap_out_pairs(), self.swap_in_pairs()
        self.pending_out, self.pending_in = [], []
        limbo = np.flatnonzero(self.host_limbo).astype(np.int32)
        self.host_limbo[:] = False
        self.num_free = push_free(self.free, self.num_free, limbo)
        return out, into

    # ----------------------------------------------------- host prefix cache

    def demote(self, victims: np.ndarray, keys: list[bytes], unfilled: set[int]) -> None:
        """Keeps device pages just evicted from the device prefix cache (int32[k], with their
        keys) in host pages, queueing their swap-outs; best effort, never raises.

        Skipped: pages whose data a pending copy or swap-in has not yet written (``unfilled``),
        keys the host holds already, and pages for which no host page is free within
        ``capacity`` or evictable.
        """
        if not self.capacity:
            return
        # Later victims were used more recently (the device LRU hands out its oldest first),
        # and of one released prefix its first page last: keep those first when space is short.
        kept: list[tuple[int, int, bytes]] = []
        host: list[int] = []
        for page, key in reversed(list(zip(victims.tolist(), keys, strict=True))):
            if page in unfilled or key in self.key_to_page:
                continue
            cached = int(self.host_cached.sum())
            if cached < self.capacity and self.num_free:
                slot = self.take(1)
            elif cached and self._evictable(host).any():
                slot = self._evict(1, host)
            else:
                continue
            target = int(slot[0])
            self.key_to_page[key] = target
            self.host_key[target] = np.frombuffer(key, np.uint8)
            self.host_cached[target] = True
            kept.append((page, target, key))
            host.append(target)
        kept.reverse()  # stamps and pairs in device eviction order
        for _, target, _ in kept:
            self.host_lru[target] = self.clock
            self.clock += 1
        self.events.stored([key for *_, key in kept], None, None, HOST)
        self.stats["demoted_pages"] += len(kept)
        self.queue_out(
            np.array([k[0] for k in kept], np.int32), np.array([k[1] for k in kept], np.int32)
        )

    def promote(self, host: np.ndarray, device: np.ndarray) -> None:
        """A prefix hit on cached host pages int32[k]: they leave the host cache (into limbo)
        and their swap-ins into the new device pages are queued."""
        keys = [self.host_key[page].tobytes() for page in host.tolist()]
        for key in keys:
            del self.key_to_page[key]
        self.host_key[host] = 0
        self.host_cached[host] = False
        self.to_limbo(host)
        self.events.removed(keys, HOST)
        self.queue_in(device, host)

    def clear_cache(self) -> None:
        """Drops every cached host page (no pair may be pending)."""
        cached = np.flatnonzero(self.host_cached).astype(np.int32)
        self.key_to_page = {}
        self.host_key[:] = 0
        self.host_cached[:] = False
        self.num_free = push_free(self.free, self.num_free, cached)
        self.clock = 0
        self.host_lru[:] = 0

    def rebuild(self) -> None:
        """Derives the key index from the saved arrays (after a load)."""
        cached = np.flatnonzero(self.host_cached)
        self.key_to_page = {self.host_key[page].tobytes(): int(page) for page in cached}

    # ---------------------------------------------------------------- checks

    def check(self, live: np.ndarray, row_pages: np.ndarray, page_tables: np.ndarray) -> None:
        """Checks the host tier's invariants against the rows' device pages (``page_tables``:
        int32[G, max_requests, max_pages_per_request], and ``row_pages``: int32[G,
        max_requests], every group's)."""
        h = self.num_host_pages
        idle = np.ones(self.row_swapped.size, bool)
        idle[live] = False
        check(not self.row_swapped[idle].any(), "row_swapped: a free row is swapped out")
        check(
            not self.host_tables[:, ~self.row_swapped].any(),
            "host_table: a row that is not swapped out holds host pages",
        )
        cols = np.arange(self.host_tables.shape[2])
        beyond = cols[None, None, :] >= row_pages[:, :, None]
        held = self.host_tables != NULL_PAGE
        check(not (held & beyond).any(), "host_table: a host page past the row's pages")
        check(not page_tables[held].any(), "host_table: a swapped column still holds a page")
        owned = self.host_tables[held]
        free = self.free[: self.num_free]
        for name, pages in (("host_table", owned), ("host_free", free)):
            check(((pages > 0) & (pages < h)).all(), f"{name}: the host null page or junk")
            check(np.unique(pages).size == pages.size, f"{name}: a host page is doubled")
        counts = np.zeros(max(h, 1), np.int64)
        for pages in (owned, free, np.flatnonzero(self.host_cached | self.host_limbo)):
            np.add.at(counts, pages, 1)
        check(not (self.host_cached & self.host_limbo).any(), "host_limbo: a cached page in limbo")
        check(h == 0 or (counts[1:] == 1).all(), "host_free: a host page is lost or doubled")
        check(h == 0 or counts[0] == 0, "host_cached: the host null page is used")
        check(int(self.host_cached.sum()) <= self.capacity, "host_cached: over host_prefix_pages")
        check(not self.host_key[~self.host_cached].any(), "host_key: an uncached page has a key")
        check(self.host_key[self.host_cached].any(axis=1).all(), "host_key: a cached page has none")
        check(len(self.key_to_page) == int(self.host_cached.sum()), "host_key: a key is doubled")
        stamps = self.host_lru[self.host_cached]
        check(
            np.unique(stamps).size == stamps.size and (stamps < max(self.clock, 1)).all(),
            "host_lru: stamps of cached host pages are not distinct and below the clock",
        )
        out, into = self.swap_out_pairs(), self.swap_in_pairs()
        for name, pairs in (("pending_swap_out", out), ("pending_swap_in", into)):
            check(
                (pairs[:, 1] > 0).all() and (pairs[:, 1] < h).all() and (pairs[:, 0] > 0).all(),
                f"{name}: a pair names a null page or junk",
            )
        check(np.unique(out[:, 1]).size == len(out), "pending_swap_out: a host page twice")
        check(np.unique(into[:, 0]).size == len(into), "pending_swap_in: a device page twice")
        check(not np.isin(out[:, 1], free).any(), "pending_swap_out: into a free host page")
        check(self.host_limbo[into[:, 1]].all(), "pending_swap_in: from a host page not in limbo")
