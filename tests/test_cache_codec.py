"""Tests of kvshard.cache._codec through the public operations: how values are stored.

The combined-head layout (each device holds the K and V of whole, possibly replicated, heads)
read from the raw shards, and the storage dtypes' round trip through update and gather.
Quantization with real scales is test_quant.py's.
"""

from __future__ import annotations

import numpy as np
import pytest
from _cache_helpers import Oracle, assert_matches, fixed_slices, make_mesh, small_spec

from kvshard.cache import init_cache, update


@pytest.mark.parametrize(("heads", "shape"), [(2, (1, 8)), (1, (2, 4)), (8, (2, 4)), (4, (4, 2))])
def test_each_device_holds_k_and_v_of_whole_heads(heads, shape):
    """Device i on the head axis holds K and V (interleaved) of replicated heads it owns."""
    mesh = make_mesh(shape)
    spec = small_spec(heads, head_dim=128, num_layers=1)
    cache = init_cache(spec, mesh)
    # Token t of head h, K = 1000·h + t + 0.25, V = -(same): identifies head and K/V on sight.
    t = np.arange(8, dtype=np.float32)[:, None, None]
    h = np.arange(heads, dtype=np.float32)[None, :, None]
    k = np.broadcast_to(1000 * h + t + 0.25, (8, heads, 128)).astype(np.float32)
    slices = np.array([[0], [0], [4]], np.int32)
    cache = update(cache, 0, k, -k, slices, np.array([1], np.int32))
    r, tp = cache.replication, shape[1]
    per_dev = spec.heads_per_device(tp)
    for shard in cache.kv.addressable_shards:
        i = shard.index[2].start // (2 * per_dev)  # position on the head axis
        local = np.asarray(shard.data)[0, :4, :, 0]  # [slots, combined]
        for j in range(per_dev):
            head = (i * per_dev + j) // r
            np.testing.assert_array_equal(local[:, 2 * j], 1000 * head + np.arange(4) + 0.25)
            np.testing.assert_array_equal(local[:, 2 * j + 1], -(1000 * head + np.arange(4) + 0.25))


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn", "float16", "bfloat16"])
def test_narrow_dtypes_round_trip(dtype):
    # Unit scales: quantizing these exactly representable values is the identity
    # (tests/test_quant.py covers real scales).
    scales = {"k_scale": 1.0, "v_scale": 1.0} if dtype in ("int8", "float8_e4m3fn") else {}
    spec = small_spec(4, dtype=dtype, head_dim=128, **scales)
    cache = init_cache(spec, make_mesh((2, 4)))
    rng = np.random.default_rng(2)
    shape = (7, 4, 128)
    if dtype == "int8":
        k = rng.integers(-128, 128, shape).astype(np.int8)
        v = rng.integers(-128, 128, shape).astype(np.int8)
    else:  # values exactly representable in every tested float dtype
        k, v = (rng.integers(-8, 8, shape).astype(np.float32) / 4 for _ in range(2))
    slices, num = fixed_slices()
    cache = update(cache, 1, k, v, slices, num)
    oracle = Oracle(spec, 1)
    oracle.update(1, k, v, slices, num, pooled=False)
    assert_matches(cache, oracle)
