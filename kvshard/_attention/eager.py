"""The eager fast path of :func:`kvshard.attention` (:mod:`kvshard._eager`): what its key holds,
and what a known call re-derives for its layer."""

from __future__ import annotations

import functools
from typing import Any

from kvshard import _host_checks as host
from kvshard._attention.layer_type import read_type
from kvshard._attention.params import Statics
from kvshard._eager import (
    EAGER_CALLS,
    eager_key,
    is_concrete,
    placed_index,
    plain_statics,
    shape_of,
    stored_metadata,
)
from kvshard._sharding import place_all
from kvshard.cache import KVCache, check_cache
from kvshard.step import StepMetadata

__all__ = ["eager_attention_key", "known_call", "layer_statics"]


@functools.lru_cache(maxsize=1024)
def layer_statics(spec, layer, window, layer_type, backend, scale, cap, options):
    """(read type, Statics) of a concrete layer: what the eager fast path re-derives per layer
    (the full path's own steps; raises as they do, storing nothing)."""
    read = read_type(spec, layer, window, layer_type, backend, options)
    return read, Statics(spec, scale, read.sliding_window, cap, options, read.chunk_size)


def eager_attention_key(
    field_names,
    cache,
    layer,
    q,
    step,
    sm_scale,
    window,
    layer_type,
    soft_cap,
    sinks,
    backend,
    options,
    checks,
):
    """(key, step fields, q) of an attention call for the eager fast path
    (:mod:`kvshard._eager`): the key holds all that its checks read but the cache's liveness
    and the layer's value; None when a traced, deprecated or unhashable argument (or sinks)
    leaves the call to the full path."""
    if (
        type(cache) is not KVCache
        or type(layer) is not int
        or type(step) is not StepMetadata
        or not is_concrete(cache.kv)  # a traced cache: inside the caller's trace
        or sinks is not None
        or type(sm_scale) is not float
        or not (soft_cap is None or type(soft_cap) is float)
        or not (window is None or type(window) is int)
        or not (layer_type is None or _plain_tuple(layer_type))
        or not plain_statics(backend, options, checks)
    ):
        return None
    fields = tuple(getattr(step, name) for name in field_names)
    layout = (cache.spec, cache.mesh, cache.head_axis, cache.page_axis)
    geometry = (step.geometry, shape_of(step.positions))
    static = ("attention", layout, geometry, sm_scale, window, layer_type, soft_cap)
    key = eager_key((*static, backend, options, checks), (q,), fields)
    return None if key is None else (key, fields, q)


def _plain_tuple(value: Any) -> bool:
    return type(value) is tuple and all(type(x) in (str, int) for x in value)


def known_call(read_fn, eager, cache, layer, q):
    """The eager fast path (:mod:`kvshard._eager`): the call's output when an equal call passed
    every check before (only the cache's liveness and the layer are checked again), else
    None. ``read_fn``: the jitted body the full path calls."""
    known = EAGER_CALLS.get(eager[0])
    if known is None:
        return None
    fields = stored_metadata(known[0], eager[1])
    cache = check_cache(cache)
    _, q_spec, resolved, static = known
    host.check_layer(cache.spec.num_layers, layer)
    read, statics = layer_statics(cache.spec, layer, *static)
    if q_spec is not None:  # q not already on the mesh as shard_map takes it
        (q,) = place_all(cache.mesh, [(q, q_spec)])
    layer_index = placed_index(cache.mesh, layer)
    return read_fn(
        cache,
        layer_index,
        q,
        fields,
        None,
        backend=resolved,
        statics=statics,
        checks=False,
        read=read,
    )
