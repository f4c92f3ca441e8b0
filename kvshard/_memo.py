"""A memo of eager host work on small concrete metadata, keyed by the metadata's content.

An eager serving loop hands every layer's :func:`kvshard.update` the same step: checking its
values and copying it to the devices once per step, not once per layer call, is most of what
the eager path can save (issue 20 item 4; docs/performance.md). Keys are the arrays' *content*
(dtype, shape and bytes), never their identity: a NumPy step mutated in place, or a new step
equal to an old one, is looked up by what it holds now, so a changed value is always checked
again and never meets a stale device copy. Only results that are pure functions of the key are
stored: that a check passed (a check that raises stores nothing) and the device copy of an
array (immutable, never donated).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import jax
import numpy as np

__all__ = ["MAX_KEY_BYTES", "ContentMemo", "content_key"]

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
