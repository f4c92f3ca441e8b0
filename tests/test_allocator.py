"""Tests for kvshard.allocator: a stateful fuzz against a plain-Python model, plus unit tests."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import event, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from kvshard.allocator import (
    NULL_PAGE,
    OutOfPages,
    PageAllocator,
    UnknownRequest,
    sliding_window_pages,
)

IDS = ["a", "b", "c", "d", "e", "f", 7, (1, 2)]  # any hashable is a request id
NAMESPACES = [None, "tenant-1", "tenant-2"]
TOKENS = st.integers(0, 3)  # a small vocabulary, so prompts share prefixes


def make(num_pages=9, page_size=4, **kw) -> PageAllocator:
    kw.setdefault("max_requests", 4)
    kw.setdefault("max_pages_per_request", 4)
    return PageAllocator(num_pages, page_size, **kw)


# --------------------------------------------------------------------------- model


class Req:
    """Model of one request: tokens, pages (0 once released by a window), committed page
    count, namespace, and how many leading pages the sliding window released."""

    def __init__(self, tokens=(), pages=(), committed=0, ns=None, has_ns=False, released=0):
        self.tokens = list(tokens)
        self.pages = list(pages)
        self.committed = committed
        self.ns = ns
        self.has_ns = has_ns
        self.released = released

    def copy(self) -> Req:
        return Req(self.tokens, self.pages, self.committed, self.ns, self.has_ns, self.released)


class AllocatorMachine(RuleBasedStateMachine):
    """Drives a PageAllocator and a plain-Python model side by side."""

    @initialize(
        num_pages=st.integers(4, 12),
        page_size=st.sampled_from([2, 3]),
        max_requests=st.integers(2, 6),
        max_pages=st.integers(2, 8),
        prefix=st.sampled_from([True, True, True, False]),
        window=st.sampled_from([None, None, None, 1, 2, 3, 5]),
    )
    def setup(self, num_pages, page_size, max_requests, max_pages, prefix, window):
        kw = {"max_requests": max_requests, "max_pages_per_request": max_pages}
        if window is not None and prefix:
            with pytest.raises(ValueError, match="cannot be combined with enable_prefix_caching"):
                PageAllocator(
                    num_pages, page_size, **kw, enable_prefix_caching=True, sliding_window=window
                )
            prefix = False
        note(f"PageAllocator({num_pages}, {page_size}, {kw}, {prefix}, window={window})")
        self.alloc = PageAllocator(
            num_pages, page_size, **kw, enable_prefix_caching=prefix, sliding_window=window
        )
        self.P = page_size
        self.W = window
        self.reqs: dict = {}
        self.free_plain = set(range(1, num_pages))
        self.cache: dict = {}  # (ns, tuple(tokens up to the page's end)) -> page
        self.page_key: dict = {}  # page -> its cache key
        self.lru: list = []  # evictable pages, oldest first
        self.pending: list = []  # (src, dst) copies not yet taken
        self.history: list = [(None, [])]  # token sequences seen, to build prompts that hit
        self.stats = {"lookups": 0, "queries": 0, "hits": 0, "evictions": 0}

    # ------------------------------------------------------------ helpers

    def pick(self, data):
        """Draws a request id: a live one 3 times in 4, else any (maybe unknown)."""
        live = list(self.reqs)
        if live and data.draw(st.integers(0, 3)):
            return data.draw(st.sampled_from(live))
        return data.draw(st.sampled_from(IDS))

    def refcount(self, page) -> int:
        return sum(r.pages.count(page) for r in self.reqs.values())

    def expect_failure(self, exc, call, match=None):
        """Runs ``call`` expecting ``exc``; the allocator state must be unchanged."""
        before = self.alloc.checksum()
        with pytest.raises(exc, match=match) as info:
            call()
        assert self.alloc.checksum() == before, "a failed call changed the state"
        note(f"  raised {info.value!r}")
        return info.value

    def plan(self, req_id, n, reqs):
        """Returns (pages needed, copies?) for growing ``req_id`` by ``n`` in model ``reqs``."""
        req = reqs.get(req_id, Req())
        old, total = len(req.tokens), len(req.tokens) + n
        grow = -(-total // self.P) - len(req.pages)
        # A partial last page is copied when another request or the prefix cache holds it.
        shared = bool(req.pages) and (
            sum(r.pages.count(req.pages[-1]) for r in reqs.values()) > 1
            or req.pages[-1] in self.page_key
        )
        cow = n > 0 and old % self.P != 0 and shared
        return grow + int(cow), cow

    def window_release(self, req_id, reqs):
        """Releases, in model ``reqs``, the pages out of the window; returns them."""
        req = reqs.get(req_id)
        if self.W is None or req is None:
            return []
        stop = max(len(req.tokens) - self.W + 1, 0) // self.P
        dropped = req.pages[req.released : stop]
        req.pages[req.released : stop] = [NULL_PAGE] * len(dropped)
        req.released = max(req.released, stop)
        if dropped and reqs is self.reqs:
            event("sliding window released pages")
        return dropped

    def freed_by(self, dropped, reqs):
        """Pages of ``dropped`` that nobody in ``reqs`` holds any more."""
        return [p for p in dropped if not any(p in r.pages for r in reqs.values())]

    def take_new_pages(self, new_pages):
        """Checks pages an allocation got came from free/LRU pages; updates the free model."""
        new_pages = [int(p) for p in new_pages]
        assert len(set(new_pages)) == len(new_pages) and NULL_PAGE not in new_pages
        evicted = max(0, len(new_pages) - len(self.free_plain))
        victims = self.lru[:evicted]
        if evicted:
            event("evicted " + ("some cached pages" if evicted < len(self.lru) else "all"))
        assert set(new_pages) - self.free_plain == set(victims), "wrong eviction order"
        for page in victims:
            del self.cache[self.page_key.pop(page)]
        self.lru = self.lru[evicted:]
        self.free_plain -= set(new_pages)
        self.stats["evictions"] += evicted

    def grow_model(self, req_id, n, got_pages, cow, tokens):
        req = self.reqs.setdefault(req_id, Req())
        got_pages = list(got_pages)
        if cow:
            event("copy-on-write")
            # Sources resolve to pages holding data before the step (issue 10 finding 6).
            origin = {d: s for s, d in self.pending}
            src = req.pages[-1]
            self.pending.append((origin.get(src, src), got_pages[0]))
            req.pages[-1] = got_pages.pop(0)
            if src in self.page_key and not self.refcount(src):
                event("copy-on-write of a cached page (after truncate)")
                self.lru.append(src)
        req.pages += got_pages
        req.tokens += tokens

    # -------------------------------------------------------------- rules

    @rule(n=st.integers(0, 6), data=st.data())
    def allocate(self, n, data):
        req_id = self.pick(data)
        note(f"allocate({req_id!r}, {n})")
        a = self.alloc
        if n > a.max_pages_per_request * self.P:  # refused before anything else is looked at
            self.expect_failure(ValueError, lambda: a.allocate(req_id, n), "page_size=")
            return
        if req_id not in self.reqs and len(self.reqs) == a.max_requests:
            self.expect_failure(ValueError, lambda: a.allocate(req_id, n), "max_requests")
            return
        total = len(self.reqs.get(req_id, Req()).tokens) + n
        if -(-total // self.P) > a.max_pages_per_request:
            self.expect_failure(ValueError, lambda: a.allocate(req_id, n), "max_pages_per_request")
            return
        scratch = {k: v.copy() for k, v in self.reqs.items()}
        freed = self.freed_by(self.window_release(req_id, scratch), scratch)
        needed, cow = self.plan(req_id, n, scratch)
        available = len(self.free_plain) + len(self.lru) + len(freed)
        if needed > available:
            err = self.expect_failure(OutOfPages, lambda: a.allocate(req_id, n))
            assert (err.needed, err.available) == (needed, available)
            return
        got = a.allocate(req_id, n)
        note(f"  -> {got.tolist()} (copy-on-write: {cow})")
        assert got.dtype == np.int32 and len(got) == needed
        self.release_pages(self.window_release(req_id, self.reqs))
        self.take_new_pages(got)
        tokens = data.draw(st.lists(TOKENS, min_size=n, max_size=n))
        self.grow_model(req_id, n, got.tolist(), cow, tokens)

    @rule(
        req_ids=st.lists(st.sampled_from(IDS), min_size=0, max_size=5, unique=True),
        data=st.data(),
    )
    def allocate_batch(self, req_ids, data, counts=None):
        if counts is None:
            size = len(req_ids)
            counts = data.draw(st.lists(st.integers(0, 5), min_size=size, max_size=size))
        note(f"allocate_batch({req_ids!r}, {counts})")
        a = self.alloc
        call = lambda: a.allocate_batch(req_ids, np.array(counts, np.int64))
        new = [r for r in req_ids if r not in self.reqs]
        if any(n > a.max_pages_per_request * self.P for n in counts):
            self.expect_failure(ValueError, call, "page_size=")
            return
        if len(self.reqs) + len(new) > a.max_requests:
            self.expect_failure(ValueError, call, "max_requests")
            return
        if any(
            -(-(len(self.reqs.get(r, Req()).tokens) + n) // self.P) > a.max_pages_per_request
            for r, n in zip(req_ids, counts, strict=True)
        ):
            self.expect_failure(ValueError, call, "max_pages_per_request")
            return
        # Sequential semantics on a scratch model decide copies and the page count.
        scratch = {k: v.copy() for k, v in self.reqs.items()}
        dropped = [p for r in req_ids for p in self.window_release(r, scratch)]
        freed = set(self.freed_by(dropped, scratch))
        plans = []
        for r, n in zip(req_ids, counts, strict=True):
            needed, cow = self.plan(r, n, scratch)
            plans.append((needed, cow))
            req = scratch.setdefault(r, Req())
            fake = [-1 - len(plans) * 100 - i for i in range(needed)]  # placeholder pages
            if cow:
                req.pages[-1] = fake.pop(0)
            req.pages += fake
            req.tokens += [0] * n
        needed = sum(p for p, _ in plans)
        available = len(self.free_plain) + len(self.lru) + len(freed)
        if needed > available:
            err = self.expect_failure(OutOfPages, call)
            assert (err.needed, err.available) == (needed, available)
            return
        rows = call()
        for r in req_ids:  # the window releases first, for the whole batch
            self.release_pages(self.window_release(r, self.reqs))
        old_pages = {r: list(self.reqs.get(r, Req()).pages) for r in req_ids}
        assert rows.dtype == np.int32
        assert rows.tolist() == [a.row(r) for r in req_ids]
        all_new = []
        for r, n, (need, cow) in zip(req_ids, counts, plans, strict=True):
            pages = a.pages(r).tolist()
            keep = old_pages[r][:-1] if cow else old_pages[r]
            assert pages[: len(keep)] == keep, "batch changed pages it should keep"
            fresh = pages[len(keep) :]
            assert len(fresh) == need
            all_new += fresh
            tokens = data.draw(st.lists(TOKENS, min_size=n, max_size=n))
            self.grow_model(r, n, fresh, cow, tokens)
        self.take_new_pages(all_new)

    @precondition(lambda self: len(self.reqs) > 0)
    @rule(data=st.data())
    def decode_step(self, data):
        """One token for every live request, in one batch (forked twins write together)."""
        self.allocate_batch(list(self.reqs), data, counts=[1] * len(self.reqs))

    @rule(commit_first=st.booleans(), data=st.data())
    def free(self, commit_first, data):
        """Frees a request; half the time first commits its pages, as a serving loop does."""
        req_id = self.pick(data)
        if commit_first and req_id in self.reqs and self.alloc.enable_prefix_caching:
            self.commit(req_id, other_ns=False)
        self.release(req_id)

    def release(self, req_id):
        note(f"free({req_id!r})")
        if req_id not in self.reqs:
            self.expect_failure(UnknownRequest, lambda: self.alloc.free(req_id), "unknown request")
            return
        self.alloc.free(req_id)
        self.release_pages(self.reqs.pop(req_id).pages)

    def release_pages(self, pages):
        """Model of dropping one owner of ``pages`` (already removed from their request)."""
        dead = [p for p in pages if p != NULL_PAGE and self.refcount(p) == 0]
        # Cached pages become evictable, the request's last page first.
        self.lru += [p for p in reversed(dead) if p in self.page_key]
        self.free_plain |= {p for p in dead if p not in self.page_key}
        self.pending = [(s, d) for s, d in self.pending if d not in dead]

    @rule(extra=st.integers(0, 2), data=st.data())
    def truncate(self, extra, data):
        """Rolls a request back (rejected draft tokens), sometimes past its end (refused)."""
        req_id = self.pick(data)
        a = self.alloc
        if req_id not in self.reqs:
            call = lambda: a.truncate(req_id, 0)
            self.expect_failure(UnknownRequest, call, "truncate: unknown request")
            return
        req = self.reqs[req_id]
        held = len(req.tokens)
        keep_tokens = data.draw(st.integers(0, held)) if not extra else held + extra
        if req.committed and not extra and data.draw(st.booleans()):  # into a cached page
            keep_tokens = (req.committed - 1) * self.P + data.draw(st.integers(1, self.P - 1))
        note(f"truncate({req_id!r}, {keep_tokens})")
        call = lambda: a.truncate(req_id, keep_tokens)
        if keep_tokens > held:
            self.expect_failure(ValueError, call, rf"num_tokens={keep_tokens} .*\[0, {held}\]")
            return
        if self.W is not None and req.released * self.P > max(keep_tokens - self.W + 1, 0):
            self.expect_failure(ValueError, call, "were released")
            return
        call()
        keep = -(-keep_tokens // self.P)
        dropped = req.pages[keep:]
        req.pages, req.tokens = req.pages[:keep], req.tokens[:keep_tokens]
        if req.committed > keep_tokens // self.P:
            req.committed = 0
        if keep_tokens % self.P and req.pages and req.pages[-1] in self.page_key:
            event("truncate into a cached page")
        self.release_pages(dropped)

    @rule(dst=st.sampled_from(IDS), data=st.data())
    def fork(self, dst, data, src=None):
        if src is None:
            src = self.pick(data)
        note(f"fork({src!r}, {dst!r})")
        a = self.alloc
        if src not in self.reqs:
            self.expect_failure(UnknownRequest, lambda: a.fork(src, dst), "fork\\(src_req\\)")
        elif dst in self.reqs:
            self.expect_failure(ValueError, lambda: a.fork(src, dst), "already a live request")
        elif len(self.reqs) == a.max_requests:
            self.expect_failure(ValueError, lambda: a.fork(src, dst), "rows are in use")
        else:
            a.fork(src, dst)
            self.reqs[dst] = self.reqs[src].copy()

    @precondition(lambda self: len(self.reqs) > 0)
    @rule(width=st.integers(1, 3), data=st.data())
    def beam_step(self, width, data):
        """Forks a request ``width`` times, then all the twins write one token together."""
        src = data.draw(st.sampled_from(list(self.reqs)))
        free_ids = [r for r in IDS if r not in self.reqs]
        width = min(width, self.alloc.max_requests - len(self.reqs), len(free_ids))
        twins = data.draw(st.permutations(free_ids))[:width]
        for dst in twins:
            self.fork(dst, data, src=src)
        group = [src, *twins]
        order = data.draw(st.permutations(group))
        self.allocate_batch(order, data, counts=[1] * len(order))

    @rule(ns=st.sampled_from(NAMESPACES), data=st.data())
    def lookup_prefix(self, ns, data):
        req_id = self.pick(data)
        a = self.alloc
        base_ns, base = data.draw(st.sampled_from(self.history))
        cut = data.draw(st.integers(0, len(base)))
        suffix = data.draw(st.lists(TOKENS, max_size=6))
        prompt = base[:cut] + suffix
        ns = data.draw(st.sampled_from([base_ns, ns]))
        note(f"lookup_prefix({req_id!r}, {prompt}, {ns!r})")
        call = lambda: a.lookup_prefix(req_id, prompt, ns)
        if not a.enable_prefix_caching:
            self.expect_failure(ValueError, call, "prefix caching is disabled")
            return
        if req_id in self.reqs and self.reqs[req_id].tokens:
            self.expect_failure(ValueError, call, "already holds")
            return
        if req_id not in self.reqs and len(self.reqs) == a.max_requests:
            self.expect_failure(ValueError, call, "rows are in use")
            return
        limit = min(max(len(prompt) - 1, 0) // self.P, a.max_pages_per_request)
        hits = []
        for i in range(limit):
            page = self.cache.get((ns, tuple(prompt[: (i + 1) * self.P])))
            if page is None:
                break
            hits.append(page)
        got = call()
        note(f"  -> {got} tokens, pages {hits}")
        assert got == len(hits) * self.P
        assert a.pages(req_id).tolist() == hits
        self.lru = [p for p in self.lru if p not in hits]
        self.reqs[req_id] = Req(prompt[:got], hits, len(hits), ns, True)
        self.stats["lookups"] += 1
        self.stats["queries"] += len(prompt)
        self.stats["hits"] += got

    @rule(other_ns=st.booleans(), data=st.data())
    def commit_prefix(self, other_ns, data):
        self.commit(self.pick(data), other_ns)

    def commit(self, req_id, other_ns):
        a = self.alloc
        req = self.reqs.get(req_id)
        ns = (req.ns if req is not None else None) if not other_ns else "tenant-2"
        note(f"commit_prefix({req_id!r}, ns={ns!r})")
        if not a.enable_prefix_caching:
            self.expect_failure(ValueError, lambda: a.commit_prefix(req_id, [], ns), "disabled")
            return
        if req is None:
            self.expect_failure(UnknownRequest, lambda: a.commit_prefix(req_id, [], ns), "unknown")
            return
        if req.has_ns and req.ns != ns:
            call = lambda: a.commit_prefix(req_id, req.tokens, ns)
            self.expect_failure(ValueError, call, "namespace")
            return
        full = len(req.tokens) // self.P
        fresh = 0
        for i in range(req.committed, full):
            key = (ns, tuple(req.tokens[: (i + 1) * self.P]))
            page = req.pages[i]
            if page not in self.page_key and key not in self.cache:
                self.cache[key] = page
                self.page_key[page] = key
                fresh += 1
        req.committed = max(req.committed, full)
        req.ns, req.has_ns = ns, True
        assert a.commit_prefix(req_id, np.array(req.tokens, np.int64), ns) == fresh
        self.history.append((ns, list(req.tokens)))

    @rule()
    def take_pending_copies(self):
        got = self.alloc.take_pending_copies()
        note(f"take_pending_copies() -> {got.tolist()}")
        assert got.dtype == np.int32 and got.shape == (len(self.pending), 2)
        assert [tuple(p) for p in got.tolist()] == self.pending
        self.pending = []

    @rule()
    def state_round_trip(self):
        state = self.alloc.state_dict()
        twin = PageAllocator(
            self.alloc.num_pages,
            self.alloc.page_size,
            max_requests=self.alloc.max_requests,
            max_pages_per_request=self.alloc.max_pages_per_request,
            enable_prefix_caching=self.alloc.enable_prefix_caching,
            sliding_window=self.alloc.sliding_window,
        )
        twin.load_state_dict(state)
        assert twin.checksum() == self.alloc.checksum()
        twin.check_invariants()

    @precondition(lambda self: len(self.reqs) >= 3)
    @rule()
    def free_everything(self):
        note("free everything")
        for req_id in list(self.reqs):
            self.release(req_id)
        assert self.alloc.num_free_pages == self.alloc.num_pages - 1
        assert self.alloc.usage == 0.0 and len(self.alloc) == 0
        assert not self.alloc.page_table.any()
        assert not self.alloc.take_pending_copies().size
        self.pending = []
        # With nothing cached the state is a fresh allocator's (free stacks in their initial
        # order), except the cumulative prefix counters; with caching off those stay 0.
        fresh = PageAllocator(
            self.alloc.num_pages,
            self.alloc.page_size,
            max_requests=self.alloc.max_requests,
            max_pages_per_request=self.alloc.max_pages_per_request,
            enable_prefix_caching=self.alloc.enable_prefix_caching,
            sliding_window=self.alloc.sliding_window,
        )
        if not self.alloc.enable_prefix_caching:
            event("free everything: caching off")
            assert self.alloc.checksum() == fresh.checksum()
        elif not self.lru:
            event("free everything: caching on, nothing cached")
            fresh.load_state_dict({**fresh.state_dict(), "prefix_stats": self.alloc.prefix_stats})
            assert self.alloc.checksum() == fresh.checksum()

    # ---------------------------------------------------------- invariants

    @invariant()
    def matches_model(self):
        a = self.alloc
        a.check_invariants()
        assert len(a) == len(self.reqs)
        state = a.state_dict()
        refcount = np.zeros(a.num_pages, np.int32)
        owned = set()
        for req_id, req in self.reqs.items():
            assert req_id in a
            assert a.pages(req_id).tolist() == req.pages
            assert a.num_tokens(req_id) == len(req.tokens)
            assert len(req.pages) == -(-len(req.tokens) // self.P)
            row = a.page_table[a.row(req_id)]
            assert row[: len(req.pages)].tolist() == req.pages and not row[len(req.pages) :].any()
            for page in req.pages[req.released :]:
                refcount[page] += 1
            assert not any(req.pages[: req.released]), "released entries are not null"
            owned |= set(req.pages[req.released :])
        np.testing.assert_array_equal(state["refcount"], refcount)
        assert NULL_PAGE not in owned
        assert not owned & (self.free_plain | set(self.lru)), "a table points at a free page"
        assert set(state["free_pages"].tolist()) == self.free_plain
        assert a.num_free_pages + len(owned) == a.num_pages - 1
        assert a.num_evictable_pages == len(self.lru)
        np.testing.assert_allclose(a.usage, len(owned) / (a.num_pages - 1))
        assert a.prefix_stats == self.stats


AllocatorMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50)
TestAllocatorMachine = AllocatorMachine.TestCase


# ------------------------------------------------------------------- unit tests


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


def _unchanged(a, exc, call, match):
    before = a.checksum()
    with pytest.raises(exc, match=match) as info:
        call()
    assert a.checksum() == before
    return info.value


def test_error_messages_leave_state_unchanged():
    a = make(enable_prefix_caching=True)
    a.allocate("x", 6)
    a.allocate("y", 1)
    for method in (a.free, a.pages, a.num_tokens, a.row):
        _unchanged(a, UnknownRequest, lambda m=method: m("nope"), r"req_id='nope'.*unknown|unknown")
    _unchanged(a, ValueError, lambda: a.allocate("x", -1), r"num_new_tokens=-1 .*'x'.*>= 0")
    _unchanged(a, ValueError, lambda: a.allocate("x", 1.5), r"num_new_tokens=1.5")
    _unchanged(
        a,
        ValueError,
        lambda: a.allocate("x", 11),
        r"req_id='x' would hold 17 tokens in 5 pages, more than max_pages_per_request=4",
    )
    a.allocate("z", 12)
    err = _unchanged(a, OutOfPages, lambda: a.allocate("w", 12), r"needs 3 pages but only 2")
    assert (err.needed, err.available) == (3, 2)
    a.allocate("w", 1)
    _unchanged(a, ValueError, lambda: a.allocate("v", 1), r"req_id='v'.*max_requests=4")
    _unchanged(a, ValueError, lambda: a.fork("x", "v"), r"'v'.*max_requests=4 rows are in use")
    _unchanged(a, ValueError, lambda: a.fork("x", "y"), r"dst_req='y' is already a live request")
    _unchanged(a, UnknownRequest, lambda: a.fork("nope", "v"), r"fork\(src_req\).*'nope'")
    _unchanged(
        a, ValueError, lambda: a.allocate_batch(["x", "x"], [1, 1]), "req_ids contains duplicates"
    )
    _unchanged(a, ValueError, lambda: a.allocate_batch(["x"], [1, 1]), r"shape \(1,\)")
    _unchanged(a, ValueError, lambda: a.allocate_batch(["x", "y"], [1, -3]), r"=-3 .*'y'")
    _unchanged(a, ValueError, lambda: a.lookup_prefix("x", [1, 2, 3]), "already holds 6 tokens")
    a.commit_prefix("x", list(range(6)), "t1")
    _unchanged(a, ValueError, lambda: a.commit_prefix("x", list(range(6)), "t2"), "namespace='t2'")
    _unchanged(a, TypeError, lambda: a.allocate(["unhashable"], 1), "unhashable")
    a.free("y")
    _unchanged(a, UnknownRequest, lambda: a.free("y"), r"free: unknown request req_id='y'")
    b = make()
    _unchanged(b, ValueError, lambda: b.lookup_prefix("x", [1]), "prefix caching is disabled")
    _unchanged(b, ValueError, lambda: b.commit_prefix("x", [1]), "prefix caching is disabled")
    _unchanged(
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


def test_state_dict_round_trip_and_deep_copy():
    a = make(num_pages=16, enable_prefix_caching=True)
    a.allocate("x", 9)
    a.commit_prefix("x", list(range(9)))
    a.fork("x", "y")
    a.allocate("y", 2)
    a.free("x")
    state = a.state_dict()
    digest = a.checksum()
    a.allocate("z", 8)  # must not leak into `state`
    assert a.checksum() != digest
    b = make(num_pages=16, enable_prefix_caching=True)
    b.load_state_dict(state)
    assert b.checksum() == digest
    b.check_invariants()
    assert b.take_pending_copies().tolist() == [[3, 4]]
    assert b.lookup_prefix("w", list(range(9))) == 8
    with pytest.raises(ValueError, match="config"):
        make(num_pages=15).load_state_dict(state)


def test_checksum_equal_for_identical_drivers():
    def drive(alloc):
        alloc.allocate_batch(["a", "b", 3], [5, 9, 1])
        alloc.fork("a", "c")
        alloc.allocate("c", 2)
        alloc.commit_prefix("b", list(range(9)), "ns")
        alloc.free("b")
        alloc.lookup_prefix("d", list(range(12)), "ns")
        return alloc.checksum()

    first = drive(make(num_pages=20, enable_prefix_caching=True))
    assert first == drive(make(num_pages=20, enable_prefix_caching=True))
    assert first != make(num_pages=20, enable_prefix_caching=True).checksum()


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
    assert a.lookup_prefix("x2", [1, 2, 3, 4, 0]) == 2  # page 1 survived, page 2 was evicted
    a.free("x2")  # page 1 evictable again, now the newest
    assert a.allocate("z", 4).tolist() == [4, 3]
    assert a.lookup_prefix("y2", [5, 6, 7, 8, 0]) == 0
    assert a.lookup_prefix("x3", [1, 2, 3, 4, 0]) == 2
    assert a.prefix_stats["evictions"] == 3
    a.check_invariants()


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
    fresh.load_state_dict({**fresh.state_dict(), "prefix_stats": b.prefix_stats})
    assert b.checksum() == fresh.checksum()


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
def test_allocate_huge_count_is_refused_unchanged(count):
    """Issue 10 finding 2: a count past max_pages_per_request*page_size never wraps."""
    a = make(num_pages=9, page_size=4, enable_prefix_caching=True)
    a.allocate("a", 3)
    _unchanged(
        a,
        ValueError,
        lambda: a.allocate("x", count),
        rf"num_new_tokens={int(count)} .*exceeds max_pages_per_request\*page_size=16",
    )
    _unchanged(a, ValueError, lambda: a.allocate("a", count), rf"num_new_tokens={int(count)}")
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
def test_allocate_batch_huge_count_is_refused_unchanged(counts):
    a = make(num_pages=9, page_size=4)
    a.allocate("a", 3)
    big = int(np.asarray(counts)[1])
    _unchanged(
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
        match=r"max_pages_per_request\*page_size=1180591620717411303424 must be <= 2\*\*62",
    ):
        PageAllocator(8, 2**40, max_requests=1, max_pages_per_request=2**30)


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


def _snapshot_source():
    """An allocator with live, shared, cached and evictable pages and a pending copy."""
    a = make(num_pages=16, page_size=4, enable_prefix_caching=True)
    a.allocate("a", 9)  # pages 1, 2, 3
    a.commit_prefix("a", list(range(9)))  # 1, 2 cached
    a.fork("a", "b")
    a.allocate("b", 1)  # copy-on-write of page 3 -> 4
    a.allocate("c", 8)  # pages 5, 6
    a.commit_prefix("c", list(range(100, 108)))
    a.free("c")  # 5, 6 evictable
    a.check_invariants()
    return a


def _corrupt(state, name, change):
    state = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()}
    state[name] = change(state[name])
    return state


def _set(array, index, value):
    array = np.array(array)
    array[index] = value
    return array


CORRUPTIONS = [
    ("free_pages", lambda f: _set(f, 0, -3), "free_pages"),
    ("free_pages", lambda f: _set(f, 0, 99), "free_pages"),
    ("free_pages", lambda f: _set(f, 0, NULL_PAGE), "free_pages"),
    ("free_pages", lambda f: _set(f, 0, 1), "free_pages: a free page is owned"),
    ("free_pages", lambda f: _set(f, 1, f[0]), "free_pages: a page is free twice"),
    ("free_pages", lambda f: f[1:], "pages leaked"),
    ("free_rows", lambda f: _set(f, 0, 0), "free_rows: a row is lost or doubled"),
    ("free_rows", lambda f: _set(f, 0, 7), "free_rows"),
    ("refcount", lambda r: _set(r, 1, 1), "refcount: != number of owners"),
    ("refcount", lambda r: _set(r, 7, 1), "refcount"),
    ("page_table", lambda t: _set(t, (0, 0), -3), "page_table"),
    ("page_table", lambda t: _set(t, (0, 0), 99), "page_table"),
    ("page_table", lambda t: _set(t, (0, 0), NULL_PAGE), "page_table"),
    ("page_table", lambda t: _set(t, (0, 3), 9), "page_table: unused entry"),
    ("row_tokens", lambda t: _set(t, 0, 13), "row_pages"),
    ("row_tokens", lambda t: _set(t, 0, -1), "row_tokens"),
    ("rows", lambda r: {**r, "intruder": 0}, "rows: two requests share a row"),
    ("rows", lambda r: {**r, "x": 9}, "rows maps 'x' to 9"),
    ("cached", lambda c: _set(c, 3, True), "page_key|evictable|cached"),
    ("evictable", lambda e: _set(e, 5, False), "evictable"),
    ("page_key", lambda k: _set(k, 6, k[5]), "page_key: a key is doubled"),
    ("lru", lambda s: _set(s, 5, s[6]), "lru"),
    ("clock", lambda c: -1, "clock=-1"),
    ("clock", lambda c: 0, "lru: stamps"),
    ("pending_copies", lambda p: np.array([[3, 99]]), "pending_copies"),
    ("pending_copies", lambda p: np.array([[3, 7]]), "pending_copies: a destination"),
    ("pending_copies", lambda p: np.array([3, 4]), "pending_copies"),
    ("prefix_stats", lambda s: {**s, "hits": -1}, "prefix_stats"),
    ("prefix_stats", lambda s: {"hits": 0}, "prefix_stats"),
    ("refcount", lambda r: r.astype(np.float64) + 0.5, "refcount must be integers"),
    ("row_pages", lambda p: p[:2], "row_pages has shape"),
    ("version", lambda v: 1, "unsupported version 1"),
]


@pytest.mark.parametrize(("name", "change", "match"), CORRUPTIONS)
def test_load_state_dict_refuses_corruption_unchanged(name, change, match):
    """Issue 10 finding 1: a corrupt snapshot is refused, naming the field; nothing changes."""
    state = _snapshot_source().state_dict()
    target = make(num_pages=16, page_size=4, enable_prefix_caching=True)
    target.allocate("z", 5)
    _unchanged(
        target, ValueError, lambda: target.load_state_dict(_corrupt(state, name, change)), match
    )
    target.check_invariants()
    target.load_state_dict(state)  # the intact snapshot loads
    target.check_invariants()


@pytest.mark.parametrize("name", ["clock", "prefix_stats", "pending_copies", "rows", "lru"])
def test_load_state_dict_missing_entry_leaves_target(name):
    state = _snapshot_source().state_dict()
    del state[name]
    target = make(num_pages=16, page_size=4, enable_prefix_caching=True)
    target.allocate("z", 5)
    _unchanged(target, ValueError, lambda: target.load_state_dict(state), f"lacks '{name}'")
    assert target.pages("z").tolist() == [1, 2]


@pytest.mark.parametrize("state", [[], None, "state", 3])
def test_load_state_dict_refuses_non_dict(state):
    target = make()
    _unchanged(target, TypeError, lambda: target.load_state_dict(state), "must be a dict")


def test_loaded_corrupt_state_cannot_hand_out_bad_pages():
    """The reproductions of issue 10: none of these states gets in, so none misbehaves."""
    state = _snapshot_source().state_dict()
    for name, change, _ in CORRUPTIONS[:8]:
        target = make(num_pages=16, page_size=4, enable_prefix_caching=True)
        with pytest.raises(ValueError):
            target.load_state_dict(_corrupt(state, name, change))
        pages = target.allocate("intruder", 3)
        assert pages.tolist() == [1] and target.num_tokens("intruder") == 3


# ------------------------------------------------------ truncate, sliding window (issue 14)


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
        _unchanged(a, ValueError, lambda b=bad: a.truncate("x", b), match)
    _unchanged(a, UnknownRequest, lambda: a.truncate("nope", 0), "truncate: unknown request")
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


def test_sliding_window_releases_pages_out_of_the_window():
    a = PageAllocator(12, 2, max_requests=2, max_pages_per_request=10, sliding_window=4)
    a.allocate("x", 10)  # pages 1..5, tokens 0..9
    assert a.allocate("x", 1).tolist() == [1]  # token 10 attends 7..10: pages 0-2 released
    assert a.pages("x").tolist() == [0, 0, 0, 4, 5, 1]  # released pages are reused at once
    assert a.num_tokens("x") == 11 and a.num_free_pages == 12 - 1 - 3
    a.check_invariants()
    _unchanged(a, ValueError, lambda: a.truncate("x", 8), r"needs tokens from 5 on .*were released")
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
        ({"sliding_window": 4, "enable_prefix_caching": True}, "cannot be combined"),
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
