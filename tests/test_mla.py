"""Latent (MLA) caches: CacheSpec(kv_layout="latent") written, moved and read.

Each token of a latent cache stores one row ``[c_kv | k_pe]`` shared by every query head
(DeepSeek-V2/V3, Kimi-K2). Checked here against numpy: the spec's rules and bytes; update
(both backends) and gather against a dense model of the slots; copy_pages, swap_out / swap_in
and a forked request's copy-on-write against the same model; attention in the absorbed form
against :func:`kvshard.reference.mla_attention` (float64) on a replicated and a data-parallel
placement, with NaN in slots no query may see; traced bad input dropped identically by both
update backends; refusals that change nothing.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _compiles import export_update_attention_scan, ops_writing
from hypothesis import given, settings
from hypothesis import strategies as st

import kvshard
from kvshard import reference
from kvshard.testing import update_slices

RANK, ROPE = 32, 8  # kv_lora_rank, qk_rope_head_dim: a row of 40 values, 128 lanes
DIM = RANK + ROPE
PAGE, PAGES, WIDTH, HOST_PAGES = 4, 24, 6, 8
WINDOW_CAP = {"sliding_window": 5, "soft_cap": 3.0}
# Blocks small enough that a request spans several query and key blocks; every attention
# test uses them (and a 1x2 mesh, 4 query heads, 16 tokens), so they share one executable.
OPTS = kvshard.BackendOptions(queries_per_block=4, keys_per_step=4)


def attend(cache, layer, q, step, **kw):
    return kvshard.attention(cache, layer, q, step, sm_scale=0.2, options=OPTS, **kw)


def make_mesh(shape):
    return jax.make_mesh(shape, ("data", "model"), devices=jax.devices()[: shape[0] * shape[1]])


def latent_spec(dtype="float32", **kw):
    return kvshard.CacheSpec(
        2, 1, DIM, PAGE, PAGES, dtype, kv_layout="latent", kv_lora_rank=RANK, **kw
    )


# --------------------------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------------------------


def test_latent_spec_shapes_and_bytes():
    spec = kvshard.CacheSpec(61, 1, 576, 64, 10, "bfloat16", kv_layout="latent", kv_lora_rank=512)
    assert spec.padded_head_dim == 640 and spec.rows_per_head == 1 and spec.value_dim == 512
    # tp = 4: one copy of the row per device, 4 rows in all.
    assert spec.global_shape(4, 2) == (61, 2 * 10 * 64, 4, 640)
    assert spec.local_shape(4) == (61, 10 * 64, 1, 640)
    # One page of one layer on one device: 64 slots x 576 values x 2 bytes of latent...
    assert spec.kv_bytes_per_page(4) == 64 * 576 * 2
    # ... 64 lanes of padding per row, and the bf16 sublane pair padded with a zero row.
    assert spec.lane_padding_bytes_per_page(4) == 64 * 64 * 2
    assert spec.page_bytes_per_device(4) == 64 * 2 * 640 * 2
    # The float32 cache needs no sublane padding: 640 lanes a slot.
    f32 = kvshard.CacheSpec(1, 1, 576, 64, 10, "float32", kv_layout="latent", kv_lora_rank=512)
    assert f32.page_bytes_per_device(8) == 64 * 640 * 4


def test_latent_int8_takes_one_scale():
    spec = latent_spec("int8", k_scale=0.5)
    assert (spec.k_scale, spec.v_scale) == (0.5, 0.5)
    assert latent_spec("int8", k_scale=0.5, v_scale=0.5).v_scale == 0.5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_kv_heads": 2}, "num_kv_heads=2 must be 1 for kv_layout='latent'"),
        ({"kv_lora_rank": None}, "kv_lora_rank=None must be an int in [1, head_dim=40]"),
        ({"kv_lora_rank": 41}, "kv_lora_rank=41 is outside [1, head_dim=40]"),
        ({"kv_lora_rank": 0}, "kv_lora_rank=0 is outside [1, head_dim=40]"),
        ({"kv_layout": "packed"}, "kv_lora_rank=32 is for kv_layout='latent' only"),
        (
            {"dtype": "int8", "k_scale": 0.5, "v_scale": 0.25},
            "v_scale=0.25 must be None or equal k_scale=0.5",
        ),
    ],
)
def test_latent_spec_refusals(kwargs, message):
    fields = {
        "num_layers": 2,
        "num_kv_heads": 1,
        "head_dim": DIM,
        "page_size": PAGE,
        "num_pages": PAGES,
        "kv_layout": "latent",
        "kv_lora_rank": RANK,
        **kwargs,
    }
    with pytest.raises(ValueError, match=re.escape(message)):
        kvshard.CacheSpec(**fields)


# --------------------------------------------------------------------------------------------
# Write, read, copy, swap against a dense model of the slots
# --------------------------------------------------------------------------------------------


class Dense:
    """numpy model: slots[g][layer] float64[slots, DIM] of each pool (NaN: never written)."""

    def __init__(self, pools):
        self.slots = np.zeros((pools, 2, PAGES * PAGE, DIM))

    def update(self, layer, latent, slices, num):
        for g in range(self.slots.shape[0]):
            sl = slices[g] if slices.ndim == 3 else slices
            rows = latent[g] if latent.ndim == 4 else latent
            for i in range(int((num[g] if num.ndim == 2 else num)[0])):
                dst, src, n = (int(x) for x in sl[:, i])
                self.slots[g, layer, dst : dst + n] = rows[src : src + n, 0]

    def copy(self, pairs):
        before = self.slots.copy()
        for g in range(self.slots.shape[0]):
            for src, dst in pairs[g] if pairs.ndim == 3 else pairs:
                a, b = src * PAGE, dst * PAGE
                self.slots[g, :, b : b + PAGE] = before[g, :, a : a + PAGE]


def gathered(cache, layer):
    """(latent, c_kv) of every slot, float64[pools, slots, ...]."""
    slots = np.arange(PAGES * PAGE, dtype=np.int32)
    if cache.page_axis is not None:
        slots = np.broadcast_to(slots, (cache.dp, slots.size)).copy()
    lat, ckv = kvshard.gather(cache, layer, slots)
    lat, ckv = np.asarray(lat, np.float64), np.asarray(ckv, np.float64)
    if cache.page_axis is None:
        lat, ckv = lat[None], ckv[None]
    return lat[:, :, 0], ckv[:, :, 0]


def assert_cache(cache, dense):
    for layer in range(2):
        lat, ckv = gathered(cache, layer)
        np.testing.assert_array_equal(lat, dense.slots[:, layer])
        np.testing.assert_array_equal(ckv, dense.slots[:, layer, :, :RANK])


def _slices(pools):
    # (dst slot, src token, len): a whole page, a partial page, one token.
    s = np.array([[8, 0, 4], [13, 4, 3], [2, 7, 1]], np.int32).T.copy()
    num = np.array([3], np.int32)
    if pools:
        return np.stack([s] * pools), np.stack([num] * pools)
    return s, num


@pytest.mark.parametrize(
    ("shape", "page_axis"),
    [
        pytest.param((1, 1), None, marks=pytest.mark.extended),
        pytest.param((2, 4), None, marks=pytest.mark.extended),
        ((2, 2), "data"),
    ],
)
def test_update_gather_copy_swap(shape, page_axis):
    """Replicated over "model" (r = tp) and with pages over "data": every copy of the row
    written, gathered once, copied and swapped with its pages."""
    mesh = make_mesh(shape)
    spec = latent_spec()
    cache = kvshard.init_cache(spec, mesh, page_axis=page_axis)
    assert cache.replication == shape[1]
    pools = cache.dp if page_axis else 0
    dense = Dense(max(pools, 1))
    rng = np.random.default_rng(0)
    slices, num = _slices(pools)
    for layer in (1, 0):
        lat = rng.standard_normal((*((pools,) if pools else ()), 8, 1, DIM)).astype(np.float32)
        cache = kvshard.update(cache, layer, lat, None, slices, num)
        dense.update(layer, lat, slices, num)
    assert_cache(cache, dense)
    # Every device's copy holds the row (replicas are not only replica 0).
    block = np.asarray(cache.kv).reshape(2, -1, shape[1], 128)
    np.testing.assert_array_equal(block, np.repeat(block[:, :, :1], shape[1], axis=2))
    pairs = np.array([[2, 5], [3, 0], [0, 2]], np.int32)
    pairs = np.stack([pairs] * pools) if pools else pairs
    cache = kvshard.copy_pages(cache, pairs)
    dense.copy(pairs)
    assert_cache(cache, dense)
    host = kvshard.init_host_cache(spec, mesh, HOST_PAGES, page_axis=page_axis)
    out = np.array([[2, 1], [3, 6]], np.int32)
    back = np.array([[7, 1], [9, 6]], np.int32)  # device pages 7, 9 <- host 1, 6
    if pools:
        out, back = np.stack([out] * pools), np.stack([back] * pools)
    cache, host = kvshard.swap_out(cache, host, out)
    cache, host = kvshard.swap_in(cache, host, back)
    moved = np.array([[2, 7], [3, 9]])  # what the round trip moves, device page to page
    dense.copy(np.stack([moved] * pools) if pools else moved)
    assert_cache(cache, dense)


@pytest.mark.extended  # the traced test below runs both backends in the suite
def test_update_pallas_matches_xla(small_kernel_blocks):
    """The Pallas update kernel writes the latent row (one "head" of 128 lanes) bit for bit
    as the xla backend does."""
    mesh = make_mesh((1, 2))
    spec = latent_spec("bfloat16")
    lat = np.random.default_rng(1).standard_normal((8, 1, DIM)).astype(np.float32)
    slices, num = _slices(0)
    outs = [
        np.asarray(
            kvshard.update(kvshard.init_cache(spec, mesh), 1, lat, None, slices, num, backend=b).kv
        )
        for b in ("xla", "pallas")
    ]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert np.any(outs[0] != 0)


def _traced_update(backend):
    @jax.jit
    def f(cache, lat, slices, num):
        return kvshard.update(cache, 1, lat, None, slices, num, backend=backend)

    return f


def test_traced_bad_slices_dropped_alike_by_both_backends(small_kernel_blocks):
    mesh = make_mesh((1, 2))
    spec = latent_spec()
    lat = np.random.default_rng(2).standard_normal((8, 1, DIM)).astype(np.float32)
    # ok, crosses a page, too long, negative start, past the pool, then padding past num.
    cols = [[0, 0, 2], [3, 2, 2], [8, 2, 5], [-4, 2, 2], [96, 2, 1], [20, 2, 2]]
    slices = np.array(cols, np.int32).T.copy()
    num = np.array([5], np.int32)
    outs = {
        b: np.asarray(_traced_update(b)(kvshard.init_cache(spec, mesh), lat, slices, num).kv)
        for b in ("xla", "pallas")
    }
    np.testing.assert_array_equal(outs["xla"], outs["pallas"])
    dense = Dense(1)
    dense.update(1, lat, slices[:, :1], np.array([1]))  # only the first slice is writable
    rows = outs["xla"].reshape(2, -1, 2, 128)  # [L, slots, replicas, lanes]
    for replica in range(2):
        np.testing.assert_array_equal(rows[1, :, replica, :DIM], dense.slots[0, 1])
    assert not rows[0].any() and not rows[..., DIM:].any()


def test_update_refusals_change_nothing():
    mesh = make_mesh((1, 2))
    cache = kvshard.init_cache(latent_spec(), mesh)
    before = np.asarray(cache.kv).copy()
    lat = np.ones((8, 1, DIM), np.float32)
    slices, num = _slices(0)
    with pytest.raises(ValueError, match=r"v must be None for a kv_layout='latent' cache"):
        kvshard.update(cache, 0, lat, lat, slices, num)
    wrong_k = "k must have shape [T, 1, kv_lora_rank + qk_rope_head_dim] = [*, 1, 40]"
    with pytest.raises(ValueError, match=re.escape(wrong_k)):
        kvshard.update(cache, 0, lat[..., :RANK], None, slices, num)
    with pytest.raises(ValueError, match=r"slices"):
        kvshard.update(cache, 0, lat, None, slices + np.array([[100], [0], [0]], np.int32), num)
    assert not cache.kv.is_deleted()
    np.testing.assert_array_equal(np.asarray(cache.kv), before)


# --------------------------------------------------------------------------------------------
# Attention in the absorbed form
# --------------------------------------------------------------------------------------------


class Served:
    """A latent cache, one allocator per pool and each request's latent history."""

    def __init__(self, shape, page_axis, seed=0, dtype="float32"):
        self.cache = kvshard.init_cache(latent_spec(dtype), make_mesh(shape), page_axis=page_axis)
        self.allocs = [
            kvshard.PageAllocator(PAGES, PAGE, max_requests=4, max_pages_per_request=WIDTH)
            for _ in range(self.cache.dp)
        ]
        self.history = [{} for _ in self.allocs]
        self.rng = np.random.default_rng(seed)

    def step(self, batches, tokens=16):
        metas, lats = [], []
        for g, batch in enumerate(batches):
            ids, counts = [r for r, _ in batch], np.array([c for _, c in batch], np.int64)
            rows = self.allocs[g].allocate_batch(ids, counts)
            metas.append(
                kvshard.build_step(
                    self.allocs[g], ids, counts, rows=rows, num_tokens_padded=tokens, max_num_seqs=4
                )
            )
            lat = self.rng.standard_normal((tokens, 1, DIM)).astype(np.float32)
            lat = np.asarray(jnp.asarray(lat, self.cache.spec.np_dtype), np.float32)
            at = 0
            for r, c in batch:
                old = self.history[g].get(r, np.zeros((0, DIM)))
                self.history[g][r] = np.concatenate([old, lat[at : at + c, 0]])
                at += c
            lats.append(lat)
        pooled = self.cache.page_axis is not None
        # Copy-on-write of forked requests' shared pages, before the step's write.
        copies = [a.take_pending_copies() for a in self.allocs]
        if any(len(c) for c in copies):
            width = max(len(c) for c in copies)
            pad = [np.concatenate([c, np.zeros((width - len(c), 2), np.int32)]) for c in copies]
            self.cache = kvshard.copy_pages(self.cache, np.stack(pad) if pooled else pad[0])
        step = kvshard.stack_steps(metas) if pooled else metas[0]
        lat = np.stack(lats) if pooled else lats[0]
        self.cache = kvshard.update(self.cache, 1, lat, None, step)
        return step

    def oracle(self, q, batches, **kw):
        outs = []
        for g, batch in enumerate(batches):
            hist = [self.history[g][r] for r, _ in batch]
            qg = q[g] if q.ndim == 4 else q
            outs.append(
                reference.mla_attention(
                    qg[..., :RANK],
                    qg[..., RANK:],
                    [h[:, :RANK] for h in hist],
                    [h[:, RANK:] for h in hist],
                    [c for _, c in batch],
                    **kw,
                )
            )
        return np.stack(outs) if q.ndim == 4 else outs[0]


