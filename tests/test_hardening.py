"""Adversarial inputs (issue 10, findings 3, 4, 5, 7, 8): refused on the host, dropped in jit.

Each reproduction from the issue is a test: host calls raise an error naming the argument, the
value and the bound, and leave the cache as it was; traced calls write nothing for a bad row,
identically on the xla and pallas backends; ``checks=True`` reports the row instead. The
expected values are written out by hand (page contents are their page id), never computed by
the code under test.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cache import make_mesh, small_spec

from kvshard import reference
from kvshard.cache import copy_pages, gather, init_cache, update
from kvshard.metadata import build_update_slices

INT32_MAX = 2**31 - 1

# --------------------------------------------------------------------------------------------
# Finding 3: build_update_slices multiplies in int64 whatever the page table's dtype
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "page", "page_size", "start"),
    [
        (np.uint16, 4097, 16, 65552),  # wrapped to slot 16 in uint16
        (np.uint8, 200, 2, 400),  # wrapped to 144 in uint8
        (np.int16, 2**14, 2, 32768),  # wrapped to -32768 in int16
        (np.int8, 127, 4, 508),
        (np.uint32, 2**26, 16, 2**30),
        (np.int32, 2**27 - 1, 16, 2**31 - 16),  # the last page below 2**31 slots
    ],
)
def test_build_update_slices_small_and_unsigned_tables(dtype, page, page_size, start):
    table = np.array([[page]], dtype)
    # Decode path (every request in one page): offset 1, one token.
    np.testing.assert_array_equal(
        build_update_slices([1], [1], table, page_size), [[start + 1], [0], [1]]
    )
    # Multi-page path: a full page then one token of the next page (same id again).
    table2 = np.array([[page, page]], dtype)
    np.testing.assert_array_equal(
        build_update_slices([0], [page_size + 1], table2, page_size),
        [[start, start], [0, page_size], [page_size, 1]],
    )


@pytest.mark.parametrize(
    ("table", "page_size", "computed", "scheduled"),
    [
        (np.array([[2**27]], np.int32), 16, 0, 1),  # exactly 2**31: wrapped to slot 0 / negative
        (np.array([[2**27 - 1]], np.int32), 16, 0, 17),  # [page 2**27-1, ?]: reads column 1
        (np.array([[2**30, 2**30]], np.int64), 4, 0, 5),
        (np.array([[2**40]], np.uint64), 16, 0, 1),
        (np.array([[65535]], np.uint16), 2**16, 0, 1),
    ],
)
def test_build_update_slices_refuses_int32_overflow(table, page_size, computed, scheduled):
    if scheduled > page_size:  # the second column must exist: give it the next page id
        table = np.concatenate([table, table + 1], axis=1)
    with pytest.raises(ValueError, match=r"kv_cache_start \d+ .* would overflow int32"):
        build_update_slices([computed], [scheduled], table, page_size)


def test_build_update_slices_largest_slot_is_accepted():
    table = np.array([[2**27 - 1]], np.int32)
    out = build_update_slices([15], [1], table, 16)
    np.testing.assert_array_equal(out, [[INT32_MAX], [0], [1]])
    assert out.dtype == np.int32


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64])
def test_build_update_slices_refuses_negative_page_ids(dtype):
    table = np.array([[3, -2]], dtype)
    with pytest.raises(ValueError, match=r"slice 1: page id -2 from page_table is negative"):
        build_update_slices([1], [2], table, 2)


# --------------------------------------------------------------------------------------------
# Fixtures: a cache whose page p holds the value p + 1 (K) in every layer (layer l adds 100·l)
# --------------------------------------------------------------------------------------------

SPEC = small_spec(2, head_dim=8, num_layers=2, page_size=2, num_pages=8)
NUM_SLOTS = SPEC.slots_per_pool


def page_marked_cache(mesh, *, page_axis=None, groups=1):
    cache = init_cache(SPEC, mesh, head_axis="model", page_axis=page_axis)
    slots = np.arange(NUM_SLOTS)
    slices = np.stack([slots, slots, np.ones_like(slots)]).astype(np.int32)
    for layer in range(SPEC.num_layers):
        value = (slots // SPEC.page_size + 1 + 100 * layer).astype(np.float32)
        k = np.broadcast_to(value[:, None, None], (NUM_SLOTS, 2, 8)).copy()
        num = np.array([NUM_SLOTS], np.int32)
        if page_axis is not None:
            cache = update(
                cache, layer, np.stack([k] * groups), np.stack([-k] * groups),
                np.stack([slices] * groups), np.stack([num] * groups),
            )  # fmt: skip
        else:
            cache = update(cache, layer, k, -k, slices, num)
    return cache


def page_values(cache, layer=0):
    """The K value of each page's first slot, per group: float[G, num_pages]."""
    slots = np.arange(0, NUM_SLOTS, SPEC.page_size, dtype=np.int32)
    if cache.page_axis is None:
        return np.asarray(gather(cache, layer, slots)[0])[None, :, 0, 0]
    k, _ = gather(cache, layer, np.tile(slots, (cache.dp, 1)))
    return np.asarray(k)[:, :, 0, 0]


