"""Tests of the eager path's content-keyed memo (kvshard/_device/memo.py) and of its two users: the
slice checks (kvshard.kernels.checks.validate_slices) and eager placement
(kvshard._device.sharding.place_all with reuse=True).

The memo must never change what a call does, only what it costs: a step mutated in place, or
another step, is checked again and written where it now says; a failed check stores nothing;
nothing is reused under a caller's trace. kvshard._device.memo and kvshard._device.sharding are
package-internal; their public names are this file's internal test hook.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _cache_helpers import make_mesh, page_marked_cache, page_values
from jax.sharding import PartitionSpec as P

from kvshard._device.memo import MAX_KEY_BYTES, ContentMemo, content_key
from kvshard._device.sharding import place_all
from kvshard._eager import EAGER_CALLS
from kvshard.cache import update
from kvshard.kernels.checks import validate_slices

GOOD_SLICES = np.array([[0, 6], [0, 1], [1, 1]], np.int32)  # slot 0 <- token 0, 6 <- token 1
NUM = np.array([2], np.int32)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((1, 2))


# --------------------------------------------------------------------------------------------
# content_key and ContentMemo
# --------------------------------------------------------------------------------------------


def test_content_key_is_the_content_not_the_identity():
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    assert content_key(a) == content_key(a.copy())
    assert content_key(a) != content_key(a.reshape(3, 2))  # same bytes, other shape
    assert content_key(a) != content_key(a.astype(np.uint32))  # same bytes, other dtype
    b = a.copy()
    b[1, 2] = 7
    assert content_key(a) != content_key(b)
    assert content_key(np.int32(3)) == content_key(np.int32(3)) != content_key(np.int32(4))
    assert content_key(jnp.asarray(a)) == content_key(a)  # a device array: its values


def test_content_key_refuses_traced_large_and_non_arrays():
    seen = []
    jax.jit(lambda x: seen.append(content_key(x)) or x)(np.int32(1))
    assert seen == [None]  # traced: no content on the host
    assert content_key(np.zeros(MAX_KEY_BYTES // 4 + 1, np.int32)) is None
    assert content_key(np.zeros(MAX_KEY_BYTES // 4, np.int32)) is not None
    assert content_key([1, 2]) is None
    assert content_key(np.int32(1), [1]) is None  # one unkeyable array: no key at all


def test_content_memo_is_a_bounded_lru():
    memo = ContentMemo(maxsize=2)
    memo.put("a", 1)
    memo.put("b", 2)
    assert memo.get("a") == 1  # "a" is now the most recent
    memo.put("c", 3)
    assert (memo.get("a"), memo.get("b"), memo.get("c"), len(memo)) == (1, None, 3, 2)
    memo.clear()
    assert memo.get("a") is None and len(memo) == 0
    # The last pair found is answered without the dictionary, but not once evicted.
    memo = ContentMemo(maxsize=1)
    memo.put(("a",), 1)
    assert memo.get(("a",)) == 1
    memo.put(("b",), 2)
    assert (memo.get(("a",)), memo.get(("b",)), len(memo)) == (None, 2, 1)


# --------------------------------------------------------------------------------------------
# validate_slices: what passed once is not checked again, anything else is
# --------------------------------------------------------------------------------------------

BOUNDS = dict(num_tokens=2, num_rows=16, page_size=2, allow_empty=True, contiguous_sources=False)


def test_validate_slices_checks_a_mutated_array_again():
    slices = GOOD_SLICES.copy()
    validate_slices(slices, NUM, **BOUNDS)
    slices[0, 1] = 15  # slot 15, 1 token: inside; then 2 tokens from token 1: past T
    validate_slices(slices, NUM, **BOUNDS)
    slices[2, 1] = 2
    bad = r"slices\[:, 1\]: new_kv_start \+ slice_len 3 must be <= num_tokens 2"
    with pytest.raises(ValueError, match=bad):
        validate_slices(slices, NUM, **BOUNDS)
    with pytest.raises(ValueError, match=bad):  # a failure stored nothing
        validate_slices(slices, NUM, **BOUNDS)


def test_validate_slices_checks_the_same_slices_against_other_bounds():
    validate_slices(GOOD_SLICES, NUM, **BOUNDS)
    with pytest.raises(ValueError, match=r"new_kv_start \+ slice_len 2 must be <= num_tokens 1"):
        validate_slices(GOOD_SLICES, NUM, **{**BOUNDS, "num_tokens": 1})
    with pytest.raises(ValueError, match=r"kv_cache_start \+ slice_len 7 must be <= cache rows 6"):
        validate_slices(GOOD_SLICES, NUM, **{**BOUNDS, "num_rows": 6})
    with pytest.raises(ValueError, match=r"count=3 must be in \[0, 2\]"):
        validate_slices(GOOD_SLICES, np.array([3], np.int32), count_name="count", **BOUNDS)


# --------------------------------------------------------------------------------------------
# place_all(reuse=True)
# --------------------------------------------------------------------------------------------


def test_place_all_reuses_the_device_copy_of_equal_metadata(mesh):
    first = place_all(mesh, [(GOOD_SLICES, P())], reuse=True)[0]
    again = place_all(mesh, [(GOOD_SLICES.copy(), P())], reuse=True)[0]
    assert again is first  # an equal array: the same immutable device copy
    np.testing.assert_array_equal(np.asarray(again), GOOD_SLICES)
    other = GOOD_SLICES.copy()
    other[0, 0] = 2
    moved = place_all(mesh, [(other, P())], reuse=True)[0]
    np.testing.assert_array_equal(np.asarray(moved), other)
    assert place_all(mesh, [(GOOD_SLICES, P())])[0] is not first  # reuse is opt-in
    floats = np.zeros(3, np.float32)  # not metadata: k/v are never keyed
    assert (
        place_all(mesh, [(floats, P())], reuse=True)[0]
        is not (place_all(mesh, [(floats, P())], reuse=True)[0])
    )


# --------------------------------------------------------------------------------------------
# Through update: the memo changes nothing a call does
# --------------------------------------------------------------------------------------------


def test_update_writes_where_a_mutated_step_now_says(mesh):
    k = np.full((2, 2, 8), 7.0, np.float32)
    slices = GOOD_SLICES.copy()
    out = update(page_marked_cache(mesh), 0, k, k, slices, NUM)
    np.testing.assert_array_equal(page_values(out)[0], [7, 2, 3, 7, 5, 6, 7, 8])
    slices[0, 1] = 10  # token 1 now goes to slot 10 (page 5), not slot 6 (page 3)
    out = update(page_marked_cache(mesh), 0, k, k, slices, NUM)
    np.testing.assert_array_equal(page_values(out)[0], [7, 2, 3, 4, 5, 7, 7, 8])


def test_update_refuses_a_step_mutated_into_a_bad_one_and_nothing_changes(mesh):
    k = np.full((2, 2, 8), 7.0, np.float32)
    slices = GOOD_SLICES.copy()
    cache = update(page_marked_cache(mesh), 0, k, k, slices, NUM)  # passed: memoized
    before = np.asarray(cache.kv)
    slices[0, 1] = 0  # both tokens to slot 0
    with pytest.raises(ValueError, match=r"slices\[:, 1\]: kv_cache_start 0 overlaps"):
        update(cache, 0, k, k, slices, NUM)
    assert not cache.kv.is_deleted()
    np.testing.assert_array_equal(np.asarray(cache.kv), before)
    slices[0, 1] = 6  # back to the step that passed: accepted again
    update(cache, 0, k, k, slices, NUM)


def test_update_under_a_callers_jit_reuses_nothing(mesh, monkeypatch):
    from kvshard._device import sharding as _sharding

    k = np.full((2, 2, 8), 7.0, np.float32)
    cache = page_marked_cache(mesh)
    memo = ContentMemo(maxsize=8)
    monkeypatch.setattr(_sharding, "_PLACED", memo)
    step = jax.jit(lambda c: update(c, 0, k, k, GOOD_SLICES, NUM), donate_argnums=0)
    out = step(cache)
    assert len(memo) == 0  # traced cache: the step's arrays were placed inside the trace
    np.testing.assert_array_equal(page_values(out)[0], [7, 2, 3, 7, 5, 6, 7, 8])
    EAGER_CALLS.clear()  # else an equal call of an earlier test is a lookup that places nothing
    update(out, 0, k, k, GOOD_SLICES, NUM)  # eager: placed once, kept
    assert len(memo) == 3  # the layer index, slices and num_slices
