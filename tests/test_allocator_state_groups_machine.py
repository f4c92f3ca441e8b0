"""State groups of a PageAllocator against a simulated device: a hypothesis state machine.

The device is a dict page -> the tokens whose state the page holds. Every growth first applies
the step's pairs (swap-out, swap-in, copy-on-write, as the documented order says), then checks
that each grown request's state page holds exactly the state of the tokens the request holds
(a fresh request holds none), then writes the new state. So a state page shared by a fork, a
cached state hit by a lookup, or one moved to the host and back must reach the request intact,
and a cached state must never be overwritten (the request's write goes to a copy). Refused
calls must leave the checksum alone.
"""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvshard.allocator import OutOfPages, PageAllocator

M, F = ("mamba",), ("full",)
LAYOUTS = {"1:1": [M, F], "3:1": [M, M, F, M], "two-state": [F, M, ("linear_attention",), F]}
IDS = ["a", "b", "c"]
TEMPLATES = [np.arange(64) % 3, np.arange(64) % 5]


class StateGroupsMachine(RuleBasedStateMachine):
    @initialize(
        layout=st.sampled_from(sorted(LAYOUTS)),
        pages=st.integers(12, 40),
        page_size=st.sampled_from([1, 2, 4]),
        host=st.sampled_from([0, 12]),
    )
    def setup(self, layout, pages, page_size, host):
        self.a = PageAllocator(
            pages,
            page_size,
            max_requests=3,
            max_pages_per_request=16 // page_size,
            enable_prefix_caching=True,
            layer_types=LAYOUTS[layout],
            num_host_pages=host,
        )
        self.P, self.H = page_size, host
        self.seq: dict = {}  # req -> tokens it holds
        self.tmpl: dict = {}  # req -> template
        self.dev: dict = {}  # device page -> state (tuple of tokens)
        self.host: dict = {}  # host page -> state

    def apply_step(self):
        out, into = self.a.take_pending_swaps()
        for d, h in out.tolist():
            self.host[h] = self.dev.get(d)
        for d, h in into.tolist():
            self.dev[d] = self.host.get(h)
        pairs = self.a.take_pending_copies()
        copies = {d: self.dev.get(s) for s, d in pairs.tolist()}  # reads before writes
        self.dev.update(copies)

    def live(self):
        return [r for r in IDS if r in self.a and not self.a.is_swapped_out(r)]

    def grow(self, r, n):
        """allocate(r, n) checked against the device; returns whether it was accepted."""
        held = self.seq.get(r, [])
        t = self.tmpl[r]
        before = self.a.checksum()
        try:
            self.a.allocate(r, n)
        except (OutOfPages, ValueError):
            assert self.a.checksum() == before
            return False
        self.apply_step()
        if n:
            for page in self.a.state_pages([self.a.row(r)])[:, 0].tolist():
                assert page != 0
                if held:
                    assert self.dev.get(page) == tuple(held), "state page lost the state"
                self.dev[page] = tuple(TEMPLATES[t][: len(held) + n].tolist())
        self.seq[r] = TEMPLATES[t][: len(held) + n].tolist()
        return True

    @rule(data=st.data(), n=st.integers(0, 6))
    def allocate(self, data, n):
        live = self.live()
        r = data.draw(st.sampled_from(live) if live and n % 3 else st.sampled_from(IDS))
        if r in self.a and self.a.is_swapped_out(r):
            return
        self.tmpl.setdefault(r, data.draw(st.integers(0, 1)))
        self.grow(r, n)

    @precondition(lambda self: self.live())
    @rule(data=st.data(), n=st.integers(1, 5), m=st.integers(1, 5))
    def fork_and_grow_both(self, data, n, m):
        """A fork whose child and parent both write (their shared state page must split)."""
        src = data.draw(st.sampled_from(self.live()))
        free = [r for r in IDS if r not in self.a]
        if not free:
            return
        dst = free[0]
        self.a.fork(src, dst)
        self.tmpl[dst], self.seq[dst] = self.tmpl[src], list(self.seq[src])
        self.grow(dst, n)
        self.grow(src, m)

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def commit(self, data):
        r = data.draw(st.sampled_from(self.live()))
        self.a.commit_prefix(r, TEMPLATES[self.tmpl[r]][: len(self.seq[r])])

    @rule(data=st.data(), length=st.integers(1, 40))
    def lookup(self, data, length):
        free = [r for r in IDS if r not in self.a]
        if not free:
            return
        r = data.draw(st.sampled_from(free))
        t = data.draw(st.integers(0, 1))
        hit = self.a.lookup_prefix(r, TEMPLATES[t][:length])
        assert hit % self.P == 0 and hit < length
        self.tmpl[r], self.seq[r] = t, TEMPLATES[t][:hit].tolist()

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def fork(self, data):
        src = data.draw(st.sampled_from(self.live()))
        free = [r for r in IDS if r not in self.a]
        if not free:
            return
        dst = free[0]
        self.a.fork(src, dst)
        self.tmpl[dst], self.seq[dst] = self.tmpl[src], list(self.seq[src])

    @precondition(lambda self: self.live())
    @rule(data=st.data(), cut=st.integers(0, 6))
    def truncate(self, data, cut):
        r = data.draw(st.sampled_from(self.live()))
        held = len(self.seq[r])
        target = max(held - cut, 0)
        before = self.a.checksum()
        if 0 < target < held:
            try:
                self.a.truncate(r, target)
            except ValueError:
                assert self.a.checksum() == before
                return
            raise AssertionError("a state rollback was accepted")
        self.a.truncate(r, target)
        self.seq[r] = self.seq[r][:target]

    @precondition(lambda self: any(r in self.a for r in IDS))
    @rule(data=st.data())
    def free(self, data):
        r = data.draw(st.sampled_from([r for r in IDS if r in self.a]))
        self.a.free(r)
        self.seq.pop(r, None)

    @precondition(lambda self: self.H and self.live())
    @rule(data=st.data())
    def swap_out(self, data):
        r = data.draw(st.sampled_from(self.live()))
        before = self.a.checksum()
        try:
            self.a.swap_out_request(r)
        except (OutOfPages, ValueError):
            assert self.a.checksum() == before
            return
        self.apply_step()

    @precondition(
        lambda self: self.H and any(r in self.a and self.a.is_swapped_out(r) for r in IDS)
    )
    @rule(data=st.data())
    def swap_in(self, data):
        r = data.draw(st.sampled_from([r for r in IDS if r in self.a and self.a.is_swapped_out(r)]))
        before = self.a.checksum()
        try:
            self.a.swap_in_request(r)
        except (OutOfPages, ValueError):
            assert self.a.checksum() == before
            return
        self.apply_step()
        if self.seq[r]:
            for page in self.a.state_pages([self.a.row(r)])[:, 0].tolist():
                assert self.dev.get(page) == tuple(self.seq[r]), "swap lost the state"

    @invariant()
    def consistent(self):
        if not hasattr(self, "a"):
            return
        self.a.check_invariants()
        for r in IDS:
            if r in self.a:
                assert self.a.num_tokens(r) == len(self.seq[r])
                states = self.a.state_pages([self.a.row(r)])
                swapped = self.a.is_swapped_out(r)
                assert ((states != 0) == (bool(self.seq[r]) and not swapped)).all() or swapped


TestStateGroupsMachine = StateGroupsMachine.TestCase
TestStateGroupsMachine.settings = settings(
    max_examples=25, stateful_step_count=25, deadline=None, database=None
)
