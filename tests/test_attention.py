"""kvshard.attention against the float64 oracle (kvshard.reference.paged_attention).

Every case grows requests in a real PageAllocator, writes their K/V with kvshard.update through
kvshard.build_step's metadata, then attends the last step's queries. The "xla" backend runs
(its decode and blocked prefill paths, with query and key blocks small enough that a request
spans several); the "pallas" backend's kernel (JAX's ragged_paged_attention) cannot run on CPU,
so the exact operands it would receive are handed to JAX's ref_ragged_paged_attention instead,
and the TPU lowering is proven by jax.export.

Longer than 400 lines on purpose: every attention property (oracle grid, unseen slots, sinks,
drops, host errors, lowering) shares one case builder, the oracle and the pallas operand
mapping, and they read best next to each other.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _compiles import compile_log, export_update_attention_scan, ops_writing
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as jax_rpa
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention
from jax.sharding import PartitionSpec as P

import kvshard
from kvshard import reference

# The documented test hook of the pallas backend: the operands it hands JAX's kernel.
from kvshard._attention.pallas import pallas_operands, pallas_output
from kvshard._attention.params import Statics
from kvshard._device.backend import resolve_attention_backend

PAGE, PAGES, WIDTH, DIM = 4, 24, 6, 64
# The pallas backend with JAX's bundled kernel (the default is kvshard's own, tested in
# test_kernel_attention.py): interleaved caches only, no sinks, no chunked reads.
JAX_KERNEL = kvshard.BackendOptions(pallas_kernel="jax")
TOL = {"float32": 2e-5, "bfloat16": 3e-2, "int8": 2e-5}
# int8 caches store round(x / scale): the oracle sees the dequantized values.
INT8_SCALE = 0.05


def make_mesh(shape):
    return jax.make_mesh(shape, ("data", "model"), devices=jax.devices()[: shape[0] * shape[1]])


@dataclasses.dataclass
class Case:
    """A cache, one allocator per pool, each request's dense K/V history, and a step."""

    cache: kvshard.KVCache
    allocs: list
    history: list  # per pool: {req: (k [n, H, D], v [n, H, D])}
    steps: list  # per pool: (req_ids, counts)
    rng: np.random.Generator

    @property
    def pooled(self) -> bool:
        return self.cache.page_axis is not None


def new_case(
    mesh_shape,
    num_kv_heads,
    dtype="float32",
    *,
    page_axis=False,
    seed=0,
    max_requests=4,
    kv_layout=None,
    head_dim=DIM,
):
    """kv_layout None: the spec's default, "packed" at DIM = 64 (the pallas backend's cases
    pass "interleaved", the layout JAX's kernel reads)."""
    mesh = make_mesh(mesh_shape)
    scales = {"k_scale": INT8_SCALE, "v_scale": INT8_SCALE} if dtype == "int8" else {}
    spec = kvshard.CacheSpec(
        num_layers=2,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        page_size=PAGE,
        num_pages=PAGES,
        dtype=dtype,
        kv_layout=kv_layout,
        **scales,
    )
    cache = kvshard.init_cache(spec, mesh, page_axis="data" if page_axis else None)
    allocs = [
        kvshard.PageAllocator(PAGES, PAGE, max_requests=max_requests, max_pages_per_request=WIDTH)
        for _ in range(cache.dp)
    ]
    return Case(cache, allocs, [{} for _ in allocs], [], np.random.default_rng(seed))


def run_step(case: Case, batches, *, layer=1, tokens=16, seqs=4):
    """Grows each pool's requests by its batch [(req, count)], writes random K/V, returns
    (StepMetadata, per-pool step metadata list)."""
    spec = case.cache.spec
    metas, ks, vs = [], [], []
    for g, batch in enumerate(batches):
        ids = [r for r, _ in batch]
        counts = np.array([c for _, c in batch], np.int64)
        rows = case.allocs[g].allocate_batch(ids, counts)
        metas.append(
            kvshard.build_step(
                case.allocs[g], ids, counts, rows=rows, num_tokens_padded=tokens, max_num_seqs=seqs
            )
        )
        shape = (tokens, spec.num_kv_heads, spec.head_dim)
        k = case.rng.standard_normal(shape).astype(np.float32)
        v = case.rng.standard_normal(shape).astype(np.float32)
        # What the cache holds is the cast value: the oracle must see the same numbers.
        k, v = (stored(x, spec) for x in (k, v))
        offset = 0
        for r, c in batch:
            hk, hv = case.history[g].get(r, (np.zeros((0, *k.shape[1:])),) * 2)
            seg = slice(offset, offset + c)
            case.history[g][r] = (np.concatenate([hk, k[seg]]), np.concatenate([hv, v[seg]]))
            offset += c
        ks.append(k)
        vs.append(v)
    case.steps = [[(r, c) for r, c in b] for b in batches]
    if case.pooled:
        step = kvshard.stack_steps(metas)
        k, v = np.stack(ks), np.stack(vs)
    else:
        step, k, v = metas[0], ks[0], vs[0]
    case.cache = kvshard.update(case.cache, layer, k, v, step)
    return step


