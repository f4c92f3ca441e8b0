"""``q_scale`` of :func:`kvshard.attention` and :func:`kvshard.fused_attention` on a quantized
cache (tpu-inference's RPA v3 semantics: q quantized as q / q_scale to the cache's dtype, the
scores multiplied by q_scale), on both backends against the float64 oracle, and its checks.

Cases are test_attention.py's (a real PageAllocator, kvshard.update through build_step); the
pallas cases run kvshard's kernel in Pallas TPU interpret mode, one small step each.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attention import DIM, batches, new_case, oracle, queries, run_step

import kvshard
from kvshard.cache._pytree import with_kv

INTERPRET = kvshard.BackendOptions(interpret=True)
# The oracle quantizes q bit for bit as the backends do: what remains is float32 arithmetic.
TOL = 1e-4
# A q step coarse enough that ignoring q_scale (or applying it twice) misses by far more.
Q_SCALES = {"int8": 0.05, "float8_e4m3fn": 0.5, "float8_e5m2": 0.25}


def attend(case, q, step, *, backend, q_scale, options=None, **kw):
    return kvshard.attention(
        case.cache, 1, jnp.asarray(q), step, backend=backend, options=options, q_scale=q_scale, **kw
    )


# float8 entries run in .ci/run's extended step (pytest -m extended).
@pytest.mark.parametrize(
    "dtype",
    ["int8", *(pytest.param(d, marks=pytest.mark.extended) for d in Q_SCALES if d != "int8")],
)
@given(data=st.data())
@settings(max_examples=2)
def test_xla_q_scale_matches_the_oracle(dtype, data):
    kv_layout = data.draw(st.sampled_from(["interleaved", "packed"]))
    case = new_case((1, 2), 2, dtype, max_requests=5, kv_layout=kv_layout)
    drawn = data.draw(batches(case.cache.dp))
    if any(before for before, _ in drawn):
        run_step(case, [before or [] for before, _ in drawn])
    step = run_step(case, [now for _, now in drawn])
    q = queries(case, 4)
    window = data.draw(st.sampled_from([None, 3]))
    kw = {"sm_scale": DIM**-0.5, "sliding_window": window}
    got = attend(case, q, step, backend="xla", q_scale=Q_SCALES[dtype], **kw)
    want = oracle(case, q, q_scale=Q_SCALES[dtype], q_dtype=dtype, **kw)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=TOL)
    # The quantization of q is visible at this tolerance: the test could fail.
    assert np.abs(oracle(case, q, **kw) - want).max() > 10 * TOL


def pallas_case(dtype, kv_layout):
    case = new_case((1, 1), 1, dtype, max_requests=3, kv_layout=kv_layout)
    run_step(case, [[(0, 5)]])
    step = run_step(case, [[(0, 1), (1, 3)]], tokens=8)
    q = queries(case, 2, tokens=8)
    kw = {"sm_scale": DIM**-0.5, "sliding_window": 4, "sinks": np.array([0.5, -1.0], np.float32)}
    return case, step, q, kw


def test_pallas_q_scale_matches_the_oracle():
    """kvshard's kernel in interpret mode, int8 cache, a decode and a prefill, sinks, window."""
    case, step, q, kw = pallas_case("int8", "interleaved")
    scale = Q_SCALES["int8"]
    got = attend(case, q, step, backend="pallas", options=INTERPRET, q_scale=scale, **kw)
    want = oracle(case, q, q_scale=scale, q_dtype="int8", **kw)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=TOL)
    assert np.abs(oracle(case, q, **kw) - want).max() > 10 * TOL


@pytest.mark.extended
def test_pallas_fused_q_scale_equals_update_then_attention():
    """fused_attention with q_scale (one kernel, float8 packed cache) equals update then
    attention: the cache bit for bit, the output at the oracle tolerance."""
    case, step, q, kw = pallas_case("float8_e4m3fn", "packed")
    scale = Q_SCALES["float8_e4m3fn"]
    spec = case.cache.spec
    rng = np.random.default_rng(1)
    k, v = (rng.standard_normal((8, spec.num_kv_heads, DIM)).astype(np.float32) for _ in "kv")
    composed = kvshard.update(with_kv(case.cache, jnp.copy(case.cache.kv)), 1, k, v, step)
    want = kvshard.attention(composed, 1, jnp.asarray(q), step, q_scale=scale, **kw)
    got, fused = kvshard.fused_attention(
        case.cache,
        1,
        jnp.asarray(q),
        k,
        v,
        step,
        backend="pallas",
        options=INTERPRET,
        q_scale=scale,
        **kw,
    )
    np.testing.assert_array_equal(np.asarray(fused.kv), np.asarray(composed.kv))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL)
    unscaled = kvshard.attention(composed, 1, jnp.asarray(q), step, **kw)
    assert np.abs(np.asarray(unscaled) - np.asarray(want)).max() > 10 * TOL


def test_bad_q_scale_raises_naming_it_and_changes_nothing():
    case = new_case((1, 1), 1, "int8", max_requests=3, kv_layout="interleaved")
    step = run_step(case, [[(0, 3)]], tokens=8)
    q = jnp.asarray(queries(case, 2, tokens=8))
    spec = case.cache.spec
    k = jnp.zeros((8, spec.num_kv_heads, spec.head_dim))
    before = np.asarray(case.cache.kv).copy()
    bad = [
        (-0.5, ValueError, r"q_scale=-0.5 must be a positive finite float"),
        (float("nan"), ValueError, r"q_scale=nan must be a positive finite float"),
        (1e-40, ValueError, r"q_scale=1e-40 is outside \[1.1754944e-38, [0-9.e+]+\]"),
        ("0.5", ValueError, r"q_scale='0.5' must be a positive finite float"),
    ]
    for value, err, match in bad:
        with pytest.raises(err, match=match):
            kvshard.attention(case.cache, 1, q, step, sm_scale=0.1, q_scale=value)
        with pytest.raises(err, match=match):
            kvshard.fused_attention(case.cache, 1, q, k, k, step, sm_scale=0.1, q_scale=value)
    jax_kernel = kvshard.BackendOptions(pallas_kernel="jax")
    with pytest.raises(NotImplementedError, match=r"q_scale= is not supported .* JAX's kernel"):
        kvshard.attention(
            case.cache, 1, q, step, sm_scale=0.1, q_scale=0.5, backend="pallas", options=jax_kernel
        )
    assert not case.cache.kv.is_deleted()  # fused_attention donated nothing
    np.testing.assert_array_equal(np.asarray(case.cache.kv), before)
    bf16 = new_case((1, 1), 1, "bfloat16", max_requests=3)
    step = run_step(bf16, [[(0, 3)]], tokens=8)
    with pytest.raises(ValueError, match=r"q_scale=0.5 needs a quantized cache .* bfloat16"):
        kvshard.attention(bf16.cache, 1, q, step, sm_scale=0.1, q_scale=0.5)
