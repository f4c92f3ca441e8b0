"""Tests of kvshard.cache.gather (kvshard/cache/_gather.py): reading slots back.

What gather reads after updates is checked against the dense oracle in test_cache_update.py;
here: reads from the page-marked cache of _cache_helpers (page p holds p + 1 in K, -(p + 1) in
V, layer l adds 100·l) with expected values written by hand, the host refusals (naming the
argument, the value and the bound), and the traced drop rule (a slot or layer out of range
reads zeros; ``checks=True`` reports it).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _cache_helpers import (
    INT32_MAX,
    MARKED_SLOTS,
    MARKED_SPEC,
    fixed_slices,
    make_mesh,
    page_marked_cache,
    random_kv,
    run_checked,
    small_spec,
)

from kvshard.cache import gather, init_cache, update


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((1, 2))


def test_gather_reads_slots_of_one_layer(mesh):
    cache = page_marked_cache(mesh)
    k, v = gather(cache, 1, np.array([0, 3, 15, 3], np.int32))  # pages 0, 1, 7, 1
    assert k.shape == v.shape == (4, 2, 8) and k.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(k)[:, 0, 0], [101, 102, 108, 102])
    np.testing.assert_array_equal(np.asarray(v), -np.asarray(k))
    assert (np.asarray(k) == np.asarray(k)[:, :1, :1]).all()  # every head and lane alike


def test_gather_reads_each_pools_own_slots():
    cache = page_marked_cache(make_mesh((2, 2)), page_axis="data", groups=2)
    k, _ = gather(cache, 0, np.array([[0, 5], [14, 2]], np.int32))
    assert k.shape == (2, 2, 2, 8)
    np.testing.assert_array_equal(np.asarray(k)[:, :, 0, 0], [[1, 3], [8, 2]])


@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.int16, np.uint32, np.uint64])
def test_gather_accepts_any_integer_dtype(mesh, dtype):
    k, _ = gather(page_marked_cache(mesh), 0, np.array([4, 15], dtype))
    np.testing.assert_array_equal(np.asarray(k)[:, 0, 0], [3, 8])


def test_gather_checks_true_on_concrete_arguments_reads(mesh):
    # Concrete values are checked on the host; checks=True adds nothing to them.
    k, _ = gather(page_marked_cache(mesh), 1, np.array([4]), checks=True)
    assert float(np.asarray(k)[0, 0, 0]) == 103.0


# --------------------------------------------------------------------------------------------
# Refused host arguments
# --------------------------------------------------------------------------------------------


def test_bad_gather_raises():
    spec = small_spec(2)
    cache = init_cache(spec, make_mesh((2, 4)))
    with pytest.raises(ValueError, match=r"slots contains 32, out of range \[0, 32\)"):
        gather(cache, 0, np.array([0, 32]))
    with pytest.raises(ValueError, match=r"slots contains -1"):
        gather(cache, 0, np.array([-1]))
    with pytest.raises(ValueError, match=r"slots must have shape \[N\]"):
        gather(cache, 0, np.zeros((2, 3), np.int32))
    with pytest.raises(TypeError, match="slots must be an integer array"):
        gather(cache, 0, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="layer=5"):
        gather(cache, 5, np.zeros(3, np.int32))
    pooled = init_cache(spec, make_mesh((2, 4)), page_axis="data")
    with pytest.raises(ValueError, match=r"slots must have shape \[dp, N\] = \[2, \*\]"):
        gather(pooled, 0, np.zeros(3, np.int32))


@pytest.mark.parametrize("value", [2**32 + 3, 2**63 + 3])  # int64, uint64
def test_gather_refuses_slots_past_int32_and_nothing_changes(mesh, value):
    cache = page_marked_cache(mesh)
    before = np.asarray(cache.kv)
    slots = np.array([0, 1], np.uint64 if value >= 2**63 else np.int64)
    slots[0] = value
    bound = re.escape("outside int32 [-2147483648, 2147483647]")
    with pytest.raises(ValueError, match=rf"^slots contains {value}, {bound}$"):
        gather(cache, 0, slots)
    np.testing.assert_array_equal(np.asarray(cache.kv), before)


def test_gather_refuses_bool_slots(mesh):
    with pytest.raises(TypeError, match="slots must be an integer array, got dtype bool"):
        gather(page_marked_cache(mesh), 0, np.array([True]))


# --------------------------------------------------------------------------------------------
# Traced: out of range reads zeros; int32 only; checks=True
# --------------------------------------------------------------------------------------------


def test_gather_traced_out_of_range_reads_zeros():
    spec = small_spec(2)
    cache = init_cache(spec, make_mesh((2, 4)))
    rng = np.random.default_rng(11)
    k, v = random_kv(rng, spec, 8)
    slices, num = fixed_slices()
    cache = update(cache, 0, k, v, slices, num)
    k_read, _ = jax.jit(lambda c, s: gather(c, 0, s))(cache, np.array([5, 32, -1, 6], np.int32))
    k_read = np.asarray(k_read)
    np.testing.assert_array_equal(k_read[[0, 3]], k[[0, 1]])
    assert not k_read[[1, 2]].any()


@pytest.mark.parametrize("layer", [-1, -2, MARKED_SPEC.num_layers, INT32_MAX, -(2**31)])
def test_traced_bad_layer_gather_reads_zeros(mesh, layer):
    cache = page_marked_cache(mesh)
    k, v = jax.jit(gather)(cache, jnp.int32(layer), jnp.arange(MARKED_SLOTS, dtype=jnp.int32))
    assert not np.asarray(k).any() and not np.asarray(v).any()
    k, _ = jax.jit(gather)(cache, jnp.int32(1), jnp.arange(MARKED_SLOTS, dtype=jnp.int32))
    assert np.asarray(k)[0, 0, 0] == 101.0  # the same executable reads a good layer


@pytest.mark.parametrize("dtype", [jnp.int16, jnp.uint32, jnp.int8])
def test_traced_slots_must_be_int32(mesh, dtype):
    cache = page_marked_cache(mesh)
    message = f"slots is traced with dtype {jnp.dtype(dtype).name}; traced slots must be int32"
    with pytest.raises(TypeError, match=re.escape(message)):
        jax.jit(lambda c, s: gather(c, 0, s))(cache, jnp.array([0, 1], dtype))


@pytest.mark.parametrize(
    ("layer", "slots", "message"),
    [
        (2, [0, 1], r"gather: layer=2 is out of range \[0, 2\)"),
        (0, [0, 16], r"gather: slots\[0\]\[1\]=16 is out of range \[0, 16\)"),
        (0, [-1, 3], r"gather: slots\[0\]\[0\]=-1 is out of range"),
    ],
)
def test_gather_checks(mesh, layer, slots, message):
    fn = lambda checks: lambda c, layer, s: gather(c, layer, s, checks=checks)
    args = (page_marked_cache(mesh), jnp.int32(layer), jnp.array(slots, jnp.int32))
    report, _ = run_checked(fn(True), *args)
    assert report is not None and re.search(message, report), report
    report, (k, _) = run_checked(fn(False), *args)
    assert report is None
    bad = [(not 0 <= s < MARKED_SLOTS) or layer >= MARKED_SPEC.num_layers for s in slots]
    assert all(not np.asarray(k)[i].any() for i, b in enumerate(bad) if b)
    good = [i for i, b in enumerate(bad) if not b]
    expected = [s // MARKED_SPEC.page_size + 1 for s in np.array(slots)[good]]  # layer 0 marks
    np.testing.assert_array_equal(np.asarray(k)[good, 0, 0], expected)