def stored(x, spec):
    """float32 values of x as the cache reads them back."""
    if spec.dtype == "int8":
        return reference.dequantize(
            reference.quantize(x, INT8_SCALE, "int8"), INT8_SCALE, np.float32
        )
    return np.asarray(jnp.asarray(x, spec.dtype).astype(jnp.float32))


def oracle(case: Case, q, **kw):
    """float64 expected output, [T, Hq, D] or [dp, T, Hq, D]."""
    outs = []
    for g, batch in enumerate(case.steps):
        ids = [r for r, _ in batch]
        hist = case.history[g]
        qg = q[g] if case.pooled else q
        outs.append(
            reference.paged_attention(
                qg,
                [hist[r][0] for r in ids],
                [hist[r][1] for r in ids],
                [c for _, c in batch],
                **kw,
            )
        )
    return np.stack(outs) if case.pooled else outs[0]


def queries(case: Case, q_heads, tokens=16, dtype=np.float32):
    lead = (case.cache.dp,) if case.pooled else ()
    shape = (*lead, tokens, q_heads, case.cache.spec.head_dim)
    return case.rng.standard_normal(shape).astype(dtype)


# --------------------------------------------------------------------------------------------
# xla backend == oracle, hypothesis over ragged batches
# --------------------------------------------------------------------------------------------

# (mesh, num_kv_heads, q_heads, page_axis): GQA ratios 1, 4, 8; replication (2 heads on a
# head axis of 8 or 4); a data-parallel page axis.
LAYOUTS = [
    ((1, 8), 8, 8, False),  # ratio 1, one head per device
    ((1, 8), 2, 8, False),  # ratio 4, each KV head replicated 4x
    ((1, 4), 2, 16, False),  # ratio 8, replicated 2x
    ((2, 4), 4, 16, True),  # ratio 4, two page pools
    ((1, 2), 4, 16, False),  # ratio 4, two heads per device
]


@st.composite
def batches(draw, pools):
    """Per pool: a history step (prefills) then the attended step (decode/prefill/mixed)."""
    out = []
    for _ in range(pools):
        n = draw(st.integers(1, 4))
        kind = draw(st.sampled_from(["decode", "prefill", "mixed"]))
        before, now = [], []
        budget, hist_budget = 16, 16
        for r in range(n):
            low = 0 if kind != "decode" else 1
            hist = draw(st.integers(low, max(low, min(12, hist_budget - (n - r - 1)))))
            hist_budget -= hist
            q = 1 if kind == "decode" or (kind == "mixed" and r % 2) else draw(st.integers(1, 6))
            q = min(q, budget - (n - r - 1))
            budget -= q
            if hist:
                before.append((r, hist))
            now.append((r, q))
        out.append((before, now))
    return out


# The float32 entries (every mesh) are the slowest; they run in .ci/run's extended step
# (pytest -m extended), the bfloat16 and int8 entries in the README's suite.
GRID = [pytest.param(layout, "float32", marks=[pytest.mark.extended]) for layout in LAYOUTS] + [
    (LAYOUTS[3], "bfloat16"),  # two page pools
    (LAYOUTS[0], "int8"),
]


@pytest.mark.parametrize(
    ("layout", "dtype"),
    GRID,
    ids=lambda x: f"{x[0]}-H{x[1]}-Hq{x[2]}" if isinstance(x, tuple) else x,
)
@given(data=st.data())
@settings(max_examples=2)  # per grid entry; each example poisons every unseen slot too
def test_xla_matches_oracle_and_unseen_slots_cannot_reach_it(layout, dtype, data):
    """Then NaN/inf is written into every slot no query may see (issue 19): the xla output is
    bit for bit the clean run's, and (no window, no sinks) the pallas operands through JAX's
    reference give the oracle's."""
    mesh_shape, kv_heads, q_heads, page_axis = layout
    kv_layout = data.draw(st.sampled_from(["interleaved", "packed"]))
    case = new_case(
        mesh_shape, kv_heads, dtype, page_axis=page_axis, max_requests=5, kv_layout=kv_layout
    )
    drawn = data.draw(batches(case.cache.dp))
    # A request holding pages but not in the step: another request's pages, to be poisoned.
    run_step(case, [[(9, data.draw(st.integers(1, 8)))]] * case.cache.dp)
    window = data.draw(st.sampled_from([None, 3, 9]))
    soft_cap = data.draw(st.sampled_from([None, 2.0]))
    if any(before for before, _ in drawn):
        run_step(case, [before or [] for before, _ in drawn])
    step = run_step(case, [now for _, now in drawn])
    q_dtype = "float32" if dtype == "int8" else dtype  # queries in the model's dtype
    q = np.asarray(jnp.asarray(queries(case, q_heads), q_dtype).astype(jnp.float32))
    kw = {"sm_scale": DIM**-0.5, "sliding_window": window, "soft_cap": soft_cap}
    # Sinks near the scores' range (they matter without dominating), or -inf: none (the
    # same executable; -inf equals sinks=None bit for bit, tested below).
    sinks = np.full(q_heads, -np.inf, np.float32)
    with_sinks = data.draw(st.booleans())
    if with_sinks:
        sinks = case.rng.uniform(-2.0, 2.0, q_heads).astype(np.float32)
    options = draw_blocks(data)

    def attend():
        return kvshard.attention(
            case.cache,
            1,
            jnp.asarray(q, q_dtype),
            step,
            backend="xla",
            options=options,
            sinks=sinks,
            **kw,
        )

    got = attend()
    assert got.dtype == jnp.dtype(q_dtype)
    head_axis_at = 2 if page_axis else 1
    assert got.sharding.spec[head_axis_at] == "model"
    want = oracle(case, q, sinks=sinks, **kw)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=TOL[dtype])
    poison_unseen(case, visible_slots(case, window))
    dirty = np.asarray(attend().astype(jnp.float32))
    clean = np.asarray(got.astype(jnp.float32))
    np.testing.assert_array_equal(dirty.view(np.uint32), clean.view(np.uint32))
    # JAX's kernel: no sinks, interleaved rows only; windows: the xfail below.
    if window is None and not with_sinks and kv_layout == "interleaved":
        got = pallas_via_reference(case, q, step, 1, **kw)
        np.testing.assert_allclose(got, want, atol=TOL[dtype])


