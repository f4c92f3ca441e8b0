"""The update kernel's contract where a CPU can check it: metadata dtypes, host budgets, the
lowered Mosaic module's size, the race detector, and tpu-inference's invalid inputs.

Interpret-mode runs are marked ``slow`` and use tiny shapes; everything else only traces,
lowers or raises before the kernel runs.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _mosaic import op_count_table
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from test_kernel import assert_bits_equal, peer_case, run_kernel

from kvshard import BackendOptions, reference
from kvshard._device.jax_compat import interpret_params
from kvshard.kernels import budgets
from kvshard.kernels import update as kernel_module
from kvshard.kernels.budgets import (
    INFLIGHT_BUDGET_BYTES,
    SMEM_BYTES_PER_CORE,
    default_num_slices_per_block,
    max_slices_per_call,
    scalar_prefetch_budget_bytes,
)
from kvshard.kernels.update import kv_cache_update, page_bytes
from kvshard.testing import random_values

SCHEDULES = ["direct", "vmem"]
P = 8


def small_arrays(seed=0, num_tokens=12):
    """A 4-page cache (8 rows a page), 12 tokens, two live slices and one padding column."""
    rng = np.random.default_rng(seed)
    kv_cache = jnp.asarray(random_values(rng, (4 * P, 2, 128), np.float32))
    new_kv = jnp.asarray(random_values(rng, (num_tokens, 2, 128), np.float32))
    slices = np.array([[P + 1, 0, 3], [3 * P, 3, P], [0, 0, 0]], np.int32).T.copy()
    return new_kv, slices, kv_cache, np.array([2], np.int32)


# --------------------------------------------------------------------------------------------
# 1. Metadata dtypes: range-checked before the int32 cast; int32 only under jit; x64 works
# --------------------------------------------------------------------------------------------

WIDE = {
    # name: (column, row, value, message); the review's two wrap-around examples come first.
    "dst past int32 (wrapped to row 8)": (
        0,
        0,
        2**32 + 8,
        r"slices\[:, 0\]: kv_cache_start 4294967304 must be in int32 range",
    ),
    "src below int32": (1, 1, -(2**31) - 1, r"slices\[:, 1\]: new_kv_start -2147483649 must be"),
    "len past int32": (1, 2, 2**31, r"slices\[:, 1\]: slice_len 2147483648 must be in int32"),
    "padding column past int32": (2, 0, 2**40, r"slices\[:, 2\]: kv_cache_start 1099511627776"),
}


@pytest.mark.parametrize("name", sorted(WIDE))
def test_int64_slices_past_int32_raise_on_host(name):
    new_kv, slices, kv_cache, num = small_arrays()
    before = np.asarray(kv_cache).copy()
    column, row, value, message = WIDE[name]
    wide = slices.astype(np.int64)
    wide[row, column] = value
    with pytest.raises(ValueError, match=message):
        kv_cache_update(new_kv, wide, kv_cache, num, page_size=P)
    assert_bits_equal(np.asarray(kv_cache), before)


@pytest.mark.parametrize("dtype", [np.int64, np.uint64, np.uint32])
def test_count_past_int32_raises_on_host(dtype):
    """The review's ``num_kv_update_slices = 2**32 + 1`` ran 1 slice after the cast."""
    new_kv, slices, kv_cache, _ = small_arrays()
    value = 2**32 + 1 if dtype != np.uint32 else 2**31
    with pytest.raises(ValueError, match=rf"num_kv_update_slices\[0\]: {value} must be in int32"):
        kv_cache_update(new_kv, slices, kv_cache, np.array([value], dtype), page_size=P)


def test_non_integer_metadata_is_a_type_error():
    new_kv, slices, kv_cache, num = small_arrays()
    with pytest.raises(TypeError, match="slices must be an int32 array, got dtype float32"):
        kv_cache_update(new_kv, slices.astype(np.float32), kv_cache, num, page_size=P)


