"""reset_prefix_cache, KV-cache events and per-page extra keys (issue 21 item 1, allocator)."""

from __future__ import annotations

import hashlib

import pytest
from _alloc import fresh_like, fresh_with_counters, make, unchanged

from kvshard.allocator import AllPagesCleared, PagesRemoved, PagesStored

PROMPT = list(range(9))  # two full pages of 4 and one token


def cached(**kw):
    a = make(enable_prefix_caching=True, **kw)
    a.lookup_prefix("a", PROMPT)
    a.allocate("a", 9)
    a.commit_prefix("a", PROMPT)
    return a


# ---------------------------------------------------------------- reset_prefix_cache


def test_reset_is_refused_while_pages_are_in_use():
    a = cached()
    before = a.checksum()
    assert a.reset_prefix_cache() is False
    assert a.checksum() == before and a.peek_prefix(PROMPT) == 8


def test_reset_drops_every_cached_page_and_restores_a_fresh_order():
    a = cached()
    a.free("a")
    assert a.num_evictable_pages == 2
    assert a.reset_prefix_cache() is True
    assert a.num_evictable_pages == 0 and a.peek_prefix(PROMPT) == 0
    assert a.num_free_pages == a.num_pages - 1
    assert a.checksum() == fresh_with_counters(a).checksum()
    a.check_invariants()


def test_reset_also_clears_the_host_prefix_cache():
    a = cached(num_host_pages=4, host_prefix_pages=2)
    a.free("a")
    a.allocate_batch(["d", "e"], [16, 16])  # evicts both cached pages into the host
    a.free("d")
    a.free("e")
    assert a.reset_prefix_cache() is False  # their swap-outs are pending
    a.take_pending_swaps()
    assert a.peek_prefix(PROMPT) == 8  # from the host
    assert a.reset_prefix_cache() is True
    assert a.peek_prefix(PROMPT) == 0 and a.num_free_host_pages == 3
    a.check_invariants()


# ---------------------------------------------------------------- KV events


def key(prev: bytes, tokens, ns=b"\x00") -> bytes:
    """The documented key chain, recomputed here: blake2b(prev, ns digest, int64 tokens)."""
    ns_digest = hashlib.blake2b(ns, digest_size=16).digest()
    h = hashlib.blake2b(prev, digest_size=16)
    h.update(ns_digest)
    h.update(b"".join(int(t).to_bytes(8, "little", signed=True) for t in tokens))
    return h.digest()


def test_events_are_only_queued_when_enabled():
    a = cached()
    a.free("a")
    a.reset_prefix_cache()
    assert a.take_kv_events() == []


def test_stored_removed_and_cleared_events():
    a = cached(enable_kv_events=True)
    k1 = key(bytes(16), PROMPT[:4])
    k2 = key(k1, PROMPT[4:8])
    assert a.take_kv_events() == [
        PagesStored((k1, k2), None, tuple(PROMPT[:8]), 4, "device"),
    ]
    assert a.take_kv_events() == []  # drained
    a.allocate("a", 7)  # 16 tokens: page 3 full, page 4 new
    a.commit_prefix("a", [*PROMPT, 9, 9, 9, 9, 9, 9, 9])
    k3 = key(k2, [8, 9, 9, 9])
    k4 = key(k3, [9, 9, 9, 9])
    assert a.take_kv_events() == [PagesStored((k3, k4), k2, (8, 9, 9, 9, 9, 9, 9, 9), 4)]
    a.free("a")
    a.allocate_batch(["b", "c"], [16, 16])  # 4 free pages, then the 4 cached ones evicted
    events = a.take_kv_events()
    assert events == [PagesRemoved((k4, k3, k2, k1), "device")]  # last page first
    a.free("b")
    a.free("c")
    assert a.reset_prefix_cache() is True
    assert a.take_kv_events() == [AllPagesCleared()]


def test_a_twin_page_is_not_announced_and_load_reannounces_the_cache():
    a = cached(enable_kv_events=True)
    a.take_kv_events()
    a.allocate("b", 9)
    assert a.commit_prefix("b", PROMPT) == 0  # twins of a's pages: not stored
    assert a.take_kv_events() == []
    b = fresh_like(a)
    b.load_state_dict(a.state_dict())
    events = b.take_kv_events()
    k1 = key(bytes(16), PROMPT[:4])
    assert events[0] == AllPagesCleared() and len(events) == 2
    assert set(events[1].page_hashes) == {k1, key(k1, PROMPT[4:8])}


def test_host_tier_moves_are_events_too():
    a = cached(enable_kv_events=True, num_host_pages=4, host_prefix_pages=2)
    k1 = key(bytes(16), PROMPT[:4])
    k2 = key(k1, PROMPT[4:8])
    a.free("a")
    a.take_kv_events()
    a.allocate_batch(["d", "e"], [16, 16])
    assert a.take_kv_events() == [
        PagesRemoved((k2, k1), "device"),
        PagesStored((k2, k1), None, None, 4, "host"),
    ]
    a.free("d")
    a.free("e")
    a.lookup_prefix("f", PROMPT)
    assert a.take_kv_events() == [
        PagesRemoved((k1, k2), "host"),
        PagesStored((k1, k2), None, None, 4, "device"),
    ]


# ---------------------------------------------------------------- extra keys


def test_an_extra_key_changes_the_hit():
    a = make(enable_prefix_caching=True)
    a.lookup_prefix("a", PROMPT, extra_keys=["img-1"])
    a.allocate("a", 9)
    a.commit_prefix("a", PROMPT, extra_keys=["img-1"])
    assert a.peek_prefix(PROMPT, extra_keys=["img-1"]) == 8
    assert a.peek_prefix(PROMPT, extra_keys=["img-1", None]) == 8  # None: no key
    assert a.peek_prefix(PROMPT, extra_keys=["img-2"]) == 0
    assert a.peek_prefix(PROMPT) == 0  # the first page's key chains into the second
    assert a.peek_prefix(PROMPT, extra_keys=[("img-1",)]) == 0  # a tuple is not its item
    assert a.lookup_prefix("b", PROMPT, extra_keys=["img-1"]) == 8


def test_extra_keys_on_a_later_page_keep_the_earlier_hit():
    a = make(enable_prefix_caching=True)
    a.lookup_prefix("a", PROMPT)
    a.allocate("a", 9)
    a.commit_prefix("a", PROMPT, extra_keys=[None, 7])  # LoRA id 7 on page 1 only
    assert a.peek_prefix(PROMPT) == 4
    assert a.peek_prefix(PROMPT, extra_keys=[None, 7]) == 8
    assert a.peek_prefix(PROMPT, extra_keys=[None, "7"]) == 4  # int and str differ
    assert a.peek_prefix(PROMPT, extra_keys=[None, b"7"]) == 4


@pytest.mark.parametrize(
    ("extra", "exc", "match"),
    [
        ("img", TypeError, "extra_keys must be None or a sequence"),
        ([1.5], TypeError, r"extra_keys\[0\]=1.5"),
        ([True], TypeError, r"extra_keys\[0\]=True"),
        ([None, [1]], TypeError, r"extra_keys\[1\]=\[1\]"),
    ],
)
def test_bad_extra_keys_are_refused_and_change_nothing(extra, exc, match):
    a = cached()
    unchanged(a, exc, lambda: a.lookup_prefix("b", PROMPT, extra_keys=extra), match)
    unchanged(a, exc, lambda: a.commit_prefix("a", PROMPT, extra_keys=extra), match)
