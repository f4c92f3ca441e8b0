"""The page pool, rows and growth: allocate, allocate_batch, fork, truncate, free, copies."""

from __future__ import annotations

import numpy as np
import pytest
from _alloc import fresh_with_counters, make, unchanged
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshard.allocator import (
    OutOfPages,
    PageAllocator,
    UnknownRequest,
)


def test_null_page_and_fresh_state():
    a = make(max_pages_per_request=8)
    assert a.num_free_pages == 8 and a.usage == 0.0 and len(a) == 0
    assert a.page_table.shape == (4, 8) and a.page_table.dtype == np.int32
    pages = a.allocate("x", 4 * 8)  # every usable page
    assert sorted(pages.tolist()) == list(range(1, 9)) and a.usage == 1.0
    with pytest.raises(OutOfPages, match="needs 1 pages but only 0"):
        a.allocate("y", 1)
    a.free("x")
    assert not a.page_table.any() and a.num_free_pages == 8


def test_allocate_grows_by_pages():
    a = make()
    assert a.allocate("x", 5).tolist() == [1, 2]
    assert a.allocate("x", 3).tolist() == []  # 8 tokens still fit two pages
    assert a.allocate("x", 1).tolist() == [3]
    assert a.num_tokens("x") == 9 and a.pages("x").tolist() == [1, 2, 3]
    assert a.allocate("y", 0).tolist() == [] and "y" in a and a.pages("y").size == 0
    assert a.usage == pytest.approx(3 / 8)
    with pytest.raises(ValueError, match="read-only"):
        a.page_table[0, 0] = 5  # read-only view


def test_page_table_rows_are_stable_and_reset():
    a = make()
    a.allocate("x", 4)
    a.allocate("y", 8)
    row_x, row_y = a.row("x"), a.row("y")
    a.free("x")
    assert a.row("y") == row_y
    assert not a.page_table[row_x].any() and a.page_table[row_y, :2].all()
    a.allocate("z", 1)
    assert a.row("y") == row_y and a.page_table[a.row("z"), 1:].tolist() == [0, 0, 0]


def test_error_messages_leave_stateunchanged():
    a = make(enable_prefix_caching=True)
    a.allocate("x", 6)
    a.allocate("y", 1)
    for method in (a.free, a.pages, a.num_tokens, a.row):
        unchanged(a, UnknownRequest, lambda m=method: m("nope"), r"req_id='nope'.*unknown|unknown")
    unchanged(a, ValueError, lambda: a.allocate("x", -1), r"num_new_tokens=-1 .*'x'.*>= 0")
    unchanged(a, ValueError, lambda: a.allocate("x", 1.5), r"num_new_tokens=1.5")
    unchanged(
        a,
        ValueError,
        lambda: a.allocate("x", 11),
        r"req_id='x' would hold 17 tokens in 5 pages, more than max_pages_per_request=4",
    )
    a.allocate("z", 12)
    err = unchanged(a, OutOfPages, lambda: a.allocate("w", 12), r"needs 3 pages but only 2")
    assert (err.needed, err.available) == (3, 2)
    a.allocate("w", 1)
    unchanged(a, ValueError, lambda: a.allocate("v", 1), r"req_id='v'.*max_requests=4")
    unchanged(a, ValueError, lambda: a.fork("x", "v"), r"'v'.*max_requests=4 rows are in use")
    unchanged(a, ValueError, lambda: a.fork("x", "y"), r"dst_req='y' is already a live request")
    unchanged(a, UnknownRequest, lambda: a.fork("nope", "v"), r"fork\(src_req\).*'nope'")
    unchanged(
        a, ValueError, lambda: a.allocate_batch(["x", "x"], [1, 1]), "req_ids contains duplicates"
    )
    unchanged(a, ValueError, lambda: a.allocate_batch(["x"], [1, 1]), r"shape \(1,\)")
    unchanged(a, ValueError, lambda: a.allocate_batch(["x", "y"], [1, -3]), r"=-3 .*'y'")
    unchanged(a, ValueError, lambda: a.lookup_prefix("x", [1, 2, 3]), "already holds 6 tokens")
    a.commit_prefix("x", list(range(6)), "t1")
    unchanged(a, ValueError, lambda: a.commit_prefix("x", list(range(6)), "t2"), "namespace='t2'")
    unchanged(a, TypeError, lambda: a.allocate(["unhashable"], 1), "unhashable")
    a.free("y")
    unchanged(a, UnknownRequest, lambda: a.free("y"), r"free: unknown request req_id='y'")
    b = make()
    unchanged(b, ValueError, lambda: b.lookup_prefix("x", [1]), "prefix caching is disabled")
    unchanged(b, ValueError, lambda: b.commit_prefix("x", [1]), "prefix caching is disabled")
    unchanged(
        b,
        ValueError,
        lambda: b.allocate_batch(list(range(5)), [1] * 5),
        "batch of 5 requests exceeds max_requests=4",
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_pages": 1}, "num_pages=1 must be an int >= 2"),
        ({"page_size": 0}, "page_size=0 must be an int >= 1"),
        ({"max_requests": 0}, "max_requests=0"),
        ({"max_pages_per_request": -1}, "max_pages_per_request=-1"),
        ({"page_size": 2.0}, "page_size=2.0"),
    ],
)
def test_constructor_errors(kwargs, match):
    args = {"num_pages": 8, "page_size": 4, "max_requests": 2, "max_pages_per_request": 2}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        PageAllocator(
            args.pop("num_pages"),
            args.pop("page_size"),
            **args,
        )


