"""Tests of kvshard.cache.copy_pages (kvshard/cache/_copy.py): the allocator's copy-on-write.

Copies of every layer and head against the dense oracle of _cache_helpers; in place; the host
refusals (naming the argument, the value and the bound, the cache kept); and the traced drop
rule on the page-marked cache (page p holds p + 1): a pair with a page out of range, a no-op
pair, or every pair writing one destination twice copies nothing, and ``checks=True`` reports
it. Expected page contents are written out by hand.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _cache_helpers import (
    INT32_MAX,
    MARKED_SPEC,
    UNCHANGED_PAGES,
    Oracle,
    assert_matches,
    make_mesh,
    page_marked_cache,
    page_values,
    random_kv,
    run_checked,
    small_spec,
)
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kvshard.cache import CacheSpec, copy_pages, init_cache, update


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((1, 2))


@pytest.mark.parametrize("page_axis", [None, "data"])
def test_copy_pages_copies_every_layer_and_head(page_axis):
    spec = small_spec(8, num_layers=2)
    mesh = make_mesh((2, 4))
    cache = init_cache(spec, mesh, page_axis=page_axis)
    groups = 2 if page_axis else None
    rng = np.random.default_rng(12)
    oracle = Oracle(spec, groups or 1)
    # One slice per page fills the whole pool.
    cols = [[p * 4, p * 4, 4] for p in range(8)]
    slices = np.array(cols, np.int32).T.copy()
    num = np.array([8], np.int32)
    if groups:
        slices, num = np.stack([slices] * 2), np.stack([num] * 2)
    for layer in range(2):
        k, v = random_kv(rng, spec, 32, groups)
        cache = update(cache, layer, k, v, slices, num)
        oracle.update(layer, k, v, slices, num, pooled=page_axis is not None)
    # 1 -> 5, 5 -> 2 (reads the old page 5), 3 -> 3 (padding no-op), 0 -> 7.
    pairs = np.array([[1, 5], [5, 2], [3, 3], [0, 7]], np.int32)
    if groups:
        pairs = np.stack([pairs, pairs[::-1] % 8])
    cache = copy_pages(cache, pairs)
    for g, group_pairs in enumerate(pairs if groups else [pairs]):
        for dense in (oracle.k, oracle.v):
            pages = dense[:, g].reshape(2, 8, 4, *dense.shape[3:]).copy()
            src, dst = group_pairs[:, 0], group_pairs[:, 1]
            pages[:, dst] = pages[:, src]
            dense[:, g] = pages.reshape(dense[:, g].shape)
    assert_matches(cache, oracle)


@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.int16, np.uint32, np.uint64])
def test_copy_pages_accepts_any_integer_dtype(mesh, dtype):
    out = copy_pages(page_marked_cache(mesh), np.array([[1, 2], [0, 0]], dtype))
    np.testing.assert_array_equal(page_values(out)[0], [1, 2, 2, 4, 5, 6, 7, 8])


def test_copy_pages_checks_true_on_concrete_arguments_copies(mesh):
    # Concrete values are checked on the host; checks=True adds nothing to them.
    out = copy_pages(page_marked_cache(mesh), np.array([[1, 2]]), checks=True)
    np.testing.assert_array_equal(page_values(out, 1)[0], [101, 102, 102, 104, 105, 106, 107, 108])


# --------------------------------------------------------------------------------------------
# Refused host arguments
# --------------------------------------------------------------------------------------------


def test_bad_copy_pages_raises_and_keeps_cache():
    spec = small_spec(2)
    cache = init_cache(spec, make_mesh((2, 4)))
    cases = [
        (np.array([[0, 8]], np.int32), ValueError, r"dst page 8, out of range \[0, 8\)"),
        (np.array([[-1, 2]], np.int32), ValueError, r"src page -1"),
        (np.array([[1, 2], [3, 2]], np.int32), ValueError, "dst page 2 twice"),
        (np.array([1, 2], np.int32), ValueError, r"pairs must have shape \[K, 2\]"),
        (np.array([[1.0, 2.0]]), TypeError, "pairs must be an integer array"),
    ]
    for pairs, error, match in cases:
        with pytest.raises(error, match=match):
            copy_pages(cache, pairs)
    assert not cache.kv.is_deleted()
    pooled = init_cache(spec, make_mesh((2, 4)), page_axis="data")
    with pytest.raises(ValueError, match=r"group 1\) copy to dst page 2 twice"):
        copy_pages(pooled, np.array([[[0, 1], [0, 3]], [[1, 2], [3, 2]]], np.int32))
    with pytest.raises(ValueError, match=r"pairs must have shape \[dp, K, 2\]"):
        copy_pages(pooled, np.array([[0, 1]], np.int32))


def test_copy_pages_refuses_pairs_past_int32_and_nothing_changes(mesh):
    cache = page_marked_cache(mesh)
    before = np.asarray(cache.kv)
    pairs = np.array([[2**32 + 1, 2]], np.int64)  # would wrap to page 1
    bound = re.escape("outside int32 [-2147483648, 2147483647]")
    with pytest.raises(ValueError, match=rf"^pairs contains {2**32 + 1}, {bound}$"):
        copy_pages(cache, pairs)
    np.testing.assert_array_equal(np.asarray(cache.kv), before)


def test_copy_pages_refuses_float_pairs(mesh):
    with pytest.raises(TypeError, match="pairs must be an integer array, got dtype float32"):
        copy_pages(page_marked_cache(mesh), np.array([[1.0, 2.0]], np.float32))


# --------------------------------------------------------------------------------------------
# In place
# --------------------------------------------------------------------------------------------


def test_copy_pages_is_in_place():
    spec = CacheSpec(
        num_layers=2, num_kv_heads=8, head_dim=128, page_size=16, num_pages=64, dtype="float32"
    )
    cache = init_cache(spec, make_mesh((2, 4)))
    pairs = np.array([[1, 2], [3, 4]], np.int32)
    placed = jax.device_put(pairs, NamedSharding(cache.mesh, P()))
    copy = jax.jit(copy_pages, donate_argnums=0)
    stats = copy.lower(cache, placed).compile().memory_analysis()
    assert stats.temp_size_in_bytes < spec.bytes_per_device(4) // spec.num_layers // 4, stats
    before = cache.kv
    copy_pages(cache, pairs)
    assert before.is_deleted()


# --------------------------------------------------------------------------------------------
# Traced: dropped pairs copy nothing; int32 only; checks=True
# --------------------------------------------------------------------------------------------

_copy_jit = jax.jit(copy_pages)


@pytest.mark.parametrize(
    "pair",
    [[1, -1], [3, -8], [-1, 2], [11, 2], [8, 0], [0, 8], [-(2**31), 1], [1, INT32_MAX]],
)
def test_traced_copy_pages_drops_out_of_range_pairs(mesh, pair):
    cache = page_marked_cache(mesh)
    # A good pair in the same call still runs: page 4 -> page 5.
    out = _copy_jit(cache, jnp.array([pair, [4, 5]], jnp.int32))
    expected = UNCHANGED_PAGES.copy()
    expected[5] = 5.0
    for layer in range(MARKED_SPEC.num_layers):
        np.testing.assert_array_equal(page_values(out, layer)[0], expected + 100 * layer)


def test_traced_copy_pages_drops_every_pair_of_a_doubly_written_page(mesh):
    cache = page_marked_cache(mesh)
    out = _copy_jit(cache, jnp.array([[1, 2], [3, 2], [4, 5], [6, 6]], jnp.int32))
    np.testing.assert_array_equal(page_values(out)[0], [1, 2, 3, 4, 5, 5, 7, 8])


def test_traced_copy_pages_drops_out_of_range_pairs_per_pool():
    mesh = make_mesh((2, 2))
    cache = page_marked_cache(mesh, page_axis="data", groups=2)
    pairs = jnp.array([[[1, -1], [2, 3]], [[11, 2], [-1, 4]]], jnp.int32)
    out = _copy_jit(cache, pairs)
    np.testing.assert_array_equal(page_values(out), [[1, 2, 3, 3, 5, 6, 7, 8], UNCHANGED_PAGES])


@pytest.mark.parametrize("dtype", [jnp.int16, jnp.uint32, jnp.int8])
def test_traced_pairs_must_be_int32(mesh, dtype):
    cache = page_marked_cache(mesh)
    message = f"pairs is traced with dtype {jnp.dtype(dtype).name}; traced pairs must be int32"
    with pytest.raises(TypeError, match=re.escape(message)):
        jax.jit(copy_pages)(cache, jnp.array([[1, 2]], dtype))


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([[1, -1], [2, 3]], r"copy_pages: pairs\[0\]\[0\] has dst page -1, out of range \[0, 8\)"),
        ([[2, 3], [11, 2]], r"copy_pages: pairs\[0\]\[1\] has src page 11, out of range"),
        ([[1, 2], [3, 2]], r"pairs\[0\]\[0\] copies to dst page 2, which another pair also"),
    ],
)
def test_copy_pages_checks(mesh, pairs, message):
    fn = lambda checks: lambda c, p: copy_pages(c, p, checks=checks)
    report, _ = run_checked(fn(True), page_marked_cache(mesh), jnp.array(pairs, jnp.int32))
    assert report is not None and re.search(message, report), report
    report, out = run_checked(fn(False), page_marked_cache(mesh), jnp.array(pairs, jnp.int32))
    assert report is None
    report, out = run_checked(fn(True), page_marked_cache(mesh), jnp.array([[4, 5]], jnp.int32))
    assert report is None
    np.testing.assert_array_equal(page_values(out)[0], [1, 2, 3, 4, 5, 5, 7, 8])
