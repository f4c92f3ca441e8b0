"""Requests and their rows: request id -> row, the free-row stack, tokens and prefix progress.

A row is a request's index into every page table (one per KV-cache group). What is per request
rather than per group lives here: the tokens it holds and how far its pages were hashed into
the prefix index (committed pages, the last key, the namespace).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from itertools import repeat
from operator import itemgetter

import numpy as np

from kvshard.allocator._common import UnknownRequest, check
from kvshard.allocator._prefix_index import KEY_BYTES


class RequestRows:
    """Live requests' rows and per-request state, in numpy arrays indexed by row."""

    ARRAYS = (
        "row_tokens",
        "row_committed",
        "row_last_key",
        "row_ns",
        "row_has_ns",
        "row_tentative",
    )

    def __init__(self, max_requests: int) -> None:
        r = self.max_requests = max_requests
        self.rows: dict[Hashable, int] = {}
        self.free_rows = np.arange(r - 1, -1, -1, dtype=np.int32)  # stack, pops 0, 1, ...
        self.num_free_rows = r
        self.row_tokens = np.zeros(r, np.int64)  # int64[max_requests]: tokens held
        self.row_committed = np.zeros(r, np.int32)  # full pages already hashed
        self.row_last_key = np.zeros((r, KEY_BYTES), np.uint8)  # key of the last of them
        self.row_ns = np.zeros((r, KEY_BYTES), np.uint8)  # namespace digest, once set
        self.row_has_ns = np.zeros(r, bool)
        # Looked up and not grown since: its hits return to the eviction order where they were
        # when it is freed (vLLM touches hits only once their allocation succeeds).
        self.row_tentative = np.zeros(r, bool)
        self._mark = np.zeros(r, np.int64)  # scratch for duplicate detection

    def row_of(self, req_id: Hashable, where: str) -> int:
        """Returns a live request's row; raises UnknownRequest (TypeError if unhashable)."""
        try:
            return self.rows[req_id]
        except KeyError:
            raise UnknownRequest(
                f"{where}: unknown request req_id={req_id!r} (never allocated, or already freed)"
            ) from None

    def reserve(self, req_id: Hashable, where: str) -> int:
        """Returns the row a new request would get; takes nothing (see :meth:`add`)."""
        if self.num_free_rows == 0:
            raise ValueError(
                f"{where}: cannot add req_id={req_id!r}: all max_requests={self.max_requests} "
                "rows are in use"
            )
        return int(self.free_rows[self.num_free_rows - 1])

    def lookup(
        self, req_ids: Sequence[Hashable], where: str
    ) -> tuple[np.ndarray, list[Hashable], np.ndarray]:
        """Returns (int64[B] rows, new ids, int64[new] positions); new rows are not yet taken.

        Raises:
            ValueError: more ids than rows, duplicates, or too few free rows for the new ids.
        """
        count = len(req_ids)
        if count > self.max_requests:
            raise ValueError(
                f"{where}: batch of {count} requests exceeds max_requests={self.max_requests}"
            )
        rows = self._known_rows(req_ids)
        if rows is None:  # some ids are new
            rows = np.fromiter(
                map(self.rows.get, req_ids, repeat(-1, count)), dtype=np.int64, count=count
            )
            new_pos = np.flatnonzero(rows < 0)
        else:
            new_pos = np.zeros(0, np.int64)
        new_ids: list[Hashable] = []
        if new_pos.size:
            new_ids = [req_ids[i] for i in new_pos.tolist()]
            if len(set(new_ids)) != len(new_ids):
                raise ValueError(f"{where}: req_ids contains duplicates")
            if len(new_ids) > self.num_free_rows:
                more = f" and {len(new_ids) - 1} other new requests" if len(new_ids) > 1 else ""
                raise ValueError(
                    f"{where}: cannot add req_id={new_ids[0]!r}{more}: only "
                    f"{self.num_free_rows} of max_requests={self.max_requests} rows are free"
                )
            top = self.num_free_rows
            rows[new_pos] = self.free_rows[top - len(new_ids) : top][::-1]
        # Distinct rows <=> distinct ids (new ids got distinct free rows above).
        iota = np.arange(count)
        self._mark[rows] = iota
        dup = np.flatnonzero(self._mark[rows] != iota)
        if dup.size:
            raise ValueError(f"{where}: req_ids contains duplicates, e.g. {req_ids[dup[0]]!r}")
        return rows, new_ids, new_pos

    def _known_rows(self, req_ids: Sequence[Hashable]) -> np.ndarray | None:
        """Returns int64[B] rows if every id is live, else None (the steady-state fast path)."""
        if len(req_ids) < 2:
            return None  # itemgetter of one key returns the value itself, not a tuple
        try:
            # One C call for all B lookups: about half the cost of map(dict.get, ...).
            found = itemgetter(*req_ids)(self.rows)
        except KeyError:
            return None
        return np.fromiter(found, dtype=np.int64, count=len(req_ids))

    def add(self, req_ids: list[Hashable], rows: list[int]) -> None:
        """Takes the rows :meth:`lookup` or :meth:`reserve` returned for new ids."""
        self.num_free_rows -= len(req_ids)
        self.rows.update(zip(req_ids, rows, strict=True))

    def remove(self, req_id: Hashable, row: int) -> None:
        """Resets a live request's row and returns it to the free-row stack."""
        for array in (self.row_tokens, self.row_committed, self.row_last_key, self.row_ns):
            array[row] = 0
        self.row_has_ns[row] = False
        self.row_tentative[row] = False
        self.free_rows[self.num_free_rows] = row
        self.num_free_rows += 1
        del self.rows[req_id]

    def copy(self, src: int, dst: int) -> None:
        """Gives row ``dst`` the tokens and prefix progress of row ``src`` (fork); a fork
        serves ``src``, so neither is tentative afterwards."""
        for name in self.ARRAYS:
            array = getattr(self, name)
            array[dst] = array[src]
        self.row_tentative[[src, dst]] = False

    def forget_commits(self, row: int) -> None:
        """Restarts the row's prefix progress from its first page (after a truncate into it)."""
        self.row_committed[row] = 0
        self.row_last_key[row] = 0

    def reset_order(self) -> None:
        """Restores a fresh free-row stack (only when no request is live)."""
        self.free_rows[:] = np.arange(self.max_requests - 1, -1, -1, dtype=np.int32)
        self.num_free_rows = self.max_requests

    def live_rows(self) -> np.ndarray:
        """Returns int64[live]: the live rows, sorted."""
        return np.array(sorted(self.rows.values()), np.int64)

    def check(self, max_tokens: int, page_size: int) -> None:
        """Checks rows are owned once, free rows are reset and tokens are in range."""
        r = self.max_requests
        live = self.live_rows()
        check(len(set(self.rows.values())) == len(self.rows), "rows: two requests share a row")
        free = self.free_rows[: self.num_free_rows]
        every_row = np.sort(np.concatenate([live, free]))
        check(np.array_equal(every_row, np.arange(r)), "free_rows: a row is lost or doubled")
        idle = np.ones(r, bool)
        idle[live] = False
        check(
            not (self.row_tokens[idle].any() or self.row_committed[idle].any())
            and not (self.row_has_ns[idle].any() or self.row_ns[idle].any())
            and not (self.row_last_key[idle].any() or self.row_tentative[idle].any()),
            "row_tokens: a free row is not reset",
        )
        tokens = self.row_tokens
        check(
            (tokens >= 0).all() and (tokens <= max_tokens).all(),
            "row_tokens: out of [0, max_pages_per_request * page_size]",
        )
        committed = self.row_committed.astype(np.int64)
        check(
            (committed >= 0).all() and (committed * page_size <= tokens).all(),
            "row_committed: more pages than full pages held",
        )
        check(
            (committed * page_size == tokens)[self.row_tentative].all(),
            "row_tentative: a looked-up request holds more than its hits",
        )