def test_out_of_pages_pickles():
    import pickle

    err = pickle.loads(pickle.dumps(OutOfPages(3, 1)))
    assert (err.needed, err.available) == (3, 1)


def test_fork_copy_on_write():
    a = make(num_pages=12)
    a.allocate("src", 6)  # pages [1, 2], last page half full
    a.fork("src", "dst")
    assert a.pages("dst").tolist() == [1, 2]
    assert a.state_dict()["refcount"][[1, 2]].tolist() == [2, 2]
    got = a.allocate("dst", 1)  # writes into shared page 2: private copy first
    assert got.tolist() == [3]
    assert a.pages("dst").tolist() == [1, 3]
    assert a.take_pending_copies().tolist() == [[2, 3]]
    assert a.take_pending_copies().shape == (0, 2)
    assert a.allocate("src", 1).tolist() == []  # page 2 is now private to src
    a.check_invariants()


def test_copy_on_write_batch_has_sequential_semantics():
    a = make(num_pages=12, max_requests=4)
    a.allocate("s", 5)
    a.fork("s", "f1")
    a.fork("s", "f2")  # page 2 shared three ways
    a.allocate_batch(["f1", "s", "f2"], [1, 1, 1])
    # The first two writers copy; the last finds the page private and keeps it.
    pairs = a.take_pending_copies()
    assert pairs[:, 0].tolist() == [2, 2]
    assert a.pages("f2").tolist() == [1, 2]
    a.check_invariants()


def test_freed_destination_drops_pending_copy():
    a = make(num_pages=12)
    a.allocate("src", 3)
    a.fork("src", "dst")
    a.allocate("dst", 1)
    a.free("dst")
    assert a.take_pending_copies().shape == (0, 2)


@given(
    st.lists(
        st.lists(
            st.tuples(st.integers(0, 7), st.integers(0, 6)), max_size=6, unique_by=lambda t: t[0]
        ),
        max_size=6,
    ),
    st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7)), max_size=4),
)
@settings(max_examples=60)
def test_batch_equals_sequential_allocates(steps, forks):
    """allocate_batch gives exactly the state of ``allocate`` called in batch order."""
    kw = {"max_requests": 8, "max_pages_per_request": 8, "enable_prefix_caching": True}
    batch, seq = PageAllocator(24, 3, **kw), PageAllocator(24, 3, **kw)
    for i, step in enumerate(steps):
        ids = [r for r, _ in step]
        counts = [n for _, n in step]
        try:
            batch.allocate_batch(ids, counts)
        except (OutOfPages, ValueError):  # too long a request, or out of pages
            continue
        for r, n in step:
            seq.allocate(r, n)
        if i < len(forks):
            src, dst = forks[i]
            for alloc in (batch, seq):
                if src in alloc and dst not in alloc:
                    alloc.fork(src, dst)
        assert batch.checksum() == seq.checksum()
    batch.check_invariants()


def test_free_everything_restores_capacity():
    a = make(num_pages=30, enable_prefix_caching=True, max_pages_per_request=8)
    a.allocate_batch(["a", "b", "c"], [7, 13, 2])
    a.commit_prefix("b", list(range(13)))
    a.fork("b", "d")
    a.allocate("d", 5)
    for r in ["a", "b", "c", "d"]:
        a.free(r)
    assert a.num_free_pages == 29 and a.usage == 0.0 and len(a) == 0
    assert not a.page_table.any()
    a.check_invariants()


@pytest.mark.parametrize("order", [["x", "y"], ["y", "x"]])
def test_free_everything_restores_fresh_checksum(order):
    """Freeing every request gives a fresh allocator's state, stack order included."""
    a = make(page_size=2)
    a.allocate("x", 5)
    a.allocate("y", 5)
    for r in order:
        a.free(r)
    assert a.checksum() == make(page_size=2).checksum()
    assert a.allocate("z", 5).tolist() == [1, 2, 3] and a.row("z") == 0
    # With prefix caching on and nothing cached: the same, up to the prefix counters.
    b = make(page_size=2, enable_prefix_caching=True)
    assert b.lookup_prefix("x", [1, 2, 3]) == 0
    b.allocate("x", 5)
    b.fork("x", "y")
    b.allocate("y", 1)
    for r in order:
        b.free(r)
    fresh = make(page_size=2, enable_prefix_caching=True)
    assert b.checksum() != fresh.checksum()  # the counters are state
    assert b.checksum() == fresh_with_counters(b).checksum()