@pytest.mark.parametrize(
    ("shape", "page_axis", "heads", "kw"),
    [
        ((1, 2), None, 4, {}),
        pytest.param((1, 4), None, 8, {}, marks=pytest.mark.extended),
        pytest.param((2, 2), "data", 4, {}, marks=pytest.mark.extended),
        pytest.param((1, 2), None, 4, WINDOW_CAP, marks=pytest.mark.extended),
    ],
    ids=["heads-over-model", "4-way-heads", "pages-over-data", "window-softcap"],
)
def test_attention_mixed_prefill_decode_matches_oracle(shape, page_axis, heads, kw):
    """Heads split over "model" against the replicated latent, pages over "data"; a decode
    and two prefill chunks in one step, each spanning several query and key blocks."""
    s = Served(shape, page_axis)
    pools = s.cache.dp if page_axis else 1
    s.step([[(0, 5), (1, 3)]] * pools)
    batches = [[(0, 1), (1, 6), (2, 7)]] * pools  # a decode, then two prefill chunks
    step = s.step(batches)
    lead = (pools,) if page_axis else ()
    q = s.rng.standard_normal((*lead, 16, heads, DIM)).astype(np.float32)
    out = attend(s.cache, 1, q, step, **kw)
    assert out.shape == (*lead, 16, heads, RANK)
    np.testing.assert_allclose(out, s.oracle(q, batches, sm_scale=0.2, **kw), atol=2e-5)


