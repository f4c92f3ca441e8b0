"""Prefix-cache keys and the eviction order of cached pages nobody owns.

A cached page (one with a key) whose last owner lets go becomes *evictable*: it stays in the
cache, and is handed out again only when the free stack is empty, least recently released
first. Pages become evictable in stamp order (a clock), so the evictable pages form a FIFO of
stamps from which lookups may also take pages out (revive). That FIFO is an intrusive doubly
linked list in two numpy arrays indexed by page id (as vLLM's free block queue, without a
Python object per page): append, unlink and evicting ``k`` pages are O(1), O(1) and O(k).
The null page, never evictable, is the list's sentinel (its head and tail).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from kvshard.allocator._base import KEY_BYTES, NULL_PAGE, AllocatorBase


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


def chain_key(prev: bytes, namespace: bytes, page_tokens: bytes) -> bytes:
    """Returns the cache key of one full page: blake2b(previous key, namespace, token bytes).

    Bytes in, bytes out, so every host computes the same key (unlike ``hash()`` of a ``str``).
    """
    h = hashlib.blake2b(prev, digest_size=KEY_BYTES)
    h.update(namespace)
    h.update(page_tokens)
    return h.digest()


def token_bytes(token_ids: Sequence[int] | np.ndarray, what: str) -> tuple[bytes, int]:
    """Returns (little-endian int64 bytes of the tokens, number of tokens)."""
    tokens = np.asarray(token_ids)
    if tokens.ndim != 1:
        raise ValueError(f"{what}: token_ids must be 1-D, got shape {tokens.shape}")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{what}: token_ids must be integers, got dtype {tokens.dtype}")
    return tokens.astype("<i8", copy=False).tobytes(), int(tokens.size)


class EvictionOrder(AllocatorBase):
    """The evictable pages' FIFO and the key index: make evictable, revive, evict, uncache."""

    def _make_evictable(self, pages: np.ndarray) -> None:
        """Appends int32[k] cached, now unowned, distinct pages to the FIFO, oldest first."""
        if not pages.size:
            return
        self._lru[pages] = self._clock + np.arange(pages.size)
        self._clock += int(pages.size)
        self._evictable[pages] = True
        self._num_evictable += int(pages.size)
        # Splice tail -> pages[0] -> ... -> pages[-1] -> sentinel in two scatters.
        chain = np.concatenate([[self._lru_prev[NULL_PAGE]], pages, [NULL_PAGE]])
        self._lru_next[chain[:-1]] = chain[1:]
        self._lru_prev[chain[1:]] = chain[:-1]

    def _revive(self, pages: np.ndarray) -> None:
        """Takes int32[k] distinct pages that a lookup attaches out of the FIFO (O(k))."""
        revived = pages[self._evictable[pages]]
        if not revived.size:
            return
        nxt, prev = self._lru_next, self._lru_prev
        for page in revived.tolist():  # sequential: neighbours may be unlinked together
            after, before = int(nxt[page]), int(prev[page])
            nxt[before] = after
            prev[after] = before
        self._evictable[revived] = False
        self._num_evictable -= int(revived.size)

    def _evict(self, count: int) -> np.ndarray:
        """Drops the ``count`` least recently released cached pages from the cache.

        O(count): they are the first ``count`` entries of the FIFO. The caller checked that
        ``count <= num_evictable``.

        Returns:
            int32[count]: the pages, oldest first.
        """
        nxt = self._lru_next
        victims = np.empty(count, np.int32)
        page = NULL_PAGE
        for i in range(count):
            page = nxt.item(page)
            victims[i] = page
        head = nxt.item(page)
        nxt[NULL_PAGE] = head
        self._lru_prev[head] = NULL_PAGE
        self._uncache(victims)
        self._evictable[victims] = False
        self._num_evictable -= count
        self._stats["evictions"] += count
        return victims

    def _uncache(self, pages: np.ndarray) -> None:
        """Removes int32[k] cached pages' keys from the index (they stay owned or not)."""
        for key in self._page_key[pages]:
            del self._key_to_page[key.tobytes()]
        self._page_key[pages] = 0
        self._cached[pages] = False

    def _lru_pages(self) -> np.ndarray:
        """Returns int32[num_evictable]: the FIFO walked from its head (for checks; O(k))."""
        out = np.empty(self._num_evictable, np.int32)
        page = NULL_PAGE
        for i in range(out.size):
            page = self._lru_next.item(page)
            if page == NULL_PAGE:
                raise AssertionError("lru: the eviction list is shorter than the evictable count")
            out[i] = page
        return out

    def _rebuild_lru(self) -> None:
        """Rebuilds the FIFO from ``_evictable`` and the stamps (after a state is loaded)."""
        self._lru_next[:] = NULL_PAGE
        self._lru_prev[:] = NULL_PAGE
        pages = np.flatnonzero(self._evictable).astype(np.int32)
        order = pages[np.argsort(self._lru[pages], kind="stable")]
        chain = np.concatenate([[NULL_PAGE], order, [NULL_PAGE]]).astype(np.int32)
        self._lru_next[chain[:-1]] = chain[1:]
        self._lru_prev[chain[1:]] = chain[:-1]
