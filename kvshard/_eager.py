"""The eager fast path: a call whose checks passed once is a lookup the next time it comes.

An eager serving loop calls :func:`kvshard.update` and :func:`kvshard.attention` once per layer
with the same cache, the same k/v (q) shapes and the same step; each call re-derived what the
previous one had (issue 20 item 4; docs/performance.md). What a call's host checks read falls
in two kinds:

- its **signature**: the cache's layout, every array's type, shape, dtype and sharding
  (:func:`array_signature`), the step's geometry, the static arguments (backend, options);
- the **content** of its small integer metadata (slices, page tables), as
  :func:`kvshard._memo.content_key` reads it (dtype, shape and bytes, never identity).

Once every check of a call has passed, the operation stores what they derived (the
metadata's device copies, :func:`placed_metadata`, and the static arguments of its jitted
body) under a key holding both (:func:`eager_key`). The copies are immutable and never
donated, and equal content means equal copies, so a later call may use them as they are. A
later call with an equal key skips the checks and the derivation: it re-checks only what the
key does not hold (that the cache was not donated, the layer's range and, for attention, the
layer's type) and calls the same jitted function with the same arguments, so it compiles
nothing new and writes or reads exactly what the full path would. A call that
raises stores nothing, and a call the key cannot describe (a traced argument, a Python list,
an option of another type) has no key and takes the full path.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kvshard._memo import MAX_KEY_BYTES, ContentMemo, content_key
from kvshard._types import BackendOptions

__all__ = [
    "EAGER_CALLS",
    "array_signature",
    "eager_key",
    "is_concrete",
    "placed_index",
    "placed_metadata",
    "plain_statics",
    "shape_of",
    "stored_metadata",
]

# Keys of calls that passed, with what they derived. A decode loop needs one entry per step
# and operation (the layer is not in the key), so a larger memo would only hold older steps;
# a key holds at most a few arrays of MAX_KEY_BYTES (kvshard._memo).
EAGER_CALLS = ContentMemo(maxsize=64)

# type -> whether its instances are concrete arrays (asked once per type: isinstance against
# the jax.Array ABC was a measurable part of the key).
_CONCRETE_TYPES: dict[type, bool] = {}


def is_concrete(x: Any) -> bool:
    """Whether ``x`` is a NumPy array or a concrete ``jax.Array`` (not a tracer, a list, a
    scalar or a subclass of ``np.ndarray``)."""
    kind = type(x)
    concrete = _CONCRETE_TYPES.get(kind)
    if concrete is None:
        concrete = kind is np.ndarray or (
            issubclass(kind, jax.Array) and not issubclass(kind, jax.core.Tracer)
        )
        _CONCRETE_TYPES[kind] = concrete
    return concrete


def array_signature(x: Any) -> tuple[Any, ...] | None:
    """``(type, shape, dtype)`` of a NumPy array, ``(type, shape, dtype, sharding)`` of a
    concrete ``jax.Array``; None for anything else (:func:`is_concrete`): such a call has no
    key."""
    if not is_concrete(x):
        return None
    if type(x) is np.ndarray:
        return (np.ndarray, x.shape, x.dtype)
    return (type(x), x.shape, x.dtype, x.sharding)


def shape_of(x: Any) -> tuple[int, ...]:
    """``np.shape(x)``, read straight off a NumPy array (the common case, 3x faster)."""
    return x.shape if type(x) is np.ndarray else np.shape(x)


def plain_statics(backend: Any, options: Any, checks: Any) -> bool:
    """Whether the static arguments every operation takes are of the types its checks accept
    and a key can hold: a str backend, None or a BackendOptions, a bool ``checks`` (anything
    else, even if accepted, takes the full path)."""
    return (
        type(backend) is str
        and type(checks) is bool
        and (options is None or type(options) is BackendOptions)
    )


def eager_key(
    static: tuple[Hashable, ...], arrays: tuple[Any, ...], metadata: tuple[Any, ...]
) -> tuple[Hashable, ...] | None:
    """The key of an eager call: ``static`` (the operation's static arguments, which the
    caller has checked are of hashable types), the signatures of ``arrays`` and ``metadata``
    and the content of ``metadata``; None when one of them has none."""
    key: list[Hashable] = [static]
    for x in arrays:
        signature = array_signature(x)
        if signature is None:
            return None
        key.append(signature)
    for x in metadata:
        if type(x) is np.ndarray and x.nbytes <= MAX_KEY_BYTES:
            # The common case (a NumPy step), in one tuple: its content holds the dtype and
            # shape a signature would, and no other kind of entry is a 3-tuple.
            key.append((x.dtype.str, x.shape, x.tobytes()))
            continue
        signature, content = array_signature(x), content_key(x)
        if signature is None or content is None:
            return None
        key.append((signature, content))
    return tuple(key)


def placed_metadata(given: Sequence[Any], placed: Sequence[Any]) -> tuple[Any, ...]:
    """What an equal later call hands its jitted body for each metadata array: the array the
    full path placed on the mesh (``placed``), or None where it passed on the one ``given``
    (already there, so the later call's own array is the one to pass)."""
    return tuple(None if z is x else z for x, z in zip(given, placed, strict=True))


def stored_metadata(stored: tuple[Any, ...], given: tuple[Any, ...]) -> list[Any]:
    """The arrays :func:`placed_metadata` describes, for a call with metadata ``given``."""
    return [x if z is None else z for z, x in zip(stored, given, strict=True)]


@functools.lru_cache(maxsize=1024)
def placed_index(mesh: Any, index: int) -> jax.Array:
    """An int32 scalar (a layer index) replicated on ``mesh``: placed once per value, as the
    full path's ``place_all(..., reuse=True)`` places it (immutable, never donated)."""
    return jax.device_put(np.int32(index), NamedSharding(mesh, P()))