@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["allocate", "batch", "fork", "free"]),
            st.integers(0, 5),
            st.integers(0, 5),
            st.integers(0, 5),
        ),
        max_size=25,
    ),
    page_size=st.sampled_from([1, 2, 3]),
)
@settings(max_examples=60, deadline=None)
def test_free_everything_canonical_without_prefix_caching(ops, page_size):
    """Caching off: any allocate/fork/free sequence, then freeing all, gives a fresh checksum."""
    kw = {"max_requests": 5, "max_pages_per_request": 6}
    a, fresh = PageAllocator(12, page_size, **kw), PageAllocator(12, page_size, **kw)
    for op, i, j, n in ops:
        try:
            if op == "allocate":
                a.allocate(i, n)
            elif op == "batch":
                a.allocate_batch([i, j] if i != j else [i], [n, 1] if i != j else [n])
            elif op == "fork":
                a.fork(i, j)
            else:
                a.free(i)
        except (OutOfPages, UnknownRequest, ValueError):
            pass
    for r in list(a.state_dict()["rows"]):
        a.free(r)
    a.check_invariants()
    assert a.checksum() == fresh.checksum()


def test_allocate_batch_rows_and_numpy_ids():
    a = make(num_pages=20, max_pages_per_request=8)
    b = make(num_pages=20, max_pages_per_request=8)
    rows = a.allocate_batch(np.array([10, 11, 12]), np.array([5, 0, 17]))
    b.allocate_batch([10, 11, 12], [5, 0, 17])
    assert rows.dtype == np.int32 and rows.tolist() == [a.row(10), a.row(11), a.row(12)]
    assert a.checksum() == b.checksum()  # numpy ids are stored as the equal Python ints
    assert [type(k) for k in a.state_dict()["rows"]] == [int, int, int]
    np.testing.assert_array_equal(
        a.page_table[rows][:, :5], [[1, 2, 0, 0, 0], [0] * 5, [3, 4, 5, 6, 7]]
    )
    assert a.allocate_batch([], []).shape == (0,)
    with pytest.raises(ValueError, match="must be integers"):
        a.allocate_batch([10], [1.5])


# ----------------------------------------------------- adversarial input (issue 10)


@pytest.mark.parametrize(
    "count", [2**63 - 1, int(np.iinfo(np.int64).max), np.int64(2**62), 2**70, 17]
)
def test_allocate_huge_count_is_refusedunchanged(count):
    """Issue 10 finding 2: a count past max_pages_per_request*page_size never wraps."""
    a = make(num_pages=9, page_size=4, enable_prefix_caching=True)
    a.allocate("a", 3)
    unchanged(
        a,
        ValueError,
        lambda: a.allocate("x", count),
        rf"num_new_tokens={int(count)} .*exceeds max_pages_per_request\*page_size=16",
    )
    unchanged(a, ValueError, lambda: a.allocate("a", count), rf"num_new_tokens={int(count)}")
    assert a.num_free_pages == 7
    assert a.allocate("x", 4).tolist() == [2]  # the allocator still works
    a.check_invariants()


@pytest.mark.parametrize(
    "counts",
    [
        np.array([1, 2**63 - 1], np.int64),
        np.array([1, 2**64 - 1], np.uint64),
        np.array([1, 2**63], np.uint64),
        np.array([1, np.iinfo(np.int64).max]),
        [1, 2**62],
    ],
)
def test_allocate_batch_huge_count_is_refusedunchanged(counts):
    a = make(num_pages=9, page_size=4)
    a.allocate("a", 3)
    big = int(np.asarray(counts)[1])
    unchanged(
        a,
        ValueError,
        lambda: a.allocate_batch(["a", "x"], counts),
        rf"num_new_tokens={big} for req_id='x' must be in \[0, .*=16\]",
    )
    assert a.num_free_pages == 7
    a.check_invariants()


def test_constructor_refuses_overflowing_request_size():
    with pytest.raises(
        ValueError,
        match=rf"max_pages_per_request\*page_size={2**60} must be <= 2\*\*31 - 1",
    ):
        PageAllocator(8, 2**30, max_requests=1, max_pages_per_request=2**30)


