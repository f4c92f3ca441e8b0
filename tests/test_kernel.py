"""The Pallas update kernel against the numpy oracle, in TPU interpret mode on CPU."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshard import reference
from kvshard._device.jax_compat import interpret_params
from kvshard.kernels import kv_cache_update
from kvshard.kernels.update import default_num_slices_per_block, page_bytes
from kvshard.testing import random_values, update_batches

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.int8, jnp.float8_e4m3fn]


def run_kernel(batch_or_arrays, *, page_size, **kwargs):
    new_kv, slices, kv_cache, num = batch_or_arrays
    out = kv_cache_update(
        jnp.asarray(new_kv),
        jnp.asarray(slices),
        jnp.asarray(kv_cache),
        jnp.asarray(num),
        page_size=page_size,
        **kwargs,
    )
    return np.asarray(out)


def assert_bits_equal(actual, expected):
    """Bit-for-bit equality (NaN-safe, and exact for every dtype)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    np.testing.assert_array_equal(actual.view(np.uint8), expected.view(np.uint8))


def peer_case(page_size, combined_heads, head_dim, dtype, rng):
    """vLLM's test vector: page-crossing prefills and decodes at odd offsets, then padding."""
    p = page_size
    lengths = [7, p, p, 1, 1, 1, 9]
    starts = [2 * p - 7, 2 * p, 3 * p, 4 * p + 6, 5 * p + 7, 6 * p + 8, 15 * p + 3]
    src = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    slices = np.zeros((3, 10), np.int32)
    slices[:, :7] = [starts, src, lengths]
    num_tokens = sum(lengths) + 4
    new_kv = random_values(rng, (num_tokens, combined_heads, head_dim), dtype)
    kv_cache = random_values(rng, (16 * p, combined_heads, head_dim), dtype)
    return new_kv, slices, kv_cache, np.array([7], np.int32)


SCHEDULES = ["direct", "vmem"]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("page_size", [32, 33])
@pytest.mark.parametrize("combined_heads", [2, 16])
@pytest.mark.parametrize("head_dim", [128, 256])
def test_peer_fixed_case(page_size, combined_heads, head_dim, schedule):
    """vLLM's and tpu-inference's test vector, both schedules, bit-exact against the oracle."""
    arrays = peer_case(page_size, combined_heads, head_dim, jnp.bfloat16, np.random.default_rng(0))
    out = run_kernel(arrays, page_size=page_size, num_slices_per_block=4, schedule=schedule)
    assert_bits_equal(out, reference.kv_cache_update(*arrays))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("page_size", [16, 33])
@pytest.mark.parametrize("combined_heads", [2, 16])
@pytest.mark.parametrize("head_dim", [128, 256])
@settings(max_examples=3)
@given(data=st.data())
def test_grid_matches_oracle(dtype, page_size, combined_heads, head_dim, data):
    """Every dtype x page size (incl. non-power-of-two) x heads x head_dim, bit-exact (so rows
    no slice names are untouched too), on both schedules in turn."""
    batch = data.draw(
        update_batches(
            page_size=page_size,
            num_pages=6,
            combined_heads=combined_heads,
            head_dim=head_dim,
            dtype=dtype,
            max_slices=5,
            fixed_shapes=True,
        )
    )
    arrays = (batch.new_kv, batch.slices, batch.kv_cache, batch.num_slices)
    schedule = SCHEDULES[(page_size + combined_heads + head_dim) % 2]
    out = run_kernel(arrays, page_size=page_size, num_slices_per_block=2, schedule=schedule)
    assert_bits_equal(out, reference.kv_cache_update(*arrays))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dtype", "page_size", "combined_heads", "block"),
    [(jnp.float32, 33, 4, 3), (jnp.bfloat16, 16, 2, 8), (jnp.int8, 8, 8, 1)],
    ids=["f32-p33-b3", "bf16-p16-b8", "i8-p8-b1"],
)
@settings(max_examples=12)
@given(data=st.data())
def test_property_matches_oracle(dtype, page_size, combined_heads, block, data):
    """Random pages, offsets, lengths, shuffles and garbage padding: kernel == oracle, bit-exact.

    Shapes are fixed per parameter set, so the kernel compiles once and each example is cheap.
    """
    batch = data.draw(
        update_batches(
            page_size=page_size,
            num_pages=5,
            combined_heads=combined_heads,
            dtype=dtype,
            max_slices=6,
            max_padding=3,
            fixed_shapes=True,
        )
    )
    arrays = (batch.new_kv, batch.slices, batch.kv_cache, batch.num_slices)
    out = run_kernel(arrays, page_size=page_size, num_slices_per_block=block)
    assert_bits_equal(out, reference.kv_cache_update(*arrays))


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("block", [1, 3, 7])
def test_block_size_need_not_divide_num_slices(block, schedule):
    """10 slice columns (7 live) with blocks 1, 3, 7 (the default chooser's 64 unrolls slowly
    in interpret mode; it is tested on its own in test_kernel_contract.py)."""
    arrays = peer_case(16, 2, 128, jnp.float32, np.random.default_rng(1))
    out = run_kernel(arrays, page_size=16, num_slices_per_block=block, schedule=schedule)
    assert_bits_equal(out, reference.kv_cache_update(*arrays))


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_zero_live_slices_change_nothing(schedule):
    new_kv, slices, kv_cache, _ = peer_case(16, 2, 128, jnp.float32, np.random.default_rng(2))
    out = run_kernel(
        (new_kv, slices, kv_cache, np.array([0], np.int32)),
        page_size=16,
        num_slices_per_block=4,
        schedule=schedule,
    )
    assert_bits_equal(out, kv_cache)


