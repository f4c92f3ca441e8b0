"""The update operation: write a step's new K/V tokens of one layer into the cache, in place.

:func:`check_write` checks a call's arguments on the host and places them on the mesh;
:func:`write` makes the one jitted, sharded call (``_write``). The public entries
:func:`kvshard.update` and :func:`kvshard.update_with_stats` (:mod:`kvshard._eager`) call the
two in turn, or skip the checks for a call equal to one that passed them.

Inside ``shard_map`` the local block [L, slots, C, D] is reshaped (a free bitcast) to
[L·slots, C, D] and ``kv_cache_start`` is offset by ``layer · slots``, so the 3-D Pallas kernel
writes the right layer of the aliased buffer; the XLA backend views the block as
[L, slots, C/n, n, D] (also free; n rows per head: 2 interleaved, 1 packed) and scatters each
row at ``[layer, slot, :, i]``, with no combined [T, C, D] copy of the new tokens.
Both backends write exactly the slices :func:`kvshard._device.drop.writable_slices` keeps. The
per-device bodies of both backends and the saturation count are in
:mod:`kvshard.cache._update_local`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from kvshard._device import reports as _reports
from kvshard._device.arg_checks import (
    as_int32,
    check_backend,
    check_layer,
    check_options,
    check_shape,
    concrete,
    dtype_of,
    is_traced,
)
from kvshard._device.backend import resolve_backend
from kvshard._device.drop import route_layer
from kvshard._device.sharding import place_all, to_spec
from kvshard._geometry.layout import CacheSpec
from kvshard.cache._codec import kv_in_spec, local_heads
from kvshard.cache._pytree import KVCache, check_cache, with_kv
from kvshard.cache._update_local import LOCAL_UPDATES, SaturationCounts, count_saturated
from kvshard.kernels.checks import validate_slices
from kvshard.step import StepMetadata, check_step

__all__ = ["SaturationCounts", "WriteCall", "WriteOptions", "check_write", "report_write", "write"]


# --------------------------------------------------------------------------------------------
# Host checks (before anything is donated)
# --------------------------------------------------------------------------------------------


def latent_kv(cache: Any, k: Any, v: Any) -> tuple[Any, Any]:
    """(k, v) as the backends take them: a latent cache's row is K and V at once, so its
    ``v`` must be None and the backends get ``k`` twice (its rows ignore the second,
    :func:`kvshard._device.kv_rows.to_rows`). Other caches: unchanged (their checks refuse None).

    Raises:
      ValueError: ``v`` given for a latent cache.
    """
    spec = getattr(cache, "spec", None)
    if not isinstance(spec, CacheSpec) or not spec.latent:
        return k, v
    if v is not None:
        raise ValueError(
            f"v must be None for a kv_layout='latent' cache (got {type(v).__name__} of shape "
            f"{np.shape(v)}): the latent row [c_kv | k_pe] is K and V at once; pass it as k "
            f"[T, 1, {spec.head_dim}]"
        )
    return k, k


def _check_kv(cache: KVCache, k: Any, v: Any, lead: tuple[int, ...]) -> None:
    """k/v shapes and dtypes: any floating dtype (cast to the cache dtype) or the cache dtype."""
    spec = cache.spec
    row = "1, kv_lora_rank + qk_rope_head_dim" if spec.latent else "num_kv_heads, head_dim"
    what = f"[dp, T, {row}]" if lead else f"[T, {row}]"
    expected = (*lead, None, spec.num_kv_heads, spec.head_dim)
    check_shape("k", k, expected, what)
    check_shape("v", v, expected, what)
    if np.shape(k) != np.shape(v):
        raise ValueError(f"k and v shapes differ: {np.shape(k)} vs {np.shape(v)}")
    if dtype_of(k) != dtype_of(v):
        raise TypeError(f"k and v dtypes differ: {dtype_of(k)} vs {dtype_of(v)}")
    for name, x in (("k", k), ("v", v)):
        dtype = dtype_of(x)
        if dtype != spec.np_dtype and not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{name} has dtype {dtype}; expected a floating dtype or the cache dtype "
                f"{spec.np_dtype}"
            )


def _check_slices(cache: KVCache, slices: Any, num_slices: Any, num_tokens: int) -> tuple[Any, Any]:
    """Validates the slices; returns (slices, num_slices) as int32 (see as_int32).

    Concrete slices must meet the kernel's own preconditions
    (:func:`kvshard.kernels.checks.validate_slices`), minus the ban on empty slices, which both
    backends write as nothing, and minus the demand that sources tile k/v without gaps.
    """
    pooled = cache.page_axis is not None
    lead = (cache.dp,) if pooled else ()
    num_groups = cache.spec.num_groups
    grouped = (num_groups,) if num_groups > 1 else ()  # a page table per layer group
    what = ("[dp, " if pooled else "[") + ("num_groups, " if grouped else "") + "3, S]"
    check_shape("slices", slices, (*lead, *grouped, 3, None), what)
    check_shape("num_slices", num_slices, (*lead, 1), "[dp, 1]" if pooled else "[1]")
    slices, num_slices = as_int32("slices", slices), as_int32("num_slices", num_slices)
    slices_np, num_np = concrete(slices), concrete(num_slices)
    if slices_np is None or num_np is None:
        return slices, num_slices  # traced: bad rows are dropped (kvshard._device.drop)
    pool = cache.spec.slots_per_pool
    hint = (
        f"; slices for another data-parallel pool? kv_cache_start addresses the group's own "
        f"{pool} local slots"
        if pooled
        else ""
    )
    pools = (
        [(slices_np[g], num_np[g], f"slices[{g}]") for g in range(cache.dp)]
        if pooled
        else [(slices_np, num_np, "slices")]
    )
    if grouped:  # every layer group's slices, named slices[(pool,) group]
        pools = [
            (sl[i], num, f"{name[:-1]}, {i}]" if pooled else f"slices[{i}]")
            for sl, num, name in pools
            for i in range(num_groups)
        ]
    for sl, num, name in pools:
        validate_slices(
            sl,
            np.array([int(num[0])]),
            num_tokens=num_tokens,
            num_rows=pool,
            page_size=cache.spec.page_size,
            name=name,
            count_name="num_slices",
            allow_empty=True,
            contiguous_sources=False,
            rows_hint=hint,
        )
    return slices, num_slices


# --------------------------------------------------------------------------------------------
# The sharded call
# --------------------------------------------------------------------------------------------


def _update_specs(cache: KVCache) -> tuple[P, ...]:
    """in_specs of (kv, layer, k, v, slices, num_slices), per-pool args with a group axis."""
    return _layout_specs(cache.spec, cache.mesh, cache.head_axis, cache.page_axis)


@functools.lru_cache(maxsize=64)
def _layout_specs(spec, mesh, head_axis, page_axis) -> tuple[P, ...]:
    # Per cache layout, not per call (an eager decode loop calls once per layer).
    cache = KVCache(None, spec, mesh, head_axis, page_axis)  # type: ignore[arg-type]
    pa, kv_spec = page_axis, kv_in_spec(cache)
    return (cache.pspec, P(), kv_spec, kv_spec, P(pa, None, None), P(pa, None))


@functools.partial(
    jax.jit,
    static_argnames=("backend", "options", "checks", "stats"),
    donate_argnums=(0,),
)
def _write(cache, layer, k, v, slices, num_slices, *, backend, options, checks, stats):
    spec = cache.spec
    # The devices write cache layer `cache_layer` (-1: nothing) through the layer's group's
    # slices: [(dp,) G, 3, S] -> [(dp,) 3, S]. The reports below judge the model layer.
    group, cache_layer = route_layer(layer, spec.groups.layer_group, spec.groups.layer_slot)
    if spec.num_groups > 1:
        slices = jax.lax.dynamic_index_in_dim(slices, group, slices.ndim - 3, keepdims=False)
    if cache.page_axis is None:  # one pool: give every per-pool argument a group axis of size 1
        k, v, slices, num_slices = k[None], v[None], slices[None], num_slices[None]
    specs = _update_specs(cache)
    args = [
        to_spec(cache.mesh, x, s)
        for x, s in zip((cache.kv, cache_layer, k, v, slices, num_slices), specs, strict=True)
    ]
    if checks:
        # Every device checks the whole (all groups') metadata and raises alike: a device left
        # running would wait forever for the failed ones (Pallas interpret mode's barrier).
        whole = (P(), P(None, None, None), P(None, None))
        specs = (*specs, *whole)
        checked = (layer, slices, num_slices)
        args += [to_spec(cache.mesh, x, s) for x, s in zip(checked, whole, strict=True)]
    local_update = functools.partial(LOCAL_UPDATES[backend], spec=spec, options=options)

    def body(kv, layer, k, v, slices, num, *whole):
        if whole:
            report_write(spec, whole, num_tokens=k.shape[1])
        k, v = local_heads(cache, k[0]), local_heads(cache, v[0])
        out = local_update(kv, layer, k, v, slices[0], num[0])  # each encodes where it writes
        if not stats:
            return out
        return out, count_saturated(cache, k, v, layer, slices[0], num[0], kv.shape[1])

    result = jax.shard_map(
        body,
        mesh=cache.mesh,
        in_specs=specs,
        out_specs=(cache.pspec, P()) if stats else cache.pspec,
        check_vma=False,  # pallas_call has no replication rule; the specs above are exact
    )(*args)
    if not stats:
        return with_kv(cache, result)
    kv, counts = result
    return with_kv(cache, kv), SaturationCounts(k=counts[0], v=counts[1])


@functools.lru_cache(maxsize=64)
def _without_group_axis(*specs: P) -> tuple[P, ...]:
    return tuple(P(*s[1:]) for s in specs)


def report_write(spec: Any, whole: Any, *, num_tokens: int) -> None:
    """``checks=True`` inside the sharded body: every device reports the rows the drop rule
    drops from the whole (layer, slices, num_slices) (:mod:`kvshard._device.reports`)."""
    _reports.check_update(
        *whole,
        num_layers=spec.num_layers,
        num_tokens=num_tokens,
        num_rows=spec.slots_per_pool,
        page_size=spec.page_size,
    )


class WriteOptions(NamedTuple):
    """The static arguments of one update call, as the caller gave them."""

    backend: Any
    options: Any
    checks: Any
    stats: bool


class WriteCall(NamedTuple):
    """A checked update call: ``_write``'s arguments, placed on the mesh."""

    cache: KVCache
    layer: Any  # int32[], the checked layer
    k: Any
    v: Any
    slices: Any  # int32, as the step gave them
    num_slices: Any
    static: dict[str, Any]  # _write's keywords: backend (resolved), options, checks, stats
    kv_spec: P  # where k and v were placed


