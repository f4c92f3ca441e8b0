"""Tests of kvshard._device.drop, the drop rule, on hand-made arrays.

kvshard._device.drop is package-internal; importing its public (non-underscore) functions here is
the documented internal test hook for this file, so the rule both backends and ``checks=True`` share
is tested once, directly, without a cache or a mesh. What the operations do with it is tested
through the public API in test_cache_update_traced.py, test_cache_copy.py, test_cache_gather.py and
test_attention.py. Every expected value is written out by hand.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvshard._device.drop import (
    copy_pair_mask,
    layer_in_range,
    live_requests,
    request_in_contract,
    requests_on_block,
    slice_is_writable,
    token_requests,
    token_slots,
    writable_slices,
)

INT32_MAX, INT32_MIN = 2**31 - 1, -(2**31)


def i32(x):
    return jnp.asarray(x, jnp.int32)


def assert_equal(got, expected):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


# --------------------------------------------------------------------------------------------
# layer_in_range
# --------------------------------------------------------------------------------------------


def test_layer_in_range():
    layers = i32([-1, 0, 1, 2, 3, INT32_MAX, INT32_MIN])
    assert_equal(layer_in_range(layers, 2), [False, True, True, False, False, False, False])
    assert bool(layer_in_range(i32(0), 1)) and not bool(layer_in_range(i32(1), 1))


# --------------------------------------------------------------------------------------------
# slice_is_writable: 8 tokens, 16 rows, pages of 4
# --------------------------------------------------------------------------------------------

WRITABLE = [
    # (dst, src, length, writable)
    ((0, 0, 1), True),
    ((3, 0, 1), True),  # the last row of page 0
    ((12, 4, 4), True),  # the whole last page from the last 4 tokens
    ((0, 7, 1), True),  # the last token
    ((3, 0, 2), False),  # crosses from page 0 into page 1
    ((14, 0, 3), False),  # crosses past the last page
    ((0, 0, 0), False),  # empty
    ((0, 0, 5), False),  # longer than a page
    ((0, 0, -1), False),
    ((12, 5, 4), False),  # reads token 8 of 8
    ((0, 8, 1), False),  # source starts past the tokens
    ((0, -1, 1), False),
    ((16, 0, 1), False),  # destination starts past the rows
    ((-1, 0, 1), False),
    ((-4, 0, 1), False),  # negative, though -4 % 4 == 0
]

NEAR_INT32 = [
    # Starts and lengths near the int32 bounds, where `start + length` would overflow.
    ((0, INT32_MAX, 1), False),
    ((0, INT32_MAX - 2, 4), False),
    ((0, 4, INT32_MAX), False),
    ((0, 0, INT32_MIN), False),
    ((INT32_MAX, 0, 1), False),
    ((INT32_MAX - 3, 0, 4), False),
    ((INT32_MIN, 0, 1), False),
    ((0, INT32_MIN, 1), False),
    ((INT32_MIN + 4, 0, 4), False),  # a page-aligned negative start
]


@pytest.mark.parametrize(("row", "writable"), WRITABLE + NEAR_INT32)
def test_slice_is_writable_on_scalars(row, writable):
    dst, src, length = (i32(x) for x in row)
    got = slice_is_writable(dst, src, length, num_tokens=8, num_rows=16, page_size=4)
    assert got.shape == () and bool(got) is writable


def test_slice_is_writable_on_arrays_agrees_with_scalars():
    rows = np.array([row for row, _ in WRITABLE + NEAR_INT32], np.int64).T
    dst, src, length = (i32(r) for r in rows)
    got = slice_is_writable(dst, src, length, num_tokens=8, num_rows=16, page_size=4)
    assert_equal(got, [w for _, w in WRITABLE + NEAR_INT32])


def test_slice_is_writable_inside_jit():
    fn = jax.jit(lambda d, s, n: slice_is_writable(d, s, n, num_tokens=8, num_rows=16, page_size=4))
    assert bool(fn(i32(12), i32(4), i32(4))) and not bool(fn(i32(INT32_MAX), i32(0), i32(1)))


def test_slice_is_writable_with_rows_near_int32():
    """A pool of 2**31 - 16 rows (pages of 16): its last page ends at the int32 bound."""
    rows = 2**31 - 16
    last_page = 2**31 - 32
    cases = [
        ((last_page, 0, 16), True),
        ((last_page + 12, 0, 4), True),  # ends exactly at `rows`
        ((last_page + 15, 0, 2), False),  # crosses out of the last page
        ((rows, 0, 1), False),  # the first row past the pool
        ((INT32_MAX, 0, 1), False),
    ]
    dst, src, length = (i32(c) for c in np.array([row for row, _ in cases], np.int64).T)
    got = slice_is_writable(dst, src, length, num_tokens=16, num_rows=rows, page_size=16)
    assert_equal(got, [w for _, w in cases])


# --------------------------------------------------------------------------------------------
# writable_slices: the live count and the layer on top of slice_is_writable
# --------------------------------------------------------------------------------------------

# Columns: good, good, crosses a page, good: [kv_cache_start, new_kv_start, slice_len].
SLICES = i32([[5, 12, 3, 8], [0, 3, 0, 5], [3, 4, 2, 1]])
WRITABLE_KW = dict(num_layers=2, num_tokens=8, num_slots=16, page_size=4)


@pytest.mark.parametrize(
    ("num", "expected"),
    [
        (4, [True, True, False, True]),
        (2, [True, True, False, False]),
        (1, [True, False, False, False]),
        (0, [False] * 4),
        (-1, [False] * 4),
        (INT32_MIN, [False] * 4),
        (5, [True, True, False, True]),  # past S: every column is live (S bounds it)
        (INT32_MAX, [True, True, False, True]),
    ],
)
def test_writable_slices_counts_live_columns(num, expected):
    assert_equal(writable_slices(SLICES, i32([num]), i32(1), **WRITABLE_KW), expected)


@pytest.mark.parametrize("layer", [-1, 2, 3, INT32_MAX, INT32_MIN])
def test_writable_slices_with_a_bad_layer_writes_nothing(layer):
    assert_equal(writable_slices(SLICES, i32([4]), i32(layer), **WRITABLE_KW), [False] * 4)


def test_writable_slices_with_no_columns():
    out = writable_slices(jnp.zeros((3, 0), jnp.int32), i32([0]), i32(0), **WRITABLE_KW)
    assert out.shape == (0,)


# --------------------------------------------------------------------------------------------
# token_slots: where each token lands (>= num_slots: nowhere)
# --------------------------------------------------------------------------------------------


def test_token_slots_follow_the_valid_slices():
    slices = i32([[5, 12, 20], [0, 3, 5], [3, 2, 1]])  # tokens 0-2 -> 5-7, 3-4 -> 12-13
    got = token_slots(slices, jnp.array([True, True, False]), 8, 32)
    # Token 5 belongs to the invalid slice; tokens 6, 7 to none: slot 32 + token, unique.
    assert_equal(got, [5, 6, 7, 12, 13, 37, 38, 39])
    assert got.dtype == jnp.int32


def test_token_slots_drop_tokens_covered_twice():
    # Slice 0 covers tokens 0-1, slice 1 tokens 1-2: token 1 (covered twice) lands nowhere.
    slices = i32([[0, 8], [0, 1], [2, 2]])
    assert_equal(token_slots(slices, jnp.array([True, True]), 4, 16), [0, 17, 9, 19])
    # The same slices with slice 1 invalid: token 1 is slice 0's again.
    assert_equal(token_slots(slices, jnp.array([True, False]), 4, 16), [0, 1, 18, 19])


def test_token_slots_with_nothing_valid():
    slices = i32([[0, 4], [0, 1], [1, 1]])
    assert_equal(token_slots(slices, jnp.array([False, False]), 3, 8), [8, 9, 10])


# --------------------------------------------------------------------------------------------
# copy_pair_mask: pages in range, not a no-op, destination written once
# --------------------------------------------------------------------------------------------


def pair_mask(pairs, num_pages=8):
    pairs = i32(np.array(pairs, np.int64).reshape(-1, 2))
    return copy_pair_mask(pairs[:, 0], pairs[:, 1], num_pages)


def test_copy_pair_mask_keeps_good_pairs():
    assert_equal(pair_mask([[1, 2], [2, 1], [0, 7]]), [True, True, True])  # a swap is fine


@pytest.mark.parametrize(
    "pair", [[1, -1], [-1, 2], [8, 0], [0, 8], [INT32_MIN, 1], [1, INT32_MAX], [3, 3]]
)
def test_copy_pair_mask_drops_out_of_range_and_no_op_pairs(pair):
    assert_equal(pair_mask([pair, [4, 5]]), [False, True])


def test_copy_pair_mask_drops_every_pair_of_a_doubly_written_page():
    assert_equal(pair_mask([[1, 2], [3, 2], [4, 5], [6, 6]]), [False, False, True, False])
    assert_equal(pair_mask([[1, 3], [2, 3], [4, 3], [5, 6]]), [False, False, False, True])
    assert_equal(pair_mask([[1, 2], [1, 2]]), [False, False])  # the same pair twice


def test_copy_pair_mask_duplicates_count_only_pairs_performed():
    # A pair dropped for its own reason does not make another pair a duplicate.
    assert_equal(pair_mask([[1, 2], [9, 2], [2, 2], [-1, 2]]), [True, False, False, False])


def test_copy_pair_mask_with_fewer_than_two_pairs():
    assert_equal(pair_mask([[1, 2]]), [True])
    assert_equal(pair_mask([[2, 2]]), [False])
    assert pair_mask(np.zeros((0, 2))).shape == (0,)


# --------------------------------------------------------------------------------------------
# Attention requests: 3 requests of up to 2 pages of 4, 8 pages, 8 tokens, 2 layers
# --------------------------------------------------------------------------------------------

REQUEST_KW = dict(num_tokens=8, num_pages=8, page_size=4)
PAGES = [[0, 1], [2, 3], [4, 5]]
KV_LENS = [5, 3, 2]
CU_Q_LENS = [0, 2, 5, 6]  # q_lens 2, 3, 1


def live(pages=PAGES, kv_lens=KV_LENS, cu_q_lens=CU_Q_LENS, num_seqs=3, layer=0):
    out = live_requests(
        i32(pages), i32(kv_lens), i32(cu_q_lens), i32([num_seqs]), i32(layer),
        num_layers=2, **REQUEST_KW,
    )  # fmt: skip
    assert out.shape == () and out.dtype == jnp.int32
    return int(out)


def test_request_in_contract_judges_each_request_on_its_own():
    kv_lens = [5, 9, 2]  # request 1 holds more than its 2 pages of 4
    ok = request_in_contract(i32(PAGES), i32(kv_lens), i32(CU_Q_LENS), i32([3]), **REQUEST_KW)
    assert_equal(ok, [True, False, True])


def test_live_requests_serves_every_good_request():
    assert live() == 3
    assert live(num_seqs=2) == 2
    assert live(num_seqs=0) == 0
    assert live(num_seqs=-1) == 0
    assert live(num_seqs=5) == 3  # past max_num_seqs: clamped to it, like update's num_slices


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"kv_lens": [5, 9, 2]}, 1),  # request 1: kv_len past pages_per_seq · page_size
        ({"kv_lens": [5, 2, 2]}, 1),  # request 1: q_len 3 > kv_len 2
        ({"pages": [[0, 1], [8, 3], [4, 5]]}, 1),  # request 1: page 8 of 8, in use
        ({"pages": [[0, -1], [2, 3], [4, 5]]}, 0),  # request 0: page -1, in use (kv_len 5)
        ({"cu_q_lens": [0, 2, 1, 6]}, 1),  # request 1 ends before it starts
        ({"cu_q_lens": [0, 2, 5, 9], "kv_lens": [5, 3, 4]}, 2),  # request 2 ends past token 8
        ({"cu_q_lens": [-1, 2, 5, 6]}, 0),  # request 0 starts before token 0
        ({"kv_lens": [1, 3, 2]}, 0),  # request 0: q_len 2 > kv_len 1
    ],
)
def test_live_requests_cut_at_the_first_bad_request(override, expected):
    assert live(**override) == expected


def test_live_requests_ignore_pages_a_request_does_not_use():
    assert live(pages=[[0, 1], [2, 99], [4, -7]]) == 3  # kv_lens 3 and 2: one page each


def test_live_requests_ignore_entries_past_num_seqs():
    # JAX-style zero padding past num_seqs, kvshard's (the total repeated), and garbage rows.
    assert live(cu_q_lens=[0, 2, 5, 0], num_seqs=2) == 2
    assert live(cu_q_lens=[0, 2, 5, 5], num_seqs=2) == 2
    assert live(pages=[[0, 1], [2, 3], [99, -1]], kv_lens=[5, 3, 99], num_seqs=2) == 2


@pytest.mark.parametrize("layer", [-1, 2, INT32_MAX, INT32_MIN])
def test_live_requests_with_a_bad_layer_serve_nothing(layer):
    assert live(layer=layer) == 0


# --------------------------------------------------------------------------------------------
# token_requests: the request of each token, and whether that request is live
# --------------------------------------------------------------------------------------------


def test_token_requests_of_every_live_request():
    seq, ok = token_requests(i32(CU_Q_LENS), i32(3), 8)
    assert_equal(seq, [0, 0, 1, 1, 1, 2, 2, 2])  # tokens 6, 7 are padding, clamped to 2
    assert_equal(ok, [True] * 6 + [False] * 2)
    assert seq.dtype == jnp.int32


def test_token_requests_with_jax_style_zero_padding():
    # max_num_seqs 4, 2 live requests; JAX pads cu_q_lens with zeros, which are not sorted.
    seq, ok = token_requests(i32([0, 2, 5, 0, 0]), i32(2), 8)
    assert_equal(seq, [0, 0, 1, 1, 1, 3, 3, 3])
    assert_equal(ok, [True] * 5 + [False] * 3)
    # kvshard's padding (the total repeated) reads the same.
    seq2, ok2 = token_requests(i32([0, 2, 5, 5, 5]), i32(2), 8)
    assert_equal(seq2, seq)
    assert_equal(ok2, ok)


def test_token_requests_past_the_live_count_are_not_live():
    _, ok = token_requests(i32(CU_Q_LENS), i32(1), 8)
    assert_equal(ok, [True, True] + [False] * 6)
    _, ok = token_requests(i32(CU_Q_LENS), i32(0), 8)
    assert not np.asarray(ok).any()


def test_token_requests_skip_an_empty_request():
    seq, ok = token_requests(i32([0, 2, 2, 5]), i32(3), 8)
    assert_equal(seq, [0, 0, 2, 2, 2, 2, 2, 2])
    assert_equal(ok, [True] * 5 + [False] * 3)


def test_requests_on_block_reads_the_geometry_from_the_block():
    kv = jnp.zeros((2, 32, 2, 1))  # 2 layers, 32 slots = 8 pages of 4
    args = (i32(PAGES), i32(KV_LENS), i32(CU_Q_LENS), i32([3]))
    count, seq, ok = requests_on_block(kv, i32(1), *args, num_tokens=8, page_size=4)
    assert int(count) == 3
    assert_equal(seq, [0, 0, 1, 1, 1, 2, 2, 2])
    assert_equal(ok, [True] * 6 + [False] * 2)
    count, _, ok = requests_on_block(kv, i32(2), *args, num_tokens=8, page_size=4)
    assert int(count) == 0 and not np.asarray(ok).any()
    # 16 slots: 4 pages, so request 2's pages 4 and 5 are out of range.
    count, _, _ = requests_on_block(kv[:, :16], i32(0), *args, num_tokens=8, page_size=4)
    assert int(count) == 2
