"""Helpers of the layer-group tests (test_cache_groups.py, test_attention_groups.py).

Hybrid-model layer types (Gemma 3: five local layers per global one; gpt-oss: alternating
local and global; Llama 4: chunked local with a global layer), hand-built page tables per
group (disjoint pages of one pool, page 0 the null page, out-of-window pages released into
it as an allocator would), steps built by hand from them, each layer's dense K/V history and
the float64 oracle of each layer read with its own type. Nothing here depends on the
allocator's layer groups.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import kvshard
from kvshard import reference
from kvshard.metadata import build_update_slices, padded_num_slices

SLIDING = ("sliding", 6)  # six keys: a window that starts and ends inside pages of 4
FULL = ("full",)
CHUNKED = ("chunked", 8)  # two pages per chunk
GEMMA3 = ((SLIDING,) * 5 + (FULL,)) * 2  # 12 layers -> group_size 2, 6 groups
GPT_OSS = (SLIDING, FULL) * 3  # 6 layers -> group_size 3, 2 groups
LLAMA4 = (CHUNKED, CHUNKED, CHUNKED, FULL)  # 4 layers -> group_size 1, 4 groups

PAGE = 4
HEADS = 2
Q_HEADS = 4
DIM = 64
TOKENS = 32
SEQS = 4
PAGES_PER_SEQ = 4
NUM_REQUESTS = 3
SCALE = DIM**-0.5
# Steps of the three requests (tokens each): prefills, then chunked prefills and decodes
# whose sliding and chunked groups have released their first pages.
STEPS = ([9, 5, 3], [1, 2, 6], [1, 7, 1])


def grouped_spec(layer_types, **kw) -> kvshard.CacheSpec:
    groups = kvshard.CacheSpec(len(layer_types), HEADS, DIM, PAGE, 2, layer_types=layer_types)
    pages = 1 + groups.num_groups * NUM_REQUESTS * PAGES_PER_SEQ  # page 0: the null page
    return kvshard.CacheSpec(
        len(layer_types), HEADS, DIM, PAGE, pages, "float32", layer_types=layer_types, **kw
    )


def first_visible(layer_type, pos):
    """First position a query at ``pos`` reads, written from the definitions."""
    if layer_type[0] == "sliding":
        return max(pos - layer_type[1] + 1, 0)
    if layer_type[0] == "chunked":
        return layer_type[1] * (pos // layer_type[1])
    return 0


class History:
    """One pool's requests: page tables per group, each layer's dense K/V, steps by hand."""

    def __init__(self, spec: kvshard.CacheSpec, rng: np.random.Generator):
        self.spec, self.rng = spec, rng
        groups = spec.num_groups
        # Group g's request r owns pages 1 + (g·R + r)·P .. : disjoint over groups, requests.
        ids = 1 + np.arange(groups * NUM_REQUESTS * PAGES_PER_SEQ, dtype=np.int32)
        self.pages = ids.reshape(groups, NUM_REQUESTS, PAGES_PER_SEQ)
        self.lengths = np.zeros(NUM_REQUESTS, np.int64)
        shape = (0, HEADS, DIM)
        self.k = [[np.zeros(shape, np.float32)] * NUM_REQUESTS for _ in spec.layer_types]
        self.v = [[np.zeros(shape, np.float32)] * NUM_REQUESTS for _ in spec.layer_types]
        self.q_lens = np.zeros(NUM_REQUESTS, np.int64)

    def table(self, group: int, computed: np.ndarray, kv_lens: np.ndarray) -> np.ndarray:
        """Group ``group``'s page table for a step: pages no query of this step (or later) can
        see, and pages past kv_len, are the null page 0."""
        layer_type = self.spec.groups.group_types[group]
        table = self.pages[group].copy()
        for r in range(NUM_REQUESTS):
            lo = first_visible(layer_type, int(computed[r]))
            for j in range(PAGES_PER_SEQ):
                if (j + 1) * PAGE <= lo or j * PAGE >= kv_lens[r]:
                    table[r, j] = 0
        return table

    def step(self, counts):
        """Grows every request by ``counts`` tokens; returns (StepMetadata, k, v, q), k and v
        float32[L, T, H, D], q float32[L, T, Hq, D] (fresh random values per layer)."""
        spec, counts = self.spec, np.asarray(counts, np.int64)
        computed, kv_lens = self.lengths.copy(), self.lengths + counts
        tables = [self.table(g, computed, kv_lens) for g in range(spec.num_groups)]
        live = [build_update_slices(computed, counts, t, PAGE) for t in tables]
        assert len({x.shape for x in live}) == 1, "the same slice boundaries in every group"
        slices = np.zeros((spec.num_groups, 3, padded_num_slices(TOKENS, SEQS, PAGE)), np.int32)
        slices[:, :, : live[0].shape[1]] = np.stack(live)
        page_indices = np.zeros((spec.num_groups, SEQS, PAGES_PER_SEQ), np.int32)
        page_indices[:, :NUM_REQUESTS] = np.stack(tables)
        total = int(counts.sum())
        cu = np.full(SEQS + 1, total, np.int32)
        cu[: NUM_REQUESTS + 1] = np.concatenate([[0], np.cumsum(counts)])
        lens = np.zeros(SEQS, np.int32)
        lens[:NUM_REQUESTS] = kv_lens
        positions = np.zeros(TOKENS, np.int32)
        positions[:total] = np.concatenate(
            [np.arange(c, n) for c, n in zip(computed, kv_lens, strict=True)]
        )
        if spec.num_groups == 1:  # one page table: no group axis (today's shapes)
            slices, page_indices = slices[0], page_indices[0]
        step = kvshard.StepMetadata(
            slices=slices,
            num_slices=np.array([live[0].shape[1]], np.int32),
            page_indices=page_indices,
            kv_lens=lens,
            cu_q_lens=cu,
            num_seqs=np.array([NUM_REQUESTS], np.int32),
            positions=positions,
            geometry=kvshard.StepGeometry(
                PAGE, spec.num_pages, PAGES_PER_SEQ, TOKENS, SEQS, num_groups=spec.num_groups
            ),
        )
        layers = spec.num_layers
        k, v = (self.rng.standard_normal((layers, TOKENS, HEADS, DIM), np.float32) for _ in "kv")
        q = self.rng.standard_normal((layers, TOKENS, Q_HEADS, DIM), np.float32)
        for layer in range(layers):
            for r in range(NUM_REQUESTS):
                new = slice(int(cu[r]), int(cu[r + 1]))
                self.k[layer][r] = np.concatenate([self.k[layer][r], k[layer, new]])
                self.v[layer][r] = np.concatenate([self.v[layer][r], v[layer, new]])
        self.lengths, self.q_lens = kv_lens, counts
        return step, k, v, q

    def oracle(self, layer: int, q: np.ndarray) -> np.ndarray:
        """float64[T, Hq, D]: layer ``layer`` read with its own type from its dense history."""
        layer_type = self.spec.layer_types[layer]
        kind, size = layer_type[0], (layer_type[1] if len(layer_type) == 2 else None)
        return reference.paged_attention(
            q,
            self.k[layer],
            self.v[layer],
            self.q_lens,
            sm_scale=SCALE,
            sliding_window=size if kind == "sliding" else None,
            chunk_size=size if kind == "chunked" else None,
        )


def filled(cache: kvshard.KVCache, value: float, null_page: float | None = None):
    """``cache`` with every slot holding ``value`` (the null page ``null_page`` if given)."""
    kv = np.full(cache.kv.shape, value, np.float32)
    if null_page is not None:  # page 0 of every pool
        pool = cache.spec.slots_per_pool
        for start in range(0, kv.shape[1], pool):
            kv[:, start : start + PAGE] = null_page
    return dataclasses.replace(cache, kv=jax.device_put(kv, cache.sharding))


def dense_kernel(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, **kw):
    """A kernel of JAX's ``ragged_paged_attention`` contract with static shapes, so that the
    pallas backend runs off TPU (``BackendOptions(attention_kernel=...)``): each token reads
    its request's whole page-table row and, as JAX's kernel does, K/V at or past kv_len are
    zeroed before the matmuls while the causal and window masks are added to the scores only
    (so a NaN inside kv_len would reach the output, as on TPU). Rows of tokens outside live
    requests are garbage; the backend zeroes them."""
    del num_seqs  # tokens of requests past it are zeroed by the backend
    num_tokens, q_heads, dim = q.shape
    combined = kv_pages.shape[2]
    t = jnp.arange(num_tokens)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens, t, side="right") - 1, 0, kv_lens.shape[0] - 1)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    pos = kv_lens[seq] - q_len + (t - cu_q_lens[seq])
    rows = kv_pages[page_indices[seq]].reshape(num_tokens, -1, combined, dim)  # [T, keys, C, D]
    key_pos = jnp.arange(rows.shape[1])
    inside = (key_pos[None, :] < kv_lens[seq][:, None])[..., None, None]
    rows = jnp.where(inside, rows.astype(jnp.float32), 0.0)
    group = q_heads // (combined // 2)
    k = jnp.repeat(rows[:, :, 0::2] * (kw["k_scale"] or 1.0), group, axis=2)
    v = jnp.repeat(rows[:, :, 1::2] * (kw["v_scale"] or 1.0), group, axis=2)
    s = jnp.einsum("thd,tkhd->thk", q.astype(jnp.float32), k) * kw["sm_scale"]
    if kw["soft_cap"] is not None:
        s = kw["soft_cap"] * jnp.tanh(s / kw["soft_cap"])
    seen = key_pos[None, :] <= pos[:, None]
    if kw["sliding_window"] is not None:
        seen &= key_pos[None, :] > pos[:, None] - kw["sliding_window"]
    s = s + jnp.where(seen, 0.0, -0.7 * float(jnp.finfo(jnp.float32).max))[:, None, :]
    w = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("thk,tkhd->thd", w, v).astype(q.dtype)
