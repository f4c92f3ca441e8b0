"""``update``: write a step's new K/V tokens of one layer into the cache, in place.

Inside ``shard_map`` the local block [L, slots, C, D] is reshaped (a free bitcast) to
[L·slots, C, D] and ``kv_cache_start`` is offset by ``layer · slots``, so the 3-D Pallas kernel
writes the right layer of the aliased buffer; the XLA backend views the block as
[L, slots, C/n, n, D] (also free; n rows per head: 2 interleaved, 1 packed) and scatters each
row at ``[layer, slot, :, i]``, with no combined [T, C, D] copy of the new tokens.
Both backends write exactly the slices :func:`kvshard._drop.writable_slices` keeps.

The per-device bodies of both backends and the saturation count are in
:mod:`kvshard.cache._update_local`, the eager fast path in :mod:`kvshard.cache._update_eager`;
this module holds the host checks and the sharded call. (Over 400 lines because the public
operation's checks and its documented contract are read in one file.)
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from kvshard import _reports
from kvshard._drop import route_layer
from kvshard._eager import EAGER_CALLS, placed_metadata
from kvshard._host_checks import (
    as_int32,
    check_backend,
    check_layer,
    check_options,
    check_shape,
    concrete,
    dtype_of,
    is_traced,
)
from kvshard._layout import CacheSpec
from kvshard._platform import resolve_backend
from kvshard._sharding import place_all, to_spec
from kvshard._types import Backend, BackendOptions, Schedule
from kvshard.cache._codec import kv_in_spec, local_heads
from kvshard.cache._pytree import KVCache, check_cache, with_kv
from kvshard.cache._update_eager import (
    eager_update_key,
    known_update,
    remember,
    same_step_update,
)
from kvshard.cache._update_local import LOCAL_UPDATES, SaturationCounts, count_saturated
from kvshard.kernels.checks import validate_slices
from kvshard.step import StepMetadata, check_step

__all__ = ["SaturationCounts", "update", "update_with_stats"]


# --------------------------------------------------------------------------------------------
# Host checks (before anything is donated)
# --------------------------------------------------------------------------------------------


def latent_kv(cache: Any, k: Any, v: Any) -> tuple[Any, Any]:
    """(k, v) as the backends take them: a latent cache's row is K and V at once, so its
    ``v`` must be None and the backends get ``k`` twice (its rows ignore the second,
    :func:`kvshard._kv_rows.to_rows`). Other caches: unchanged (their checks refuse None).

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
        return slices, num_slices  # traced: bad rows are dropped (kvshard._drop)
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


def _legacy_options(options: Any, interpret: Any, schedule: Any) -> BackendOptions:
    """``options``, with the deprecated ``interpret=``/``schedule=`` keywords folded in."""
    options = check_options(options)
    legacy = {k: v for k, v in (("interpret", interpret), ("schedule", schedule)) if v is not None}
    if legacy:
        warnings.warn(
            f"update({', '.join(f'{k}=' for k in legacy)}...) is deprecated: pass "
            "options=kvshard.BackendOptions(...)",
            DeprecationWarning,
            stacklevel=5,
        )
        options = BackendOptions(**{**options.__dict__, **legacy})
    return options


# --------------------------------------------------------------------------------------------
# The sharded call
# --------------------------------------------------------------------------------------------


def _update_specs(cache: KVCache) -> tuple[P, ...]:
    """in_specs of (kv, layer, k, v, slices, num_slices), per-pool args with a group axis."""
    return _layout_specs(cache.spec, cache.mesh, cache.head_axis, cache.page_axis)


@functools.lru_cache(maxsize=64)
def _layout_specs(spec, mesh, head_axis, page_axis) -> tuple[P, ...]:
    # Per cache layout, not per call: building them was a measurable part of an eager call.
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
            _reports.check_update(
                *whole,
                num_layers=spec.num_layers,
                num_tokens=k.shape[1],
                num_rows=spec.slots_per_pool,
                page_size=spec.page_size,
            )
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