def draw_blocks(data) -> kvshard.BackendOptions:
    """Key blocks of one page with query blocks of 2 tokens, two pages with 3 (a prefill request
    spans several of each), or the defaults (here a whole request in one block)."""
    keys, queries = data.draw(st.sampled_from([(PAGE, 2), (2 * PAGE, 3), (None, None)]))
    return kvshard.BackendOptions(keys_per_step=keys, queries_per_block=queries)


# --------------------------------------------------------------------------------------------
# The pallas backend's operands, through JAX's reference kernel
# --------------------------------------------------------------------------------------------


def pallas_via_reference(case: Case, q, step, layer, **kw):
    """Every device's kernel call, made eagerly with ref_ragged_paged_attention."""
    cache, spec = case.cache, case.cache.spec
    tp, r = cache.tp, cache.replication
    q = np.asarray(q)
    out = np.zeros(q.shape, np.float64)
    statics = Statics(spec, kw["sm_scale"], kw["sliding_window"], kw["soft_cap"])
    heads_per_dev = q.shape[-2] // tp
    for shard in cache.kv.addressable_shards:
        g = shard.index[1].start // spec.slots_per_pool if case.pooled else None
        i = (shard.index[2].start or 0) // (2 * spec.num_kv_heads * r // tp)
        fields = [getattr(step, f) for f in ("page_indices", "kv_lens", "cu_q_lens", "num_seqs")]
        if g is not None:
            fields = [x[g] for x in fields]
        qg = q[g] if g is not None else q
        q_dev = jnp.asarray(qg[:, i * heads_per_dev : (i + 1) * heads_per_dev])
        # The shard's bytes, on the default device: every device's operands then share one
        # set of eager compilations.
        block = jnp.asarray(np.asarray(shard.data))
        ops, kwargs, tok_ok = pallas_operands(
            block, jnp.int32(layer), q_dev, *map(jnp.asarray, fields), statics=statics
        )
        assert ops[1].shape == (
            spec.num_layers * spec.num_pages,
            PAGE,
            *shard.data.shape[2:],
        ), "the kernel must see the whole stacked block as pages"
        if int(ops[5][0]) == 0:  # nothing live: the reference cannot concatenate no request
            res = jnp.zeros((0, *ops[0].shape[1:]), ops[0].dtype)
        else:
            res = ref_ragged_paged_attention(*ops, **kwargs)
        res = jnp.pad(res, [(0, q.shape[-3] - res.shape[0]), (0, 0), (0, 0)])
        dev = np.asarray(pallas_output(res, tok_ok, DIM, jnp.float32), np.float64)
        target = out[g] if g is not None else out
        target[:, i * heads_per_dev : (i + 1) * heads_per_dev] = dev
    return out


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"{x[0]}-H{x[1]}-Hq{x[2]}")
@pytest.mark.parametrize(("window", "soft_cap"), [(None, None), (5, 3.0)])
def test_pallas_operands_through_reference_kernel(layout, window, soft_cap):
    mesh_shape, kv_heads, q_heads, page_axis = layout
    case = new_case(mesh_shape, kv_heads, page_axis=page_axis, seed=1, kv_layout="interleaved")
    run_step(case, [[(0, 9), (1, 3)]] * case.cache.dp, layer=0)
    step = run_step(case, [[(0, 1), (1, 6), (2, 5)]] * case.cache.dp, layer=0)
    # NaN/inf in every slot outside the requests' [0, kv_len): past kv_len in last pages,
    # free pages, the null page (before the window, inside kv_len: the xfail below).
    poison_unseen(case, visible_slots(case, None), layer=0)
    q = queries(case, q_heads)
    kw = {"sm_scale": 0.3, "sliding_window": window, "soft_cap": soft_cap}
    got = pallas_via_reference(case, q, step, 0, **kw)
    np.testing.assert_allclose(got, oracle(case, q, **kw), atol=2e-5)


# --------------------------------------------------------------------------------------------
# Sliding windows read no page before the window
# --------------------------------------------------------------------------------------------