P = 8
HOSTILE = {
    # name: (kv_cache_start, new_kv_start, slice_len); the cache has 4 pages of 8 rows.
    "longer_than_page": (0, 0, P + 1),
    "crosses_page": (P - 2, 0, 4),
    "cache_start_past_end": (4 * P, 0, 1),
    "cache_end_past_end": (4 * P - 1, 0, 2),
    "negative_cache_start": (-1, 0, 1),
    "negative_new_kv_start": (0, -1, 1),
    "new_kv_overrun": (0, 5, 4),
    "zero_length": (P, 0, 0),
    "negative_length": (P, 0, -3),
    "int32_overflow": (2**31 - 2, 0, 4),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_kernel_guard_drops_hostile_slices(name):
    """Without validation, an invalid slice writes nowhere, and the valid ones still land."""
    rng = np.random.default_rng(3)
    kv_cache = random_values(rng, (4 * P, 2, 128), np.float32)
    new_kv = random_values(rng, (8, 2, 128), np.float32)
    good = (2 * P + 1, 0, 3)
    slices = np.array([good, HOSTILE[name], (3 * P, 3, 2)], np.int32).T
    num = np.array([3], np.int32)
    schedule = SCHEDULES[sorted(HOSTILE).index(name) % 2]  # each schedule sees half the cases
    out = run_kernel(
        (new_kv, slices, kv_cache, num), page_size=P, num_slices_per_block=2, schedule=schedule
    )
    without_hostile = slices[:, [0, 2]]
    expected = reference.kv_cache_update(new_kv, without_hostile, kv_cache, np.array([2]))
    assert_bits_equal(out, expected)


@pytest.mark.xfail(
    strict=True,
    reason="the interpret-mode race detector of JAX 0.10.2 to 0.12.1 does not flag two DMAs "
    "from one core writing the same HBM rows; overlapping destinations are refused by "
    "validate=True and by kvshard.update instead (test_kernel_contract.py)",
)
def test_race_detector_catches_overlapping_destinations():
    """Two live slices writing the same rows are a real race, but not one this detector sees.

    So no test here claims the direct schedule (HBM->HBM DMAs only) race-free; the vmem
    schedule's VMEM races are visible to the detector (test_kernel_contract.py).
    """
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interpreter

    rng = np.random.default_rng(5)
    kv_cache = random_values(rng, (4 * P, 2, 128), np.float32)
    new_kv = random_values(rng, (8, 2, 128), np.float32)
    slices = np.array([[P, 0, 4], [P + 2, 4, 4]], np.int32).T
    params = interpret_params(detect_races=True, dma_execution_mode="eager")
    run_kernel(
        (new_kv, slices, kv_cache, np.array([2], np.int32)),
        page_size=P,
        num_slices_per_block=2,
        interpret=params,
    )
    assert interpreter.races.races_found


def valid_arrays():
    rng = np.random.default_rng(6)
    kv_cache = jnp.asarray(random_values(rng, (4 * P, 2, 128), np.float32))
    new_kv = jnp.asarray(random_values(rng, (12, 2, 128), np.float32))
    slices = np.array([[P + 1, 0, 3], [3 * P, 3, P], [0, 0, 0]], np.int32).T
    return new_kv, slices, kv_cache, np.array([2], np.int32)


# (column to overwrite with (kv_cache_start, new_kv_start, slice_len), message fragment)
INVALID = {
    "negative cache start": ((-1, 0, 3), r"slices\[:, 0\]: kv_cache_start -1 must be >= 0"),
    "negative new_kv start": ((P + 1, -2, 3), r"slices\[:, 0\]: new_kv_start -2 must be >= 0"),
    "zero length": ((P + 1, 0, 0), r"slices\[:, 0\]: slice_len 0 must be >= 1"),
    "too long": ((P, 0, P + 1), r"slices\[:, 0\]: slice_len 9 must be <= page_size 8"),
    "new_kv overrun": ((P, 11, 2), r"new_kv_start \+ slice_len 13 must be <= num_tokens 12"),
    "cache overrun": (
        (4 * P - 1, 0, 2),
        r"kv_cache_start \+ slice_len 33 must be <= cache rows 32",
    ),
    "crosses page": ((P + 6, 0, 3), r"kv_cache_start 14 with slice_len 3 crosses a page boundary"),
    "overlapping destinations": (
        (3 * P + 2, 0, 3),
        r"slices\[:, 0\]: kv_cache_start 26 overlaps the destination of slice 1",
    ),
    "gap in new_kv": ((P + 1, 0, 2), r"new_kv_start 3 leaves a gap in new_kv after slice 0"),
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_validation_errors_name_slice_field_and_bound(name):
    new_kv, slices, kv_cache, num = valid_arrays()
    before = np.asarray(kv_cache).copy()
    column, message = INVALID[name]
    slices[:, 0] = column
    with pytest.raises(ValueError, match=message):
        kv_cache_update(new_kv, slices, kv_cache, num, page_size=P, validate=True)
    assert_bits_equal(np.asarray(kv_cache), before)


@pytest.mark.slow
def test_validation_accepts_valid_slices_and_ignores_padding():
    new_kv, slices, kv_cache, num = valid_arrays()
    slices[:, 2] = (-5, 99, 1000)  # padding column: garbage is fine
    out = kv_cache_update(
        new_kv, slices, kv_cache, num, page_size=P, validate=True, num_slices_per_block=2
    )
    assert_bits_equal(np.asarray(out), reference.kv_cache_update(new_kv, slices, kv_cache, num))


def test_validation_rejects_num_slices_out_of_range():
    new_kv, slices, kv_cache, _ = valid_arrays()
    with pytest.raises(ValueError, match=r"num_kv_update_slices=4 must be in \[0, 3\]"):
        kv_cache_update(
            new_kv, slices, kv_cache, np.array([4], np.int32), page_size=P, validate=True
        )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda a: {**a, "kv_cache": a["kv_cache"][..., :100], "new_kv": a["new_kv"][..., :100]},
            "head_dim must be a multiple of 128",
        ),
        (lambda a: {**a, "new_kv": a["new_kv"][:, :1]}, r"agree on \(combined_heads, head_dim\)"),
        (lambda a: {**a, "new_kv": a["new_kv"].astype(jnp.bfloat16)}, "new_kv dtype must equal"),
        (lambda a: {**a, "new_kv": a["new_kv"][0]}, "new_kv must be"),
        (lambda a: {**a, "slices": a["slices"][:2]}, r"slices must be int32\[3, num_slices"),
        (lambda a: {**a, "num": np.array([1, 2], np.int32)}, r"num_kv_update_slices must be"),
        (lambda a: {**a, "num": 2}, r"num_kv_update_slices must be int32\[1\], got shape \(\)"),
        (lambda a: {**a, "slices": [[0], [0]]}, r"slices must be int32\[3, num_slices >= 1\]"),
        (lambda a: {**a, "page_size": 7}, r"must be a multiple of page_size \(7\)"),
        (
            lambda a: {
                **a,
                "kv_cache": a["kv_cache"].astype(jnp.int32),
                "new_kv": a["new_kv"].astype(jnp.int32),
            },
            "kv_cache dtype must be one of",
        ),
    ],
)
def test_shape_errors(change, message):
    new_kv, slices, kv_cache, num = valid_arrays()
    args = change(
        {"new_kv": new_kv, "slices": slices, "kv_cache": kv_cache, "num": num, "page_size": P}
    )
    with pytest.raises(ValueError, match=message):
        kv_cache_update(
            args["new_kv"],
            args["slices"],
            args["kv_cache"],
            args["num"],
            page_size=args["page_size"],
        )


