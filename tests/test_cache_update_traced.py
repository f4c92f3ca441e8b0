"""Tests of kvshard.cache.update with traced arguments: the drop rule inside jit, checks=True.

Inside jit nothing can raise, so a slice or layer out of contract writes nothing, identically
on the xla and pallas backends (the drop rule, kvshard/_device/drop.py; its functions on hand-made
arrays are test_drop.py's); traced metadata must be int32; and ``checks=True`` reports the row
it drops instead. Expected values are written out by hand on the page-marked cache of
_cache_helpers (page p holds p + 1), or come from a hand-written oracle of the drop rule,
never from the code under test. Concrete arguments are test_cache_update.py's.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _cache_helpers import (
    INT32_MAX,
    MARKED_BAD_LAYERS,
    Oracle,
    assert_matches,
    make_mesh,
    page_marked_cache,
    page_values,
    random_kv,
    run_checked,
    small_spec,
)
from _cache_helpers import (
    MARKED_SLOTS as NUM_SLOTS,
)
from _cache_helpers import (
    MARKED_SPEC as SPEC,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshard import reference
from kvshard.cache import copy_pages, gather, init_cache, update


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((1, 2))


@pytest.mark.parametrize("kv_layout", ["interleaved", "packed"])
def test_padding_and_out_of_contract_slices_write_nothing_when_traced(kv_layout):
    """Inside jit the values are unchecked; the xla backend still writes only valid slices."""
    spec = small_spec(2, kv_layout=kv_layout)
    cache = init_cache(spec, make_mesh((2, 4)))
    rng = np.random.default_rng(4)
    k, v = random_kv(rng, spec, 8)
    # live: ok, crosses a page, too long, negative start, past the pool, zero length;
    # then a padding column that would be valid but is past num.
    cols = [[0, 0, 2], [3, 2, 2], [8, 2, 5], [-4, 2, 2], [32, 2, 1], [20, 2, 0], [24, 2, 2]]
    slices = np.array(cols, np.int32).T.copy()
    num = np.array([6], np.int32)
    cache = jax.jit(lambda c, k, v, s, n: update(c, 0, k, v, s, n))(cache, k, v, slices, num)
    oracle = Oracle(spec, 1)
    oracle.update(0, k, v, slices[:, :1], np.array([1], np.int32), pooled=False)
    assert_matches(cache, oracle)


# --------------------------------------------------------------------------------------------
# A traced layer out of range writes nothing (both backends)
# --------------------------------------------------------------------------------------------


def _traced_update(backend):
    k = np.full((2, 2, 8), 7.0, np.float32)
    slices = np.array([[0, 6], [0, 1], [1, 1]], np.int32)

    @jax.jit
    def f(cache, layer):
        return update(cache, layer, k, k, slices, np.array([2], np.int32), backend=backend)

    return f


@pytest.mark.parametrize("kv_layout", ["interleaved", "packed"])
@pytest.mark.parametrize("layer", MARKED_BAD_LAYERS)
def test_traced_bad_layer_update_writes_nothing_xla(mesh, layer, kv_layout):
    cache = page_marked_cache(mesh, kv_layout=kv_layout)
    before = np.asarray(cache.kv)
    out = _traced_update("xla")(cache, jnp.int32(layer))
    np.testing.assert_array_equal(np.asarray(out.kv), before)
    good = _traced_update("xla")(out, jnp.int32(1))  # same executable, layer in range: writes
    assert page_values(good, 1)[0, 0] == 7.0 and page_values(good, 1)[0, 3] == 7.0


@pytest.mark.slow
@pytest.mark.parametrize("layer", [-1, -2, SPEC.num_layers, INT32_MAX])
def test_traced_bad_layer_update_writes_nothing_pallas(mesh, layer):
    cache = page_marked_cache(mesh)
    before = np.asarray(cache.kv)
    out = _traced_update("pallas")(cache, jnp.int32(layer))
    np.testing.assert_array_equal(np.asarray(out.kv), before)


# --------------------------------------------------------------------------------------------
# Adversarial slices: what both backends write is the drop rule's oracle
# --------------------------------------------------------------------------------------------


def _drop_rule_oracle(dense, layer, new_kv, slices, num, num_layers):
    """Reference update of the slices a traced call may write (the drop rule, by hand)."""
    out = dense.copy()
    if not 0 <= layer < num_layers:
        return out
    for i in range(max(0, min(num, slices.shape[1]))):
        dst, src, length = (int(x) for x in slices[:, i])
        ok = (
            1 <= length <= SPEC.page_size
            and 0 <= src <= new_kv.shape[0] - length
            and 0 <= dst <= NUM_SLOTS - length
            and dst % SPEC.page_size + length <= SPEC.page_size
        )
        if ok:
            one = np.array([[dst], [src], [length]], np.int32)
            out[layer] = reference.kv_cache_update(new_kv, one, out[layer], np.array([1]))
    return out


ADVERSARIAL = [-(2**31), -(2**31) + 1, -SPEC.page_size, -1, INT32_MAX, INT32_MAX - 1]


@st.composite
def adversarial_update(draw, num_tokens=6, size=4):
    """(layer, slices int32[3, size], num int32[1]): disjoint good slices, some corrupted.

    Uncorrupted slices never overlap (distinct pages, distinct token runs); each corruption
    makes its slice invalid, so the slices the drop rule keeps still never overlap.
    """
    layer = draw(st.sampled_from([0, 1, *MARKED_BAD_LAYERS]))
    pages = draw(st.permutations(range(SPEC.num_pages)))[:size]
    columns, token = [], 0
    for page in pages:
        length = draw(st.integers(1, SPEC.page_size))
        offset = draw(st.integers(0, SPEC.page_size - length))
        if token + length > num_tokens:
            length, offset = 0, 0
        col = [page * SPEC.page_size + offset, token, length]
        token += length
        corrupt = draw(st.sampled_from(["none", "none", "dst", "src", "len", "cross"]))
        if corrupt == "dst":
            col[0] = draw(st.sampled_from([*ADVERSARIAL, NUM_SLOTS, NUM_SLOTS - length + 1]))
        elif corrupt == "src":
            col[1] = draw(st.sampled_from([*ADVERSARIAL, num_tokens, num_tokens - length + 1]))
        elif corrupt == "len":
            col[2] = draw(st.sampled_from([*ADVERSARIAL, SPEC.page_size + 1]))
        elif corrupt == "cross" and length >= 1:
            col[0], col[2] = page * SPEC.page_size + SPEC.page_size - 1, 2  # straddles pages
            if col[0] + 2 > NUM_SLOTS or col[1] + 2 > num_tokens:
                col[2] = -1
        columns.append(col)
    num = draw(st.sampled_from([-(2**31), -1, 0, 1, size - 1, size, size + 1, INT32_MAX]))
    return layer, np.array(columns, np.int32).T.copy(), np.array([num], np.int32)


def _traced_update_any(backend):
    @jax.jit
    def f(cache, layer, k, v, slices, num):
        return update(cache, layer, k, v, slices, num, backend=backend)

    return f


_XLA_ANY = _traced_update_any("xla")
_PALLAS_ANY = _traced_update_any("pallas")


@pytest.mark.slow
@pytest.mark.usefixtures("small_kernel_blocks")  # adversarial slices span several blocks
@settings(max_examples=12)
@given(adversarial_update(), st.integers(0, 2**32 - 1))
def test_adversarial_traced_updates_agree_across_backends(case, seed):
    layer, slices, num = case
    mesh = make_mesh((1, 2))
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((6, 2, 8)).astype(np.float32)
    v = rng.standard_normal((6, 2, 8)).astype(np.float32)
    base = page_marked_cache(mesh)
    dense_k = np.stack([np.asarray(gather(base, lay, np.arange(NUM_SLOTS))[0]) for lay in (0, 1)])
    args = (jnp.int32(layer), k, v, jnp.asarray(slices), jnp.asarray(num))
    outs = {}
    for name, fn in (("xla", _XLA_ANY), ("pallas", _PALLAS_ANY)):
        outs[name] = np.asarray(fn(page_marked_cache(mesh), *args).kv)
    np.testing.assert_array_equal(outs["xla"], outs["pallas"])
    expected = _drop_rule_oracle(dense_k, layer, k, slices, int(num[0]), SPEC.num_layers)
    out = _XLA_ANY(page_marked_cache(mesh), *args)
    got = np.stack([np.asarray(gather(out, lay, np.arange(NUM_SLOTS))[0]) for lay in (0, 1)])
    np.testing.assert_array_equal(got, expected)


@settings(max_examples=40)
@given(
    adversarial_update(),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["interleaved", "packed"]),
)
def test_adversarial_traced_updates_match_drop_rule_xla(case, seed, kv_layout):
    layer, slices, num = case
    mesh = make_mesh((1, 2))
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((6, 2, 8)).astype(np.float32)
    base = page_marked_cache(mesh, kv_layout=kv_layout)
    dense_k = np.stack([np.asarray(gather(base, lay, np.arange(NUM_SLOTS))[0]) for lay in (0, 1)])
    out = _XLA_ANY(base, jnp.int32(layer), k, -k, jnp.asarray(slices), jnp.asarray(num))
    got = np.stack([np.asarray(gather(out, lay, np.arange(NUM_SLOTS))[0]) for lay in (0, 1)])
    expected = _drop_rule_oracle(dense_k, layer, k, slices, int(num[0]), SPEC.num_layers)
    np.testing.assert_array_equal(got, expected)


# --------------------------------------------------------------------------------------------
# Traced metadata must be int32
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["slices", "num_slices"])
@pytest.mark.parametrize("dtype", [jnp.int16, jnp.uint32, jnp.int8])
def test_traced_update_metadata_must_be_int32(mesh, name, dtype):
    cache = page_marked_cache(mesh)
    k = np.full((2, 2, 8), 7.0, np.float32)
    args = {
        "slices": jnp.array([[0, 6], [0, 1], [1, 1]], jnp.int32),
        "num_slices": jnp.array([2], jnp.int32),
    }
    args[name] = args[name].astype(dtype)
    fn = lambda c, a: update(c, 0, k, k, a["slices"], a["num_slices"])
    message = f"{name} is traced with dtype {jnp.dtype(dtype).name}; traced {name} must be int32"
    with pytest.raises(TypeError, match=re.escape(message)):
        jax.jit(fn)(cache, args)


# --------------------------------------------------------------------------------------------
# checks=True reports what the drop rule would drop
# --------------------------------------------------------------------------------------------


K4 = np.full((4, 2, 8), 7.0, np.float32)


def _update_fn(checks, backend="xla"):
    return lambda c, layer, s, n: update(c, layer, K4, K4, s, n, backend=backend, checks=checks)


UPDATE_CASES = [
    # (layer, slices, num, message)
    (-1, [[0], [0], [1]], [1], r"update: layer=-1 is out of range \[0, 2\)"),
    (
        0,
        [[1], [0], [2]],
        [1],
        r"update: slices\[0\]\[:, 0\] = \(kv_cache_start 1, new_kv_start 0, slice_len 2\) is "
        r"dropped: it must have 0 <= slice_len <= page_size 2, stay in one page, read tokens "
        r"in \[0, 4\) and write slots in \[0, 16\)",
    ),
    (0, [[0, 2], [0, 3], [2, 2]], [2], r"slices\[0\]\[:, 1\] = \(kv_cache_start 2, new_kv_start 3"),
    (0, [[0], [0], [1]], [2], r"update: num_slices\[0\]=2 must be in \[0, 1\]"),
    (0, [[0, 1], [0, 2], [2, 1]], [2], r"the destinations of slices 0 and 1 overlap"),
    (0, [[0, 4], [0, 1], [2, 2]], [2], r"the sources of slices 0 and 1 overlap"),
]


@pytest.mark.parametrize(("layer", "slices", "num", "message"), UPDATE_CASES)
def test_update_checks_report_what_would_be_dropped(mesh, layer, slices, num, message):
    args = (jnp.int32(layer), jnp.array(slices, jnp.int32), jnp.array(num, jnp.int32))
    report, _ = run_checked(_update_fn(True), page_marked_cache(mesh), *args)
    assert report is not None and re.search(message, report), report
    # Without checks the same call is silent (the bad row is dropped).
    report, _ = run_checked(_update_fn(False), page_marked_cache(mesh), *args)
    assert report is None


@pytest.mark.slow
@pytest.mark.parametrize(("layer", "slices", "num", "message"), UPDATE_CASES[:2])
def test_update_checks_pallas(mesh, layer, slices, num, message):
    args = (jnp.int32(layer), jnp.array(slices, jnp.int32), jnp.array(num, jnp.int32))
    report, _ = run_checked(_update_fn(True, "pallas"), page_marked_cache(mesh), *args)
    assert report is not None and re.search(message, report), report


def test_update_checks_pass_good_calls_and_write(mesh):
    slices = jnp.array([[0, 6, 9], [0, 1, 0], [1, 1, 0]], jnp.int32)  # column 2: empty, fine
    report, out = run_checked(_update_fn(True), page_marked_cache(mesh), jnp.int32(0), slices,
                               jnp.array([3], jnp.int32))  # fmt: skip
    assert report is None
    np.testing.assert_array_equal(page_values(out)[0], [7, 2, 3, 7, 5, 6, 7, 8])

    # Two updates in one function (a layer loop): the second one's bad layer is reported.
    def two_layers(c, layer, s, n):
        c = update(c, 0, K4, K4, s, n, backend="xla", checks=True)
        c = copy_pages(c, jnp.array([[4, 5]], jnp.int32), checks=True)
        return update(c, layer, K4, K4, s, n, backend="xla", checks=True)

    report, _ = run_checked(
        two_layers, page_marked_cache(mesh), jnp.int32(5), slices, jnp.array([3], jnp.int32)
    )
    assert report is not None and "update: layer=5 is out of range [0, 2)" in report, report
    report, out = run_checked(
        two_layers, page_marked_cache(mesh), jnp.int32(1), slices, jnp.array([3], jnp.int32)
    )
    assert report is None
    np.testing.assert_array_equal(page_values(out)[0], [7, 2, 3, 7, 5, 5, 7, 8])