IDENTITY = np.arange(1, 9, dtype=np.float32)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((1, 2))


# --------------------------------------------------------------------------------------------
# Finding 4: traced out-of-range page ids in copy_pages are dropped
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
    expected = IDENTITY.copy()
    expected[5] = 5.0
    for layer in range(SPEC.num_layers):
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
    np.testing.assert_array_equal(page_values(out), [[1, 2, 3, 3, 5, 6, 7, 8], IDENTITY])


# --------------------------------------------------------------------------------------------
# Finding 5: a traced out-of-range layer writes nothing (both backends) and reads zeros
# --------------------------------------------------------------------------------------------

BAD_LAYERS = [-1, -2, SPEC.num_layers, SPEC.num_layers + 1, INT32_MAX, -(2**31)]


def _traced_update(backend):
    k = np.full((2, 2, 8), 7.0, np.float32)
    slices = np.array([[0, 6], [0, 1], [1, 1]], np.int32)

    @jax.jit
    def f(cache, layer):
        return update(cache, layer, k, k, slices, np.array([2], np.int32), backend=backend)

    return f


@pytest.mark.parametrize("layer", BAD_LAYERS)
def test_traced_bad_layer_update_writes_nothing_xla(mesh, layer):
    cache = page_marked_cache(mesh)
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


@pytest.mark.parametrize("layer", [-1, -2, SPEC.num_layers, INT32_MAX, -(2**31)])
def test_traced_bad_layer_gather_reads_zeros(mesh, layer):
    cache = page_marked_cache(mesh)
    k, v = jax.jit(gather)(cache, jnp.int32(layer), jnp.arange(NUM_SLOTS, dtype=jnp.int32))
    assert not np.asarray(k).any() and not np.asarray(v).any()
    k, _ = jax.jit(gather)(cache, jnp.int32(1), jnp.arange(NUM_SLOTS, dtype=jnp.int32))
    assert np.asarray(k)[0, 0, 0] == 101.0  # the same executable reads a good layer


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
    layer = draw(st.sampled_from([0, 1, *BAD_LAYERS]))
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
@given(adversarial_update(), st.integers(0, 2**32 - 1))
def test_adversarial_traced_updates_match_drop_rule_xla(case, seed):
    layer, slices, num = case
    mesh = make_mesh((1, 2))
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((6, 2, 8)).astype(np.float32)
    base = page_marked_cache(mesh)
    dense_k = np.stack([np.asarray(gather(base, lay, np.arange(NUM_SLOTS))[0]) for lay in (0, 1)])
    out = _XLA_ANY(base, jnp.int32(layer), k, -k, jnp.asarray(slices), jnp.asarray(num))
    got = np.stack([np.asarray(gather(out, lay, np.arange(NUM_SLOTS))[0]) for lay in (0, 1)])
    expected = _drop_rule_oracle(dense_k, layer, k, slices, int(num[0]), SPEC.num_layers)
    np.testing.assert_array_equal(got, expected)


# --------------------------------------------------------------------------------------------
# Finding 7: any integer dtype on the host (range-checked), int32 when traced
# --------------------------------------------------------------------------------------------

GOOD_SLICES = np.array([[0, 6], [0, 1], [1, 1]])


