"""A grouped PageAllocator against a plain-Python model: a hypothesis state machine.

Layouts: Gemma 3 (5 sliding : 1 full over 12 layers), gpt-oss (alternating), Llama 4
(chunked and full), one sliding group. The model keeps each request's pages per group (page
ids are the allocator's; which columns hold one, which are released, which are copied, what
each group caches and what a lookup hits are the model's) and checks refcounts, free counts,
cached pages and every row after each rule; every refused call must leave the checksum alone.
With a host tier, swapped-out requests move every group's own pages (one step per swap).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvshard.allocator import OutOfPages, PageAllocator

FULL = ("full",)
LAYOUTS = {
    "gemma3": ([("sliding", 5)] * 5 + [FULL]) * 2,
    "gpt-oss": [("sliding", 3), FULL] * 2,
    "llama4": [("chunked", 4)] * 3 + [FULL],
    "sliding": [("sliding", 3)] * 2,
}
IDS = ["a", "b", "c", "d"]
TEMPLATES = [np.arange(64) % 3, np.arange(64) % 5]  # prompts of one template share prefixes


def window_start(layer_type, n):
    """First token the next query (at position n) reads."""
    if layer_type[0] == "sliding":
        return max(n - layer_type[1] + 1, 0)
    if layer_type[0] == "chunked":
        return layer_type[1] * (n // layer_type[1])
    return 0


class GroupsMachine(RuleBasedStateMachine):
    @initialize(
        layout=st.sampled_from(sorted(LAYOUTS)),
        pages_per_group=st.integers(3, 14),
        page_size=st.sampled_from([1, 2, 2]),
        max_pages=st.integers(3, 8),
        host=st.sampled_from([0, 0, 5, 30]),
    )
    def setup(self, layout, pages_per_group, page_size, max_pages, host):
        num_pages = 1 + pages_per_group * len(PageAllocator(
            2, 1, max_requests=1, max_pages_per_request=1, layer_types=LAYOUTS[layout]
        ).group_types)  # fmt: skip
        note(f"{layout}: PageAllocator({num_pages}, {page_size}, {max_pages=}, {host=})")
        self.a = PageAllocator(
            num_pages,
            page_size,
            max_requests=3,
            max_pages_per_request=max_pages,
            enable_prefix_caching=True,
            layer_types=LAYOUTS[layout],
            num_host_pages=host,
        )
        self.H = host
        self.on_host: dict = {}  # swapped-out req -> [(group, column)] of its pages on the host
        self.types = self.a.group_types
        self.G, self.P, self.M, self.N = len(self.types), page_size, max_pages, num_pages
        self.tokens: dict = {}  # req -> tokens held
        self.tmpl: dict = {}  # req -> template index
        self.table: dict = {}  # req -> [G lists of page ids, 0 = released]
        self.released: dict = {}  # req -> [G leading columns released]
        self.committed: dict = {}
        self.cache: dict = {}  # (group, block key) -> page
        self.cached: dict = {}  # page -> (group, block key)

    # ------------------------------------------------------------------ helpers

    def refs(self, skip=()):
        """Owners of each page; ``skip``: (req, group, column) entries not counted."""
        counts = Counter()
        for req, groups in self.table.items():
            for g, cols in enumerate(groups):
                for c, page in enumerate(cols):
                    if page and (req, g, c) not in skip:
                        counts[page] += 1
        return counts

    def key(self, template, block):
        """A block's key in the model: its request's tokens up to the block's end."""
        return tuple(TEMPLATES[template][: (block + 1) * self.P].tolist())

    def refused(self, exc, call):
        before = self.a.checksum()
        try:
            call()
        except exc:
            assert self.a.checksum() == before
            event(f"refused: {exc.__name__}")
            return True
        raise AssertionError(f"{call} did not raise {exc.__name__}")

    def new_request(self, req, template):
        self.tokens[req], self.tmpl[req], self.committed[req] = 0, template, 0
        self.table[req] = [[] for _ in range(self.G)]
        self.released[req] = [0] * self.G

    # -------------------------------------------------------------------- rules

    @rule(req=st.sampled_from(IDS), count=st.integers(0, 4), template=st.integers(0, 1))
    def allocate(self, req, count, template):
        note(f"allocate({req!r}, {count})")
        if req not in self.tokens and len(self.tokens) == 3:
            assert self.refused(ValueError, lambda: self.a.allocate(req, count))
            return
        if req in self.on_host:
            assert self.refused(ValueError, lambda: self.a.allocate(req, count))
            return
        fresh = req not in self.tokens
        n = self.tokens.get(req, 0)
        need = -(-(n + count) // self.P)
        if need > self.M:
            assert self.refused(ValueError, lambda: self.a.allocate(req, count))
            return
        groups = self.table[req] if not fresh else [[] for _ in range(self.G)]
        old = len(groups[0])
        stops = [window_start(t, n) // self.P for t in self.types]
        skip = {(req, g, c) for g in range(self.G) for c in range(stops[g]) if groups[g][c]}
        refs = self.refs(skip)
        cow = [
            bool(n % self.P and count and refs[cols[-1]] + (cols[-1] in self.cached) > 1)
            for cols in groups
        ]
        needed = self.G * (need - old) + sum(cow)
        available = self.N - 1 - len(refs)
        if needed > available:
            assert self.refused(OutOfPages, lambda: self.a.allocate(req, count))
            return
        if fresh:
            self.new_request(req, template)
        self.a.allocate(req, count)
        got = self.a.pages(req).reshape(self.G, -1)
        if any(s > r for s, r in zip(stops, self.released[req], strict=True)):
            event("window release")
        taken = set()
        for g, cols in enumerate(self.table[req]):
            for c in range(self.released[req][g], stops[g]):
                cols[c] = 0  # released: the row reads the null page
            self.released[req][g] = max(self.released[req][g], stops[g])
            assert not got[g, : stops[g]].any(), "a window column still holds a page"
            assert list(got[g, stops[g] : old - cow[g]]) == cols[stops[g] : old - cow[g]]
            new = got[g, old - cow[g] :].tolist()
            assert not cow[g] or new[0] != cols[-1], "a shared partial page was written"
            taken.update(new)
            self.table[req][g] = cols[: old - cow[g]] + new
        assert len(taken) == needed and not taken & set(refs), "a taken page was owned"
        event("copy on write" if any(cow) else "no copy")
        if taken & set(self.cached):
            event("eviction")
        for page in taken & set(self.cached):  # evicted from the prefix cache
            del self.cache[self.cached.pop(page)]
        self.tokens[req] = n + count
        self.a.take_pending_copies()

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        req = data.draw(st.sampled_from(sorted(self.tokens)))
        note(f"free({req!r})")
        self.a.free(req)
        self.a.take_pending_swaps()  # its host pages are free again after the step
        self.on_host.pop(req, None)
        for store in (self.tokens, self.tmpl, self.table, self.released, self.committed):
            del store[req]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def swap_out(self, data):
        req = data.draw(st.sampled_from(sorted(self.tokens)))
        note(f"swap_out_request({req!r})")
        if not self.H or req in self.on_host:
            assert self.refused(ValueError, lambda: self.a.swap_out_request(req))
            return
        refs = self.refs()
        moving = [
            (g, c)
            for g, cols in enumerate(self.table[req])
            for c, page in enumerate(cols)
            if page and refs[page] == 1 and page not in self.cached
        ]
        host_free = self.H - 1 - sum(len(cols) for cols in self.on_host.values())
        if len(moving) > host_free:
            assert self.refused(OutOfPages, lambda: self.a.swap_out_request(req))
            return
        assert self.a.swap_out_request(req) == len(moving)
        out, _ = self.a.take_pending_swaps()
        assert sorted(out[:, 0].tolist()) == sorted(self.table[req][g][c] for g, c in moving)
        for g, c in moving:
            self.table[req][g][c] = 0  # on the host: the row reads the null page
        self.on_host[req] = moving
        event(f"swapped out {min(len(moving), 2)}+ pages")

    @precondition(lambda self: self.on_host)
    @rule(data=st.data())
    def swap_in(self, data):
        req = data.draw(st.sampled_from(sorted(self.on_host)))
        note(f"swap_in_request({req!r})")
        refs = self.refs()
        moving = self.on_host[req]
        if len(moving) > self.N - 1 - len(refs):
            assert self.refused(OutOfPages, lambda: self.a.swap_in_request(req))
            return
        device = self.a.swap_in_request(req).tolist()
        _, into = self.a.take_pending_swaps()
        assert into[:, 0].tolist() == device and not set(device) & set(refs)
        for (g, c), page in zip(moving, device, strict=True):  # group by group, row order
            self.table[req][g][c] = page
            if page in self.cached:  # evicted from the prefix cache
                del self.cache[self.cached.pop(page)]
        del self.on_host[req]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def truncate(self, data):
        req = data.draw(st.sampled_from(sorted(self.tokens)))
        keep = data.draw(st.integers(0, self.tokens[req]))
        note(f"truncate({req!r}, {keep})")
        if req in self.on_host:
            assert self.refused(ValueError, lambda: self.a.truncate(req, keep))
            return
        late = [
            self.released[req][g] * self.P > window_start(t, keep) for g, t in enumerate(self.types)
        ]
        if any(late):
            assert self.refused(ValueError, lambda: self.a.truncate(req, keep))
            return
        self.a.truncate(req, keep)
        cols = -(-keep // self.P)
        self.table[req] = [groups[:cols] for groups in self.table[req]]
        self.tokens[req] = keep
        if self.committed[req] > keep // self.P:
            self.committed[req] = 0

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), dst=st.sampled_from(IDS))
    def fork(self, data, dst):
        src = data.draw(st.sampled_from(sorted(self.tokens)))
        note(f"fork({src!r}, {dst!r})")
        if dst in self.tokens or len(self.tokens) == 3 or src in self.on_host:
            assert self.refused(ValueError, lambda: self.a.fork(src, dst))
            return
        self.a.fork(src, dst)
        self.tokens[dst], self.tmpl[dst] = self.tokens[src], self.tmpl[src]
        self.committed[dst] = self.committed[src]
        self.table[dst] = [list(cols) for cols in self.table[src]]
        self.released[dst] = list(self.released[src])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def commit(self, data):
        self.commit_request(data.draw(st.sampled_from(sorted(self.tokens))))

    @rule(req=st.sampled_from(IDS), template=st.integers(0, 1), length=st.integers(2, 17))
    def serve(self, req, template, length):
        """A new prompt as a server runs it: look up, compute the rest, commit."""
        if req in self.tokens:
            return
        if self.look_up(req, template, length) is None:
            return
        self.allocate(req, length - self.tokens[req], template)
        if req in self.tokens:
            self.commit_request(req)

    def commit_request(self, req):
        note(f"commit_prefix({req!r})")
        tokens = TEMPLATES[self.tmpl[req]][: self.tokens[req]]
        if req in self.on_host:
            assert self.refused(ValueError, lambda: self.a.commit_prefix(req, tokens))
            return
        full = self.tokens[req] // self.P
        new = 0
        for g, cols in enumerate(self.table[req]):
            for block in range(self.committed[req], full):
                page, key = cols[block], (g, self.key(self.tmpl[req], block))
                if page and page not in self.cached and key not in self.cache:
                    self.cache[key], self.cached[page] = page, key
                    new += 1
        self.committed[req] = max(self.committed[req], full)
        assert self.a.commit_prefix(req, tokens) == new

    @rule(req=st.sampled_from(IDS), template=st.integers(0, 1), length=st.integers(1, 17))
    def lookup(self, req, template, length):
        self.look_up(req, template, length)

    def look_up(self, req, template, length):
        """lookup_prefix against the model; returns the hit in pages (None if refused)."""
        note(f"lookup_prefix({req!r}, template {template}, {length} tokens)")
        prompt = TEMPLATES[template][:length]
        busy = self.tokens.get(req, 0) or req in self.on_host
        if busy or (req not in self.tokens and len(self.tokens) == 3):
            assert self.refused(ValueError, lambda: self.a.lookup_prefix(req, prompt))
            return None
        limit = min((length - 1) // self.P, self.M)
        hit, firsts = 0, [0] * self.G
        for h in range(limit, 0, -1):  # the longest prefix every group serves
            starts = [window_start(t, h * self.P) // self.P for t in self.types]
            if all(
                (g, self.key(template, b)) in self.cache
                for g, start in enumerate(starts)
                for b in range(start, h)
            ):
                hit, firsts = h, starts
                break
        event("hit" if hit else "miss")
        if any(firsts):
            event("hit with window columns not attached")
        assert self.a.peek_prefix(prompt) == hit * self.P
        assert self.a.lookup_prefix(req, prompt) == hit * self.P
        self.new_request(req, template)
        self.tokens[req] = self.committed[req] = hit
        self.tokens[req] *= self.P
        for g, first in enumerate(firsts):
            self.table[req][g] = [0] * first + [
                self.cache[(g, self.key(template, b))] for b in range(first, hit)
            ]
            self.released[req][g] = first
        got = self.a.pages(req).reshape(self.G, -1)
        assert got.tolist() == self.table[req]
        return hit

    # --------------------------------------------------------------- invariants

    @invariant()
    def matches_the_model(self):
        if not hasattr(self, "a"):
            return
        self.a.check_invariants()
        state = self.a.state_dict()
        refs = self.refs()
        expected = np.zeros(self.N, np.int64)
        for page, count in refs.items():
            expected[page] = count
        assert np.array_equal(state["refcount"], expected)
        assert self.a.num_free_pages == self.N - 1 - len(refs)  # free and evictable pages
        assert set(np.flatnonzero(state["cached"]).tolist()) == set(self.cached)
        for page, (g, _) in self.cached.items():
            assert state["page_group"][page] == g
        for req, groups in self.table.items():
            assert self.a.pages(req).reshape(self.G, -1).tolist() == groups
            for g, t in enumerate(self.types):
                if t == FULL and req not in self.on_host:  # a global group keeps every page
                    assert all(groups[g]), "a full-attention group released a page"


GroupsMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestGroupsMachine = GroupsMachine.TestCase
