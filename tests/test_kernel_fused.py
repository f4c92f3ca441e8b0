"""fused_attention on backend="pallas": ONE kernel per layer and device that writes the step's
K/V into their pages (in place, donated) and attends, the step's tokens read from VMEM
(kvshard.kernels.attention.fused_ragged_paged_attention), run in Pallas TPU interpret mode.

Its contract is update + attention: the returned cache bit for bit and the output equal to
update(cache, layer, k, v, step) followed by attention(cache, layer, q, step, ...), on xla (the
float computation differs: the attention tests' tolerance) and on pallas (the same kernel code
reading the pages back: bit for bit). Cases are built as in test_attention.py (a real
PageAllocator, build_step's metadata), tiny (pages of 4 slots) because interpret mode turns
every DMA into host callbacks.
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
    stored,
    visible_slots,
)

import kvshard
from kvshard import reference
from kvshard.kernels import attention as kernel
from kvshard.kernels.update import kv_cache_update

INTERPRET = kvshard.BackendOptions(interpret=True)
# Query blocks of 2 tokens and K/V blocks of 1 page: prefills span several items, rows several
# double-buffered blocks, and a page holding new tokens is read by several items.
SMALL = kvshard.BackendOptions(interpret=True, queries_per_block=2, kv_pages_per_block=1)
FUSED_NAME = "kvshard_fused_paged_attention"


def bits(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.float32)).view(np.uint32)


def attended_step(case, batches, *, tokens=16, seqs=4):
    """Like test_attention.run_step, without the write: allocates each pool's batch, builds
    the step and draws its k/v (recorded in the histories, as the cache will hold them)."""
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
        offset = 0
        for r, c in batch:
            hk, hv = case.history[g].get(r, (np.zeros((0, *shape[1:])),) * 2)
            seg = slice(offset, offset + c)
            case.history[g][r] = (
                np.concatenate([hk, stored(k[seg], spec)]),
                np.concatenate([hv, stored(v[seg], spec)]),
            )
            offset += c
        ks.append(k)
        vs.append(v)
    case.steps = [list(b) for b in batches]
    if case.pooled:
        return kvshard.stack_steps(metas), np.stack(ks), np.stack(vs)
    return metas[0], ks[0], vs[0]


def copy_cache(cache):
    return dataclasses.replace(cache, kv=jnp.copy(cache.kv))


def composed(cache, layer, q, k, v, step, backend, options, **kw):
    cache = kvshard.update(copy_cache(cache), layer, k, v, step, backend=backend, options=options)
    return kvshard.attention(cache, layer, q, step, backend=backend, options=options, **kw), cache


# --------------------------------------------------------------------------------------------
# fused == update + attention, on xla and on pallas, over a small hypothesis grid
# --------------------------------------------------------------------------------------------

# (mesh, num_kv_heads, q_heads, page_axis): 2 heads over a head axis of 2 (GQA 2); one device
# (GQA 3); two page pools.
MESHES = [((1, 2), 2, 4, False), ((1, 1), 1, 3, False), ((2, 1), 2, 4, True)]


@st.composite
def grid(draw, pools):
    hist, now = [], []
    for _ in range(pools):
        n = draw(st.integers(1, 3))
        kind = draw(st.sampled_from(["decode", "prefill", "mixed"]))
        hist.append([(r, draw(st.integers(1, 5))) for r in range(n)])
        now.append(
            [
                (
                    r,
                    1
                    if kind == "decode" or (kind == "mixed" and r % 2)
                    else draw(st.integers(1, 5)),
                )
                for r in range(n)
            ]
        )
    return hist, now, draw(st.integers(0, 2**16))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("layout", "dtype", "window", "mesh"),
    [("interleaved", "int8", 3, MESHES[2]), ("packed", "float32", None, MESHES[1])],
    ids=["interleaved-int8-window-2pools", "packed-float32-gqa3"],
)
@settings(max_examples=1, deadline=None)
@given(data=st.data())
def test_fused_equals_update_then_attention_on_xla(layout, dtype, window, mesh, data):
    """Each example compiles its own interpret-mode kernel (~10 s on 2 cores): one example
    per (layout, dtype, window, mesh), batches drawn; the head axis of 2 (MESHES[0]) is the
    other tests' mesh. Bit for bit equality with update + attention on pallas: below."""
    mesh, heads, q_heads, pooled = mesh
    hist, now, seed = data.draw(grid(2 if pooled else 1))
    case = new_case(mesh, heads, dtype, page_axis=pooled, kv_layout=layout, seed=seed)
    run_step(case, hist)
    step, k, v = attended_step(case, now)
    q = queries(case, q_heads)
    kw = {"sm_scale": 0.3, "sliding_window": window}
    want, want_cache = composed(case.cache, 1, q, k, v, step, "xla", None, **kw)
    got, cache = kvshard.fused_attention(
        copy_cache(case.cache), 1, q, k, v, step, backend="pallas", options=SMALL, **kw
    )
    np.testing.assert_array_equal(np.asarray(cache.kv), np.asarray(want_cache.kv))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL[dtype])
    # And the float64 oracle of the histories (this step's tokens included).
    np.testing.assert_allclose(np.asarray(got, np.float64), oracle(case, q, **kw), atol=TOL[dtype])


