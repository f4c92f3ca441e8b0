"""Tests of the sharded combined-head cache (kvshard.cache) with the XLA backend.

Everything runs on the 8 simulated CPU devices of conftest.py. The oracle is a dense numpy
model of shape [L, G, slots, H, D] (G page pools) updated with kvshard.reference; every test
compares what kvshard.gather reads back (and, for the layout tests, the raw sharded array)
with it. The Pallas backend has its own file, test_cache_pallas.py (interpret mode is slow).
"""

from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kvshard import reference
from kvshard.cache import (
    CacheSpec,
    KVCache,
    check_tensor_parallel,
    copy_pages,
    gather,
    init_cache,
    update,
)
from kvshard.testing import update_slices

MESH_SHAPES = [(1, 8), (2, 4), (4, 2), (8, 1)]
HEADS = [1, 2, 4, 8, 16]


def make_mesh(shape, *, auto=False):
    """A (data, model) mesh over the first data·model devices."""
    types = (AxisType.Auto if auto else AxisType.Explicit,) * 2
    devices = jax.devices()[: shape[0] * shape[1]]
    return jax.make_mesh(shape, ("data", "model"), axis_types=types, devices=devices)


def small_spec(num_kv_heads=2, *, head_dim=64, dtype="float32", num_layers=3, **kw):
    kw = {"page_size": 4, "num_pages": 8, **kw}
    return CacheSpec(
        num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, **kw
    )


class Oracle:
    """Dense numpy model: k, v of shape [L, G, slots, H, D]."""

    def __init__(self, spec: CacheSpec, groups: int):
        shape = (spec.num_layers, groups, spec.slots_per_pool, spec.num_kv_heads, spec.head_dim)
        self.spec = spec
        self.k = np.zeros(shape, spec.np_dtype)
        self.v = np.zeros(shape, spec.np_dtype)

    def update(self, layer, k, v, slices, num, pooled):
        """k, v [(G,) T, H, D]; slices [(G,) 3, S]; num [(G,) 1]."""
        if not pooled:
            k, v, slices, num = k[None], v[None], slices[None], num[None]
        dtype = self.spec.np_dtype
        for g in range(self.k.shape[1]):
            for dense, new in ((self.k, k), (self.v, v)):
                dense[layer, g] = reference.kv_cache_update(
                    np.asarray(new[g]).astype(dtype), slices[g], dense[layer, g], num[g]
                )

    def raw(self, replication):
        """The expected stacked combined array [L, G·slots, 2·H·r, D_pad]."""
        spec = self.spec
        k, v = (np.repeat(x, replication, axis=-2) for x in (self.k, self.v))
        both = np.stack([k, v], axis=-2)  # [L, G, S, H·r, 2, D]
        shape = (spec.num_layers, -1, 2 * spec.num_kv_heads * replication, spec.head_dim)
        combined = both.reshape(shape)
        pad = spec.padded_head_dim - spec.head_dim
        return np.pad(combined, [(0, 0), (0, 0), (0, 0), (0, pad)])


def read_all(cache: KVCache, layer):
    """Everything layer `layer` holds, via gather: k, v as numpy [G, slots, H, D]."""
    slots = np.arange(cache.spec.slots_per_pool, dtype=np.int32)
    if cache.page_axis is not None:
        k, v = gather(cache, layer, np.tile(slots, (cache.dp, 1)))
        return np.asarray(k), np.asarray(v)
    k, v = gather(cache, layer, slots)
    return np.asarray(k)[None], np.asarray(v)[None]


def assert_matches(cache: KVCache, oracle: Oracle):
    for layer in range(cache.spec.num_layers):
        k, v = read_all(cache, layer)
        np.testing.assert_array_equal(k, oracle.k[layer])
        np.testing.assert_array_equal(v, oracle.v[layer])
    # cache.kv holds the storage dtype (bf16/fp8 bits on CPU): viewed as the cache dtype, the
    # raw stored values.
    raw = np.asarray(cache.kv).view(cache.dtype)
    np.testing.assert_array_equal(raw, oracle.raw(cache.replication))


def random_kv(rng, spec, num_tokens, groups=None):
    lead = () if groups is None else (groups,)
    shape = (*lead, num_tokens, spec.num_kv_heads, spec.head_dim)
    return (rng.standard_normal(shape).astype(np.float32) for _ in range(2))


