"""The allocator's host tier (issue 22 item 2): preemption by swap and the host prefix cache.

Expected pairs and pages are worked out by hand from the documented stack orders (the free
stack hands out 1, 2, 3, ...; pages freed together are reused last-first), never read back
from the allocator.
"""

from __future__ import annotations

import numpy as np
import pytest
from _alloc import fresh_like, fresh_with_counters, make, unchanged
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshard.allocator import OutOfPages, PageAllocator


def tiered(num_pages=9, num_host_pages=5, host_prefix_pages=0, **kw) -> PageAllocator:
    if host_prefix_pages:
        kw.setdefault("enable_prefix_caching", True)
    return make(num_pages, num_host_pages=num_host_pages, host_prefix_pages=host_prefix_pages, **kw)


def test_swap_out_then_in_moves_pages_and_rewrites_the_table():
    a = tiered()
    a.allocate("a", 10)  # pages 1, 2, 3
    assert a.swap_out_request("a") == 3
    assert a.is_swapped_out("a") and a.num_tokens("a") == 10
    assert a.page_table[a.row("a"), :3].tolist() == [0, 0, 0]
    assert a.num_free_pages == 8  # every device page is free again
    assert a.num_free_host_pages == 1  # host pages 1..4, three now hold "a"
    a.check_invariants()
    out, into = a.take_pending_swaps()
    assert out.tolist() == [[1, 1], [2, 2], [3, 3]] and into.shape == (0, 2)
    a.allocate("b", 8)  # takes device pages 3, 2 (the last freed first)
    assert a.pages("b").tolist() == [3, 2]
    got = a.swap_in_request("a")
    assert got.tolist() == [1, 4, 5] and a.pages("a").tolist() == [1, 4, 5]
    out, into = a.take_pending_swaps()
    # Column j's host page goes to column j's new device page.
    assert out.shape == (0, 2) and into.tolist() == [[1, 1], [4, 2], [5, 3]]
    assert not a.is_swapped_out("a") and a.num_free_host_pages == 4
    a.allocate("a", 1)  # schedulable again
    a.check_invariants()


def test_a_swapped_out_request_is_not_schedulable():
    a = tiered(enable_prefix_caching=True)
    a.allocate("a", 5)
    a.fork("a", "kid")
    a.swap_out_request("a")
    for call, match in (
        (lambda: a.allocate("a", 1), "req_id='a' is swapped out"),
        (lambda: a.allocate_batch(["kid", "a"], [1, 1]), "req_id='a' is swapped out"),
        (lambda: a.fork("a", "x"), "src_req='a' is swapped out"),
        (lambda: a.truncate("a", 1), "req_id='a' is swapped out"),
        (lambda: a.swap_out_request("a"), "already swapped out"),
        (lambda: a.commit_prefix("a", [1] * 5), "req_id='a' is swapped out"),
        (lambda: a.swap_in_request("kid"), "req_id='kid' is not swapped out"),
    ):
        unchanged(a, ValueError, call, match)


def test_an_empty_swapped_out_request_is_not_looked_up():
    a = tiered(enable_prefix_caching=True)
    a.allocate("a", 0)
    assert a.swap_out_request("a") == 0
    unchanged(a, ValueError, lambda: a.lookup_prefix("a", [1, 2]), "is swapped out")
    assert a.swap_in_request("a").tolist() == []


def test_shared_and_cached_pages_stay_on_device():
    a = tiered(enable_prefix_caching=True)
    prompt = list(range(9))
    a.lookup_prefix("a", prompt)
    a.allocate("a", 9)  # pages 1, 2, 3
    a.commit_prefix("a", prompt)  # pages 1 and 2 cached
    a.allocate("a", 3)  # token 12 -> still page 3 (private, partial)
    a.allocate("b", 4)  # page 4
    a.fork("b", "b2")  # page 4 shared
    assert a.swap_out_request("a") == 1  # only page 3: 1 and 2 are cached
    assert a.pages("a").tolist() == [1, 2, 0]
    assert a.swap_out_request("b") == 0  # page 4 is shared with b2
    assert a.pages("b2").tolist() == [4] and a.pages("b").tolist() == [4]
    a.check_invariants()
    assert a.take_pending_swaps()[0].tolist() == [[3, 1]]
    a.swap_in_request("a")
    assert a.pages("a").tolist() == [1, 2, 3]  # page 3 was free again: reused first
    a.check_invariants()


def test_too_few_host_pages_refuses_and_changes_nothing():
    a = tiered(num_host_pages=3)  # host pages 1, 2
    a.allocate("a", 12)
    err = unchanged(a, OutOfPages, lambda: a.swap_out_request("a"), "host pages")
    assert (err.needed, err.available) == (3, 2)
    b = make()
    b.allocate("a", 1)
    unchanged(b, ValueError, lambda: b.swap_out_request("a"), "num_host_pages=0")