def small_case(kv_layout="packed", dtype="float32", mesh=(1, 2), seed=3):
    case = new_case(mesh, 2, dtype, kv_layout=kv_layout, seed=seed)
    run_step(case, [[(0, 6), (1, 2), (2, 3)]])
    step, k, v = attended_step(case, [[(0, 1), (1, 5), (2, 1)]])
    return case, step, k, v, queries(case, 4)


@pytest.mark.extended  # slow: .ci/run's extended step
@pytest.mark.slow
def test_fused_is_one_kernel_that_writes_in_place_and_the_input_cache_is_donated():
    case, step, k, v, q = small_case()
    kw = {"sm_scale": 0.25}
    want, want_cache = composed(case.cache, 1, q, k, v, step, "pallas", INTERPRET, **kw)
    given_cache = copy_cache(case.cache)
    got, cache = kvshard.fused_attention(
        given_cache, 1, q, k, v, step, backend="pallas", options=INTERPRET, **kw
    )
    assert given_cache.kv.is_deleted(), "fused_attention donates the cache, as update does"
    np.testing.assert_array_equal(np.asarray(cache.kv), np.asarray(want_cache.kv))
    np.testing.assert_array_equal(bits(got), bits(want))

    def run(cache, q, k, v, step):
        return kvshard.fused_attention(
            cache, 1, q, k, v, step, backend="pallas", options=INTERPRET, **kw
        )

    fresh = copy_cache(cache)
    lowered = jax.jit(run, donate_argnums=0).lower(fresh, q, k, v, step)
    # In place: the compiled executable aliases the whole cache to its output (that it is
    # one kernel is checked on the TPU lowering below; interpret mode lowers to callbacks).
    compiled = lowered.compile()
    analysis = compiled.memory_analysis()
    per_device = cache.kv.addressable_shards[0].data.nbytes
    assert per_device == cache.kv.nbytes // 2  # two devices, a head each
    assert analysis.alias_size_in_bytes >= per_device, analysis