def test_sliding_window_never_reads_pages_before_the_window():
    case = new_case((1, 8), 2)
    run_step(case, [[(0, 14)]])  # positions 0..13: pages 0..3 of the request
    step = run_step(case, [[(0, 1)]])  # position 14 attends (14 - 6, 14] = pages 2, 3
    # Poison the request's first two pages (slots hold NaN): reading them would give NaN.
    pages = case.allocs[0].pages(0)[:2]
    slots = (pages[:, None] * PAGE + np.arange(PAGE)).reshape(-1)
    nan = np.full((16, 2, DIM), np.nan, np.float32)
    poison = np.stack([slots, np.arange(len(slots)), np.ones_like(slots)]).astype(np.int32)
    poison = np.pad(poison, [(0, 0), (0, 16 - poison.shape[1])])
    case.cache = kvshard.update(case.cache, 1, nan, nan, poison, np.array([8], np.int32))
    q = queries(case, 8)
    kw = {"sm_scale": 0.125, "sliding_window": 6, "soft_cap": None}
    got = np.asarray(
        kvshard.attention(
            case.cache,
            1,
            q,
            step,
            backend="xla",
            options=kvshard.BackendOptions(keys_per_step=PAGE),
            **kw,
        )
    )
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, oracle(case, q, **kw), atol=2e-5)
    # Control: without the window the poisoned pages are read.
    kw["sliding_window"] = None
    assert np.isnan(np.asarray(kvshard.attention(case.cache, 1, q, step, **kw))[0]).all()


# --------------------------------------------------------------------------------------------
# Prefill: temporaries independent of the prompt length (issue 20)
# --------------------------------------------------------------------------------------------


def prefill_temp_bytes(prompt: int) -> int:
    """Compiled temporaries per device of one prompt's prefill attention (caller's jit,
    lowered on an abstract cache: nothing allocated). 8 KV heads on a 1x8 mesh, D = 128."""
    mesh = make_mesh((1, 8))
    spec = kvshard.CacheSpec(
        num_layers=1,
        num_kv_heads=8,
        head_dim=128,
        page_size=16,
        num_pages=prompt // 16 + 1,
        dtype="float32",
    )
    alloc = kvshard.PageAllocator(
        spec.num_pages, 16, max_requests=1, max_pages_per_request=prompt // 16
    )
    alloc.allocate("a", prompt)
    step = kvshard.build_step(alloc, ["a"], [prompt])
    q = jax.ShapeDtypeStruct(
        (prompt, 32, 128), jnp.float32, sharding=jax.NamedSharding(mesh, P(None, "model", None))
    )
    read = jax.jit(lambda c, q, s: kvshard.attention(c, 0, q, s, sm_scale=0.1))
    compiled = read.lower(kvshard.abstract_cache(spec, mesh), q, step).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def test_prefill_temporaries_do_not_grow_with_the_prompt():
    short, long = prefill_temp_bytes(512), prefill_temp_bytes(8192)
    # One query block's scores (256 x 4 heads x 512 keys, float32) and a key block: 2-3 MiB,
    # where one gathered key page per query token and loop step grew with the prompt.
    assert long <= short + 2**16, (short, long)
    assert long < 16 * 2**20, long


# --------------------------------------------------------------------------------------------
# A slot no query may see never reaches the output, whatever it holds (issue 19)
# --------------------------------------------------------------------------------------------


