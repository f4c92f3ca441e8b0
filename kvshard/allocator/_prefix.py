"""Prefix caching: ``lookup_prefix`` attaches cached pages, ``commit_prefix`` registers them.

A full page's key chains the previous page's key, a namespace digest and the page's token
bytes (:func:`kvshard.allocator._lru.chain_key`), so a key names a whole prefix.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

import numpy as np

from kvshard.allocator._base import ROOT_KEY
from kvshard.allocator._grow import Growth
from kvshard.allocator._lru import chain_key, namespace_digest, token_bytes


class PrefixCache(Growth):
    """``lookup_prefix`` and ``commit_prefix``."""

    def _require_prefix_caching(self, where: str) -> None:
        if not self.enable_prefix_caching:
            raise ValueError(f"{where}: prefix caching is disabled (enable_prefix_caching=False)")

    def _page_keys(
        self, data: bytes, prev: bytes, namespace: bytes, first: int, stop: int
    ) -> Iterable[bytes]:
        """Yields the chained keys of full pages ``first .. stop - 1`` of token bytes ``data``."""
        step = self.page_size * 8
        for page in range(first, stop):
            prev = chain_key(prev, namespace, data[page * step : (page + 1) * step])
            yield prev

    def lookup_prefix(
        self,
        req_id: Hashable,
        token_ids: Sequence[int] | np.ndarray,
        namespace: str | bytes | None = None,
    ) -> int:
        """Attaches the cached pages of the longest cached prefix of ``token_ids`` to a request.

        Only pages committed under the same ``namespace`` match. Counts toward
        :attr:`prefix_stats`. All or nothing: a call that raises changes nothing.

        Args:
            req_id: a new id (it is created) or a live request holding no tokens.
            token_ids: int[T], the prompt (any integer dtype; compared as int64).
            namespace: str, bytes or None; None, ``""`` and ``b""`` are distinct namespaces.

        Returns:
            The number of tokens whose KV is already in the attached pages: a multiple of
            ``page_size``, and at most ``T - 1`` so the last prompt token is always computed
            (its logits are needed).

        Raises:
            ValueError: prefix caching is disabled; ``token_ids`` is not a 1-D integer array;
                ``req_id`` already holds tokens; ``req_id`` is new and all ``max_requests`` rows
                are in use.
            TypeError: ``namespace`` is not str, bytes or None, or ``req_id`` is not hashable.
        """
        where = "lookup_prefix"
        self._require_prefix_caching(where)
        data, length = token_bytes(token_ids, where)
        ns = namespace_digest(namespace)
        row = self._rows.get(req_id)  # TypeError for an unhashable id, before any change
        if row is not None and self._row_tokens[row] != 0:
            raise ValueError(
                f"{where}: req_id={req_id!r} already holds {int(self._row_tokens[row])} tokens; "
                "look up a prefix before allocating"
            )
        new_row = self._take_row(req_id, where) if row is None else None
        limit = min(max(length - 1, 0) // self.page_size, self.max_pages_per_request)
        hits: list[int] = []
        last_key = ROOT_KEY
        for key in self._page_keys(data, ROOT_KEY, ns, 0, limit):
            page = self._key_to_page.get(key)
            if page is None:
                break
            hits.append(page)
            last_key = key

        # ---- commit
        if new_row is not None:
            self._commit_row(req_id, new_row)
            row = new_row
        assert row is not None
        found = np.array(hits, np.int32)
        self._page_table[row, : found.size] = found
        self._refcount[found] += 1
        self._revive(found)
        self._row_pages[row] = found.size
        self._row_tokens[row] = found.size * self.page_size
        self._row_committed[row] = found.size
        self._row_last_key[row] = np.frombuffer(last_key, np.uint8)
        self._row_ns[row] = np.frombuffer(ns, np.uint8)
        self._row_has_ns[row] = True
        self._stats["lookups"] += 1
        self._stats["queries"] += length
        self._stats["hits"] += found.size * self.page_size
        return int(found.size * self.page_size)

    def commit_prefix(
        self,
        req_id: Hashable,
        token_ids: Sequence[int] | np.ndarray,
        namespace: str | bytes | None = None,
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

        Returns:
            The number of pages newly registered (an int >= 0).

        Raises:
            ValueError: prefix caching is disabled; ``token_ids`` is not a 1-D integer array;
                ``namespace`` differs from the one this request was looked up or committed
                with.
            UnknownRequest: ``req_id`` is not live.
            TypeError: ``namespace`` is not str, bytes or None, or ``req_id`` is not hashable.
        """
        where = "commit_prefix"
        self._require_prefix_caching(where)
        row = self._row_of(req_id, where)
        data, length = token_bytes(token_ids, where)
        ns = namespace_digest(namespace)
        if self._row_has_ns[row] and self._row_ns[row].tobytes() != ns:
            raise ValueError(
                f"{where}: namespace={namespace!r} differs from the namespace req_id={req_id!r} "
                "was looked up or committed with"
            )
        full = min(length, int(self._row_tokens[row])) // self.page_size
        done = int(self._row_committed[row])
        prev = self._row_last_key[row].tobytes() if done else ROOT_KEY
        keys = list(self._page_keys(data, prev, ns, done, full)) if full > done else []
        pages = self._page_table[row, done:full].tolist() if keys else []
        # A page cached already (shared through fork or a lookup) keeps its key: a page has
        # one key, and a forked request may commit under a different namespace.
        fresh = [
            (key, page)
            for key, page in zip(keys, pages, strict=True)
            if not self._cached[page] and key not in self._key_to_page
        ]

        # ---- commit
        for key, page in fresh:
            self._key_to_page[key] = page
            self._page_key[page] = np.frombuffer(key, np.uint8)
            self._cached[page] = True
        if keys:
            self._row_committed[row] = full
            self._row_last_key[row] = np.frombuffer(keys[-1], np.uint8)
        self._row_ns[row] = np.frombuffer(ns, np.uint8)
        self._row_has_ns[row] = True
        return len(fresh)
