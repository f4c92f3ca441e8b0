"""Host-side page allocator for the paged KV cache: numpy state, transactional, prefix caching.

A :class:`PageAllocator` decides which cache pages each request owns. It runs on the host at
every scheduler step, for thousands of requests, so

* all state lives in a handful of numpy arrays (a free stack of page ids, reference counts, the
  page table) plus one ``dict`` from request id to page-table row: no Python object per page,
  so a large pool adds nothing for the garbage collector to walk (under tensor parallelism a GC
  pause on one host stalls every host);
* every public method checks everything first and mutates only once nothing can fail
  (check-then-commit): a call that raises leaves :meth:`PageAllocator.checksum` unchanged;
* :meth:`PageAllocator.allocate_batch` grows a whole step's requests with vectorized numpy.

Pages are logical: one page id names the same rows on every device of a head-sharded mesh, so
one page table serves all tensor-parallel shards; a data-parallel deployment keeps one
allocator per pool.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterable, Sequence
from itertools import repeat
from operator import itemgetter
from typing import Any

import numpy as np

NULL_PAGE = 0
"""Page id reserved for padding writes; no request ever owns it."""

_KEY_BYTES = 16  # blake2b digest size of a prefix-cache key (128 bits: collisions are moot)
_ROOT_KEY = bytes(_KEY_BYTES)  # the "previous key" of a request's first page
_STATE_VERSION = 1
# Bound on tokens per request (max_pages_per_request * page_size): sums of two such counts
# stay far from int64 overflow.
_MAX_TOKENS = 2**62


class OutOfPages(RuntimeError):
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


class UnknownRequest(KeyError):
    """Raised for a request id the allocator does not hold (never allocated, or freed)."""

    def __str__(self) -> str:
        # KeyError's default str() wraps the message in quotes.
        return str(self.args[0]) if self.args else ""


def _namespace_digest(namespace: str | bytes | None) -> bytes:
    """Returns bytes[16]: a digest of a prefix-cache namespace (None, str and bytes differ)."""
    if namespace is None:
        raw = b"\x00"
    elif isinstance(namespace, str):
        raw = b"\x01" + namespace.encode("utf-8")
    elif isinstance(namespace, bytes):
        raw = b"\x02" + namespace
    else:
        raise TypeError(f"namespace must be str, bytes or None, got {type(namespace).__name__}")
    return hashlib.blake2b(raw, digest_size=_KEY_BYTES).digest()


def _chain_key(prev: bytes, namespace: bytes, page_tokens: bytes) -> bytes:
    """Returns the cache key of one full page: blake2b(previous key, namespace, token bytes).

    Bytes in, bytes out, so every host computes the same key (unlike ``hash()`` of a ``str``).
    """
    h = hashlib.blake2b(prev, digest_size=_KEY_BYTES)
    h.update(namespace)
    h.update(page_tokens)
    return h.digest()


def _token_bytes(token_ids: Sequence[int] | np.ndarray, what: str) -> tuple[bytes, int]:
    """Returns (little-endian int64 bytes of the tokens, number of tokens)."""
    tokens = np.asarray(token_ids)
    if tokens.ndim != 1:
        raise ValueError(f"{what}: token_ids must be 1-D, got shape {tokens.shape}")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{what}: token_ids must be integers, got dtype {tokens.dtype}")
    return tokens.astype("<i8", copy=False).tobytes(), int(tokens.size)


def _check(condition: object, message: str) -> None:
    """Raises AssertionError(message) unless ``condition`` (kept under ``python -O``)."""
    if not condition:
        raise AssertionError(message)


def _readonly(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


class PageAllocator:
    """Assigns KV-cache pages to requests; one page table row per live request.

    Page ``0`` is the **null page**: it is never free and never owned by a request. Unused
    page-table entries hold 0 and padding writes (slices of length 0, padded tokens) may target
    it, so a stale or padded index can never reach another request's data. Usable pages are
    ``1 .. num_pages - 1``.

    A request holding ``t`` tokens owns exactly ``ceil(t / page_size)`` pages, listed in
    ``page_table[row(req_id), :ceil(t / page_size)]``; the rest of the row is 0.

    Sharing: :meth:`fork` and prefix-cache hits share pages by reference count. A shared page
    that is only partly filled is copied on write: when :meth:`allocate` appends to a request
    whose last page is partial and shared, the request gets a private page and the pair
    ``(src_page, dst_page)`` is queued; :meth:`take_pending_copies` returns and clears the queue.
    The caller must apply those copies on the device (``kvshard.copy_pages``) before this step's
    KV update writes the new tokens.

    Prefix caching (``enable_prefix_caching=True``): :meth:`commit_prefix` registers a request's
    full pages under a chained key of their tokens and a namespace; :meth:`lookup_prefix`
    attaches cached pages to a new request. A cached page whose last owner is freed stays cached
    (evictable) and is reused, least recently freed first, only once the plain free stack is
    empty. :attr:`num_free_pages` counts free and evictable pages.

    Not thread-safe. Request ids may be any hashable; use ints, strs or tuples of them where
    :meth:`checksum` must agree across hosts (it hashes ``repr(req_id)``).

    Args:
        num_pages: pages in the pool, null page included; int in ``[2, 2**31 - 1]``.
        page_size: tokens per page; int >= 1.
        max_requests: rows of :attr:`page_table` (live requests at once); int >= 1.
        max_pages_per_request: columns of :attr:`page_table`; int >= 1.
        enable_prefix_caching: allow :meth:`lookup_prefix` and :meth:`commit_prefix`.

    Raises:
        ValueError: an argument is not an int (bools rejected) or is below its minimum, or
            ``num_pages`` does not fit int32.
    """

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        *,
        max_requests: int,
        max_pages_per_request: int,
        enable_prefix_caching: bool = False,
    ) -> None:
        for name, value, low in (
            ("num_pages", num_pages, 2),
            ("page_size", page_size, 1),
            ("max_requests", max_requests, 1),
            ("max_pages_per_request", max_pages_per_request, 1),
        ):
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
                raise ValueError(f"PageAllocator: {name}={value!r} must be an int >= {low}")
        if num_pages > np.iinfo(np.int32).max:
            raise ValueError(f"PageAllocator: num_pages={num_pages} does not fit int32")
        if int(max_pages_per_request) * int(page_size) > _MAX_TOKENS:
            raise ValueError(
                f"PageAllocator: max_pages_per_request*page_size="
                f"{int(max_pages_per_request) * int(page_size)} must be <= 2**62"
            )
        self.num_pages = int(num_pages)
        self.page_size = int(page_size)
        self.max_requests = int(max_requests)
        self.max_pages_per_request = int(max_pages_per_request)
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self._init_state()

    # ------------------------------------------------------------------ state

    def _init_state(self) -> None:
        n, r, m = self.num_pages, self.max_requests, self.max_pages_per_request
        # Free stack, top at index _num_free - 1; reversed so that pops hand out 1, 2, 3, ...
        self._free_pages = np.arange(n - 1, 0, -1, dtype=np.int32)
        self._num_free = n - 1
        self._refcount = np.zeros(n, np.int32)  # int32[num_pages]: owners of each page
        self._page_table = np.zeros((r, m), np.int32)  # int32[max_requests, max_pages]
        self._row_pages = np.zeros(r, np.int32)  # int32[max_requests]: pages held
        self._row_tokens = np.zeros(r, np.int64)  # int64[max_requests]: tokens held
        self._free_rows = np.arange(r - 1, -1, -1, dtype=np.int32)  # stack, pops 0, 1, ...
        self._num_free_rows = r
        self._rows: dict[Hashable, int] = {}
        # Prefix cache. A page is "cached" when it has a key; cached with refcount 0 means
        # evictable. _lru holds the stamp given when the page became evictable.
        self._page_key = np.zeros((n, _KEY_BYTES), np.uint8)  # uint8[num_pages, 16]
        self._cached = np.zeros(n, bool)
        self._evictable = np.zeros(n, bool)
        self._num_evictable = 0
        self._lru = np.zeros(n, np.int64)
        self._clock = 0
        self._key_to_page: dict[bytes, int] = {}  # bytes keys are not tracked by the GC
        self._row_committed = np.zeros(r, np.int32)  # full pages already hashed
        self._row_last_key = np.zeros((r, _KEY_BYTES), np.uint8)  # key of the last of them
        self._row_ns = np.zeros((r, _KEY_BYTES), np.uint8)  # namespace digest, once set
        self._row_has_ns = np.zeros(r, bool)
        self._stats = {"lookups": 0, "queries": 0, "hits": 0, "evictions": 0}
        self._pending: list[np.ndarray] = []  # int32[k, 2] blocks of (src_page, dst_page)
        self._mark = np.zeros(r, np.int64)  # scratch for duplicate detection

    # ------------------------------------------------------------- queries

    @property
    def page_table(self) -> np.ndarray:
        """int32[max_requests, max_pages_per_request], read-only view; row per live request."""
        return _readonly(self._page_table)

    @property
    def row_num_tokens(self) -> np.ndarray:
        """int64[max_requests], read-only view: tokens held by the request in each row."""
        return _readonly(self._row_tokens)

    @property
    def row_num_pages(self) -> np.ndarray:
        """int32[max_requests], read-only view: pages held by the request in each row."""
        return _readonly(self._row_pages)

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
            int32[ceil(num_tokens / page_size)]: page ids in ``[1, num_pages)``.

        Raises:
            UnknownRequest: ``req_id`` is not live (never allocated, or freed).
            TypeError: ``req_id`` is not hashable.
        """
        row = self._row_of(req_id, "pages")
        return self._page_table[row, : self._row_pages[row]].copy()

    def num_tokens(self, req_id: Hashable) -> int:
        """Returns the number of tokens the request holds.

        Args:
            req_id: a live request id.

        Returns:
            The token count, an int >= 0.

        Raises:
            UnknownRequest: ``req_id`` is not live (never allocated, or freed).
            TypeError: ``req_id`` is not hashable.
        """
        return int(self._row_tokens[self._row_of(req_id, "num_tokens")])

    # ----------------------------------------------------------- allocation

    def allocate(self, req_id: Hashable, num_new_tokens: int) -> np.ndarray:
        """Grows ``req_id`` (created on first use) by ``num_new_tokens`` tokens.

        All or nothing: a call that raises changes nothing.

        Args:
            req_id: any hashable; a new id takes a free page-table row.
            num_new_tokens: int >= 0; the request then holds at most
                ``max_pages_per_request * page_size`` tokens.

        Returns:
            int32[k]: the page ids newly written into the request's page-table row, in row
            order (a copy-on-write replacement of the last page first, if one was needed; see
            :meth:`take_pending_copies`).

        Raises:
            OutOfPages: the growth needs more pages than are free or evictable.
            ValueError: ``num_new_tokens`` is not an int or is negative; the request would
                exceed ``max_pages_per_request``; ``req_id`` is new and all ``max_requests``
                rows are in use.
            TypeError: ``req_id`` is not hashable.
        """
        if isinstance(num_new_tokens, bool) or not isinstance(num_new_tokens, int | np.integer):
            raise ValueError(f"allocate: num_new_tokens={num_new_tokens!r} must be an int")
        # Bounded as a Python int: np.array(2**70) would overflow and 2**63-1 wraps later.
        limit = self.max_pages_per_request * self.page_size
        if num_new_tokens > limit:
            raise ValueError(
                f"allocate: num_new_tokens={int(num_new_tokens)} for req_id={req_id!r} exceeds "
                f"max_pages_per_request*page_size={limit}"
            )
        _, pages = self._grow([req_id], np.array([num_new_tokens], np.int64), "allocate")
        return pages

    def allocate_batch(
        self, req_ids: Sequence[Hashable] | np.ndarray, num_new_tokens: Sequence[int] | np.ndarray
    ) -> np.ndarray:
        """Grows every request of one step; the same as ``allocate`` on each, in order.

        All or nothing for the whole batch: a call that raises changes nothing.

        Args:
            req_ids: B distinct hashable ids (a list, or a numpy array whose items become
                Python scalars); new ones are created.
            num_new_tokens: int[B] >= 0, tokens each request grows by.

        Returns:
            int32[B]: each request's row, so ``page_table[rows]`` is the step's page table (or
            pass ``rows`` to :func:`kvshard.metadata.build_update_slices`).

        Raises:
            OutOfPages: the batch needs more pages in all than are free or evictable.
            ValueError: ``num_new_tokens`` is not an integer array of shape [B] or holds a
                negative count; B > ``max_requests``; ``req_ids`` holds duplicates; a request
                would exceed ``max_pages_per_request``; the new ids need more rows than are
                free.
            TypeError: an id is not hashable.
        """
        # numpy scalars would become (differently printed) keys
        ids: Sequence[Hashable] = req_ids.tolist() if isinstance(req_ids, np.ndarray) else req_ids
        counts = np.asarray(num_new_tokens)
        if counts.size and not np.issubdtype(counts.dtype, np.integer):
            raise ValueError(f"allocate_batch: num_new_tokens must be integers, got {counts.dtype}")
        # Range checks in the caller's dtype: a uint64 above 2**63 would wrap in astype(int64).
        limit = self.max_pages_per_request * self.page_size
        if counts.ndim == 1 and counts.shape[0] == len(ids):
            hit = np.flatnonzero((counts < 0) | (counts > limit))
            if hit.size:
                i = int(hit[0])
                raise ValueError(
                    f"allocate_batch: num_new_tokens={int(counts[i])} for req_id={ids[i]!r} "
                    f"must be in [0, max_pages_per_request*page_size={limit}]"
                )
        rows, _ = self._grow(ids, counts.astype(np.int64, copy=False), "allocate_batch")
        return rows

    def _known_rows(self, req_ids: Sequence[Hashable]) -> np.ndarray | None:
        """Returns int64[B] rows if every id is live, else None (the steady-state fast path)."""
        if len(req_ids) < 2:
            return None  # itemgetter of one key returns the value itself, not a tuple
        try:
            # One C call for all B lookups: about half the cost of map(dict.get, ...).
            found = itemgetter(*req_ids)(self._rows)
        except KeyError:
            return None
        return np.fromiter(found, dtype=np.int64, count=len(req_ids))

    def _lookup_rows(
        self, req_ids: Sequence[Hashable], where: str
    ) -> tuple[np.ndarray, list[Hashable], np.ndarray]:
        """Returns (int64[B] rows, new ids, int64[new] positions); new rows are not yet taken."""
        count = len(req_ids)
        if count > self.max_requests:
            raise ValueError(
                f"{where}: batch of {count} requests exceeds max_requests={self.max_requests}"
            )
        rows = self._known_rows(req_ids)
        if rows is None:  # some ids are new
            rows = np.fromiter(
                map(self._rows.get, req_ids, repeat(-1, count)), dtype=np.int64, count=count
            )
            new_pos = np.flatnonzero(rows < 0)
        else:
            new_pos = np.zeros(0, np.int64)
        new_ids: list[Hashable] = []
        if new_pos.size:
            new_ids = [req_ids[i] for i in new_pos.tolist()]
            if len(set(new_ids)) != len(new_ids):
                raise ValueError(f"{where}: req_ids contains duplicates")
            if len(new_ids) > self._num_free_rows:
                more = f" and {len(new_ids) - 1} other new requests" if len(new_ids) > 1 else ""
                raise ValueError(
                    f"{where}: cannot add req_id={new_ids[0]!r}{more}: only "
                    f"{self._num_free_rows} of max_requests={self.max_requests} rows are free"
                )
            top = self._num_free_rows
            rows[new_pos] = self._free_rows[top - len(new_ids) : top][::-1]
        # Distinct rows <=> distinct ids (new ids got distinct free rows above).
        iota = np.arange(count)
        self._mark[rows] = iota
        dup = np.flatnonzero(self._mark[rows] != iota)
        if dup.size:
            raise ValueError(f"{where}: req_ids contains duplicates, e.g. {req_ids[dup[0]]!r}")
        return rows, new_ids, new_pos

    def _grow(
        self, req_ids: Sequence[Hashable], counts: np.ndarray, where: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Core of allocate/allocate_batch. Returns (int32[B] rows, int32[k] new pages)."""
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
        rows, new_ids, new_pos = self._lookup_rows(req_ids, where)
        size = self.page_size
        old_tokens = self._row_tokens[rows]
        old_pages = self._row_pages[rows]
        total = old_tokens + counts
        need = (total + (size - 1)) // size
        over = np.flatnonzero(need > self.max_pages_per_request)
        if over.size:
            i = int(over[0])
            raise ValueError(
                f"{where}: req_id={req_ids[i]!r} would hold {int(total[i])} tokens in "
                f"{int(need[i])} pages, more than max_pages_per_request="
                f"{self.max_pages_per_request}"
            )
        grow = need - old_pages
        cow_pos, cow_src = self._plan_copy_on_write(rows, old_tokens, old_pages, counts)
        per_req = grow
        if cow_pos.size:
            per_req = grow.copy()
            per_req[cow_pos] += 1
        needed = int(per_req.sum())
        if needed > self.num_free_pages:
            raise OutOfPages(needed, self.num_free_pages, where)

        # ---- commit: nothing below can fail.
        pages = self._take(needed)
        if new_ids:
            top = self._num_free_rows
            self._num_free_rows = top - len(new_ids)
            self._rows.update(zip(new_ids, rows[new_pos].tolist(), strict=True))
        if needed:
            self._refcount[pages] = 1
            start = np.cumsum(per_req) - per_req  # each request's first page in `pages`
            if cow_pos.size:
                dst = pages[start[cow_pos]]
                np.subtract.at(self._refcount, cow_src, 1)  # a page may lose several writers
                self._page_table[rows[cow_pos], old_pages[cow_pos] - 1] = dst
                self._queue_copies(cow_src, dst)
                start[cow_pos] += 1
            self._place(rows, old_pages, grow, start, pages)
        self._row_pages[rows] = need
        self._row_tokens[rows] = total
        return rows.astype(np.int32), pages

    def _queue_copies(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Queues copies ``src[i] -> dst[i]``, each source resolved to its original page.

        A source that is itself the destination of a copy queued this step (a request forked
        after it grew) holds nothing yet on the device: ``copy_pages`` reads every source
        before writing any destination, so the copy must read the page that one copies from.
        Queued pairs are resolved already, so one lookup suffices.
        """
        if self._pending:
            queued = np.concatenate(self._pending)
            origin = dict(zip(queued[:, 1].tolist(), queued[:, 0].tolist(), strict=True))
            src = np.array([origin.get(page, page) for page in src.tolist()], np.int32)
        self._pending.append(np.stack([src, dst], axis=1).astype(np.int32))

    def _plan_copy_on_write(
        self, rows: np.ndarray, old_tokens: np.ndarray, old_pages: np.ndarray, counts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Returns (int64[c] batch positions, int32[c] src pages) of writers that must copy.

        A writer appending to a partly filled last page shared with others needs a private
        copy. With several writers of one page in a batch, the semantics are those of
        sequential ``allocate`` calls: each copy drops the refcount by one, so the first
        ``refcount - 1`` writers (batch order) copy and the last one keeps the page.
        """
        pos = np.flatnonzero((old_tokens % self.page_size != 0) & (counts > 0))
        if pos.size == 0:
            return pos, np.zeros(0, np.int32)
        width = self.max_pages_per_request
        last = self._page_table.reshape(-1)[rows[pos] * width + old_pages[pos] - 1]
        refs = self._refcount[last]
        shared = refs > 1
        pos, last, refs = pos[shared], last[shared], refs[shared]
        if pos.size <= 1:
            return pos, last
        order = np.argsort(last, kind="stable")  # groups writers of a page, batch order kept
        sorted_last = last[order]
        head = np.r_[True, sorted_last[1:] != sorted_last[:-1]]
        idx = np.arange(pos.size)
        rank = np.empty(pos.size, np.int64)
        rank[order] = idx - np.maximum.accumulate(np.where(head, idx, 0))
        copies = rank < refs - 1
        return pos[copies], last[copies]

    def _place(
        self,
        rows: np.ndarray,
        old_pages: np.ndarray,
        grow: np.ndarray,
        start: np.ndarray,
        pages: np.ndarray,
    ) -> None:
        """Writes ``grow[i]`` pages from ``pages[start[i]:]`` after each row's last page."""
        which = np.flatnonzero(grow)  # decode steps: few requests cross a page boundary
        if which.size == 0:
            return
        counts = grow[which]
        total = int(counts.sum())
        owner = np.repeat(which, counts)
        within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        self._page_table[rows[owner], old_pages[owner] + within] = pages[start[owner] + within]

    def _take(self, count: int) -> np.ndarray:
        """Pops int32[count] pages: the free stack first, then evicts cached pages (LRU)."""
        plain = min(count, self._num_free)
        top = self._num_free
        taken = self._free_pages[top - plain : top][::-1].copy()
        self._num_free = top - plain
        if count > plain:
            taken = np.concatenate([taken, self._evict(count - plain)])
        return taken

    def _evict(self, count: int) -> np.ndarray:
        """Drops the ``count`` least recently freed cached pages from the cache; returns them.

        O(num_pages) scan, run only once the free stack is empty; stamps are unique, so the
        order (and the page ids handed out) is deterministic.
        """
        candidates = np.flatnonzero(self._evictable)
        stamps = self._lru[candidates]
        if count < candidates.size:
            part = np.argpartition(stamps, count - 1)[:count]
            chosen = part[np.argsort(stamps[part])]
        else:
            chosen = np.argsort(stamps)
        victims = candidates[chosen].astype(np.int32)
        for key in self._page_key[victims]:
            del self._key_to_page[key.tobytes()]
        self._page_key[victims] = 0
        self._cached[victims] = False
        self._evictable[victims] = False
        self._num_evictable -= count
        self._stats["evictions"] += count
        return victims

    # --------------------------------------------------------------- release

    def free(self, req_id: Hashable) -> None:
        """Releases the request's pages and its row; the row is reset to the null page.

        Pages whose last owner this was return to the free stack, or, when cached, become
        evictable (the request's last page first in eviction order: later pages of a prefix
        are the least likely to be shared). Pending copies into the freed pages are dropped.

        Freeing the last live request while no page is cached (always so with prefix caching
        off) also restores the fresh allocator's order of the free page and row stacks and its
        eviction clock (O(num_pages + max_requests), only then): the state is then exactly a
        fresh allocator's except the cumulative :attr:`prefix_stats` counters, so page ids
        handed out afterwards and :meth:`checksum` do not depend on past traffic.

        Args:
            req_id: a live request id.

        Raises:
            UnknownRequest: ``req_id`` is not live (never allocated, or already freed: a
                double free). Nothing changes then.
            TypeError: ``req_id`` is not hashable.
        """
        row = self._row_of(req_id, "free")
        held = int(self._row_pages[row])
        pages = self._page_table[row, :held].copy()
        self._refcount[pages] -= 1  # pages of one row are distinct
        dead = pages[self._refcount[pages] == 0]
        if dead.size:
            cached = self._cached[dead]
            keep = dead[cached]
            if keep.size:
                # Reverse stamps: the last page of the request is the oldest.
                self._lru[keep] = self._clock + np.arange(keep.size - 1, -1, -1)
                self._clock += int(keep.size)
                self._evictable[keep] = True
                self._num_evictable += int(keep.size)
            plain = dead[~cached]
            self._free_pages[self._num_free : self._num_free + plain.size] = plain[::-1]
            self._num_free += int(plain.size)
            if self._pending:
                pairs = np.concatenate(self._pending)
                self._pending = [pairs[~np.isin(pairs[:, 1], dead)]]
        self._reset_row(row)
        self._free_rows[self._num_free_rows] = row
        self._num_free_rows += 1
        del self._rows[req_id]
        if not self._rows and self._num_evictable == 0:
            self._canonicalize_empty()

    def _canonicalize_empty(self) -> None:
        """Resets the stacks, clock and stamps of an empty allocator to a fresh one's.

        Called only when no request is live and nothing is cached (every page is then on the
        free stack, every row on the free-row stack, and no copy is pending), so it only
        reorders: the result equals :meth:`_init_state` except the prefix counters. In place,
        so :attr:`page_table` views stay valid.
        """
        self._free_pages[:] = np.arange(self.num_pages - 1, 0, -1, dtype=np.int32)
        self._num_free = self.num_pages - 1
        self._free_rows[:] = np.arange(self.max_requests - 1, -1, -1, dtype=np.int32)
        self._num_free_rows = self.max_requests
        self._lru[:] = 0
        self._clock = 0
        self._pending = []

    def _reset_row(self, row: int) -> None:
        self._page_table[row] = NULL_PAGE
        self._row_pages[row] = 0
        self._row_tokens[row] = 0
        self._row_committed[row] = 0
        self._row_last_key[row] = 0
        self._row_ns[row] = 0
        self._row_has_ns[row] = False

    def _take_row(self, req_id: Hashable, where: str) -> int:
        """Checks a new row is available (does not take it); returns its index."""
        if self._num_free_rows == 0:
            raise ValueError(
                f"{where}: cannot add req_id={req_id!r}: all max_requests={self.max_requests} "
                "rows are in use"
            )
        return int(self._free_rows[self._num_free_rows - 1])

    def _commit_row(self, req_id: Hashable, row: int) -> None:
        self._num_free_rows -= 1
        self._rows[req_id] = row

    def fork(self, src_req: Hashable, dst_req: Hashable) -> None:
        """Creates ``dst_req`` sharing all of ``src_req``'s pages (reference counted).

        Both may keep appending: a write into the shared partial last page is copied on write
        (see :meth:`take_pending_copies`); full pages stay shared. ``dst_req`` also inherits
        ``src_req``'s token count and prefix-cache progress (committed pages, namespace).

        Args:
            src_req: a live request id.
            dst_req: a hashable id that is not live.

        Raises:
            UnknownRequest: ``src_req`` is not live.
            TypeError: ``src_req`` is not hashable.
            ValueError: ``dst_req`` is not hashable or already live, or all ``max_requests``
                rows are in use.
        """
        src = self._row_of(src_req, "fork(src_req)")
        try:
            live = dst_req in self._rows
        except TypeError:
            raise ValueError(f"fork: dst_req={dst_req!r} is not hashable") from None
        if live:
            raise ValueError(f"fork: dst_req={dst_req!r} is already a live request")
        dst = self._take_row(dst_req, "fork")
        held = int(self._row_pages[src])
        self._commit_row(dst_req, dst)
        pages = self._page_table[src, :held]
        self._page_table[dst, :held] = pages
        self._refcount[pages] += 1
        for array in (
            self._row_pages,
            self._row_tokens,
            self._row_committed,
            self._row_last_key,
            self._row_ns,
            self._row_has_ns,
        ):
            array[dst] = array[src]

    def take_pending_copies(self) -> np.ndarray:
        """Returns the queued copy-on-write copies and clears the queue.

        Call once per step after all allocations and before that step's KV update, and copy
        every ``src_page`` to its ``dst_page`` on the device with all reads before all writes,
        as ``kvshard.copy_pages`` does: sources are resolved to pages holding data before the
        step (a request forked after it grew in the same step copies from the page its parent
        copied from, not from the parent's new page), so the pairs are correct in that one
        order (applying them one by one in order is not guaranteed to be). A pair is dropped
        if its destination is freed before it is taken.

        Returns:
            int32[K, 2]: rows (src_page, dst_page), page ids in ``[1, num_pages)``, in the order
            the copies were queued; int32[0, 2] when none are pending. Never raises.
        """
        if not self._pending:
            return np.zeros((0, 2), np.int32)
        pairs = np.concatenate(self._pending).astype(np.int32)
        self._pending = []
        return pairs

    # --------------------------------------------------------- prefix cache

    def _require_prefix_caching(self, where: str) -> None:
        if not self.enable_prefix_caching:
            raise ValueError(f"{where}: prefix caching is disabled (enable_prefix_caching=False)")

    def _page_keys(
        self, data: bytes, prev: bytes, namespace: bytes, first: int, stop: int
    ) -> Iterable[bytes]:
        """Yields the chained keys of full pages ``first .. stop - 1`` of token bytes ``data``."""
        step = self.page_size * 8
        for page in range(first, stop):
            prev = _chain_key(prev, namespace, data[page * step : (page + 1) * step])
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
        data, length = _token_bytes(token_ids, where)
        ns = _namespace_digest(namespace)
        row = self._rows.get(req_id)  # TypeError for an unhashable id, before any change
        if row is not None and self._row_tokens[row] != 0:
            raise ValueError(
                f"{where}: req_id={req_id!r} already holds {int(self._row_tokens[row])} tokens; "
                "look up a prefix before allocating"
            )
        new_row = self._take_row(req_id, where) if row is None else None
        limit = min(max(length - 1, 0) // self.page_size, self.max_pages_per_request)
        hits: list[int] = []
        last_key = _ROOT_KEY
        for key in self._page_keys(data, _ROOT_KEY, ns, 0, limit):
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
        revived = found[self._evictable[found]]
        self._evictable[revived] = False
        self._num_evictable -= int(revived.size)
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
        data, length = _token_bytes(token_ids, where)
        ns = _namespace_digest(namespace)
        if self._row_has_ns[row] and self._row_ns[row].tobytes() != ns:
            raise ValueError(
                f"{where}: namespace={namespace!r} differs from the namespace req_id={req_id!r} "
                "was looked up or committed with"
            )
        full = min(length, int(self._row_tokens[row])) // self.page_size
        done = int(self._row_committed[row])
        prev = self._row_last_key[row].tobytes() if done else _ROOT_KEY
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

    # ------------------------------------------------------------ snapshots

    _ARRAYS = (
        "refcount",
        "page_table",
        "row_pages",
        "row_tokens",
        "page_key",
        "cached",
        "evictable",
        "lru",
        "row_committed",
        "row_last_key",
        "row_ns",
        "row_has_ns",
    )

    def _config(self) -> dict[str, Any]:
        return {
            "num_pages": self.num_pages,
            "page_size": self.page_size,
            "max_requests": self.max_requests,
            "max_pages_per_request": self.max_pages_per_request,
            "enable_prefix_caching": self.enable_prefix_caching,
        }

    def state_dict(self) -> dict[str, Any]:
        """Returns a deep copy of the state: numpy arrays, ints and plain dicts/lists.

        Only the live part of the stacks is kept, so equal states give equal dicts. Includes
        the :attr:`prefix_stats` counters and the pending copy-on-write copies. Never raises.

        Returns:
            A dict for :meth:`load_state_dict`: ``"version"``, ``"config"``, ``"free_pages"``
            (int32[num_free]), ``"free_rows"`` (int32[num_free_rows]), ``"rows"`` (request id
            -> row), ``"clock"``, ``"prefix_stats"``, ``"pending_copies"`` (int32[K, 2]) and the
            per-page and per-row arrays, e.g. ``"refcount"`` (int32[num_pages]) and
            ``"page_table"`` (int32[max_requests, max_pages_per_request]).
        """
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "config": self._config(),
            "free_pages": self._free_pages[: self._num_free].copy(),
            "free_rows": self._free_rows[: self._num_free_rows].copy(),
            "rows": dict(self._rows),
            "clock": self._clock,
            "prefix_stats": dict(self._stats),
            "pending_copies": (
                np.concatenate(self._pending).astype(np.int32)
                if self._pending
                else np.zeros((0, 2), np.int32)
            ),
        }
        for name in self._ARRAYS:
            state[name] = getattr(self, "_" + name).copy()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a :meth:`state_dict` (same configuration); validated before anything moves.

        The arrays are copied in; :attr:`page_table` views taken before the call go stale.

        Args:
            state: a dict returned by :meth:`state_dict` of an allocator with the same
                constructor arguments.

        Raises:
            ValueError: the version or config differs, an array has the wrong shape, or the
                free-page/free-row/request counts are inconsistent. Nothing changes then.
            KeyError: ``state`` lacks an entry.
        """
        where = "load_state_dict"
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"{where}: unsupported version {state.get('version')!r}")
        if state.get("config") != self._config():
            raise ValueError(
                f"{where}: config {state.get('config')!r} does not match {self._config()!r}"
            )
        loaded: dict[str, np.ndarray] = {}
        for name in self._ARRAYS:
            mine = getattr(self, "_" + name)
            value = np.asarray(state[name])
            if value.shape != mine.shape:
                raise ValueError(f"{where}: {name} has shape {value.shape}, want {mine.shape}")
            loaded[name] = value.astype(mine.dtype, copy=True)
        free_pages = np.asarray(state["free_pages"], np.int32)
        free_rows = np.asarray(state["free_rows"], np.int32)
        rows = dict(state["rows"])
        if free_pages.size > self.num_pages - 1 or free_rows.size + len(rows) != self.max_requests:
            raise ValueError(f"{where}: free_pages/free_rows/rows sizes are inconsistent")
        key_to_page = {
            loaded["page_key"][page].tobytes(): int(page)
            for page in np.flatnonzero(loaded["cached"])
        }

        # ---- commit
        self._init_state()
        for name, value in loaded.items():
            setattr(self, "_" + name, value)
        self._free_pages[: free_pages.size] = free_pages
        self._num_free = int(free_pages.size)
        self._free_rows[: free_rows.size] = free_rows
        self._num_free_rows = int(free_rows.size)
        self._rows = rows
        self._clock = int(state["clock"])
        self._stats = {k: int(v) for k, v in state["prefix_stats"].items()}
        pending = np.asarray(state["pending_copies"], np.int32).reshape(-1, 2)
        self._pending = [pending.copy()] if pending.size else []
        self._key_to_page = key_to_page
        self._num_evictable = int(self._evictable.sum())

    def checksum(self) -> str:
        """Returns a hex blake2b digest of the whole state; equal states give equal digests.

        Deterministic across processes and hosts (request ids enter through ``repr``). The
        digest covers everything :meth:`state_dict` returns, including the cumulative
        :attr:`prefix_stats` counters, which :meth:`free` never resets. With prefix caching off
        those counters stay 0, so freeing every request restores the digest of a fresh
        allocator with the same arguments; with it on, the same holds once nothing is cached,
        up to the counters.

        Returns:
            32 lowercase hex characters (a 128-bit digest). Never raises.
        """
        state = self.state_dict()
        h = hashlib.blake2b(digest_size=16)
        h.update(repr(sorted(state["config"].items())).encode())
        h.update(repr((state["clock"], sorted(state["prefix_stats"].items()))).encode())
        h.update(repr(sorted((repr(k), v) for k, v in state["rows"].items())).encode())
        for name in ("free_pages", "free_rows", "pending_copies", *self._ARRAYS):
            array = np.ascontiguousarray(state[name])
            h.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
            h.update(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------- checking

    def check_invariants(self) -> None:
        """Checks every internal invariant (O(num_pages · max_pages_per_request); for tests).

        Raises:
            AssertionError: naming the first broken invariant (raised explicitly, so also
                under ``python -O``).
        """
        size, n = self.page_size, self.num_pages
        live_rows = np.array(sorted(self._rows.values()), np.int64)
        _check(len(set(self._rows.values())) == len(self._rows), "two requests share a row")
        free_rows = self._free_rows[: self._num_free_rows]
        every_row = np.sort(np.concatenate([live_rows, free_rows]))
        _check(np.array_equal(every_row, np.arange(self.max_requests)), "a row is lost or doubled")
        expect_pages = (self._row_tokens + size - 1) // size
        _check(np.array_equal(self._row_pages, expect_pages), "row_pages != ceil(tokens / P)")
        cols = np.arange(self.max_pages_per_request)
        used_mask = cols[None, :] < self._row_pages[:, None]
        _check(not self._page_table[~used_mask].any(), "unused page-table entry is not null")
        owned = self._page_table[used_mask]
        _check((owned > 0).all() and (owned < n).all(), "a request owns the null page or junk")
        for row in live_rows:
            held = self._page_table[row, : self._row_pages[row]]
            _check(np.unique(held).size == held.size, f"row {row} holds a page twice")
        counts = np.bincount(owned, minlength=n)
        _check(np.array_equal(counts, self._refcount), "refcount != number of owners")
        free = self._free_pages[: self._num_free]
        _check(np.unique(free).size == free.size, "free stack holds a page twice")
        _check((free > 0).all(), "null page on the free stack")
        _check(not self._refcount[free].any(), "a free page is owned")
        _check(not self._cached[free].any(), "a free page is cached")
        evictable = self._cached & (self._refcount == 0)
        _check(np.array_equal(self._evictable, evictable), "evictable != cached and unowned")
        _check(self._num_evictable == int(self._evictable.sum()), "evictable count is stale")
        _check(not self._cached[NULL_PAGE], "the null page is cached")
        used = int((self._refcount > 0).sum())
        _check(self._num_free + self._num_evictable + used == n - 1, "pages leaked")
        _check(len(self._key_to_page) == int(self._cached.sum()), "key index size mismatch")
        for key, page in self._key_to_page.items():
            _check(
                self._cached[page] and self._page_key[page].tobytes() == key,
                f"key index points at page {page} which holds another key",
            )
        pending = self.state_dict()["pending_copies"]
        _check((pending > 0).all(), "pending copy touches the null page")
