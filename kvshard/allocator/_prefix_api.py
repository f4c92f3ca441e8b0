"""The prefix-cache methods of :class:`kvshard.PageAllocator`: peek, lookup and commit.

A mixin so the facade (``_allocator``) stays one file of one concern each; the logic lives in
``_prefix`` (one :class:`~kvshard.allocator._prefix.PrefixQuery` per call, the hybrid hit rule
of layer groups) and ``_prefix_index``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from kvshard.allocator import _prefix

if TYPE_CHECKING:
    from kvshard.allocator._state import AllocatorParts


class PrefixMethods:
    """Methods of :class:`kvshard.PageAllocator`; see there for the class contract."""

    _parts: AllocatorParts
    enable_prefix_caching: bool

    # -------------------------------------------------------- prefix cache

    def _require_prefix_caching(self, where: str) -> None:
        if not self.enable_prefix_caching:
            raise ValueError(f"{where}: prefix caching is disabled (enable_prefix_caching=False)")

    def peek_prefix(
        self,
        token_ids: Sequence[int] | np.ndarray,
        namespace: str | bytes | None = None,
        *,
        extra_keys: Sequence[Any] | None = None,
    ) -> int:
        """Returns what :meth:`lookup_prefix` would return now, attaching and counting nothing.

        The eviction order, :attr:`prefix_stats` and every request stay as they are, so a
        scheduler can size a request before admitting it (vLLM's ``get_computed_blocks``).

        Args:
            token_ids: int[T], the prompt (any integer dtype; compared as int64).
            namespace: str, bytes or None, as for :meth:`lookup_prefix`.
            extra_keys: per-page extra keys, as for :meth:`lookup_prefix`.

        Returns:
            The cached prefix in tokens: a multiple of ``page_size``, at most ``T - 1``.

        Raises:
            ValueError: prefix caching is disabled; ``token_ids`` is not a 1-D integer array.
            TypeError: ``namespace`` is not str, bytes or None.
        """
        self._require_prefix_caching("peek_prefix")
        return _prefix.peek(self._parts, _prefix.PrefixQuery(token_ids, namespace, extra_keys))

    def lookup_prefix(
        self,
        req_id: Hashable,
        token_ids: Sequence[int] | np.ndarray,
        namespace: str | bytes | None = None,
        *,
        extra_keys: Sequence[Any] | None = None,
    ) -> int:
        """Attaches the cached pages of the longest cached prefix of ``token_ids`` to a request.

        Only pages committed under the same ``namespace`` match. Counts toward
        :attr:`prefix_stats`. All or nothing: a call that raises changes nothing.

        The hit pages are attached at once (one more owner each), so nothing between this
        call and the request's :meth:`allocate` can evict them. The lookup is undone if the
        request is freed before any :meth:`allocate` (or :meth:`fork`, :meth:`truncate`)
        serves it, e.g. after :class:`OutOfPages`: its hits then return to the eviction order
        where they were, as in vLLM, which touches hits only once their allocation succeeds
        (O(num_pages) for that free). :meth:`peek_prefix` sizes a request without attaching.

        Args:
            req_id: a new id (it is created) or a live request holding no tokens.
            token_ids: int[T], the prompt (any integer dtype; compared as int64).
            namespace: str, bytes or None; None, ``""`` and ``b""`` are distinct namespaces.
            extra_keys: None, or a sequence whose item ``i`` is page ``i``'s extra key (pages
                past its end have none): None, int, str, bytes or a tuple of them, e.g. the
                hash of a multimodal input whose placeholders the page holds, or a LoRA id.
                Folded into the page's key and so into every later page's: a page matches
                only under the same extra keys as when it was committed.

        With a host tier (``host_prefix_pages > 0``), a page found only in the host prefix
        cache is attached too: it gets a new device page (taking it may evict), its
        (device page, host page) pair is queued for :meth:`take_pending_swaps`, and its
        tokens count as hits (:attr:`tier_stats` splits device and host hits). The match
        stops at the first host hit for which no device page is free or evictable, and
        takes no host hit while a pending copy reads a page nobody owns (a swap-in could
        overwrite it first).

        Returns:
            The number of tokens whose KV is already in the attached pages: a multiple of
            ``page_size``, and at most ``T - 1`` so the last prompt token is always computed
            (its logits are needed).

        Raises:
            ValueError: prefix caching is disabled; ``token_ids`` is not a 1-D integer array;
                ``req_id`` already holds tokens or is swapped out; ``req_id`` is new and all
                ``max_requests`` rows are in use.
            TypeError: ``namespace`` is not str, bytes or None, or ``req_id`` is not hashable.
        """
        self._require_prefix_caching("lookup_prefix")
        query = _prefix.PrefixQuery(token_ids, namespace, extra_keys)
        return _prefix.lookup(self._parts, req_id, query)

    def commit_prefix(
        self,
        req_id: Hashable,
        token_ids: Sequence[int] | np.ndarray,
        namespace: str | bytes | None = None,
        *,
        extra_keys: Sequence[Any] | None = None,
    ) -> int:
        """Registers the request's full pages in the prefix cache; returns how many were new.

        Pages registered earlier for this request are not hashed again. A page whose key is
        already cached on another page is left uncached (its twin serves lookups), and a page
        cached already keeps its key. All or nothing: a call that raises changes nothing.

        Args:
            req_id: a live request id.
            token_ids: int[T], the request's tokens from its first one, at least up to the
                pages to register; only full pages within ``min(T, num_tokens(req_id))`` are
                registered. Cover only tokens whose KV is computed.
            namespace: str, bytes or None; must match earlier lookups/commits of this request.
            extra_keys: per-page extra keys as for :meth:`lookup_prefix` (give the same ones
                on every commit of the request: pages hashed earlier are not hashed again).

        Returns:
            The number of pages newly registered (an int >= 0).

        Raises:
            ValueError: prefix caching is disabled; ``token_ids`` is not a 1-D integer array;
                ``namespace`` differs from the one this request was looked up or committed
                with; the request is swapped out.
            UnknownRequest: ``req_id`` is not live.
            TypeError: ``namespace`` is not str, bytes or None, or ``req_id`` is not hashable.
        """
        self._require_prefix_caching("commit_prefix")
        query = _prefix.PrefixQuery(token_ids, namespace, extra_keys)
        return _prefix.commit(self._parts, req_id, query)
