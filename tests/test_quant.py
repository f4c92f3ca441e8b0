"""Tests of quantized caches: scales in the spec, quantize on write, dequantize on read.

The oracle is :mod:`kvshard.reference` (NumPy, shares no code with :mod:`kvshard.quant`):
stored bits are compared with ``==`` against ``reference.quantize`` followed by
``reference.kv_cache_update``, reads against ``reference.dequantize``, saturation counts
against ``reference.saturated`` over the tokens the live slices write. Both backends: the
XLA one here, the Pallas one (interpret mode, marked slow) at the end of the file. Scales
themselves (the spec's rules, calibrate_scales, per-tensor vs per-vector) are in
tests/test_quant_scales.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _scripts import ROOT, run_script, stdout_of_success
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kvshard
from kvshard import quant, reference
from kvshard._geometry.layout import QUANTIZED_DTYPES

QDTYPES = list(QUANTIZED_DTYPES)  # int8, float8_e4m3fn, float8_e5m2
FLOAT8 = ["float8_e4m3fn", "float8_e5m2"]
ONE_SCALE_ONLY = [{"k_scale": 0.1}, {"v_scale": 0.1}]
LIMITS = {
    "int8": (-128.0, 127.0),
    "float8_e4m3fn": (-448.0, 448.0),
    "float8_e5m2": (-57344.0, 57344.0),
}
# A few scales, so that hypothesis examples share compiled executables (scales are static).
SCALES = [0.004, 0.05, 1 / 3, 2.0]


def spec_of(dtype, k_scale=0.05, v_scale=0.25, *, heads=2, layers=2, head_dim=64, **kw):
    kw = {"page_size": 4, "num_pages": 8, **kw}
    return kvshard.CacheSpec(
        layers, heads, head_dim, dtype=dtype, k_scale=k_scale, v_scale=v_scale, **kw
    )


def make_mesh(shape):
    devices = jax.devices()[: shape[0] * shape[1]]
    return jax.make_mesh(shape, ("data", "model"), devices=devices)


def bits(x):
    """Raw bytes of an array, so NaN/-0 compare exactly and dtypes must match."""
    x = np.asarray(x)
    return x.dtype, x.view(np.uint8).tobytes()


# --------------------------------------------------------------------------------------------
# quantize / dequantize against the oracle (pure functions)
# --------------------------------------------------------------------------------------------

SPECIAL = np.array(
    [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -1e-40, 0.5, 1.5, 2.5, -2.5, 126.5, 127.5],
    np.float32,
)


@settings(max_examples=30)
@given(
    dtype=st.sampled_from(QDTYPES),
    scale=st.sampled_from(SCALES),
    x=hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(width=32)),
    in_dtype=st.sampled_from([np.float32, ml_dtypes.bfloat16, np.float16]),
)
def test_quantize_is_the_oracle_bit_for_bit(dtype, scale, x, in_dtype):
    with np.errstate(over="ignore"):  # float16 holds less than float32: inf is a fine input
        x = np.concatenate([x, SPECIAL * np.float32(scale)]).astype(in_dtype)
    q = jax.jit(quant.quantize, static_argnums=(1, 2))(x, scale, dtype)
    assert bits(q) == bits(reference.quantize(x, scale, dtype))
    sat = jax.jit(quant.saturated, static_argnums=(1, 2))(x, scale, dtype)
    np.testing.assert_array_equal(np.asarray(sat), reference.saturated(x, scale, dtype))
    for out in (jnp.float32, jnp.bfloat16):
        real = jax.jit(quant.dequantize, static_argnums=(1, 2))(q, scale, out)
        assert bits(real) == bits(reference.dequantize(np.asarray(q), scale, out))


def test_quantize_examples_int8():
    """Hand-computed: scale 0.5, so x / scale is exact and ties show the rounding."""
    x = np.array([0.25, 0.75, 1.25, -0.25, 0.7, 63.5, 63.75, 1e9, -1e9, np.inf, np.nan], np.float32)
    q = np.asarray(quant.quantize(x, 0.5, "int8"))
    # 0.5 -> 0, 1.5 -> 2, 2.5 -> 2 (half to even), -0.5 -> 0; 127, 127.5 -> 127; saturation.
    np.testing.assert_array_equal(q, [0, 2, 2, 0, 1, 127, 127, 127, -128, 127, 0])
    assert q.dtype == np.int8
    sat = np.asarray(quant.saturated(x, 0.5, "int8"))
    np.testing.assert_array_equal(sat, [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1])


@pytest.mark.parametrize(
    ("dtype", "x", "stored"),
    [
        ("float8_e4m3fn", [300.0, 1000.0, -1e30, np.nan, np.inf], [288.0, 448.0, -448.0, 0, 448.0]),
        ("float8_e5m2", [300.0, 1e5, -np.inf, np.nan], [320.0, 57344.0, -57344.0, 0]),
    ],
)
def test_quantize_examples_float8(dtype, x, stored):
    q = np.asarray(quant.quantize(np.array(x, np.float32), 1.0, dtype))
    assert q.dtype.name == dtype and np.isfinite(q.astype(np.float32)).all()
    np.testing.assert_array_equal(q.astype(np.float32), stored)


# --------------------------------------------------------------------------------------------
# The cache, end to end (XLA backend)
# --------------------------------------------------------------------------------------------


def test_acceptance_int8_round_trip_and_saturation():
    """The issue's acceptance: in range within scale/2, out of range at the limits x scale."""
    scale = 0.01
    spec = spec_of("int8", k_scale=scale, v_scale=2 * scale, heads=2)
    cache = kvshard.init_cache(spec, make_mesh((1, 2)))
    rng = np.random.default_rng(0)
    k = rng.uniform(-1.28, 1.27, (4, 2, 64)).astype(np.float32)
    v = rng.uniform(-2.56, 2.54, (4, 2, 64)).astype(np.float32)
    k[0, 0, :3] = [0.7, 300.0, -300.0]
    v[3, 1, :2] = [1e6, -np.inf]
    # Tokens 0-2 to slots 5-7 (page 1), token 3 to slot 8 (page 2).
    slices = np.array([[5, 8], [0, 3], [3, 1]], np.int32)
    num = np.array([2], np.int32)
    cache, counts = kvshard.update_with_stats(cache, 1, k, v, slices, num)
    k_read, v_read = (np.asarray(x) for x in kvshard.gather(cache, 1, np.array([5, 6, 7, 8])))
    assert k_read.dtype == np.float32
    in_range = np.ones(k.shape, bool)
    in_range[0, 0, 1:3] = False
    assert np.abs(k_read - k)[in_range].max() <= scale / 2
    assert k_read[0, 0, 0] == pytest.approx(0.7, abs=scale / 2)
    assert k_read[0, 0, 1] == np.float32(127) * np.float32(scale)
    assert k_read[0, 0, 2] == np.float32(-128) * np.float32(scale)
    assert v_read[3, 1, 0] == np.float32(127) * np.float32(2 * scale)
    assert v_read[3, 1, 1] == np.float32(-128) * np.float32(2 * scale)
    assert (int(counts.k), int(counts.v)) == (2, 2)
    # Other layers and slots are untouched zeros.
    assert not np.asarray(kvshard.gather(cache, 0, np.arange(32))[0]).any()


