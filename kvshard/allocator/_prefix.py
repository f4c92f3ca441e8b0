"""Prefix caching across the parts: look a prompt up (attaching or peeking), commit pages.

The index (:class:`~kvshard.allocator._prefix_index.PrefixIndex`) maps keys to pages; these
transactions attach hits to a request's row through the pool (one more owner each, so an
evictable hit leaves the eviction order) and record how far the request's pages were hashed.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from kvshard.allocator._prefix_index import ROOT_KEY, namespace_digest, token_bytes
from kvshard.allocator._table import PageTable

if TYPE_CHECKING:
    from kvshard.allocator._state import AllocatorParts


def _hit_limit(length: int, table: PageTable) -> int:
    """Full pages a lookup may match: the last prompt token is always computed (its logits)."""
    return min(max(length - 1, 0) // table.page_size, table.width)


def peek(
    parts: AllocatorParts, token_ids: Sequence[int] | np.ndarray, namespace: str | bytes | None
) -> int:
    """Returns the tokens a lookup would find cached now; reads only."""
    data, length = token_bytes(token_ids, "peek_prefix")
    limit = _hit_limit(length, parts.table)
    hits, _ = parts.pool.index.match(data, namespace_digest(namespace), limit)
    return len(hits) * parts.table.page_size


def lookup(
    parts: AllocatorParts,
    req_id: Hashable,
    token_ids: Sequence[int] | np.ndarray,
    namespace: str | bytes | None,
) -> int:
    """Attaches the longest cached prefix of ``token_ids`` to ``req_id``; returns its tokens."""
    where = "lookup_prefix"
    rows, table, pool = parts.rows, parts.table, parts.pool
    data, length = token_bytes(token_ids, where)
    ns = namespace_digest(namespace)
    row = rows.rows.get(req_id)  # TypeError for an unhashable id, before any change
    if row is not None and rows.row_tokens[row] != 0:
        raise ValueError(
            f"{where}: req_id={req_id!r} already holds {int(rows.row_tokens[row])} tokens; "
            "look up a prefix before allocating"
        )
    new_row = rows.reserve(req_id, where) if row is None else None
    hits, last_key = pool.index.match(data, ns, _hit_limit(length, table))

    # ---- commit
    if new_row is not None:
        rows.add([req_id], [new_row])
        row = new_row
    assert row is not None
    found = np.array(hits, np.int32)
    table.page_table[row, : found.size] = found
    pool.share(found)
    table.row_pages[row] = found.size
    rows.row_tokens[row] = found.size * table.page_size
    rows.row_committed[row] = found.size
    rows.row_last_key[row] = np.frombuffer(last_key, np.uint8)
    rows.row_ns[row] = np.frombuffer(ns, np.uint8)
    rows.row_has_ns[row] = True
    rows.row_tentative[row] = True
    stats = pool.index.stats
    stats["lookups"] += 1
    stats["queries"] += length
    stats["hits"] += found.size * table.page_size
    return int(found.size * table.page_size)


def commit(
    parts: AllocatorParts,
    req_id: Hashable,
    token_ids: Sequence[int] | np.ndarray,
    namespace: str | bytes | None,
) -> int:
    """Registers the request's full, not yet hashed pages; returns how many were new."""
    where = "commit_prefix"
    rows, table, pool = parts.rows, parts.table, parts.pool
    row = rows.row_of(req_id, where)
    data, length = token_bytes(token_ids, where)
    ns = namespace_digest(namespace)
    if rows.row_has_ns[row] and rows.row_ns[row].tobytes() != ns:
        raise ValueError(
            f"{where}: namespace={namespace!r} differs from the namespace req_id={req_id!r} "
            "was looked up or committed with"
        )
    index = pool.index
    full = min(length, int(rows.row_tokens[row])) // table.page_size
    done = int(rows.row_committed[row])
    prev = rows.row_last_key[row].tobytes() if done else ROOT_KEY
    keys = list(index.page_keys(data, prev, ns, done, full)) if full > done else []
    pages = table.page_table[row, done:full].tolist() if keys else []
    # A page cached already (shared through fork or a lookup) keeps its key: a page has
    # one key, and a forked request may commit under a different namespace.
    fresh = [
        (key, page)
        for key, page in zip(keys, pages, strict=True)
        if not index.cached[page] and key not in index.key_to_page
    ]

    # ---- commit
    index.register(fresh)
    if keys:
        rows.row_committed[row] = full
        rows.row_last_key[row] = np.frombuffer(keys[-1], np.uint8)
    rows.row_ns[row] = np.frombuffer(ns, np.uint8)
    rows.row_has_ns[row] = True
    return len(fresh)
