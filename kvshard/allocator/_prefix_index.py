"""The prefix index: which page holds which cached prefix, and the eviction order of those
nobody owns.

A full page's key chains the previous page's key, a namespace digest and the page's token bytes
(:func:`chain_key`), so a key names a whole prefix. A cached page (one with a key) whose last
owner lets go becomes *evictable*: it stays in the index and is handed out again only when the
pool's free stack is empty, least recently released first (LRU). Pages become evictable in stamp
order (a clock), so the evictable pages form a FIFO of stamps from which lookups may take pages
back (revive). That FIFO is an intrusive doubly linked list in two numpy arrays indexed by page
id (as vLLM's free block queue, without a Python object per page): append, unlink and evicting
``k`` pages cost O(k). The null page, never evictable, is the list's sentinel (head and tail).

With several KV-cache groups each group caches its own page of a block: ``page_group`` says
whose a cached page is, and the index maps :func:`index_key` (the block's key and the group)
to the page, so one block has one page per group that cached it.

The index knows nothing of reference counts: :class:`kvshard.allocator._pool.PagePool` tells
it when a cached page is released (:meth:`PrefixIndex.stamp`), loses its last owner
(:meth:`PrefixIndex.link`, or :meth:`PrefixIndex.restore` for an undone lookup) or gains one
back (:meth:`PrefixIndex.revive`), and asks it for victims (:meth:`PrefixIndex.evict`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np

from kvshard.allocator._common import NULL_PAGE, check
from kvshard.allocator._events import EventQueue

KEY_BYTES = 16  # blake2b digest size of a prefix-cache key (128 bits: collisions are moot)
ROOT_KEY = bytes(KEY_BYTES)  # the "previous key" of a request's first page
STATS = ("lookups", "queries", "hits", "evictions")


def index_key(key: bytes, group: int) -> bytes:
    """The key -> page index's key of group ``group``'s page of the block keyed ``key``
    (``key`` itself for group 0, so one group indexes exactly as before groups existed)."""
    # Signed: the same bytes as unsigned for every real group (0 <= group < 2**31), and a
    # negative one read from a mutated state dict encodes instead of raising OverflowError,
    # so load_state_dict's invariant check refuses it by name.
    return key if group == 0 else key + group.to_bytes(4, "little", signed=True)


def namespace_digest(namespace: str | bytes | None) -> bytes:
    """Returns bytes[16]: a digest of a prefix-cache namespace (None, str and bytes differ)."""
    if namespace is None:
        raw = b"\x00"
    elif isinstance(namespace, str):
        raw = b"\x01" + namespace.encode("utf-8")
    elif isinstance(namespace, bytes):
        raw = b"\x02" + namespace
    else:
        raise TypeError(f"namespace must be str, bytes or None, got {type(namespace).__name__}")
    return hashlib.blake2b(raw, digest_size=KEY_BYTES).digest()


def chain_key(prev: bytes, namespace: bytes, page_tokens: bytes, extra: bytes = b"") -> bytes:
    """Returns the cache key of one full page: blake2b(previous key, namespace, token bytes,
    extra key).

    Bytes in, bytes out, so every host computes the same key (unlike ``hash()`` of a ``str``).
    A page without an extra key hashes exactly as before extra keys existed; an extra key is
    length-prefixed after a marker, so no token bytes can imitate it (token bytes are a
    multiple of 8 long, the marked suffix is not).
    """
    h = hashlib.blake2b(prev, digest_size=KEY_BYTES)
    h.update(namespace)
    h.update(page_tokens)
    if extra:
        h.update(b"\xff" + len(extra).to_bytes(8, "little") + extra)
    return h.digest()


def extra_key_bytes(extra_keys: object, what: str) -> list[bytes]:
    """Returns one byte string per page (b"": none) for ``extra_keys``.

    ``extra_keys``: None, or a sequence whose item ``i`` applies to page ``i`` of the request
    (pages past its end have none): None, int, str, bytes, or a tuple of those (e.g. a LoRA id
    and a multimodal placeholder hash), each encoded with its type so ``1``, ``"1"`` and
    ``b"1"`` differ.
    """
    if extra_keys is None:
        return []
    if isinstance(extra_keys, str | bytes) or not hasattr(extra_keys, "__len__"):
        raise TypeError(
            f"{what}: extra_keys must be None or a sequence of per-page keys, got "
            f"{type(extra_keys).__name__}"
        )
    items: Sequence[object] = extra_keys  # type: ignore[assignment]
    return [_encode_extra(item, what, i) for i, item in enumerate(items)]


def _encode_extra(item: object, what: str, page: int) -> bytes:
    if item is None:
        return b""
    if isinstance(item, tuple):
        parts = [_encode_extra(part, what, page) for part in item]
        body = b"".join(len(p).to_bytes(8, "little") + p for p in parts)
        return b"t" + body
    if isinstance(item, bool) or not isinstance(item, int | str | bytes):
        raise TypeError(
            f"{what}: extra_keys[{page}]={item!r} must be None, int, str, bytes or a tuple of them"
        )
    if isinstance(item, int):
        return b"i" + str(item).encode()
    if isinstance(item, str):
        return b"s" + item.encode("utf-8")
    return b"b" + item


def token_bytes(token_ids: Sequence[int] | np.ndarray, what: str) -> tuple[bytes, int]:
    """Returns (little-endian int64 bytes of the tokens, number of tokens)."""
    tokens = np.asarray(token_ids)
    if tokens.ndim != 1:
        raise ValueError(f"{what}: token_ids must be 1-D, got shape {tokens.shape}")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{what}: token_ids must be integers, got dtype {tokens.dtype}")
    return tokens.astype("<i8", copy=False).tobytes(), int(tokens.size)


class PrefixIndex:
    """Page keys, the key -> page index, the evictable pages' LRU order and the hit counters."""

    ARRAYS = ("page_key", "cached", "evictable", "lru", "page_group")  # saved by state_dict

    def __init__(self, num_pages: int, page_size: int, events: EventQueue) -> None:
        self.page_size = page_size
        self.events = events
        n = num_pages
        self.page_key = np.zeros((n, KEY_BYTES), np.uint8)  # uint8[num_pages, 16]
        self.cached = np.zeros(n, bool)  # has a key
        self.evictable = np.zeros(n, bool)  # cached and unowned: in the LRU list
        self.num_evictable = 0
        self.lru = np.zeros(n, np.int64)  # stamp given when the page became evictable
        self.page_group = np.zeros(n, np.int32)  # int32[num_pages]: group of a cached page
        self.lru_next = np.zeros(n, np.int32)  # int32[num_pages]: next newer evictable page
        self.lru_prev = np.zeros(n, np.int32)  # int32[num_pages]: next older evictable page
        self.clock = 0
        self.key_to_page: dict[bytes, int] = {}  # bytes keys are not tracked by the GC
        self.stats = dict.fromkeys(STATS, 0)

    # ------------------------------------------------------------------ keys

    def page_keys(
        self,
        data: bytes,
        prev: bytes,
        namespace: bytes,
        first: int,
        stop: int,
        extras: Sequence[bytes] = (),
    ) -> Iterator[bytes]:
        """Yields the chained keys of full pages ``first .. stop - 1`` of token bytes ``data``
        (``extras[i]``: page ``i``'s extra key, see :func:`extra_key_bytes`)."""
        step = self.page_size * 8
        for page in range(first, stop):
            extra = extras[page] if page < len(extras) else b""
            prev = chain_key(prev, namespace, data[page * step : (page + 1) * step], extra)
            yield prev

    def register(self, fresh: list[tuple[bytes, int]], group: int = 0) -> None:
        """Caches each (key, page) as group ``group``'s page of the block keyed ``key``:
        neither it nor the page may be cached already."""
        for key, page in fresh:
            self.key_to_page[index_key(key, group)] = page
            self.page_key[page] = np.frombuffer(key, np.uint8)
            self.cached[page] = True
            self.page_group[page] = group

    def find(self, key: bytes, group: int = 0) -> int | None:
        """Group ``group``'s cached page of the block keyed ``key``, or None."""
        return self.key_to_page.get(index_key(key, group))

    def _uncache(self, pages: np.ndarray) -> None:
        for key, group in zip(self.page_key[pages], self.page_group[pages].tolist(), strict=True):
            del self.key_to_page[index_key(key.tobytes(), group)]
        self.page_key[pages] = 0
        self.cached[pages] = False
        self.page_group[pages] = 0

    # -------------------------------------------------------- eviction order

    def stamp(self, pages: np.ndarray) -> None:
        """Gives int32[k] cached pages fresh, increasing stamps (a repeated page keeps its
        last): the time each was last released by a request that was served."""
        if not pages.size:
            return
        self.lru[pages] = self.clock + np.arange(pages.size)
        self.clock += int(pages.size)

    def link(self, pages: np.ndarray) -> None:
        """Appends int32[k] cached, unowned, distinct pages, stamped in increasing order after
        every evictable page, to the LRU's tail."""
        if not pages.size:
            return
        self.evictable[pages] = True
        self.num_evictable += int(pages.size)
        # Splice tail -> pages[0] -> ... -> pages[-1] -> sentinel in two scatters.
        chain = np.concatenate([[self.lru_prev[NULL_PAGE]], pages, [NULL_PAGE]])
        self.lru_next[chain[:-1]] = chain[1:]
        self.lru_prev[chain[1:]] = chain[:-1]

    def restore(self, pages: np.ndarray) -> None:
        """Puts int32[k] cached, now unowned, distinct pages back into the LRU at the place of
        their stamps (an undone lookup: vLLM never took them out). O(num_pages)."""
        if not pages.size:
            return
        self.evictable[pages] = True
        self.num_evictable += int(pages.size)
        self._relink()

    def revive(self, pages: np.ndarray) -> None:
        """Takes those of int32[k] distinct pages that are evictable out of the LRU (O(k))."""
        revived = pages[self.evictable[pages]]
        if not revived.size:
            return
        nxt, prev = self.lru_next, self.lru_prev
        for page in revived.tolist():  # sequential: neighbours may be unlinked together
            after, before = int(nxt[page]), int(prev[page])
            nxt[before] = after
            prev[after] = before
        self.evictable[revived] = False
        self.num_evictable -= int(revived.size)

    def evict(self, count: int) -> tuple[np.ndarray, list[bytes]]:
        """Drops the ``count`` least recently released pages from the index; returns them and
        the keys they held (for the host tier).

        O(count): they are the first ``count`` entries of the LRU. The caller checked that
        ``count <= num_evictable``.
        """
        nxt = self.lru_next
        victims = np.empty(count, np.int32)
        page = NULL_PAGE
        for i in range(count):
            page = nxt.item(page)
            victims[i] = page
        head = nxt.item(page)
        nxt[NULL_PAGE] = head
        self.lru_prev[head] = NULL_PAGE
        keys = [key.tobytes() for key in self.page_key[victims]]
        groups = self.page_group[victims].tolist()
        self._uncache(victims)
        self.evictable[victims] = False
        self.num_evictable -= count
        self.stats["evictions"] += count
        for group in sorted(set(groups)):  # one event per group, victims in eviction order
            mine = [key for key, g in zip(keys, groups, strict=True) if g == group]
            self.events.removed(mine, group=group)
        return victims, keys

    def order(self) -> np.ndarray:
        """Returns int32[num_evictable]: the LRU walked from its head (for checks; O(k))."""
        out = np.empty(self.num_evictable, np.int32)
        page = NULL_PAGE
        for i in range(out.size):
            page = self.lru_next.item(page)
            if page == NULL_PAGE:
                raise AssertionError("lru: the eviction list is shorter than the evictable count")
            out[i] = page
        return out

    def rebuild(self) -> None:
        """Derives the key index, the count and the LRU links from the saved arrays."""
        cached = np.flatnonzero(self.cached)
        self.key_to_page = {
            index_key(self.page_key[page].tobytes(), int(self.page_group[page])): int(page)
            for page in cached
        }
        self.num_evictable = int(self.evictable.sum())
        self._relink()

    def _relink(self) -> None:
        """Links every evictable page in stamp order."""
        self.lru_next[:] = NULL_PAGE
        self.lru_prev[:] = NULL_PAGE
        pages = np.flatnonzero(self.evictable).astype(np.int32)
        order = pages[np.argsort(self.lru[pages], kind="stable")]
        chain = np.concatenate([[NULL_PAGE], order, [NULL_PAGE]]).astype(np.int32)
        self.lru_next[chain[:-1]] = chain[1:]
        self.lru_prev[chain[1:]] = chain[:-1]

    def clear_evictable(self) -> np.ndarray:
        """Uncaches every evictable page (``reset_prefix_cache``); returns them, int32[k] in
        eviction order, for the free stack."""
        pages = self.order()
        self._uncache(pages)
        self.evictable[pages] = False
        self.num_evictable = 0
        self.lru_next[:] = NULL_PAGE
        self.lru_prev[:] = NULL_PAGE
        return pages

    def reset_order(self) -> None:
        """Resets stamps and clock to a fresh index's (only when nothing is cached)."""
        self.lru[:] = 0
        self.lru_next[:] = NULL_PAGE
        self.lru_prev[:] = NULL_PAGE
        self.clock = 0

    def check(self, enabled: bool) -> None:
        """Checks the index's own invariants (with the pool's owners see ``_state``)."""
        check(not self.cached[NULL_PAGE], "cached: the null page is cached")
        check(enabled or not self.cached.any(), "cached: caching is disabled")
        check(not (self.evictable & ~self.cached).any(), "evictable: an uncached page")
        check(self.num_evictable == int(self.evictable.sum()), "evictable: count is stale")
        check(not self.page_key[~self.cached].any(), "page_key: an uncached page has a key")
        check(not self.page_group[~self.cached].any(), "page_group: an uncached page has one")
        check((self.page_group >= 0).all(), "page_group: a negative group")
        # An all-zero digest has probability 2**-128: it marks a cached page with no key.
        check(self.page_key[self.cached].any(axis=1).all(), "page_key: a cached page has none")
        check(len(self.key_to_page) == int(self.cached.sum()), "page_key: a key is doubled")
        for key, page in self.key_to_page.items():
            group = int(self.page_group[page])
            check(
                self.cached[page] and index_key(self.page_key[page].tobytes(), group) == key,
                f"page_key: the index points at page {page} which holds another key",
            )
        stamps = self.lru[self.evictable]
        check(
            np.unique(stamps).size == stamps.size and (stamps < self.clock).all(),
            "lru: stamps of evictable pages are not distinct and below the clock",
        )
        order = self.order()
        check(
            np.array_equal(self.lru[order], np.sort(stamps)) and self.evictable[order].all(),
            "lru: the eviction list is out of stamp order",
        )