def test_traced_metadata_must_be_int32():
    new_kv, slices, kv_cache, num = small_arrays()
    fn = jax.jit(lambda s, n: kv_cache_update(new_kv, s, kv_cache, n, page_size=P))
    with pytest.raises(TypeError, match="slices must be int32 under jit, got traced int16"):
        fn(jnp.asarray(slices, jnp.int16), jnp.asarray(num))
    with pytest.raises(TypeError, match="num_kv_update_slices must be int32 under jit"):
        fn(jnp.asarray(slices), jnp.asarray(num, jnp.uint8))
    with jax.enable_x64(), pytest.raises(TypeError, match="got traced int64"):
        fn(jnp.asarray(slices, jnp.int64), jnp.asarray(num))


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_enable_x64_int32_and_in_range_int64(schedule):
    """With jax_enable_x64 on, int32 and in-range int64 metadata both give the oracle's cache."""
    arrays = peer_case(16, 2, 128, jnp.float32, np.random.default_rng(7))
    expected = reference.kv_cache_update(*arrays)
    new_kv, slices, kv_cache, num = arrays
    with jax.enable_x64():
        for dtype in (np.int32, np.int64):
            wide = (new_kv, slices.astype(dtype), kv_cache, num.astype(dtype))
            out = run_kernel(wide, page_size=16, num_slices_per_block=3, schedule=schedule)
            assert_bits_equal(out, expected)


# --------------------------------------------------------------------------------------------
# 2. Host budgets that jax.export cannot check
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("generation", sorted(SMEM_BYTES_PER_CORE))
def test_smem_constants_match_jax_tpu_table(generation):
    """Our per-generation SMEM numbers are JAX's public TPU hardware table's (per core)."""
    info = pltpu.get_tpu_info_for_chip(pltpu.ChipVersion(generation), 1)
    assert SMEM_BYTES_PER_CORE[generation] == info.smem_capacity_bytes
    assert scalar_prefetch_budget_bytes(generation) == info.smem_capacity_bytes // 2


def test_scalar_prefetch_budget_rules():
    budget = scalar_prefetch_budget_bytes()
    assert budget == min(SMEM_BYTES_PER_CORE.values()) // 2 == 512 * 1024
    for block in (1, 3, 8, 64):
        columns = max_slices_per_call(block, budget)
        assert columns % block == 0
        # int32[3, columns] + grid bound + row carry fit; one more block would not.
        assert 4 * (3 * columns + 2) <= budget < 4 * (3 * (columns + block) + 2)
    with pytest.raises(ValueError, match="generation='v9' must be one of"):
        scalar_prefetch_budget_bytes("v9")
    with pytest.raises(ValueError, match=r"num_slices_per_block=4 needs 56 bytes .* budget is 40"):
        max_slices_per_call(4, 40)


def _pallas_calls(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args)
    return str(jaxpr).count("pallas_call[")


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_slices_past_the_smem_budget_are_split_into_calls(monkeypatch, schedule):
    """A budget of 4 columns: 10 columns (7 live) run as 3 calls, and the cache is exact."""
    monkeypatch.setattr(budgets, "SMEM_BYTES_PER_CORE", {"tiny": 2 * 4 * (3 * 4 + 2)})
    arrays = peer_case(16, 2, 128, jnp.float32, np.random.default_rng(8))
    new_kv, slices, kv_cache, num = (jnp.asarray(a) for a in arrays)
    fn = functools.partial(
        kv_cache_update, page_size=16, num_slices_per_block=2, schedule=schedule, interpret=False
    )
    assert _pallas_calls(fn, new_kv, slices, kv_cache, num) == 3  # columns 0-3, 4-7, 8-9
    out = run_kernel(arrays, page_size=16, num_slices_per_block=2, schedule=schedule)
    assert_bits_equal(out, reference.kv_cache_update(*arrays))


def test_default_slices_fit_one_call():
    """vLLM's padded slice count at 8192 tokens (<= 8192 columns) needs a single call."""
    new_kv, _, kv_cache, num = small_arrays()
    slices = jnp.zeros((3, 8192), jnp.int32)
    fn = functools.partial(kv_cache_update, page_size=P, num_slices_per_block=64, interpret=False)
    assert _pallas_calls(fn, new_kv, slices, kv_cache, jnp.asarray(num)) == 1


