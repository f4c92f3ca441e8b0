"""One state group's table: each request's single state page, drawn from the shared pool.

The counterpart of vLLM's ``MambaManager``: a state layer (Mamba-2, gated DeltaNet) keeps a
fixed-size state per request, read and written in place by every step, instead of per-token
K/V. A request holding tokens owns exactly one page in each state group, in column 0 of its row
of the group's table (the other columns stay :data:`NULL_PAGE`); a request holding none owns
none. Pages of every group have the same bytes (the planner sizes them: vLLM's unification
rule), so one pool serves attention and state groups.

Every growth writes the state, so the state page is always "partly filled" in the sense of
copy-on-write: a request that grows while its state page is shared (after :meth:`fork`) or
cached (committed to, or hit in, the prefix cache) first gets a private page and a
(src, dst) copy pair, and the device copies the state before the step updates it. The same
rule gives vLLM's prefix caching of state: a state page committed at a page boundary keeps the
state after exactly those tokens, frozen, because the request's next write goes to a copy.
"""

from __future__ import annotations

import numpy as np

from kvshard.allocator._common import check
from kvshard.allocator._table import PageTable


class StateTable(PageTable):
    """A :class:`PageTable` whose rows hold one state page (column 0) while they hold tokens.

    Shares the table's storage and its copy-on-write planner; only the column rule (one
    column, not ``ceil(tokens / page_size)``), the write rule (every growth writes), truncation
    and the checks differ.
    """

    is_state = True

    def columns(self, tokens: np.ndarray) -> np.ndarray:
        """One column (the state page) for a request holding tokens, none for an empty one."""
        return (tokens > 0).astype(self.row_pages.dtype)

    def written(self, old_tokens: np.ndarray) -> np.ndarray:
        """Every growth of a request holding tokens writes its state page in place."""
        return old_tokens > 0

    def truncate(self, row: int, tokens: int) -> None:
        """Only to 0 tokens (the state page is released) or to every token held (nothing
        changes): a state cannot be rolled back (``PageAllocator.truncate`` refuses the rest)."""
        if tokens == 0:
            super().truncate(row, 0)

    def check(self, tokens: np.ndarray, live: np.ndarray, swapped: np.ndarray) -> np.ndarray:
        """Checks one state page per row holding tokens; returns int32[owners] the owned pages.

        ``swapped``: bool[max_requests, max_pages_per_request], as for :meth:`PageTable.check`.
        """
        n = self.pool.num_pages
        check(
            np.array_equal(self.row_pages, (tokens > 0).astype(self.row_pages.dtype)),
            "row_pages: a state group's row != 1 while it holds tokens, else 0",
        )
        check(not self.row_released.any(), "row_released: a state group released pages")
        used = np.zeros(self.page_table.shape, bool)
        used[:, 0] = self.row_pages > 0
        used &= ~swapped
        check(not self.page_table[~used].any(), "page_table: unused state entry is not null")
        owned = self.page_table[used]
        check(
            ((owned > 0) & (owned < n)).all(),
            "page_table: a request owns the null page or junk as its state page",
        )
        return owned

    def state_pages(self, rows: np.ndarray) -> np.ndarray:
        """int32[B]: each row's state page (:data:`NULL_PAGE` while it holds no tokens, or
        while its state is on the host)."""
        return self.page_table[rows, 0].copy()