def fixed_slices(groups=None):
    """Two live slices (page 1 offset 1, page 3 offset 0) and one padding column."""
    slices = np.array([[5, 0, 3], [12, 3, 4], [999, 0, 0]], np.int32).T.copy()
    num = np.array([2], np.int32)
    if groups is None:
        return slices, num
    # Each group writes different slots of its own pool.
    shift = np.array([[1], [0], [0]], np.int32)
    return np.stack([slices + 4 * (g % 4) * shift for g in range(groups)]), np.tile(
        num, (groups, 1)
    )


# --------------------------------------------------------------------------------------------
# Geometry (pure Python)
# --------------------------------------------------------------------------------------------


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
# Allocation and layout
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page_axis", [None, "data"])
@pytest.mark.parametrize("shape", MESH_SHAPES)
def test_init_cache_is_sharded(shape, page_axis):
    mesh = make_mesh(shape)
    dp, tp = (shape[0] if page_axis else 1), shape[1]
    for heads in HEADS:
        spec = small_spec(heads)
        cache = init_cache(spec, mesh, page_axis=page_axis)
        assert cache.tp == tp and cache.dp == dp
        assert cache.kv.shape == spec.global_shape(tp, dp)
        assert cache.kv.dtype == spec.np_dtype
        assert cache.kv.sharding.spec == P(None, page_axis, "model", None)
        # Every device holds exactly one shard of the per-device shape: never the whole cache.
        shards = cache.kv.addressable_shards
        assert len(shards) == 8
        assert {s.data.shape for s in shards} == {spec.local_shape(tp)}
        assert not np.asarray(cache.kv).any()


@pytest.mark.parametrize(("heads", "shape"), [(3, (2, 4)), (6, (1, 8)), (3, (4, 2)), (12, (1, 8))])
def test_init_cache_rejects_heads(heads, shape):
    with pytest.raises(ValueError, match=rf"size {shape[1]} .*num_kv_heads={heads}"):
        init_cache(small_spec(heads), make_mesh(shape))


def test_init_cache_rejects_axes():
    mesh, spec = make_mesh((2, 4)), small_spec()
    with pytest.raises(ValueError, match="head_axis='tensor' is not an axis"):
        init_cache(spec, mesh, head_axis="tensor")
    with pytest.raises(ValueError, match="page_axis='dp' is not an axis"):
        init_cache(spec, mesh, page_axis="dp")
    with pytest.raises(ValueError, match="must differ"):
        init_cache(spec, mesh, head_axis="model", page_axis="model")
    with pytest.raises(TypeError, match="Mesh"):
        init_cache(spec, "mesh")
    with pytest.raises(TypeError, match="CacheSpec"):
        init_cache((1, 2), mesh)
    mixed = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Explicit))
    with pytest.raises(ValueError, match="mixes axis types"):
        init_cache(spec, mixed)


def test_head_axis_none_keeps_all_heads_on_every_device():
    spec = small_spec(3)  # 3 heads: would not fit a 4- or 8-way head axis
    cache = init_cache(spec, make_mesh((2, 4)), head_axis=None, page_axis="data")
    assert cache.tp == 1 and cache.kv.addressable_shards[0].data.shape == spec.local_shape(1)
    rng = np.random.default_rng(0)
    k, v = random_kv(rng, spec, 7, groups=2)
    slices, num = fixed_slices(groups=2)
    oracle = Oracle(spec, 2)
    cache = update(cache, 2, k, v, slices, num)
    oracle.update(2, k, v, slices, num, pooled=True)
    assert_matches(cache, oracle)


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


# --------------------------------------------------------------------------------------------
# update / gather against the oracle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("auto", [False, True], ids=["explicit", "auto"])
@pytest.mark.parametrize("page_axis", [None, "data"])
@pytest.mark.parametrize("shape", MESH_SHAPES)
def test_update_gather_all_meshes_and_heads(shape, page_axis, auto):
    mesh = make_mesh(shape, auto=auto)
    rng = np.random.default_rng(1)
    groups = shape[0] if page_axis else None
    for heads in HEADS if not auto else [1, 16]:
        spec = small_spec(heads, num_layers=2)
        cache = init_cache(spec, mesh, page_axis=page_axis)
        oracle = Oracle(spec, groups or 1)
        slices, num = fixed_slices(groups)
        for layer in (1, 0):
            k, v = random_kv(rng, spec, 9, groups)
            cache = update(cache, layer, k, v, slices, num, backend="xla")
            oracle.update(layer, k, v, slices, num, pooled=page_axis is not None)
        assert_matches(cache, oracle)


def _draw_pool_slices(draw, spec, max_slices):
    return draw(
        update_slices(
            page_size=spec.page_size,
            num_pages=spec.num_pages,
            max_slices=max_slices,
            max_padding=2,
            fixed_shapes=True,
        )
    )


