"""Tests of kvshard._geometry.layout through its public names: :class:`kvshard.CacheSpec` and
:func:`kvshard.check_tensor_parallel` (pure Python geometry, no devices)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kvshard.cache import CacheSpec, check_tensor_parallel


@pytest.mark.parametrize(
    ("heads", "tp", "expected"),
    [(8, 1, 1), (8, 2, 1), (8, 8, 1), (16, 8, 1), (1, 8, 8), (2, 8, 4), (4, 8, 2), (2, 4, 2)],
)
def test_check_tensor_parallel(heads, tp, expected):
    assert check_tensor_parallel(heads, tp) == expected


@pytest.mark.parametrize(("heads", "tp"), [(3, 2), (6, 4), (3, 8), (12, 8), (4, 3)])
def test_check_tensor_parallel_rejects(heads, tp):
    with pytest.raises(ValueError, match=rf"size {tp} .*num_kv_heads={heads}") as info:
        check_tensor_parallel(heads, tp)
    divisors = [d for d in range(1, heads + 1) if heads % d == 0]
    assert f"({', '.join(map(str, divisors))})" in str(info.value)
    assert f"({2 * heads}, {3 * heads}" in str(info.value)


@pytest.mark.parametrize(("heads", "tp"), [(0, 1), (1, 0), (-2, 2), (2.0, 2), (True, 2)])
def test_check_tensor_parallel_bad_numbers(heads, tp):
    with pytest.raises(ValueError, match="must be a positive int"):
        check_tensor_parallel(heads, tp)


def test_spec_is_hashable_and_canonical():
    a = CacheSpec(2, 4, 128, 16, 32, dtype=jnp.bfloat16)
    b = CacheSpec(2, 4, 128, 16, 32, dtype="bfloat16")
    c = CacheSpec(2, 4, 128, 16, 32, dtype=np.dtype(jnp.float8_e4m3fn), k_scale=1, v_scale=1)
    assert a == b and hash(a) == hash(b) and a.dtype == "bfloat16"
    assert c.dtype == "float8_e4m3fn" and c.bits == 8 and c.packing == 4
    assert CacheSpec(1, 1, 1, 1, 1, dtype=np.float16).dtype == "float16"
    assert {a: 1}[b] == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_layers", 0),
        ("num_kv_heads", -1),
        ("head_dim", 2.5),
        ("page_size", None),
        ("num_pages", True),
        ("dtype", "int32"),
        ("dtype", jnp.complex64),
        ("dtype", "nope"),
    ],
)
def test_spec_rejects(field, value):
    kw = dict(num_layers=1, num_kv_heads=1, head_dim=1, page_size=1, num_pages=1)
    kw[field] = value
    with pytest.raises(ValueError, match=field if field != "dtype" else "dtype"):
        CacheSpec(**kw)


@pytest.mark.parametrize(
    ("dtype", "bits"), [("float32", 32), ("bfloat16", 16), ("float16", 16), ("int8", 8)]
)
def test_spec_derived_sizes(dtype, bits):
    scales = {"k_scale": 0.5, "v_scale": 0.25} if dtype == "int8" else {}
    spec = CacheSpec(
        num_layers=3, num_kv_heads=2, head_dim=80, page_size=16, num_pages=10, dtype=dtype, **scales
    )
    assert spec.padded_head_dim == 128
    assert spec.replication(8) == 4 and spec.replication(2) == 1
    assert spec.combined_heads(8) == 16 and spec.combined_heads(1) == 4
    assert spec.heads_per_device(8) == 1 and spec.heads_per_device(1) == 2
    assert spec.combined_heads_per_device(2) == 2
    packing = 32 // bits
    for tp in (1, 2, 8):
        per_dev = spec.combined_heads_per_device(tp)
        padded = -(-per_dev // packing) * packing
        assert spec.page_bytes_per_device(tp) == 16 * padded * 128 * bits // 8
        assert spec.bytes_per_device(tp) == 3 * 10 * spec.page_bytes_per_device(tp)
        assert spec.bytes_per_device(tp, dp=4) == spec.bytes_per_device(tp)
    assert spec.global_shape(8, 2) == (3, 2 * 160, 16, 128)
    assert spec.local_shape(8) == (3, 160, 2, 128)
    with pytest.raises(ValueError, match="dp=0"):
        spec.bytes_per_device(1, dp=0)


# --------------------------------------------------------------------------------------------
# kv_layout: interleaved K, V rows or packed K|V rows (issue 21)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head_dim", "layout"),
    [(1, "packed"), (32, "packed"), (64, "packed"), (65, "interleaved"), (128, "interleaved")],
)
def test_default_kv_layout_packs_when_k_and_v_fit_one_row(head_dim, layout):
    spec = CacheSpec(1, 2, head_dim, 16, 4)
    assert spec.kv_layout == layout and spec.packed == (layout == "packed")
    assert spec == CacheSpec(1, 2, head_dim, 16, 4, kv_layout=layout)  # the same, hashable
    assert hash(spec) == hash(CacheSpec(1, 2, head_dim, 16, 4, kv_layout=layout))


def test_unknown_kv_layout_is_refused_naming_the_value():
    with pytest.raises(ValueError, match=r"kv_layout='combined' must be None or one of"):
        CacheSpec(1, 2, 64, 16, 4, kv_layout="combined")


@pytest.mark.parametrize(
    # (head_dim, kv_layout, dtype, tp, rows a device, lanes, lane pad, packing pad) per page
    # of 16 slots, 4 KV heads, by hand from docs/layout.md.
    ("head_dim", "layout", "dtype", "tp", "rows", "lanes", "lane_pad", "pack_pad"),
    [
        # 64 packed, f32: 4 heads x 1 row of 128 lanes, every lane a value.
        (64, "packed", "float32", 1, 4, 128, 0, 0),
        # 64 interleaved: 8 rows of 128 lanes, lanes 64..127 zeros: 16 x 8 x 64 x 4 B.
        (64, "interleaved", "float32", 1, 8, 128, 16 * 8 * 64 * 4, 0),
        # 32 packed: K|V in 64 of 128 lanes: 16 x 4 x 64 x 4 B of lane padding.
        (32, "packed", "float32", 1, 4, 128, 16 * 4 * 64 * 4, 0),
        # 64 packed bf16 on tp 4: one row a device, stored as 2 (packing): 16 x 1 x 128 x 2 B.
        (64, "packed", "bfloat16", 4, 1, 128, 0, 16 * 1 * 128 * 2),
        # 96 packed (asked for): K|V in 192 of 256 lanes.
        (96, "packed", "float32", 2, 2, 256, 16 * 2 * 64 * 4, 0),
    ],
)
def test_layout_rows_lanes_and_padding_by_hand(
    head_dim, layout, dtype, tp, rows, lanes, lane_pad, pack_pad
):
    spec = CacheSpec(2, 4, head_dim, 16, 10, dtype, kv_layout=layout)
    assert spec.combined_heads_per_device(tp) == rows and spec.padded_head_dim == lanes
    assert spec.local_shape(tp) == (2, 160, rows, lanes)
    assert spec.global_shape(tp, 3) == (2, 480, rows * tp, lanes)
    assert spec.lane_padding_bytes_per_page(tp) == lane_pad
    assert spec.packing_padding_bytes_per_page(tp) == pack_pad
    item = 4 if dtype == "float32" else 2
    kv = 16 * (4 // tp) * 2 * head_dim * item  # K and V of every head a device holds
    assert spec.kv_bytes_per_page(tp) == kv
    assert spec.page_bytes_per_device(tp) == kv + lane_pad + pack_pad
