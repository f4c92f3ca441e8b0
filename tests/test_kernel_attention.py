"""kvshard's own Pallas TPU attention kernel (kvshard/kernels/attention.py), executed in Pallas
TPU interpret mode on CPU, against the float64 oracle (kvshard.reference.paged_attention).

Cases are built as in test_attention.py (a real PageAllocator, kvshard.update through
build_step's metadata), then read with ``backend="pallas"`` and
``BackendOptions(interpret=True)``: the kernel itself runs, per device under shard_map. Sizes
are tiny (pages of 4 slots, a few requests) because interpret mode turns every DMA into host
callbacks. The TPU lowering is proven by jax.export, and the block sizes by the budgets.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _cache_helpers import run_checked
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu
from test_attention import (
    DIM,
    PAGE,
    PAGES,
    TOL,
    make_mesh,
    new_case,
    oracle,
    poison_unseen,
    queries,
    run_step,
    visible_slots,
)

import kvshard
from kvshard.kernels import attention as kernel
from kvshard.kernels import budgets

INTERPRET = kvshard.BackendOptions(interpret=True)
# Query blocks of 2 tokens and K/V blocks of 1 page: a prefill request spans several items and
# a long row several double-buffered blocks (the defaults would fit these cases in one).
SMALL_BLOCKS = kvshard.BackendOptions(interpret=True, queries_per_block=2, kv_pages_per_block=1)


def bits(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.float32)).view(np.uint32)


# --------------------------------------------------------------------------------------------
# The oracle grid, with every unseen slot poisoned
# --------------------------------------------------------------------------------------------

# (mesh, num_kv_heads, q_heads, page_axis): GQA 2 with a head axis of 2; GQA 3 on one device;
# two page pools of one device each.
LAYOUTS = [
    ((1, 2), 2, 4, False),
    ((1, 1), 1, 3, False),
    ((2, 1), 2, 4, True),
]


@st.composite
def small_batches(draw, pools):
    """Per pool: history (prefills) then the attended step: decode, prefill or mixed."""
    out = []
    for _ in range(pools):
        n = draw(st.integers(1, 3))
        kind = draw(st.sampled_from(["decode", "prefill", "mixed"]))
        before, now = [], []
        for r in range(n):  # at most 15 history tokens and 15 queries: 16 tokens a step
            hist = draw(st.integers(1 if kind == "decode" else 0, 5))
            q = 1 if kind == "decode" or (kind == "mixed" and r % 2) else draw(st.integers(1, 5))
            if hist:
                before.append((r, hist))
            now.append((r, q))
        out.append((before, now))
    return out


@pytest.mark.parametrize(
    ("layout", "dtype"),
    [(LAYOUTS[0], "float32"), (LAYOUTS[1], "bfloat16"), (LAYOUTS[2], "int8")],
    ids=["1x2-f32", "1x1-gqa3-bf16", "2x1-pools-int8"],
)
@given(data=st.data())
@settings(max_examples=2)
def test_kernel_matches_oracle_and_unseen_slots_cannot_reach_it(layout, dtype, data):
    """Both layouts, every layer type (full, sliding, chunked), sinks, soft cap, quantized:
    the kernel equals the oracle at the xla backend's tolerances; then NaN/inf is written
    into every slot no query may see and the output is bit for bit the clean run's."""
    mesh_shape, kv_heads, q_heads, page_axis = layout
    kv_layout = data.draw(st.sampled_from(["interleaved", "packed"]))
    case = new_case(
        mesh_shape, kv_heads, dtype, page_axis=page_axis, max_requests=5, kv_layout=kv_layout
    )
    drawn = data.draw(small_batches(case.cache.dp))
    run_step(case, [[(9, data.draw(st.integers(1, 6)))]] * case.cache.dp)  # pages to poison
    if any(before for before, _ in drawn):
        run_step(case, [before or [] for before, _ in drawn])
    step = run_step(case, [now for _, now in drawn])
    layer_type = data.draw(st.sampled_from([("full",), ("sliding", 3), ("chunked", 4)]))
    soft_cap = data.draw(st.sampled_from([None, 2.0]))
    sinks = None
    if data.draw(st.booleans()):
        sinks = case.rng.uniform(-2.0, 2.0, q_heads).astype(np.float32)
    q_dtype = "float32" if dtype == "int8" else dtype
    q = np.asarray(jnp.asarray(queries(case, q_heads), q_dtype).astype(jnp.float32))
    options = data.draw(st.sampled_from([INTERPRET, SMALL_BLOCKS]))
    kw = {"sm_scale": DIM**-0.5, "soft_cap": soft_cap}

    def attend():
        return kvshard.attention(
            case.cache,
            1,
            jnp.asarray(q, q_dtype),
            step,
            backend="pallas",
            options=options,
            layer_type=layer_type,
            sinks=sinks,
            **kw,
        )

    got = attend()
    assert got.dtype == jnp.dtype(q_dtype)
    window = layer_type[1] if layer_type[0] == "sliding" else None
    chunk = layer_type[1] if layer_type[0] == "chunked" else None
    want = oracle(case, q, sinks=sinks, sliding_window=window, chunk_size=chunk, **kw)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=TOL[dtype])
    # Unseen slots: with a chunk, the first visible position of a request is its first
    # query's chunk start (visible_slots takes a window: the equivalent one).
    if chunk is not None:
        visible = chunked_visible_slots(case, chunk)
    else:
        visible = visible_slots(case, window)
    poison_unseen(case, visible)
    np.testing.assert_array_equal(bits(attend()), bits(got))


