"""Tests for kvshard.metadata: update slices vs vLLM's loop, the numpy oracle, and padding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshard import reference
from kvshard.metadata import (
    build_update_slices,
    pad_slices,
    padded_num_slices,
    padded_token_count,
    token_buckets,
)


def vllm_loop_slices(computed, scheduled, page_table, page_size) -> np.ndarray:
    """Per-request Python loop following vLLM's TPU runner; returns int32[3, S]."""
    columns = []
    new_kv_start = 0
    for i, (c, n) in enumerate(zip(computed, scheduled, strict=True)):
        if n == 0:
            continue
        start, end = c, c + n
        for page_index in range(start // page_size, (end - 1) // page_size + 1):
            lo = start % page_size if page_index == start // page_size else 0
            hi = (end - 1) % page_size + 1 if page_index == (end - 1) // page_size else page_size
            page = int(page_table[i][page_index])
            columns.append((page * page_size + lo, new_kv_start, hi - lo))
            new_kv_start += hi - lo
    return np.array(columns, np.int32).reshape(-1, 3).T


def expected_slots(computed, scheduled, page_table, page_size) -> np.ndarray:
    """int64[T]: the cache slot of every scheduled token, in batch order."""
    slots = [
        int(page_table[i][t // page_size]) * page_size + t % page_size
        for i, (c, n) in enumerate(zip(computed, scheduled, strict=True))
        for t in range(c, c + n)
    ]
    return np.array(slots, np.int64)


@st.composite
def batches(draw, max_reqs: int = 8):
    """A random step: page-crossing prefills, single-token decodes and idle requests."""
    page_size = draw(st.sampled_from([1, 2, 4, 16]))
    num_reqs = draw(st.integers(1, max_reqs))
    computed, scheduled = [], []
    for _ in range(num_reqs):
        computed.append(draw(st.integers(0, 3 * page_size + 3)))
        kind = draw(st.sampled_from(["decode", "prefill", "idle"]))
        scheduled.append({"decode": 1, "idle": 0}.get(kind) or draw(st.integers(1, 4 * page_size)))
    width = (
        max((c + n + page_size - 1) // page_size for c, n in zip(computed, scheduled, strict=True))
        + 1
    )
    # Distinct pages across the batch (page 0 excluded) so overlapping writes would show up.
    ids = draw(st.permutations(list(range(1, num_reqs * width + 1))))
    table = np.array(ids, np.int32).reshape(num_reqs, width)
    return np.array(computed), np.array(scheduled), table, page_size


def test_published_vectors():
    table = np.zeros((2, 3), np.int32)
    table[0, 0] = 100
    table[1] = [200, 201, 202]
    got = build_update_slices([0, 10], [10, 30], table, 16)
    want = np.array([[1600, 0, 10], [3210, 10, 6], [3216, 16, 16], [3232, 32, 8]]).T
    assert got.dtype == np.int32 and got.shape == (3, 4)
    np.testing.assert_array_equal(got, want)
    got = build_update_slices([5], [20], np.array([[50, 51]]), 16)
    np.testing.assert_array_equal(got, np.array([[805, 0, 11], [816, 11, 9]]).T)


@given(batches())
@settings(max_examples=100)
def test_matches_vllm_loop(batch):
    computed, scheduled, table, page_size = batch
    got = build_update_slices(computed, scheduled, table, page_size)
    np.testing.assert_array_equal(got, vllm_loop_slices(computed, scheduled, table, page_size))
    assert got.dtype == np.int32


@given(batches(), st.data())
@settings(max_examples=50)
def test_rows_argument_equals_gathered_table(batch, data):
    computed, scheduled, table, page_size = batch
    # Put each request's row somewhere else in a bigger table.
    rows = np.array(data.draw(st.permutations(list(range(len(computed) + 3))))[: len(computed)])
    big = np.zeros((len(computed) + 3, table.shape[1]), np.int32)
    big[rows] = table
    got = build_update_slices(computed, scheduled, big, page_size, rows=rows)
    np.testing.assert_array_equal(got, build_update_slices(computed, scheduled, table, page_size))


@given(batches())
@settings(max_examples=50)
def test_oracle_writes_exactly_the_scheduled_tokens(batch):
    computed, scheduled, table, page_size = batch
    slices = build_update_slices(computed, scheduled, table, page_size)
    num_tokens = int(scheduled.sum())
    rng = np.random.default_rng(0)
    cache = rng.standard_normal((int(table.max() + 1) * page_size, 2, 1)).astype(np.float32)
    new_kv = rng.standard_normal((num_tokens + 3, 2, 1)).astype(np.float32)  # + padding rows
    slots = expected_slots(computed, scheduled, table, page_size)
    got = reference.kv_cache_update(new_kv, slices, cache, slices.shape[1])
    np.testing.assert_array_equal(got, reference.scatter_tokens(cache, slots, new_kv[:num_tokens]))
    np.testing.assert_array_equal(reference.slices_to_slots(slices, slices.shape[1]), slots)
    # Padding columns are no-ops for the oracle too.
    padded, num, _ = pad_slices(
        slices, num_tokens, max_num_seqs=8, page_size=page_size, buckets=token_buckets(1, 1024)
    )
    np.testing.assert_array_equal(reference.kv_cache_update(new_kv, padded, cache, num), got)
    np.testing.assert_array_equal(reference.kv_cache_update(new_kv, padded, cache, 10**6), got)


@given(batches(max_reqs=8), st.sampled_from([0, 64]))
@settings(max_examples=100)
def test_slice_count_within_padded_bound(batch, gap):
    computed, scheduled, table, page_size = batch
    slices = build_update_slices(computed, scheduled, table, page_size)
    num_tokens = int(scheduled.sum())
    assert slices.shape[1] <= padded_num_slices(num_tokens, 8, page_size)
    buckets = token_buckets(16, 4096, gap)
    padded, num, padded_tokens = pad_slices(
        slices, num_tokens, max_num_seqs=8, page_size=page_size, buckets=buckets
    )
    assert padded_tokens in buckets and padded_tokens >= num_tokens
    assert padded.shape == (3, padded_num_slices(padded_tokens, 8, page_size))
    assert padded.dtype == np.int32 and num.dtype == np.int32 and num.shape == (1,)
    assert int(num[0]) == slices.shape[1]
    np.testing.assert_array_equal(padded[:, : num[0]], slices)
    assert not padded[:, num[0] :].any()


def test_zero_token_requests_produce_no_slices():
    table = np.array([[1, 2], [3, 4], [5, 6]], np.int32)
    got = build_update_slices([3, 0, 5], [0, 0, 0], table, 4)
    assert got.shape == (3, 0) and got.dtype == np.int32
    got = build_update_slices([3, 0, 5], [0, 2, 0], table, 4)
    np.testing.assert_array_equal(got, [[12], [0], [2]])
    assert build_update_slices([], [], np.zeros((0, 4), np.int32), 4).shape == (3, 0)


def test_decode_step_one_slice_per_request():
    table = np.arange(1, 9, dtype=np.int32).reshape(4, 2)
    got = build_update_slices([0, 3, 4, 7], [1, 1, 1, 1], table, 4)
    np.testing.assert_array_equal(got, [[4, 15, 24, 35], [0, 1, 2, 3], [1, 1, 1, 1]])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([0, 1], [1], np.ones((2, 2), np.int32), 4), "num_computed_tokens has shape"),
        (([-1], [1], np.ones((1, 2), np.int32), 4), r"num_computed_tokens\[0\]=-1"),
        (([0], [-2], np.ones((1, 2), np.int32), 4), r"num_scheduled_tokens\[0\]=-2"),
        (([[0]], [[1]], np.ones((1, 2), np.int32), 4), "num_computed_tokens must be 1-D"),
        (([0.5], [1], np.ones((1, 2), np.int32), 4), "num_computed_tokens must hold integers"),
        (([0], [1], np.ones(2, np.int32), 4), "page_table must be a 2-D"),
        (([0, 0], [1, 1], np.ones((1, 2), np.int32), 4), "page_table has 1 rows, fewer than 2"),
        (([4], [5], np.ones((1, 2), np.int32), 4), "page index 2, beyond page_table width 2"),
        (([0], [1], np.ones((1, 2), np.int32), 0), "page_size=0"),
    ],
)
def test_validation_errors(args, match):
    with pytest.raises(ValueError, match=match):
        build_update_slices(*args)


def test_rows_validation():
    table = np.ones((2, 2), np.int32)
    with pytest.raises(ValueError, match="rows has shape"):
        build_update_slices([0], [1], table, 4, rows=[0, 1])
    with pytest.raises(ValueError, match="rows holds 5"):
        build_update_slices([0], [1], table, 4, rows=[5])


def test_int32_overflow_is_an_error():
    with pytest.raises(ValueError, match="overflow int32"):
        build_update_slices([0], [1], np.array([[2**30]], np.int64), 4)


def test_padded_num_slices_formula():
    assert padded_num_slices(16, 8, 16) == 16  # capped by tokens
    assert padded_num_slices(1024, 8, 16) == 2 * 8 + 64
    assert padded_num_slices(0, 8, 16) == 0
    with pytest.raises(ValueError, match="max_num_seqs=-1"):
        padded_num_slices(16, -1, 16)


def test_token_buckets():
    assert token_buckets(16, 1000, 256) == [16, 32, 64, 128, 256, 512, 768, 1024]
    assert token_buckets(16, 1000) == [16, 32, 64, 128, 256, 512, 1024]
    assert token_buckets(16, 16) == [16]
    with pytest.raises(ValueError, match="min_tokens=12"):
        token_buckets(12, 100)
    assert padded_token_count(17, [16, 32]) == 32
    assert padded_token_count(0, [16, 32]) == 16
    with pytest.raises(ValueError, match="num_tokens=33 exceeds the largest bucket 32"):
        padded_token_count(33, [16, 32])


def test_pad_slices_rejects_too_many_slices():
    table = np.arange(1, 11, dtype=np.int32).reshape(10, 1)
    slices = build_update_slices(np.zeros(10, int), np.ones(10, int), table, 4)
    with pytest.raises(ValueError, match="more than the bound"):
        pad_slices(slices, 10, max_num_seqs=2, page_size=4, buckets=[16])


def test_pad_slices_max_num_reqs_is_a_deprecated_spelling():
    slices = np.array([[0], [0], [3]], np.int32)
    want = pad_slices(slices, 3, max_num_seqs=2, page_size=4, buckets=[16])
    with pytest.warns(DeprecationWarning, match="max_num_seqs"):
        got = pad_slices(slices, 3, max_num_reqs=2, page_size=4, buckets=[16])
    np.testing.assert_array_equal(got[0], want[0])
    assert got[2] == want[2] == 16