def test_swap_in_needs_device_pages_and_changes_nothing_without():
    a = tiered(num_pages=5)
    a.allocate("a", 8)  # pages 1, 2
    a.swap_out_request("a")
    a.allocate_batch(["b", "c"], [8, 8])  # all four pages
    err = unchanged(a, OutOfPages, lambda: a.swap_in_request("a"), "swap_in_request")
    assert (err.needed, err.available) == (2, 0)


def test_host_pages_released_this_step_are_not_reused_before_the_pairs_are_taken():
    a = tiered(num_host_pages=3)
    a.allocate("a", 8)
    a.swap_out_request("a")  # host 1, 2
    a.take_pending_swaps()
    a.swap_in_request("a")  # pending reads of host 1, 2
    a.allocate("b", 8)
    unchanged(a, OutOfPages, lambda: a.swap_out_request("b"), "host pages")
    _, into = a.take_pending_swaps()
    assert into[:, 1].tolist() == [1, 2]
    assert a.swap_out_request("b") == 2
    a.check_invariants()


def test_swap_out_is_refused_while_a_pending_copy_touches_its_pages():
    a = tiered()
    a.allocate("a", 2)
    a.fork("a", "a2")
    a.allocate("a2", 1)  # copy-on-write 1 -> 2 pending
    unchanged(a, ValueError, lambda: a.swap_out_request("a2"), "pending copy")
    assert a.take_pending_copies().tolist() == [[1, 2]]
    assert a.swap_out_request("a2") == 1


def test_swap_in_is_refused_while_a_pending_copy_reads_an_unowned_page():
    a = tiered(enable_prefix_caching=True)
    prompt = list(range(4))
    a.allocate("a", 4)
    a.commit_prefix("a", prompt)
    a.truncate("a", 2)  # cached page 1 cut back into
    a.allocate("a", 1)  # copy-on-write of cached page 1 -> 2; page 1 now evictable
    a.allocate("b", 4)
    a.swap_out_request("b")
    unchanged(a, ValueError, lambda: a.swap_in_request("b"), "pending copy-on-write")
    a.take_pending_copies()
    a.swap_in_request("b")


def test_free_releases_a_swapped_out_request():
    a = tiered()
    a.allocate("a", 8)
    a.swap_out_request("a")
    a.free("a")
    a.check_invariants()
    assert a.take_pending_swaps()[0].tolist() == [[1, 1], [2, 2]]
    assert a.num_free_host_pages == 4
    # Exactly a fresh allocator's state (orders included) but for the cumulative counters.
    assert a.checksum() == fresh_with_counters(a).checksum()


def test_demoted_prefix_is_served_from_the_host():
    a = tiered(host_prefix_pages=2)
    prompt = list(range(13))
    a.lookup_prefix("c", prompt)
    a.allocate("c", 13)  # pages 1, 2, 3, 4
    a.commit_prefix("c", prompt)  # pages 1, 2, 3 cached
    a.free("c")  # 4 free; 3, 2, 1 evictable (3 oldest)
    a.allocate_batch(["d", "e"], [16, 16])  # 4..8 free, then evicts 3, 2, 1
    out, into = a.take_pending_swaps()
    # Room for two: the prefix's first pages (1, 2) are kept, in device eviction order.
    assert out.tolist() == [[2, 2], [1, 1]] and into.shape == (0, 2)
    assert a.tier_stats["demoted_pages"] == 2
    a.free("d")
    a.free("e")
    assert a.peek_prefix(prompt) == 8
    assert a.lookup_prefix("f", prompt) == 8
    out, into = a.take_pending_swaps()
    pages = a.pages("f").tolist()
    assert into.tolist() == [[pages[0], 1], [pages[1], 2]] and out.shape == (0, 2)
    stats = a.tier_stats
    assert (stats["host_hits"], stats["device_hits"]) == (8, 0)
    assert a.prefix_stats["hits"] == 8
    # The keys moved to the device: a second lookup hits on device.
    assert a.lookup_prefix("g", prompt) == 8 and a.pages("g").tolist() == pages
    assert a.tier_stats["device_hits"] == 8
    a.check_invariants()


@pytest.mark.parametrize("extra", [False, True])
def test_a_tenant_never_reads_another_tenants_host_page(extra):
    a = tiered(host_prefix_pages=4, enable_prefix_caching=True)
    prompt = list(range(9))
    kw = {"extra_keys": ["lora-1", "lora-1"]} if extra else {}
    a.lookup_prefix("x", prompt, "tenant-a", **kw)
    a.allocate("x", 9)
    a.commit_prefix("x", prompt, "tenant-a", **kw)
    a.free("x")
    a.allocate_batch(["big", "big2"], [16, 16])  # evicts both cached pages to the host
    a.free("big")
    a.free("big2")
    assert a.tier_stats["demoted_pages"] == 2
    assert a.lookup_prefix("y", prompt, "tenant-b", **kw) == 0
    assert a.lookup_prefix("w", prompt, "tenant-a") == (0 if extra else 8)
    a.check_invariants()


