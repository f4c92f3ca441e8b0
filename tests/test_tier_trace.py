"""End-to-end traces through the host tier (issue 22, acceptance).

Both halves together: :class:`kvshard.PageAllocator` decides what moves
(``swap_out_request``, ``swap_in_request``, demotions of evicted prefix pages, host prefix
hits) and ``take_pending_swaps`` hands the pairs, as they come, padded with ``(-1, -1)`` rows
to one fixed K, to :func:`kvshard.swap_out` / :func:`kvshard.swap_in` on a real
:class:`kvshard.HostCache`. Each step applies swap-outs, swap-ins, copies, then the update, in
the documented order (docs/tiers-allocator.md).

The oracle is numpy: every token's K and V are random values fixed by the token ids of its
whole prefix (so a prefix hit must serve exactly what the request would have written), rounded
to the cache dtype. After every step each running request's whole history is read back with
:func:`kvshard.gather` and must equal the oracle bit for bit, and :func:`kvshard.attention`
over the step equals the float64 :func:`kvshard.reference.paged_attention`.
"""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest
from _cache_helpers import make_mesh

import kvshard
from kvshard import reference

PAGE = 4
LAYERS, HEADS, Q_HEADS, DIM = 2, 2, 4, 16
K_PAD = 16  # swap and copy rows per step, padded
T_PAD = 16  # tokens per step, padded
SEQS = 4
SM_SCALE = DIM**-0.5
TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2}


def pad(pairs: np.ndarray, value: int) -> np.ndarray:
    assert len(pairs) <= K_PAD, pairs
    return np.concatenate([pairs, np.full((K_PAD - len(pairs), 2), value, np.int32)])


