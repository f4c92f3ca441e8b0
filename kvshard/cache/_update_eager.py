"""The eager fast path of :func:`kvshard.update` (:mod:`kvshard._eager`): what its key holds,
and what a known call re-derives for its layer."""

from __future__ import annotations

from typing import Any

from kvshard._eager import (
    EAGER_CALLS,
    eager_key,
    is_concrete,
    placed_index,
    plain_statics,
    shape_of,
    stored_metadata,
)
from kvshard._host_checks import check_layer
from kvshard._sharding import place_all
from kvshard.cache._pytree import KVCache, check_cache
from kvshard.step import StepMetadata

__all__ = ["eager_update_key", "known_update"]


def eager_update_key(cache, layer, k, v, step, num_slices, slices, backend, options, checks, stats):
    """(key, metadata) of an update call for the eager fast path (:mod:`kvshard._eager`):
    the key holds all that its checks read but the cache's liveness and the layer's value;
    None when a traced or unhashable argument leaves the call to the full path."""
    if (
        type(cache) is not KVCache
        or type(layer) is not int
        or slices is not None
        or not is_concrete(cache.kv)  # a traced cache: inside the caller's trace
        or not plain_statics(backend, options, checks)
    ):
        return None
    if type(step) is StepMetadata:
        if num_slices is not None:
            return None
        metadata = (step.slices, step.num_slices)
        geometry = (
            step.geometry,
            shape_of(step.positions),
            shape_of(step.kv_lens),
            shape_of(step.page_indices),
        )
    else:
        metadata, geometry = (step, num_slices), None
    layout = (cache.spec, cache.mesh, cache.head_axis, cache.page_axis)
    static = ("update", layout, geometry, backend, options, checks, stats)
    key = eager_key(static, (k, v), metadata)
    return None if key is None else (key, metadata)


def known_update(write_fn, eager, cache, layer, k, v) -> Any:
    """The eager fast path (:mod:`kvshard._eager`): the call's result when an equal call passed
    every check before (only the cache's liveness and the layer are checked again), else
    None. ``write_fn``: the jitted body the full path calls."""
    known = EAGER_CALLS.get(eager[0])
    if known is None:
        return None
    metadata = stored_metadata(known[0], eager[1])
    cache = check_cache(cache)
    layer_index = check_layer(cache.spec.num_layers, layer)
    _, kv_spec, static = known
    if kv_spec is not None:  # k/v not already on the mesh as shard_map takes them
        k, v = place_all(cache.mesh, [(k, kv_spec), (v, kv_spec)])
    placed_layer = placed_index(cache.mesh, int(layer_index))
    return write_fn(cache, placed_layer, k, v, *metadata, **static)
