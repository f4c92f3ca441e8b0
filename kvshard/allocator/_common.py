"""What every part of the allocator shares: the null page, the bounds, the exceptions, helpers."""

from __future__ import annotations

from typing import Any

import numpy as np

from kvshard._errors import KvshardError
from kvshard._geometry.int32 import INT32_MAX

NULL_PAGE = 0
"""Page id reserved for padding writes; no request ever owns it."""

# Tokens one request may hold (max_pages_per_request * page_size): build_step writes positions
# and kv_lens as int32, so a larger count would wrap there.
MAX_TOKENS = INT32_MAX
# load_state_dict refuses an eviction clock past this: the clock advances by at most num_pages
# per call, so from here it cannot reach int64's end in any real run (2**62 stamps).
MAX_CLOCK = 2**62


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
    """Returns a read-only view of ``array`` (it follows later in-place changes)."""
    view = array.view()
    view.flags.writeable = False
    return view


def pop_free(free: np.ndarray, num_free: int, count: int) -> tuple[np.ndarray, int]:
    """Pops up to ``count`` ids off the free stack ``free[:num_free]`` (top at ``num_free - 1``):
    returns int32[min(count, num_free)], in pop order, and the stack's new size."""
    plain = min(count, num_free)
    return free[num_free - plain : num_free][::-1].copy(), num_free - plain


def push_free(free: np.ndarray, num_free: int, ids: np.ndarray) -> int:
    """Pushes int32[k] ids onto the free stack ``free[:num_free]``, in order; returns its new
    size."""
    free[num_free : num_free + ids.size] = ids
    return num_free + int(ids.size)


def is_int(value: object) -> bool:
    """True for a Python or numpy integer that is not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)
