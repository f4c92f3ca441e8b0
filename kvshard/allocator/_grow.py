"""The growth transaction behind ``allocate`` and ``allocate_batch``: check all, then commit.

One vectorized path serves one request or a whole step's batch: look up (or reserve) rows,
check every bound, plan each KV-cache group's window release and copy-on-write, check that the
pages of all groups together suffice, and only then commit. Semantics: the batch's window
releases happen first (they only free pages), then each request grows as ``allocate`` would,
in batch order. A cached page that a copy-on-write leaves unowned becomes evictable after that
writer, so requests later in the batch may take it (and earlier ones may not), exactly as in
sequential calls.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from kvshard.allocator._common import OutOfPages
from kvshard.allocator._pool import PagePool

if TYPE_CHECKING:
    from kvshard.allocator._state import AllocatorParts


def grow(
    parts: AllocatorParts, req_ids: Sequence[Hashable], counts: np.ndarray, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """Grows each request by ``counts[i]`` tokens. Returns (int32[B] rows, int32[k] new pages).

    ``counts`` is int64[B], each already checked to be at most ``max_pages_per_request *
    page_size`` (so sums with held tokens stay far below int64's end).

    Raises:
        ValueError: a bad shape, a negative count, a request past its page limit, too many
            rows or duplicates (see ``RequestRows.lookup``).
        OutOfPages: the pages do not suffice.
    """
    rows, table, tables, pool = parts.rows, parts.table, parts.tables, parts.pool
    if counts.ndim != 1 or counts.shape[0] != len(req_ids):
        raise ValueError(
            f"{where}: num_new_tokens must have shape ({len(req_ids)},), got {counts.shape}"
        )
    bad = np.flatnonzero(counts < 0)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{where}: num_new_tokens={int(counts[i])} for req_id={req_ids[i]!r} must be >= 0"
        )
    row_idx, new_ids, new_pos = rows.lookup(req_ids, where)
    if parts.tier.enabled and parts.tier.row_swapped[row_idx].any():
        out = np.flatnonzero(parts.tier.row_swapped[row_idx])
        raise ValueError(
            f"{where}: req_id={req_ids[int(out[0])]!r} is swapped out to the host tier; "
            "swap_in_request it before allocating"
        )
    size = parts.config.page_size  # the hash block: max_pages_per_request counts these
    old_tokens = rows.row_tokens[row_idx]
    total = old_tokens + counts
    need = (total + (size - 1)) // size
    over = np.flatnonzero(need > table.width)
    if over.size:
        i = int(over[0])
        raise ValueError(
            f"{where}: req_id={req_ids[i]!r} would hold {int(total[i])} tokens in "
            f"{int(need[i])} pages, more than max_pages_per_request={table.width}"
        )
    # Per group: columns held before, new columns (an attention group's are the same in every
    # attention group; a state group holds one column once the request holds tokens).
    olds = [t.row_pages[row_idx] for t in tables]
    colss = [t.columns(total) - old for t, old in zip(tables, olds, strict=True)]
    # Each group plans its own window release and copy-on-write; their pages are summed.
    releases = [t.plan_release(row_idx, old_tokens) for t in tables]
    cows = [
        t.plan_copy_on_write(row_idx, old_tokens, old, counts, dropped)
        for t, old, (_, dropped) in zip(tables, olds, releases, strict=True)
    ]
    dropped = np.concatenate([d for _, d in releases]) if len(tables) > 1 else releases[0][1]
    # A request's pages are taken as one run: group 0's (its copy first), group 1's, ...
    demand = [c.copy() if pos.size else c for c, (pos, _) in zip(colss, cows, strict=True)]
    for d, (pos, _) in zip(demand, cows, strict=True):
        d[pos] += 1
    per_req = demand[0] if len(tables) == 1 else np.sum(demand, axis=0)
    first = np.cumsum(per_req) - per_req  # each request's first page among all taken
    group_first = [first]
    for d in demand[:-1]:
        group_first.append(group_first[-1] + d)
    cow_pos, cow_src, cow_dst = _writers(cows, group_first)
    available = pool.num_available + pool.freed_by(dropped)
    # Cached sources left unowned by their last writer's copy: position of that writer.
    orphan_at = _orphan_positions(pool, cow_pos, cow_src)
    if orphan_at.size:
        ends = _segment_ends(per_req, orphan_at, available, where)
    else:  # the common case: one segment
        needed = int(per_req.sum())
        if needed > available:
            raise OutOfPages(needed, available, where)
        ends = np.array([per_req.size - 1])

    # ---- commit: nothing below can fail.
    for t, (release, _) in zip(tables, releases, strict=True):
        t.release(release)  # released pages are reused by this very call
    if new_ids:
        rows.add(new_ids, row_idx[new_pos].tolist())
    pages = _take_in_segments(pool, per_req, ends, cow_pos, cow_src, cow_dst)
    grouped = zip(tables, cows, group_first, demand, olds, colss, strict=True)
    for t, (pos, _), start, d, old, cols in grouped:
        if pages.size:
            if pos.size:
                t.page_table[row_idx[pos], old[pos] - 1] = pages[start[pos]]
            t.place(row_idx, old, cols, start + (d - cols), pages)
        t.row_pages[row_idx] = old + cols
    rows.row_tokens[row_idx] = total
    rows.row_tentative[row_idx] = False  # served: its hits are touched, as vLLM does now
    return row_idx.astype(np.int32), pages


def _writers(
    cows: list[tuple[np.ndarray, np.ndarray]], group_first: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every group's copy-on-write writers in batch order: (int64[c] batch positions, int32[c]
    source pages, int64[c] index of each copy's page among the pages taken)."""
    if len(cows) == 1:
        pos, src = cows[0]
        return pos, src, group_first[0][pos]
    pos = np.concatenate([p for p, _ in cows])
    src = np.concatenate([s for _, s in cows])
    dst = np.concatenate([first[p] for (p, _), first in zip(cows, group_first, strict=True)])
    order = np.argsort(pos, kind="stable")  # groups' pages are distinct: any tie order works
    return pos[order], src[order], dst[order]


def _orphan_positions(pool: PagePool, cow_pos: np.ndarray, cow_src: np.ndarray) -> np.ndarray:
    """Returns int64[o] sorted batch positions after which a cached source becomes evictable.

    Every writer of a cached partial page copies (see ``PageTable.plan_copy_on_write``), so
    the page's owners all leave it; it is orphaned by the last of them in batch order.
    """
    if not cow_src.size:
        return cow_pos
    cached = pool.index.cached[cow_src]
    if not cached.any():
        return np.zeros(0, np.int64)
    pos, src = cow_pos[cached], cow_src[cached]
    owners = pool.refcount[src].astype(np.int64)
    _, first_of, writers = np.unique(src[::-1], return_index=True, return_counts=True)
    last_writer = pos[::-1][first_of]  # the last position writing each page
    return np.sort(last_writer[writers == owners[::-1][first_of]])


def _segment_ends(
    per_req: np.ndarray, orphan_at: np.ndarray, available: int, where: str
) -> np.ndarray:
    """Returns int64[s] segment ends (inclusive batch positions): one after each orphan, and
    the last position. Segment ``j`` may use ``available + j`` pages in all (the ``j`` orphans
    before it).

    Raises:
        OutOfPages: for the first segment whose requests need more.
    """
    cum = np.cumsum(per_req)
    ends = np.append(orphan_at, per_req.size - 1).astype(np.int64)
    for j, end in enumerate(ends.tolist()):
        if int(cum[end]) > available + j:
            raise OutOfPages(int(cum[end]), available + j, where)
    return ends


def _take_in_segments(
    pool: PagePool,
    per_req: np.ndarray,
    ends: np.ndarray,
    cow_pos: np.ndarray,
    cow_src: np.ndarray,
    cow_dst: np.ndarray,
) -> np.ndarray:
    """Takes the pages of each segment, then drops its writers' owners of their sources
    (``cow_dst``: each copy's page, as an index into all the pages taken)."""
    if ends.size == 1:  # one segment: no cached source is orphaned
        pages = pool.take(int(per_req.sum()))
        if cow_pos.size:
            pool.queue_copies(cow_src, pages[cow_dst])
            pool.release_sources(cow_src)
        return pages
    cum = np.cumsum(per_req)
    taken: list[np.ndarray] = []
    first = 0  # first batch position of the segment
    for end in ends.tolist():
        taken.append(pool.take(int(cum[end]) - (int(cum[first - 1]) if first else 0)))
        mine = (cow_pos >= first) & (cow_pos <= end)
        if mine.any():
            pool.queue_copies(cow_src[mine], np.concatenate(taken)[cow_dst[mine]])
            pool.release_sources(cow_src[mine])
        first = end + 1
    return np.concatenate(taken)
