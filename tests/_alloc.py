"""Helpers shared by the allocator tests (tests/test_allocator_*.py)."""

from __future__ import annotations

import pytest

from kvshard.allocator import PageAllocator


def make(num_pages=9, page_size=4, **kw) -> PageAllocator:
    kw.setdefault("max_requests", 4)
    kw.setdefault("max_pages_per_request", 4)
    return PageAllocator(num_pages, page_size, **kw)


def fresh_like(a: PageAllocator) -> PageAllocator:
    """A fresh allocator with ``a``'s constructor arguments."""
    return PageAllocator(
        a.num_pages,
        a.page_size,
        max_requests=a.max_requests,
        max_pages_per_request=a.max_pages_per_request,
        enable_prefix_caching=a.enable_prefix_caching,
        sliding_window=a.sliding_window,
        num_host_pages=a.num_host_pages,
        host_prefix_pages=a.host_prefix_pages,
        enable_kv_events=a.enable_kv_events,
        layer_types=a.layer_types,
    )


def fresh_with_counters(a: PageAllocator) -> PageAllocator:
    """A fresh allocator like ``a`` holding ``a``'s cumulative counters, ``prefix_stats`` and
    ``tier_stats`` (saved as ``host_stats``; its ``device_hits`` count even without a host
    tier): the state freeing every request must restore once nothing is cached."""
    fresh = fresh_like(a)
    counters = {"prefix_stats": a.prefix_stats, "host_stats": a.tier_stats}
    fresh.load_state_dict({**fresh.state_dict(), **counters})
    return fresh


def unchanged(a, exc, call, match):
    """Runs ``call`` expecting ``exc`` matching ``match``; ``a``'s checksum must not move."""
    before = a.checksum()
    with pytest.raises(exc, match=match) as info:
        call()
    assert a.checksum() == before
    return info.value
