"""The eager fast path of :func:`kvshard.update` (:mod:`kvshard._eager`): what its key holds,
and what a known call re-derives for its layer."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from kvshard._eager import (
    EAGER_CALLS,
    array_signature,
    eager_key,
    is_concrete,
    placed_index,
    plain_statics,
    shape_of,
    stored_metadata,
)
from kvshard._host_checks import check_layer
from kvshard._memo import MAX_KEY_BYTES
from kvshard._sharding import place_all
from kvshard.cache._pytree import KVCache, check_cache
from kvshard.step import StepMetadata

__all__ = ["eager_update_key", "known_update", "remember", "same_step_update"]


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


def known_update(write_fn, eager, cache, layer, k, v, step, num_slices, statics) -> Any:
    """The eager fast path (:mod:`kvshard._eager`): the call's result when an equal call passed
    every check before (only the cache's liveness and the layer are checked again), else
    None. ``write_fn``: the jitted body the full path calls; ``statics``: (backend, options,
    checks, stats) as the call gave them."""
    known = EAGER_CALLS.get(eager[0])
    if known is None:
        return None
    remember(cache, k, v, step, num_slices, statics, known)
    metadata = stored_metadata(known[0], eager[1])
    return _dispatch(write_fn, cache, layer, k, v, metadata, known[1], known[2])


def _dispatch(write_fn, cache, layer, k, v, metadata, kv_spec, static, layers=None) -> Any:
    """A known call's own checks (the cache's liveness, the int layer's range) and the jitted
    body, with the metadata's device copies, where k/v go (``kv_spec``, None: as given) and
    the body's static arguments. ``layers``: layer -> placed index, filled as met."""
    cache = check_cache(cache)  # a donated buffer is refused before dispatch
    if not 0 <= layer < cache.spec.num_layers:
        check_layer(cache.spec.num_layers, layer)  # raises, with the full path's message
    placed_layer = None if layers is None else layers.get(layer)
    if placed_layer is None:
        placed_layer = placed_index(cache.mesh, layer)
        if layers is not None:
            layers[layer] = placed_layer
    if kv_spec is not None:  # k/v not already on the mesh as shard_map takes them
        k, v = place_all(cache.mesh, [(k, kv_spec), (v, kv_spec)])
    return write_fn(cache, placed_layer, k, v, *metadata, **static)


# --------------------------------------------------------------------------------------------
# The same step as the last call: the key's reads, with identity for what cannot change
# --------------------------------------------------------------------------------------------
#
# An eager decode loop calls update once per layer with the same step (a StepMetadata object,
# or the vLLM form's slices and num_slices arrays), the same cache layout and new k/v of one
# signature. Building and comparing the whole key touches a few hundred Python objects; right
# after a long device call every one of them misses the CPU's caches (measured on a 2-core
# VM: the whole fast path 8-10 us back to back, ~190 us after a 30 ms attention;
# docs/performance.md). This slot answers such a call from what the key would read of it,
# comparing the frozen objects (spec, mesh, the step itself, whose
# fields cannot be rebound; the arrays themselves) by identity and reading again only what can
# change under them: the step's NumPy arrays' dtype, shape and bytes (mutable in place) and
# k/v's signatures.


class _LastUpdate(NamedTuple):
    layout: tuple[Any, ...]  # (spec, mesh, head_axis, page_axis), compared by identity
    step: tuple[Any, ...]  # (the StepMetadata,) or (slices, num_slices): the same objects
    statics: tuple[Any, ...]  # (backend, options, checks, stats), compared by identity
    reads: tuple[Any, ...]  # _step_reads then: what may change inside the same objects
    signatures: tuple[Any, ...]  # array_signature of k and v
    metadata: list[Any]  # slices and num_slices as the jitted body takes them
    kv_spec: Any  # where k/v must be placed first (None: passed as given)
    static: dict[str, Any]  # the jitted body's static arguments
    layers: dict[int, Any]  # layer -> its placed int32 index (placed_index), filled as met
    generation: int  # EAGER_CALLS.generation then: clearing the memo forgets this call too


_LAST: list[_LastUpdate | None] = [None]


def _given(step, num_slices) -> tuple[tuple[Any, ...], tuple[Any, Any]] | None:
    """(the objects compared by identity, the metadata arrays as given) of a call's step:
    a StepMetadata (frozen: its fields cannot be rebound) or the vLLM form's two arrays."""
    if type(step) is StepMetadata:
        return None if num_slices is not None else ((step,), (step.slices, step.num_slices))
    return None if num_slices is None else ((step, num_slices), (step, num_slices))


def _step_reads(step, given) -> tuple[Any, ...] | None:
    """What the eager key reads of the step that an in-place change could alter: the dtype,
    shape and bytes of slices and num_slices (NumPy only: None otherwise, and the call is
    left to the key), and a StepMetadata's positions/kv_lens/page_indices shapes."""
    s, n = given
    if type(s) is not np.ndarray or type(n) is not np.ndarray or s.nbytes > MAX_KEY_BYTES:
        return None
    # The dtype objects, not their .str (a string built per read): a builtin dtype is one
    # object, compared by identity first. Each read here costs microseconds at decode, where
    # this path runs from a cold CPU cache.
    reads = (s.dtype, s.shape, s.tobytes(), n.dtype, n.shape, n.tobytes())
    if type(step) is StepMetadata:
        shapes = (shape_of(step.positions), shape_of(step.kv_lens), shape_of(step.page_indices))
        return reads + shapes
    return reads


def remember(cache, k, v, step, num_slices, statics, known) -> None:
    """Files a call that passed (by the key or the full path) as the last one: ``step`` and
    ``num_slices`` as the call gave them."""
    ident_given = _given(step, num_slices)
    if ident_given is None:
        return
    ident, given = ident_given
    reads = _step_reads(step, given)
    signatures = (array_signature(k), array_signature(v))
    if reads is None or None in signatures:
        return
    layout = (cache.spec, cache.mesh, cache.head_axis, cache.page_axis)
    last = _LAST[0]
    layers = last.layers if last is not None and last.layout[1] is cache.mesh else {}
    _LAST[0] = _LastUpdate(
        layout,
        ident,
        statics,
        reads,
        signatures,
        stored_metadata(known[0], given),
        known[1],
        known[2],
        layers,
        EAGER_CALLS.generation,
    )


def same_step_update(write_fn, cache, layer, k, v, step, num_slices, statics) -> Any:
    """The result of a call the last one answers (see above), else None."""
    last = _LAST[0]
    if (
        last is None
        or step is not last.step[0]
        or (num_slices is not None and (len(last.step) == 1 or num_slices is not last.step[1]))
        or (num_slices is None and len(last.step) == 2)
        or last.generation != EAGER_CALLS.generation
        or type(cache) is not KVCache
        or type(layer) is not int
        or cache.spec is not last.layout[0]
        or cache.mesh is not last.layout[1]
        or cache.head_axis != last.layout[2]
        or cache.page_axis != last.layout[3]
        or statics[0] is not last.statics[0]
        or statics[1] is not last.statics[1]
        or statics[2] is not last.statics[2]
        or statics[3] is not last.statics[3]
        or not is_concrete(cache.kv)
    ):
        return None
    ident_given = _given(step, num_slices)
    if (
        ident_given is None
        or _step_reads(step, ident_given[1]) != last.reads
        or (array_signature(k), array_signature(v)) != last.signatures
    ):
        return None
    return _dispatch(
        write_fn, cache, layer, k, v, last.metadata, last.kv_spec, last.static, last.layers
    )