@st.composite
def update_sequences(draw):
    """(mesh shape, heads, page_axis, dtype, [(layer, slices, num, num_tokens)...])."""
    shape = draw(st.sampled_from(MESH_SHAPES))
    heads = draw(st.sampled_from(HEADS))
    page_axis = draw(st.sampled_from([None, "data"]))
    dtype = draw(st.sampled_from(["float32", "bfloat16"]))
    spec = small_spec(heads, dtype=dtype)
    groups = shape[0] if page_axis else 1
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        layer = draw(st.integers(0, spec.num_layers - 1))
        drawn = [_draw_pool_slices(draw, spec, max_slices=4) for _ in range(groups)]
        slices = np.stack([d[0] for d in drawn])
        num = np.stack([d[1] for d in drawn])
        steps.append((layer, slices, num, drawn[0][2]))
    return shape, spec, page_axis, steps


@settings(max_examples=15)
@given(update_sequences(), st.randoms(use_true_random=False))
def test_random_updates_match_dense_oracle(case, rand):
    shape, spec, page_axis, steps = case
    pooled = page_axis is not None
    mesh = make_mesh(shape)
    cache = init_cache(spec, mesh, page_axis=page_axis)
    oracle = Oracle(spec, shape[0] if pooled else 1)
    rng = np.random.default_rng(rand.getrandbits(32))
    for layer, slices, num, num_tokens in steps:
        k, v = (x.astype(spec.np_dtype) for x in random_kv(rng, spec, num_tokens, slices.shape[0]))
        if not pooled:
            k, v, slices, num = k[0], v[0], slices[0], num[0]
        cache = update(cache, layer, k, v, slices, num, backend="xla")
        oracle.update(layer, k, v, slices, num, pooled)
    assert_matches(cache, oracle)


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


def test_auto_backend_matches_xla_on_cpu():
    spec = small_spec(2)
    mesh = make_mesh((2, 4))
    rng = np.random.default_rng(3)
    k, v = random_kv(rng, spec, 8)
    slices, num = fixed_slices()
    a = update(init_cache(spec, mesh), 0, k, v, slices, num, backend="auto")
    b = update(init_cache(spec, mesh), 0, k, v, slices, num, backend="xla")
    np.testing.assert_array_equal(np.asarray(a.kv), np.asarray(b.kv))


def test_padding_and_out_of_contract_slices_write_nothing_when_traced():
    """Inside jit the values are unchecked; the xla backend still writes only valid slices."""
    spec = small_spec(2)
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
# In place, donation, compilation
# --------------------------------------------------------------------------------------------


