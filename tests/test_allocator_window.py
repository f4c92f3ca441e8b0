"""Sliding windows: release out of the window, its bound, and windows with fork/truncate."""

from __future__ import annotations

import numpy as np
import pytest
from _alloc import unchanged
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshard.allocator import (
    NULL_PAGE,
    OutOfPages,
    PageAllocator,
    sliding_window_pages,
)


def test_sliding_window_releases_pages_out_of_the_window():
    a = PageAllocator(12, 2, max_requests=2, max_pages_per_request=10, sliding_window=4)
    a.allocate("x", 10)  # pages 1..5, tokens 0..9
    # Token 10 attends 7..10: pages 1-3 are released and reused at once, the last one first.
    assert a.allocate("x", 1).tolist() == [3]
    assert a.pages("x").tolist() == [0, 0, 0, 4, 5, 3]
    assert a.num_tokens("x") == 11 and a.num_free_pages == 12 - 1 - 3
    a.check_invariants()
    unchanged(a, ValueError, lambda: a.truncate("x", 8), r"needs tokens from 5 on .*were released")
    a.truncate("x", 10)  # token 10 again: needs tokens 7.. (pages 3, 4): allowed
    a.fork("x", "y")
    a.allocate_batch(["x", "y"], [2, 2])
    a.check_invariants()
    a.free("x")
    a.free("y")
    assert (
        a.num_free_pages == 11
        and a.checksum()
        == PageAllocator(
            12, 2, max_requests=2, max_pages_per_request=10, sliding_window=4
        ).checksum()
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sliding_window": 0}, "sliding_window=0 must be an int >= 1"),
        ({"sliding_window": 2.0}, "sliding_window=2.0"),
    ],
)
def test_sliding_window_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PageAllocator(8, 2, max_requests=2, max_pages_per_request=4, **kwargs)


@given(
    window=st.integers(1, 9),
    page_size=st.integers(1, 4),
    steps=st.lists(st.integers(1, 4), min_size=1, max_size=30),
)
@settings(max_examples=80, deadline=None)
def test_sliding_window_keeps_every_page_the_window_reads(window, page_size, steps):
    """Each step's queries attend (p - W, p]: those keys' pages are held, the rest are not."""
    # The table keeps its shape (released entries become the null page), so its width must
    # cover every position: up to 30 steps of 4 tokens.
    a = PageAllocator(
        64, page_size, max_requests=1, max_pages_per_request=120, sliding_window=window
    )
    for n in steps:
        old = a.num_tokens("x") if "x" in a else 0
        a.allocate("x", n)
        pages = a.pages("x")
        first = max(old - window + 1, 0)  # the first key the step's first query reads
        held = [j for j, page in enumerate(pages) if page != NULL_PAGE]
        assert held == list(range(first // page_size, len(pages)))
        assert len(held) <= sliding_window_pages(window, page_size, max(steps))
    a.check_invariants()


@pytest.mark.parametrize("page_size", [1, 2, 3, 16])
@pytest.mark.parametrize("window", [1, 2, 5, 16, 17, 100])
@pytest.mark.parametrize("new", [1, 3, 16])
def test_sliding_window_pages_is_reached(page_size, window, new):
    """The bound is exact: some alignment of a run of ``new``-token steps reaches it."""
    bound = sliding_window_pages(window, page_size, new)
    most = 0
    for offset in range(page_size):
        a = PageAllocator(
            400, page_size, max_requests=1, max_pages_per_request=400, sliding_window=window
        )
        a.allocate("x", offset)
        for _ in range((window + 2 * page_size) // new + 2):
            a.allocate("x", new)
            most = max(most, int(np.count_nonzero(a.pages("x"))))
    assert most == bound


def test_sliding_window_pages_errors():
    for args in [(0, 16), (4, 0), (4, 16, 0), (4.0, 16)]:
        with pytest.raises(ValueError, match="must be an int >= 1"):
            sliding_window_pages(*args)


def test_window_release_reuses_the_last_released_page_first():
    """Issue 19 item 5: as vLLM, of pages released together the last is reused first."""
    a = PageAllocator(12, 2, max_requests=2, max_pages_per_request=12, sliding_window=2)
    a.allocate("x", 10)  # pages 1..5
    # Token 10 reads 9..: pages 1..4 go; 16 tokens need three new pages, taken 4, 3, 2.
    assert a.allocate("x", 6).tolist() == [4, 3, 2]
    assert a.pages("x").tolist() == [0, 0, 0, 0, 5, 4, 3, 2]
    a.check_invariants()


def test_refused_allocation_keeps_the_pages_its_window_would_release():
    """Issue 19 item 4, the exact repro: the difference from vLLM is documented, not a leak.

    vLLM releases r's out-of-window pages before its capacity check and keeps them released
    when it refuses; kvshard's refusal changes nothing. Both admit the same calls: the check
    counts the pages the window releases as free.
    """
    a = PageAllocator(6, 2, max_requests=2, max_pages_per_request=9, sliding_window=2)
    a.allocate("r", 8)  # pages 1..4
    a.allocate("s", 2)  # page 5: the pool is full
    err = unchanged(a, OutOfPages, lambda: a.allocate("r", 10), "needs 5 pages but only 3")
    assert (err.needed, err.available) == (5, 3)  # 3: the pages the window would release
    assert a.num_free_pages == 0 and a.pages("r").tolist() == [1, 2, 3, 4]
    assert a.allocate("r", 6).tolist() == [3, 2, 1]  # 3 new pages, all three released ones
    assert a.pages("r").tolist() == [0, 0, 0, 4, 3, 2, 1] and a.num_free_pages == 0
    a.check_invariants()


def test_window_release_of_a_page_a_truncated_twin_copies_from():
    """Issue 19 item 5: B's window drops its owner of the partial page A then writes into.

    One batch: B's release leaves A the page's only owner, so A writes in place. The
    allocator used to plan A's copy before B's release, then orphan the page (marked
    evictable though uncached), and a later allocation reaching it raised KeyError.
    """
    a = PageAllocator(6, 2, max_requests=2, max_pages_per_request=5, sliding_window=2)
    a.allocate("A", 4)  # pages 1, 2
    a.fork("A", "B")
    a.truncate("A", 3)  # A's page 2 is partial again; B holds it full
    a.allocate("B", 2)  # B releases page 1 (A keeps it), takes page 3
    assert a.allocate_batch(["A", "B"], [1, 1]).tolist() == [a.row("A"), a.row("B")]
    a.check_invariants()
    # Both release (A page 1, B page 2); page 1 is then free and B's new page.
    assert a.pages("A").tolist() == [0, 2] and a.take_pending_copies().shape == (0, 2)
    assert a.pages("B").tolist() == [0, 0, 3, 1]
    assert a.num_free_pages == 2
    assert sorted(a.allocate("A", 4).tolist()) == [4, 5]  # every free page
    assert a.num_free_pages == 0
    a.check_invariants()
    a.free("A")
    a.free("B")
    assert a.num_free_pages == 5
    a.check_invariants()


def test_sliding_window_past_int32_is_refused():
    """Issue 19 item 5: a window the device cannot hold is refused, naming the bound."""
    kw = {"max_requests": 1, "max_pages_per_request": 2}
    PageAllocator(8, 2, **kw, sliding_window=2**31 - 1)
    with pytest.raises(ValueError, match=r"sliding_window=2147483648 must be <= 2\*\*31 - 1"):
        PageAllocator(8, 2, **kw, sliding_window=2**31)