def chunked_visible_slots(case, chunk) -> list[set[int]]:
    out = []
    for g, batch in enumerate(case.steps):
        seen: set[int] = set()
        for r, c in batch:
            n = len(case.history[g][r][0])
            first = (n - c) // chunk * chunk
            pages = case.allocs[g].pages(r)
            seen.update(int(pages[p // PAGE]) * PAGE + p % PAGE for p in range(first, n))
        out.append(seen)
    return out


def test_nan_before_the_window_cannot_reach_the_output():
    """JAX's kernel lets it through (test_attention.py's strict xfail); kvshard's masks K and
    V of every slot a query may not see, so the poisoned run equals the oracle."""
    case = new_case((1, 1), 2, kv_layout="interleaved")
    run_step(case, [[(0, 14)]])
    step = run_step(case, [[(0, 1)]])  # position 14 sees (8, 14]: positions 0..8 hold NaN
    poison_unseen(case, visible_slots(case, 6))
    q = queries(case, 4)
    kw = {"sm_scale": 0.125, "sliding_window": 6, "soft_cap": None}
    got = kvshard.attention(case.cache, 1, q, step, backend="pallas", options=INTERPRET, **kw)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got), oracle(case, q, **kw), atol=2e-5)


# --------------------------------------------------------------------------------------------
# The drop rule, the kernel's own entry point, q scale, checks
# --------------------------------------------------------------------------------------------


@pytest.mark.extended  # slow: .ci/run's extended step
def test_traced_bad_metadata_is_dropped_as_on_xla():
    case = new_case((1, 1), 2, kv_layout="packed")
    run_step(case, [[(0, 6), (1, 5), (2, 3)]])
    step = run_step(case, [[(0, 3), (1, 2), (2, 1)]])
    q = queries(case, 4)
    kw = {"sm_scale": 0.2}
    good = oracle(case, q, **kw)
    bad_page = np.array(step.page_indices)
    bad_page[1, 1] = PAGES + 3  # request 1's second page: outside the pool
    broken = dataclasses.replace(step, page_indices=bad_page)

    def run(backend, layer, step):
        options = INTERPRET if backend == "pallas" else None
        fn = jax.jit(
            lambda c, layer, s: kvshard.attention(
                c, layer, q, s, backend=backend, options=options, **kw
            )
        )
        return np.asarray(fn(case.cache, jnp.int32(layer), step))

    got = run("pallas", 1, broken)
    np.testing.assert_allclose(got[:3], good[:3], atol=2e-5)  # request 0 served
    assert not got[3:].any()  # request 1 (bad) and request 2 after it dropped
    xla = run("xla", 1, broken)  # the same requests dropped on both backends
    np.testing.assert_array_equal(got == 0, xla == 0)
    np.testing.assert_allclose(got, xla, atol=2e-5)
    assert not run("pallas", 5, step).any(), "a layer out of range reads nothing"
    # checks=True reports the drop, as on xla.
    error, _ = run_checked(
        lambda c, s: kvshard.attention(
            c, 1, q, s, backend="pallas", options=INTERPRET, checks=True, **kw
        ),
        case.cache,
        broken,
    )
    assert error is not None and "request 1 (group 0) is dropped with every later one" in error


def kernel_operands(kv_layout="packed", dtype=np.float32, seed=0):
    """Operands of the kernel's own entry point: a 2-layer block of 10 pages of 4 slots."""
    rng = np.random.default_rng(seed)
    kv_heads, group, head_dim = 2, 2, 32
    combined = kv_heads * (1 if kv_layout == "packed" else 2)
    kv = rng.standard_normal((2, 40, combined, 128)).astype(dtype)
    q = rng.standard_normal((8, kv_heads * group, head_dim)).astype(np.float32)
    pages = np.array([[3, 1, 7, 0], [2, 5, 6, 8], [9, 4, 0, 0]], np.int32)
    kv_lens = np.array([7, 12, 2], np.int32)  # a decode, a 5-query prefill, a 2-query prefill
    cu_q_lens = np.array([0, 1, 6, 8], np.int32)
    args = (q, kv, np.int32(1), kv_lens, pages, cu_q_lens, np.array([3], np.int32))
    return tuple(jnp.asarray(x) for x in args)


def test_q_scale_and_kv_scales_match_the_reference_and_the_oracle():
    """An int8 cache with K/V scales and int8-valued queries with a q scale, on the kernel's
    own entry point: equal to its jnp reference and to the float64 oracle of the real values."""
    q, kv, layer, kv_lens, pages, cu_q_lens, num_seqs = kernel_operands("interleaved", np.int8)
    kv = jnp.asarray(np.clip(np.asarray(kv) * 40, -127, 127).astype(np.int8))
    q = jnp.round(q * 20)
    kw = dict(
        kv_layout="interleaved",
        page_size=4,
        sm_scale=0.1,
        k_scale=0.02,
        v_scale=0.03,
        q_scale=0.05,
        sliding_window=5,
    )
    got = kernel.ragged_paged_attention(
        q, kv, layer, kv_lens, pages, cu_q_lens, num_seqs, interpret=True, **kw
    )
    ref = kernel.ref_ragged_paged_attention(q, kv, layer, kv_lens, pages, cu_q_lens, num_seqs, **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5)
    # The oracle from dense histories of real values.
    block = np.asarray(kv[1], np.float64)  # layer 1
    keys, values = [], []
    for s, n in enumerate(np.asarray(kv_lens)):
        slots = (np.asarray(pages)[s][:, None] * 4 + np.arange(4)).reshape(-1)[:n]
        keys.append(block[slots][:, 0::2, :32] * 0.02)
        values.append(block[slots][:, 1::2, :32] * 0.03)
    want = kvshard.reference.paged_attention(
        np.asarray(q, np.float64) * 0.05, keys, values, [1, 5, 2], sm_scale=0.1, sliding_window=5
    )
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_static_and_dynamic_checks_name_the_argument():
    args = kernel_operands()
    kw = dict(kv_layout="packed", page_size=4, sm_scale=0.1, interpret=True)
    q, kv, layer, kv_lens, pages, cu_q_lens, num_seqs = args
    with pytest.raises(ValueError, match=r"q has 3 query heads, not a multiple of 2 KV heads"):
        kernel.ragged_paged_attention(q[:, :3], *args[1:], **kw)
    with pytest.raises(TypeError, match=r"kv_lens must be int32, got int64|kv_lens must be int32"):
        kernel.ragged_paged_attention(q, kv, layer, kv_lens.astype(jnp.float32), *args[4:], **kw)
    with pytest.raises(ValueError, match=r"sm_scale=-1.0 must be a finite number > 0"):
        kernel.ragged_paged_attention(*args, **{**kw, "sm_scale": -1.0})
    with pytest.raises(ValueError, match=r"sliding_window=3 and chunk_size=4"):
        kernel.ragged_paged_attention(*args, sliding_window=3, chunk_size=4, **kw)
    with pytest.raises(ValueError, match=r"head_dim=96 needs 192 lanes"):
        kernel.ragged_paged_attention(jnp.zeros((8, 4, 96)), *args[1:], **kw)
    with pytest.raises(ValueError, match=r"BlockSizes.kv_pages_per_block=0 must be an int >= 1"):
        kernel.BlockSizes(queries_per_block=2, kv_pages_per_block=0)
    with pytest.raises(ValueError, match=r"need \d+ bytes of VMEM; the budget is \d+"):
        kernel.ragged_paged_attention(
            *args, block_sizes=kernel.BlockSizes(4096, 4096), **{**kw, "interpret": False}
        )
    bad = np.asarray(pages).copy()
    bad[1, 2] = 10
    with pytest.raises(ValueError, match=r"step.page_indices\[1, 2\]=10 is out of range \[0, 10\)"):
        kernel.ragged_paged_attention(
            q, kv, layer, kv_lens, bad, cu_q_lens, num_seqs, validate=True, **kw
        )
    with pytest.raises(ValueError, match=r"layer=2 is out of range \[0, 2\)"):
        kernel.ragged_paged_attention(q, kv, jnp.int32(2), *args[3:], validate=True, **kw)


# --------------------------------------------------------------------------------------------
# Meshes of 8 devices (NPROC=16, conftest.py)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mesh_shape", "kv_heads", "q_heads", "page_axis"),
    [((1, 8), 2, 8, False), ((2, 4), 4, 8, True)],
    ids=["1x8-replicated", "2x4-pools"],
)
def test_eight_device_meshes_match_the_oracle(mesh_shape, kv_heads, q_heads, page_axis):
    case = new_case(mesh_shape, kv_heads, page_axis=page_axis, kv_layout="packed")
    run_step(case, [[(0, 5), (1, 2)]] * case.cache.dp)
    step = run_step(case, [[(0, 1), (1, 3)]] * case.cache.dp)
    q = queries(case, q_heads)
    sinks = np.linspace(-1.0, 1.0, q_heads, dtype=np.float32)
    kw = {"sm_scale": 0.3, "sliding_window": 4}
    got = kvshard.attention(
        case.cache, 1, q, step, backend="pallas", options=INTERPRET, sinks=sinks, **kw
    )
    np.testing.assert_allclose(
        np.asarray(got, np.float64), oracle(case, q, sinks=sinks, **kw), atol=2e-5
    )


