"""Tests of kvshard.cache._pytree through its public names: :class:`KVCache`,
:func:`init_cache`, :func:`abstract_cache` and :func:`check_cache` (the refusal of a cache that
is not a live KVCache, the first check of every device operation).

The layout of values inside the array is test_cache_codec.py's; abstract_cache's use for
ahead-of-time compilation is test_aot.py's.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from _cache_helpers import (
    HEADS,
    MESH_SHAPES,
    Oracle,
    assert_matches,
    fixed_slices,
    make_mesh,
    random_kv,
    small_spec,
)
from _scripts import ROOT
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from kvshard.cache import KVCache, abstract_cache, check_cache, init_cache, update

# --------------------------------------------------------------------------------------------
# init_cache: allocation, sharding, refused geometry
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_layout", ["interleaved", "packed"])
@pytest.mark.parametrize("page_axis", [None, "data"])
@pytest.mark.parametrize("shape", MESH_SHAPES)
def test_init_cache_is_sharded(shape, page_axis, kv_layout):
    mesh = make_mesh(shape)
    dp, tp = (shape[0] if page_axis else 1), shape[1]
    for heads in HEADS:
        spec = small_spec(heads, kv_layout=kv_layout)
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


# --------------------------------------------------------------------------------------------
# KVCache: a pytree with one leaf
# --------------------------------------------------------------------------------------------


def _sds(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


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


def test_kvcache_properties():
    cache = init_cache(small_spec(1), make_mesh((2, 4)), page_axis="data")
    assert (cache.tp, cache.dp, cache.replication) == (4, 2, 4)
    assert cache.pspec == P(None, "data", "model", None)
    assert cache.sharding == cache.kv.sharding
    single = init_cache(small_spec(8), make_mesh((2, 4)), head_axis=None)
    assert (single.tp, single.dp, single.replication) == (1, 1, 1)
    assert single.pspec == P(None, None, None, None)


# --------------------------------------------------------------------------------------------
# abstract_cache: nothing allocated, init_cache's checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kv_layout", "rows"),
    [
        ("interleaved", 8),  # [L, G·pages·page_size, 2·H·r, 128], r = 2
        ("packed", 4),  # [L, G·pages·page_size, H·r, 128]: K|V of a head (64 + 64) in one row
        (None, 4),  # head_dim 64: packed by default
    ],
)
def test_abstract_cache_is_the_shape_of_init_cache(kv_layout, rows):
    spec, mesh = small_spec(2, kv_layout=kv_layout), make_mesh((2, 4))
    abstract = abstract_cache(spec, mesh, page_axis="data")
    assert isinstance(abstract, KVCache) and isinstance(abstract.kv, jax.ShapeDtypeStruct)
    assert abstract.kv.shape == (3, 64, rows, 128)
    assert abstract.kv.sharding.spec == P(None, "data", "model", None)
    assert (abstract.spec, abstract.mesh, abstract.page_axis) == (spec, mesh, "data")
    real = init_cache(spec, mesh, page_axis="data")
    assert real.kv.shape == abstract.kv.shape and real.kv.nbytes == 3 * 64 * rows * 128 * 4


def test_abstract_cache_refuses_what_init_cache_refuses():
    mesh = make_mesh((2, 4))
    with pytest.raises(TypeError, match="abstract_cache got unexpected keyword 'pages_axis'"):
        abstract_cache(small_spec(2), mesh, pages_axis="data")
    with pytest.raises(TypeError, match="spec must be a CacheSpec, got tuple"):
        abstract_cache((1, 2), mesh)
    with pytest.raises(ValueError, match=r"size 4 .*num_kv_heads=3"):
        abstract_cache(small_spec(3), mesh)


# --------------------------------------------------------------------------------------------
# check_cache: a donated or foreign cache is refused before anything runs
# --------------------------------------------------------------------------------------------


def test_check_cache_refuses_what_is_not_a_kvcache():
    cache = init_cache(small_spec(2), make_mesh((1, 2)))
    assert check_cache(cache) is cache
    for bad, name in ((cache.kv, "ArrayImpl"), ("cache", "str"), (None, "NoneType")):
        match = rf"cache must be a KVCache \(from init_cache\), got {name}"
        with pytest.raises(TypeError, match=match):
            check_cache(bad)


def test_check_cache_refuses_a_donated_cache():
    cache = init_cache(small_spec(2), make_mesh((1, 2)))
    k, v = random_kv(np.random.default_rng(0), cache.spec, 8)
    new = update(cache, 0, k, v, *fixed_slices())
    assert cache.kv.is_deleted()
    with pytest.raises(ValueError, match="cache has been donated to an earlier call"):
        check_cache(cache)
    assert check_cache(new) is new


def test_check_cache_accepts_a_traced_cache():
    cache = init_cache(small_spec(2), make_mesh((1, 2)))
    assert jax.jit(lambda c: check_cache(c).kv.sum())(cache) == 0


def test_every_operation_refuses_a_donated_cache_before_dispatch():
    """A deleted buffer handed to an 8-device computation crashed the process (exit 139): each
    operation must refuse it on the host. In a child process, so a crash fails this test
    instead of killing the suite."""
    script = textwrap.dedent(
        """
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        import jax, numpy as np
        from kvshard.cache import CacheSpec, copy_pages, gather, init_cache, update
        mesh = jax.make_mesh((1, 8), ("data", "model"))
        spec = CacheSpec(
            num_layers=1, num_kv_heads=8, head_dim=64, page_size=4, num_pages=8, dtype="float32"
        )
        cache = init_cache(spec, mesh)
        k = np.ones((4, 8, 64), np.float32)
        slices, num = np.array([[0], [0], [4]], np.int32), np.array([1], np.int32)
        new = update(cache, 0, k, k, slices, num)
        calls = {
            "update": lambda: update(cache, 0, k, k, slices, num),
            "gather": lambda: gather(cache, 0, np.arange(4)),
            "copy_pages": lambda: copy_pages(cache, np.array([[0, 1]], np.int32)),
        }
        for name, call in calls.items():
            try:
                call()
            except ValueError as err:
                print(name, "refused:", err)
        print("read", float(np.asarray(gather(new, 0, np.arange(4))[0]).sum()))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=180
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("update", "gather", "copy_pages"):
        assert f"{name} refused: cache has been donated to an earlier call" in out.stdout
    assert out.stdout.strip().endswith("read 2048.0")  # 4 slots · 8 heads · 64 ones, intact