def test_copy_on_write_chain_resolves_to_original_source():
    """Issue 10 finding 6: fork after growth in one step; correct under copy_pages' order."""
    a = make(num_pages=9, page_size=4)
    a.allocate("a", 2)  # page 1 holds tokens [10, 11]
    device = np.zeros((9, 4), np.int64)
    device[1, :2] = [10, 11]
    a.fork("a", "b")
    assert a.allocate("a", 1).tolist() == [2]  # copy 1 -> 2
    a.fork("a", "c")  # shares page 2, not yet written on the device
    assert a.allocate("c", 1).tolist() == [3]  # copy-on-write of page 2
    pairs = a.take_pending_copies()
    assert pairs.tolist() == [[1, 2], [1, 3]]  # was [[1, 2], [2, 3]]
    device[pairs[:, 1]] = device[pairs[:, 0]]  # copy_pages: every read before any write
    for req in ("a", "b", "c"):
        assert device[a.pages(req)[-1], :2].tolist() == [10, 11], req
    a.check_invariants()


def test_truncate_frees_pages_past_the_new_end():
    a = make(num_pages=9, page_size=4)
    a.allocate("x", 10)  # pages 1, 2, 3
    a.allocate("y", 1)  # page 4
    for bad, match in [
        (-1, r"num_tokens=-1 for req_id='x' must be in \[0, 10\]"),
        (11, r"num_tokens=11 for req_id='x' must be in \[0, 10\]"),
        (1.5, r"num_tokens=1.5 must be an int"),
        (True, r"num_tokens=True must be an int"),
    ]:
        unchanged(a, ValueError, lambda b=bad: a.truncate("x", b), match)
    unchanged(a, UnknownRequest, lambda: a.truncate("nope", 0), "truncate: unknown request")
    a.truncate("x", 5)
    assert a.pages("x").tolist() == [1, 2] and a.num_tokens("x") == 5
    assert a.num_free_pages == 5
    assert a.allocate("x", 3).tolist() == []  # page 2 is private: written in place
    assert a.take_pending_copies().shape == (0, 2)
    assert a.allocate("z", 4).tolist() == [3]  # the freed page is reused
    a.truncate("x", 0)
    assert a.pages("x").size == 0 and "x" in a and not a.page_table[a.row("x")].any()
    a.check_invariants()


def test_truncate_shared_partial_page_is_copied_on_next_write():
    a = make(num_pages=9, page_size=4)
    a.allocate("a", 10)  # pages 1, 2, 3
    a.fork("a", "b")
    a.truncate("b", 5)  # b keeps 1 and half of 2, which a holds in full
    assert a.state_dict()["refcount"][[1, 2, 3]].tolist() == [2, 2, 1]
    assert a.allocate("b", 1).tolist() == [4]  # copy-on-write of page 2
    assert a.take_pending_copies().tolist() == [[2, 4]]
    assert a.pages("a").tolist() == [1, 2, 3] and a.pages("b").tolist() == [1, 4]
    a.check_invariants()


def test_request_tokens_are_capped_at_int32():
    """build_step's positions and kv_lens are int32, so a request's tokens
    (max_pages_per_request * page_size) stop at 2**31 - 1; the cap is refused at
    construction and reached, never passed, by grows."""
    for pages, size, named in [
        (2**15, 2**16, f"max_pages_per_request\\*page_size={2**31}"),  # the product
        (2**31, 1, f"max_pages_per_request={2**31}"),  # a factor past int32 itself
        (1, 2**31, f"page_size={2**31}"),
    ]:
        with pytest.raises(ValueError, match=rf"{named} must be <= 2\*\*31 - 1"):
            PageAllocator(8, size, max_requests=1, max_pages_per_request=pages)
    with pytest.raises(ValueError, match=r"num_pages=2147483648 must be <= 2\*\*31 - 1"):
        PageAllocator(2**31, 1, max_requests=1, max_pages_per_request=1)
    a = PageAllocator(4, 2**31 - 1, max_requests=1, max_pages_per_request=1)
    assert a.allocate("x", 2**31 - 2).tolist() == [1]
    a.allocate("x", 1)
    unchanged(a, ValueError, lambda: a.allocate("x", 1), "would hold 2147483648 tokens")
    unchanged(a, ValueError, lambda: a.allocate_batch(["x"], [1]), "would hold 2147483648")
    assert a.num_tokens("x") == 2**31 - 1 and a.row_num_tokens.max() == 2**31 - 1
    a.check_invariants()


def test_pages_freed_together_reuse_the_last_first():
    """Issue 19 item 5: as vLLM, a freed request's last page is handed out first."""
    a = make(num_pages=9, page_size=4)
    assert a.allocate("x", 12).tolist() == [1, 2, 3]
    a.allocate("keep", 1)  # page 4: the allocator is not empty, so no canonical reset
    a.free("x")
    assert a.allocate("y", 4).tolist() == [3]
    assert a.allocate("z", 8).tolist() == [2, 1]
    a.truncate("z", 0)  # releases 2, 1: 1 is reused first
    assert a.allocate("z", 4).tolist() == [1]
    a.check_invariants()