GEOMETRIES = [
    # (page_size, combined_heads, head_dim, dtype)
    (16, 2, 128, jnp.bfloat16),
    (128, 16, 128, jnp.bfloat16),
    (256, 8, 128, jnp.float32),  # 1 MiB pages
    (768, 8, 128, jnp.float32),  # 3 MiB pages
    (64, 32, 256, jnp.int8),
    (2**16, 64, 512, jnp.float32),  # 8 GiB pages: one page is over budget
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"p{g[0]}-c{g[1]}-d{g[2]}")
@pytest.mark.parametrize(("schedule", "in_flight"), [("direct", 2), ("vmem", 1)])
def test_default_block_keeps_bytes_in_flight_at_16_mib(geometry, schedule, in_flight):
    """Two direct blocks (or one VMEM scratch) stay within 16 MiB; doubling would not."""
    page = page_bytes(*geometry)
    block = default_num_slices_per_block(*geometry, schedule)
    assert block >= 1 and block & (block - 1) == 0
    if block > 1:
        assert in_flight * block * page <= INFLIGHT_BUDGET_BYTES == 16 * 1024 * 1024
    assert block == 64 or in_flight * 2 * block * page > INFLIGHT_BUDGET_BYTES


def test_explicit_block_over_the_in_flight_budget_raises():
    _, slices, _, num = small_arrays()
    # 1 MiB pages: 8 direct blocks of pages in flight twice is 16 MiB (fine), 9 is not.
    big = jnp.zeros((256 * 2, 8, 128), jnp.float32)
    big_kv = jnp.zeros((4, 8, 128), jnp.float32)
    fn = functools.partial(kv_cache_update, big_kv, slices, big, num, page_size=256)
    jax.make_jaxpr(lambda: fn(num_slices_per_block=8, interpret=False))()
    with pytest.raises(ValueError, match=r"num_slices_per_block=9 puts 18874368 bytes in flight"):
        fn(num_slices_per_block=9)
    with pytest.raises(ValueError, match=r"budget is INFLIGHT_BUDGET_BYTES=16777216"):
        fn(num_slices_per_block=17, schedule="vmem")
    with pytest.raises(ValueError, match="num_slices_per_block must be >= 1, got 0"):
        fn(num_slices_per_block=0)
    huge = jax.ShapeDtypeStruct((2**16, 64, 512), jnp.float32)  # one 8 GiB page
    with pytest.raises(ValueError, match="schedule='vmem' needs a VMEM scratch of at least"):
        jax.eval_shape(
            lambda c: kv_cache_update(
                jnp.zeros((1, 64, 512)), slices, c, num, page_size=2**16, schedule="vmem"
            ),
            huge,
        )


def test_unknown_schedule():
    new_kv, slices, kv_cache, num = small_arrays()
    with pytest.raises(ValueError, match=r"schedule='dma' must be one of \('direct', 'vmem'\)"):
        kv_cache_update(new_kv, slices, kv_cache, num, page_size=P, schedule="dma")


# --------------------------------------------------------------------------------------------
# 3. The lowered Mosaic module: no bigger than the seed schedule's
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def op_counts():
    """{(name, block): ops} for the seed schedule and both of ours at 8 and 64 slices a block."""
    return op_count_table(blocks=(8, 64))


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("block", [8, 64])
def test_mosaic_ops_at_or_below_the_seed_schedule(op_counts, schedule, block):
    ours, seed = op_counts[schedule, block], op_counts["seed", block]
    # The baseline really is the seed's shape: (src, len) then (dst, len) loaded per slice.
    assert seed["memref.load"] == 4 * block
    assert ours["arith"] <= seed["arith"], (ours, seed)
    assert ours["arith.remsi"] == seed["arith.remsi"] == 0  # no guard arithmetic in the kernel
    # SMEM loads: three per slice (the seed loads four), plus the direct schedule's row carry.
    assert ours["memref.load"] == 3 * block + (2 if schedule == "direct" else 0)
    assert ours["memref.load"] <= seed["memref.load"]