def oracle_step(spec, groups, dense, layer, k, v, slices, num):
    """Applies one update to ``dense`` (raw stored values [L, G, slots, H, D] for k and v) and
    returns the expected (k, v) saturation counts over the tokens the live slices write."""
    counts = [0, 0]
    for g in range(groups):
        covered = reference.slices_to_slots(slices[g], num[g]).size
        for i, (x, scale) in enumerate(((k, spec.k_scale), (v, spec.v_scale))):
            q = reference.quantize(x[g], scale, spec.dtype)
            dense[i][layer, g] = reference.kv_cache_update(q, slices[g], dense[i][layer, g], num[g])
            counts[i] += int(reference.saturated(x[g][:covered], scale, spec.dtype).sum())
    return counts


def draw_values(rng, shape, scale, dtype):
    """Mostly in range, some beyond the limits, a few NaN/inf: every branch of quantize."""
    lo, hi = LIMITS[dtype]
    x = rng.uniform(lo * 1.3, hi * 1.3, shape) * scale
    specials = rng.random(shape) < 0.02
    x[specials] = rng.choice([np.nan, np.inf, -np.inf], specials.sum())
    return x.astype(np.float32)


def run_case(backend, dtype, mesh_shape, pooled, heads, scales, seed, steps=2, kv_layout=None):
    """Random steps through update_with_stats; returns (cache, list of counts, oracle dense)."""
    rng = np.random.default_rng(seed)
    spec = spec_of(dtype, *scales, heads=heads, kv_layout=kv_layout)
    mesh = make_mesh(mesh_shape)
    groups = mesh_shape[0] if pooled else 1
    cache = kvshard.init_cache(spec, mesh, page_axis="data" if pooled else None)
    shape = (spec.num_layers, groups, spec.slots_per_pool, heads, spec.head_dim)
    dense = [np.zeros(shape, spec.np_dtype), np.zeros(shape, spec.np_dtype)]
    T = 6
    for _ in range(steps):
        layer = int(rng.integers(spec.num_layers))
        k = draw_values(rng, (groups, T, heads, spec.head_dim), spec.k_scale, dtype)
        v = draw_values(rng, (groups, T, heads, spec.head_dim), spec.v_scale, dtype)
        # Tokens [0, 5) go to two slices on distinct random pages; token 5 is padding.
        slices, num = [], []
        for _ in range(groups):
            pages = rng.choice(spec.num_pages, 2, replace=False)
            cols = [[pages[0] * 4 + 1, 0, 3], [pages[1] * 4, 3, 2], [0, 0, 0]]
            slices.append(np.array(cols, np.int32).T)
            num.append(np.array([2], np.int32))
        slices, num = np.stack(slices), np.stack(num)
        expected = oracle_step(spec, groups, dense, layer, k, v, slices, num)
        args = (k, v, slices, num) if pooled else (k[0], v[0], slices[0], num[0])
        cache, counts = kvshard.update_with_stats(cache, layer, *args, backend=backend)
        assert (int(counts.k), int(counts.v)) == tuple(expected)
    return cache, dense


