"""The allocator against a plain-Python model: a hypothesis state machine over every method.

Over 400 lines: one model class, whose rules must see each other's bookkeeping.
"""

from __future__ import annotations

import numpy as np
import pytest
from _alloc import fresh_like, fresh_with_counters
from hypothesis import event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from kvshard.allocator import NULL_PAGE, OutOfPages, PageAllocator, UnknownRequest

IDS = ["a", "b", "c", "d", "e", "f", 7, (1, 2)]  # any hashable is a request id
NAMESPACES = [None, "tenant-1", "tenant-2"]
TOKENS = st.integers(0, 3)  # a small vocabulary, so prompts share prefixes


# --------------------------------------------------------------------------- model


class Req:
    """Model of one request: tokens, pages (0 once released by a window), committed page
    count, namespace, how many leading pages the sliding window released, and whether it was
    looked up and not served since (tentative: freeing it undoes the lookup)."""

    def __init__(
        self, tokens=(), pages=(), committed=0, ns=None, has_ns=False, released=0, tentative=False
    ):
        self.tentative = tentative
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
            # This model's lookups match from the first page; windowed prefix caching is
            # modelled in tests/test_allocator_groups.py.
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
        # A cached page's stamp: when a served request last let go of it. The LRU is kept in
        # stamp order; an undone lookup puts its pages back by their stamps.
        self.stamp: dict = {}
        self.clock = 0

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
            del self.stamp[page]
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
            if src in self.page_key:
                self.touch([src])
            if src in self.page_key and not self.refcount(src):
                event("copy-on-write of a cached page (after truncate)")
                self.lru.append(src)
        req.pages += got_pages
        req.tokens += tokens
        req.tentative = False

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
        # Sequential semantics on a scratch model decide copies and the page count. A cached
        # page whose last owner copies it becomes evictable for the requests after that one.
        scratch = {k: v.copy() for k, v in self.reqs.items()}
        dropped = [p for r in req_ids for p in self.window_release(r, scratch)]
        freed = set(self.freed_by(dropped, scratch))
        available = len(self.free_plain) + len(self.lru) + len(freed)
        plans, needed, refused = [], 0, None
        for i, (r, n) in enumerate(zip(req_ids, counts, strict=True)):
            need, cow = self.plan(r, n, scratch)
            plans.append((need, cow))
            needed += need
            req = scratch.setdefault(r, Req())
            src = req.pages[-1] if cow else None
            fake = [-1 - len(plans) * 100 - j for j in range(need)]  # placeholder pages
            if cow:
                req.pages[-1] = fake.pop(0)
            req.pages += fake
            req.tokens += [0] * n
            orphan = src in self.page_key and not any(src in q.pages for q in scratch.values())
            if (orphan or i == len(req_ids) - 1) and needed > available and refused is None:
                refused = (needed, available)
            if orphan:
                event("copy-on-write orphans a cached page inside a batch")
                available += 1
        if refused is not None:
            err = self.expect_failure(OutOfPages, call)
            assert (err.needed, err.available) == refused
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
        req = self.reqs.pop(req_id)
        if req.tentative and req.pages:
            event("free undoes a lookup")
        self.release_pages(req.pages, undo=req.tentative)

    def touch(self, pages):
        """Stamps cached ``pages`` now, in order."""
        for page in pages:
            self.stamp[page] = self.clock
            self.clock += 1

    def release_pages(self, pages, undo=False):
        """Model of dropping one owner of ``pages`` (already removed from their request)."""
        pages = [p for p in pages if p != NULL_PAGE]
        dead = [p for p in pages if self.refcount(p) == 0]
        if undo:  # back where the stamps put them
            back = [p for p in dead if p in self.page_key]
            self.lru = sorted(self.lru + back, key=self.stamp.__getitem__)
        else:  # cached pages are stamped, and the dead ones evictable, last page first
            self.touch([p for p in reversed(pages) if p in self.page_key])
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
        req.tentative = False
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
            self.reqs[src].tentative = self.reqs[dst].tentative = False

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
    def lookup_prefix(self, ns, data, req_id=None):
        if req_id is None:
            req_id = self.pick(data)
        a = self.alloc
        base_ns, base = data.draw(st.sampled_from(self.history))
        cut = data.draw(st.one_of(st.just(len(base)), st.integers(0, len(base))))  # hits
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
        if got:
            event("prefix hit")
        assert got == len(hits) * self.P
        assert a.pages(req_id).tolist() == hits
        self.lru = [p for p in self.lru if p not in hits]
        self.reqs[req_id] = Req(prompt[:got], hits, len(hits), ns, True, tentative=True)
        self.stats["lookups"] += 1
        self.stats["queries"] += len(prompt)
        self.stats["hits"] += got

    @precondition(lambda self: self.alloc.enable_prefix_caching and len(self.history) > 1)
    @rule(ns=st.sampled_from(NAMESPACES), data=st.data())
    def refused_admission(self, ns, data):
        """A scheduler looks a new request up, cannot admit it and frees it: the lookup is
        undone (its hits go back to the eviction order where they were)."""
        free_ids = [r for r in IDS if r not in self.reqs]
        if not free_ids or len(self.reqs) == self.alloc.max_requests:
            return
        req_id = data.draw(st.sampled_from(free_ids))
        self.lookup_prefix(ns, data, req_id=req_id)
        self.release(req_id)

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
        twin = fresh_like(self.alloc)
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
        # order), except the cumulative counters (prefix_stats and tier_stats, whose
        # device_hits a lookup counts too); with caching off those stay 0.
        if not self.alloc.enable_prefix_caching:
            event("free everything: caching off")
            assert self.alloc.checksum() == fresh_like(self.alloc).checksum()
        elif not self.lru:
            event("free everything: caching on, nothing cached")
            assert self.alloc.checksum() == fresh_with_counters(self.alloc).checksum()

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