# --------------------------------------------------------------------------------------------
# TPU lowering and budgets
# --------------------------------------------------------------------------------------------

# Production shapes: (head_dim, dtype, page_size, layer type, sinks).
PRODUCTION = [
    (64, "bfloat16", 16, ("sliding", 128), True),  # gpt-oss-like: packed, sinks, window
    (128, "bfloat16", 32, ("full",), False),  # Llama 3
    (128, "int8", 64, ("chunked", 256), False),  # Llama 4 chunked, quantized
    (256, "bfloat16", 16, ("sliding", 512), False),  # Gemma 2/3
    (128, "float8_e4m3fn", 128, ("full",), False),
]


@pytest.mark.parametrize(
    ("head_dim", "dtype", "page_size", "layer_type", "with_sinks"),
    PRODUCTION,
    ids=[f"d{d}-{t}-p{p}-{lt[0]}" for d, t, p, lt, _ in PRODUCTION],
)
def test_production_shapes_export_for_tpu_within_budgets(
    monkeypatch, head_dim, dtype, page_size, layer_type, with_sinks
):
    # Mosaic asks for the TPU generation while lowering some ops, from the default device's
    # kind: on this CPU host, say it is a v6e (private JAX API, test only; as
    # test_attention.py's sharded export does).
    from jax._src.pallas.mosaic import tpu_info

    monkeypatch.setitem(
        tpu_info.registry,
        "cpu",
        lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V6E, 1),
    )
    mesh = make_mesh((1, 2))
    scales = {"k_scale": 0.05, "v_scale": 0.05} if dtype in ("int8", "float8_e4m3fn") else {}
    spec = kvshard.CacheSpec(
        num_layers=2,
        num_kv_heads=8,
        head_dim=head_dim,
        page_size=page_size,
        num_pages=64,
        dtype=dtype,
        **scales,
    )
    cache = kvshard.abstract_cache(spec, mesh, platform="tpu")
    alloc = kvshard.PageAllocator(64, page_size, max_requests=8, max_pages_per_request=16)
    alloc.allocate_batch([0, 1], [40, 3])
    step = jax.tree.map(jnp.asarray, kvshard.build_step(alloc, [0, 1], [40, 3]))
    q_heads = 32
    q = jnp.zeros((step.num_tokens_padded, q_heads, head_dim), jnp.bfloat16)
    sinks = jnp.zeros((q_heads,), jnp.float32) if with_sinks else None
    options = kvshard.BackendOptions(interpret=False)

    def read(cache, q, step, sinks):
        return kvshard.attention(
            cache,
            1,
            q,
            step,
            sm_scale=head_dim**-0.5,
            layer_type=layer_type,
            sinks=sinks,
            backend="pallas",
            options=options,
        )

    exported = jax.export.export(jax.jit(read), platforms=["tpu"])(cache, q, step, sinks)
    text = exported.mlir_module()
    assert "kvshard_ragged_paged_attention" in text and "tpu_custom_call" in text
    # Per device: 4 KV heads; the default blocks of this call fit every generation's budgets.
    combined = spec.rows_per_head * 4
    blocks = budgets.default_attention_blocks(
        page_size=page_size,
        combined_heads=combined,
        padded_head_dim=spec.padded_head_dim,
        dtype=spec.np_dtype,
        q_heads=q_heads // 2,
        head_dim=head_dim,
        pages_per_seq=step.page_indices.shape[1],
        num_tokens=q.shape[0],
        q_dtype=q.dtype,
    )
    need = budgets.attention_vmem_bytes(
        blocks.queries_per_block,
        blocks.kv_pages_per_block,
        page_size=page_size,
        combined_heads=combined,
        padded_head_dim=spec.padded_head_dim,
        dtype=spec.np_dtype,
        q_heads=q_heads // 2,
        head_dim=head_dim,
        q_dtype=q.dtype,
    )
    smem = budgets.attention_smem_bytes(
        *step.page_indices.shape, q.shape[0], blocks.queries_per_block
    )
    for generation in budgets.SCOPED_VMEM_BYTES:
        assert need <= budgets.attention_vmem_budget_bytes(generation), (generation, need)
        assert smem <= budgets.scalar_prefetch_budget_bytes(generation)