def check_against_oracle(cache, dense, pooled):
    spec = cache.spec
    slots = np.arange(spec.slots_per_pool, dtype=np.int32)
    for layer in range(spec.num_layers):
        out = (None, jnp.bfloat16)[layer % 2]  # the default (float32) and a chosen dtype
        read = kvshard.gather(
            cache, layer, np.tile(slots, (cache.dp, 1)) if pooled else slots, dtype=out
        )
        for got, stored, scale in zip(read, dense, (spec.k_scale, spec.v_scale), strict=True):
            got = np.asarray(got) if pooled else np.asarray(got)[None]
            want = reference.dequantize(stored[layer], scale, out or np.float32)
            assert bits(got) == bits(want)
    # The raw stored bits too: interleaved, K of head j at row 2j·r and V at 2j·r + 1;
    # packed, K of head j in lanes [0, D) of row j·r and V in [D, 2·D).
    kv = np.asarray(cache.kv).view(cache.dtype)  # fp8 caches store their bits on CPU
    r, d = cache.replication, spec.head_dim
    raw = kv.reshape(spec.num_layers, -1, spec.slots_per_pool, *kv.shape[2:])
    for i in (0, 1):
        if spec.kv_layout == "packed":
            got = raw[:, :, :, ::r, i * d : (i + 1) * d]
        else:
            got = raw[:, :, :, i :: 2 * r, :d]
        assert bits(got) == bits(dense[i])


@settings(max_examples=6)
@given(
    dtype=st.sampled_from(QDTYPES),
    layout=st.sampled_from([((1, 2), False, 2), ((2, 4), True, 2), ((1, 8), False, 2)]),
    scales=st.tuples(st.sampled_from(SCALES), st.sampled_from(SCALES)),
    seed=st.integers(0, 2**16),
    kv_layout=st.sampled_from(["interleaved", "packed"]),
)
def test_cache_matches_oracle_xla(dtype, layout, scales, seed, kv_layout):
    mesh_shape, pooled, heads = layout
    cache, dense = run_case(
        "xla", dtype, mesh_shape, pooled, heads, scales, seed, kv_layout=kv_layout
    )
    check_against_oracle(cache, dense, pooled)


def test_update_matches_update_with_stats_and_works_under_jit():
    spec = spec_of("float8_e4m3fn", k_scale=0.01, v_scale=0.02)
    mesh = make_mesh((2, 4))
    rng = np.random.default_rng(1)
    k = draw_values(rng, (4, 2, 64), spec.k_scale, spec.dtype)
    v = draw_values(rng, (4, 2, 64), spec.v_scale, spec.dtype)
    slices, num = np.array([[8], [0], [4]], np.int32), np.array([1], np.int32)
    plain = kvshard.update(kvshard.init_cache(spec, mesh), 0, k, v, slices, num)

    @jax.jit
    def step(cache, layer, k, v, slices, num):
        return kvshard.update_with_stats(cache, layer, k, v, slices, num)

    counted, counts = step(kvshard.init_cache(spec, mesh), jnp.int32(0), k, v, slices, num)
    assert bits(plain.kv) == bits(counted.kv)
    expected = [int(reference.saturated(x, s, spec.dtype).sum()) for x, s in ((k, 0.01), (v, 0.02))]
    assert [int(counts.k), int(counts.v)] == expected and expected[0] > 0