def test_default_block_follows_page_bytes():
    # bf16 packs two heads per 32-bit sublane word: 3 combined heads occupy 4.
    assert page_bytes(16, 3, 128, jnp.bfloat16) == 16 * 4 * 128 * 2
    assert page_bytes(16, 3, 100, jnp.int8) == 16 * 4 * 128
    # 1 MiB pages: 16 fit the 16 MiB VMEM scratch ("vmem"), 8 per block when two blocks are in
    # flight ("direct"); 3 MiB pages: 5 and 2 fit, rounded down to powers of two.
    assert default_num_slices_per_block(256, 8, 128, jnp.float32, "vmem") == 16
    assert default_num_slices_per_block(256, 8, 128, jnp.float32) == 8
    assert default_num_slices_per_block(768, 8, 128, jnp.float32, "vmem") == 4
    assert default_num_slices_per_block(768, 8, 128, jnp.float32, "direct") == 2
    assert default_num_slices_per_block(16, 2, 128, jnp.float32) == 64  # capped
    assert default_num_slices_per_block(2**16, 64, 512, jnp.float32) == 1  # never 0


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else [value]:
            inner = getattr(sub, "jaxpr", sub)
            if isinstance(inner, jax.extend.core.Jaxpr):
                yield inner


def _eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in it (jit, cond, pallas_call)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in _subjaxprs(eqn):
            yield from _eqns(sub)