def test_absorbed_form_equals_mla_with_up_projections():
    """The oracle's absorbed form against MLA written out: per-head keys
    ``[c_kv W_UK_h | k_pe]`` and values ``c_kv W_UV_h``; the absorbed output times W_UV_h."""
    rng = np.random.default_rng(3)
    heads, nope, v_dim, n = 3, 6, 5, 7
    c_kv, k_pe = rng.standard_normal((n, RANK)), rng.standard_normal((n, ROPE))
    w_uk, w_uv = rng.standard_normal((heads, RANK, nope)), rng.standard_normal((heads, RANK, v_dim))
    q_nope, q_pe = rng.standard_normal((4, heads, nope)), rng.standard_normal((4, heads, ROPE))
    q_latent = np.einsum("thn,hrn->thr", q_nope, w_uk)
    absorbed = reference.mla_attention(q_latent, q_pe, [c_kv], [k_pe], [4], sm_scale=0.3)
    for h in range(heads):
        keys = np.concatenate([c_kv @ w_uk[h], k_pe], -1)[:, None]
        full = reference.paged_attention(
            np.concatenate([q_nope[:, h : h + 1], q_pe[:, h : h + 1]], -1),
            [keys],
            [(c_kv @ w_uv[h])[:, None]],
            [4],
            sm_scale=0.3,
        )
        np.testing.assert_allclose(absorbed[:, h] @ w_uv[h], full[:, 0], atol=1e-12)


