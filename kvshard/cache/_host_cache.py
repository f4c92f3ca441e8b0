"""The host tier's page store: :class:`HostCache` and :func:`init_host_cache`.

A host cache mirrors the device cache's layout (its ``kv_layout`` too: C rows of D_pad lanes a
slot), in host memory::

    kv: dtype[L, G·num_host_pages·page_size, C, D_pad]   memory kind "pinned_host"
        sharded NamedSharding(mesh, P(None, page_axis, head_axis, None), memory_kind=...)
    per device: dtype[L, num_host_pages·page_size, C / tp, D_pad]

``L``: the device cache's cache layers (:attr:`CacheSpec.num_cache_layers`). Same sharding as
:class:`~kvshard.KVCache`, so each device's host shard holds exactly the
heads (and, with a page axis, the pool) of its device shard, in the host memory attached to
that device: a swap (:mod:`kvshard.cache._swap`) moves each device's own block over its own
link and never gathers heads through one host. Replicated heads (tp > num_kv_heads) are
mirrored per device like on the device, so host memory per device equals device memory per
device for the same number of pages (docs/tiers.md).

Pinned host memory is what a DMA engine can read and write directly; JAX lists it as memory
kind "pinned_host" on CPU, GPU and TPU (``device.addressable_memories()``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kvshard._device.jax_compat import is_deleted, on_host
from kvshard._device.sharding import axis_size, check_mesh_axes
from kvshard._device.storage import storage_dtype
from kvshard._geometry.int32 import INT32_MAX
from kvshard._geometry.layout import CacheSpec, check_tensor_parallel
from kvshard.cache._pytree import KVCache, PagedLayout

__all__ = ["HOST_MEMORY_KIND", "HostCache", "check_host", "init_host_cache", "with_host_kv"]

HOST_MEMORY_KIND = "pinned_host"


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["kv"],
    meta_fields=["spec", "mesh", "head_axis", "page_axis", "num_host_pages"],
)
@dataclasses.dataclass(frozen=True)
class HostCache(PagedLayout):
    """The host tier of a cache: pages of every layer in pinned host memory.

    A pytree whose only leaf is ``kv`` (static aux: the rest), like :class:`~kvshard.KVCache`:
    it passes through ``jax.jit``, carries and donation. Build one with
    :func:`init_host_cache`; :func:`kvshard.swap_out` and :func:`kvshard.swap_in` return a
    new one (the old one's buffer has been donated).

    Attributes:
      kv: dtype[L, G·num_host_pages·page_size, C, D_pad] globally, memory kind
        ``"pinned_host"``, sharded ``P(None, page_axis, head_axis, None)``; per device
        dtype[L, num_host_pages·page_size, C/tp, D_pad].
      spec: the device cache's :class:`~kvshard.CacheSpec` (``spec.num_pages`` counts device
        pages; the host pool has ``num_host_pages``).
      mesh, head_axis, page_axis: as for the device cache.
      num_host_pages: host pages per page pool (per data-parallel group with a page axis).
    """

    kv: jax.Array
    spec: CacheSpec
    mesh: Mesh
    head_axis: str | None
    page_axis: str | None
    num_host_pages: int

    @property
    def sharding(self) -> NamedSharding:
        """NamedSharding of ``kv``, memory kind ``"pinned_host"``."""
        return NamedSharding(self.mesh, self.pspec, memory_kind=HOST_MEMORY_KIND)


def with_host_kv(host: HostCache, kv: jax.Array) -> HostCache:
    """``host`` with its array replaced (the result of a donated write)."""
    return dataclasses.replace(host, kv=kv)


def check_host(host: Any, cache: KVCache) -> HostCache:
    """Returns ``host`` if it is a live :class:`HostCache` of ``cache``'s layout.

    Its spec, mesh and axes must be the cache's: a page means the same bytes on both sides.
    """
    if not isinstance(host, HostCache):
        raise TypeError(
            f"host must be a HostCache (from init_host_cache), got {type(host).__name__}"
        )
    kv = host.kv
    if isinstance(kv, jax.Array) and not isinstance(kv, jax.core.Tracer) and is_deleted(kv):
        raise ValueError(
            "host has been donated to an earlier call (its buffer is deleted): pass the host "
            "cache that call returned"
        )
    for field in ("spec", "mesh", "head_axis", "page_axis"):
        mine, theirs = getattr(host, field), getattr(cache, field)
        if mine != theirs:
            raise ValueError(
                f"host.{field} must equal cache.{field} (the host tier mirrors the cache's "
                f"layout): got {mine!r}, cache has {theirs!r}"
            )
    return host


@functools.lru_cache(maxsize=16)
def _zeros_fn(shape: tuple[int, ...], dtype: str, sharding: NamedSharding):
    # Computed on the host and returned in host memory: each device's host shard is
    # materialised where it lives, never in device memory (a host pool may exceed HBM).
    return jax.jit(on_host(lambda: jnp.zeros(shape, dtype)), out_shardings=sharding)


def init_host_cache(
    spec: CacheSpec,
    mesh: Mesh,
    num_host_pages: int,
    *,
    head_axis: str | None = "model",
    page_axis: str | None = None,
) -> HostCache:
    """Allocates a zeroed host tier for the cache ``init_cache(spec, mesh, ...)`` returns.

    Args:
      spec, mesh, head_axis, page_axis: exactly as given to :func:`kvshard.init_cache` for the
        device cache this tier serves (:func:`kvshard.swap_out` checks they match).
      num_host_pages: host pages per page pool: with ``page_axis`` each data-parallel group
        has its own host pool of this many pages.

    Returns:
      A :class:`HostCache` whose ``kv`` is storage[L, G·num_host_pages·page_size, C,
      D_pad] zeros in memory kind ``"pinned_host"``, sharded like the device cache; only the
      per-device blocks are materialised, each in its device's host memory.

    Raises:
      TypeError: ``spec`` is not a CacheSpec or ``mesh`` not a Mesh.
      ValueError: ``num_host_pages`` not a positive int, or its slots outside int32; an axis
        not in the mesh, both axes the same, heads that do not split over the head axis; a
        device without pinned host memory.
    """
    if not isinstance(spec, CacheSpec):
        raise TypeError(f"spec must be a CacheSpec, got {type(spec).__name__}")
    if (
        not isinstance(num_host_pages, int | np.integer)
        or isinstance(num_host_pages, bool)
        or num_host_pages < 1
    ):
        raise ValueError(f"num_host_pages={num_host_pages!r} must be a positive int")
    num_host_pages = int(num_host_pages)
    check_mesh_axes(mesh, head_axis, page_axis)
    tp, dp = axis_size(mesh, head_axis), axis_size(mesh, page_axis)
    check_tensor_parallel(spec.num_kv_heads, tp)
    slots = dp * num_host_pages * spec.page_size
    if slots > INT32_MAX:
        raise ValueError(
            f"num_host_pages={num_host_pages}: {slots} host slots exceed int32 ({INT32_MAX})"
        )
    device = mesh.devices.flat[0]
    kinds = [m.kind for m in device.addressable_memories()]
    if HOST_MEMORY_KIND not in kinds:
        raise ValueError(f"{device} has no {HOST_MEMORY_KIND!r} memory (it has {kinds})")
    sharding = NamedSharding(
        mesh, P(None, page_axis, head_axis, None), memory_kind=HOST_MEMORY_KIND
    )
    shape = (spec.num_cache_layers, slots, spec.combined_heads(tp), spec.padded_head_dim)
    # The device cache's storage dtype (bf16/fp8 bits on CPU, kvshard._device.storage): a swap moves
    # stored bytes, never converts.
    stored = storage_dtype(spec.dtype, str(mesh.devices.flat[0].platform)).name
    kv = _zeros_fn(shape, stored, sharding)()
    return HostCache(
        kv=kv,
        spec=spec,
        mesh=mesh,
        head_axis=head_axis,
        page_axis=page_axis,
        num_host_pages=num_host_pages,
    )