@pytest.mark.slow
def test_poisoned_unseen_and_overwritten_slots_do_not_change_the_output():
    """Every slot no query sees holds NaN/inf, and so does every slot this step writes (its
    old value): the fused kernel reads the step's tokens from the new rows, never the stale
    page, so the output is bit for bit the clean run's."""
    kw = {"sm_scale": 0.25, "sliding_window": 3}
    outs, caches = [], []
    for poison in (False, True):
        case, step, k, v, q = small_case(kv_layout="interleaved", seed=7)
        if poison:
            seen = visible_slots(case, 3)[0]
            new = set()
            for r, c in case.steps[0]:
                n = len(case.history[0][r][0])
                pages = case.allocs[0].pages(r)
                new.update(int(pages[p // PAGE]) * PAGE + p % PAGE for p in range(n - c, n))
            # The step's own slots are seen but about to be written: poison them too.
            poison_unseen(case, [seen - new])
        got, cache = kvshard.fused_attention(
            case.cache, 1, q, k, v, step, backend="pallas", options=SMALL, **kw
        )
        outs.append(bits(got))
        caches.append(cache)
    assert np.isfinite(np.asarray(jax.lax.bitcast_convert_type(outs[1], jnp.float32))).all()
    np.testing.assert_array_equal(outs[1], outs[0])


# --------------------------------------------------------------------------------------------
# The drop rule and checks=True
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.extended
def test_bad_slices_and_requests_inside_jit_are_dropped_as_update_and_attention_drop_them():
    case, step, k, v, q = small_case(kv_layout="interleaved", seed=11)
    kw = {"sm_scale": 0.25}
    slices = np.array(step.slices)
    slices[2, 0] = PAGE + 1  # request 0's slice: longer than a page -> written nowhere
    bad_pages = np.array(step.page_indices)
    bad_pages[2, 0] = PAGES + 5  # request 2 reads a page outside the pool -> dropped
    broken = dataclasses.replace(step, slices=slices, page_indices=bad_pages)

    def fused(cache, q, k, v, step, layer):
        return kvshard.fused_attention(
            cache, layer, q, k, v, step, backend="pallas", options=SMALL, **kw
        )

    def xla(cache, q, k, v, step, layer):
        cache = kvshard.update(cache, layer, k, v, step, backend="xla")
        return kvshard.attention(cache, layer, q, step, backend="xla", **kw), cache

    for layer in (1, -1):
        want, want_cache = jax.jit(xla)(copy_cache(case.cache), q, k, v, broken, jnp.int32(layer))
        got, cache = jax.jit(fused)(copy_cache(case.cache), q, k, v, broken, jnp.int32(layer))
        np.testing.assert_array_equal(np.asarray(cache.kv), np.asarray(want_cache.kv))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL["float32"])
    # The dropped slice's slot kept its old value, and request 2 read nothing.
    assert not np.asarray(got).any()  # layer -1: nothing read
    want, _ = jax.jit(xla)(copy_cache(case.cache), q, k, v, broken, jnp.int32(1))
    assert not np.asarray(want)[7:].any() and np.asarray(want)[:7].any()

    def checked(cache, q, k, v, step, layer):
        return kvshard.fused_attention(
            cache, layer, q, k, v, step, backend="pallas", options=SMALL, checks=True, **kw
        )

    def checked_update(cache, q, k, v, step, layer):
        return kvshard.update(
            cache, layer, k, v, step, backend="pallas", options=SMALL, checks=True
        )

    only_slice = dataclasses.replace(step, slices=slices)
    err, _ = run_checked(checked, copy_cache(case.cache), q, k, v, only_slice, jnp.int32(1))
    want_err, _ = run_checked(checked_update, copy_cache(case.cache), q, k, v, only_slice, 1)
    assert want_err is not None and err is not None
    assert want_err.splitlines()[0].split("ValueError:")[-1].strip() in err

    def checked_attention(cache, q, k, v, step, layer):
        return kvshard.attention(
            cache, layer, q, step, backend="pallas", options=SMALL, checks=True, **kw
        )

    only_page = dataclasses.replace(step, page_indices=bad_pages)
    err, _ = run_checked(checked, copy_cache(case.cache), q, k, v, only_page, jnp.int32(1))
    want_err, _ = run_checked(checked_attention, case.cache, q, k, v, only_page, jnp.int32(1))
    assert want_err is not None and err is not None
    assert "attention: request 2 (group 0) is dropped" in want_err
    assert want_err.splitlines()[0].split("ValueError:")[-1].strip() in err


def test_bad_arguments_raise_before_anything_is_donated():
    case, step, k, v, q = small_case()
    cache = case.cache
    with pytest.raises(ValueError, match=r"k must have shape .* got \[16, 3, 64\]"):
        kvshard.fused_attention(
            cache, 1, q, k[:, :1].repeat(3, 1), v, step, backend="pallas", sm_scale=0.1
        )
    with pytest.raises(ValueError, match=r"layer=2 is out of range"):
        kvshard.fused_attention(cache, 2, q, k, v, step, backend="pallas", sm_scale=0.1)
    with pytest.raises(ValueError, match=r"sm_scale=-1.0 must be"):
        kvshard.fused_attention(cache, 1, q, k, v, step, backend="pallas", sm_scale=-1.0)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['sm_scal'\]"):
        kvshard.fused_attention(cache, 1, q, k, v, step, backend="pallas", sm_scal=0.1)
    assert not cache.kv.is_deleted()
    # The kernel's own entry point names new_kv's shape and the expected one.
    args = kernel_operands("packed")
    with pytest.raises(ValueError, match=r"new_kv is float32\[7, 2, 128\]; expected float32\[8"):
        kernel.fused_ragged_paged_attention(
            args[0], args[1][:7], *args[2:], kv_layout="packed", page_size=4, sm_scale=0.2
        )


# --------------------------------------------------------------------------------------------
# The kernel's own entry point: update kernel + attention kernel, and the race detector
# --------------------------------------------------------------------------------------------


def kernel_operands(kv_layout, dtype=np.float32, seed=0):
    """A 2-layer block of 10 pages of 4 slots, layer 1; a decode, a 5-query prefill and a
    2-query prefill, and their slices as build_step lays them (one per request and page)."""
    rng = np.random.default_rng(seed)
    kv_heads, group, head_dim = 2, 2, 32
    combined = kv_heads * (1 if kv_layout == "packed" else 2)
    kv = rng.standard_normal((2, 40, combined, 128)).astype(dtype)
    new = rng.standard_normal((8, combined, 128)).astype(dtype)
    q = rng.standard_normal((8, kv_heads * group, head_dim)).astype(np.float32)
    pages = np.array([[3, 1, 7, 0], [2, 5, 6, 8], [9, 4, 0, 0]], np.int32)
    kv_lens = np.array([7, 12, 2], np.int32)
    cu_q_lens = np.array([0, 1, 6, 8], np.int32)
    # (slot, token, length): position 6 of request 0 (page 7), positions 7..11 of request 1
    # (pages 5 and 6), positions 0..1 of request 2 (page 9).
    slices = np.array([[30, 23, 24, 36], [0, 1, 2, 6], [1, 1, 4, 2]], np.int32)
    args = (q, new, kv, np.int32(1), kv_lens, pages, cu_q_lens, np.array([3], np.int32))
    return (*(jnp.asarray(x) for x in args), jnp.asarray(slices), jnp.asarray([4], jnp.int32))


@pytest.mark.slow
@pytest.mark.parametrize("dma_execution_mode", ["eager", "on_wait"])
def test_kernel_equals_the_update_kernel_then_the_attention_kernel_with_no_race(
    dma_execution_mode,
):
    """Interleaved rows here; the packed layout's bit identity with update + attention on
    pallas is the donation test's (the schedule the race detector checks is the same). In
    "on_wait" mode a DMA moves its bytes only when waited for (the kernel issues no
    zero-length DMA, which that mode's detector cannot wait on)."""
    kv_layout = "interleaved"
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interpreter

    q, new, kv, layer, kv_lens, pages, cu, num_seqs, slices, num = kernel_operands(kv_layout)
    kw = dict(kv_layout=kv_layout, page_size=4, sm_scale=0.2, soft_cap=3.0, sliding_window=6)
    blocks = kernel.BlockSizes(2, 1)
    rows = kv.shape[1]
    flat = kv.reshape(-1, *kv.shape[2:])
    written = kv_cache_update(
        new, slices.at[0].add(rows), flat, num, page_size=4, interpret=True
    ).reshape(kv.shape)
    want = kernel.ragged_paged_attention(
        q, written, layer, kv_lens, pages, cu, num_seqs, block_sizes=blocks, interpret=True, **kw
    )
    params = pltpu.InterpretParams(detect_races=True, dma_execution_mode=dma_execution_mode)
    got, cache = kernel.fused_ragged_paged_attention(
        q, new, kv, layer, kv_lens, pages, cu, num_seqs, slices, num,
        block_sizes=blocks, interpret=params, **kw,
    )  # fmt: skip
    assert not interpreter.races.races_found
    np.testing.assert_array_equal(np.asarray(cache), np.asarray(written))
    np.testing.assert_array_equal(bits(got), bits(want))
    # The test can fail: the written rows differ from the old ones, and the output with them.
    assert not np.array_equal(np.asarray(written), np.asarray(kv))


# --------------------------------------------------------------------------------------------
# TPU lowering
# --------------------------------------------------------------------------------------------


def test_fused_attention_exports_for_tpu_as_one_kernel(monkeypatch):
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
    t = step.num_tokens_padded
    q = jnp.zeros((t, 4, DIM), jnp.bfloat16)
    k = v = jnp.zeros((t, 2, DIM), jnp.bfloat16)
    options = kvshard.BackendOptions(interpret=False)
    n = 0
    for kv_layout in ("interleaved", "packed"):
        for dtype, layer_type in (("bfloat16", ("sliding", 3)), ("int8", ("full",))):
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

            def step_fn(cache, q, k, v, step, layer_type=layer_type):
                return kvshard.fused_attention(
                    cache, 1, q, k, v, step, sm_scale=0.125, layer_type=layer_type,
                    backend="pallas", options=options,
                )  # fmt: skip

            cache = kvshard.abstract_cache(spec, mesh, platform="tpu")
            exported = jax.export.export(jax.jit(step_fn, donate_argnums=0), platforms=["tpu"])(
                cache, q, k, v, step
            )
            text = exported.mlir_module()
            assert FUSED_NAME in text, (kv_layout, dtype)
            assert "kvshard_ragged_paged_attention" not in text
            n += 1
    assert n == 4


# --------------------------------------------------------------------------------------------
# Layer groups (hybrid models): the layer's group's slices and page table
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.extended
def test_layer_groups_write_and_read_the_layers_own_group():
    """gpt-oss-like alternating sliding / full layers (two groups, a page table each), on a
    head axis of 2: the fused kernel writes through the layer's group's slices and reads
    through its page table (with attention sinks), bit for bit update + attention on pallas;
    a traced layer of
    another type than the one read writes (as update does) and reads nothing."""
    from _groups import GPT_OSS, SCALE, SLIDING, History, grouped_spec

    spec = grouped_spec(GPT_OSS)
    cache = kvshard.init_cache(spec, make_mesh((1, 2)))
    history = History(spec, np.random.default_rng(5))
    step, k, v, _ = history.step([9, 5, 3])
    for layer in range(spec.num_layers):
        cache = kvshard.update(cache, layer, k[layer], v[layer], step, backend="xla")
    step, k, v, q = history.step([1, 2, 6])
    sinks = jnp.asarray(np.random.default_rng(6).standard_normal(q.shape[2]), jnp.float32)
    for layer in (0, 1):  # sliding (group 0), full (group 1); gpt-oss's sinks
        kw = {"sm_scale": SCALE, "sinks": sinks}
        want, want_cache = composed(
            cache, layer, q[layer], k[layer], v[layer], step, "pallas", SMALL, **kw
        )
        got, got_cache = kvshard.fused_attention(
            copy_cache(cache), layer, q[layer], k[layer], v[layer], step,
            backend="pallas", options=SMALL, **kw,
        )  # fmt: skip
        np.testing.assert_array_equal(np.asarray(got_cache.kv), np.asarray(want_cache.kv))
        np.testing.assert_array_equal(bits(got), bits(want))
        layer_type = spec.layer_types[layer]
        oracle = reference.paged_attention(
            q[layer],
            history.k[layer],
            history.v[layer],
            history.q_lens,
            sm_scale=SCALE,
            sliding_window=layer_type[1] if layer_type[0] == "sliding" else None,
            sinks=np.asarray(sinks, np.float64),
        )
        np.testing.assert_allclose(np.asarray(got)[:9], oracle[:9], atol=2e-5)  # 1 + 2 + 6
        assert not np.asarray(got)[9:].any()  # padding tokens

    def fused(cache, layer, q, k, v, step):
        return kvshard.fused_attention(
            cache, layer, q, k, v, step, backend="pallas", options=SMALL, sm_scale=SCALE,
            layer_type=SLIDING,
        )  # fmt: skip

    # Layer 1 is full: read as sliding it reads nothing, but update writes it all the same.
    got, got_cache = jax.jit(fused)(copy_cache(cache), jnp.int32(1), q[1], k[1], v[1], step)
    want_cache = kvshard.update(copy_cache(cache), 1, k[1], v[1], step, backend="xla")
    assert not np.asarray(got).any()
    np.testing.assert_array_equal(np.asarray(got_cache.kv), np.asarray(want_cache.kv))


def test_fused_blocks_fit_the_vmem_budget_with_the_new_rows_beside_each_block():
    """The fused kernel holds a second K/V block (the step's rows) and its flags: its VMEM
    is larger than the attention kernel's for the same blocks, and the default blocks for
    it are sized to fit the budget (Llama-3-like and gpt-oss-like shapes)."""
    from kvshard.kernels import budgets

    for dim, combined, padded, page in ((128, 2, 128, 32), (64, 1, 128, 16)):
        shape = dict(
            page_size=page,
            combined_heads=combined,
            padded_head_dim=padded,
            dtype="bfloat16",
            q_heads=8,
            head_dim=dim,
            q_dtype="bfloat16",
        )
        blocks = budgets.default_attention_blocks(
            **shape, pages_per_seq=512, num_tokens=2048, fused=True
        )
        need = budgets.attention_vmem_bytes(
            blocks.queries_per_block, blocks.kv_pages_per_block, **shape, fused=True
        )
        plain = budgets.attention_vmem_bytes(
            blocks.queries_per_block, blocks.kv_pages_per_block, **shape
        )
        assert plain < need <= budgets.attention_vmem_budget_bytes()
        # The extra is the second block (bfloat16 packs two rows per 32-bit sublane word: a
        # single packed row takes two) and the lane-padded int32 flags of its slots.
        keys = blocks.kv_pages_per_block * page
        extra = 2 * keys * max(combined, 2) * padded * 2 + 2 * keys * 128 * 4
        assert need - plain == extra
