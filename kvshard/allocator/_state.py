"""Snapshots and checks: ``state_dict``, ``load_state_dict``, ``checksum``, ``check_invariants``.

``load_state_dict`` builds the loaded state in a scratch allocator, runs every check of
``check_invariants`` on it (plus the range and type checks that let those run on junk), and
only then swaps it in, so a corrupt snapshot is refused with the field named and the target
keeps its state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from typing import Any

import numpy as np

from kvshard.allocator._base import NULL_PAGE, STATE_VERSION, check
from kvshard.allocator._prefix import PrefixCache

_ARRAYS = (
    "refcount",
    "page_table",
    "row_pages",
    "row_tokens",
    "row_released",
    "page_key",
    "cached",
    "evictable",
    "lru",
    "row_committed",
    "row_last_key",
    "row_ns",
    "row_has_ns",
)
_STATS = ("lookups", "queries", "hits", "evictions")
_ENTRIES = (
    "version",
    "config",
    "free_pages",
    "free_rows",
    "rows",
    "clock",
    "prefix_stats",
    "pending_copies",
    *_ARRAYS,
)


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _int_array(value: Any, name: str, ndim: int, low: int, high: int) -> np.ndarray:
    """Returns ``value`` as int64 after checking it is an integer array of ``ndim`` dims in
    ``[low, high)``; raises ValueError naming ``name`` otherwise."""
    array = np.asarray(value)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"load_state_dict: {name} must be integers, got dtype {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"load_state_dict: {name} must be {ndim}-D, got shape {array.shape}")
    if array.size and (array.min() < low or array.max() >= high):
        raise ValueError(
            f"load_state_dict: {name} holds {int(array.min())}..{int(array.max())}, "
            f"outside [{low}, {high})"
        )
    return array.astype(np.int64)


class AllocatorState(PrefixCache):
    """Snapshots, restore with validation, digest and invariant checks."""

    def _config(self) -> dict[str, Any]:
        return {
            "num_pages": self.num_pages,
            "page_size": self.page_size,
            "max_requests": self.max_requests,
            "max_pages_per_request": self.max_pages_per_request,
            "enable_prefix_caching": self.enable_prefix_caching,
            "sliding_window": self.sliding_window,
        }

    def state_dict(self) -> dict[str, Any]:
        """Returns a deep copy of the state: numpy arrays, ints and plain dicts/lists.

        Only the live part of the stacks is kept, so equal states give equal dicts. Includes
        the :attr:`prefix_stats` counters and the pending copy-on-write copies. Never raises.

        Returns:
            A dict for :meth:`load_state_dict`: ``"version"`` (2), ``"config"``,
            ``"free_pages"`` (int32[num_free]), ``"free_rows"`` (int32[num_free_rows]),
            ``"rows"`` (request id -> row), ``"clock"``, ``"prefix_stats"``,
            ``"pending_copies"`` (int32[K, 2]) and the per-page and per-row arrays, e.g.
            ``"refcount"`` (int32[num_pages]), ``"page_table"``
            (int32[max_requests, max_pages_per_request]) and ``"row_released"``
            (int32[max_requests], columns released by the sliding window).
        """
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "config": self._config(),
            "free_pages": self._free_pages[: self._num_free].copy(),
            "free_rows": self._free_rows[: self._num_free_rows].copy(),
            "rows": dict(self._rows),
            "clock": self._clock,
            "prefix_stats": dict(self._stats),
            "pending_copies": (
                np.concatenate(self._pending).astype(np.int32)
                if self._pending
                else np.zeros((0, 2), np.int32)
            ),
        }
        for name in _ARRAYS:
            state[name] = getattr(self, "_" + name).copy()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a :meth:`state_dict` (same configuration); validated before anything moves.

        The whole state is checked first, everything :meth:`check_invariants` checks included
        (page and row ids in range, no duplicates, each row owned once, reference counts equal
        to owners, the prefix index consistent with the page keys), then swapped in. The
        arrays are copied in; :attr:`page_table` views taken before the call go stale.

        Args:
            state: a dict returned by :meth:`state_dict` of an allocator with the same
                constructor arguments.

        Raises:
            TypeError: ``state`` is not a dict.
            ValueError: an entry is missing, the version or config differs, or an entry is
                malformed or inconsistent; the message names it. Nothing changes then.
        """
        where = "load_state_dict"
        if not isinstance(state, dict):
            raise TypeError(f"{where}: state must be a dict, got {type(state).__name__}")
        missing = [name for name in _ENTRIES if name not in state]
        if missing:
            raise ValueError(f"{where}: state lacks {', '.join(map(repr, missing))}")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"{where}: unsupported version {state['version']!r}")
        if state["config"] != self._config():
            raise ValueError(
                f"{where}: config {state['config']!r} does not match {self._config()!r}"
            )
        new = object.__new__(type(self))
        new.__dict__.update({k: getattr(self, k) for k in self._config()})
        new._init_state()
        for name in _ARRAYS:
            mine = getattr(new, "_" + name)
            value = np.asarray(state[name])
            if value.shape != mine.shape:
                raise ValueError(f"{where}: {name} has shape {value.shape}, want {mine.shape}")
            if mine.dtype != bool and value.size and not np.issubdtype(value.dtype, np.integer):
                raise ValueError(f"{where}: {name} must be integers, got dtype {value.dtype}")
            cast = value.astype(mine.dtype)
            if not np.array_equal(cast, value):
                raise ValueError(f"{where}: {name} does not fit {mine.dtype}")
            setattr(new, "_" + name, cast)
        n, r = self.num_pages, self.max_requests
        free_pages = _int_array(state["free_pages"], "free_pages", 1, 1, n)
        free_rows = _int_array(state["free_rows"], "free_rows", 1, 0, r)
        pending = _int_array(state["pending_copies"], "pending_copies", 2, 1, n)
        if pending.shape[1:] != (2,):
            raise ValueError(f"{where}: pending_copies has shape {pending.shape}, want (K, 2)")
        rows = state["rows"]
        if not isinstance(rows, dict):
            raise ValueError(f"{where}: rows must be a dict, got {type(rows).__name__}")
        for req_id, row in rows.items():
            if not isinstance(req_id, Hashable) or not _is_int(row) or not 0 <= row < r:
                raise ValueError(f"{where}: rows maps {req_id!r} to {row!r}, not a row < {r}")
        if free_pages.size + free_rows.size > n - 1 + r:
            raise ValueError(f"{where}: free_pages/free_rows are too long")
        clock = state["clock"]
        if not _is_int(clock) or clock < 0:
            raise ValueError(f"{where}: clock={clock!r} must be an int >= 0")
        stats = state["prefix_stats"]
        if (
            not isinstance(stats, dict)
            or sorted(stats) != sorted(_STATS)
            or not all(_is_int(v) and v >= 0 for v in stats.values())
        ):
            raise ValueError(f"{where}: prefix_stats={stats!r} must map {_STATS} to ints >= 0")
        new._free_pages[: free_pages.size] = free_pages
        new._num_free = int(free_pages.size)
        new._free_rows[: free_rows.size] = free_rows
        new._num_free_rows = int(free_rows.size)
        new._rows = {k: int(v) for k, v in rows.items()}
        new._clock = int(clock)
        new._stats = {k: int(stats[k]) for k in _STATS}
        new._pending = [pending.astype(np.int32)] if pending.size else []
        new._key_to_page = {
            new._page_key[page].tobytes(): int(page) for page in np.flatnonzero(new._cached)
        }
        new._num_evictable = int(new._evictable.sum())
        new._rebuild_lru()
        try:
            new.check_invariants()
        except AssertionError as err:
            raise ValueError(f"{where}: inconsistent state: {err}") from None

        # ---- commit
        self.__dict__.update(new.__dict__)

    def checksum(self) -> str:
        """Returns a hex blake2b digest of the whole state; equal states give equal digests.

        Deterministic across processes and hosts (request ids enter through ``repr``). The
        digest covers everything :meth:`state_dict` returns, including the cumulative
        :attr:`prefix_stats` counters, which :meth:`free` never resets. With prefix caching off
        those counters stay 0, so freeing every request restores the digest of a fresh
        allocator with the same arguments; with it on, the same holds once nothing is cached,
        up to the counters.

        Returns:
            32 lowercase hex characters (a 128-bit digest). Never raises.
        """
        state = self.state_dict()
        h = hashlib.blake2b(digest_size=16)
        h.update(repr(sorted(state["config"].items())).encode())
        h.update(repr((state["clock"], sorted(state["prefix_stats"].items()))).encode())
        h.update(repr(sorted((repr(k), v) for k, v in state["rows"].items())).encode())
        for name in ("free_pages", "free_rows", "pending_copies", *_ARRAYS):
            array = np.ascontiguousarray(state[name])
            h.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
            h.update(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
        return h.hexdigest()

    def check_invariants(self) -> None:
        """Checks every internal invariant (O(num_pages · max_pages_per_request); for tests).

        Raises:
            AssertionError: naming the first broken invariant and its field (raised
                explicitly, so also under ``python -O``).
        """
        size, n, r = self.page_size, self.num_pages, self.max_requests
        live_rows = np.array(sorted(self._rows.values()), np.int64)
        check(len(set(self._rows.values())) == len(self._rows), "rows: two requests share a row")
        free_rows = self._free_rows[: self._num_free_rows]
        every_row = np.sort(np.concatenate([live_rows, free_rows]))
        check(np.array_equal(every_row, np.arange(r)), "free_rows: a row is lost or doubled")
        idle = np.ones(r, bool)
        idle[live_rows] = False
        check(
            not (self._row_tokens[idle].any() or self._row_committed[idle].any())
            and not (self._row_has_ns[idle].any() or self._row_ns[idle].any())
            and not (self._row_last_key[idle].any() or self._row_released[idle].any()),
            "row_tokens: a free row is not reset",
        )
        tokens = self._row_tokens
        check(
            (tokens >= 0).all() and (tokens <= self.max_pages_per_request * size).all(),
            "row_tokens: out of [0, max_pages_per_request * page_size]",
        )
        check(
            np.array_equal(self._row_pages, (tokens + size - 1) // size),
            "row_pages: != ceil(tokens / page_size)",
        )
        released = self._row_released.astype(np.int64)
        if self.sliding_window is None:
            check(not released.any(), "row_released: pages released without a sliding window")
        else:
            horizon = np.maximum(tokens - self.sliding_window + 1, 0)
            check(
                (released >= 0).all() and (released * size <= horizon).all(),
                "row_released: releases pages the window still reads",
            )
        committed = self._row_committed.astype(np.int64)
        check(
            (committed >= 0).all() and (committed * size <= tokens).all(),
            "row_committed: more pages than full pages held",
        )
        cols = np.arange(self.max_pages_per_request)
        used_mask = (cols[None, :] < self._row_pages[:, None]) & (
            cols[None, :] >= released[:, None]
        )
        check(not self._page_table[~used_mask].any(), "page_table: unused entry is not null")
        owned = self._page_table[used_mask]
        check(((owned > 0) & (owned < n)).all(), "page_table: a request owns the null page or junk")
        for row in live_rows:
            held = self._page_table[row, released[row] : self._row_pages[row]]
            check(np.unique(held).size == held.size, f"page_table: row {row} holds a page twice")
        counts = np.bincount(owned, minlength=n)
        check(np.array_equal(counts, self._refcount), "refcount: != number of owners")
        free = self._free_pages[: self._num_free]
        check(((free > 0) & (free < n)).all(), "free_pages: the null page or junk is free")
        check(np.unique(free).size == free.size, "free_pages: a page is free twice")
        check(not self._refcount[free].any(), "free_pages: a free page is owned")
        check(not self._cached[free].any(), "free_pages: a free page is cached")
        evictable = self._cached & (self._refcount == 0)
        check(np.array_equal(self._evictable, evictable), "evictable: != cached and unowned")
        check(self._num_evictable == int(self._evictable.sum()), "evictable: count is stale")
        check(not self._cached[NULL_PAGE], "cached: the null page is cached")
        check(self.enable_prefix_caching or not self._cached.any(), "cached: caching is disabled")
        check(not self._page_key[~self._cached].any(), "page_key: an uncached page has a key")
        # An all-zero digest has probability 2**-128: it marks a cached page with no key.
        check(self._page_key[self._cached].any(axis=1).all(), "page_key: a cached page has none")
        used = int((self._refcount > 0).sum())
        check(self._num_free + self._num_evictable + used == n - 1, "free_pages: pages leaked")
        check(len(self._key_to_page) == int(self._cached.sum()), "page_key: a key is doubled")
        for key, page in self._key_to_page.items():
            check(
                self._cached[page] and self._page_key[page].tobytes() == key,
                f"page_key: the index points at page {page} which holds another key",
            )
        stamps = self._lru[self._evictable]
        check(
            np.unique(stamps).size == stamps.size and (stamps < self._clock).all(),
            "lru: stamps of evictable pages are not distinct and below the clock",
        )
        order = self._lru_pages()
        check(
            np.array_equal(self._lru[order], np.sort(stamps)) and self._evictable[order].all(),
            "lru: the eviction list is out of stamp order",
        )
        pending = self.state_dict()["pending_copies"]
        check(
            ((pending > 0) & (pending < n)).all(),
            "pending_copies: a copy touches the null page or junk",
        )
        dst = pending[:, 1]
        check(
            np.unique(dst).size == dst.size and (self._refcount[dst] > 0).all(),
            "pending_copies: a destination is doubled or unowned",
        )