def test_unseen_nan_slots_never_reach_the_output():
    """NaN in every slot that holds no token of a live request (free pages, the tail of each
    request's last page): the next step's output equals the oracle's, finite."""
    s = Served((1, 2), None, seed=5)
    s.step([[(0, 3), (1, 6)]])
    alloc = s.allocs[0]
    held = {
        int(page) * PAGE + i
        for r in (0, 1)
        for j, page in enumerate(alloc.pages(r))
        for i in range(min(PAGE, alloc.num_tokens(r) - j * PAGE))
    }
    kv = np.asarray(s.cache.kv).copy()
    unseen = [slot for slot in range(PAGES * PAGE) if slot not in held]
    kv[:, unseen] = np.nan
    s.cache = kvshard.KVCache(
        jax.device_put(kv, s.cache.kv.sharding), s.cache.spec, s.cache.mesh, "model", None
    )
    batches = [[(0, 1), (1, 3)]]
    step = s.step(batches)
    q = s.rng.standard_normal((16, 4, DIM)).astype(np.float32)
    out = np.asarray(attend(s.cache, 1, q, step))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, s.oracle(q, batches, sm_scale=0.2), atol=2e-5)


def test_attention_refusals_change_nothing():
    s = Served((1, 2), None)
    step = s.step([[(0, 3)]])
    before = np.asarray(s.cache.kv).copy()
    q = np.ones((16, 4, DIM), np.float32)
    with pytest.raises(NotImplementedError, match="backend='pallas' cannot read a kv_layout="):
        kvshard.attention(s.cache, 1, q, step, sm_scale=0.1, backend="pallas")
    wrong_q = "q must have shape [T, num_q_heads, kv_lora_rank + qk_rope_head_dim]"
    with pytest.raises(ValueError, match=re.escape(wrong_q)):
        kvshard.attention(s.cache, 1, q[..., :RANK], step, sm_scale=0.1)
    with pytest.raises(ValueError, match="q has 3 query heads"):
        kvshard.attention(s.cache, 1, q[:, :3], step, sm_scale=0.1)
    np.testing.assert_array_equal(np.asarray(s.cache.kv), before)
    assert attend(s.cache, 1, q, step, backend="auto").shape == (16, 4, RANK)  # xla


