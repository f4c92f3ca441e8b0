"""The prefix index: lookup, peek, commit, LRU eviction, namespaces."""

from __future__ import annotations

import pytest
from _alloc import make, unchanged

from kvshard.allocator import OutOfPages, PageAllocator


def test_prefix_caching_across_namespaces():
    a = make(num_pages=20, enable_prefix_caching=True, max_requests=6)
    prompt = list(range(10))  # two full pages + 2 tokens
    a.allocate("x", 10)
    assert a.commit_prefix("x", prompt, "t1") == 2
    assert a.commit_prefix("x", prompt, "t1") == 0  # idempotent
    assert a.lookup_prefix("same", prompt, "t1") == 8
    assert a.pages("same").tolist() == a.pages("x")[:2].tolist()
    assert a.lookup_prefix("other", prompt, "t2") == 0  # tenants never share
    assert a.lookup_prefix("plain", prompt) == 0  # None is its own namespace
    assert a.pages("other").size == 0 and "other" in a
    # A prompt that is entirely cached still leaves its last token to compute.
    assert a.lookup_prefix("exact", prompt[:8], "t1") == 4
    assert a.lookup_prefix("diverge", [0, 1, 2, 3, 9, 9, 9, 9, 9], "t1") == 4
    stats = a.prefix_stats
    assert stats["lookups"] == 5 and stats["queries"] == 10 * 3 + 8 + 9
    assert stats["hits"] == 8 + 4 + 4 and stats["evictions"] == 0


def test_prefix_pages_survive_free_until_evicted_lru():
    a = make(num_pages=9, page_size=2, enable_prefix_caching=True, max_pages_per_request=8)
    a.allocate("x", 4)  # pages 1, 2
    a.commit_prefix("x", [1, 2, 3, 4])
    a.allocate("y", 4)  # pages 3, 4
    a.commit_prefix("y", [5, 6, 7, 8])
    a.free("x")  # evictable: 2 then 1 (the last page goes first)
    a.free("y")  # then 4, 3
    assert a.num_free_pages == 8 and a.num_evictable_pages == 4
    assert a.allocate("z", 8).tolist() == [5, 6, 7, 8]  # free stack first: nothing evicted
    assert a.allocate("z", 2).tolist() == [2]  # oldest evictable page: x's last page
    assert a.prefix_stats["evictions"] == 1
    # Eviction order now: 1, 4, 3.
    assert a.lookup_prefix("x2", [1, 2, 3, 4, 0]) == 2  # page 1 survived, page 2 was evicted
    a.allocate("x2", 0)  # served (vLLM touches its hits now)
    a.free("x2")  # page 1 evictable again, now the newest: 4, 3, 1
    assert a.lookup_prefix("y2", [5, 6, 0]) == 2  # page 3
    a.free("y2")  # never grown: the lookup is undone, 3 goes back to its place: 4, 3, 1
    assert a.allocate("z", 6).tolist() == [4, 3, 1]
    assert a.lookup_prefix("x3", [1, 2, 3, 4, 0]) == 0
    assert a.prefix_stats["evictions"] == 4
    a.check_invariants()


def test_truncate_into_cached_page_keeps_the_cache_intact():
    a = make(num_pages=9, page_size=4, enable_prefix_caching=True)
    prompt = list(range(8))
    a.allocate("x", 8)
    assert a.commit_prefix("x", prompt) == 2  # pages 1, 2 cached
    a.truncate("x", 6)  # rejected draft tokens 6, 7 in cached page 2
    assert a.allocate("x", 1).tolist() == [3]  # a private copy, not a write into page 2
    assert a.take_pending_copies().tolist() == [[1 + 1, 3]]
    assert a.lookup_prefix("w", [*prompt, 99]) == 8  # page 2 still holds tokens 4..7
    assert a.pages("w").tolist() == [1, 2]
    a.free("w")
    a.check_invariants()
    # Once nobody holds the cached page, it is evictable, not free.
    b = make(num_pages=9, page_size=4, enable_prefix_caching=True)
    b.allocate("x", 8)
    b.commit_prefix("x", prompt)
    b.truncate("x", 6)
    b.allocate("x", 1)
    assert b.num_evictable_pages == 1 and b.num_free_pages == 8 - 2
    b.check_invariants()


def test_batch_serves_what_sequential_allocates_serve_after_a_cached_copy():
    """Issue 19 item 5: a truncated cached page copied on write by its last owner becomes
    evictable, so a later request of the same batch may take it, as in sequential calls."""

    def setup():
        a = PageAllocator(6, 2, max_requests=2, max_pages_per_request=4, enable_prefix_caching=True)
        a.allocate("x", 4)  # pages 1, 2
        assert a.commit_prefix("x", [1, 2, 3, 4]) == 2
        a.truncate("x", 3)  # page 2 is cached and partial: x's next write copies it
        a.allocate("y", 4)  # pages 3, 4; page 5 is the only free page
        return a

    seq = setup()
    assert seq.allocate("x", 1).tolist() == [5]  # the copy of page 2, which is then evictable
    assert seq.allocate("y", 1).tolist() == [2]  # evicts it
    batch = setup()
    before = batch.checksum()
    batch.allocate_batch(["x", "y"], [1, 1])  # raised OutOfPages(2, 1)
    assert batch.checksum() == seq.checksum() != before
    batch.check_invariants()
    # The other order cannot be served either way: y comes before the page is evictable.
    other = setup()
    unchanged(other, OutOfPages, lambda: other.allocate_batch(["y", "x"], [1, 1]), "needs 2")
    with pytest.raises(OutOfPages):
        seq2 = setup()
        seq2.allocate("y", 1)
        seq2.allocate("x", 1)


