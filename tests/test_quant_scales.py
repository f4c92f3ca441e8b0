"""Tests of the scales of quantized caches: which a CacheSpec accepts, what calibrate_scales
returns, and the measurement behind per-tensor scales (docs/guides/quantization.md).

Oracles are :mod:`kvshard.reference` and bounds computed here in float32 arithmetic; the
quantize/update/gather tests are in tests/test_quant.py.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _scripts import ROOT, run_script, stdout_of_success
from hypothesis import given, settings
from hypothesis import strategies as st

import kvshard
from kvshard import quant, reference
from kvshard._geometry.layout import QUANTIZED_DTYPES, scale_bounds

QDTYPES = list(QUANTIZED_DTYPES)  # int8, float8_e4m3fn, float8_e5m2
FLOAT8 = ["float8_e4m3fn", "float8_e5m2"]
ONE_SCALE_ONLY = [{"k_scale": 0.1}, {"v_scale": 0.1}]
LIMITS = {"int8": 127.0, "float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}  # largest finite


def spec_of(dtype, k_scale, v_scale):
    return kvshard.CacheSpec(2, 2, 64, 4, 8, dtype=dtype, k_scale=k_scale, v_scale=v_scale)


def make_mesh(shape):
    devices = jax.devices()[: shape[0] * shape[1]]
    return jax.make_mesh(shape, ("data", "model"), devices=devices)


# --------------------------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "scales"),
    [
        *[(d, sc) for d in ("int8", jnp.int8) for sc in ({}, {"k_scale": 0.1}, {"v_scale": 0.1})],
        *[(d, sc) for d in [*FLOAT8, ml_dtypes.float8_e4m3fn] for sc in ONE_SCALE_ONLY],
    ],
)
def test_quantized_spec_without_scales_is_refused(dtype, scales):
    """int8 needs both scales; float8 may omit both (1.0) but not one of the two."""
    with pytest.raises(ValueError, match=r"dtype='(int8|float8_e\w+)'.*k_scale and v_scale") as e:
        kvshard.CacheSpec(1, 1, 64, 4, 4, dtype=dtype, **scales)
    assert ("give neither: both 1.0" in str(e.value)) == ("float8" in str(e.value))


@pytest.mark.parametrize("dtype", [*FLOAT8, ml_dtypes.float8_e5m2])
def test_float8_spec_without_scales_stores_values_as_they_are(dtype):
    """vLLM's fp8 convention without calibration: both scales 1.0, the same static spec."""
    spec = kvshard.CacheSpec(1, 2, 64, 4, 8, dtype=dtype)
    explicit = kvshard.CacheSpec(1, 2, 64, 4, 8, dtype=dtype, k_scale=1.0, v_scale=1.0)
    assert (spec.k_scale, spec.v_scale) == (1.0, 1.0)
    assert spec == explicit and hash(spec) == hash(explicit)
    cache = kvshard.init_cache(spec, make_mesh((1, 2)))
    x = np.linspace(-3, 3, 2 * 2 * 64, dtype=np.float32).reshape(2, 2, 64)
    slices, num = np.array([[4], [0], [2]], np.int32), np.array([1], np.int32)
    cache = kvshard.update(cache, 0, x, -x, slices, num)
    k, v = (np.asarray(a) for a in kvshard.gather(cache, 0, np.array([4, 5])))
    name = spec.dtype
    want = reference.dequantize(reference.quantize(x, 1.0, name), 1.0, np.float32)
    np.testing.assert_array_equal(k, want)
    np.testing.assert_array_equal(v, -want)
    assert np.abs(k - x).max() <= 3 * 2.0 ** -(3 if name == "float8_e4m3fn" else 2)  # 1/2 ulp