@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.int16, np.uint32, np.uint64])
def test_update_accepts_any_integer_dtype(mesh, dtype):
    k = np.full((2, 2, 8), 7.0, np.float32)
    out = update(page_marked_cache(mesh), 0, k, k, GOOD_SLICES.astype(dtype), np.array([2], dtype))
    np.testing.assert_array_equal(page_values(out)[0], [7, 2, 3, 7, 5, 6, 7, 8])
    pairs = np.array([[1, 2], [0, 0]], dtype)
    out = copy_pages(out, pairs)
    np.testing.assert_array_equal(page_values(out)[0], [7, 2, 2, 7, 5, 6, 7, 8])
    k_read, _ = gather(out, 0, np.array([4, 15], dtype))
    np.testing.assert_array_equal(np.asarray(k_read)[:, 0, 0], [2, 8])


@pytest.mark.parametrize(
    ("call", "name", "value"),
    [
        ("update", "slices", 2**31),
        ("update", "slices", -(2**31) - 1),
        ("update", "num_slices", 2**32 + 2),  # wrapped to 2: would look valid after a cast
        ("copy_pages", "pairs", 2**32 + 1),  # wrapped to page 1
        ("gather", "slots", 2**32 + 3),
        ("gather", "slots", 2**63 + 3),  # uint64
    ],
)
def test_values_past_int32_are_refused_and_nothing_changes(mesh, call, name, value):
    cache = page_marked_cache(mesh)
    before = np.asarray(cache.kv)
    k = np.full((2, 2, 8), 7.0, np.float32)
    dtype = np.uint64 if value >= 2**63 else np.int64
    args = {
        "slices": GOOD_SLICES.astype(dtype),
        "num_slices": np.array([2], dtype),
        "pairs": np.array([[1, 2]], dtype),
        "slots": np.array([0, 1], dtype),
    }
    args[name] = args[name].copy()
    args[name].flat[0] = value
    bound = re.escape("outside int32 [-2147483648, 2147483647]")
    with pytest.raises(ValueError, match=rf"^{name} contains {value}, {bound}$"):
        if call == "update":
            update(cache, 0, k, k, args["slices"], args["num_slices"])
        elif call == "copy_pages":
            copy_pages(cache, args["pairs"])
        else:
            gather(cache, 0, args["slots"])
    np.testing.assert_array_equal(np.asarray(cache.kv), before)  # not donated, unchanged


@pytest.mark.parametrize("name", ["slices", "num_slices", "pairs", "slots"])
@pytest.mark.parametrize("dtype", [jnp.int16, jnp.uint32, jnp.int8])
def test_traced_metadata_must_be_int32(mesh, name, dtype):
    cache = page_marked_cache(mesh)
    k = np.full((2, 2, 8), 7.0, np.float32)
    args = {
        "slices": jnp.asarray(GOOD_SLICES, jnp.int32),
        "num_slices": jnp.array([2], jnp.int32),
        "pairs": jnp.array([[1, 2]], jnp.int32),
        "slots": jnp.array([0, 1], jnp.int32),
    }
    args[name] = args[name].astype(dtype)
    if name in ("slices", "num_slices"):
        fn = lambda c, a: update(c, 0, k, k, a["slices"], a["num_slices"])
    elif name == "pairs":
        fn = lambda c, a: copy_pages(c, a["pairs"])
    else:
        fn = lambda c, a: gather(c, 0, a["slots"])
    message = f"{name} is traced with dtype {jnp.dtype(dtype).name}; traced {name} must be int32"
    with pytest.raises(TypeError, match=re.escape(message)):
        jax.jit(fn)(cache, args)


def test_float_metadata_is_refused(mesh):
    cache = page_marked_cache(mesh)
    with pytest.raises(TypeError, match="pairs must be an integer array, got dtype float32"):
        copy_pages(cache, np.array([[1.0, 2.0]], np.float32))
    with pytest.raises(TypeError, match="slots must be an integer array, got dtype bool"):
        gather(cache, 0, np.array([True]))


# --------------------------------------------------------------------------------------------
# Finding 8: checks=True turns in-jit drops into errors
# --------------------------------------------------------------------------------------------