def check_write(cache, layer, k, v, step, num_slices, given: WriteOptions) -> WriteCall:
    """The host checks and placement of an update call (see :func:`kvshard.update` for the
    arguments and what is refused). ``step``: a StepMetadata, or vLLM's slices array with
    ``num_slices``. Also used by :func:`kvshard.fused_attention`. Nothing is donated."""
    cache = check_cache(cache)
    check_backend(given.backend)
    options = check_options(given.options)
    pooled = cache.page_axis is not None
    lead = (cache.dp,) if pooled else ()
    _check_kv(cache, k, v, lead)
    num_tokens = np.shape(k)[-3]
    if isinstance(step, StepMetadata):
        if num_slices is not None:
            raise TypeError("num_slices must be omitted when step is a StepMetadata")
        check_step(step, cache.spec, num_tokens=num_tokens, token_arg="k", lead=lead)
        slices, num_slices = step.slices, step.num_slices
    elif num_slices is None:
        raise TypeError("num_slices is required unless step is a StepMetadata")
    else:
        slices = step
    layer_index = check_layer(cache.spec.num_layers, layer)
    slices, num_slices = _check_slices(cache, slices, num_slices, num_tokens)
    # In-jit checks only mean something for traced values (concrete ones passed the host
    # checks above); skipping them otherwise saves the host callback.
    checks = bool(given.checks) and any(map(is_traced, (layer, slices, num_slices)))
    mesh, (_, _, kv_spec, _, slices_spec, num_spec) = cache.mesh, _update_specs(cache)
    if not pooled:  # the specs above carry the group axis that _write adds
        kv_spec, slices_spec, num_spec = _without_group_axis(kv_spec, slices_spec, num_spec)
    placed = place_all(
        mesh,
        [
            (layer_index, P()),
            (k, kv_spec),
            (v, kv_spec),
            (slices, slices_spec),
            (num_slices, num_spec),
        ],
        reuse=not any(map(is_traced, (cache.kv, k, v))),  # eager: a step placed once per step
    )
    static = {
        "backend": resolve_backend(cache, given.backend),
        "options": options,
        "checks": checks,
        "stats": given.stats,
    }
    layer_index, k, v, slices, num_slices = placed
    return WriteCall(cache, layer_index, k, v, slices, num_slices, static, kv_spec)


def write(call: WriteCall) -> Any:
    """The checked call's one jitted, sharded write: the new cache (and, with ``stats``, the
    :class:`SaturationCounts`). Donates ``call.cache``."""
    return _write(
        call.cache, call.layer, call.k, call.v, call.slices, call.num_slices, **call.static
    )