@pytest.mark.parametrize("dtype", QDTYPES)
@pytest.mark.parametrize("field", ["k_scale", "v_scale"])
def test_spec_refuses_scales_float32_cannot_use(dtype, field):
    """Checked in float32 terms, not float64: 1e39 is inf in float32 (every read NaN), 1e-40 a
    float32 subnormal (every read flushed to 0), and a scale whose read of the largest stored
    value overflows float32 (inf) are refused; the bounds themselves are accepted."""
    largest_stored = np.float32(128.0 if dtype == "int8" else ml_dtypes.finfo(dtype).max)
    lo, hi = scale_bounds(dtype)
    assert lo == 2.0**-126  # the smallest normal float32
    with np.errstate(over="ignore"):
        assert np.isfinite(largest_stored * np.float32(hi))
        assert not np.isfinite(largest_stored * np.nextafter(np.float32(hi), np.float32(np.inf)))
    other = "v_scale" if field == "k_scale" else "k_scale"
    for ok in (lo, hi, 1.0):
        spec = kvshard.CacheSpec(1, 1, 64, 4, 4, dtype=dtype, **{field: ok, other: 1.0})
        assert getattr(spec, field) == ok
    below = float(np.nextafter(np.float32(lo), np.float32(0)))  # the largest subnormal
    above = float(np.nextafter(np.float32(hi), np.float32(np.inf)))
    for bad in (1e39, 1e-40, below, above, 3.5e38):
        bound = rf"is outside \[{lo:.8g}, {hi:.8g}\]".replace("+", r"\+")
        with pytest.raises(ValueError, match=rf"CacheSpec\.{field}={re.escape(repr(bad))} {bound}"):
            kvshard.CacheSpec(1, 1, 64, 4, 4, dtype=dtype, **{field: bad, other: 1.0})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_float_spec_refuses_a_scale(dtype):
    kvshard.CacheSpec(1, 1, 64, 4, 4, dtype=dtype)  # no scale: fine, values stored unscaled
    with pytest.raises(ValueError, match=rf"dtype='{dtype}' stores values unscaled.*k_scale=0.5"):
        kvshard.CacheSpec(1, 1, 64, 4, 4, dtype=dtype, k_scale=0.5)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "0.1", True, None])
@pytest.mark.parametrize("field", ["k_scale", "v_scale"])
def test_spec_rejects_bad_scales(field, bad):
    kw = {"k_scale": 0.1, "v_scale": 0.1, field: bad}
    match = rf"{field}={bad!r}" if bad is not None else "needs both k_scale and v_scale"
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        kvshard.CacheSpec(1, 1, 64, 4, 4, dtype="int8", **kw)


def test_spec_scales_are_floats_and_hashed():
    a = kvshard.CacheSpec(1, 1, 64, 4, 4, dtype="int8", k_scale=1, v_scale=np.float32(0.5))
    b = kvshard.CacheSpec(1, 1, 64, 4, 4, dtype="int8", k_scale=1.0, v_scale=0.5)
    assert type(a.k_scale) is float and a == b and hash(a) == hash(b) and a.quantized
    c = kvshard.CacheSpec(1, 1, 64, 4, 4, dtype="int8", k_scale=1.0, v_scale=0.25)
    assert c != a  # scales are part of the (static) identity: a different scale recompiles
    assert not kvshard.CacheSpec(1, 1, 64, 4, 4, dtype="bfloat16").quantized


# --------------------------------------------------------------------------------------------
# calibrate_scales
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", QDTYPES)
def test_calibrate_absmax_saturates_nothing_and_uses_the_range(dtype):
    rng = np.random.default_rng(0)
    k = rng.standard_normal((4, 64, 2, 32)) * 3
    v = jnp.asarray(rng.standard_normal((64, 2, 32)) * 0.1, jnp.bfloat16)  # JAX arrays too
    k_scale, v_scale = kvshard.calibrate_scales(k, v, dtype)
    assert isinstance(k_scale, float) and isinstance(v_scale, float)
    hi = LIMITS[dtype]
    assert k_scale == pytest.approx(np.abs(k).max() / hi)
    for x, s in ((k, k_scale), (np.asarray(v, np.float32), v_scale)):
        assert not reference.saturated(x, s, dtype).any()
        q = reference.quantize(x, s, dtype).astype(np.float32)
        assert np.abs(q).max() == pytest.approx(hi, rel=0.07)  # the extreme lands on the limit


def test_calibrate_percentile_saturates_about_the_tail():
    rng = np.random.default_rng(1)
    k = rng.standard_normal(200_000)
    k_scale, _ = kvshard.calibrate_scales(k, k, "int8", percentile=99.0)
    frac = reference.saturated(k, k_scale, "int8").mean()
    assert 0.005 < frac < 0.015  # ~1% of magnitudes are beyond the 99th percentile
    full, _ = kvshard.calibrate_scales(k, k, "int8")
    assert k_scale < full  # the clipped tail buys a finer step


