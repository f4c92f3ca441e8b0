"""The host-tier, prefix-reset and KV-event methods of :class:`kvshard.PageAllocator`.

A mixin so the facade (``_allocator``) stays one file of one concern each; the logic lives in
``_swap``, ``_host``, ``_prefix`` and ``_state``.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING

import numpy as np

from kvshard.allocator import _swap
from kvshard.allocator._events import KVEvent

if TYPE_CHECKING:
    from kvshard.allocator._state import AllocatorParts


class TierMethods:
    """Methods of :class:`kvshard.PageAllocator`; see there for the class contract."""

    _parts: AllocatorParts

    # ------------------------------------------------------------ host tier

    @property
    def num_free_host_pages(self) -> int:
        """Host pages a :meth:`swap_out_request` can get now: free ones plus cached host
        prefix pages (evicted for it); 0 without a host tier."""
        return self._parts.tier.num_takeable

    @property
    def tier_stats(self) -> dict[str, int]:
        """Host-tier counters (a copy), cumulative like :attr:`prefix_stats`.

        ``device_hits`` / ``host_hits``: tokens :meth:`lookup_prefix` found in each tier (their
        sum is ``prefix_stats["hits"]``); ``demoted_pages``: pages evicted from the device
        prefix cache and kept in the host tier; ``host_evictions``: cached host pages dropped
        (for a swap-out or a newer demotion); ``swapped_out_pages`` / ``swapped_in_pages``:
        pages moved by :meth:`swap_out_request` / :meth:`swap_in_request`.
        """
        return dict(self._parts.tier.stats)

    def is_swapped_out(self, req_id: Hashable) -> bool:
        """Whether a live request is swapped out (not schedulable until swapped in).

        Raises:
            UnknownRequest: ``req_id`` is not live. TypeError: it is not hashable.
        """
        parts = self._parts
        return bool(parts.tier.row_swapped[parts.rows.row_of(req_id, "is_swapped_out")])

    def swap_out_request(self, req_id: Hashable) -> int:
        """Preempts a request by swap: its own pages move to host pages, freeing device pages.

        Moves the pages only this request owns and that are not prefix-cached; a page shared
        with another request or cached stays on device, still owned by this request (so no
        other request or lookup sees a change). The moved columns of its page-table row read
        :data:`NULL_PAGE` until :meth:`swap_in_request`; :meth:`num_tokens` is unchanged. Each
        move queues a (device page, host page) pair for :meth:`take_pending_swaps`; the device
        pages are free at once (a later allocation in the same step may take them: the step
        applies swap-outs first). While swapped out the request cannot be grown, forked,
        truncated or committed (ValueError); :meth:`free` releases it. Swap out a request that
        the current step does not schedule: the pairs move the pages as they were before the
        step's update. Host pages come from the free host stack first, then from the host
        prefix cache (least recently kept first). With several KV-cache groups every group's
        own pages move, their pairs group by group. All or nothing.

        Args:
            req_id: a live request that is not swapped out.

        Returns:
            The number of pages moved (0 if it owns none alone; it is swapped out even then).

        Raises:
            ValueError: there is no host tier; the request is already swapped out; one of its
                pages is read or filled by a pending copy or swap-in of this step.
            OutOfPages: more pages must move than host pages are free or evictable (the
                message says "host pages"). Nothing changes then.
            UnknownRequest: ``req_id`` is not live. TypeError: it is not hashable.
        """
        return _swap.swap_out(self._parts, req_id)

    def swap_in_request(self, req_id: Hashable) -> np.ndarray:
        """Brings a swapped-out request back into NEW device pages; it is schedulable again.

        The page-table row is rewritten with the new pages at the columns that moved, and
        each (new device page, host page) pair is queued for :meth:`take_pending_swaps`. The
        host pages are free once the pairs are taken. Taking device pages may evict cached
        ones (and keep them in the host prefix cache). All or nothing.

        Returns:
            int32[k]: the new device pages, in row order (group by group with several
            KV-cache groups).

        Raises:
            ValueError: there is no host tier; the request is not swapped out; a pending
                copy-on-write reads a page nobody owns (apply the copies first).
            OutOfPages: fewer device pages are free or evictable than it needs.
            UnknownRequest: ``req_id`` is not live. TypeError: it is not hashable.
        """
        return _swap.swap_in(self._parts, req_id)

    def take_pending_swaps(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns the queued swaps and clears them: ``(swap_out_pairs, swap_in_pairs)``.

        Each is int32[K, 2] of (device page, host page) rows, device pages in
        ``[1, num_pages)``, host pages in ``[1, num_host_pages)``, in the order queued
        (int32[0, 2] when none): for ``kvshard.swap_out(cache, host, swap_out_pairs)`` and
        ``kvshard.swap_in(cache, host, swap_in_pairs)``, as they come or padded to a fixed K
        with ``(-1, -1)`` rows (not ``(0, 0)``: see docs/tiers.md). Apply one step as: swap-out,
        then
        swap-in, then ``copy_pages(take_pending_copies())``, then the KV update:

        * swap-out first: it reads device pages that this step's swap-ins, copies and update
          may hand to others and overwrite (a page freed by a swap-out or evicted into the host
          tier is free at once);
        * swap-in before the copies: a copy may read a page swapped in this step (a request
          swapped in, then forked and grown), and a swap-in only writes pages that no pending
          copy reads (refused otherwise);
        * the copies before the update, as always.

        Host pages freed this step (swapped in, hit, freed) are handed out again only after
        this call, so no two pending pairs write one host page. Never raises.
        """
        pairs = self._parts.tier.take_pending()
        self._parts.reset_order_if_empty()  # host pages freed in a step return only now
        return pairs

    # ------------------------------------------------------- prefix cache

    def reset_prefix_cache(self) -> bool:
        """Drops every cached page of both tiers, as vLLM's ``reset_prefix_cache`` (e.g. after
        a weight update); returns whether it could.

        Like vLLM it refuses (returns False, changing nothing) while any page is in use:
        owned by a request, or on the host for a swapped-out request, or while swap pairs are
        pending. Otherwise every cached page becomes plain free, an ``AllPagesCleared`` event
        is queued, and the allocator's page order is a fresh one's. Keeps :attr:`prefix_stats`.
        """
        return self._parts.reset_prefix_cache()

    def take_kv_events(self) -> list[KVEvent]:
        """Returns the queued KV-cache events, oldest first, and clears the queue.

        Needs ``enable_kv_events=True`` (else always ``[]``). The events are those of vLLM's
        KV-cache event stream, for KV-aware routers: ``PagesStored`` (pages committed to the
        device prefix cache, promoted to it by a host hit, or kept in the host tier: its
        ``medium``), ``PagesRemoved`` (evicted, moved to the other tier), ``AllPagesCleared``
        (:meth:`reset_prefix_cache`, and first after :meth:`load_state_dict`, which then
        re-announces every cached page). Not part of :meth:`state_dict`. Never raises.
        """
        return self._parts.events.take()