def test_peek_prefix_touches_nothing():
    """Issue 19 item 3: peek_prefix returns lookup_prefix's count, attaching nothing."""
    a = make(num_pages=9, page_size=2, enable_prefix_caching=True)
    a.allocate("x", 4)  # pages 1, 2
    a.commit_prefix("x", [1, 2, 3, 4], "t")
    a.free("x")  # evictable: 2 then 1
    before = a.checksum()
    assert a.peek_prefix([1, 2, 3, 4, 5], "t") == 4
    assert a.peek_prefix([1, 2, 3, 4], "t") == 2  # the last token is always computed
    assert a.peek_prefix([1, 2, 3, 4, 5]) == 0  # another namespace
    assert a.checksum() == before and a.prefix_stats["lookups"] == 0
    assert a.lookup_prefix("w", [1, 2, 3, 4, 5], "t") == 4
    unchanged(a, ValueError, lambda: a.peek_prefix([[1, 2]]), "1-D")
    unchanged(a, TypeError, lambda: a.peek_prefix([1], 3), "namespace")
    b = make()
    unchanged(b, ValueError, lambda: b.peek_prefix([1, 2, 3]), "peek_prefix: prefix caching")


def test_refused_request_after_lookup_leaves_the_eviction_order_as_vllm():
    """Issue 19 item 3, the repro: a request looked up, refused (OutOfPages) and freed leaves
    its hits where they were in the eviction order, as vLLM, which touches hits only once
    their allocation succeeds; peek_prefix sizes it without attaching anything."""

    def setup():
        a = PageAllocator(5, 2, max_requests=3, max_pages_per_request=4, enable_prefix_caching=True)
        a.allocate("old", 2)  # page 1
        a.commit_prefix("old", [7, 7])
        a.allocate("hot", 2)  # page 2
        a.commit_prefix("hot", [5, 5])
        a.free("old")  # evictable, oldest
        a.free("hot")  # evictable, newest
        a.allocate("full", 4)  # pages 3, 4: only the two evictable pages are left
        return a

    a, fresh = setup(), setup().checksum()
    twin = setup()
    assert a.lookup_prefix("r", [7, 7, 1]) == 2  # attaches page 1: nothing can evict it now
    unchanged(a, OutOfPages, lambda: a.allocate("r", 5), "needs 3 pages but only 1")
    a.free("r")  # the lookup is undone: page 1 is the oldest again
    # The state is the untouched one but for the prefix counters (and the stack of rows).
    twin.load_state_dict({**twin.state_dict(), "prefix_stats": a.prefix_stats})
    assert twin.state_dict()["lru"].tolist() == a.state_dict()["lru"].tolist()
    assert twin.state_dict()["clock"] == a.state_dict()["clock"]
    assert a.allocate("n", 2).tolist() == [1]  # so page 1 ("old") is evicted first
    b = setup()
    hit = b.peek_prefix([7, 7, 1])
    assert hit == 2 and b.num_free_pages < -(-(hit + 5) // 2) - hit // 2  # refused
    assert b.checksum() == fresh
    assert b.allocate("n", 2).tolist() == [1]


def test_prefix_stats_count_lookups_not_tokens_served():
    """The documented semantics of prefix_stats (docs/concepts.md): hits are counted when a
    lookup attaches them, and a lookup undone by free keeps its count."""
    a = make(num_pages=13, enable_prefix_caching=True, max_pages_per_request=12)
    prompt = list(range(37))
    a.allocate("w", 37)  # 10 pages
    assert a.commit_prefix("w", prompt) == 9
    a.free("w")  # 9 cached pages evictable, 3 plain free pages
    assert a.lookup_prefix("r", prompt) == 36  # attaches the 9 cached pages
    a.allocate("other", 12)  # the 3 plain free pages
    unchanged(a, OutOfPages, lambda: a.allocate("r", 5), "needs 2 pages")
    a.free("r")  # the lookup is undone: its pages are evictable again, its count stays
    assert a.prefix_stats == {"lookups": 1, "queries": 37, "hits": 36, "evictions": 0}
    a.free("other")
    assert a.lookup_prefix("r", prompt) == 36
    a.allocate("r", 1)  # served: 36 tokens from the cache, once
    stats = {"lookups": 2, "queries": 74, "hits": 72, "evictions": 0}
    assert a.prefix_stats == stats and a.tier_stats["device_hits"] == 72
    # A refused lookup and a peek count nowhere.
    unchanged(a, ValueError, lambda: a.lookup_prefix("r", prompt), "already holds")
    assert a.peek_prefix(prompt) == 36 and a.prefix_stats == stats
    # evictions: cached pages dropped to satisfy an allocation, and only those.
    a.free("r")
    plain = a.num_free_pages - a.num_evictable_pages
    a.allocate("big", 48)  # 12 pages: the plain free ones, then evicted cached ones
    assert a.prefix_stats == {**stats, "evictions": 12 - plain} and 12 - plain > 0
    a.free("big")
    assert a.reset_prefix_cache() and a.prefix_stats["evictions"] == 12 - plain