def _update_call(
    cache,
    layer,
    k,
    v,
    step,
    num_slices,
    *,
    slices,
    backend,
    options,
    checks,
    interpret,
    schedule,
    stats,
):
    """The host side of :func:`update` and :func:`update_with_stats`: check, place, call."""
    k, v = latent_kv(cache, k, v)
    plain = interpret is None and schedule is None  # else a deprecation warning: the full path
    statics = (backend, options, checks, stats)
    given_num_slices = num_slices  # as the call gave it (rebound below)
    if plain and slices is None:
        known = same_step_update(_write, cache, layer, k, v, step, num_slices, statics)
        if known is not None:  # the last call's step, passed before (kvshard.cache._update_eager)
            return known
    eager = (
        eager_update_key(
            cache, layer, k, v, step, num_slices, slices, backend, options, checks, stats
        )
        if plain
        else None
    )
    if eager is not None:
        known = known_update(_write, eager, cache, layer, k, v, step, num_slices, statics)
        if known is not None:  # this call passed every check before (kvshard._eager)
            return known
    if slices is not None:  # the keyword spelling of vLLM's form
        if step is not None:
            raise TypeError("pass step or slices=, not both")
        step = slices
    if step is None:
        raise TypeError("update needs the step: a StepMetadata, or slices and num_slices")
    options = _legacy_options(options, interpret, schedule)
    cache, placed, static, kv_spec = checked_write_args(
        cache, layer, k, v, step, num_slices, backend, options, checks, stats
    )
    result = _write(cache, *placed, **static)
    if eager is not None:  # every check passed: the next equal call is a lookup
        moved = placed[1] is not k or placed[2] is not v  # a function of the key's shardings
        stored = placed_metadata(eager[1], placed[3:])
        known = (stored, kv_spec if moved else None, static)
        EAGER_CALLS.put(eager[0], known)
        remember(cache, k, v, step, given_num_slices, statics, known)
    return result


def checked_write_args(cache, layer, k, v, step, num_slices, backend, options, checks, stats):
    """:func:`update`'s host checks and placement: ``(cache, placed, static, kv_spec)``,
    ``placed`` = (layer, k, v, slices, num_slices) as ``_write`` takes them, ``static`` its
    keywords. Also used by :func:`kvshard.fused_attention`. Raises what :func:`update`
    raises; nothing is donated."""
    cache = check_cache(cache)
    check_backend(backend)
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
    checks = bool(checks) and any(map(is_traced, (layer, slices, num_slices)))
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
        "backend": resolve_backend(cache, backend),
        "options": options,
        "checks": checks,
        "stats": stats,
    }
    return cache, placed, static, kv_spec


