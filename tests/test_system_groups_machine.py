"""The host/device loop with layer groups under a hypothesis state machine (issue 21 item 1).

A Gemma-3-shaped model (12 layers, five sliding-window layers to one full: six KV-cache groups
of two cache layers) served through a :class:`kvshard.PageAllocator` with the same
``layer_types`` and prefix caching: steps of new prompts (prefix lookup, the rest computed,
then committed) and decodes, forks and frees. Each step goes through
:func:`kvshard.build_step` (a page table per group), :func:`kvshard.copy_pages` (the step's
copy-on-write pairs of every group) and :func:`kvshard.update` of every layer (xla,
``checks=True``), all in one jitted function compiled once.

A token's K value at layer ``l`` is a number fixed by the token ids of its whole prefix and
``l`` (V is its negation), so after every step each live request must read back, through its
own group's page table in every layer, exactly the tokens its window can see: a page shared
by a prefix hit or a fork holds what the request would have written itself, and a layer that
wrote through another group's table, or a page released too early, is caught. The allocator
side is asserted too: local groups hold no more than a window's pages (the rest read the null
page and are back in the pool), the global group keeps every page, and the pool's free count
is the pages no table holds.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from _cache_helpers import make_mesh
from _groups import (
    GEMMA3,
    GPT_OSS,
    LLAMA4,
    NUM_REQUESTS,
    PAGE,
    PAGES_PER_SEQ,
    SCALE,
    SEQS,
    STEPS,
    TOKENS,
    History,
    filled,
    grouped_spec,
)
from hypothesis import note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import kvshard
from kvshard import CacheSpec, OutOfPages, PageAllocator
from kvshard.allocator import NULL_PAGE

PAGE_SIZE = 2
WINDOW = 3
SLIDING, FULL = ("sliding", WINDOW), ("full",)
LAYER_TYPES = ((SLIDING,) * 5 + (FULL,)) * 2  # 12 layers: 6 groups of 2 cache layers
WIDTH = 5  # pages per request
MAX_REQUESTS = 3
MAX_STEP = 2  # decode tokens a request schedules in one step
T_PAD = 16  # a new prompt's WIDTH * PAGE_SIZE tokens and two decodes
K_PAD = 6 * MAX_REQUESTS  # copies per step: one per group and request at most
SPEC = CacheSpec(
    num_layers=len(LAYER_TYPES), num_kv_heads=1, head_dim=8, page_size=PAGE_SIZE,
    num_pages=1 + 6 * 8, dtype="float32", layer_types=LAYER_TYPES,
)  # fmt: skip
GROUPS = SPEC.groups
NUM_SLOTS = SPEC.slots_per_pool
TEMPLATES = (np.arange(WIDTH * PAGE_SIZE) % 3, np.arange(WIDTH * PAGE_SIZE) % 4)
# One layer of each cache layer: gather reads a cache layer through any of its layers.
READ_LAYERS = tuple(GROUPS.layer_slot.index(s) for s in range(GROUPS.group_size))


COVER = dict.fromkeys(["hits", "copies", "released", "forks", "out_of_pages"], 0)


def value(prefix, layer: int) -> float:
    """K of the last token of ``prefix`` at ``layer``: exact in float32 (below 2**24)."""
    code = sum((i + 1) * (int(t) + 1) for i, t in enumerate(prefix)) % 97 + 1
    return float(code + 100 * layer)


@functools.partial(jax.jit, donate_argnums=(0,))
def _device_step(cache, pairs, k, step):
    """Copies, then every layer's update through its group, then a read of every slot of
    every cache layer."""
    cache = kvshard.copy_pages(cache, pairs, checks=True)
    for layer in range(SPEC.num_layers):
        cache = kvshard.update(cache, layer, k[layer], -k[layer], step, backend="xla", checks=True)
    reads = [
        kvshard.gather(cache, layer, np.arange(NUM_SLOTS, dtype=np.int32)) for layer in READ_LAYERS
    ]
    return cache, [(rk[:, 0, 0], rv[:, 0, 0]) for rk, rv in reads]


class SystemGroups(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.alloc = PageAllocator(
            SPEC.num_pages, PAGE_SIZE, max_requests=MAX_REQUESTS, max_pages_per_request=WIDTH,
            enable_prefix_caching=True, layer_types=LAYER_TYPES,
        )  # fmt: skip
        self.cache = kvshard.init_cache(SPEC, make_mesh((1, 1)))
        self.reads = None
        self.tokens: dict = {}  # req -> its token ids (all computed)
        self.start: dict = {}  # req -> tokens it held before its last growth
        self.next_id = 0

    # ----------------------------------------------------------------- a step

    @rule(data=st.data())
    def step(self, data):
        alloc, ids, counts = self.alloc, [], []
        new = None
        if len(self.tokens) < MAX_REQUESTS and data.draw(st.booleans(), label="new prompt"):
            template = data.draw(st.integers(0, 1), label="template")
            length = data.draw(st.integers(2, WIDTH * PAGE_SIZE), label="length")
            new, prompt = self.next_id, TEMPLATES[template][:length]
            self.next_id += 1
            hit = alloc.lookup_prefix(new, prompt)
            note(f"lookup_prefix({new}, {prompt.tolist()}) -> {hit}")
            COVER["hits"] += hit > 0
            ids.append(new)
            counts.append(length - hit)
        for req, held in sorted(self.tokens.items()):
            room = WIDTH * PAGE_SIZE - len(held)
            count = data.draw(st.integers(0, min(MAX_STEP, room)), label=f"decode {req}")
            if count:
                ids.append(req)
                counts.append(count)
        if not ids:
            return
        before = alloc.checksum()
        try:
            rows = alloc.allocate_batch(ids, counts)
        except OutOfPages:
            assert alloc.checksum() == before
            note(f"allocate_batch({ids}, {counts}): out of pages")
            COVER["out_of_pages"] += 1
            if new is not None:
                alloc.free(new)  # undoes the lookup
            return
        note(f"allocate_batch({ids}, {counts})")
        for req, count in zip(ids, counts, strict=True):
            self.start[req] = len(self.tokens.get(req, ())) if req != new else len(prompt) - count
        if new is not None:
            self.tokens[new] = [int(t) for t in prompt[: prompt.size - counts[0]]]
            grown = prompt[prompt.size - counts[0] :].tolist()
        step = kvshard.build_step(
            alloc, ids, counts, rows=rows, num_tokens_padded=T_PAD, max_num_seqs=SEQS
        )
        k = np.zeros((SPEC.num_layers, T_PAD, 1, 8), np.float32)
        t = 0
        for req, count in zip(ids, counts, strict=True):
            seq = self.tokens[req]
            for _ in range(count):
                token = grown.pop(0) if req == new else int(TEMPLATES[0][len(seq) % 10])
                seq.append(token)
                for layer in range(SPEC.num_layers):
                    k[layer, t] = value(seq, layer)
                t += 1
        pairs = alloc.take_pending_copies()
        COVER["copies"] += len(pairs)
        padded = np.zeros((K_PAD, 2), np.int32)  # (0, 0) rows copy the null page onto itself
        padded[: len(pairs)] = pairs
        self.cache, reads = _device_step(self.cache, padded, k, step)
        self.reads = [(np.asarray(rk), np.asarray(rv)) for rk, rv in reads]
        for req in ids:
            alloc.commit_prefix(req, self.tokens[req])

    @precondition(lambda self: self.tokens and len(self.tokens) < MAX_REQUESTS)
    @rule(data=st.data())
    def fork(self, data):
        src = data.draw(st.sampled_from(sorted(self.tokens)))
        note(f"fork({src}, {self.next_id})")
        self.alloc.fork(src, self.next_id)
        self.tokens[self.next_id] = list(self.tokens[src])
        self.start[self.next_id] = self.start[src]
        COVER["forks"] += 1
        self.next_id += 1

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        req = data.draw(st.sampled_from(sorted(self.tokens)))
        note(f"free({req})")
        self.alloc.free(req)
        del self.tokens[req], self.start[req]

    # ------------------------------------------------------------- invariants

    @invariant()
    def every_request_reads_its_window_in_every_layer(self):
        alloc = self.alloc
        alloc.check_invariants()
        tables = np.asarray(alloc.page_table)  # int32[6, R, WIDTH]
        held = set(tables[tables != NULL_PAGE].tolist())
        assert alloc.num_free_pages == SPEC.num_pages - 1 - len(held)
        for req, seq in self.tokens.items():
            row, n = alloc.row(req), len(seq)
            # The first query of the request's last step read from here on (and later ones
            # from later on): local groups hold exactly the pages from its page on.
            first = max(self.start[req] - WINDOW + 1, 0)
            for g, group_type in enumerate(GROUPS.group_types):
                pages = tables[g, row, : -(-n // PAGE_SIZE)]
                kept = 0 if group_type == FULL else first // PAGE_SIZE
                assert (pages[kept:] != NULL_PAGE).all(), f"group {g} released a page in use"
                assert (pages[:kept] == NULL_PAGE).all(), f"group {g} kept a page out of use"
                COVER["released"] += kept > 0
                for pos in range(0 if group_type == FULL else first, n):
                    page = pages[pos // PAGE_SIZE]
                    assert page != NULL_PAGE, f"request {req} lost position {pos} in group {g}"
                    slot = page * PAGE_SIZE + pos % PAGE_SIZE
                    for layer in GROUPS.group_layers[g]:
                        read_k, read_v = self.reads[GROUPS.layer_slot[layer]]
                        want = value(seq[: pos + 1], layer)
                        assert float(read_k[slot]) == want and float(read_v[slot]) == -want, (
                            f"request {req} layer {layer} position {pos}: read "
                            f"{float(read_k[slot])}, wrote {want}"
                        )


@pytest.mark.extended  # slow: .ci/run's extended step
def test_gemma3_groups_serve_with_prefix_caching_and_fork():
    """The acceptance of issue 21's item 1: run the machine; every path was taken."""
    run_state_machine_as_test(
        SystemGroups, settings=settings(max_examples=25, stateful_step_count=25, deadline=None)
    )
    assert all(COVER.values()), COVER


