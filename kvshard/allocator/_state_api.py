"""The state methods of :class:`kvshard.PageAllocator`: save, restore, digest, invariants.

A mixin so the facade (``_allocator``) stays one file of one concern each; the logic lives in
``_state`` (:class:`~kvshard.allocator._state.AllocatorParts`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvshard.allocator._state import AllocatorParts


class StateMethods:
    """Methods of :class:`kvshard.PageAllocator`; see there for the class contract."""

    _parts: AllocatorParts

    # ------------------------------------------------------ state and checks

    def state_dict(self) -> dict[str, Any]:
        """Returns a deep copy of the state: numpy arrays, ints and plain dicts/lists.

        Only the live part of the stacks is kept, so equal states give equal dicts. Includes
        the :attr:`prefix_stats` counters and the pending copy-on-write copies. Never raises.

        Returns:
            A dict for :meth:`load_state_dict`: ``"version"`` (5; version 4 states, from
            before layer groups, still load), ``"config"``,
            ``"free_pages"`` (int32[num_free]), ``"free_rows"`` (int32[num_free_rows]),
            ``"rows"`` (request id -> row), ``"clock"``, ``"prefix_stats"``,
            ``"pending_copies"`` (int32[K, 2]) and the per-page and per-row arrays, e.g.
            ``"refcount"`` (int32[num_pages]), ``"page_table"``
            (int32[max_requests, max_pages_per_request]), ``"row_released"``
            (int32[max_requests], columns released by the sliding window) and
            ``"row_tentative"`` (bool[max_requests], looked up and not served since),
            ``"page_group"`` (int32[num_pages], the group of each cached page); with
            ``num_groups > 1`` the tables' arrays (``page_table``, ``row_pages``,
            ``row_released``, ``host_table``) gain a leading group axis; and the
            host tier's: ``"host_free"``, ``"host_clock"``, ``"host_stats"``,
            ``"pending_swap_out"`` / ``"pending_swap_in"`` (int32[K, 2]), ``"host_table"``
            (int32[max_requests, max_pages_per_request]), ``"row_swapped"``,
            ``"host_key"``, ``"host_cached"``, ``"host_lru"`` and ``"host_limbo"``.
        """
        return self._parts.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a :meth:`state_dict` (same configuration); validated before anything moves.

        The whole state is checked first, everything :meth:`check_invariants` checks included
        (page and row ids in range, no duplicates, each row owned once, reference counts equal
        to owners, the prefix index consistent with the page keys, the eviction clock at most
        ``2**62``), then swapped in, so every state it accepts serves every operation. The
        arrays are copied in; :attr:`page_table` views taken before the call go stale.

        Args:
            state: a dict returned by :meth:`state_dict` of an allocator with the same
                constructor arguments.

        Raises:
            TypeError: ``state`` is not a dict.
            ValueError: an entry is missing, the version or config differs, or an entry is
                malformed or inconsistent; the message names it. Nothing changes then.
        """
        self._parts = self._parts.load(state)

    def checksum(self) -> str:
        """Returns a hex blake2b digest of the whole state; equal states give equal digests.

        Deterministic across processes and hosts (request ids enter through ``repr``). The
        digest covers everything :meth:`state_dict` returns, including the cumulative
        counters :attr:`prefix_stats` and :attr:`tier_stats` (saved as ``"host_stats"``; its
        ``device_hits`` count lookup hits with or without a host tier), which :meth:`free`
        never resets. With prefix caching off those counters stay 0, so freeing every request
        restores the digest of a fresh allocator with the same arguments; with it on, the same
        holds once nothing is cached, up to both counters.

        Returns:
            32 lowercase hex characters (a 128-bit digest). Never raises.
        """
        return self._parts.checksum()

    def check_invariants(self) -> None:
        """Checks every internal invariant (O(num_pages · max_pages_per_request); for tests).

        Raises:
            AssertionError: naming the first broken invariant and its field (raised
                explicitly, so also under ``python -O``).
        """
        self._parts.check_invariants()
