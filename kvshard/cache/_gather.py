"""``gather``: read K and V of one layer at token slots (the debugging read, and the oracle's).

Per device, from its own block; with replicated heads the copies are all-gathered so every
device returns each head once. A quantized cache's values are dequantized on the way out.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from kvshard._device import reports as _reports
from kvshard._device.arg_checks import (
    as_int32,
    check_layer,
    check_shape,
    concrete,
    is_traced,
)
from kvshard._device.drop import layer_in_range, route_layer
from kvshard._device.sharding import place, to_spec
from kvshard.cache._codec import read_dtype, split, to_real
from kvshard.cache._pytree import KVCache, check_cache

__all__ = ["gather"]


@functools.partial(jax.jit, static_argnames=("checks",))
def _gather_jit(cache, layer, slots, *, checks=False):
    pa, ha, r = cache.page_axis, cache.head_axis, cache.replication
    if pa is None:
        slots = slots[None]
    groups = cache.spec.groups
    _, cache_layer = route_layer(layer, groups.layer_group, groups.layer_slot)
    specs = (cache.pspec, P(), P(pa, None))
    inputs = (cache.kv, cache_layer, slots)
    args = [to_spec(cache.mesh, x, s) for x, s in zip(inputs, specs, strict=True)]
    if checks:  # every device checks the model layer and all slots (see kvshard.cache._update)
        specs = (*specs, P(), P(None, None))
        args += [to_spec(cache.mesh, layer, P()), to_spec(cache.mesh, slots, P(None, None))]

    def body(kv, layer, slots, *whole):  # layer: the cache layer (-1: none)
        if whole:
            _reports.check_gather(
                whole[0],
                whole[1],
                num_layers=cache.spec.num_layers,
                num_slots=cache.spec.slots_per_pool,
            )
        slot = slots[0]
        # A traced layer out of range reads zeros, like a slot out of range (indexing would
        # wrap -1 to the last layer and clamp L to it).
        layer_ok = layer_in_range(layer, kv.shape[0])
        ok = (slot >= 0) & (slot < kv.shape[1]) & layer_ok
        rows = kv[jnp.where(layer_ok, layer, 0), jnp.where(ok, slot, 0)]
        rows = jnp.where(ok[:, None, None], rows, 0)
        k, v = split(cache.spec, rows)
        if r > 1:  # one replicated head per device: collect them all, keep replica 0 of each
            k, v = (jax.lax.all_gather(x, ha, axis=1, tiled=True)[:, ::r] for x in (k, v))
        return k[None], v[None]

    out_spec = P(pa, None, ha if r == 1 else None, None)
    k, v = jax.shard_map(
        body, mesh=cache.mesh, in_specs=specs, out_specs=(out_spec, out_spec), check_vma=False
    )(*args)
    if pa is None:
        k, v = k[0], v[0]
    return k, v


def gather(
    cache: KVCache,
    layer: int | jax.Array,
    slots: jax.Array | np.ndarray,
    *,
    checks: bool = False,
    dtype: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """Reads K and V of one layer at token slots (the read side of the oracle).

    Args:
      cache: not donated.
      layer: int or int scalar array in [0, L); may be traced. With layer groups it reads
        cache layer ``spec.groups.layer_slot[layer]`` (slots address the pool directly, so
        the layer's group plays no part).
      slots: int[N] slot ids in [0, num_pages·page_size), or int[dp, N] with a page axis
        (group g reads its own pool). Any integer dtype when concrete (cast to int32 after a
        range check); int32 when traced.
      checks: with traced arguments, report a layer or slot out of range as an
        error instead of reading zeros (a host callback raises; see :func:`update`). No
        effect on concrete arguments.
      dtype: the floating compute dtype of the result. Values are always real values: a
        quantized cache's are dequantized, ``float32(stored) * float32(scale)`` cast to
        ``dtype`` (:func:`kvshard.quant.dequantize`); a float cache's are cast. None: the
        cache dtype for float caches, float32 for quantized ones.

    Returns:
      (k, v), each out-dtype[N, H, D] globally (out-dtype: ``dtype`` as above), or
      [dp, N, H, D] with a page axis, sharded over the page axis: unpadded (D, not D_pad),
      replica 0 of every head. Per device: when heads are not replicated (r = 1) they stay
      sharded over heads like the cache, so each device holds out-dtype[N, H/tp, D] (or
      [1, N, H/tp, D]); when r > 1 the heads are all-gathered and every device holds the
      whole replicated out-dtype[N, H, D] (or [1, N, H, D]). Traced out-of-range slots, and
      every slot of a traced out-of-range layer, read zeros. A ``kv_layout="latent"`` cache
      returns (latent out-dtype[N, 1, head_dim], its ``c_kv`` lanes out-dtype[N, 1,
      kv_lora_rank]): the row, and the part of it attention uses as the value.

    Raises:
      TypeError: ``slots`` not an integer array (or traced and not int32), ``layer`` not an
        integer scalar, ``dtype`` not a floating dtype.
      ValueError: wrong ``slots`` shape, concrete ``layer`` or ``slots`` out of range.
    """
    cache = check_cache(cache)
    out_dtype = read_dtype(cache.spec, dtype)
    layer_index = check_layer(cache.spec.num_layers, layer)
    pooled = cache.page_axis is not None
    lead = (cache.dp,) if pooled else ()
    check_shape("slots", slots, (*lead, None), "[dp, N]" if pooled else "[N]")
    slots = as_int32("slots", slots)
    pool = cache.spec.slots_per_pool
    host = concrete(slots)
    if host is not None and host.size and (host.min() < 0 or host.max() >= pool):
        bad = host[(host < 0) | (host >= pool)].flat[0]
        raise ValueError(f"slots contains {bad}, out of range [0, {pool})")
    checks = bool(checks) and any(map(is_traced, (layer, slots)))
    slots = place(cache.mesh, slots, P(cache.page_axis) if pooled else P())
    k, v = _gather_jit(cache, place(cache.mesh, layer_index, P()), slots, checks=checks)
    if not cache.spec.quantized and out_dtype == cache.spec.np_dtype:
        return k, v  # stored values are the real values
    return to_real(cache.spec, k, v, out_dtype)