def test_mosaic_dmas_waits_and_branches_per_block(op_counts):
    """Per block: direct = B DMAs, 2 waits, 2 branches (none per slice); vmem = the seed's
    2B DMAs and 2B waits, no branch."""
    for block in (8, 64):
        direct, vmem = op_counts["direct", block], op_counts["vmem", block]
        assert (direct["dma"], direct["wait"], direct["scf.if"]) == (block, 2, 2)
        assert (vmem["dma"], vmem["wait"], vmem["scf.if"]) == (2 * block, 2 * block, 0)
        seed = op_counts["seed", block]
        assert (seed["dma"], seed["wait"], seed["scf.if"]) == (2 * block, 2 * block, 0)


# --------------------------------------------------------------------------------------------
# 5. Honest race and overlap tests
# --------------------------------------------------------------------------------------------


def _bounce(wait_before_store, **params):
    """One slice through VMEM, as the vmem schedule copies it; optionally racing. ``params``:
    more InterpretParams (the race detector is on, recording races)."""

    def kernel(src_ref, _, dst_ref, scratch, sem):
        load = pltpu.make_async_copy(src_ref.at[pl.ds(0, 4)], scratch.at[0, pl.ds(0, 4)], sem)
        load.start()
        if wait_before_store:
            load.wait()
        store = pltpu.make_async_copy(scratch.at[0, pl.ds(0, 4)], dst_ref.at[pl.ds(P, 4)], sem)
        store.start()
        if not wait_before_store:
            load.wait()
        store.wait()

    return pl.pallas_call(
        kernel,
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * 2,
        out_specs=pl.BlockSpec(memory_space=pl.ANY),
        out_shape=jax.ShapeDtypeStruct((4 * P, 2, 128), jnp.float32),
        scratch_shapes=[pltpu.VMEM((1, P, 2, 128), jnp.float32), pltpu.SemaphoreType.DMA],
        input_output_aliases={1: 0},
        interpret=interpret_params(detect_races=True, dma_execution_mode="eager", **params),
    )