def _run_checked(fn, *args):
    """jit(fn)(*args) -> (the reported error message or None, the outputs or None)."""
    try:
        out = jax.block_until_ready(jax.jit(fn)(*args))
    except jax.errors.JaxRuntimeError as err:
        # JAX keeps the failed callback's runtime token and would re-raise it at the next
        # effects barrier (or at exit): drop it, as a fresh process would not have it.
        jax._src.dispatch.runtime_tokens.clear()
        return str(err), None
    return None, out


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
    report, _ = _run_checked(_update_fn(True), page_marked_cache(mesh), *args)
    assert report is not None and re.search(message, report), report
    # Without checks the same call is silent (the bad row is dropped).
    report, _ = _run_checked(_update_fn(False), page_marked_cache(mesh), *args)
    assert report is None


@pytest.mark.slow
@pytest.mark.parametrize(("layer", "slices", "num", "message"), UPDATE_CASES[:2])
def test_update_checks_pallas(mesh, layer, slices, num, message):
    args = (jnp.int32(layer), jnp.array(slices, jnp.int32), jnp.array(num, jnp.int32))
    report, _ = _run_checked(_update_fn(True, "pallas"), page_marked_cache(mesh), *args)
    assert report is not None and re.search(message, report), report


def test_update_checks_pass_good_calls_and_write(mesh):
    slices = jnp.array([[0, 6, 9], [0, 1, 0], [1, 1, 0]], jnp.int32)  # column 2: empty, fine
    report, out = _run_checked(_update_fn(True), page_marked_cache(mesh), jnp.int32(0), slices,
                               jnp.array([3], jnp.int32))  # fmt: skip
    assert report is None
    np.testing.assert_array_equal(page_values(out)[0], [7, 2, 3, 7, 5, 6, 7, 8])

    # Two updates in one function (a layer loop): the second one's bad layer is reported.
    def two_layers(c, layer, s, n):
        c = update(c, 0, K4, K4, s, n, backend="xla", checks=True)
        c = copy_pages(c, jnp.array([[4, 5]], jnp.int32), checks=True)
        return update(c, layer, K4, K4, s, n, backend="xla", checks=True)

    report, _ = _run_checked(
        two_layers, page_marked_cache(mesh), jnp.int32(5), slices, jnp.array([3], jnp.int32)
    )
    assert report is not None and "update: layer=5 is out of range [0, 2)" in report, report
    report, out = _run_checked(
        two_layers, page_marked_cache(mesh), jnp.int32(1), slices, jnp.array([3], jnp.int32)
    )
    assert report is None
    np.testing.assert_array_equal(page_values(out)[0], [7, 2, 3, 7, 5, 5, 7, 8])


def test_checks_on_concrete_arguments(mesh):
    # Concrete values are checked on the host; checks=True adds nothing to them.
    k = np.full((2, 2, 8), 7.0, np.float32)
    cache = page_marked_cache(mesh)
    out = update(cache, 0, k, k, GOOD_SLICES, np.array([2]), checks=True)
    out = copy_pages(out, np.array([[1, 2]]), checks=True)
    k_read, _ = gather(out, 0, np.array([4]), checks=True)
    assert float(np.asarray(k_read)[0, 0, 0]) == 2.0


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
    report, _ = _run_checked(fn(True), page_marked_cache(mesh), jnp.array(pairs, jnp.int32))
    assert report is not None and re.search(message, report), report
    report, out = _run_checked(fn(False), page_marked_cache(mesh), jnp.array(pairs, jnp.int32))
    assert report is None
    report, out = _run_checked(fn(True), page_marked_cache(mesh), jnp.array([[4, 5]], jnp.int32))
    assert report is None
    np.testing.assert_array_equal(page_values(out)[0], [1, 2, 3, 4, 5, 5, 7, 8])


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
    report, _ = _run_checked(fn(True), *args)
    assert report is not None and re.search(message, report), report
    report, (k, _) = _run_checked(fn(False), *args)
    assert report is None
    bad = [(not 0 <= s < NUM_SLOTS) or layer >= SPEC.num_layers for s in slots]
    assert all(not np.asarray(k)[i].any() for i, b in enumerate(bad) if b)