def test_traced_bad_layer_reads_zeros():
    s = Served((1, 2), None)
    step = s.step([[(0, 3), (1, 2)]])
    q = np.ones((16, 4, DIM), np.float32)
    f = jax.jit(lambda c, layer: attend(c, layer, q, step))
    np.testing.assert_array_equal(np.asarray(f(s.cache, jnp.int32(5))), 0)
    assert np.any(np.asarray(f(s.cache, jnp.int32(1))) != 0)


@settings(max_examples=6)
@given(seed=st.integers(0, 2**16), fork_at=st.integers(1, 9))
def test_fork_copy_on_write_then_attend(seed, fork_at):
    """A forked request shares its parent's pages; the allocator's copy-on-write pairs, applied
    with copy_pages, let both grow apart; each attends exactly its own history."""
    s = Served((1, 2), None, seed=seed)
    s.step([[(0, fork_at)]])
    alloc = s.allocs[0]
    alloc.fork(0, 1)
    s.history[0][1] = s.history[0][0].copy()
    batches = [[(0, 1), (1, 2)]]
    step = s.step(batches)
    q = s.rng.standard_normal((16, 4, DIM)).astype(np.float32)
    out = attend(s.cache, 1, q, step)
    np.testing.assert_allclose(out, s.oracle(q, batches, sm_scale=0.2), atol=2e-5)


