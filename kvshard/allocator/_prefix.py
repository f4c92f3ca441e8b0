"""Prefix caching across the parts: look a prompt up (attaching or peeking), commit pages.

The index (:class:`~kvshard.allocator._prefix_index.PrefixIndex`) maps keys to pages; these
transactions attach hits to a request's row through the pool (one more owner each, so an
evictable hit leaves the eviction order) and record how far the request's pages were hashed.

With several KV-cache groups, or a group that releases pages (sliding window, chunks), each
group caches its own page of a block under the block's key (``PrefixIndex.find``), and a hit
of ``h`` pages counts only where every group can serve it (vLLM's
``HybridKVCacheCoordinator``): a full-attention group needs pages ``[0, h)`` cached, a window
group only the pages its next query (at token ``h * page_size``) reads. The pages a window
group does not need are not attached (they read the null page, as released pages do). Such an
allocator has no host prefix cache (``_config``), so its hits are device pages only.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from kvshard.allocator._common import NULL_PAGE
from kvshard.allocator._prefix_index import (
    ROOT_KEY,
    extra_key_bytes,
    namespace_digest,
    token_bytes,
)
from kvshard.allocator._table import PageTable

if TYPE_CHECKING:
    from kvshard.allocator._state import AllocatorParts


def _hit_limit(length: int, parts: AllocatorParts) -> int:
    """Full hash blocks (``page_size`` tokens) a lookup may match: the last prompt token is
    always computed (its logits)."""
    config = parts.config
    return min(max(length - 1, 0) // config.page_size, config.max_pages_per_request)


def _match(
    parts: AllocatorParts, data: bytes, ns: bytes, limit: int, extras: list[bytes]
) -> tuple[list[int], list[int], bytes]:
    """Returns (per hit column: its device page or -1 for a host hit, per host hit: its host
    page, the key of the last hit or ROOT_KEY) for the longest prefix cached in either tier.

    A page found only in the host tier needs a new device page (and a swap-in): the match
    stops at the first host hit the device pages cannot take now, and takes no host hit while
    a swap-in could overwrite a pending copy's source (see ``_swap``). Reads only.
    """
    index, pool, tier = parts.pool.index, parts.pool, parts.tier
    use_host = tier.capacity > 0 and not pool.unowned_copy_sources().size
    budget = pool.num_available  # device pages host hits may take
    device: list[int] = []
    host: list[int] = []
    last_key = ROOT_KEY
    for key in index.page_keys(data, ROOT_KEY, ns, 0, limit, extras):
        page = index.key_to_page.get(key)
        left, wanted = budget, len(host)
        if page is not None:
            left -= int(index.evictable[page])  # attaching it takes it out of the LRU
        else:
            found = tier.key_to_page.get(key) if use_host else None
            if found is None:
                break
            page, wanted = -1, wanted + 1
        if wanted > left:
            break
        if page < 0:
            host.append(found)  # type: ignore[arg-type]
        budget = left
        device.append(page)
        last_key = key
    return device, host, last_key


class PrefixQuery(NamedTuple):
    """What a prefix operation hashes: the tokens, their namespace, per-page extra keys."""

    token_ids: Sequence[int] | np.ndarray
    namespace: str | bytes | None
    extra_keys: object = None
    eagle: bool = False  # drop the hit's last page (vLLM's EAGLE rule)
    eagle_groups: tuple[int, ...] | None = None  # the groups that drop it (None: every group)

    def encode(self, where: str) -> tuple[bytes, int, Any, bytes]:
        """(token bytes, token count, extra-key bytes, namespace digest); raises naming
        ``where`` on a bad argument."""
        data, length = token_bytes(self.token_ids, where)
        extras = extra_key_bytes(self.extra_keys, where)
        return data, length, extras, namespace_digest(self.namespace)


def _grouped(parts: AllocatorParts) -> bool:
    """Whether hits are matched group by group (several groups, a window group, or a group
    whose pages are several hash blocks)."""
    return parts.num_groups > 1 or parts.table.releases or parts.config.group_page_sizes is not None


def _match_groups(
    parts: AllocatorParts,
    data: bytes,
    ns: bytes,
    limit: int,
    extras: list[bytes],
    eagle: bool = False,
    eagle_groups: tuple[int, ...] | None = None,
) -> tuple[int, list[bytes], list[np.ndarray], list[int]]:
    """Returns (h: the most hash blocks every group can serve, the keys of blocks ``[0, h)``,
    per group int32[limit // k] its cached page of each of its pages (``k`` hash blocks each,
    keyed by the last one's key) or NULL_PAGE, per group the first of its pages the next query
    reads). ``h`` is a multiple of every group's ``k`` (vLLM aligns hits to the lcm of the
    block sizes). With ``eagle``, vLLM's EAGLE rule: an attention group serves ``h`` only if
    it also holds its page after the hit (the block vLLM matches and then drops); a state
    group as without it (vLLM's MambaManager drops nothing); with ``eagle_groups``, only
    those groups (vLLM's ``is_eagle_group``), the others match as without EAGLE. Reads only."""
    index, tables = parts.index, parts.tables
    keys = list(index.page_keys(data, ROOT_KEY, ns, 0, limit, extras))
    size = parts.config.page_size
    hits = np.arange(limit + 1)  # every candidate h, in hash blocks
    valid = np.ones(limit + 1, bool)
    founds, firsts = [], []
    for g, table in enumerate(tables):
        k = table.page_size // size
        n = limit // k
        found = np.array(
            [index.find(keys[(j + 1) * k - 1], g) or NULL_PAGE for j in range(n)], np.int32
        )
        founds.append(found)
        valid &= hits % k == 0
        pages = hits // k  # the hit in this group's pages
        if table.is_state:  # vLLM's MambaManager: the state cached at the hit's last block
            first = np.maximum(pages - 1, 0)
            if n:
                valid &= (pages == 0) | (found[np.minimum(first, n - 1)] != NULL_PAGE)
            firsts.append(first)
            continue
        counts = np.zeros(n + 1, np.int64)
        np.cumsum(found != NULL_PAGE, out=counts[1:])
        first = table.window_start(hits * size) // table.page_size  # first page it reads
        # EAGLE (vLLM): a hit of h pages needs page h cached as well (full attention drops
        # the last matched block, a window group matches one block more, then drops it).
        drops = eagle and (eagle_groups is None or g in eagle_groups)
        stop = np.minimum(pages + 1, n) if drops else pages
        valid &= counts[stop] - counts[first] == stop - first
        if drops:
            valid &= pages < n  # its page after the hit must be matchable
        firsts.append(first)
    if eagle:
        valid[0] = True
    h = int(np.flatnonzero(valid)[-1])  # h = 0 is always valid
    return h, keys[:h], founds, [int(first[h]) for first in firsts]


def peek(parts: AllocatorParts, query: PrefixQuery) -> int:
    """Returns the tokens a lookup would find cached now (either tier); reads only."""
    data, length, extras, ns = query.encode("peek_prefix")
    limit = _hit_limit(length, parts)
    if _grouped(parts):
        hit = _match_groups(parts, data, ns, limit, extras, query.eagle, query.eagle_groups)[0]
        return hit * parts.config.page_size
    if query.eagle:
        limit = max(len(_match(parts, data, ns, limit, extras)[0]) - 1, 0)
    device, _, _ = _match(parts, data, ns, limit, extras)
    return len(device) * parts.table.page_size


def lookup(parts: AllocatorParts, req_id: Hashable, query: PrefixQuery) -> int:
    """Attaches the longest cached prefix of ``token_ids`` to ``req_id``; returns its tokens.

    Host-tier hits get new device pages (after the device hits are attached, so taking them
    cannot evict a hit) whose swap-ins are queued; their keys move to the device index.
    """
    where = "lookup_prefix"
    rows, table, pool, tier = parts.rows, parts.table, parts.pool, parts.tier
    data, length, extras, ns = query.encode(where)
    row = rows.rows.get(req_id)  # TypeError for an unhashable id, before any change
    if row is not None and rows.row_tokens[row] != 0:
        raise ValueError(
            f"{where}: req_id={req_id!r} already holds {int(rows.row_tokens[row])} tokens; "
            "look up a prefix before allocating"
        )
    if row is not None and tier.row_swapped[row]:
        raise ValueError(f"{where}: req_id={req_id!r} is swapped out; swap it in first")
    new_row = rows.reserve(req_id, where) if row is None else None
    limit = _hit_limit(length, parts)
    if _grouped(parts):
        h, keys, found_g, firsts = _match_groups(
            parts, data, ns, limit, extras, query.eagle, query.eagle_groups
        )
        # ---- commit
        if new_row is not None:
            rows.add([req_id], [new_row])
            row = new_row
        assert row is not None
        size = parts.config.page_size
        for t, found, first in zip(parts.tables, found_g, firsts, strict=True):
            hp = h * size // t.page_size  # the hit in this group's pages
            pool.share(found[first:hp])
            if t.is_state:  # the state after the hit's last block, in column 0
                t.page_table[row, 0] = found[hp - 1] if hp else NULL_PAGE
                t.row_pages[row] = 1 if hp else 0
                continue
            t.page_table[row, first:hp] = found[first:hp]
            t.row_pages[row] = hp
            t.row_released[row] = first
        tier.stats["device_hits"] += h * size
        _record_hits(parts, row, h, keys[-1] if keys else ROOT_KEY, ns, length)
        return h * size
    if query.eagle:  # the longest match, less its last page (vLLM's EAGLE rule)
        limit = max(len(_match(parts, data, ns, limit, extras)[0]) - 1, 0)
    device, host, last_key = _match(parts, data, ns, limit, extras)

    # ---- commit
    if new_row is not None:
        rows.add([req_id], [new_row])
        row = new_row
    assert row is not None
    found = np.array(device, np.int32)
    on_device = found[found >= 0]
    pool.share(on_device)
    if host:
        cols = np.flatnonzero(found < 0)
        keys = list(pool.index.page_keys(data, ROOT_KEY, ns, 0, len(device), extras))
        fresh = pool.take(len(host))
        found[cols] = fresh
        promoted = [keys[c] for c in cols.tolist()]
        pool.index.register(list(zip(promoted, fresh.tolist(), strict=True)))
        pool.index.stamp(fresh)  # an undone lookup puts them last in the LRU
        tier.promote(np.array(host, np.int32), fresh)
        parts.events.stored(promoted, None, None)
    table.page_table[row, : found.size] = found
    table.row_pages[row] = found.size
    tier.stats["device_hits"] += on_device.size * table.page_size
    tier.stats["host_hits"] += len(host) * table.page_size
    _record_hits(parts, row, int(found.size), last_key, ns, length)
    return int(found.size * table.page_size)


def _record_hits(
    parts: AllocatorParts, row: int, hits: int, last_key: bytes, ns: bytes, length: int
) -> None:
    """A lookup's commit on the row and the counters, once its pages are attached."""
    rows, size = parts.rows, parts.config.page_size
    rows.row_tokens[row] = hits * size
    rows.row_committed[row] = hits
    rows.row_last_key[row] = np.frombuffer(last_key, np.uint8)
    rows.row_ns[row] = np.frombuffer(ns, np.uint8)
    rows.row_has_ns[row] = True
    rows.row_tentative[row] = True
    stats = parts.index.stats
    stats["lookups"] += 1
    stats["queries"] += length
    stats["hits"] += hits * size


def _encode_for_row(
    parts: AllocatorParts, req_id: Hashable, query: PrefixQuery, where: str
) -> tuple[int, tuple[bytes, int, Any, bytes]]:
    """The live request's row and ``query.encode(where)``, its namespace checked against the one
    the request was looked up or committed with."""
    rows = parts.rows
    row = rows.row_of(req_id, where)
    encoded = query.encode(where)
    if rows.row_has_ns[row] and rows.row_ns[row].tobytes() != encoded[3]:
        raise ValueError(
            f"{where}: namespace={query.namespace!r} differs from the namespace req_id={req_id!r} "
            "was looked up or committed with"
        )
    return row, encoded


def commit(
    parts: AllocatorParts, req_id: Hashable, query: PrefixQuery, lora_id: int | None = None
) -> int:
    """Registers the request's full, not yet hashed pages; returns how many were new."""
    where = "commit_prefix"
    rows, pool = parts.rows, parts.pool
    row, (data, length, extras, ns) = _encode_for_row(parts, req_id, query, where)
    if parts.tier.row_swapped[row]:
        raise ValueError(
            f"{where}: req_id={req_id!r} is swapped out; swap_in_request it before committing"
        )
    index = pool.index
    full = min(length, int(rows.row_tokens[row])) // parts.config.page_size
    done = int(rows.row_committed[row])
    prev = rows.row_last_key[row].tobytes() if done else ROOT_KEY
    keys = list(index.page_keys(data, prev, ns, done, full, extras)) if full > done else []
    # Each group caches its own pages. A page cached already (shared through fork or a lookup)
    # keeps its key: a page has one key, and a forked request may commit under a different
    # namespace. A window group's released pages (null) are not cached.
    fresh_of = []
    tokens = int(rows.row_tokens[row])
    for g, t in enumerate(parts.tables):
        if t.is_state:
            fresh_of.append(_state_commit(parts, t, g, row, tokens, full, done, keys, prev))
            continue
        k = t.page_size // parts.config.page_size
        # This group's pages wholly within [0, full) not hashed before: page j is keyed by
        # its last hash block's key, keys[(j + 1) * k - 1 - done].
        cols = range(done // k, full // k) if keys else range(0)
        fresh_of.append(
            [
                (keys[(j + 1) * k - 1 - done], int(t.page_table[row, j]))
                for j in cols
                if t.page_table[row, j] != NULL_PAGE
                and not index.cached[t.page_table[row, j]]
                and index.find(keys[(j + 1) * k - 1 - done], g) is None
            ]
        )

    # ---- commit
    for g, fresh in enumerate(fresh_of):
        index.register(fresh, g)
        if parts.events.enabled and fresh:
            if parts.tables[g].is_state:  # one page: the state after block full - 1
                _announce_state(parts, fresh[0][0], keys, prev, data, full, g, lora_id)
            else:
                _announce(parts, keys, prev, fresh, data, done, g, lora_id)
    if keys:
        rows.row_committed[row] = full
        rows.row_last_key[row] = np.frombuffer(keys[-1], np.uint8)
    rows.row_ns[row] = np.frombuffer(ns, np.uint8)
    rows.row_has_ns[row] = True
    return sum(len(fresh) for fresh in fresh_of)


def _announce(
    parts: AllocatorParts,
    keys: list[bytes],
    prev: bytes,
    fresh: list[tuple[bytes, int]],
    data: bytes,
    first: int,
    group: int,
    lora_id: int | None = None,
) -> None:
    """Queues one PagesStored event per run of consecutive newly stored pages of a group
    (``keys``: the hash blocks ``first ..`` hashed by this commit; a group page of ``k`` hash
    blocks is keyed by its last one's key)."""
    size = parts.tables[group].page_size
    k = size // parts.config.page_size
    at = {key: i for i, key in enumerate(keys)}
    cols = sorted((first + at[key] + 1) // k - 1 for key, _ in fresh)  # the group's pages
    tokens = np.frombuffer(data, "<i8")
    runs: list[list[int]] = []
    for j in cols:
        if runs and runs[-1][-1] == j - 1:
            runs[-1].append(j)
        else:
            runs.append([j])
    for run in runs:
        before = run[0] * k - 1  # the hash block before the run
        if before < 0:
            parent = None
        elif before >= first:
            parent = keys[before - first]
        else:
            parent = prev if before == first - 1 else None
        parts.events.stored(
            [keys[(j + 1) * k - 1 - first] for j in run],
            parent,
            tuple(int(t) for t in tokens[run[0] * size : (run[-1] + 1) * size]),
            group=group,
            lora_id=lora_id,
            page_size=size,
        )


def _state_commit(
    parts: AllocatorParts,
    table: PageTable,
    group: int,
    row: int,
    tokens: int,
    full: int,
    done: int,
    keys: list[bytes],
    prev: bytes,
) -> list[tuple[bytes, int]]:
    """The state page to register for a state group: [(key of block ``full - 1``, page)] when
    the request holds exactly ``full`` whole pages' tokens (its state is the state after
    them, vLLM caches states only at block boundaries), the page is not cached yet and no
    twin holds the key; else []. Reads only."""
    size = parts.config.page_size
    if not full or tokens != full * size:
        return []
    key = keys[-1] if keys else (prev if done == full else None)
    page = int(table.page_table[row, 0])
    index = parts.index
    if key is None or page == NULL_PAGE or index.cached[page] or index.find(key, group):
        return []
    return [(key, page)]


def _announce_state(
    parts: AllocatorParts,
    key: bytes,
    keys: list[bytes],
    prev: bytes,
    data: bytes,
    full: int,
    group: int,
    lora_id: int | None = None,
) -> None:
    """Queues the PagesStored event of a state page cached under block ``full - 1``'s key."""
    size = parts.config.page_size
    chain = [prev, *keys]  # chain[i] is the key of block (full - len(keys) - 1 + i)
    parent = chain[-2] if keys and full >= 2 else None  # unknown when no key was new
    tokens = np.frombuffer(data, "<i8")[(full - 1) * size : full * size]
    parts.events.stored([key], parent, tuple(int(t) for t in tokens), group=group, lora_id=lora_id)


def announce(
    parts: AllocatorParts, req_id: Hashable, query: PrefixQuery, lora_id: int | None
) -> int:
    """Queues PagesStored for the request's hashed prefix in every group; returns its pages."""
    where = "announce_prefix"
    rows = parts.rows
    row, (data, length, extras, ns) = _encode_for_row(parts, req_id, query, where)
    n = int(rows.row_committed[row])
    size = parts.config.page_size
    if length < n * size:
        raise ValueError(
            f"{where}: token_ids has {length} tokens; req_id={req_id!r} has {n} hashed pages "
            f"({n * size} tokens) to announce"
        )
    if n and parts.events.enabled:
        keys = list(parts.index.page_keys(data, ROOT_KEY, ns, 0, n, extras))
        every = np.frombuffer(data, "<i8")
        for g, table in enumerate(parts.tables):
            k = table.page_size // size  # a group page: k hash blocks, its last one's key
            mine = keys[k - 1 :: k]
            tokens = tuple(int(t) for t in every[: len(mine) * table.page_size])
            parts.events.stored(
                mine, None, tokens, group=g, lora_id=lora_id, page_size=table.page_size
            )
    return n
