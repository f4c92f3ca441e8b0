"""Memo keys from the content of small concrete arrays, and a bounded LRU memo to store under
them.

A key holds an array's *content* (dtype, shape and bytes), never its identity: a NumPy array
mutated in place, or a new array equal to an old one, is looked up by what it holds now, so a
changed value is always checked again and never meets a stale device copy. Only results that
are pure functions of the key are stored: that a check passed (a check that raises stores
nothing) and the device copy of an array (immutable, never donated). Users: the eager entries
(:mod:`kvshard._eager`), the placement of metadata (:mod:`kvshard._device.sharding`) and the slices
check (:func:`kvshard.kernels.checks.validate_slices`).
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "MAX_KEY_BYTES",
    "ContentMemo",
    "array_signature",
    "call_key",
    "content_key",
    "is_concrete",
    "placed_index",
    "placed_metadata",
    "shape_of",
    "stored_metadata",
]

# Larger arrays (a long prefill's slices) are not memoized: comparing their bytes would cost
# about what checking them does, and the memo would hold megabytes of keys.
MAX_KEY_BYTES = 1 << 16


def content_key(*arrays: Any) -> tuple[Hashable, ...] | None:
    """``(dtype, shape, bytes)`` of every array, or None when one has no content on this host
    (traced, or spanning processes), is not an array, or is larger than :data:`MAX_KEY_BYTES`.

    A concrete ``jax.Array`` is read through ``np.asarray`` (JAX keeps that host copy, so a
    device-resident step is copied to the host once, as its value checks need anyway).
    """
    key = []
    for x in arrays:
        if type(x) is np.ndarray and x.nbytes <= MAX_KEY_BYTES:  # the common case, first
            key.append((x.dtype.str, x.shape, x.tobytes()))
            continue
        if isinstance(x, jax.core.Tracer) or not isinstance(x, np.ndarray | np.generic | jax.Array):
            return None
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return None
        host = np.asarray(x)
        if host.nbytes > MAX_KEY_BYTES:
            return None
        key.append((host.dtype.str, host.shape, host.tobytes()))
    return tuple(key)


class ContentMemo:
    """A thread-safe LRU dictionary of at most ``maxsize`` entries (keys from
    :func:`content_key` plus whatever else the stored result depends on)."""

    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        # The last (key, value) found or stored. An eager decode loop asks for one key per
        # layer call, the same one each time: comparing it with this pair (no hash of the
        # key, no lock) answers most calls. One tuple, so a reader sees one whole pair.
        self._last: tuple[Hashable, Any] | None = None
        # Counts clear()s: a value kept outside the memo is valid while this is unchanged.
        self.generation = 0

    def get(self, key: Hashable) -> Any:
        """The value stored under ``key``, or None."""
        last = self._last
        if last is not None and last[0] == key:
            return last[1]
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
                self._last = (key, value)
            return value

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            self._last = (key, value)
            while len(self._entries) > self._maxsize:
                evicted, _ = self._entries.popitem(last=False)
                if self._last is not None and self._last[0] == evicted:
                    self._last = None

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._last = None
            self.generation += 1

    def __len__(self) -> int:
        return len(self._entries)


# type -> whether its instances are concrete arrays (asked once per type: an isinstance test
# against the jax.Array ABC costs microseconds, and the eager entries ask it on every call).
_CONCRETE_TYPES: dict[type, bool] = {}


def is_concrete(x: Any) -> bool:
    """Whether ``x`` is a NumPy array or a concrete ``jax.Array`` (not a tracer, a list, a
    scalar or a subclass of ``np.ndarray``)."""
    kind = type(x)
    known = _CONCRETE_TYPES.get(kind)
    if known is None:
        known = kind is np.ndarray or (
            issubclass(kind, jax.Array) and not issubclass(kind, jax.core.Tracer)
        )
        _CONCRETE_TYPES[kind] = known
    return known


def array_signature(x: Any) -> tuple[Any, ...] | None:
    """``(type, shape, dtype)`` of a NumPy array, ``(type, shape, dtype, sharding)`` of a
    concrete ``jax.Array``; None for anything else (:func:`is_concrete`):
    a call holding such an argument has no key."""
    if not is_concrete(x):
        return None
    if type(x) is np.ndarray:
        return (np.ndarray, x.shape, x.dtype)
    return (type(x), x.shape, x.dtype, x.sharding)


def shape_of(x: Any) -> tuple[int, ...]:
    """``np.shape(x)``, read straight off a NumPy array (the common case)."""
    return x.shape if type(x) is np.ndarray else np.shape(x)


def call_key(
    static: tuple[Hashable, ...], arrays: tuple[Any, ...], metadata: tuple[Any, ...]
) -> tuple[Hashable, ...] | None:
    """The key of a call: ``static`` (its static arguments, which the caller has checked are
    of hashable types), the signatures of ``arrays`` and the signatures and content of
    ``metadata``; None when one of them has none."""
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