def _sds(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


@pytest.mark.parametrize("page_axis", [None, "data"])
def test_update_is_in_place(page_axis):
    # Big enough that one layer on one device (1 MiB) dwarfs the new tokens (128 KiB).
    spec = CacheSpec(
        num_layers=4, num_kv_heads=8, head_dim=128, page_size=16, num_pages=64, dtype="float32"
    )
    mesh = make_mesh((2, 4))
    cache = init_cache(spec, mesh, page_axis=page_axis)
    dp = 2 if page_axis else None
    rng = np.random.default_rng(5)
    k, v = random_kv(rng, spec, 32, dp)
    slices, num = fixed_slices(dp)
    layer_bytes_per_device = spec.bytes_per_device(4) // spec.num_layers
    rep = NamedSharding(mesh, P())
    args = [jax.device_put(x, rep) for x in (np.int32(0), k, v, slices, num)]
    write = lambda c, *a: update(c, *a, backend="xla")  # the caller's own jit, cache donated
    compiled = jax.jit(write, donate_argnums=0).lower(cache, *args).compile()
    stats = compiled.memory_analysis()
    assert stats.temp_size_in_bytes < layer_bytes_per_device // 4, stats
    # The donated cache is the output buffer.
    assert stats.alias_size_in_bytes >= spec.bytes_per_device(4), stats

    before = cache.kv
    new = update(cache, 3, k, v, slices, num)
    assert before.is_deleted()
    assert not new.kv.is_deleted()
    with pytest.raises(RuntimeError, match=r"deleted|donated"):
        np.asarray(before)


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


class _CompileLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_one_executable_serves_every_layer():
    # Shapes no other test uses, so the first call below must compile (a positive control).
    spec = small_spec(4, num_layers=5)
    mesh = make_mesh((4, 2))
    cache = init_cache(spec, mesh)
    rng = np.random.default_rng(6)
    slices, num = fixed_slices()
    handler = _CompileLog()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            k, v = random_kv(rng, spec, 11)
            cache = update(cache, 0, k, v, slices, num)
            for layer in (1, 2, np.int32(3), np.int64(4), jnp.int32(2), 0):
                k, v = random_kv(rng, spec, 11)
                cache = update(cache, layer, k, v, slices, num)
    finally:
        logger.removeHandler(handler)
    compiles = [m for m in handler.messages if re.search(r"Compiling jit\(_write\)", m)]
    assert len(compiles) == 1, compiles


def test_scan_over_layers_with_traced_layer():
    spec = small_spec(2, num_layers=4)
    mesh = make_mesh((2, 4))
    cache = init_cache(spec, mesh, page_axis="data")
    rng = np.random.default_rng(7)
    ks, vs = zip(*(random_kv(rng, spec, 9, 2) for _ in range(4)), strict=True)
    ks, vs = np.stack(ks), np.stack(vs)  # [L, G, T, H, D]
    slices, num = fixed_slices(2)

    @jax.jit
    def step(cache, ks, vs, slices, num):
        def body(cache, xs):
            layer, k, v = xs
            return update(cache, layer, k, v, slices, num), None

        cache, _ = jax.lax.scan(body, cache, (jnp.arange(4), ks, vs))
        # A traced layer on the read side too.
        reads = jax.lax.map(
            lambda layer: gather(cache, layer, jnp.tile(jnp.arange(8), (2, 1))), jnp.arange(4)
        )
        return cache, reads

    cache, (k_read, _) = step(cache, ks, vs, slices, num)
    oracle = Oracle(spec, 2)
    for layer in range(4):
        oracle.update(layer, ks[layer], vs[layer], slices, num, pooled=True)
    assert_matches(cache, oracle)
    np.testing.assert_array_equal(np.asarray(k_read), oracle.k[:, :, :8])


def test_update_inside_user_jit_with_donation():
    spec = small_spec(8)
    mesh = make_mesh((1, 8), auto=True)
    cache = init_cache(spec, mesh)
    rng = np.random.default_rng(8)
    k, v = random_kv(rng, spec, 8)
    slices, num = fixed_slices()
    step = jax.jit(lambda c, k, v, s, n: update(c, 1, k, v, s, n), donate_argnums=0)
    before = cache.kv
    new = step(cache, k, v, slices, num)
    assert before.is_deleted()
    oracle = Oracle(spec, 1)
    oracle.update(1, k, v, slices, num, pooled=False)
    assert_matches(new, oracle)


# --------------------------------------------------------------------------------------------
# Validation: every bad input raises before donation, the cache survives
# --------------------------------------------------------------------------------------------


def _bad_update_calls():
    s, n = fixed_slices()
    k = np.zeros((8, 2, 64), np.float32)
    cross = s.copy()
    cross[:, 0] = [6, 0, 3]
    too_long = s.copy()
    too_long[:, 0] = [4, 0, 5]
    overrun = s.copy()
    overrun[:, 1] = [12, 6, 4]
    past = s.copy()
    past[:, 1] = [30, 3, 4]
    neg = s.copy()
    neg[:, 0] = [-4, 0, 3]
    dup_dst = s.copy()
    dup_dst[:, 1] = [6, 3, 1]
    dup_src = s.copy()
    dup_src[:, 1] = [12, 1, 2]
    return [
        ("layer", dict(layer=3), ValueError, r"layer=3 is out of range \[0, 3\)"),
        ("layer<0", dict(layer=-1), ValueError, r"layer=-1 is out of range"),
        ("layer float", dict(layer=1.0), TypeError, "layer must be an integer scalar"),
        ("layer vector", dict(layer=np.array([1])), TypeError, "layer must be an integer"),
        ("k rank", dict(k=k[0]), ValueError, r"k must have shape \[T, num_kv_heads, head_dim\]"),
        ("k heads", dict(k=np.zeros((8, 3, 64), np.float32)), ValueError, r"k must .*got \[8, 3"),
        ("v head_dim", dict(v=np.zeros((8, 2, 128), np.float32)), ValueError, r"v must have"),
        ("k/v T", dict(v=np.zeros((7, 2, 64), np.float32)), ValueError, "k and v shapes differ"),
        ("k int", dict(k=k.astype(np.int32), v=k.astype(np.int32)), TypeError, "k has dtype int32"),
        ("k/v dtype", dict(v=k.astype(np.float16)), TypeError, "k and v dtypes differ"),
        (
            "slices dtype",
            dict(slices=s.astype(np.float32)),
            TypeError,
            "slices must be an integer array",
        ),
        (
            "slices past int32",
            dict(slices=np.where(s == 4, 2**31, s.astype(np.int64))),
            ValueError,
            r"slices contains 2147483648, outside int32 \[-2147483648, 2147483647\]",
        ),
        (
            "slices shape",
            dict(slices=np.zeros((4, 3), np.int32)),
            ValueError,
            r"slices must have shape \[3, S\]",
        ),
        ("num shape", dict(num_slices=np.array([2, 0], np.int32)), ValueError, "num_slices must"),
        (
            "num dtype",
            dict(num_slices=n.astype(np.float32)),
            TypeError,
            "num_slices must be an integer array",
        ),
        (
            "num range",
            dict(num_slices=np.array([4], np.int32)),
            ValueError,
            r"num_slices=4 must be in \[0, 3\]",
        ),
        ("num neg", dict(num_slices=np.array([-1], np.int32)), ValueError, "num_slices=-1"),
        ("cross page", dict(slices=cross), ValueError, r"slices\[:, 0\].*crosses a page"),
        ("too long", dict(slices=too_long), ValueError, r"slice_len 5 must be <= page_size 4"),
        (
            "tokens",
            dict(slices=overrun),
            ValueError,
            r"slices\[:, 1\]: new_kv_start \+ slice_len 10 must be <= num_tokens 8",
        ),
        (
            "slots",
            dict(slices=past),
            ValueError,
            r"kv_cache_start \+ slice_len 34 must be <= cache rows 32",
        ),
        (
            "negative",
            dict(slices=neg),
            ValueError,
            r"slices\[:, 0\]: kv_cache_start -4 must be >= 0",
        ),
        ("overlap dst", dict(slices=dup_dst), ValueError, "overlaps the destination of slice"),
        ("overlap src", dict(slices=dup_src), ValueError, "overlaps the source of slice"),
        ("backend", dict(backend="cuda"), ValueError, "backend='cuda'"),
        ("cache", dict(cache="cache"), TypeError, "cache must be a KVCache"),
    ]


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [c[1:] for c in _bad_update_calls()],
    ids=[c[0] for c in _bad_update_calls()],
)
def test_bad_update_raises_and_keeps_cache(override, error, match):
    spec = small_spec(2)
    cache = init_cache(spec, make_mesh((2, 4)))
    rng = np.random.default_rng(9)
    k, v = random_kv(rng, spec, 8)
    slices, num = fixed_slices()
    cache = update(cache, 1, k, v, slices, num)
    snapshot = np.asarray(cache.kv)
    args = dict(cache=cache, layer=1, k=k, v=v, slices=slices, num_slices=num, backend="xla")
    args.update(override)
    with pytest.raises(error, match=match):
        update(**args)
    assert not cache.kv.is_deleted()
    np.testing.assert_array_equal(np.asarray(cache.kv), snapshot)
    # Still usable.
    update(cache, 0, k, v, slices, num)


