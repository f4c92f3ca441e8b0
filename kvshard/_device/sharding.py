"""Placement on the mesh, shared by every device operation.

kvshard never builds meshes; it checks the axes it is given (:func:`check_mesh_axes`), puts
eager inputs on the mesh with the sharding ``shard_map`` names (:func:`place`), and reshards
traced inputs when the mesh's axes are Explicit (:func:`to_spec`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kvshard._device.memo import ContentMemo, content_key
from kvshard.distributed import global_array

__all__ = [
    "axis_size",
    "check_mesh_axes",
    "is_explicit",
    "place",
    "place_all",
    "reuse_key",
    "to_spec",
]


def axis_size(mesh: Mesh, axis: str | None) -> int:
    """Size of mesh axis ``axis`` (1 when None)."""
    return 1 if axis is None else int(mesh.shape[axis])


def check_mesh_axes(mesh: Any, head_axis: str | None, page_axis: str | None) -> None:
    """Raises TypeError/ValueError unless both axes name distinct axes of ``mesh`` (or None)."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    for name, axis in (("head_axis", head_axis), ("page_axis", page_axis)):
        if axis is not None and axis not in mesh.axis_names:
            raise ValueError(f"{name}={axis!r} is not an axis of the mesh {mesh.axis_names}")
    if head_axis is not None and head_axis == page_axis:
        raise ValueError(f"head_axis and page_axis must differ, both are {head_axis!r}")
    if len(set(mesh.axis_types)) > 1:
        # Explicit axes need jax.reshard, Auto axes reject it: one rule per mesh keeps it simple.
        raise ValueError(f"mesh mixes axis types {mesh.axis_types}; use all Explicit or all Auto")


def is_explicit(mesh: Mesh) -> bool:
    return any(t == AxisType.Explicit for t in mesh.axis_types)


def to_spec(mesh: Mesh, x: jax.Array, spec: P) -> jax.Array:
    """Gives traced ``x`` the sharding ``shard_map``'s in_specs name.

    With Explicit mesh axes shard_map insists that its inputs already carry exactly that
    sharding; with Auto axes shard_map reshards by itself.
    """
    if is_explicit(mesh):
        return jax.reshard(x, NamedSharding(mesh, spec))
    return x


def place(mesh: Mesh, x: Any, spec: P) -> Any:
    """Eager calls: puts concrete inputs on the mesh (numpy arrays have no mesh sharding)."""
    return place_all(mesh, [(x, spec)])[0]


@functools.lru_cache(maxsize=256)
def _sharding(mesh: Mesh, spec: P) -> NamedSharding:
    return NamedSharding(mesh, spec)


@functools.lru_cache(maxsize=256)
def _equivalent(have: Any, want: NamedSharding, ndim: int) -> bool:
    # Shardings are immutable and hashable: compared once per pair (k and v arrive with their
    # own sharding on every eager call).
    return have == want or have.is_equivalent_to(want, ndim)


# Device copies of small host arrays (a step's slices, a layer index) placed by eager calls.
_PLACED = ContentMemo(maxsize=64)


def place_all(mesh: Mesh, items: list[tuple[Any, P]], *, reuse: bool = False) -> list[Any]:
    """:func:`place` of every (x, spec), in one batched transfer (the host cost of an eager
    call at decode is mostly these): traced values and arrays that already carry the sharding
    stay as they are.

    ``reuse``: a small integer host array (metadata) equal in content to one placed before
    with the same sharding gets that (immutable) device copy again (:mod:`kvshard._device.memo`), so
    an eager loop copies a step to the devices once, not once per layer. Only for calls
    outside any trace (the caller checks that its cache and k/v are concrete): under a
    caller's trace a reused concrete array would become a hoisted argument of its program."""
    out: list[Any] = [None] * len(items)
    moving: list[int] = []
    keys: dict[int, Any] = {}
    for i, (x, spec) in enumerate(items):
        sharding = _sharding(mesh, spec)
        if isinstance(x, jax.core.Tracer) or (
            isinstance(x, jax.Array) and _equivalent(x.sharding, sharding, x.ndim)
        ):
            out[i] = x
        elif not sharding.is_fully_addressable:  # a mesh spanning processes: kvshard.distributed
            out[i] = global_array(x, sharding)
        else:
            # Only integer metadata: k/v change every step, and keying them costs a copy.
            metadata = isinstance(x, np.ndarray | np.generic) and x.dtype.kind in "iu"
            key = reuse_key(mesh, x, spec) if reuse and metadata else None
            if key is not None:
                keys[i] = key
                out[i] = _PLACED.get(key)
            if out[i] is None:
                moving.append(i)
    if moving:
        # NumPy arrays are copied first: on CPU, device_put of a 64-byte-aligned one shares
        # its memory (may_alias=False did not stop it, jax 0.10.2), so a caller refilling
        # that array in place (a persistent step buffer, as serving loops keep) would change
        # a call still queued and every memoized device copy of it.
        placed = jax.device_put(
            [_private(items[i][0]) for i in moving], [_sharding(mesh, items[i][1]) for i in moving]
        )
        for i, x in zip(moving, placed, strict=True):
            out[i] = x
            if i in keys:
                _PLACED.put(keys[i], x)
    return out


def _private(x: Any) -> Any:
    """x, or a copy of it nothing else can write to when it is a NumPy array."""
    return np.array(x) if isinstance(x, np.ndarray) else x


def reuse_key(mesh: Mesh, x: Any, spec: P) -> tuple[Any, ...] | None:
    """The key ``place_all(..., reuse=True)`` files the device copy of ``x`` under (None: not
    memoizable, see :func:`kvshard._device.memo.content_key`)."""
    content = content_key(x)
    return None if content is None else (_sharding(mesh, spec), content)