def test_float_caches_count_nothing_and_gather_casts():
    spec = kvshard.CacheSpec(1, 2, 64, 4, 8, dtype="bfloat16")
    cache = kvshard.init_cache(spec, make_mesh((1, 2)))
    k = np.full((2, 2, 64), 1e30, np.float32)  # far beyond any int8/fp8 range: not counted
    cache, counts = kvshard.update_with_stats(
        cache, 0, k, k, np.array([[4], [0], [2]], np.int32), np.array([1], np.int32)
    )
    assert (int(counts.k), int(counts.v)) == (0, 0)
    raw, _ = kvshard.gather(cache, 0, np.array([4]))
    wide, _ = kvshard.gather(cache, 0, np.array([4]), dtype=jnp.float32)
    assert raw.dtype == jnp.bfloat16 and wide.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(wide), np.asarray(raw).astype(np.float32))


@pytest.mark.parametrize("dtype", [jnp.int8, "int32", np.bool_, "nope"])
def test_gather_refuses_a_non_float_dtype(dtype):
    cache = kvshard.init_cache(spec_of("int8"), make_mesh((1, 2)))
    with pytest.raises(TypeError, match="dtype="):
        kvshard.gather(cache, 0, np.array([0]), dtype=dtype)


@pytest.mark.parametrize("kv_layout", ["interleaved", "packed"])
@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_attention_reads_the_dequantized_values(dtype, kv_layout):
    """kvshard.attention (xla backend) on a quantized cache == the float64 oracle attending the
    oracle's dequantized K/V: it reads the stored values back with the spec's scales."""
    spec = spec_of(dtype, k_scale=0.02, v_scale=0.03, heads=2, num_pages=12, kv_layout=kv_layout)
    cache = kvshard.init_cache(spec, make_mesh((1, 2)))
    alloc = kvshard.PageAllocator(12, 4, max_requests=4, max_pages_per_request=4)
    rng = np.random.default_rng(0)
    history: dict[int, tuple] = {}
    for batch in ([(0, 7), (1, 5)], [(0, 1), (1, 3)]):  # prefill, then a mixed step
        ids, counts = [r for r, _ in batch], [c for _, c in batch]
        rows = alloc.allocate_batch(ids, np.array(counts))
        step = kvshard.build_step(alloc, ids, counts, rows=rows, num_tokens_padded=16)
        k, v = (rng.uniform(-2, 2, (16, 2, 64)).astype(np.float32) for _ in range(2))
        cache = kvshard.update(cache, 1, k, v, step)
        offset = 0
        for r, c in batch:
            real = [
                reference.dequantize(reference.quantize(x[offset : offset + c], s, dtype), s, "f4")
                for x, s in ((k, spec.k_scale), (v, spec.v_scale))
            ]
            old = history.get(r, (np.zeros((0, 2, 64)),) * 2)
            history[r] = tuple(np.concatenate([o, n]) for o, n in zip(old, real, strict=True))
            offset += c
    q = rng.standard_normal((16, 4, 64)).astype(np.float32)
    got = np.asarray(kvshard.attention(cache, 1, q, step, sm_scale=0.125, backend="xla"))
    want = reference.paged_attention(
        q, [history[r][0] for r in ids], [history[r][1] for r in ids], counts, sm_scale=0.125
    )
    live = sum(counts)
    np.testing.assert_allclose(got[:live], want[:live], atol=2e-5, rtol=0)


def test_quant_scales_example_runs_and_checks_the_oracle():
    """The script behind docs/guides/quantization.md, tiny: it exits 1 on an oracle mismatch."""
    flags = ["--tokens", "32", "--kv-heads", "2", "--head-dim", "64", "--dtypes", "int8"]
    out = stdout_of_success(
        run_script(ROOT / "examples" / "quant_scales.py", *flags, "--percentiles", "99", "100")
    )
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| int8 |")]
    assert [float(r[2]) for r in rows] == [99.0, 100.0]
    k_sat = [float(r[4].strip().rstrip("%")) for r in rows]
    assert k_sat[0] > 0 and k_sat[0] > k_sat[1]  # the 99th percentile clips, absmax far less
    assert out.rstrip().endswith("OK")


# --------------------------------------------------------------------------------------------
# The Pallas backend (interpret mode: slow)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@settings(max_examples=3)
@given(seed=st.integers(0, 2**16))
def test_cache_matches_oracle_pallas_and_xla(seed):
    """One spec (compiling the interpreted kernel takes about a minute on a loaded 2-core VM);
    hypothesis varies the data. Quantization runs before the backend, in the code the XLA
    tests above cover for every dtype, so int8 (the rounding path) stands for all of them."""
    case = ("int8", (1, 2), False, 2, (0.05, 2.0), seed)
    cache, dense = run_case("pallas", *case, steps=1)
    check_against_oracle(cache, dense, pooled=False)
    xla, _ = run_case("xla", *case, steps=1)
    assert bits(cache.kv) == bits(xla.kv)