def test_host_prefix_capacity_is_its_own():
    a = tiered(num_host_pages=5, host_prefix_pages=1)
    prompt = list(range(9))
    a.lookup_prefix("c", prompt)
    a.allocate("c", 9)
    a.commit_prefix("c", prompt)
    a.free("c")
    a.allocate_batch(["d", "e"], [16, 16])
    assert a.take_pending_swaps()[0].tolist() == [[1, 1]]  # one page of room: the first
    assert a.num_free_host_pages == 4  # a swap-out may take the cached one
    a.check_invariants()


def test_config_bounds():
    for kw, match in (
        ({"num_host_pages": 1}, "num_host_pages=1"),
        ({"num_host_pages": -1}, "num_host_pages=-1"),
        ({"num_host_pages": 4, "host_prefix_pages": 2}, "needs enable_prefix_caching"),
        (
            {"num_host_pages": 3, "host_prefix_pages": 3, "enable_prefix_caching": True},
            "host_prefix_pages=3 must be <= num_host_pages - 1 = 2",
        ),
    ):
        with pytest.raises(ValueError, match=match):
            make(**kw)


def _busy() -> PageAllocator:
    a = tiered(host_prefix_pages=2)
    prompt = list(range(9))
    a.lookup_prefix("c", prompt)
    a.allocate("c", 9)
    a.commit_prefix("c", prompt)
    a.free("c")
    a.allocate_batch(["d", "e"], [16, 8])  # demotes the two cached pages
    a.allocate("s", 4)
    a.swap_out_request("s")
    return a


def test_state_round_trip_covers_the_host_tier():
    a = _busy()
    b = fresh_like(a)
    b.load_state_dict(a.state_dict())
    assert b.checksum() == a.checksum()
    assert [p.tolist() for p in b.take_pending_swaps()] == [
        p.tolist() for p in a.take_pending_swaps()
    ]
    assert b.checksum() == a.checksum()
    b.swap_in_request("s")
    a.swap_in_request("s")
    assert b.checksum() == a.checksum()


BAD_HOST_STATE = [
    ("host_free", lambda s: np.append(s["host_free"], s["host_table"].max()), "lost or doubled"),
    ("host_free", lambda s: np.array([0]), "host_free"),
    ("host_table", lambda s: np.where(s["host_table"] > 0, 1, 0), "doubled"),
    ("row_swapped", lambda s: np.zeros_like(s["row_swapped"]), "not swapped out"),
    ("pending_swap_out", lambda s: np.array([[1, 0]]), "null page"),
    ("pending_swap_in", lambda s: np.array([[1, 1]]), "not in limbo"),
    ("host_cached", lambda s: np.zeros_like(s["host_cached"]), "lost or doubled"),
    ("host_key", lambda s: np.zeros_like(s["host_key"]), "host_key"),
    ("host_stats", lambda s: {"host_hits": 1}, "host_stats"),
    ("host_clock", lambda s: -1, "host_clock"),
]


@pytest.mark.parametrize(("name", "corrupt", "match"), BAD_HOST_STATE)
def test_load_refuses_bad_host_state_and_keeps_its_own(name, corrupt, match):
    a = _busy()
    state = a.state_dict()
    state[name] = corrupt(state)
    b = fresh_like(a)
    b.allocate("z", 3)
    unchanged(b, ValueError, lambda: b.load_state_dict(state), match)


def test_checksum_sees_host_state():
    a, b = _busy(), _busy()
    assert a.checksum() == b.checksum()
    b.take_pending_swaps()
    assert a.checksum() != b.checksum()


def test_no_host_hit_while_a_pending_copy_reads_an_unowned_page():
    a = tiered(host_prefix_pages=2)
    prompt = list(range(9))
    a.lookup_prefix("c", prompt)
    a.allocate("c", 9)
    a.commit_prefix("c", prompt)
    a.free("c")
    a.allocate_batch(["d", "e"], [16, 16])  # both cached pages go to the host
    a.free("d")
    a.free("e")
    a.take_pending_swaps()
    a.allocate("t", 4)
    a.commit_prefix("t", [7, 7, 7, 7])
    a.truncate("t", 2)
    a.allocate("t", 1)  # copies cached page -> new page; the cached one is unowned now
    assert a.peek_prefix(prompt) == 0  # the host hits wait until the copy is applied
    assert a.lookup_prefix("f", prompt) == 0
    a.free("f")
    a.take_pending_copies()
    assert a.peek_prefix(prompt) == 8