def update(
    cache: KVCache,
    layer: int | jax.Array,
    k: jax.Array,
    v: jax.Array | None,
    step: StepMetadata | jax.Array | np.ndarray | None = None,
    num_slices: jax.Array | np.ndarray | None = None,
    *,
    slices: jax.Array | np.ndarray | None = None,
    backend: Backend = "auto",
    options: BackendOptions | None = None,
    checks: bool = False,
    interpret: bool | None = None,
    schedule: Schedule | None = None,
) -> KVCache:
    """Writes new K/V tokens of one layer into the cache, in place; returns the new cache.

    Slice ``i < num_slices`` copies tokens ``[new_kv_start, new_kv_start + slice_len)`` of
    ``k``/``v`` to slots ``[kv_cache_start, kv_cache_start + slice_len)`` of layer ``layer`` (on
    every head, in its pool): :func:`kvshard.reference.kv_cache_update` on the combined layout.
    Each device builds the rows of ``spec.kv_layout`` (pads, and interleaves or packs K and V)
    and (when replicating) picks its own heads of k/v, then runs the backend on its own block;
    no device communicates with another except to receive its heads of k/v.

    Args:
      cache: DONATED when called eagerly: ``cache.kv`` is deleted afterwards; use the result.
        A cache already donated is refused (ValueError) before anything runs.
      layer: int or int scalar array in [0, L); may be traced (lax.scan over layers). With
        layer groups (``spec.num_groups > 1``) it writes cache layer
        ``spec.groups.layer_slot[layer]`` through the slices of group
        ``spec.groups.layer_group[layer]`` (static tables indexed by the layer, traced or not).
      k: float[T, H, D] globally, as an attention layer produces it (unpadded, unreplicated;
        any sharding, usually replicated), or float[dp, T, H, D] with a page axis. ``T`` is
        the step's ``num_tokens_padded``. Cast to the cache dtype; for a quantized cache,
        quantized with ``spec.k_scale`` (``v``: v_scale): divided by the scale, rounded,
        saturated to the dtype's finite range, NaN stored as 0
        (:func:`kvshard.quant.quantize`; :func:`update_with_stats` counts what saturates).
        Per device inside ``shard_map`` it arrives as float[T, H/tp, D] (heads split over the
        head axis) when r = 1, or whole as float[T, H, D] when r > 1, and each device then
        picks its own head ``i // r``; with a page axis each device sees only its group's
        [1, T, ...] slice.
      v: same shape, sharding and per-device handling as ``k``; its dtype must equal ``k``'s.
        None for a ``kv_layout="latent"`` cache (MLA), whose ``k`` is the latent row
        float[T, 1, kv_lora_rank + qk_rope_head_dim] = ``concat([c_kv, k_pe], -1)``, K and
        V at once (docs/layout.md, "Latent caches"); a ``v`` there is refused (ValueError).
      step: the step's :class:`~kvshard.StepMetadata` (from :func:`kvshard.build_step`), whose
        ``slices``/``num_slices`` are written and whose geometry must be the cache's. Or, in
        vLLM's form, the slices themselves: int32[3, S] rows (kv_cache_start, new_kv_start,
        slice_len), or int32[dp, 3, S] with a page axis, where group g's kv_cache_start indexes
        its own pool of num_pages·page_size slots; ``num_slices`` then gives the live count.
        With layer groups the slices gain a ``[num_groups]`` axis after any ``[dp]`` axis,
        int32[(dp,) G, 3, S] (each group's kv_cache_start through its own page table), and
        ``num_slices`` stays int32[(dp,) 1]; a step's geometry must have ``num_groups == G``.
      num_slices: int32[1] live slices (later ones are padding), or int32[dp, 1]; only with
        slices given as an array. Concrete ``slices``/``num_slices`` may have any integer
        dtype (range-checked against int32, then cast); traced ones must be int32.
      slices: keyword spelling of the array form of ``step`` (vLLM's name).
      backend: "pallas" (the kernel; interpret mode off TPU), "xla" (scatter), or "auto":
        pallas when the mesh is made of TPUs, xla otherwise. Both give identical results.
      options: :class:`~kvshard.BackendOptions` (the pallas backend reads ``interpret`` and
        ``schedule``); None for the defaults.
      checks: with traced arguments, report what would be dropped (a layer out of range,
        ``num_slices`` outside [0, S], a live slice the drop rule refuses, overlapping live
        slices) as an error instead of dropping silently: a host callback
        (``jax.debug.callback``) raises ValueError naming the slice, which surfaces as
        ``jax.errors.JaxRuntimeError`` carrying that message when the result is used.
        Costs O(S²) per call and a host round trip: a debugging mode. No effect on concrete
        arguments, which are always checked on the host. See docs/guides/refused-inputs.md.
      interpret, schedule: deprecated; use ``options``.

    Preconditions on live slices (checked on the host when ``slices``/``num_slices`` are
    concrete): 0 <= num_slices <= S; 0 <= slice_len <= page_size; tokens in [0, T); slots in
    the pool; no two slices overlap in slots or in tokens. Traced: a layer outside [0, L)
    writes nothing, and a live slice that is empty, longer than a page, crosses a page or
    leaves the tokens or the pool writes nothing, identically on both backends (the drop
    rule, :mod:`kvshard._drop`). Overlapping traced slices are outside the contract.

    Raises:
      TypeError: wrong cache or step type or dtypes (slices/num_slices not integer arrays, or
        traced and not int32; k/v not floating or the cache dtype; k/v dtypes differ; layer not
        an integer scalar); num_slices given with a StepMetadata or missing without one.
      ValueError: wrong shapes (k/v tokens other than the step's), a step built for another
        geometry, a donated cache, a concrete layer or slice out of range, a concrete
        slices/num_slices value outside int32, overlapping slices, unknown backend. Nothing
        is donated when an error is raised.
    """
    return _update_call(
        cache,
        layer,
        k,
        v,
        step,
        num_slices,
        slices=slices,
        backend=backend,
        options=options,
        checks=checks,
        interpret=interpret,
        schedule=schedule,
        stats=False,
    )


def update_with_stats(*args: Any, **kwargs: Any) -> tuple[KVCache, SaturationCounts]:
    """:func:`update`, also returning how many written values saturated the quantized dtype.

    Takes exactly :func:`update`'s arguments (see :func:`update` for shapes, sharding,
    donation and errors) and makes the same write, bit for bit; the count costs one extra
    elementwise pass over this step's k/v and a psum of two int32 across the head and page
    axes. Works eagerly and under ``jit``/``lax.scan``: the counts are ordinary arrays, so a
    serving loop can accumulate them on device and read them when it logs.

    Returns:
      (cache, counts): the updated cache and a :class:`SaturationCounts` of int32[] arrays,
      replicated on every device. A non-zero count means the scale is too small for this
      data: :func:`kvshard.calibrate_scales` on a representative sample picks a larger one.
    """
    bound = inspect.signature(update).bind(*args, **kwargs)
    bound.apply_defaults()
    return _update_call(**bound.arguments, stats=True)


# Documentation tools and IDEs show update's own parameters.
update_with_stats.__signature__ = inspect.signature(update).replace(  # type: ignore[attr-defined]
    return_annotation="tuple[KVCache, SaturationCounts]"
)