def test_vmem_constants_match_jax_tpu_table():
    from jax._src.pallas.mosaic import tpu_info

    chips = {
        "v5e": tpu_info.ChipVersion.TPU_V5E,
        "v5p": tpu_info.ChipVersion.TPU_V5P,
        "v6e": tpu_info.ChipVersion.TPU_V6E,
    }
    for name, chip in chips.items():
        info = tpu_info.get_tpu_info_for_chip(chip, 1)
        assert budgets.VMEM_BYTES_PER_CORE[name] == info.vmem_capacity_bytes, name
        assert budgets.SCOPED_VMEM_BYTES[name] <= info.vmem_capacity_bytes, name
    assert set(budgets.SCOPED_VMEM_BYTES) == set(budgets.VMEM_BYTES_PER_CORE)


def test_default_blocks_shrink_to_the_budget_and_never_below_one():
    big = dict(
        page_size=128,
        combined_heads=16,
        padded_head_dim=256,
        dtype="float32",
        q_heads=64,
        head_dim=256,
        pages_per_seq=512,
        num_tokens=4096,
    )
    blocks = budgets.default_attention_blocks(**big)
    assert blocks.queries_per_block >= 1 and blocks.kv_pages_per_block >= 1
    need = budgets.attention_vmem_bytes(
        blocks.queries_per_block,
        blocks.kv_pages_per_block,
        q_dtype="float32",
        **{k: v for k, v in big.items() if k not in ("pages_per_seq", "num_tokens")},
    )
    assert need <= budgets.attention_vmem_budget_bytes()
    # One more page per block would not fit (the rule takes the largest power-of-two halving).
    small = budgets.default_attention_blocks(**{**big, "page_size": 4, "pages_per_seq": 6})
    assert small.kv_pages_per_block == 6 and small.queries_per_block == 16


