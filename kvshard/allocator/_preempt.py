"""Preemption by swap: move a request's own pages to host pages and bring them back.

What moves: the pages the request alone owns that are not in the prefix cache. A page shared
with another request (fork, prefix hit) or cached stays on device and the request keeps its
reference, so a swap never changes what any other request reads, and the prefix cache keeps
its pages where lookups find them. The moved columns read :data:`NULL_PAGE` in the page table
while the request is out; ``host_tables`` holds their host pages. With several KV-cache groups
every group's pages move (and come back) together, group by group in the pairs.

Ordering within a step (the caller applies the pairs as ``swap_out``, ``swap_in``,
``copy_pages``, ``update``; see ``PageAllocator.take_pending_swaps``) makes every pair read
data from before the step, except where these transactions refuse: a request is not swapped
out while a pending copy or swap-in reads or fills one of its pages, and nothing is swapped in
while a pending copy reads a page nobody owns (a swap-in could be handed that page and
overwrite it before ``copy_pages`` reads it).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING

import numpy as np

from kvshard.allocator._common import NULL_PAGE, OutOfPages

if TYPE_CHECKING:
    from kvshard.allocator._state import AllocatorParts


def _require_tier(parts: AllocatorParts, where: str) -> None:
    if not parts.tier.enabled:
        raise ValueError(f"{where}: there is no host tier (num_host_pages=0)")


def moving_columns(parts: AllocatorParts, req_id: Hashable, where: str) -> list[np.ndarray]:
    """Per group, the columns of ``req_id``'s row whose pages a swap-out moves (those it alone
    owns that are not cached); changes nothing.

    Raises:
      ValueError: no host tier, or the request is already swapped out.
      UnknownRequest: ``req_id`` is not live. TypeError: it is not hashable.
    """
    _require_tier(parts, where)
    row = parts.rows.row_of(req_id, where)
    if parts.tier.row_swapped[row]:
        raise ValueError(f"{where}: req_id={req_id!r} is already swapped out")
    moving = []
    for table in parts.tables:
        start, stop = int(table.row_released[row]), int(table.row_pages[row])
        pages = table.page_table[row, start:stop]
        own = (parts.pool.refcount[pages] == 1) & ~parts.pool.index.cached[pages]
        moving.append(start + np.flatnonzero(own))
    return moving


def swap_out(parts: AllocatorParts, req_id: Hashable) -> int:
    """Moves ``req_id``'s own pages to host pages; returns how many moved."""
    where = "swap_out_request"
    moving = moving_columns(parts, req_id, where)  # per group: the columns whose pages move
    rows, pool, tier = parts.rows, parts.pool, parts.tier
    row = rows.row_of(req_id, where)
    busy = np.concatenate([pool.pending_copies().reshape(-1), tier.swap_in_pairs()[:, 0]])
    for table in parts.tables:
        pages = table.page_table[row, int(table.row_released[row]) : int(table.row_pages[row])]
        clash = pages[np.isin(pages, busy)]
        if clash.size:
            raise ValueError(
                f"{where}: req_id={req_id!r} holds page {int(clash[0])}, which a pending copy "
                "or swap-in of this step reads or fills; apply the step first "
                "(take_pending_copies, take_pending_swaps)"
            )
    count = sum(int(cols.size) for cols in moving)
    available = tier.num_takeable
    if count > available:
        raise OutOfPages(count, available, f"{where} (host pages)")

    # ---- commit
    host = tier.take(count)
    first = 0
    for g, (table, cols) in enumerate(zip(parts.tables, moving, strict=True)):
        device = table.page_table[row, cols].copy()
        mine = host[first : first + cols.size]
        first += int(cols.size)
        tier.host_tables[g, row, cols] = mine
        table.page_table[row, cols] = NULL_PAGE
        pool.release(device)
        tier.queue_out(device, mine)
    tier.row_swapped[row] = True
    rows.row_tentative[row] = False  # swapping it out serves it: its hits stay touched
    tier.stats["swapped_out_pages"] += count
    return count


def swap_in(parts: AllocatorParts, req_id: Hashable) -> np.ndarray:
    """Brings ``req_id``'s host pages back into new device pages; returns them (row order)."""
    where = "swap_in_request"
    _require_tier(parts, where)
    rows, pool, tier = parts.rows, parts.pool, parts.tier
    row = rows.row_of(req_id, where)
    if not tier.row_swapped[row]:
        raise ValueError(f"{where}: req_id={req_id!r} is not swapped out")
    held = tier.host_tables[:, row] != NULL_PAGE  # bool[G, max_pages]
    count = int(held.sum())
    if count:
        check_swap_in_safe(parts, where)
    available = pool.num_available
    if count > available:
        raise OutOfPages(count, available, where)

    # ---- commit
    host = tier.host_tables[:, row][held]  # group by group, row order
    device = pool.take(count)
    first = 0
    for table, cols in zip(parts.tables, held, strict=True):
        n = int(cols.sum())
        table.page_table[row, cols] = device[first : first + n]
        first += n
    tier.host_tables[:, row] = NULL_PAGE
    tier.to_limbo(host)
    tier.queue_in(device, host)
    tier.row_swapped[row] = False
    tier.stats["swapped_in_pages"] += count
    return device


def check_swap_in_safe(parts: AllocatorParts, where: str) -> None:
    """Raises ValueError if a swap-in now could overwrite a page a pending copy reads."""
    exposed = parts.pool.unowned_copy_sources()
    if exposed.size:
        raise ValueError(
            f"{where}: a pending copy-on-write reads page {int(exposed[0])}, which no request "
            "owns and a swap-in could overwrite first; apply the step's copies "
            "(take_pending_copies) before swapping in"
        )


def release_host(parts: AllocatorParts, row: int) -> None:
    """Releases a freed row's host pages (into limbo: a pending swap-out may fill them)."""
    tier = parts.tier
    if tier.row_swapped[row]:
        held = tier.host_tables[:, row]
        tier.to_limbo(held[held != NULL_PAGE])
        tier.host_tables[:, row] = NULL_PAGE
        tier.row_swapped[row] = False