def test_bad_pooled_update_names_the_pool():
    spec = small_spec(2)
    cache = init_cache(spec, make_mesh((2, 4)), page_axis="data")
    rng = np.random.default_rng(10)
    k, v = random_kv(rng, spec, 8, 2)
    slices, num = fixed_slices(2)
    global_slices = slices.copy()
    global_slices[1, 0, :2] += spec.slots_per_pool  # group 1 addressing global slot ids
    with pytest.raises(ValueError, match=r"slices\[1\]\[:, 0\].*another data-parallel pool"):
        update(cache, 0, k, v, global_slices, num)
    with pytest.raises(ValueError, match=r"slices must have shape \[dp, 3, S\] = \[2, 3, \*\]"):
        update(cache, 0, k, v, slices[0], num)
    with pytest.raises(ValueError, match=r"k must have shape \[dp, T, num_kv_heads, head_dim\]"):
        update(cache, 0, k[0], v[0], slices, num)
    with pytest.raises(ValueError, match=r"num_slices must have shape \[dp, 1\]"):
        update(cache, 0, k, v, slices, num[0])
    assert not cache.kv.is_deleted()
    assert not np.asarray(cache.kv).any()


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


# --------------------------------------------------------------------------------------------
# copy_pages
# --------------------------------------------------------------------------------------------


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


def test_kvcache_is_a_pytree():
    spec = small_spec(2)
    cache = init_cache(spec, make_mesh((2, 4)))
    leaves, treedef = jax.tree.flatten(cache)
    assert len(leaves) == 1 and leaves[0] is cache.kv
    again = jax.tree.unflatten(treedef, leaves)
    assert again.spec == spec and again.mesh == cache.mesh and again.head_axis == "model"
    assert isinstance(jax.tree.map(_sds, cache), KVCache)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    assert init_cache(spec, mesh).kv.sharding.mesh == mesh