@pytest.mark.parametrize(
    "dma_execution_mode", ["eager", pytest.param("on_wait", marks=pytest.mark.slow)]
)
def test_race_detector_finds_no_race_in_the_double_buffered_blocks(dma_execution_mode):
    """K/V blocks of one page (every item walks several double-buffered blocks, the next
    block's DMAs in flight while the current one is read), query blocks of 2 tokens."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interpreter

    args = kernel_operands("interleaved")
    params = pltpu.InterpretParams(detect_races=True, dma_execution_mode=dma_execution_mode)
    kw = dict(kv_layout="interleaved", page_size=4, sm_scale=0.2, soft_cap=3.0)
    got = kernel.ragged_paged_attention(
        *args, block_sizes=kernel.BlockSizes(2, 1), interpret=params, **kw
    )
    assert not interpreter.races.races_found
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(kernel.ref_ragged_paged_attention(*args, **kw)), atol=2e-5
    )


# --------------------------------------------------------------------------------------------
# fused_attention == update + attention
# --------------------------------------------------------------------------------------------


@pytest.mark.extended  # slow: .ci/run's extended step
@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_fused_attention_equals_update_then_attention(backend):
    """Two identical caches: one takes update + attention, the other fused_attention; the
    outputs and the caches are bit for bit equal, and the output is the oracle's."""
    options = INTERPRET if backend == "pallas" else None
    cases = [new_case((1, 2), 2, kv_layout="packed", seed=5) for _ in range(2)]
    for case in cases:
        run_step(case, [[(0, 6), (1, 2)]])
    # The step's new tokens: both cases draw the same K/V (same seed and history).
    steps = [run_step(case, [[(0, 1), (1, 3)]], layer=0) for case in cases]
    q = queries(cases[0], 4)
    kw = {"sm_scale": 0.25, "sliding_window": 5}
    rng = np.random.default_rng(9)
    k, v = (rng.standard_normal((16, 2, DIM)).astype(np.float32) for _ in range(2))
    a, b = cases
    a.cache = kvshard.update(a.cache, 1, k, v, steps[0], backend=backend, options=options)
    want = kvshard.attention(a.cache, 1, q, steps[0], backend=backend, options=options, **kw)
    got, b.cache = kvshard.fused_attention(
        b.cache, 1, q, k, v, steps[1], backend=backend, options=options, **kw
    )
    np.testing.assert_array_equal(bits(got), bits(want))
    np.testing.assert_array_equal(np.asarray(b.cache.kv), np.asarray(a.cache.kv))
    # The oracle: the step's tokens now hold k/v in layer 1 (the histories were of layer 1
    # before this step's layer-0 write, so rebuild them: last step's tokens are k/v rows).
    hist = b.history[0]
    for r, c, at in ((0, 1, 0), (1, 3, 1)):
        hk, hv = hist[r]
        hist[r] = (
            np.concatenate([hk[:-c], k[at : at + c]]),
            np.concatenate([hv[:-c], v[at : at + c]]),
        )
    np.testing.assert_allclose(np.asarray(got, np.float64), oracle(b, q, **kw), atol=2e-5)
    with pytest.raises(TypeError, match=r"step must be a kvshard.StepMetadata, got tuple"):
        kvshard.fused_attention(b.cache, 1, q, k, v, (), sm_scale=0.1)


