"""Ahead-of-time compilation from kvshard.abstract_cache: shardings, donation, aliasing.

A step compiled from the abstract cache must alias its donated cache input to its cache output
(the update stays in place) and must not warn "Some donated buffers were not usable"; the
``jax.eval_shape`` cache a new user would try first (``sharding=None``) does warn, which shows
that the warning check below can fail.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _cache_helpers import Oracle, assert_matches, fixed_slices, make_mesh, random_kv, small_spec
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kvshard

SPEC = small_spec(2, num_layers=2)
NOT_USABLE = "Some donated buffers were not usable"


@pytest.mark.parametrize(("shape", "page_axis"), [((2, 4), None), ((2, 4), "data")])
def test_abstract_cache_matches_init_cache(shape, page_axis):
    mesh = make_mesh(shape)
    abstract = kvshard.abstract_cache(SPEC, mesh, page_axis=page_axis)
    real = kvshard.init_cache(SPEC, mesh, page_axis=page_axis)
    assert jax.tree.structure(abstract) == jax.tree.structure(real)
    for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real), strict=True):
        assert isinstance(a, jax.ShapeDtypeStruct)
        assert (a.shape, a.dtype) == (r.shape, r.dtype)
        assert a.sharding == r.sharding


def test_abstract_cache_checks_like_init_cache():
    with pytest.raises(ValueError, match="page_axis='pages' is not an axis"):
        kvshard.abstract_cache(SPEC, make_mesh((2, 4)), page_axis="pages")


def _step(cache, k, v, slices, num):
    return kvshard.update(cache, 1, k, v, slices, num, backend="xla")


def _lower(cache_arg, mesh, groups):
    lead = (groups,) if groups else ()
    rep = NamedSharding(mesh, P())
    args = (
        jax.ShapeDtypeStruct(
            (*lead, 7, SPEC.num_kv_heads, SPEC.head_dim), jnp.float32, sharding=rep
        ),
        jax.ShapeDtypeStruct(
            (*lead, 7, SPEC.num_kv_heads, SPEC.head_dim), jnp.float32, sharding=rep
        ),
        jax.ShapeDtypeStruct((*lead, 3, 3), jnp.int32, sharding=rep),
        jax.ShapeDtypeStruct((*lead, 1), jnp.int32, sharding=rep),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = jax.jit(_step, donate_argnums=0).lower(cache_arg, *args).compile()
    return compiled, [str(w.message) for w in caught]


@pytest.mark.parametrize("page_axis", [None, "data"])
def test_aot_step_donates_in_place(page_axis):
    mesh = make_mesh((2, 4))
    groups = 2 if page_axis else None
    compiled, warned = _lower(kvshard.abstract_cache(SPEC, mesh, page_axis=page_axis), mesh, groups)
    assert not [w for w in warned if NOT_USABLE in w], warned
    # The executable declares the alias: parameter 0 (the cache) is output 0.
    assert "input_output_alias={ {}: (0, {}" in compiled.as_text()

    cache = kvshard.init_cache(SPEC, mesh, page_axis=page_axis)
    pointers = [s.data.unsafe_buffer_pointer() for s in cache.kv.addressable_shards]
    slices, num = fixed_slices(groups)
    k, v = random_kv(np.random.default_rng(0), SPEC, 7, groups)
    rep = NamedSharding(mesh, P())
    out = compiled(cache, *(jax.device_put(x, rep) for x in (k, v, slices, num)))
    assert cache.kv.is_deleted()
    # Donation honoured: every device's shard was written in its own buffer.
    assert [s.data.unsafe_buffer_pointer() for s in out.kv.addressable_shards] == pointers
    oracle = Oracle(SPEC, groups or 1)
    oracle.update(1, k, v, slices, num, pooled=page_axis is not None)
    assert_matches(out, oracle)


def test_eval_shape_cache_loses_the_sharding_and_the_donation():
    mesh = make_mesh((2, 4))
    shapes = jax.eval_shape(functools.partial(kvshard.init_cache, SPEC, mesh))
    assert shapes.kv.sharding is None
    _, warned = _lower(shapes, mesh, None)
    assert [w for w in warned if NOT_USABLE in w], warned
