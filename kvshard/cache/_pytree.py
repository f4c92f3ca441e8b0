"""The cache pytree and its allocation: :class:`KVCache`, :func:`init_cache`,
:func:`abstract_cache`.

The cache of every layer lives in ONE stacked array (see docs/layout.md for pictures)::

    kv: storage[L, G·num_pages·page_size, C, D_pad]
        sharded NamedSharding(mesh, P(None, page_axis, head_axis, None))
    per device: dtype[L, num_pages·page_size, C / tp, D_pad]

with ``L`` cache layers (:attr:`CacheSpec.num_cache_layers`: the model's layers, or with layer
groups the group size, layer ``l`` living in cache layer ``spec.groups.layer_slot[l]``), ``H``
KV heads, replication ``r`` (:func:`kvshard.check_tensor_parallel`), ``tp``/``G`` the sizes of
the head and page mesh axes (1 when the axis is None), ``C`` and ``D_pad`` the rows and lanes
of ``spec.kv_layout`` (interleaved: ``C = 2·H·r``, ``D_pad`` the head dimension padded to a
multiple of 128; packed: ``C = H·r``, K and V of a head side by side in one row of
``round_up(2·head_dim, 128)`` lanes; latent (MLA, ``H = 1``): ``C = r``, one row of the latent
``[c_kv | k_pe]`` in ``round_up(head_dim, 128)`` lanes; docs/layout.md), and ``storage`` the
dtype :func:`kvshard._device.storage.storage_dtype` picks for the mesh's platform: the cache dtype,
except bfloat16/float8 on CPU, stored as their bits (uint16/uint8) so that XLA's CPU float
normalization never copies the cache. Interleaved, combined head ``2·j`` is K and ``2·j + 1``
is V of replicated head ``j`` (packed: row ``j`` holds both); replicated head ``j`` is a copy
of KV head ``j // r``. Sharding the combined axis therefore hands each device the K and V of
whole heads: no update, copy or :func:`kvshard.attention` read communicates between devices.

Why one stacked array rather than a list of per-layer arrays: ``layer`` can be a traced integer
(a ``lax.scan`` over layers, or a model that passes the layer index as data), one compiled
executable serves every layer, and the cache is one pytree leaf to donate.
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

from kvshard._device.jax_compat import is_deleted
from kvshard._device.memo import is_concrete
from kvshard._device.sharding import axis_size, check_mesh_axes
from kvshard._device.storage import PLATFORMS, storage_dtype
from kvshard._geometry.layout import CacheSpec, check_tensor_parallel

__all__ = ["KVCache", "PagedLayout", "abstract_cache", "check_cache", "init_cache", "with_kv"]


class PagedLayout:
    """What a cache-shaped pytree (:class:`KVCache`, the host tier's ``HostCache``) derives from
    its spec, mesh and axes: one definition for both."""

    spec: CacheSpec
    mesh: Mesh
    head_axis: str | None
    page_axis: str | None

    @property
    def dtype(self) -> np.dtype:
        """The cache's logical dtype (``spec.dtype``): what it stores, whatever ``kv`` holds."""
        return self.spec.np_dtype

    @property
    def tp(self) -> int:
        """Size of the head axis (1 when ``head_axis`` is None)."""
        return axis_size(self.mesh, self.head_axis)

    @property
    def dp(self) -> int:
        """Number of page pools: size of the page axis (1 when ``page_axis`` is None)."""
        return axis_size(self.mesh, self.page_axis)

    @property
    def replication(self) -> int:
        """Copies of each KV head held by the cache."""
        return self.spec.replication(self.tp)

    @property
    def pspec(self) -> P:
        """PartitionSpec of ``kv``."""
        return P(None, self.page_axis, self.head_axis, None)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["kv"],
    meta_fields=["spec", "mesh", "head_axis", "page_axis"],
)
@dataclasses.dataclass(frozen=True)
class KVCache(PagedLayout):
    """The sharded cache of every layer: one array plus static layout metadata.

    A pytree whose only leaf is ``kv``; ``spec``, ``mesh`` and the axis names are static aux data,
    so a ``KVCache`` passes through ``jax.jit``, ``lax.scan`` carries and donation unchanged.
    Build one with :func:`init_cache`; every function returns a new ``KVCache`` (the old one's
    buffer has been donated).

    Attributes:
      kv: storage[L, G·num_pages·page_size, C, D_pad] globally, sharded
        ``P(None, page_axis, head_axis, None)``; per device
        storage[L, num_pages·page_size, C/tp, D_pad]. ``storage`` is :attr:`dtype`, except
        a bfloat16/float8 cache on CPU, which holds its values' bits as uint16/uint8
        (``np.asarray(cache.kv).view(cache.dtype)`` reads them); every kvshard read returns
        :attr:`dtype`.
      spec: the :class:`CacheSpec`.
      mesh: the mesh the array is sharded over (kvshard never builds meshes).
      head_axis: mesh axis sharding the combined-head axis, or None (tp = 1).
      page_axis: mesh axis sharding the slot axis into per-group page pools (data-parallel
        attention), or None (G = 1).
    """

    kv: jax.Array
    spec: CacheSpec
    mesh: Mesh
    head_axis: str | None = "model"
    page_axis: str | None = None

    @property
    def sharding(self) -> NamedSharding:
        """NamedSharding of ``kv``."""
        return NamedSharding(self.mesh, self.pspec)