@pytest.mark.parametrize(
    ("args", "kw", "match"),
    [
        ((np.ones(4), np.ones(4), "float16"), {}, "not quantized"),
        ((np.ones(4), np.ones(4), "int8"), {"percentile": 0}, "percentile=0"),
        ((np.ones(4), np.ones(4), "int8"), {"percentile": 100.5}, "percentile=100.5"),
        ((np.zeros(4), np.ones(4), "int8"), {}, "k sample"),
        ((np.ones(4), np.full(4, np.nan), "int8"), {}, "v sample"),
    ],
)
def test_calibrate_refuses(args, kw, match):
    with pytest.raises(ValueError, match=match):
        kvshard.calibrate_scales(*args, **kw)


@pytest.mark.parametrize("dtype", QDTYPES)
def test_calibrate_a_tiny_sample_gets_the_smallest_normal_scale_at_once(dtype, monkeypatch):
    """absmax 1e-37: absmax / max_finite is a float32 subnormal (it read back as 0). The
    scale is the smallest normal float32, found without the ~1e7-step nudge loop (156 s):
    every pass of the loop calls quant._inverse, counted here."""
    calls = []
    real_inverse = quant._inverse

    def counted(scale):
        calls.append(scale)
        if len(calls) > 20:
            raise AssertionError("calibrate_scales is looping")
        return real_inverse(scale)

    monkeypatch.setattr(quant, "_inverse", counted)
    k = np.array([1e-37, -5e-38, 0.0], np.float32)
    k_scale, v_scale = kvshard.calibrate_scales(k, np.ones(3), dtype)
    assert k_scale == 2.0**-126 and len(calls) <= 8
    assert v_scale == pytest.approx(1 / LIMITS[dtype])
    spec = spec_of(dtype, k_scale, v_scale)  # accepted: a normal float32
    stored = reference.quantize(k, spec.k_scale, dtype)
    assert stored[0] != 0 and not reference.saturated(k, spec.k_scale, dtype).any()


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(QDTYPES), exponent=st.floats(-45, 38.5), pct=st.sampled_from([99, 100])
)
def test_calibrated_scales_are_accepted_by_the_spec_or_refused_by_name(dtype, exponent, pct):
    """Whatever the sample's magnitude, calibrate_scales returns scales a CacheSpec accepts
    (absmax saturating nothing of the float32 sample), or refuses the sample by name."""
    k = (np.linspace(-1, 1, 101) * 10.0**exponent).astype(np.float32)
    if not np.abs(k).max() > 0 or not np.isfinite(k).all():
        return  # an all-zero (underflowed) or overflowed sample: refused as before
    try:
        k_scale, _ = kvshard.calibrate_scales(k, np.ones(3), dtype, percentile=pct)
    except ValueError as err:
        assert "k scale (from the k sample)" in str(err) and "is outside" in str(err)
        assert np.abs(k).max() / LIMITS[dtype] > scale_bounds(dtype)[1]
        return
    assert spec_of(dtype, k_scale, 1.0).k_scale == k_scale
    if pct == 100:
        assert not reference.saturated(k, k_scale, dtype).any()


# --------------------------------------------------------------------------------------------
# The measurement behind per-tensor scales
# --------------------------------------------------------------------------------------------


def test_quant_per_vector_example_headlines_hold():
    """The measurement behind the guide's per-vector judgment, tiny: per-vector scales beat the
    per-tensor scale a CacheSpec holds on outlier data (by > 3x for int8 attention output),
    bf16 beats both, and a scale costs 8 bytes (K+V, float32) per token-head."""
    flags = ["--tokens", "128", "--kv-heads", "4", "--layers", "2", "--queries", "4"]
    out = stdout_of_success(
        run_script(ROOT / "examples" / "quant_per_vector.py", *flags, "--head-dim", "64")
    )
    errors = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[0] in ("int8", "float8_e4m3fn", "bfloat16"):
            errors[cells[0], cells[1]] = [float(c.split("/")[0]) for c in cells[2:5]]
    assert len(errors) == 7
    for dtype in ("int8", "float8_e4m3fn"):
        tensor, vector = errors[dtype, "per-tensor"], errors[dtype, "per-vector"]
        assert all(v < t for v, t in zip(vector, tensor, strict=True)), (dtype, tensor, vector)
        assert max(errors["bfloat16", "none (a bf16 cache)"]) < min(vector)
    assert errors["int8", "per-vector"][2] * 3 < errors["int8", "per-tensor"][2]
    bytes_rows = [line for line in out.splitlines() if line.startswith("| 128 |")]
    assert [c.strip() for c in bytes_rows[0].split("|")[2:6]] == ["256", "256", "8", "4"]
    assert out.rstrip().endswith("OK")