def test_pages_before_a_query_blocks_window_are_never_fetched(monkeypatch):
    """Every page DMA the kernel starts is recorded (a host callback around the kernel's one
    page-copy helper): with a window of 3, only pages holding a key some query of the item may
    see are fetched; the requests' first pages, wholly before every window, never are."""
    fetched: list[int] = []
    page_copy = kernel._page_copy

    class Recorded:
        def __init__(self, copy, page):
            self.copy, self.page = copy, page

        def start(self):
            jax.debug.callback(lambda p: fetched.append(int(p)), self.page)
            self.copy.start()

        def wait(self):
            self.copy.wait()

    monkeypatch.setattr(
        kernel,
        "_page_copy",
        lambda hbm, page, dst, sem: Recorded(page_copy(hbm, page, dst, sem), page),
    )
    args = kernel_operands("interleaved")
    # sm_scale unique to this test: a fresh trace, so the recording helper is traced in.
    kw = dict(kv_layout="interleaved", page_size=4, sm_scale=0.1234, sliding_window=3)
    got = kernel.ragged_paged_attention(
        *args, block_sizes=kernel.BlockSizes(2, 1), interpret=True, **kw
    )
    jax.block_until_ready(got)
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(kernel.ref_ragged_paged_attention(*args, **kw)), atol=2e-5
    )
    # Layer 1 of 10 pages: ids + 10. Request 0 (decode at 6) sees positions 4..6 (page 1 of
    # its row, id 1); request 1 (queries at 7..11, items of 2) sees 5..11 (ids 5, 6);
    # request 2 (queries at 0, 1) page 0 (id 9).
    assert set(fetched) == {11, 15, 16, 19}, fetched
    assert 13 not in fetched and 12 not in fetched  # the first pages: before every window
    # Per item: request 1's items [7, 8], [9, 10], [11] fetch 2, 2 and 1 pages.
    assert sorted(fetched) == [11, 15, 15, 16, 16, 16, 19]