def test_int8_latent_stores_one_scale_and_counts_saturation_once():
    """An int8 latent cache quantizes the row with k_scale; gather reads c_kv back from the
    same stored lanes; update_with_stats counts saturated elements once (in k)."""
    mesh = make_mesh((1, 2))
    spec = latent_spec("int8", k_scale=0.05)
    lat = np.random.default_rng(7).standard_normal((8, 1, DIM)).astype(np.float32)
    lat[0, 0, :3] = 100.0  # 100 / 0.05 saturates int8: 3 elements of one written token
    slices, num = _slices(0)
    cache, counts = kvshard.update_with_stats(
        kvshard.init_cache(spec, mesh), 1, lat, None, slices, num
    )
    assert (int(counts.k), int(counts.v)) == (3, 0)
    dense = Dense(1)
    real = reference.dequantize(reference.quantize(lat, 0.05, "int8"), 0.05, np.float32)
    dense.update(1, real, slices, num)
    lat_out, ckv = gathered(cache, 1)
    np.testing.assert_array_equal(lat_out[0], dense.slots[0, 1])
    np.testing.assert_array_equal(ckv[0], dense.slots[0, 1, :, :RANK])


def test_fused_attention_of_a_latent_cache_is_update_then_attention():
    s = Served((1, 2), None, seed=9)
    s.step([[(0, 5)]])
    ids, counts = [0, 1], np.array([1, 3])
    rows = s.allocs[0].allocate_batch(ids, counts)
    step = kvshard.build_step(
        s.allocs[0], ids, counts, rows=rows, num_tokens_padded=16, max_num_seqs=4
    )
    lat = s.rng.standard_normal((16, 1, DIM)).astype(np.float32)
    q = s.rng.standard_normal((16, 4, DIM)).astype(np.float32)
    kv = np.asarray(s.cache.kv)
    copy = kvshard.KVCache(
        jax.device_put(kv, s.cache.kv.sharding), s.cache.spec, s.cache.mesh, "model", None
    )
    out, fused = kvshard.fused_attention(s.cache, 1, q, lat, None, step, sm_scale=0.2, options=OPTS)
    cache = kvshard.update(copy, 1, lat, None, step)
    np.testing.assert_array_equal(np.asarray(fused.kv), np.asarray(cache.kv))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(attend(cache, 1, q, step)))


def _report(fn, *args):
    """The message a ``checks=True`` report raises from jit(fn)(*args), or None."""
    try:
        jax.block_until_ready(jax.jit(fn)(*args))
    except jax.errors.JaxRuntimeError as err:
        jax._src.dispatch.runtime_tokens.clear()  # as a fresh process would not have it
        return str(err)
    return None


@pytest.mark.extended  # two executables with host callbacks: about 8 s on 2 cores
def test_checks_report_what_a_latent_update_and_read_drop():
    mesh = make_mesh((1, 2))
    cache = kvshard.init_cache(latent_spec(), mesh)
    lat = jnp.ones((8, 1, DIM), jnp.float32)
    crossing = jnp.array([[3], [0], [2]], jnp.int32)  # slot 3 + 2 tokens crosses a page

    def write(c, s, n):
        return kvshard.update(c, 0, lat, None, s, n, checks=True)

    report = _report(write, cache, crossing, jnp.array([1], jnp.int32))
    assert report is not None and "is dropped: it must have 0 <= slice_len <= page_size 4" in (
        report
    ), report
    s = Served((1, 2), None)
    step = s.step([[(0, 3)]])
    q = jnp.ones((16, 4, DIM), jnp.float32)
    report = _report(lambda c, layer: attend(c, layer, q, step, checks=True), s.cache, 2)
    assert report is not None and "layer=2 is out of range [0, 2)" in report, report


