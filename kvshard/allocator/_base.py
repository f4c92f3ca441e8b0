"""The allocator's constants, exceptions, numpy state and read-only queries.

Every field of a :class:`kvshard.allocator.PageAllocator` is declared and initialized here;
the other modules of the package add behaviour in layers (``_base`` -> ``_lru`` -> ``_pool``
-> ``_grow`` -> ``_prefix`` -> ``_state`` -> ``_allocator``), each using only the layers below.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np

from kvshard._errors import KvshardError

NULL_PAGE = 0
"""Page id reserved for padding writes; no request ever owns it."""

KEY_BYTES = 16  # blake2b digest size of a prefix-cache key (128 bits: collisions are moot)
ROOT_KEY = bytes(KEY_BYTES)  # the "previous key" of a request's first page
STATE_VERSION = 2  # 2: sliding_window in the config, row_released
# Bound on tokens per request (max_pages_per_request * page_size): sums of two such counts
# stay far from int64 overflow.
MAX_TOKENS = 2**62


class OutOfPages(KvshardError, RuntimeError):
    """Raised when an allocation needs more pages than are free (or evictable).

    Attributes:
        needed: pages the failed call needed.
        available: pages that were free or evictable at the time.
    """

    def __init__(self, needed: int, available: int, where: str = "allocate") -> None:
        self.needed = int(needed)
        self.available = int(available)
        super().__init__(
            f"{where}: needs {self.needed} pages but only {self.available} are free "
            "(nothing was allocated)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the attributes when the exception crosses a process boundary.
        return (type(self), (self.needed, self.available))


class UnknownRequest(KvshardError, KeyError):
    """Raised for a request id the allocator does not hold (never allocated, or freed)."""

    def __str__(self) -> str:
        # KeyError's default str() wraps the message in quotes.
        return str(self.args[0]) if self.args else ""


def check(condition: object, message: str) -> None:
    """Raises AssertionError(message) unless ``condition`` (kept under ``python -O``)."""
    if not condition:
        raise AssertionError(message)


def readonly(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


class AllocatorBase:
    """Configuration, numpy state and read-only queries of a page allocator."""

    num_pages: int
    page_size: int
    max_requests: int
    max_pages_per_request: int
    enable_prefix_caching: bool
    sliding_window: int | None

    def _init_state(self) -> None:
        n, r, m = self.num_pages, self.max_requests, self.max_pages_per_request
        # Free stack, top at index _num_free - 1; reversed so that pops hand out 1, 2, 3, ...
        self._free_pages = np.arange(n - 1, 0, -1, dtype=np.int32)
        self._num_free = n - 1
        self._refcount = np.zeros(n, np.int32)  # int32[num_pages]: owners of each page
        self._page_table = np.zeros((r, m), np.int32)  # int32[max_requests, max_pages]
        self._row_pages = np.zeros(r, np.int32)  # int32[max_requests]: columns in use
        self._row_tokens = np.zeros(r, np.int64)  # int64[max_requests]: tokens held
        # int32[max_requests]: leading columns released by the sliding window (now NULL_PAGE).
        self._row_released = np.zeros(r, np.int32)
        self._free_rows = np.arange(r - 1, -1, -1, dtype=np.int32)  # stack, pops 0, 1, ...
        self._num_free_rows = r
        self._rows: dict[Hashable, int] = {}
        # Prefix cache. A page is "cached" when it has a key; cached with refcount 0 means
        # evictable. _lru holds the stamp given when the page became evictable; evictable
        # pages also form a doubly linked list in stamp order (_lru_next/_lru_prev, derived
        # from the stamps, with the never-evictable null page as its sentinel).
        self._page_key = np.zeros((n, KEY_BYTES), np.uint8)  # uint8[num_pages, 16]
        self._cached = np.zeros(n, bool)
        self._evictable = np.zeros(n, bool)
        self._num_evictable = 0
        self._lru = np.zeros(n, np.int64)
        self._lru_next = np.zeros(n, np.int32)  # int32[num_pages]: next newer evictable page
        self._lru_prev = np.zeros(n, np.int32)  # int32[num_pages]: next older evictable page
        self._clock = 0
        self._key_to_page: dict[bytes, int] = {}  # bytes keys are not tracked by the GC
        self._row_committed = np.zeros(r, np.int32)  # full pages already hashed
        self._row_last_key = np.zeros((r, KEY_BYTES), np.uint8)  # key of the last of them
        self._row_ns = np.zeros((r, KEY_BYTES), np.uint8)  # namespace digest, once set
        self._row_has_ns = np.zeros(r, bool)
        self._stats = {"lookups": 0, "queries": 0, "hits": 0, "evictions": 0}
        self._pending: list[np.ndarray] = []  # int32[k, 2] blocks of (src_page, dst_page)
        self._mark = np.zeros(r, np.int64)  # scratch for duplicate detection

    # ------------------------------------------------------------- queries

    @property
    def page_table(self) -> np.ndarray:
        """int32[max_requests, max_pages_per_request], read-only view; row per live request."""
        return readonly(self._page_table)

    @property
    def row_num_tokens(self) -> np.ndarray:
        """int64[max_requests], read-only view: tokens held by the request in each row."""
        return readonly(self._row_tokens)

    @property
    def row_num_pages(self) -> np.ndarray:
        """int32[max_requests], read-only view: page-table columns in use in each row.

        ``ceil(tokens / page_size)``; with a sliding window the leading ones may hold
        :data:`NULL_PAGE` (released).
        """
        return readonly(self._row_pages)

    @property
    def num_free_pages(self) -> int:
        """Pages an allocation can get now: the free stack plus evictable cached pages."""
        return self._num_free + self._num_evictable

    @property
    def num_evictable_pages(self) -> int:
        """Cached pages nobody owns (part of :attr:`num_free_pages`)."""
        return self._num_evictable

    @property
    def usage(self) -> float:
        """Fraction of usable pages (the null page excluded) owned by at least one request."""
        return 1.0 - self.num_free_pages / (self.num_pages - 1)

    @property
    def prefix_stats(self) -> dict[str, int]:
        """Prefix-cache counters (a copy).

        ``lookups``: :meth:`lookup_prefix` calls; ``queries``: tokens looked up; ``hits``:
        tokens found cached (so ``hits / queries`` is the token hit rate, as in vLLM);
        ``evictions``: cached pages dropped to satisfy an allocation.
        """
        return dict(self._stats)

    def __contains__(self, req_id: object) -> bool:
        try:
            return req_id in self._rows
        except TypeError:  # unhashable: certainly not a request id
            return False

    def __len__(self) -> int:
        return len(self._rows)

    def _row_of(self, req_id: Hashable, where: str) -> int:
        try:
            return self._rows[req_id]
        except KeyError:
            raise UnknownRequest(
                f"{where}: unknown request req_id={req_id!r} (never allocated, or already freed)"
            ) from None

    def row(self, req_id: Hashable) -> int:
        """Returns the request's row in :attr:`page_table` (stable while it lives).

        Args:
            req_id: a live request id.

        Returns:
            The row index, an int in ``[0, max_requests)``.

        Raises:
            UnknownRequest: ``req_id`` is not live (never allocated, or freed).
            TypeError: ``req_id`` is not hashable.
        """
        return self._row_of(req_id, "row")

    def pages(self, req_id: Hashable) -> np.ndarray:
        """Returns a copy of the request's page ids, in token order.

        Args:
            req_id: a live request id.

        Returns:
            int32[ceil(num_tokens / page_size)]: page ids in ``[1, num_pages)``, except that
            pages released by a sliding window read :data:`NULL_PAGE` (they lead the row).

        Raises:
            UnknownRequest: ``req_id`` is not live (never allocated, or freed).
            TypeError: ``req_id`` is not hashable.
        """
        row = self._row_of(req_id, "pages")
        return self._page_table[row, : self._row_pages[row]].copy()

    def num_tokens(self, req_id: Hashable) -> int:
        """Returns the number of tokens the request holds (released ones included).

        Args:
            req_id: a live request id.

        Returns:
            The token count, an int >= 0.

        Raises:
            UnknownRequest: ``req_id`` is not live (never allocated, or freed).
            TypeError: ``req_id`` is not hashable.
        """
        return int(self._row_tokens[self._row_of(req_id, "num_tokens")])