def test_host_hits_stop_where_the_device_pages_run_out():
    a = tiered(num_pages=5, host_prefix_pages=3)
    prompt = list(range(13))
    a.lookup_prefix("c", prompt)
    a.allocate("c", 13)  # pages 1..4
    a.commit_prefix("c", prompt)  # 1, 2, 3 cached
    a.free("c")
    a.allocate("d", 16)  # page 4, then evicts 3, 2, 1 into the host
    assert a.take_pending_swaps()[0][:, 0].tolist() == [3, 2, 1]
    a.free("d")
    a.allocate("x", 12)  # one device page left
    assert a.peek_prefix(prompt) == 4
    assert a.lookup_prefix("f", prompt) == 4
    assert a.take_pending_swaps()[1].shape == (1, 2)
    a.check_invariants()


# ----------------------------------------------------- swap_out_frees: asked before doing it


def test_swap_out_frees_counts_only_own_uncached_pages_and_changes_nothing():
    a = tiered(enable_prefix_caching=True)
    a.allocate("a", 12)  # pages 1, 2, 3, full
    assert a.commit_prefix("a", list(range(12))) == 3  # all cached
    a.allocate("a", 2)  # page 4, private
    a.allocate("b", 6)  # pages 5 and 6, shared with b2 by the fork
    a.fork("b", "b2")
    before = a.checksum()
    assert (a.swap_out_frees("a"), a.swap_out_frees("b"), a.swap_out_frees("b2")) == (1, 0, 0)
    assert a.checksum() == before
    free = a.num_free_pages
    assert a.swap_out_request("a") == 1 and a.num_free_pages == free + 1
    assert a.swap_out_request("b") == 0 and a.num_free_pages == free + 1
    unchanged(a, ValueError, lambda: a.swap_out_frees("a"), "swap_out_frees: req_id='a' is")
    unchanged(a, KeyError, lambda: a.swap_out_frees("zz"), "swap_out_frees")
    plain = make()
    plain.allocate("a", 4)
    unchanged(plain, ValueError, lambda: plain.swap_out_frees("a"), "no host tier")


def test_swap_out_frees_counts_what_swap_out_request_frees_even_when_it_refuses():
    a = tiered(num_host_pages=2)  # one usable host page
    a.allocate("a", 9)  # 3 pages
    assert a.swap_out_frees("a") == 3 > a.num_free_host_pages
    unchanged(a, OutOfPages, lambda: a.swap_out_request("a"), "host pages")


@st.composite
def traffic(draw):
    """An allocator config and a list of operations: prefix hits, forks, truncations, frees,
    window releases and layer groups make pages shared, cached or released."""
    layer_types = draw(st.sampled_from([None, [("full",), ("sliding", 5)], [("sliding", 6)] * 2]))
    ops = draw(
        st.lists(
            st.tuples(
                st.sampled_from(
                    ["grow", "grow", "lookup", "commit", "fork", "truncate", "free", "out"]
                ),
                st.integers(0, 3),  # request
                st.integers(0, 3),  # another request / a token count
                st.integers(1, 9),  # tokens
            ),
            min_size=5,
            max_size=40,
        )
    )
    return layer_types, ops


@settings(max_examples=100, deadline=None)
@given(traffic())
def test_swap_out_frees_agrees_with_swap_out_request(case):
    layer_types, ops = case
    a = make(
        16,
        max_requests=4,
        enable_prefix_caching=True,
        num_host_pages=40,
        layer_types=layer_types,
    )
    prompt = [7, 7, 1, 2, 3, 4, 5, 6, 8, 9, 1, 2, 3, 4, 5, 6]  # shared by every request
    for op, r, other, n in ops:
        try:
            if op == "grow":
                a.allocate(r, n)
            elif op == "lookup":
                a.lookup_prefix(r, prompt[: 2 + n])
            elif op == "commit":
                a.commit_prefix(r, prompt)
            elif op == "fork":
                a.fork(r, other)
            elif op == "truncate":
                a.truncate(r, other)
            elif op == "free":
                a.free(r)
            else:
                a.swap_out_request(r)
        except (ValueError, KeyError, OutOfPages):
            pass  # refused: nothing changed
        a.take_pending_copies()
        a.take_pending_swaps()
    for r in [r for r in range(4) if r in a and not a.is_swapped_out(r)]:
        before = a.checksum()
        frees = a.swap_out_frees(r)
        assert a.checksum() == before
        b = fresh_like(a)
        b.load_state_dict(a.state_dict())
        free = b.num_free_pages
        assert b.swap_out_request(r) == frees
        assert b.num_free_pages - free == frees
        b.check_invariants()