@st.composite
def _ops(draw):
    """A short random sequence of writes, page copies and swap round trips."""
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["update", "copy", "swap"]))
        if kind == "update":
            slices, num, tokens = draw(
                update_slices(
                    page_size=PAGE, num_pages=PAGES, max_slices=4, max_padding=2, fixed_shapes=True
                )
            )
            layer, seed = draw(st.integers(0, 1)), draw(st.integers(0, 99))
            ops.append(("update", layer, slices, num, tokens, seed))
        elif kind == "copy":
            dst = draw(st.permutations(range(PAGES)))[:3]
            src = [draw(st.integers(0, PAGES - 1)) for _ in dst]
            ops.append(("copy", np.array(list(zip(src, dst, strict=True)), np.int32)))
        else:
            pages = draw(st.permutations(range(PAGES)))[:4]
            host = draw(st.permutations(range(HOST_PAGES)))[:2]
            out = np.array([[pages[0], host[0]], [pages[1], host[1]]], np.int32)
            back = np.array([[pages[2], host[0]], [pages[3], host[1]]], np.int32)
            ops.append(("swap", out, back))
    return ops


@settings(max_examples=8)
@given(ops=_ops())
def test_random_writes_copies_and_swaps_match_numpy(ops):
    mesh = make_mesh((1, 2))
    spec = latent_spec()
    cache = kvshard.init_cache(spec, mesh)
    host = kvshard.init_host_cache(spec, mesh, HOST_PAGES)
    dense = Dense(1)
    for op in ops:
        if op[0] == "update":
            _, layer, slices, num, tokens, seed = op
            lat = np.random.default_rng(seed).standard_normal((tokens, 1, DIM)).astype(np.float32)
            cache = kvshard.update(cache, layer, lat, None, slices, num)
            dense.update(layer, lat, slices, num)
        elif op[0] == "copy":
            cache = kvshard.copy_pages(cache, op[1])
            dense.copy(op[1])
        else:
            _, out, back = op
            cache, host = kvshard.swap_out(cache, host, out)
            cache, host = kvshard.swap_in(cache, host, back)
            moved = np.array([[out[i, 0], back[i, 0]] for i in range(2)])
            dense.copy(moved)
    assert_cache(cache, dense)


def test_the_attention_kernel_refuses_a_latent_layout_by_name():
    from kvshard.kernels.attention_checks import static_validate_inputs

    with pytest.raises(ValueError, match=r"kv_layout='latent' must be one of .*xla backend"):
        static_validate_inputs(*([None] * 7), kv_layout="latent", sm_scale=0.1)


def test_latent_step_exports_for_tpu():
    """A DeepSeek-shaped latent layer (576 values in 640 lanes, bf16) lowers for TPU: the
    Pallas update kernel writes the one row (a Mosaic custom call), the xla read gathers
    pages, and nothing but the kernel, reshapes and the loop touches the donated block."""
    mesh = make_mesh((1, 4))
    spec = kvshard.CacheSpec(3, 1, 576, 16, 64, "bfloat16", kv_layout="latent", kv_lora_rank=512)
    exported, tokens = export_update_attention_scan(spec, mesh, (8, 576), (1, 576), latent=True)
    assert exported.out_avals[1].shape == (spec.num_layers, tokens, 8, 512)
    text = exported.mlir_module()
    assert "tpu_custom_call" in text and "tf.aliasing_output = 0" in text
    block = "tensor<3x1024x1x640xbf16>"  # per device: one latent row of 640 lanes a slot
    assert block in text
    ops = ops_writing(text, block)
    allowed = ("stablehlo.reshape", "stablehlo.custom_call", "stablehlo.while", "func.call")
    assert ops and all(op.startswith(allowed) for op in ops), ops