@pytest.mark.slow
def test_attention_kernels_benchmark_checks_and_writes_its_rows(tmp_path, capsys):
    """Off a TPU: kvshard's kernel only, in interpret mode, checked against its reference."""
    import json

    from kvshard.benchmarks import attention_kernels

    flags = ["--batch", "1", "--context", "5", "--prefill", "4", "--page-size", "4"]
    assert attention_kernels.main([*flags, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert attention_kernels.TPU_COMMAND in out
    rows = json.loads((tmp_path / "attention_kernels.json").read_text())["rows"]
    assert [(r["step"], r["kernel"]) for r in rows] == [
        ("decode", "kvshard"),
        ("prefill", "kvshard"),
    ]
    assert all(r["max_abs_err"] <= 2e-2 for r in rows)


def test_every_grid_configuration_exports_for_tpu(monkeypatch):
    """Both layouts x every layer type x bf16/int8 (fp8: the production shapes above), sinks
    and soft cap alternating: each lowers to kvshard's Mosaic kernel (the grid's own shapes:
    pages of 4, head_dim 64)."""
    from jax._src.pallas.mosaic import tpu_info

    monkeypatch.setitem(
        tpu_info.registry,
        "cpu",
        lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V6E, 1),
    )
    mesh = make_mesh((1, 2))
    alloc = kvshard.PageAllocator(PAGES, PAGE, max_requests=4, max_pages_per_request=6)
    alloc.allocate_batch([0, 1], [9, 2])
    step = jax.tree.map(jnp.asarray, kvshard.build_step(alloc, [0, 1], [9, 2]))
    q = jnp.zeros((step.num_tokens_padded, 4, DIM), jnp.bfloat16)
    options = kvshard.BackendOptions(interpret=False)
    n = 0
    for kv_layout in ("interleaved", "packed"):
        for layer_type in (("full",), ("sliding", 3), ("chunked", 4)):
            for dtype in ("bfloat16", "int8"):
                scales = {} if dtype == "bfloat16" else {"k_scale": 0.05, "v_scale": 0.05}
                spec = kvshard.CacheSpec(
                    num_layers=2,
                    num_kv_heads=2,
                    head_dim=DIM,
                    page_size=PAGE,
                    num_pages=PAGES,
                    dtype=dtype,
                    kv_layout=kv_layout,
                    **scales,
                )
                sinks = jnp.zeros(4, jnp.float32) if n % 2 else None
                cap = 2.0 if n % 3 else None
                n += 1

                def read(cache, q, step, sinks, layer_type=layer_type, cap=cap):
                    return kvshard.attention(
                        cache,
                        1,
                        q,
                        step,
                        sm_scale=0.125,
                        layer_type=layer_type,
                        soft_cap=cap,
                        sinks=sinks,
                        backend="pallas",
                        options=options,
                    )

                cache = kvshard.abstract_cache(spec, mesh, platform="tpu")
                exported = jax.export.export(jax.jit(read), platforms=["tpu"])(
                    cache, q, step, sinks
                )
                text = exported.mlir_module()
                assert text.count("kvshard_ragged_paged_attention") >= 1, (kv_layout, dtype)
    assert n == 12