@pytest.mark.parametrize(
    "layer_types", [GEMMA3, GPT_OSS, LLAMA4], ids=["gemma3", "gpt-oss", "llama4"]
)
def test_allocator_steps_read_like_the_oracle(layer_types):
    """Steps that build_step makes from a grouped allocator, through every layer's update and
    attention (xla) on a NaN-filled cache, equal the float64 oracle of each layer read with its
    own type: the released pages (null) are never read, the kept ones hold the layer's K/V."""
    spec = grouped_spec(layer_types)
    alloc = PageAllocator(
        spec.num_pages, PAGE, max_requests=NUM_REQUESTS, max_pages_per_request=PAGES_PER_SEQ,
        layer_types=layer_types,
    )  # fmt: skip
    assert alloc.groups == spec.groups
    cache = filled(kvshard.init_cache(spec, make_mesh((1, 2))), np.nan)
    history = History(spec, np.random.default_rng(0))  # K/V history and oracle; not its steps
    ids = list(range(NUM_REQUESTS))
    for counts in STEPS:
        rows = alloc.allocate_batch(ids, counts)
        step = kvshard.build_step(
            alloc, ids, counts, rows=rows, num_tokens_padded=TOKENS, max_num_seqs=SEQS
        )
        _, k, v, q = history.step(counts)
        total = sum(counts)
        for layer in range(spec.num_layers):
            cache = kvshard.update(cache, layer, k[layer], v[layer], step)
            out = np.asarray(kvshard.attention(cache, layer, q[layer], step, sm_scale=SCALE))
            want = history.oracle(layer, q[layer])
            np.testing.assert_allclose(out[:total], want[:total], atol=1e-5)
            assert not out[total:].any()
    assert alloc.num_free_pages > 0  # the local groups' released pages are back in the pool
