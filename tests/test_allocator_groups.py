"""PageAllocator(layer_types=): one page table per KV-cache group, all over one pool.

Layouts: Gemma 3 (five sliding-window layers to one full, 12 layers: groups of 2 cache
layers, five sliding groups and one full group), gpt-oss (sliding and full alternating: one
group of each) and Llama 4 (chunked local attention and full). The state machine is in
tests/test_allocator_groups_machine.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from _alloc import unchanged

from kvshard._geometry.plan_groups import pages_per_request
from kvshard.allocator import NULL_PAGE, OutOfPages, PageAllocator, PagesRemoved, PagesStored

S8 = ("sliding", 8)
FULL = ("full",)
GEMMA3 = ([S8] * 5 + [FULL]) * 2  # 12 layers
GPT_OSS = [S8, FULL] * 2
LLAMA4 = [("chunked", 8)] * 3 + [FULL]


def make(layer_types, num_pages=80, page_size=4, **kw):
    kw.setdefault("max_requests", 4)
    kw.setdefault("max_pages_per_request", 12)
    return PageAllocator(num_pages, page_size, layer_types=layer_types, **kw)


def test_gemma3_groups_and_shapes():
    a = make(GEMMA3)
    # 10 sliding and 2 full layers: groups of 2 cache layers, 5 sliding groups, 1 full.
    assert a.num_groups == 6
    assert a.group_types == (S8,) * 5 + (FULL,)
    assert a.groups.group_size == 2
    assert a.page_table.shape == (6, 4, 12)
    assert a.row_num_released.shape == (6, 4)
    a.allocate("r", 20)
    assert a.pages("r").shape == (6, 5)
    assert a.num_free_pages == 79 - 30  # 5 pages in each of 6 groups, one pool


def test_gemma3_releases_local_pages_and_keeps_global_pages():
    a = make(GEMMA3)
    a.allocate("r", 20)
    a.allocate("r", 1)  # token 20 reads tokens 13..20: pages 0-2 (tokens 0-11) are released
    pages = a.pages("r")
    assert (pages[:5, :3] == NULL_PAGE).all()
    assert (pages[:5, 3:] != NULL_PAGE).all()
    assert (pages[5] != NULL_PAGE).all()  # the full group keeps every page
    assert a.num_free_pages == 79 - (5 * 3 + 6)  # the pool got 15 pages back
    assert list(a.row_num_released[:, a.row("r")]) == [3] * 5 + [0]
    a.check_invariants()


def test_gpt_oss_alternating():
    a = make(GPT_OSS, page_size=2)
    assert a.num_groups == 2 and a.group_types == (S8, FULL)
    a.allocate("r", 12)
    a.allocate("r", 1)  # token 12 reads 5..12: pages 0, 1 (tokens 0-3) released
    pages = a.pages("r")
    assert list(pages[0, :2]) == [0, 0] and (pages[0, 2:] != 0).all()
    assert (pages[1] != 0).all()
    assert a.num_free_pages == 79 - (5 + 7)


def test_chunked_group_releases_pages_before_the_chunk_of_the_next_token():
    a = make(LLAMA4)
    assert a.group_types == (("chunked", 8),) * 3 + (FULL,)
    a.allocate("r", 15)
    a.allocate("r", 1)  # token 15 is in chunk [8, 16): pages 0, 1 released
    assert list(a.pages("r")[0, :3]) == [0, 0, a.pages("r")[0, 2]] and a.pages("r")[0, 2]
    a.allocate("r", 1)  # token 16 starts chunk [16, 24): pages 2, 3 released too
    chunked = a.pages("r")[0]
    assert list(chunked[:4]) == [0] * 4 and chunked[4] != 0
    a.check_invariants()


def test_llama4_grouping():
    a = make(LLAMA4)
    # 3 chunked and 1 full: group size 1, three chunked groups and one full group.
    assert a.groups.group_size == 1 and a.num_groups == 4


@pytest.mark.parametrize("page_size", [1, 2, 3])
def test_pages_held_peak_at_the_planners_bound_per_group(page_size):
    """Decoding token by token, each group holds at most (and at some point exactly) the
    pages the planner counts for its type."""
    layer_types = [("sliding", 5), ("chunked", 4), FULL]
    context = 30
    a = PageAllocator(
        200, page_size, max_requests=1, max_pages_per_request=30, layer_types=layer_types
    )
    most = np.zeros(3, np.int64)
    for _ in range(context):
        a.allocate("r", 1)
        most = np.maximum(most, (a.pages("r") != NULL_PAGE).sum(axis=1))
    assert list(most) == [pages_per_request(t, page_size, context) for t in a.group_types]


def test_uniform_layer_types_are_one_group_as_today():
    a = make([S8] * 4)
    b = PageAllocator(80, 4, max_requests=4, max_pages_per_request=12, sliding_window=8)
    assert a.num_groups == 1 and a.sliding_window == 8 and a.page_table.shape == (4, 12)
    for alloc in (a, b):
        alloc.allocate("r", 20)
        alloc.allocate("r", 1)
    assert np.array_equal(a.page_table, b.page_table)
    assert np.array_equal(a.pages("r"), b.pages("r"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layer_types": [("sliding", 0)]}, r"layer_types\[0\]=\('sliding', 0\)"),
        ({"layer_types": [("window", 4)]}, r"layer_types\[0\]=\('window', 4\)"),
        ({"layer_types": []}, "layer_types=.* must be None or a non-empty"),
        ({"layer_types": [S8, FULL], "sliding_window": 8}, "sliding_window=8 disagrees"),
        ({"layer_types": [S8, S8], "sliding_window": 4}, "sliding_window=4 disagrees"),
        (
            {
                "layer_types": [S8],
                "num_host_pages": 8,
                "host_prefix_pages": 4,
                "enable_prefix_caching": True,
            },
            "host_prefix_pages=4 needs full attention",
        ),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PageAllocator(8, 2, max_requests=2, max_pages_per_request=4, **kwargs)


def test_refused_allocation_changes_nothing_window_releases_included():
    a = make(GEMMA3, num_pages=40)
    a.allocate("r", 20)  # 30 pages
    a.allocate("r", 1)  # releases 15: 21 held, 18 free
    a.allocate("r", 3)  # 24 tokens, still 6 columns
    a.allocate("s", 8)  # 12 more: 6 free
    before = a.state_dict()
    # Growing r by 12 tokens would release 5 * 1 page (token 24 reads from 17) but needs 3 new
    # columns in 6 groups = 18 pages > 6 + 5 free: refused, the releases are not made either.
    unchanged(a, OutOfPages, lambda: a.allocate("r", 12), "needs 18 pages but only 11")
    after = a.state_dict()
    for name, value in before.items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(value, after[name]), name
    a.check_invariants()


def test_fork_copies_the_shared_partial_page_of_every_group():
    a = make(GPT_OSS)
    a.allocate("p", 6)
    a.fork("p", "c")
    a.allocate("c", 1)  # its last page is partial and shared in both groups
    pairs = a.take_pending_copies()
    parent, child = a.pages("p"), a.pages("c")
    assert pairs.shape == (2, 2)
    assert sorted(pairs[:, 0].tolist()) == sorted(parent[:, 1].tolist())
    assert sorted(pairs[:, 1].tolist()) == sorted(child[:, 1].tolist())
    assert (parent[:, 0] == child[:, 0]).all()  # full pages stay shared
    a.check_invariants()


def test_truncate_refuses_rolling_back_into_released_pages_of_any_group():
    a = make(GPT_OSS)
    a.allocate("r", 20)
    a.allocate("r", 1)  # sliding group released pages 0-2
    unchanged(a, ValueError, lambda: a.truncate("r", 12), r"group 0, \('sliding', 8\)")
    a.truncate("r", 19)  # token 19 reads from 12: page 3 on, all held
    assert a.pages("r").shape == (2, 5)
    a.free("r")
    assert a.num_free_pages == 79
    a.check_invariants()


def test_state_dict_round_trip_and_checksum():
    a = make(GEMMA3, enable_prefix_caching=True)
    tokens = np.arange(24)
    a.allocate("r", 24)
    a.commit_prefix("r", tokens)
    state = a.state_dict()
    assert state["version"] == 5 and state["page_table"].shape == (6, 4, 12)
    b = make(GEMMA3, enable_prefix_caching=True)
    b.load_state_dict(state)
    assert b.checksum() == a.checksum()
    assert np.array_equal(b.page_table, a.page_table)
    bad = dict(state, page_table=state["page_table"][0])
    unchanged(b, ValueError, lambda: b.load_state_dict(bad), "page_table has shape")


def test_version_4_state_loads():
    a = PageAllocator(8, 2, max_requests=2, max_pages_per_request=4)
    a.allocate("r", 3)
    old = a.state_dict()
    old["version"] = 4
    del old["page_group"]
    old["config"] = {k: v for k, v in old["config"].items() if k != "layer_types"}
    b = PageAllocator(8, 2, max_requests=2, max_pages_per_request=4)
    b.load_state_dict(old)
    assert b.checksum() == a.checksum()


def test_allocate_batch_is_sequential_allocate_in_every_group():
    """One batch (window releases, copies in several groups, new requests) equals the same
    calls one by one: the same state, the same pending copies."""

    def prepare():
        a = make(GPT_OSS, num_pages=40, max_requests=6, enable_prefix_caching=True)
        a.allocate("p", 21)
        a.commit_prefix("p", np.arange(21))
        a.fork("p", "q")
        a.allocate("s", 3)
        return a

    batch, one_by_one = prepare(), prepare()
    ids, counts = ["p", "q", "s", "new"], [5, 2, 9, 6]
    batch.allocate_batch(ids, counts)
    for req, count in zip(ids, counts, strict=True):
        one_by_one.allocate(req, count)
    assert batch.checksum() == one_by_one.checksum()
    # p and q share a partial page in each group: p copies it, q keeps it (the last owner).
    assert batch.take_pending_copies().shape == (2, 2)
    batch.check_invariants()


def test_swap_moves_every_groups_own_pages_and_brings_them_back():
    a = make(GPT_OSS, num_pages=20, num_host_pages=12)
    a.allocate("r", 20)
    a.allocate("r", 1)  # sliding group: pages 0-2 released, 3 left; full group: 6
    before = a.pages("r")
    assert a.swap_out_request("r") == 3 + 6
    out, into = a.take_pending_swaps()
    assert out[:, 0].tolist() == [*before[0, 3:], *before[1]]  # group by group, row order
    assert not a.pages("r").any() and a.num_free_pages == 19
    assert into.shape == (0, 2)
    a.allocate("s", 36)  # 9 columns in 2 groups: 1 page left
    unchanged(a, OutOfPages, lambda: a.swap_in_request("r"), "needs 9 pages but only 1")
    a.free("s")
    device = a.swap_in_request("r")
    _, into = a.take_pending_swaps()
    assert into[:, 0].tolist() == device.tolist() and into[:, 1].tolist() == out[:, 1].tolist()
    after = a.pages("r")
    assert (after[0, :3] == 0).all() and after[0, 3:].all() and after[1].all()
    a.check_invariants()


def test_swap_out_refuses_when_host_pages_are_short():
    a = make(GPT_OSS, num_pages=20, num_host_pages=6)
    a.allocate("r", 12)  # 3 + 3 pages, 5 usable host pages
    unchanged(a, OutOfPages, lambda: a.swap_out_request("r"), "needs 6 pages but only 5")


# ------------------------------------------------------------------ prefix caching


def test_hybrid_hit_needs_full_pages_from_zero_and_window_pages_only():
    a = make(GPT_OSS, enable_prefix_caching=True, enable_kv_events=True)
    prompt = np.arange(41)
    a.allocate("r", 32)
    a.allocate("r", 1)  # sliding group releases pages 0-5 (token 32 reads from 25)
    assert a.commit_prefix("r", prompt) == 8 + 2  # full: 8 pages; sliding: pages 6, 7
    stored = [e for e in a.take_kv_events() if isinstance(e, PagesStored)]
    assert [(e.group, len(e.page_hashes)) for e in stored] == [(0, 2), (1, 8)]
    assert stored[0].page_hashes == stored[1].page_hashes[6:]  # one key per block
    # A new request of the same prompt: 10 full pages may hit (40 tokens, the last computed);
    # 8 are cached in the full group, and the sliding group can serve h = 8 (token 32 reads
    # 25..32: pages 6, 7), so the hit is 32 tokens.
    assert a.peek_prefix(prompt) == 32
    assert a.lookup_prefix("s", prompt) == 32
    s = a.pages("s")
    assert list(s[0, :6]) == [0] * 6 and list(s[0, 6:]) == list(a.pages("r")[0, 6:8])
    assert list(s[1]) == list(a.pages("r")[1, :8])
    a.check_invariants()


def test_hybrid_hit_shrinks_to_what_the_window_group_holds():
    a = make(GPT_OSS, enable_prefix_caching=True)
    prompt = np.arange(41)
    a.allocate("r", 32)
    a.allocate("r", 1)
    a.commit_prefix("r", prompt)
    # A prompt of 25 tokens may hit 6 pages: the full group has them, the sliding group would
    # need pages 2-5 (token 24 reads 17..24), which it released: no h in 1..6 works but h = 0.
    assert a.peek_prefix(prompt[:25]) == 0
    # h = 8 works as above; h = 7 would need page 3-6: page 3-5 are gone.
    assert a.peek_prefix(prompt[:33]) == 32


def test_eviction_event_names_the_group():
    a = make(GPT_OSS, num_pages=9, enable_prefix_caching=True, enable_kv_events=True)
    a.allocate("r", 8)
    a.commit_prefix("r", np.arange(8))  # 2 blocks, cached in both groups
    a.free("r")
    a.take_kv_events()
    a.allocate("s", 16)  # 8 pages: the 4 plain free ones, then all 4 cached ones
    removed = [e for e in a.take_kv_events() if isinstance(e, PagesRemoved)]
    assert sorted(e.group for e in removed) == [0, 1]
    assert all(len(e.page_hashes) == 2 for e in removed)


def test_single_sliding_group_with_prefix_caching():
    a = PageAllocator(
        40, 4, max_requests=4, max_pages_per_request=12, sliding_window=8,
        enable_prefix_caching=True,
    )  # fmt: skip
    prompt = np.arange(41)
    a.allocate("r", 32)
    a.allocate("r", 1)
    assert a.commit_prefix("r", prompt) == 2  # pages 6, 7 (0-5 released)
    assert a.lookup_prefix("s", prompt) == 32
    assert list(a.pages("s")[:6]) == [0] * 6


def test_reset_and_load_cover_every_groups_cache():
    a = make(GPT_OSS, enable_prefix_caching=True, enable_kv_events=True)
    a.allocate("r", 8)
    a.commit_prefix("r", np.arange(8))
    state = a.state_dict()
    assert sorted(state["page_group"][state["cached"]].tolist()) == [0, 0, 1, 1]
    b = make(GPT_OSS, enable_prefix_caching=True, enable_kv_events=True)
    b.load_state_dict(state)
    stored = [e for e in b.take_kv_events() if isinstance(e, PagesStored)]
    assert [(e.group, len(e.page_hashes)) for e in stored] == [(0, 2), (1, 2)]
    a.free("r")
    assert a.reset_prefix_cache()
    state = a.state_dict()
    assert not state["cached"].any() and not state["page_group"].any()
    assert a.num_free_pages == 79 and a.peek_prefix(np.arange(9)) == 0