def with_kv(cache: KVCache, kv: jax.Array) -> KVCache:
    """``cache`` with its array replaced (the result of a donated write)."""
    return dataclasses.replace(cache, kv=kv)


def check_cache(cache: Any) -> KVCache:
    """Returns ``cache`` if it is a live :class:`KVCache` (the first check of every operation).

    A cache whose buffer was donated to an earlier call (or deleted) is refused here: handing
    a deleted buffer to a multi-device computation crashes the process in the runtime.
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache (from init_cache), got {type(cache).__name__}")
    kv = cache.kv
    # is_concrete: a type test memoized per type (the eager path asks it on every call).
    if is_concrete(kv) and type(kv) is not np.ndarray and is_deleted(kv):
        raise ValueError(
            "cache has been donated to an earlier call (its buffer is deleted): pass the cache "
            "that call returned"
        )
    return cache


@functools.lru_cache(maxsize=64)
def _zeros_fn(shape: tuple[int, ...], dtype: str, sharding: NamedSharding):
    # out_shardings makes every device materialise only its own shard: the whole cache never
    # exists on one device.
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def init_cache(
    spec: CacheSpec,
    mesh: Mesh,
    *,
    head_axis: str | None = "model",
    page_axis: str | None = None,
    platform: str | None = None,
) -> KVCache:
    """Allocates a zeroed cache directly sharded over ``mesh``.

    Args:
      spec: cache geometry; ``spec.num_pages`` pages per page pool.
      mesh: the device mesh (built by the caller).
      head_axis: mesh axis that shards heads, or None to keep all heads on every device.
      page_axis: mesh axis whose G groups each own a separate pool of ``num_pages`` pages
        (data-parallel attention), or None for one pool.
      platform: the platform whose storage dtype the cache takes ("cpu", "gpu", "tpu"); None
        (the default): the mesh's. Only to lower for another platform than the mesh's.

    Returns:
      A :class:`KVCache` with ``kv``: storage[L, G·num_pages·page_size, C, D_pad] zeros
      globally, sharded ``P(None, page_axis, head_axis, None)``: per device
      spec.dtype[L, num_pages·page_size, C/tp, D_pad] (tp, G: sizes of the head and page
      axes, 1 when None; r: :attr:`KVCache.replication`; storage: spec.dtype, or its bits on
      CPU for bfloat16/float8, see :attr:`KVCache.kv`). Only the per-device blocks are ever
      materialised.

    Raises:
      TypeError: ``spec`` is not a CacheSpec or ``mesh`` not a Mesh.
      ValueError: an axis is not in the mesh, both axes are the same, or the head-axis size
        neither divides nor is a multiple of ``spec.num_kv_heads``.
    """
    if not isinstance(spec, CacheSpec):
        raise TypeError(f"spec must be a CacheSpec, got {type(spec).__name__}")
    check_mesh_axes(mesh, head_axis, page_axis)
    tp, dp = axis_size(mesh, head_axis), axis_size(mesh, page_axis)
    check_tensor_parallel(spec.num_kv_heads, tp)
    sharding = NamedSharding(mesh, P(None, page_axis, head_axis, None))
    if platform is None:
        platform = str(mesh.devices.flat[0].platform)
    elif platform not in PLATFORMS:
        raise ValueError(f"platform={platform!r} must be None or one of {PLATFORMS}")
    stored = storage_dtype(spec.dtype, platform).name
    kv = _zeros_fn(spec.global_shape(tp, dp), stored, sharding)()
    return KVCache(kv=kv, spec=spec, mesh=mesh, head_axis=head_axis, page_axis=page_axis)


def abstract_cache(spec: CacheSpec, mesh: Mesh, **axes: str | None) -> KVCache:
    """The cache :func:`init_cache` would return, as ``jax.ShapeDtypeStruct``s with shardings.

    For ahead-of-time compilation: ``jax.jit(step, donate_argnums=0).lower(abstract_cache(...),
    ...).compile()`` gives an executable whose cache input aliases its cache output. (A
    ``jax.eval_shape(init_cache, ...)`` result has ``sharding=None``: the lowered step then
    expects a replicated cache, returns a sharded one and cannot reuse the donated buffer.)
    Nothing is allocated.

    Args:
      spec, mesh: as for :func:`init_cache`; ``axes``: its keywords ``head_axis``,
        ``page_axis`` and ``platform`` (same defaults, same checks, same errors).

    Returns:
      A :class:`KVCache` whose ``kv`` is ``jax.ShapeDtypeStruct(shape, storage, sharding=...)``:
      storage[L, G·num_pages·page_size, C, D_pad] globally, sharded
      ``P(None, page_axis, head_axis, None)``; per device
      storage[L, num_pages·page_size, C/tp, D_pad] (storage as for :func:`init_cache`).
    """
    unknown = set(axes) - {"head_axis", "page_axis", "platform"}
    if unknown:
        raise TypeError(f"abstract_cache got unexpected keyword {sorted(unknown)[0]!r}")
    shapes = jax.eval_shape(functools.partial(init_cache, spec, mesh, **axes))
    # Every leaf of the cache shares kv's sharding (slots over pages, combined heads over
    # heads); tests/test_aot.py compares these with a real init_cache, leaf by leaf.
    sharding = shapes.sharding
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)