def visible_slots(case: Case, window) -> list[set[int]]:
    """Per pool: the pool-local slots some query of the last step may see."""
    out = []
    for g, batch in enumerate(case.steps):
        seen: set[int] = set()
        for r, c in batch:
            n = len(case.history[g][r][0])
            first = 0 if window is None else max(0, n - c - window + 1)
            pages = case.allocs[g].pages(r)
            seen.update(int(pages[p // PAGE]) * PAGE + p % PAGE for p in range(first, n))
        out.append(seen)
    return out


def poison_unseen(case: Case, visible: list[set[int]], layer=1) -> None:
    """Writes NaN, inf or -inf into K and V of every other slot of ``layer`` in every pool:
    past kv_len in last pages, before windows, other requests' and free pages, the null page."""
    spec, pool = case.cache.spec, PAGES * PAGE
    slices, nums, ks, vs = [], [], [], []
    for seen in visible:
        dirty = np.array([s for s in range(pool) if s not in seen], np.int32)
        rows = np.zeros((3, pool), np.int32)
        rows[:, : len(dirty)] = [dirty, np.arange(len(dirty)), np.ones(len(dirty))]
        slices.append(rows)
        nums.append([len(dirty)])
        for out in (ks, vs):
            bad = case.rng.choice([np.nan, np.inf, -np.inf], (pool, spec.num_kv_heads, DIM))
            out.append(bad.astype(np.float32))
    if case.pooled:
        args = (np.stack(ks), np.stack(vs), np.stack(slices), np.array(nums, np.int32))
    else:
        args = (ks[0], vs[0], slices[0], np.array(nums[0], np.int32))
    case.cache = kvshard.update(case.cache, layer, *args)


@pytest.mark.xfail(
    strict=True,
    reason="JAX's ref_ragged_paged_attention, like its TPU kernel (next test), zeroes K/V only "
    "past kv_len: a NaN before a sliding window, inside kv_len, reaches its softmax (kvshard's "
    "kernel, the pallas default, masks it: test_kernel_attention.py "
    "test_nan_before_the_window_cannot_reach_the_output)",
)
def test_pallas_operands_with_nan_before_the_window_through_reference():
    case = new_case((1, 8), 2, kv_layout="interleaved")
    run_step(case, [[(0, 14)]])
    step = run_step(case, [[(0, 1)]])  # position 14 sees (8, 14]: positions 0..8 hold NaN
    poison_unseen(case, visible_slots(case, 6))
    q = queries(case, 8)
    kw = {"sm_scale": 0.125, "sliding_window": 6, "soft_cap": None}
    got = pallas_via_reference(case, q, step, 1, **kw)
    np.testing.assert_allclose(got, oracle(case, q, **kw), atol=2e-5)


def test_jax_kernel_zeroes_kv_past_kv_len_before_its_matmuls():
    """JAX's TPU kernel cannot run here: its source is the evidence. It zeroes K and V of
    every slot at or past kv_len (NaN included) before both matmuls; the causal and window
    masks are added to the scores only, so inside kv_len it relies on finite values."""
    src = inspect.getsource(jax_rpa)
    mask = re.search(
        r"kv_mask = \(\s*lax\.broadcasted_iota\(jnp\.int32, k\.shape, 0\) "
        r"< kv_len - kv_len_start\s*\)",
        src,
    )
    assert mask, "JAX's kernel no longer builds kv_mask from kv_len: re-read it"
    tail = src[mask.end() :]
    assert re.match(
        r"\s*k = jnp\.where\(kv_mask, k\.astype\(jnp\.float32\), 0\)\.astype\(k\.dtype\)"
        r"\s*v = jnp\.where\(kv_mask, v\.astype\(jnp\.float32\), 0\)\.astype\(v\.dtype\)",
        tail,
    )
    assert "qk += jnp.where(causal_mask, mask_value, 0.0)" in tail


# --------------------------------------------------------------------------------------------
# jit, scan, one executable, drops
# --------------------------------------------------------------------------------------------


def test_one_executable_for_every_layer_and_step_of_a_bucket():
    case = new_case((1, 8), 2)
    run_step(case, [[(0, 5)]])
    step = run_step(case, [[(0, 2), (1, 3)]])
    q = queries(case, 8)
    with compile_log() as log:
        for layer in (0, 1, np.int32(1), jnp.int32(0)):
            kvshard.attention(case.cache, layer, q, step, sm_scale=0.1)
        step2 = run_step(case, [[(0, 1), (1, 1), (2, 4)]])
        kvshard.attention(case.cache, 1, q, step2, sm_scale=0.1)
    # The attention executable (`_read`) compiles once for every layer and step of the bucket.
    assert log.count("_read") == 1, log.messages


def test_attention_under_jit_and_scan_with_traced_layer():
    case = new_case((1, 8), 2)
    run_step(case, [[(0, 5), (1, 2)]], layer=0)
    run_step(case, [[(0, 5), (1, 2)]], layer=1)
    step = run_step(case, [[(0, 1), (1, 1)]], layer=1)
    q = queries(case, 8)

    @jax.jit
    def all_layers(cache, q, step):
        def body(carry, layer):
            return carry, kvshard.attention(cache, layer, q, step, sm_scale=0.1)

        return jax.lax.scan(body, 0, jnp.arange(2))[1]

    out = np.asarray(all_layers(case.cache, q, step))
    for layer in (0, 1):
        want = kvshard.attention(case.cache, layer, q, step, sm_scale=0.1)
        np.testing.assert_allclose(out[layer], np.asarray(want), atol=1e-6)


@pytest.mark.parametrize("kv_layout", ["interleaved", "packed"])
def test_traced_bad_metadata_is_dropped_identically_on_both_backends(kv_layout):
    case = new_case((1, 8), 2, kv_layout=kv_layout)
    run_step(case, [[(0, 6), (1, 5), (2, 3)]])
    step = run_step(case, [[(0, 3), (1, 2), (2, 1)]])
    q = queries(case, 8)
    kw = {"sm_scale": 0.2, "sliding_window": None, "soft_cap": None}
    good = oracle(case, q, **kw)
    bad_page = np.array(step.page_indices)
    bad_page[1, 1] = PAGES + 3  # request 1 reads page 1 of its row: out of the pool
    broken = dataclasses.replace(step, page_indices=bad_page)
    run = jax.jit(lambda q, c, layer, s: kvshard.attention(c, layer, q, s, backend="xla", **kw))
    got = np.asarray(run(q, case.cache, jnp.int32(1), broken))
    # Request 0 (a prefill) is served; request 1 (bad, a prefill) and request 2 (a decode
    # after it) are dropped.
    np.testing.assert_allclose(got[:3], good[:3], atol=2e-5)
    assert not got[3:].any()
    pallas = kv_layout == "interleaved"  # JAX's kernel reads interleaved rows only
    if pallas:
        via_ref = pallas_via_reference(case, q, broken, 1, **kw)
        np.testing.assert_array_equal(via_ref[3:], 0)
        np.testing.assert_allclose(via_ref[:3], good[:3], atol=2e-5)
    for layer in (-1, 2, 2**31 - 1):
        out = run(q, case.cache, jnp.int32(layer), step)
        assert not np.asarray(out).any(), f"layer {layer} must read nothing"
        assert not pallas or not pallas_via_reference(case, q, step, layer, **kw).any()


# --------------------------------------------------------------------------------------------
# Attention sinks (issue 21)
# --------------------------------------------------------------------------------------------


def test_traced_sinks_match_the_oracle_and_minus_inf_is_no_sink():
    case = new_case((2, 4), 4, page_axis=True)
    run_step(case, [[(0, 7)], [(0, 2), (1, 5)]])
    step = run_step(case, [[(0, 5), (1, 1)], [(0, 1), (1, 4)]])
    q = queries(case, 16)
    kw = {"sm_scale": DIM**-0.5, "sliding_window": 5, "soft_cap": None}
    sinks = np.linspace(-3.0, 3.0, 16, dtype=np.float32)
    # Traced sinks and metadata, with checks=True (its report operands follow the sinks').
    traced = jax.jit(
        lambda s, st: kvshard.attention(case.cache, 1, q, st, sinks=s, checks=True, **kw)
    )
    run = lambda s: traced(s, step)
    got = np.asarray(run(jnp.asarray(sinks)))
    np.testing.assert_allclose(got, oracle(case, q, sinks=sinks, **kw), atol=2e-5)
    none = np.asarray(kvshard.attention(case.cache, 1, q, step, **kw))
    assert np.abs(got - none).max() > 1e-2  # the sinks took weight
    off = np.asarray(run(jnp.full(16, -jnp.inf)))
    np.testing.assert_array_equal(off.view(np.uint32), none.view(np.uint32))


def test_sinks_are_refused_on_jax_kernel_and_checked_before_anything_runs():
    case = new_case((1, 8), 2, kv_layout="interleaved")  # the layout pallas reads
    step = run_step(case, [[(0, 3)]])
    q = queries(case, 8)
    attend = lambda sinks, **kw: kvshard.attention(
        case.cache, 0, q, step, sm_scale=0.1, sinks=sinks, **kw
    )
    with compile_log() as log:
        with pytest.raises(
            NotImplementedError,
            match=r"backend='pallas'.*ragged_paged_attention has no attention sinks.*'xla'",
        ):
            attend(np.zeros(8, np.float32), backend="pallas", options=JAX_KERNEL)
        with pytest.raises(ValueError, match=r"sinks must have shape .*\[8\], got \[16\]"):
            attend(np.zeros(16, np.float32))
        with pytest.raises(ValueError, match=r"sinks must have shape"):
            attend(np.zeros((1, 8), np.float32))
        with pytest.raises(TypeError, match=r"sinks must be a floating array, got int32"):
            attend(np.zeros(8, np.int32))
        for bad in (np.nan, np.inf):
            sinks = np.zeros(8, np.float32)
            sinks[3] = bad
            with pytest.raises(ValueError, match=rf"sinks\[3\]={bad} must be finite or -inf"):
                attend(sinks)
    assert log.count("_read") == 0, log.messages


# --------------------------------------------------------------------------------------------
# The packed layout (issue 21): K|V of a head in one row; the xla backend reads it
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_layout", ["interleaved", "packed"])
@pytest.mark.parametrize("head_dim", [32, 64])
def test_small_head_dims_match_the_oracle_in_both_layouts(head_dim, kv_layout):
    """head_dim 32 packs K and V into 64 of a row's 128 lanes, 64 into all of them."""
    case = new_case((2, 4), 4, page_axis=True, kv_layout=kv_layout, head_dim=head_dim)
    assert case.cache.kv.shape[-2:] == ((4, 128) if kv_layout == "packed" else (8, 128))
    run_step(case, [[(0, 7), (1, 2)], [(0, 5)]])
    step = run_step(case, [[(0, 4), (1, 1)], [(0, 1), (1, 3)]])
    q = queries(case, 16)
    kw = {"sm_scale": head_dim**-0.5, "sliding_window": 6, "soft_cap": 3.0}
    got = kvshard.attention(case.cache, 1, q, step, **kw)
    np.testing.assert_allclose(np.asarray(got, np.float64), oracle(case, q, **kw), atol=2e-5)


def test_jax_kernel_refuses_a_packed_cache_naming_the_fallback_and_auto_picks_xla():
    case = new_case((1, 8), 2)
    assert case.cache.spec.kv_layout == "packed"  # the default at head_dim 64
    step = run_step(case, [[(0, 3)]])
    q = queries(case, 8)
    message = r"backend='pallas' cannot read a kv_layout='packed' cache.*kv_layout='interleaved'"
    with compile_log() as log, pytest.raises(NotImplementedError, match=message):
        kvshard.attention(
            case.cache, 0, q, step, sm_scale=0.1, backend="pallas", options=JAX_KERNEL
        )
    assert log.count("_read") == 0, log.messages
    fields = [jnp.asarray(getattr(step, f)) for f in ("page_indices", "kv_lens", "cu_q_lens")]
    with pytest.raises(NotImplementedError, match=message):  # the kernel's operands too
        pallas_operands(
            case.cache.kv.addressable_shards[0].data,
            jnp.int32(0),
            jnp.asarray(q[:, :1]),
            *fields,
            jnp.asarray(step.num_seqs),
            statics=Statics(case.cache.spec, 0.1, None, None),
        )

    # "auto" on a TPU mesh: kvshard's kernel reads both layouts; with JAX's kernel pallas for
    # an interleaved cache, xla for a packed one.
    class Tpu:
        platform = "tpu"

    def on_tpu(spec):
        return types.SimpleNamespace(spec=spec, mesh=types.SimpleNamespace(devices=np.array([Tpu])))

    packed = case.cache.spec
    interleaved = dataclasses.replace(packed, kv_layout="interleaved")
    assert resolve_attention_backend(on_tpu(packed), "auto") == "pallas"
    assert resolve_attention_backend(on_tpu(interleaved), "auto") == "pallas"
    assert resolve_attention_backend(on_tpu(packed), "auto", JAX_KERNEL) == "xla"
    assert resolve_attention_backend(on_tpu(interleaved), "auto", JAX_KERNEL) == "pallas"
    with pytest.raises(NotImplementedError, match=message):
        resolve_attention_backend(on_tpu(packed), "pallas", JAX_KERNEL)


def test_packed_xla_attention_exports_for_tpu():
    """The packed layout's xla read lowers for TPU too: a gather of the pages' [H, 128] rows
    and lane slices, nothing copying the cache (the update beside it: the Pallas kernel)."""
    mesh = make_mesh((1, 8))
    spec = kvshard.CacheSpec(
        num_layers=3, num_kv_heads=8, head_dim=64, page_size=16, num_pages=64, dtype="bfloat16"
    )
    assert spec.kv_layout == "packed"
    exported, _ = export_update_attention_scan(spec, mesh, (16, 64), (8, 64))
    text = exported.mlir_module()
    assert "ragged_paged_attention" not in text and "tpu_custom_call" in text  # the update
    assert "tf.aliasing_output = 0" in text
    # Per device the block is [3, 1024, 1, 128]: K|V of one head in one 128-lane row.
    block = "tensor<3x1024x1x128xbf16>"
    assert block in text
    ops = ops_writing(text, block)
    allowed = ("stablehlo.reshape", "stablehlo.custom_call", "stablehlo.while", "func.call")
    assert ops and all(op.startswith(allowed) for op in ops), ops


# --------------------------------------------------------------------------------------------
# Host-side errors
# --------------------------------------------------------------------------------------------


def test_bad_arguments_raise_naming_the_field():
    case = new_case((1, 8), 2)
    step = run_step(case, [[(0, 3)]])
    q = queries(case, 8)
    attend = lambda **kw: kvshard.attention(
        case.cache, kw.pop("layer", 0), kw.pop("q", q), kw.pop("step", step), sm_scale=0.1, **kw
    )
    with pytest.raises(ValueError, match=r"q has 6 query heads"):
        attend(q=q[:, :6])
    with pytest.raises(ValueError, match=r"q must have shape"):
        attend(q=q[..., :32])
    with pytest.raises(ValueError, match=r"layer=2 is out of range \[0, 2\)"):
        attend(layer=2)
    with pytest.raises(ValueError, match=r"sliding_window=0"):
        attend(sliding_window=0)
    with pytest.raises(ValueError, match=r"soft_cap=0"):
        attend(soft_cap=0.0)
    with pytest.raises(TypeError, match=r"StepMetadata"):
        attend(step=(step.page_indices,))
    bad = np.array(step.page_indices)
    bad[0, 0] = -3
    with pytest.raises(ValueError, match=r"page_indices\[0, 0\]=-3 is out of range \[0, 24\)"):
        attend(step=dataclasses.replace(step, page_indices=bad))
    lens = np.array(step.kv_lens)
    lens[0] = WIDTH * PAGE + 1
    with pytest.raises(ValueError, match=r"kv_lens\[0\]=25 must lie in \[3, 24\]"):
        attend(step=dataclasses.replace(step, kv_lens=lens))
    with pytest.raises(ValueError, match=r"num_seqs=5 is out of range \[0, 4\]"):
        attend(step=dataclasses.replace(step, num_seqs=np.array([5])))
    cu = np.array(step.cu_q_lens)
    cu[1] = 17
    with pytest.raises(ValueError, match=r"cu_q_lens\[0:2\]=\[0, 17\]"):
        attend(step=dataclasses.replace(step, cu_q_lens=cu))


def test_build_step_layout_and_errors():
    alloc = kvshard.PageAllocator(16, 4, max_requests=4, max_pages_per_request=4)
    alloc.allocate("a", 6)
    alloc.allocate_batch(["a", "b"], [2, 5])
    step = kvshard.build_step(alloc, ["a", "b"], [2, 5])
    assert step.num_tokens_padded == 16 and step.max_num_seqs == 8
    np.testing.assert_array_equal(step.kv_lens[:3], [8, 5, 0])
    np.testing.assert_array_equal(step.cu_q_lens, [0, 2, 7, 7, 7, 7, 7, 7, 7])
    np.testing.assert_array_equal(step.positions[:8], [6, 7, 0, 1, 2, 3, 4, 0])
    np.testing.assert_array_equal(step.page_indices[:2], alloc.page_table[[0, 1]])
    assert step.num_slices[0] == 3  # a: page 1 (2 tokens); b: pages 2, 3
    assert all(x.dtype == np.int32 for x in jax.tree.leaves(step))
    with pytest.raises(ValueError, match=r"num_scheduled_tokens\[1\]=6 exceeds the 5 tokens"):
        kvshard.build_step(alloc, ["a", "b"], [2, 6])
    with pytest.raises(ValueError, match=r"num_tokens_padded=4 is below the 7 tokens"):
        kvshard.build_step(alloc, ["a", "b"], [2, 5], num_tokens_padded=4)
    with pytest.raises(ValueError, match=r"max_num_seqs=1 is below the 2 requests"):
        kvshard.build_step(alloc, ["a", "b"], [2, 5], max_num_seqs=1)
    with pytest.raises(KeyError):
        kvshard.build_step(alloc, ["zzz"], [1])
    with pytest.raises(ValueError, match=r"max_num_seqs=16 but steps\[0\].geometry.max_num_seqs=8"):
        kvshard.stack_steps([step, kvshard.build_step(alloc, ["a"], [1], max_num_seqs=16)])


# --------------------------------------------------------------------------------------------
# TPU lowering of a whole sharded step, and no copy of the cache
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["jax", "kvshard"])
def test_sharded_step_exports_for_tpu_without_copying_the_cache(monkeypatch, kernel):
    # JAX's kernel asks Mosaic for the TPU generation while lowering (lax.sign's rule), which
    # reads the default device's kind: on this CPU host, say it is a v6e (private JAX API,
    # test only; on a TPU host the real generation is used).
    from jax._src.pallas.mosaic import tpu_info

    monkeypatch.setitem(
        tpu_info.registry,
        "cpu",
        lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V6E, 1),
    )
    mesh = make_mesh((1, 8))
    spec = kvshard.CacheSpec(
        num_layers=3, num_kv_heads=8, head_dim=128, page_size=16, num_pages=64, dtype="bfloat16"
    )
    # The cache a TPU holds: native bf16 (this CPU mesh's own would store bf16 bits).
    cache = kvshard.abstract_cache(spec, mesh, platform="tpu")
    alloc = kvshard.PageAllocator(64, 16, max_requests=8, max_pages_per_request=8)
    alloc.allocate_batch([0, 1], [20, 3])
    step = kvshard.build_step(alloc, [0, 1], [20, 3], num_tokens_padded=32)
    tokens = step.num_tokens_padded

    def serve(cache, q, k, v, step):
        def layer(cache, i):
            cache = kvshard.update(
                cache,
                i,
                k,
                v,
                step,
                backend="pallas",
                options=kvshard.BackendOptions(interpret=False),
            )
            out = kvshard.attention(
                cache,
                i,
                q,
                step,
                sm_scale=0.1,
                backend="pallas",
                options=kvshard.BackendOptions(interpret=False, pallas_kernel=kernel),
            )
            return cache, out

        return jax.lax.scan(layer, cache, jnp.arange(spec.num_layers))

    q = jnp.zeros((tokens, 16, 128), jnp.bfloat16)
    k = jnp.zeros((tokens, 8, 128), jnp.bfloat16)
    step = jax.tree.map(jnp.asarray, step)
    exported = jax.export.export(jax.jit(serve, donate_argnums=0), platforms=["tpu"])(
        cache, q, k, k, step
    )
    text = exported.mlir_module()
    assert "ragged_paged_attention" in text
    assert ("kvshard_ragged_paged_attention" in text) == (kernel == "kvshard")
    assert text.count("tpu_custom_call") >= 2  # the update kernel and the attention kernel
    # Per device the block is [3, 1024, 2, 128], its page view [192, 16, 2, 128], one layer
    # [1024, 2, 128] (or [1, 1024, 2, 128]). Only bitcast-like ops, the kernels themselves
    # (aliased in place), the scan's loop and the sharding markers may produce a value of one
    # of these shapes: no copy, slice or gather of the cache or of a layer.
    shapes = ("3x1024x2x128", "192x16x2x128", "1024x2x128", "1x1024x2x128", "3072x2x128")
    watched = [f"tensor<{shape}xbf16>" for shape in shapes]
    allowed = ("stablehlo.reshape", "stablehlo.custom_call", "stablehlo.while", "func.call")
    ops = set()
    for line in text.splitlines():
        result = line.split("->")[-1] if "->" in line else ""
        if any(w in result for w in watched):
            match = re.search(r"=\s*\"?([\w.]+)", line)
            if match:
                ops.add(match.group(1))
    assert ops, "the per-device cache shapes were not found in the module"
    assert all(op.startswith(allowed) for op in ops), ops


def test_gather_docstring_says_replicated_heads_are_all_gathered():
    assert "all-gathered" in kvshard.gather.__doc__


def test_q_sharding_spec_names_head_axis():
    case = new_case((2, 4), 4, page_axis=True)
    step = run_step(case, [[(0, 2)], [(0, 3)]])
    out = kvshard.attention(case.cache, 1, queries(case, 8), step, sm_scale=0.1)
    assert out.sharding.spec == P("data", None, "model", None)