@pytest.mark.parametrize(
    ("schedule", "starts", "waits", "vmem"), [("direct", 4, 2, False), ("vmem", 8, 8, True)]
)
def test_dmas_waits_and_scratch_per_block(schedule, starts, waits, vmem):
    """The schedules the module doc promises, per block of B = 4: "direct" starts B DMAs and
    waits twice (previous block, own block at the last step), with no VMEM scratch; "vmem"
    starts and waits 2B (the seed's bounce) through a VMEM scratch."""
    new_kv, slices, kv_cache, num = valid_arrays()
    jaxpr = jax.make_jaxpr(
        lambda *a: kv_cache_update(
            *a, page_size=P, num_slices_per_block=4, schedule=schedule, interpret=False
        )
    )(new_kv, jnp.asarray(slices), kv_cache, jnp.asarray(num))
    (call,) = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "pallas_call"]
    kernel = call.params["jaxpr"]
    names = [e.primitive.name for e in _eqns(kernel)]
    assert (names.count("dma_start"), names.count("dma_wait")) == (starts, waits)
    memory_spaces = {str(getattr(v.aval, "memory_space", "")) for v in kernel.invars}
    assert any("vmem" in m.lower() for m in memory_spaces) == vmem, memory_spaces


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize(
    ("page_size", "combined_heads", "head_dim", "num_slices", "block"),
    [(16, 2, 128, 8, None), (33, 16, 256, 13, 4), (128, 4, 128, 130, None), (1, 8, 512, 3, 1)],
)
def test_lowers_for_tpu(dtype, page_size, combined_heads, head_dim, num_slices, block, schedule):
    """Pallas -> Mosaic lowering and serialization on a CPU-only machine, both schedules.

    This is all ``jax.export`` checks: layouts, DMA legality and SMEM/VMEM sizing are checked
    later, by libtpu on a chip (the host budgets in test_kernel_contract.py cover the sizes).
    """
    fn = jax.jit(
        lambda *a: kv_cache_update(
            *a, page_size=page_size, num_slices_per_block=block, schedule=schedule, interpret=False
        )
    )
    exported = jax.export.export(fn, platforms=["tpu"])(
        jax.ShapeDtypeStruct((40, combined_heads, head_dim), dtype),
        jax.ShapeDtypeStruct((3, num_slices), jnp.int32),
        jax.ShapeDtypeStruct((page_size * 64, combined_heads, head_dim), dtype),
        jax.ShapeDtypeStruct((1,), jnp.int32),
    )
    module = exported.mlir_module()
    assert "tpu_custom_call" in module
    assert exported.platforms == ("tpu",)


def test_validate_inside_jit_asks_for_concrete_slices():
    new_kv, slices, kv_cache, num = valid_arrays()
    fn = jax.jit(lambda s: kv_cache_update(new_kv, s, kv_cache, num, page_size=P, validate=True))
    with pytest.raises(ValueError, match="validate=True needs concrete slices"):
        fn(jnp.asarray(slices))
