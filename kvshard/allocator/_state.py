"""The allocator's parts as one value: build, snapshot, validate and restore, digest, check.

:class:`AllocatorParts` holds the parts of a :class:`kvshard.PageAllocator` (prefix index,
page pool, request rows, one page table per KV-cache group, host tier). The groups' tables are
views into stacked arrays (``int32[G, max_requests, max_pages_per_request]`` and so on), which
the allocator shows as its grouped ``page_table`` and a state dict saves (without the group axis
when there is one group, the ungrouped form). ``load`` builds the loaded state in fresh
parts, runs every invariant check on them (plus the range and type checks that let those run
on junk) and only then returns them, so a corrupt snapshot is refused with the field named
while the caller keeps its parts.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Hashable
from typing import Any

import numpy as np

from kvshard._geometry.layer_types import is_state
from kvshard.allocator._common import MAX_CLOCK, check, is_int, push_free
from kvshard.allocator._config import AllocatorConfig
from kvshard.allocator._events import DEVICE, HOST, EventQueue
from kvshard.allocator._pool import PagePool
from kvshard.allocator._prefix_index import STATS, PrefixIndex
from kvshard.allocator._rows import RequestRows
from kvshard.allocator._state_table import StateTable
from kvshard.allocator._table import PageTable
from kvshard.allocator._tier import HOST_STATS, HostTier

# 2: sliding_window in the config, row_released; 3: row_tentative; 4: the host tier;
# 5: layer_types in the config, page_group, a group axis on the tables' arrays with G > 1.
STATE_VERSION = 5
_LOADABLE = (4, 5)  # a version 4 state is one group's: layer_types None, no cached group
_ENTRIES = (
    "version",
    "config",
    "free_pages",
    "free_rows",
    "rows",
    "clock",
    "prefix_stats",
    "pending_copies",
    "host_free",
    "host_clock",
    "host_stats",
    "pending_swap_out",
    "pending_swap_in",
)


@dataclasses.dataclass
class AllocatorParts:
    """The parts of one allocator; ``table`` draws from ``pool``, which evicts from ``index``."""

    config: AllocatorConfig
    index: PrefixIndex
    pool: PagePool
    rows: RequestRows
    tables: list[PageTable]
    tier: HostTier
    events: EventQueue
    # state name -> every group's array stacked (the tables' arrays, the host tier's table)
    stacks: dict[str, np.ndarray]

    @property
    def table(self) -> PageTable:
        """The first group's table (the only one without layer types)."""
        return self.tables[0]

    @property
    def num_groups(self) -> int:
        return len(self.tables)

    @classmethod
    def fresh(cls, config: AllocatorConfig) -> AllocatorParts:
        events = EventQueue(config.enable_kv_events, config.page_size)
        index = PrefixIndex(config.num_pages, config.page_size, events)
        tier = HostTier(
            config.num_host_pages,
            config.host_prefix_pages,
            config.max_requests,
            config.max_pages_per_request,
            events,
            len(config.group_types),
        )
        pool = PagePool(config.num_pages, index, tier)
        rows = RequestRows(config.max_requests)
        types = config.group_types
        g, r, m = len(types), config.max_requests, config.max_pages_per_request
        stacks = {
            "page_table": np.zeros((g, r, m), np.int32),
            "row_pages": np.zeros((g, r), np.int32),
            "row_released": np.zeros((g, r), np.int32),
            "host_table": tier.host_tables,
        }
        tables = [
            (StateTable if is_state(layer_type) else PageTable)(
                pool,
                r,
                m,
                config.page_size,
                layer_type,
                (stacks["page_table"][i], stacks["row_pages"][i], stacks["row_released"][i]),
            )
            for i, layer_type in enumerate(types)
        ]
        for table, size in zip(tables, config.page_sizes, strict=True):
            table.page_size = size  # a group's tokens per page
        return cls(config, index, pool, rows, tables, tier, events, stacks)

    def _arrays(self) -> dict[str, tuple[Any, str]]:
        """State name -> (part, attribute) of every array saved as-is (tables: see
        :meth:`_table_arrays`)."""
        return {
            name: (part, name)
            for part in (self.pool, self.rows, self.index, self.tier)
            for name in part.ARRAYS
        }

    def _table_arrays(self) -> dict[str, np.ndarray]:
        """State name -> the groups' stacked array, without the group axis for one group."""
        one = self.num_groups == 1
        return {name: stack[0] if one else stack for name, stack in self.stacks.items()}

    def reset_order_if_empty(self) -> None:
        """With no request live and nothing cached or pending in either tier, restores a fresh
        allocator's stacks, stamps and clock (reordering only, in place, so page-table views
        stay valid)."""
        if not self.rows.rows and self.index.num_evictable == 0 and self.tier.idle:
            self.pool.reset_order()
            self.rows.reset_order()
            self.index.reset_order()
            self.tier.reset_order()

    # ------------------------------------------------------------ snapshots

    def state_dict(self) -> dict[str, Any]:
        """See :meth:`kvshard.PageAllocator.state_dict`."""
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "config": self.config.as_dict(),
            "free_pages": self.pool.free[: self.pool.num_free].copy(),
            "free_rows": self.rows.free_rows[: self.rows.num_free_rows].copy(),
            "rows": dict(self.rows.rows),
            "clock": self.index.clock,
            "prefix_stats": dict(self.index.stats),
            "pending_copies": self.pool.pending_copies(),
            "host_free": self.tier.free[: self.tier.num_free].copy(),
            "host_clock": self.tier.clock,
            "host_stats": dict(self.tier.stats),
            "pending_swap_out": self.tier.swap_out_pairs(),
            "pending_swap_in": self.tier.swap_in_pairs(),
        }
        for name, (part, attr) in self._arrays().items():
            state[name] = getattr(part, attr).copy()
        for name, array in self._table_arrays().items():
            state[name] = array.copy()
        return state

    def load(self, state: Any) -> AllocatorParts:
        """Returns new parts holding ``state``; raises before returning if anything is off."""
        where = "load_state_dict"
        if not isinstance(state, dict):
            raise TypeError(f"{where}: state must be a dict, got {type(state).__name__}")
        if "version" not in state:
            raise ValueError(f"{where}: state lacks 'version'")
        version = state["version"]
        if not is_int(version) or version not in _LOADABLE:
            raise ValueError(f"{where}: unsupported version {version!r}")
        if version == 4:  # before groups: one group, no page_group
            state = {**state, "page_group": np.zeros(self.config.num_pages, np.int32)}
            if isinstance(state.get("config"), dict):
                state["config"] = {**state["config"], "layer_types": None}
        expected = (*_ENTRIES, *self._arrays(), *self._table_arrays())
        missing = [name for name in expected if name not in state]
        if missing:
            raise ValueError(f"{where}: state lacks {', '.join(map(repr, missing))}")
        config = state["config"]
        if isinstance(config, dict) and "group_page_sizes" not in config:
            config = {**config, "group_page_sizes": None}  # saved before per-group sizes
        if not isinstance(config, dict) or config != self.config.as_dict():
            raise ValueError(f"{where}: config {config!r} does not match {self.config.as_dict()!r}")
        new = AllocatorParts.fresh(self.config)
        for name, (part, attr) in new._arrays().items():
            setattr(part, attr, _same_shape(state[name], getattr(part, attr), name))
        for name, mine in new._table_arrays().items():
            mine[...] = _same_shape(state[name], mine, name)  # in place: the tables' views
        n, r = self.config.num_pages, self.config.max_requests
        free_pages = _int_array(state["free_pages"], "free_pages", 1, 1, n)
        free_rows = _int_array(state["free_rows"], "free_rows", 1, 0, r)
        pending = _int_array(state["pending_copies"], "pending_copies", 2, 1, n)
        if pending.shape[1:] != (2,):
            raise ValueError(f"{where}: pending_copies has shape {pending.shape}, want (K, 2)")
        rows = state["rows"]
        if not isinstance(rows, dict):
            raise ValueError(f"{where}: rows must be a dict, got {type(rows).__name__}")
        for req_id, row in rows.items():
            if not isinstance(req_id, Hashable) or not is_int(row) or not 0 <= row < r:
                raise ValueError(f"{where}: rows maps {req_id!r} to {row!r}, not a row < {r}")
        if free_pages.size > n - 1 or free_rows.size > r:
            raise ValueError(f"{where}: free_pages/free_rows are too long")
        clock, stats = _clock_and_stats(state, "clock", "prefix_stats", STATS)
        new.pool.free[: free_pages.size] = free_pages
        new.pool.num_free = int(free_pages.size)
        new.pool.pending = [pending.astype(np.int32)] if pending.size else []
        new.rows.free_rows[: free_rows.size] = free_rows
        new.rows.num_free_rows = int(free_rows.size)
        new.rows.rows = {k: int(v) for k, v in rows.items()}
        new.index.clock, new.index.stats = clock, stats
        new.index.rebuild()
        _load_tier(new.tier, state, n)
        try:
            new.check_invariants()
        except AssertionError as err:
            raise ValueError(f"{where}: inconsistent state: {err}") from None
        new.events = self.events  # not state: the queue carries on, announcing the new cache
        new.index.events = new.tier.events = self.events
        self.events.cleared()
        new.announce_cached()
        return new

    def announce_cached(self) -> int:
        """Queues PagesStored for every cached page (per device group, then the host);
        returns how many (0 with events off)."""
        if not self.events.enabled:
            return 0
        count = 0
        for g in range(self.num_groups):
            mine = self.index.page_key[self.index.cached & (self.index.page_group == g)]
            size = self.tables[g].page_size
            self.events.stored([key.tobytes() for key in mine], None, None, DEVICE, g, None, size)
            count += len(mine)
        cached = [key.tobytes() for key in self.tier.host_key if key.any()]
        self.events.stored(cached, None, None, HOST)
        return count + len(cached)

    def checksum(self) -> str:
        """See :meth:`kvshard.PageAllocator.checksum`."""
        state = self.state_dict()
        h = hashlib.blake2b(digest_size=16)
        h.update(repr(sorted(state["config"].items())).encode())
        h.update(repr((state["clock"], sorted(state["prefix_stats"].items()))).encode())
        h.update(repr(sorted((repr(k), v) for k, v in state["rows"].items())).encode())
        h.update(repr((state["host_clock"], sorted(state["host_stats"].items()))).encode())
        hashed = (*_HASHED, "page_group") if self.num_groups > 1 else _HASHED
        for name in ("free_pages", "free_rows", "pending_copies", *hashed, *_HOST_HASHED):
            array = np.ascontiguousarray(state[name])
            h.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
            h.update(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
        return h.hexdigest()

    def check_invariants(self) -> None:
        """Each part's own invariants, then those between parts (owners = table entries)."""
        config, rows, pool = self.config, self.rows, self.pool
        rows.check(config.max_tokens, config.page_size)
        live = rows.live_rows()
        swapped = self.tier.host_tables != 0
        owned = np.concatenate(
            [
                t.check(rows.row_tokens, live, mine)
                for t, mine in zip(self.tables, swapped, strict=True)
            ]
        )
        counts = np.bincount(owned, minlength=config.num_pages)
        check(np.array_equal(counts, pool.refcount), "refcount: != number of owners")
        pool.check()
        index = self.index
        index.check(config.enable_prefix_caching)
        check((index.page_group < self.num_groups).all(), "page_group: past the number of groups")
        for g, t in enumerate(self.tables):  # a group's pages are cached as that group's
            held = t.page_table[live].reshape(-1)
            held = held[held != 0]
            check(
                (index.page_group[held][index.cached[held]] == g).all(),
                f"page_group: group {g} holds a page cached for another group",
            )
        # Pages only looked-up requests hold go back to the LRU by their stamps on free.
        tentative = np.flatnonzero(rows.row_tentative)
        held = self.stacks["page_table"][:, tentative].reshape(-1)
        only = np.bincount(held, minlength=config.num_pages) == pool.refcount
        only &= (pool.refcount > 0) & index.cached
        stamps = index.lru[only | index.evictable]
        check(
            np.unique(stamps).size == stamps.size and (stamps < index.clock).all(),
            "lru: a page only looked-up requests hold has a stamp in use or past the clock",
        )
        tier = self.tier
        tier.check(live, self.stacks["row_pages"], self.stacks["page_table"])
        check(not rows.row_tentative[tier.row_swapped].any(), "row_swapped: a tentative row")
        check(
            config.enable_prefix_caching or not tier.host_cached.any(),
            "host_cached: caching is disabled",
        )
        n = config.num_pages
        for name, device in (
            ("pending_swap_out", tier.swap_out_pairs()[:, 0]),
            ("pending_swap_in", tier.swap_in_pairs()[:, 0]),
        ):
            check((device < n).all(), f"{name}: a device page past num_pages")
        into = tier.swap_in_pairs()[:, 0]
        check(
            ((pool.refcount[into] > 0) | index.cached[into]).all(),
            "pending_swap_in: into a device page that is free",
        )

    def reset_prefix_cache(self) -> bool:
        """See :meth:`kvshard.PageAllocator.reset_prefix_cache`."""
        tier = self.tier
        busy = tier.pending_out or tier.pending_in or tier.host_limbo.any()
        if self.pool.refcount.any() or tier.row_swapped.any() or busy:
            return False
        pages = self.index.clear_evictable()
        self.pool.num_free = push_free(self.pool.free, self.pool.num_free, pages)
        tier.clear_cache()
        self.events.cleared()
        self.reset_order_if_empty()
        return True


# The order checksum() hashes the arrays in (kept from the single-class allocator, so digests
# of equal states did not change with the split).
_HASHED = (
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
    "row_tentative",
)


_HOST_HASHED = ("host_free", "pending_swap_out", "pending_swap_in", "host_table", *HostTier.ARRAYS)


def _load_tier(tier: HostTier, state: dict[str, Any], num_pages: int) -> None:
    """Loads the host tier's entries into ``tier`` (its arrays were set with the others)."""
    where = "load_state_dict"
    h = max(tier.num_host_pages, 1)
    free = _int_array(state["host_free"], "host_free", 1, 1, h)
    if free.size > max(tier.num_host_pages - 1, 0):
        raise ValueError(f"{where}: host_free is too long")
    pairs = []
    for name in ("pending_swap_out", "pending_swap_in"):
        value = _int_array(state[name], name, 2, 0, max(num_pages, h))
        if value.shape[1:] != (2,):
            raise ValueError(f"{where}: {name} has shape {value.shape}, want (K, 2)")
        if value.size and ((value[:, 0] >= num_pages).any() or (value[:, 1] >= h).any()):
            raise ValueError(f"{where}: {name} names a page past num_pages or num_host_pages")
        pairs.append([value.astype(np.int32)] if value.size else [])
    clock, stats = _clock_and_stats(state, "host_clock", "host_stats", HOST_STATS)
    tier.free[: free.size] = free
    tier.num_free = int(free.size)
    tier.pending_out, tier.pending_in = pairs
    tier.clock, tier.stats = clock, stats
    tier.rebuild()


def _clock_and_stats(
    state: dict[str, Any], clock_key: str, stats_key: str, names: tuple[str, ...]
) -> tuple[int, dict[str, int]]:
    """``state[clock_key]`` (an eviction clock in ``[0, MAX_CLOCK]``) and ``state[stats_key]``
    (a dict of exactly ``names`` to ints >= 0), checked; raises ValueError naming the key."""
    where = "load_state_dict"
    clock = state[clock_key]
    if not is_int(clock) or not 0 <= clock <= MAX_CLOCK:
        raise ValueError(f"{where}: {clock_key}={clock!r} must be an int in [0, 2**62]")
    stats = state[stats_key]
    if (
        not isinstance(stats, dict)
        or set(stats) != set(names)
        or not all(is_int(v) and v >= 0 for v in stats.values())
    ):
        raise ValueError(f"{where}: {stats_key}={stats!r} must map {names} to ints >= 0")
    return int(clock), {k: int(stats[k]) for k in names}


def _same_shape(value: Any, mine: np.ndarray, name: str) -> np.ndarray:
    """``value`` as an array of ``mine``'s shape and dtype; raises ValueError naming ``name``."""
    where = "load_state_dict"
    value = np.asarray(value)
    if value.shape != mine.shape:
        raise ValueError(f"{where}: {name} has shape {value.shape}, want {mine.shape}")
    if mine.dtype != bool and value.size and not np.issubdtype(value.dtype, np.integer):
        raise ValueError(f"{where}: {name} must be integers, got dtype {value.dtype}")
    cast = value.astype(mine.dtype)
    if not np.array_equal(cast, value):
        raise ValueError(f"{where}: {name} does not fit {mine.dtype}")
    return cast


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