@pytest.mark.slow
def test_race_detector_sees_the_vmem_schedules_kind_of_race():
    """Control: storing a VMEM page before its load's wait (a DMA reading what a DMA is still
    writing, the race the vmem schedule's waits prevent) is flagged; with the wait, it is not."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interpreter

    src, cache = jnp.ones((8, 2, 128)), jnp.zeros((4 * P, 2, 128))
    _bounce(wait_before_store=False)(src, cache).block_until_ready()
    assert interpreter.races.races_found
    _bounce(wait_before_store=True)(src, cache).block_until_ready()
    assert not interpreter.races.races_found


@pytest.mark.slow
@pytest.mark.skipif(
    "on_race" not in inspect.signature(pltpu.InterpretParams).parameters,
    reason="JAX < 0.12: the race detector has no on_race option (it only records races)",
)
def test_race_detector_raises_when_asked_on_jax_versions_that_can():
    """JAX 0.12+: on_race="raise" (JAX's default there) raises at the race, which is why
    kvshard's interpret_params asks it to record instead."""
    src, cache = jnp.ones((8, 2, 128)), jnp.zeros((4 * P, 2, 128))
    with pytest.raises(RuntimeError, match="RACE DETECTED"):
        _bounce(wait_before_store=False, on_race="raise")(src, cache).block_until_ready()


@pytest.mark.slow
def test_vmem_schedule_has_no_detected_race():
    """The same detector, live for this access pattern (test above), finds none in the kernel."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interpreter

    arrays = peer_case(16, 2, 128, jnp.float32, np.random.default_rng(4))
    params = interpret_params(detect_races=True, dma_execution_mode="eager")
    out = run_kernel(
        arrays, page_size=16, num_slices_per_block=3, schedule="vmem", interpret=params
    )
    assert_bits_equal(out, reference.kv_cache_update(*arrays))
    assert not interpreter.races.races_found


def _overlap_in_different_blocks():
    """Slices 0 and 2 (blocks 0 and 1 at 2 slices a block) both write rows 9-10."""
    new_kv, _, kv_cache, _ = small_arrays()
    slices = np.array([[P + 1, 0, 2], [3 * P, 2, 4], [P + 2, 6, 2]], np.int32).T.copy()
    return new_kv, slices, kv_cache, np.array([3], np.int32)


def test_overlapping_destinations_refused_by_validate():
    new_kv, slices, kv_cache, num = _overlap_in_different_blocks()
    before = np.asarray(kv_cache).copy()
    with pytest.raises(ValueError, match=r"slices\[:, 2\]: kv_cache_start 10 overlaps the "):
        kv_cache_update(
            new_kv, slices, kv_cache, num, page_size=P, num_slices_per_block=2, validate=True
        )
    assert_bits_equal(np.asarray(kv_cache), before)


def test_overlapping_destinations_refused_by_update():
    from _cache_helpers import make_mesh, small_spec

    from kvshard.cache import init_cache, update

    spec = small_spec(1, head_dim=64, num_layers=1, num_pages=4, page_size=P)
    cache = init_cache(spec, make_mesh((1, 1)))
    k = v = np.ones((8, 1, 64), np.float32)
    _, slices, _, num = _overlap_in_different_blocks()
    for schedule in SCHEDULES:
        with pytest.raises(ValueError, match=r"slices\[:, 2\]: kv_cache_start 10 overlaps"):
            update(
                cache,
                0,
                k,
                v,
                slices,
                num,
                backend="pallas",
                options=BackendOptions(schedule=schedule),
            )
    assert not cache.kv.is_deleted()  # refused before anything was donated
    np.testing.assert_array_equal(np.asarray(cache.kv), 0)


def test_update_rejects_unknown_schedule():
    from _cache_helpers import make_mesh, small_spec

    from kvshard.cache import init_cache, update

    cache = init_cache(small_spec(1, num_layers=1), make_mesh((1, 1)))
    k = v = np.ones((2, 1, 64), np.float32)
    slices, num = np.array([[0], [0], [2]], np.int32), np.array([1], np.int32)
    with pytest.raises(ValueError, match="schedule='fast' must be one of"):
        update(
            cache, 0, k, v, slices, num, backend="pallas", options=BackendOptions(schedule="fast")
        )
    assert not cache.kv.is_deleted()


# --------------------------------------------------------------------------------------------
# tpu-inference's invalid inputs (tests/kernels/ragged_kv_cache_update_test.py,
# test_invalid_inputs), on their data and on our messages
# --------------------------------------------------------------------------------------------


def tpu_inference_case():
    """Their `_generate_data` at page 32, 2 combined heads, head_dim 128: 20 pages, 128 tokens."""
    page = 32
    lengths = np.array([7, page, page, 1, 1, 1, 9])
    starts = [2 * page - 7, 2 * page, 3 * page, 4 * page + 6, 5 * page + 7, 6 * page + 8]
    starts.append(15 * page + 3)
    src = np.concatenate([[0], np.cumsum(lengths[:-1])])
    slices = np.stack([starts, src, lengths]).astype(np.int32)
    rng = np.random.default_rng(9)
    new_kv = random_values(rng, (128, 2, 128), jnp.bfloat16)
    kv_cache = np.zeros((20 * page, 2, 128), jnp.bfloat16)
    return new_kv, slices, kv_cache, np.array([7], np.int32)


TPU_INFERENCE_INVALID = {
    # their case: (edits as (row, column, value), our message)
    "1 new_kv_start < 0": ([(1, 0, -1)], r"slices\[:, 0\]: new_kv_start -1 must be >= 0"),
    "2 kv_cache_start < 0": ([(0, 0, -1)], r"slices\[:, 0\]: kv_cache_start -1 must be >= 0"),
    "3 slice_len <= 0": ([(2, 0, 0)], r"slices\[:, 0\]: slice_len 0 must be >= 1"),
    "4 slice_len > page_size": ([(2, 0, 33)], r"slice_len 33 must be <= page_size 32"),
    "5 new_kv overrun": (
        [(1, 0, 128)],
        r"slices\[:, 0\]: new_kv_start \+ slice_len 135 must be <= num_tokens 128",
    ),
    "6 cache overrun": (
        [(0, 0, 640)],
        r"slices\[:, 0\]: kv_cache_start \+ slice_len 647 must be <= cache rows 640",
    ),
    "7 slice crosses a page": (
        [(0, 0, 31), (2, 0, 32)],
        r"slices\[:, 0\]: kv_cache_start 31 with slice_len 32 crosses a page boundary",
    ),
    # Moving slice 1's source one token on leaves a gap after slice 0 and makes slice 1 run
    # into slice 2's source; the overlap is found first.
    "8 new_kv not contiguous": (
        [(1, 1, 8)],
        r"slices\[:, 2\]: new_kv_start 39 overlaps the source of slice 1",
    ),
    "9 overlapping cache intervals": (
        [(0, 4, 4 * 32 + 6)],
        r"slices\[:, 4\]: kv_cache_start 134 overlaps the destination of slice 3",
    ),
}


def test_tpu_inference_case_is_valid_as_given():
    _, slices, _, num = tpu_inference_case()
    kernel_module.validate_slices(slices, num, num_tokens=128, num_rows=640, page_size=32)


@pytest.mark.parametrize("name", sorted(TPU_INFERENCE_INVALID))
def test_tpu_inference_invalid_inputs(name):
    new_kv, slices, kv_cache, num = tpu_inference_case()
    edits, message = TPU_INFERENCE_INVALID[name]
    for row, column, value in edits:
        slices[row, column] = value
    cache = jnp.asarray(kv_cache)
    with pytest.raises(ValueError, match=message):
        kv_cache_update(jnp.asarray(new_kv), slices, cache, num, page_size=32, validate=True)
    assert_bits_equal(np.asarray(cache), kv_cache)


def test_tpu_inference_gap_alone_is_refused():
    """Their case 8's intent, a gap between new_kv intervals with nothing overlapping."""
    new_kv, slices, kv_cache, num = tpu_inference_case()
    slices[1, 1:] += 1  # every later source moves one token on; 128 tokens still hold them
    with pytest.raises(ValueError, match=r"slices\[:, 1\]: new_kv_start 8 leaves a gap in new_kv"):
        kv_cache_update(new_kv, slices, kv_cache, num, page_size=32, validate=True)


@pytest.mark.slow
def test_update_runs_the_vmem_schedule_like_the_xla_backend():
    """``kvshard.update(..., schedule="vmem")`` reaches the kernel (2 devices, interpret mode)
    and writes the cache the XLA scatter writes. (The direct schedule: test_cache_pallas.py.)"""
    from _cache_helpers import fixed_slices, make_mesh, random_kv, small_spec

    from kvshard.cache import init_cache, update

    spec = small_spec(2, head_dim=64, num_layers=2, num_pages=4)
    mesh = make_mesh((1, 2))
    slices, num = fixed_slices()
    k, v = random_kv(np.random.default_rng(10), spec, 8)
    xla = update(init_cache(spec, mesh), 1, k, v, slices, num, backend="xla")
    vmem = update(
        init_cache(spec, mesh),
        1,
        k,
        v,
        slices,
        num,
        backend="pallas",
        options=BackendOptions(schedule="vmem"),
    )
    np.testing.assert_array_equal(np.asarray(vmem.kv), np.asarray(xla.kv))
    assert np.abs(np.asarray(xla.kv)).sum() > 0  # the step wrote something


def test_direct_wait_splits_when_a_block_outgrows_a_tiny_cache():
    """B·page_size rows (8·8) exceed the 32-row cache: each wait becomes 2 waits of <= 32 rows,
    and the module still lowers for TPU. (Executed exactly in test_kernel.py's property test
    bf16-p16-b8, whose 80-row cache is smaller than 8·16.)"""
    new_kv, slices, kv_cache, num = small_arrays()
    fn = functools.partial(kv_cache_update, page_size=P, num_slices_per_block=8, interpret=False)
    args = (new_kv, jnp.asarray(slices), kv_cache, jnp.asarray(num))
    jaxpr = str(jax.make_jaxpr(fn)(*args))
    assert jaxpr.count("dma_wait") == 4  # (previous block, own block) x 2 parts
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
    assert "tpu_custom_call" in exported.mlir_module()