class Served:
    """A device cache, its host tier and an allocator, stepped in the documented order."""

    def __init__(self, dtype: str, *, num_pages: int, num_host_pages: int, **alloc_kw):
        self.dtype = dtype
        self.mesh = make_mesh((1, 2))
        spec = kvshard.CacheSpec(
            num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, dtype=dtype, page_size=PAGE,
            num_pages=num_pages,
        )  # fmt: skip
        self.cache = kvshard.init_cache(spec, self.mesh)
        self.host = kvshard.init_host_cache(spec, self.mesh, num_host_pages)
        self.alloc = kvshard.PageAllocator(
            num_pages, PAGE, max_requests=SEQS, max_pages_per_request=8,
            num_host_pages=num_host_pages, **alloc_kw,
        )  # fmt: skip
        self.kv: dict[tuple[int, ...], np.ndarray] = {}  # prefix -> float32[L, 2, H, D]
        self.ids: dict[str, list[int]] = {}
        self.moved = {"out": 0, "in": 0}

    def token_kv(self, prefix: tuple[int, ...]) -> np.ndarray:
        """The K/V of a prefix's last token, every layer: fixed by the prefix, cache-exact."""
        if prefix not in self.kv:
            rng = np.random.default_rng(abs(hash(prefix)) % 2**32)
            x = rng.standard_normal((LAYERS, 2, HEADS, DIM)).astype(np.float32)
            self.kv[prefix] = (
                x.astype(ml_dtypes.bfloat16).astype(np.float32) if (self.dtype == "bfloat16") else x
            )
        return self.kv[prefix]

    def history(self, req: str, n: int | None = None) -> np.ndarray:
        """float32[L, 2, n, H, D]: what request ``req`` wrote at its first ``n`` positions."""
        ids = self.ids[req]
        n = len(ids) if n is None else n
        return np.stack([self.token_kv(tuple(ids[: t + 1])) for t in range(n)], axis=2)

    def step(self, reqs: list[str], counts: list[int], new_ids: dict[str, list[int]]):
        """Grows, swaps, copies, writes and attends one step; checks every read."""
        rows = self.alloc.allocate_batch(reqs, counts)
        for r in reqs:
            self.ids[r] = self.ids.get(r, []) + new_ids.get(r, [])
            assert len(self.ids[r]) == self.alloc.num_tokens(r)
        swap_out, swap_in = self.alloc.take_pending_swaps()
        self.moved["out"] += len(swap_out)
        self.moved["in"] += len(swap_in)
        self.cache, self.host = kvshard.swap_out(self.cache, self.host, pad(swap_out, -1))
        self.cache, self.host = kvshard.swap_in(self.cache, self.host, pad(swap_in, -1))
        self.cache = kvshard.copy_pages(self.cache, pad(self.alloc.take_pending_copies(), 0))
        step = kvshard.build_step(
            self.alloc, reqs, counts, rows=rows, num_tokens_padded=T_PAD, max_num_seqs=SEQS
        )
        new = np.zeros((LAYERS, 2, T_PAD, HEADS, DIM), np.float32)
        at = 0
        for r, n in zip(reqs, counts, strict=True):
            new[:, :, at : at + n] = self.history(r)[:, :, -n:] if n else 0
            at += n
        for layer in range(LAYERS):
            self.cache = kvshard.update(self.cache, layer, new[layer, 0], new[layer, 1], step)
        rng = np.random.default_rng(len(self.kv))
        q = rng.standard_normal((T_PAD, Q_HEADS, DIM)).astype(np.float32)
        for layer in range(LAYERS):
            got = kvshard.attention(self.cache, layer, q, step, sm_scale=SM_SCALE)
            hist = [self.history(r)[layer] for r in reqs]
            want = reference.paged_attention(
                q, [h[0] for h in hist], [h[1] for h in hist], counts, sm_scale=SM_SCALE
            )
            np.testing.assert_allclose(
                np.asarray(got, np.float32)[:at], want[:at], atol=TOLERANCE[self.dtype]
            )
        for r in reqs:
            self.check_reads(r)

    def check_reads(self, req: str):
        """``kvshard.gather`` of every position ``req`` holds equals the oracle exactly."""
        n = self.alloc.num_tokens(req)
        pages = self.alloc.pages(req)
        assert (pages != 0).all(), f"{req} is not on the device"
        slots = (pages[np.arange(n) // PAGE] * PAGE + np.arange(n) % PAGE).astype(np.int32)
        want = self.history(req, n)
        for layer in range(LAYERS):
            k, v = kvshard.gather(self.cache, layer, slots)
            np.testing.assert_array_equal(np.asarray(k, np.float32), want[layer, 0], req)
            np.testing.assert_array_equal(np.asarray(v, np.float32), want[layer, 1], req)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_preemption_by_swap_serves_more_context_than_the_device_holds(dtype):
    """4 requests of 16 tokens (4 pages each, 16 in all) on 9 device pages (8 usable):
    two run at a time, and every two steps the one that ran longest is swapped out and the
    longest-waiting one swapped in (into new device pages) or started."""
    num_pages = 9
    served = Served(dtype, num_pages=num_pages, num_host_pages=16)
    alloc = served.alloc
    rng = np.random.default_rng(0)
    prompts = {r: rng.integers(0, 50, 6).tolist() for r in "abcd"}
    target = 16
    waiting, running, swapped_at_least_once = list("abcd"), [], set()
    done: list[str] = []
    for tick in range(200):
        if not waiting and not running:
            break
        if tick % 2 == 0 and waiting:  # between steps: preempt one, resume one
            if len(running) == 2:
                victim = running.pop(0)
                assert alloc.swap_out_request(victim) > 0
                assert alloc.is_swapped_out(victim) and (alloc.pages(victim) == 0).all()
                waiting.append(victim)
                swapped_at_least_once.add(victim)
            while len(running) < 2 and waiting:
                nxt = waiting.pop(0)
                if nxt in served.ids and alloc.is_swapped_out(nxt):
                    alloc.swap_in_request(nxt)
                running.append(nxt)
        counts, new_ids = [], {}
        for r in running:
            held = alloc.num_tokens(r) if r in served.ids else 0
            n = min(len(prompts[r]) - held, 4) if held < len(prompts[r]) else 1
            counts.append(n)
            new_ids[r] = (
                prompts[r][held : held + n]
                if held < len(prompts[r])
                else [int(rng.integers(0, 50))]
            )
        served.step(running, counts, new_ids)
        for r in list(running):
            if alloc.num_tokens(r) == target:
                running.remove(r)
                alloc.free(r)
                done.append(r)
    assert sorted(done) == list("abcd")
    # The trace needed more pages than the device has, and every request was swapped out and
    # back in (its reads after the swap-in checked in step() against the oracle).
    assert 4 * target // PAGE > num_pages - 1
    assert swapped_at_least_once == set("abcd"), swapped_at_least_once
    stats = alloc.tier_stats
    assert stats["swapped_out_pages"] == stats["swapped_in_pages"] == served.moved["out"] > 0
    assert served.moved["in"] == served.moved["out"]
    alloc.check_invariants()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_evicted_prefix_is_served_from_the_host(dtype):
    """A 13-token system prompt (3 full pages) is committed and freed; other requests then fill
    the 7 usable device pages, evicting its pages into the host prefix cache. A returning request
    with the same prompt hits all 12 tokens, from the host (swap-in pairs),
    and reads back exactly the original K/V."""
    served = Served(
        dtype, num_pages=8, num_host_pages=8, enable_prefix_caching=True, host_prefix_pages=4
    )
    alloc = served.alloc
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 50, 13).tolist()
    assert alloc.lookup_prefix("sys", prompt) == 0
    served.step(["sys"], [13], {"sys": prompt})
    alloc.commit_prefix("sys", prompt)
    alloc.free("sys")
    # Fill the pool: 4 + 3 pages of the 7 usable, 3 of which held the cached prompt pages.
    others = {"x": rng.integers(50, 99, 14).tolist(), "y": rng.integers(50, 99, 10).tolist()}
    for r in "xy":
        assert alloc.lookup_prefix(r, others[r]) == 0
    for r in "xy":
        served.step([r], [len(others[r])], {r: others[r]})
    demoted = alloc.tier_stats["demoted_pages"]
    assert demoted == 3, alloc.tier_stats  # the prompt's pages are now only on the host
    for r in "xy":
        alloc.free(r)
    before = alloc.tier_stats
    hit = alloc.lookup_prefix("back", prompt)
    assert hit == 12
    stats = alloc.tier_stats
    host_hits = stats["host_hits"] - before["host_hits"]
    device_hits = stats["device_hits"] - before["device_hits"]
    assert host_hits + device_hits == hit
    assert host_hits == demoted * PAGE, stats
    served.ids["back"] = prompt[:12]
    # The step swaps the hit pages in, then computes the one token the hit did not cover.
    served.step(["back"], [1], {"back": prompt[12:]})
    assert served.moved["in"] == demoted
    served.check_reads("back")
    alloc.check_invariants()


def test_unpadded_and_empty_pairs_are_accepted():
    """take_pending_swaps' pairs as they come (no padding, or none at all) go through."""
    served = Served("float32", num_pages=8, num_host_pages=8)
    served.step(["a"], [5], {"a": [1, 2, 3, 4, 5]})
    out, into = served.alloc.take_pending_swaps()
    assert out.shape == into.shape == (0, 2)
    served.cache, served.host = kvshard.swap_out(served.cache, served.host, out)
    served.cache, served.host = kvshard.swap_in(served.cache, served.host, into)
    served.alloc.swap_out_request("a")
    out, _ = served.alloc.take_pending_swaps()
    served.cache, served.host = kvshard.swap_out(served.cache, served.host, out)
    served.alloc.swap_in_request("a")
    _, into = served.alloc.take_pending_swaps()
    # (0, 0) is copy_pages' padding, not the swaps': two such rows write one page (refused,
    # nothing donated); the swaps' padding is (-1, -1) (docs/tiers.md).
    with pytest.raises(ValueError, match="both write device page 0"):
        kvshard.swap_in(served.cache, served.host, pad(into, 0))
    assert not served.cache.kv.is_deleted() and not served.host.kv.is_deleted()
    served.cache, served.host = kvshard.swap_in(served.cache, served.host, into)
    jax.block_until_ready(served.cache.kv)
    served.check_reads("a")
