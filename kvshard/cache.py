"""A paged, combined-head KV cache sharded over a JAX device mesh and updated in place.

The cache of every layer lives in ONE stacked array (see docs/layout.md for pictures)::

    kv: dtype[L, G·num_pages·page_size, 2·H·r, D_pad]
        sharded NamedSharding(mesh, P(None, page_axis, head_axis, None))
    per device: dtype[L, num_pages·page_size, 2·H·r / tp, D_pad]

with ``H`` KV heads, replication ``r`` (:func:`kvshard._layout.check_tensor_parallel`),
``tp``/``G`` the sizes of the head and page mesh axes (1 when the axis is None), ``D_pad`` the
head dimension padded to a multiple of 128. Combined head ``2·j`` is K and ``2·j + 1`` is V of
replicated head ``j``; replicated head ``j`` is a copy of KV head ``j // r``. Sharding the
combined axis therefore hands each device the K and V of whole heads: no update, copy or
:func:`kvshard.attention` read communicates between devices (:func:`gather`, the debugging
read, all-gathers replicated heads into one global array).

Why one stacked array rather than a list of per-layer arrays: ``layer`` can be a traced integer
(a ``lax.scan`` over layers, or a model that passes the layer index as data), one compiled
executable serves every layer, and the cache is one pytree leaf to donate. The update stays in
place: inside ``shard_map`` the local block [L, slots, C, D] is reshaped (a free bitcast) to
[L·slots, C, D] and ``kv_cache_start`` is offset by ``layer · slots``, so the 3-D Pallas kernel
writes the right layer of the aliased buffer; the XLA backend scatters at ``[layer, slot]``.

Public functions: :func:`init_cache`, :func:`update`, :func:`gather`, :func:`copy_pages`, and
:func:`abstract_cache` (shapes and shardings only, for ahead-of-time compilation).
Every one validates its arguments on the host before anything is donated, so a bad call raises
and leaves the cache intact and readable.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, NamedTuple

import einops
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kvshard import _guards, quant
from kvshard._layout import CacheSpec, check_tensor_parallel
from kvshard.distributed import global_array
from kvshard.kernels.update import (
    SCHEDULES,
    Schedule,
    kv_cache_update,
    slice_is_writable,
    validate_slices,
)
from kvshard.step import StepMetadata

__all__ = [
    "Backend",
    "CacheSpec",
    "KVCache",
    "SaturationCounts",
    "abstract_cache",
    "check_tensor_parallel",
    "copy_pages",
    "gather",
    "init_cache",
    "update",
    "update_with_stats",
]

Backend = Literal["auto", "pallas", "xla"]
_BACKENDS = ("auto", "pallas", "xla")


# --------------------------------------------------------------------------------------------
# The pytree
# --------------------------------------------------------------------------------------------


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["kv"],
    meta_fields=["spec", "mesh", "head_axis", "page_axis"],
)
@dataclasses.dataclass(frozen=True)
class KVCache:
    """The sharded cache of every layer: one array plus static layout metadata.

    A pytree whose only leaf is ``kv``; ``spec``, ``mesh`` and the axis names are static aux data,
    so a ``KVCache`` passes through ``jax.jit``, ``lax.scan`` carries and donation unchanged.
    Build one with :func:`init_cache`; every function returns a new ``KVCache`` (the old one's
    buffer has been donated).

    Attributes:
      kv: dtype[L, G·num_pages·page_size, 2·H·r, D_pad] globally, sharded
        ``P(None, page_axis, head_axis, None)``; per device
        dtype[L, num_pages·page_size, 2·H·r/tp, D_pad].
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
    def tp(self) -> int:
        """Size of the head axis (1 when ``head_axis`` is None)."""
        return _axis_size(self.mesh, self.head_axis)

    @property
    def dp(self) -> int:
        """Number of page pools: size of the page axis (1 when ``page_axis`` is None)."""
        return _axis_size(self.mesh, self.page_axis)

    @property
    def replication(self) -> int:
        """Copies of each KV head held by the cache."""
        return self.spec.replication(self.tp)

    @property
    def pspec(self) -> P:
        """PartitionSpec of ``kv``."""
        return P(None, self.page_axis, self.head_axis, None)

    @property
    def sharding(self) -> NamedSharding:
        """NamedSharding of ``kv``."""
        return NamedSharding(self.mesh, self.pspec)


def _axis_size(mesh: Mesh, axis: str | None) -> int:
    return 1 if axis is None else int(mesh.shape[axis])


def _with_kv(cache: KVCache, kv: jax.Array) -> KVCache:
    return dataclasses.replace(cache, kv=kv)


# --------------------------------------------------------------------------------------------
# Allocation
# --------------------------------------------------------------------------------------------


def _check_mesh_axes(mesh: Any, head_axis: str | None, page_axis: str | None) -> None:
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
) -> KVCache:
    """Allocates a zeroed cache directly sharded over ``mesh``.

    Args:
      spec: cache geometry; ``spec.num_pages`` pages per page pool.
      mesh: the device mesh (built by the caller).
      head_axis: mesh axis that shards heads, or None to keep all heads on every device.
      page_axis: mesh axis whose G groups each own a separate pool of ``num_pages`` pages
        (data-parallel attention), or None for one pool.

    Returns:
      A :class:`KVCache` with ``kv``: spec.dtype[L, G·num_pages·page_size, 2·H·r, D_pad] zeros
      globally, sharded ``P(None, page_axis, head_axis, None)``: per device
      spec.dtype[L, num_pages·page_size, 2·H·r/tp, D_pad] (tp, G: sizes of the head and page
      axes, 1 when None; r: :attr:`KVCache.replication`). Only the per-device blocks are ever
      materialised.

    Raises:
      TypeError: ``spec`` is not a CacheSpec or ``mesh`` not a Mesh.
      ValueError: an axis is not in the mesh, both axes are the same, or the head-axis size
        neither divides nor is a multiple of ``spec.num_kv_heads``.
    """
    if not isinstance(spec, CacheSpec):
        raise TypeError(f"spec must be a CacheSpec, got {type(spec).__name__}")
    _check_mesh_axes(mesh, head_axis, page_axis)
    tp, dp = _axis_size(mesh, head_axis), _axis_size(mesh, page_axis)
    check_tensor_parallel(spec.num_kv_heads, tp)
    sharding = NamedSharding(mesh, P(None, page_axis, head_axis, None))
    kv = _zeros_fn(spec.global_shape(tp, dp), spec.dtype, sharding)()
    return KVCache(kv=kv, spec=spec, mesh=mesh, head_axis=head_axis, page_axis=page_axis)


def abstract_cache(
    spec: CacheSpec,
    mesh: Mesh,
    *,
    head_axis: str | None = "model",
    page_axis: str | None = None,
) -> KVCache:
    """The cache :func:`init_cache` would return, as ``jax.ShapeDtypeStruct``s with shardings.

    For ahead-of-time compilation: ``jax.jit(step, donate_argnums=0).lower(abstract_cache(...),
    ...).compile()`` gives an executable whose cache input aliases its cache output. (A
    ``jax.eval_shape(init_cache, ...)`` result has ``sharding=None``: the lowered step then
    expects a replicated cache, returns a sharded one and cannot reuse the donated buffer.)
    Nothing is allocated.

    Args:
      spec, mesh, head_axis, page_axis: as for :func:`init_cache` (same checks, same errors).

    Returns:
      A :class:`KVCache` whose ``kv`` is ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``:
      spec.dtype[L, G·num_pages·page_size, 2·H·r, D_pad] globally, sharded
      ``P(None, page_axis, head_axis, None)``; per device
      spec.dtype[L, num_pages·page_size, 2·H·r/tp, D_pad].
    """
    shapes = jax.eval_shape(
        functools.partial(init_cache, spec, mesh, head_axis=head_axis, page_axis=page_axis)
    )
    # Every leaf of the cache shares kv's sharding (slots over pages, combined heads over
    # heads); tests/test_aot.py compares these with a real init_cache, leaf by leaf.
    sharding = NamedSharding(mesh, P(None, page_axis, head_axis, None))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


# --------------------------------------------------------------------------------------------
# Host-side validation (runs before anything is donated)
# --------------------------------------------------------------------------------------------


def _concrete(x: Any) -> np.ndarray | None:
    """Returns ``x`` as a host array, or None while its values are unknown on this host: while
    traced, or for an array spanning processes (other hosts hold some of its shards), which
    is then treated like a traced value (kvshard.distributed)."""
    if isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    return np.asarray(x)


def _dtype(x: Any) -> np.dtype:
    """The dtype of an array as given (jnp.result_type would map NumPy int64 to int32)."""
    return np.dtype(x.dtype) if hasattr(x, "dtype") else jnp.result_type(x)


def _check_cache(cache: Any) -> KVCache:
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache (from init_cache), got {type(cache).__name__}")
    return cache


def _check_backend(backend: Any) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {_BACKENDS}")


def _check_layer(cache: KVCache, layer: Any) -> jax.Array | np.integer:
    """Returns ``layer`` as an int32 scalar; range-checked when concrete.

    Normalising to int32 keeps one jit signature for Python ints, NumPy ints and traced ints.
    """
    num_layers = cache.spec.num_layers
    dtype = _dtype(layer)
    if np.shape(layer) != () or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"layer must be an integer scalar, got {dtype}{list(np.shape(layer))}")
    value = _concrete(layer)
    if value is None:
        return jnp.asarray(layer, jnp.int32)
    if not 0 <= int(value) < num_layers:
        raise ValueError(f"layer={int(value)} is out of range [0, {num_layers})")
    return np.int32(value)


def _shape_str(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _check_array(name: str, x: Any, expected: tuple[int | None, ...], what: str) -> None:
    """Raises ValueError unless ``x.shape`` matches ``expected`` (None matches any size)."""
    shape = np.shape(x)
    if len(shape) != len(expected) or any(
        e is not None and e != s for e, s in zip(expected, shape, strict=False)
    ):
        want = _shape_str(tuple("*" if e is None else e for e in expected))  # type: ignore[misc]
        raise ValueError(f"{name} must have shape {what} = {want}, got {_shape_str(shape)}")


def _check_kv_dtype(name: str, x: Any, cache_dtype: np.dtype) -> None:
    """k/v may be any floating dtype (cast to the cache dtype) or exactly the cache dtype."""
    dtype = _dtype(x)
    if dtype != cache_dtype and not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{name} has dtype {dtype}; expected a floating dtype or the cache dtype {cache_dtype}"
        )


def _check_kv(cache: KVCache, k: Any, v: Any, lead: tuple[int, ...]) -> None:
    spec = cache.spec
    what = "[dp, T, num_kv_heads, head_dim]" if lead else "[T, num_kv_heads, head_dim]"
    expected = (*lead, None, spec.num_kv_heads, spec.head_dim)
    _check_array("k", k, expected, what)
    _check_array("v", v, expected, what)
    if np.shape(k) != np.shape(v):
        raise ValueError(f"k and v shapes differ: {np.shape(k)} vs {np.shape(v)}")
    if _dtype(k) != _dtype(v):
        raise TypeError(f"k and v dtypes differ: {_dtype(k)} vs {_dtype(v)}")
    _check_kv_dtype("k", k, spec.np_dtype)
    _check_kv_dtype("v", v, spec.np_dtype)


def _check_slice_values(
    slices: np.ndarray, num: int, *, name: str, num_tokens: int, spec: CacheSpec, pooled: bool
) -> None:
    """Validates one pool's concrete slices [3, S] and live count ``num``.

    The kernel's own preconditions (:func:`kvshard.kernels.update.validate_slices`),
    minus the ban on empty slices, which both backends write as nothing, and minus the demand
    that sources tile k/v without gaps, which neither backend needs.
    """
    pool = spec.slots_per_pool
    hint = (
        f"; slices for another data-parallel pool? kv_cache_start addresses the group's own "
        f"{pool} local slots"
        if pooled
        else ""
    )
    validate_slices(
        slices,
        np.array([num]),
        num_tokens=num_tokens,
        num_rows=pool,
        page_size=spec.page_size,
        name=name,
        count_name="num_slices",
        allow_empty=True,
        contiguous_sources=False,
        rows_hint=hint,
    )


def _check_update_args(
    cache: KVCache, k: Any, v: Any, slices: Any, num_slices: Any
) -> tuple[Any, Any]:
    """Validates update's arguments; returns (slices, num_slices) as int32 (see as_int32)."""
    pooled = cache.page_axis is not None
    lead = (cache.dp,) if pooled else ()
    _check_kv(cache, k, v, lead)
    what = "[dp, 3, S]" if pooled else "[3, S]"
    _check_array("slices", slices, (*lead, 3, None), what)
    _check_array("num_slices", num_slices, (*lead, 1), "[dp, 1]" if pooled else "[1]")
    slices = _guards.as_int32("slices", slices)
    num_slices = _guards.as_int32("num_slices", num_slices)
    slices_np, num_np = _concrete(slices), _concrete(num_slices)
    if slices_np is None or num_np is None:
        return slices, num_slices  # traced: bad rows are dropped (see `update`)
    num_tokens = np.shape(k)[-3]
    groups = (
        [(slices_np[g], num_np[g], f"slices[{g}]") for g in range(cache.dp)]
        if pooled
        else [(slices_np, num_np, "slices")]
    )
    for sl, num, name in groups:
        _check_slice_values(
            sl, int(num[0]), name=name, num_tokens=num_tokens, spec=cache.spec, pooled=pooled
        )
    return slices, num_slices


# --------------------------------------------------------------------------------------------
# Layout transforms (per device, inside shard_map)
# --------------------------------------------------------------------------------------------


def _to_storage(spec: CacheSpec, x: jax.Array, scale: float | None) -> jax.Array:
    """Real values -> stored values: the ONE place writes convert, shared by both backends.

    Quantized dtypes: :func:`kvshard.quant.quantize` (scale, round, saturate, cast); float
    dtypes: a plain cast. Doing it before the backend is what makes Pallas and XLA agree bit
    for bit.
    """
    if scale is None:
        return x.astype(spec.np_dtype)
    return quant.quantize(x, scale, spec.np_dtype)


def _combine(spec: CacheSpec, k: jax.Array, v: jax.Array) -> jax.Array:
    """k, v [T, h, D] -> [T, 2·h, D_pad] in cache dtype: combined head 2j = K_j, 2j+1 = V_j."""
    pad = [(0, 0), (0, 0), (0, spec.padded_head_dim - spec.head_dim)]
    k, v = (
        jnp.pad(_to_storage(spec, x, scale), pad)
        for x, scale in ((k, spec.k_scale), (v, spec.v_scale))
    )
    return einops.rearrange(jnp.stack([k, v], axis=2), "t h two d -> t (h two) d")


def _split(spec: CacheSpec, combined: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inverse of :func:`_combine`: [N, 2·h, D_pad] -> k, v [N, h, D]."""
    x = einops.rearrange(combined, "n (h two) d -> n h two d", two=2)
    return x[:, :, 0, : spec.head_dim], x[:, :, 1, : spec.head_dim]


def _local_heads(cache: KVCache, x: jax.Array) -> jax.Array:
    """This device's KV heads of x [T, h_in, D] (inside shard_map).

    Without replication the head axis arrives already split (in_spec ``head_axis``), so x holds
    exactly this device's heads. With replication r > 1 every device holds one replicated head
    and x arrives with all H heads: device i along the head axis takes head i // r — the same
    head ``jnp.repeat(k, r, axis=1)`` would put there, without materialising the repeat.
    """
    r = cache.replication
    if r == 1:
        return x
    head = jax.lax.axis_index(cache.head_axis) // r
    return jax.lax.dynamic_slice_in_dim(x, head, 1, axis=1)


def _kv_in_spec(cache: KVCache) -> P:
    """in_spec of k/v [G, T, H, D]: split heads unless they are replicated (then all heads)."""
    return P(cache.page_axis, None, cache.head_axis if cache.replication == 1 else None, None)


def _is_explicit(mesh: Mesh) -> bool:
    return any(t == AxisType.Explicit for t in mesh.axis_types)


def _to_spec(mesh: Mesh, x: jax.Array, spec: P) -> jax.Array:
    """Gives x the sharding shard_map's in_specs name.

    With Explicit mesh axes shard_map insists that its inputs already carry exactly that
    sharding; with Auto axes shard_map reshards by itself.
    """
    if _is_explicit(mesh):
        return jax.reshard(x, NamedSharding(mesh, spec))
    return x


def _place(mesh: Mesh, x: Any, spec: P) -> Any:
    """Eager calls: puts concrete inputs on the mesh (numpy arrays have no mesh sharding)."""
    if isinstance(x, jax.core.Tracer):
        return x
    sharding = NamedSharding(mesh, spec)
    if not sharding.is_fully_addressable:  # a mesh spanning processes: see kvshard.distributed
        return global_array(x, sharding)
    return jax.device_put(x, sharding)


# --------------------------------------------------------------------------------------------
# Per-device update bodies (run inside shard_map on one device's block)
# --------------------------------------------------------------------------------------------


def _valid_slices(
    slices: jax.Array,
    num: jax.Array,
    layer: jax.Array,
    *,
    num_layers: int,
    num_tokens: int,
    num_slots: int,
    page_size: int,
) -> jax.Array:
    """bool[S]: live slices the kernel would write (its drop rule, shared by both backends).

    A slice is written iff ``0 <= layer < num_layers``, ``i < num``,
    ``1 <= slice_len <= page_size``, it stays inside one page, and both its token and slot
    ranges are in bounds; every other slice writes nothing. The layer test matters: indexing
    would wrap layer -1 to the last layer, and the kernel's flat offset ``layer · slots`` can
    overflow int32 back into range.
    """
    live = (jnp.arange(slices.shape[1]) < num[0]) & _guards.layer_in_range(layer, num_layers)
    return live & slice_is_writable(
        slices[0],
        slices[1],
        slices[2],
        num_tokens=num_tokens,
        num_rows=num_slots,
        page_size=page_size,
    )


def _token_slots(slices: jax.Array, valid: jax.Array, num_tokens: int, num_slots: int) -> jax.Array:
    """Destination slot of each token of new_kv: int32[T]; tokens no valid slice covers get
    unique slots >= ``num_slots`` so a ``mode="drop"`` scatter writes them nowhere.

    Vectorised without sorting: a difference array marks where each valid slice's token
    interval starts (+1, +offset) and ends (-1, -offset), and a cumulative sum gives every
    token its coverage count and ``kv_cache_start - new_kv_start`` offset. A token covered
    twice (overlapping sources, outside the contract) is dropped rather than written twice.
    """
    dst, src, length = slices[0], slices[1], slices[2]
    start = jnp.where(valid, src, num_tokens)
    end = jnp.where(valid, src + length, num_tokens)
    offset = jnp.where(valid, dst - src, 0)
    zeros = jnp.zeros(num_tokens + 1, jnp.int32)
    cover = jnp.cumsum(zeros.at[start].add(1).at[end].add(-1))[:num_tokens]
    shift = jnp.cumsum(zeros.at[start].add(offset).at[end].add(-offset))[:num_tokens]
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    return jnp.where(cover == 1, token + shift, num_slots + token)


def _local_update_xla(cache, layer, new_kv, slices, num, *, page_size, interpret, schedule):
    """One device: cache [L, slots, C, D], new_kv [T, C, D] -> cache, by an XLA scatter."""
    del interpret, schedule
    num_layers, num_slots = cache.shape[:2]
    num_tokens = new_kv.shape[0]
    valid = _valid_slices(
        slices,
        num,
        layer,
        num_layers=num_layers,
        num_tokens=num_tokens,
        num_slots=num_slots,
        page_size=page_size,
    )
    slots = _token_slots(slices, valid, num_tokens, num_slots)
    # A bad layer leaves every slot >= num_slots (nothing valid); index layer 0 rather than
    # let a negative layer wrap. Unique, in-bounds-or-dropped indices let XLA scatter in place.
    layer = jnp.where(_guards.layer_in_range(layer, num_layers), layer, 0)
    return cache.at[layer, slots].set(new_kv, mode="drop", unique_indices=True)


def _local_update_pallas(cache, layer, new_kv, slices, num, *, page_size, interpret, schedule):
    """One device: the kernel on the [L·slots, C, D] view of the stacked block.

    The reshape is a bitcast, so the kernel's input/output alias still covers the donated
    buffer; offsetting kv_cache_start by ``layer · slots`` selects the layer.
    """
    num_layers, num_slots, heads, dim = cache.shape
    flat = cache.reshape(num_layers * num_slots, heads, dim)
    valid = _valid_slices(
        slices,
        num,
        layer,
        num_layers=num_layers,
        num_tokens=new_kv.shape[0],
        num_slots=num_slots,
        page_size=page_size,
    )
    # The kernel bounds-checks against all L layers; a slice past this layer's slots (or of a
    # layer out of range) must be dropped here or it would land in another layer.
    slices = jnp.stack([slices[0] + layer * num_slots, slices[1], jnp.where(valid, slices[2], 0)])
    out = kv_cache_update(
        new_kv, slices, flat, num, page_size=page_size, interpret=interpret, schedule=schedule
    )
    return out.reshape(cache.shape)


_LOCAL_UPDATES = {"xla": _local_update_xla, "pallas": _local_update_pallas}


def _resolve_backend(cache: KVCache, backend: str) -> str:
    if backend != "auto":
        return backend
    platform = cache.mesh.devices.flat[0].platform
    return "pallas" if platform == "tpu" else "xla"


# --------------------------------------------------------------------------------------------
# Compiling the donated writes so that they stay in place in every dtype
# --------------------------------------------------------------------------------------------

# XLA's CPU compiler cannot compute in bfloat16 or float8, so its float-normalization passes
# rewrite every op of those types in float32. For a scatter into a donated bf16 cache that means
# convert(whole cache) -> f32 scatter -> convert back: two passes over the buffer and a temporary
# twice its size (about 300 ms per 256 MiB, against 0.2 ms in place). `update` and `copy_pages`
# only move, pad and convert data, which the CPU emitter does natively in every dtype, so their
# own executables skip those passes. The option is per executable: nothing else is affected.
# (Storing bf16 as uint16 also stays in place, but changes what `cache.kv` holds for every
# reader; bitcasting back inside the same jit materialises the copy again.)
_CPU_COMPILER_OPTIONS = {
    "xla_disable_hlo_passes": ",".join(
        f"float-normalization-{t}" for t in ("bf16", "f8e4m3fn", "f8e5m2")
    )
}


def _trace_state_clean() -> bool:
    """True outside any trace (jit, scan, shard_map...), where a top-level jit is compiled."""
    from jax._src import core  # no public spelling in JAX 0.10

    return bool(core.trace_state_clean())


def _platform(cache: KVCache) -> str:
    return str(cache.mesh.devices.flat[0].platform)


def compiler_options(platform: str) -> dict[str, str] | None:
    """XLA compiler options under which kvshard's donated writes stay in place on ``platform``.

    On CPU: skip float normalization (see the comment above); elsewhere None. Only for
    executables that do no bf16/fp8 arithmetic (the CPU dot emitter rejects bf16 without it).
    """
    return dict(_CPU_COMPILER_OPTIONS) if platform == "cpu" else None


class _PlatformJit:
    """``jax.jit(fun, **kwargs)`` compiled with :func:`compiler_options` of the cache's platform.

    Called like the jitted function (first argument a :class:`KVCache`); ``lower`` too, for
    memory analysis. Inside a caller's own jit the caller's compiler options apply instead.
    """

    def __init__(self, fun: Any, **kwargs: Any) -> None:
        self._fun, self._kwargs = fun, kwargs
        self._jitted: dict[str, Any] = {}
        functools.update_wrapper(self, fun)

    def jitted(self, platform: str) -> Any:
        if platform not in self._jitted:
            options = compiler_options(platform)
            self._jitted[platform] = jax.jit(self._fun, compiler_options=options, **self._kwargs)
        return self._jitted[platform]

    def __call__(self, cache: KVCache, *args: Any, **kwargs: Any) -> Any:
        # Compiler options only apply to a top-level jit (JAX rejects them on a nested one):
        # under a caller's trace the caller's compilation decides.
        platform = _platform(cache) if _trace_state_clean() else "traced"
        return self.jitted(platform)(cache, *args, **kwargs)

    def lower(self, cache: KVCache, *args: Any, **kwargs: Any) -> Any:
        return self.jitted(_platform(cache)).lower(cache, *args, **kwargs)

    def _cache_size(self) -> int:
        """Compiled entries over every platform's jit (as ``jax.jit``'s own, for tests)."""
        return sum(f._cache_size() for f in self._jitted.values())


# --------------------------------------------------------------------------------------------
# update
# --------------------------------------------------------------------------------------------


def _update_specs(cache: KVCache) -> tuple[P, ...]:
    """in_specs of (kv, layer, k, v, slices, num_slices), per-pool args with a group axis."""
    pa, kv_spec = cache.page_axis, _kv_in_spec(cache)
    return (cache.pspec, P(), kv_spec, kv_spec, P(pa, None, None), P(pa, None))


class SaturationCounts(NamedTuple):
    """How many written K and V elements a quantized cache could not store faithfully.

    Counts the elements of the tokens that live, valid slices write (padding tokens and
    dropped slices do not count) whose ``x / scale`` fell outside the dtype's finite range,
    so were stored as its limits, or was NaN, so was stored as 0 (see
    :func:`kvshard.quant.saturated`). Always 0 for float32/bfloat16/float16 caches, which
    store unscaled values with a plain cast. A pytree of two arrays, so it leaves ``jit`` and
    ``lax.scan`` like any result.

    Attributes:
      k: int32[] saturated elements of K, summed over every device's heads and page pools
        (each KV head counted once, however many replicas the cache holds).
      v: int32[] the same for V.
    """

    k: jax.Array
    v: jax.Array


def _count_saturated(cache, k, v, layer, slices, num, num_slots):
    """int32[2] (K, V) saturated elements of the tokens this step writes, over all devices.

    Inside shard_map: k, v [T, h, D] are this device's heads; the psum adds the other heads and
    page pools, and dividing by r undoes the r devices that each quantize a copy of one head.
    """
    spec = cache.spec
    if not spec.quantized:
        return jnp.zeros(2, jnp.int32)
    num_tokens = k.shape[0]
    valid = _valid_slices(
        slices,
        num,
        layer,
        num_layers=spec.num_layers,
        num_tokens=num_tokens,
        num_slots=num_slots,
        page_size=spec.page_size,
    )
    written = (_token_slots(slices, valid, num_tokens, num_slots) < num_slots)[:, None, None]
    counts = jnp.stack(
        [
            jnp.sum(quant.saturated(x, scale, spec.np_dtype) & written, dtype=jnp.int32)
            for x, scale in ((k, spec.k_scale), (v, spec.v_scale))
        ]
    )
    axes = tuple(a for a in (cache.head_axis, cache.page_axis) if a is not None)
    if axes:
        counts = jax.lax.psum(counts, axes)
    return counts // cache.replication


@functools.partial(
    _PlatformJit,
    static_argnames=("backend", "interpret", "schedule", "checks", "stats"),
    donate_argnums=(0,),
)
def _update_jit(
    cache,
    layer,
    k,
    v,
    slices,
    num_slices,
    *,
    backend,
    interpret,
    schedule="direct",
    checks=False,
    stats=False,
):
    if cache.page_axis is None:  # one pool: give every per-pool argument a group axis of size 1
        k, v, slices, num_slices = k[None], v[None], slices[None], num_slices[None]
    specs = _update_specs(cache)
    args = [
        _to_spec(cache.mesh, x, s)
        for x, s in zip((cache.kv, layer, k, v, slices, num_slices), specs, strict=True)
    ]
    if checks:
        # Every device checks the whole (all groups') metadata and raises alike: a device left
        # running would wait forever for the failed ones (Pallas interpret mode's barrier).
        whole = (P(), P(None, None, None), P(None, None))
        specs = (*specs, *whole)
        checked = (layer, slices, num_slices)
        args += [_to_spec(cache.mesh, x, s) for x, s in zip(checked, whole, strict=True)]
    local_update = functools.partial(
        _LOCAL_UPDATES[backend],
        page_size=cache.spec.page_size,
        interpret=interpret,
        schedule=schedule,
    )

    def body(kv, layer, k, v, slices, num, *whole):
        if whole:
            spec = cache.spec
            _guards.check_update(
                *whole,
                num_layers=spec.num_layers,
                num_tokens=k.shape[1],
                num_rows=spec.slots_per_pool,
                page_size=spec.page_size,
            )
        k, v = _local_heads(cache, k[0]), _local_heads(cache, v[0])
        out = local_update(kv, layer, _combine(cache.spec, k, v), slices[0], num[0])
        if not stats:
            return out
        return out, _count_saturated(cache, k, v, layer, slices[0], num[0], kv.shape[1])

    result = jax.shard_map(
        body,
        mesh=cache.mesh,
        in_specs=specs,
        out_specs=(cache.pspec, P()) if stats else cache.pspec,
        check_vma=False,  # pallas_call has no replication rule; the specs above are exact
    )(*args)
    if not stats:
        return _with_kv(cache, result)
    kv, counts = result
    return _with_kv(cache, kv), SaturationCounts(k=counts[0], v=counts[1])


def update(
    cache: KVCache,
    layer: int | jax.Array,
    k: jax.Array,
    v: jax.Array,
    slices: jax.Array | np.ndarray | StepMetadata,
    num_slices: jax.Array | np.ndarray | None = None,
    *,
    backend: Backend = "auto",
    interpret: bool | None = None,
    schedule: Schedule = "direct",
    checks: bool = False,
) -> KVCache:
    """Writes new K/V tokens of one layer into the cache, in place; returns the new cache.

    Slice ``i < num_slices`` copies tokens ``[new_kv_start, new_kv_start + slice_len)`` of
    ``k``/``v`` to slots ``[kv_cache_start, kv_cache_start + slice_len)`` of layer ``layer`` (on
    every head, in its pool): :func:`kvshard.reference.kv_cache_update` on the combined layout.
    Each device pads, interleaves and (when replicating) picks its own heads of k/v, then runs
    the backend on its own block; no device communicates with another except to receive its
    heads of k/v.

    Args:
      cache: DONATED when called eagerly: ``cache.kv`` is deleted afterwards; use the result.
      layer: int or int scalar array in [0, L); may be traced (lax.scan over layers).
      k: float[T, H, D] globally, as an attention layer produces it (unpadded, unreplicated;
        any sharding, usually replicated), or float[dp, T, H, D] with a page axis. Cast to the
        cache dtype; for a quantized cache, quantized with ``spec.k_scale`` (``v``: v_scale):
        divided by the scale, rounded, saturated to the dtype's finite range, NaN stored as 0
        (:func:`kvshard.quant.quantize`; :func:`update_with_stats` counts what saturates).
        Per device inside ``shard_map`` it arrives as float[T, H/tp, D] (heads
        split over the head axis) when r = 1, or whole as float[T, H, D] when r > 1, and each
        device then picks its own head ``i // r``; with a page axis each device sees only its
        group's [1, T, ...] slice. Padded to D_pad and interleaved with ``v``, each device
        writes a [T, 2·H·r/tp, D_pad] block into its local cache
        dtype[L, num_pages·page_size, 2·H·r/tp, D_pad].
      v: same shape, sharding and per-device handling as ``k``; its dtype must equal ``k``'s.
      slices: int32[3, S] rows (kv_cache_start, new_kv_start, slice_len), replicated to every
        device, or int32[dp, 3, S] with a page axis, where group g's kv_cache_start indexes its
        own pool of num_pages·page_size slots. Or the step's :class:`~kvshard.StepMetadata`
        (from :func:`kvshard.build_step`), whose ``slices`` and ``num_slices`` are used.
      num_slices: int32[1] live slices (later ones are padding), or int32[dp, 1]; omitted
        when ``slices`` is a StepMetadata. Concrete ``slices``/``num_slices`` may have any
        integer dtype (range-checked against int32, then cast); traced ones must be int32.
      backend: "pallas" (the kernel; interpret mode off TPU), "xla" (scatter), or "auto":
        pallas when the mesh is made of TPUs, xla otherwise. Both give identical results.
      interpret: passed to the kernel; None = interpret mode unless on TPU. False forces a
        TPU lowering (e.g. when exporting for TPU from a CPU host).
      schedule: the kernel's DMA schedule (pallas backend only): "direct" (HBM->HBM,
        pipelined) or "vmem" (the VMEM bounce vLLM runs on TPUs, the fallback); see
        :func:`kvshard.kernels.kv_cache_update`. Both write the same cache.
      checks: with traced arguments, report what would be dropped (a layer out of range,
        ``num_slices`` outside [0, S], a live slice the drop rule refuses, overlapping live
        slices) as an error instead of dropping silently: a host callback
        (``jax.debug.callback``) raises ValueError naming the slice, which surfaces as
        ``jax.errors.JaxRuntimeError`` carrying that message when the result is used.
        Costs O(S²) per call and a host round trip: a debugging mode. No effect on concrete
        arguments, which are always checked on the host. See docs/guides/refused-inputs.md.

    Preconditions on live slices (checked on the host when ``slices``/``num_slices`` are
    concrete): 0 <= num_slices <= S; 0 <= slice_len <= page_size; tokens in [0, T); slots in
    the pool; no two slices overlap in slots or in tokens. Traced: a layer outside [0, L)
    writes nothing, and a live slice that is empty, longer than a page, crosses a page or
    leaves the tokens or the pool writes nothing, identically on both backends (the kernel's
    drop rule). Overlapping traced slices are outside the contract (not defined).

    Raises:
      TypeError: wrong cache type or dtypes (slices/num_slices not integer arrays, or traced
        and not int32; k/v not floating or the cache dtype; k/v dtypes differ; layer not an
        integer scalar).
      ValueError: wrong shapes, a concrete layer or slice out of range, a concrete
        slices/num_slices value outside int32 (before the cast to int32), overlapping slices,
        unknown backend or schedule. Nothing is donated when an error is raised.
    """
    return _update_call(
        cache,
        layer,
        k,
        v,
        slices,
        num_slices,
        backend=backend,
        interpret=interpret,
        schedule=schedule,
        checks=checks,
        stats=False,
    )


def _update_call(
    cache, layer, k, v, slices, num_slices, *, backend, interpret, schedule, checks, stats
):
    """The host side of :func:`update` and :func:`update_with_stats`: check, place, call."""
    cache = _check_cache(cache)
    _check_backend(backend)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} must be one of {SCHEDULES}")
    if isinstance(slices, StepMetadata):
        if num_slices is not None:
            raise TypeError("num_slices must be omitted when slices is a StepMetadata")
        step: StepMetadata = slices
        slices, num_slices = step.slices, step.num_slices
    elif num_slices is None:
        raise TypeError("num_slices is required unless slices is a StepMetadata")
    layer_index = _check_layer(cache, layer)
    slices, num_slices = _check_update_args(cache, k, v, slices, num_slices)
    # In-jit checks only mean something for traced values (concrete ones passed the host
    # checks above); skipping them otherwise saves the host callback.
    checks = bool(checks) and any(map(_guards.is_traced, (layer, slices, num_slices)))
    mesh, (_, _, kv_spec, _, slices_spec, num_spec) = cache.mesh, _update_specs(cache)
    if cache.page_axis is None:  # the specs above carry the group axis that _update_jit adds
        kv_spec, slices_spec, num_spec = (P(*s[1:]) for s in (kv_spec, slices_spec, num_spec))
    return _update_jit(
        cache,
        _place(mesh, layer_index, P()),
        _place(mesh, k, kv_spec),
        _place(mesh, v, kv_spec),
        _place(mesh, slices, slices_spec),
        _place(mesh, num_slices, num_spec),
        backend=_resolve_backend(cache, backend),
        interpret=interpret,
        schedule=schedule,
        checks=checks,
        stats=stats,
    )


def update_with_stats(
    cache: KVCache,
    layer: int | jax.Array,
    k: jax.Array,
    v: jax.Array,
    slices: jax.Array | np.ndarray | StepMetadata,
    num_slices: jax.Array | np.ndarray | None = None,
    *,
    backend: Backend = "auto",
    interpret: bool | None = None,
    schedule: Schedule = "direct",
    checks: bool = False,
) -> tuple[KVCache, SaturationCounts]:
    """:func:`update`, also returning how many written values saturated the quantized dtype.

    The same write, bit for bit, as :func:`update` with the same arguments (``slices`` may be
    a :class:`~kvshard.StepMetadata`; see :func:`update` for shapes, sharding, donation and
    errors); the count costs one extra elementwise pass over
    this step's k/v and a psum of two int32 across the head and page axes. Works eagerly and
    under ``jit``/``lax.scan``: the counts are ordinary arrays, so a serving loop can
    accumulate them on device and read them when it logs.

    Returns:
      (cache, counts): the updated cache and a :class:`SaturationCounts` of int32[] arrays,
      replicated on every device. A non-zero count means the scale is too small for this
      data: :func:`kvshard.calibrate_scales` on a representative sample picks a larger one.
    """
    return _update_call(
        cache,
        layer,
        k,
        v,
        slices,
        num_slices,
        backend=backend,
        interpret=interpret,
        schedule=schedule,
        checks=checks,
        stats=True,
    )


# --------------------------------------------------------------------------------------------
# gather
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("checks",))
def _gather_jit(cache, layer, slots, *, checks=False):
    pa, ha, r = cache.page_axis, cache.head_axis, cache.replication
    if pa is None:
        slots = slots[None]
    specs = (cache.pspec, P(), P(pa, None))
    args = [
        _to_spec(cache.mesh, x, s) for x, s in zip((cache.kv, layer, slots), specs, strict=True)
    ]
    if checks:  # every device checks all slots (see _update_jit)
        specs = (*specs, P(None, None))
        args.append(_to_spec(cache.mesh, slots, P(None, None)))

    def body(kv, layer, slots, *whole):
        if whole:
            _guards.check_gather(
                layer,
                whole[0],
                num_layers=cache.spec.num_layers,
                num_slots=cache.spec.slots_per_pool,
            )
        slot = slots[0]
        # A traced layer out of range reads zeros, like a slot out of range (indexing would
        # wrap -1 to the last layer and clamp L to it).
        layer_ok = _guards.layer_in_range(layer, kv.shape[0])
        ok = (slot >= 0) & (slot < kv.shape[1]) & layer_ok
        rows = kv[jnp.where(layer_ok, layer, 0), jnp.where(ok, slot, 0)]
        rows = jnp.where(ok[:, None, None], rows, 0)
        k, v = _split(cache.spec, rows)
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
      layer: int or int scalar array in [0, L); may be traced.
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
      every slot of a traced out-of-range layer, read zeros.

    Raises:
      TypeError: ``slots`` not an integer array (or traced and not int32), ``layer`` not an
        integer scalar, ``dtype`` not a floating dtype.
      ValueError: wrong ``slots`` shape, concrete ``layer`` or ``slots`` out of range.
    """
    cache = _check_cache(cache)
    out_dtype = _read_dtype(cache.spec, dtype)
    layer_index = _check_layer(cache, layer)
    pooled = cache.page_axis is not None
    lead = (cache.dp,) if pooled else ()
    _check_array("slots", slots, (*lead, None), "[dp, N]" if pooled else "[N]")
    slots = _guards.as_int32("slots", slots)
    pool = cache.spec.slots_per_pool
    host = _concrete(slots)
    if host is not None and host.size and (host.min() < 0 or host.max() >= pool):
        bad = host[(host < 0) | (host >= pool)].flat[0]
        raise ValueError(f"slots contains {bad}, out of range [0, {pool})")
    checks = bool(checks) and any(map(_guards.is_traced, (layer, slots)))
    slots = _place(cache.mesh, slots, P(cache.page_axis) if pooled else P())
    k, v = _gather_jit(cache, _place(cache.mesh, layer_index, P()), slots, checks=checks)
    if not cache.spec.quantized and out_dtype == cache.spec.np_dtype:
        return k, v  # stored values are the real values
    return _to_real(cache.spec, k, v, out_dtype)


def _read_dtype(spec: CacheSpec, dtype: Any) -> np.dtype:
    """The dtype :func:`gather` returns: ``dtype``, or the default for the cache."""
    if dtype is None:
        return np.dtype(np.float32) if spec.quantized else spec.np_dtype
    try:
        out = np.dtype(jnp.dtype(dtype))
    except TypeError as err:
        raise TypeError(f"dtype={dtype!r} is not a dtype") from err
    if not jnp.issubdtype(out, jnp.floating):
        raise TypeError(f"dtype={out.name} must be a floating dtype (e.g. float32, bfloat16)")
    return out


@functools.partial(jax.jit, static_argnames=("spec", "dtype"))
def _to_real(spec: CacheSpec, k: jax.Array, v: jax.Array, dtype: np.dtype):
    """Stored k, v -> real values in ``dtype`` (elementwise: keeps the input sharding)."""
    return quant.dequantize(k, spec.k_scale, dtype), quant.dequantize(v, spec.v_scale, dtype)


# --------------------------------------------------------------------------------------------
# copy_pages
# --------------------------------------------------------------------------------------------


@functools.partial(_PlatformJit, donate_argnums=(0,), static_argnames=("checks",))
def _copy_pages_jit(cache, pairs, *, checks=False):
    spec, pa = cache.spec, cache.page_axis
    if pa is None:
        pairs = pairs[None]

    def body(kv, pairs, *whole):
        if whole:  # every device checks all pairs (see _update_jit)
            _guards.check_copy_pairs(whole[0][..., 0], whole[0][..., 1], spec.num_pages)
        src, dst = pairs[0, :, 0], pairs[0, :, 1]
        # Dropped rows (no-op padding, ids out of range, a destination written twice) write
        # nowhere: an id out of range would otherwise wrap (negative) or clamp onto a real page.
        keep = _guards.copy_pair_mask(src, dst, spec.num_pages)
        src, dst = jnp.where(keep, src, 0), jnp.where(keep, dst, spec.num_pages)
        pages = kv.reshape(kv.shape[0], spec.num_pages, spec.page_size, *kv.shape[2:])
        # Gather every source before scattering: all copies read the pre-call contents.
        pages = pages.at[:, dst].set(pages[:, src], mode="drop")
        return pages.reshape(kv.shape)

    specs = (cache.pspec, P(pa, None, None))
    args = [_to_spec(cache.mesh, x, s) for x, s in zip((cache.kv, pairs), specs, strict=True)]
    if checks:
        specs = (*specs, P(None, None, None))
        args.append(_to_spec(cache.mesh, pairs, P(None, None, None)))
    kv = jax.shard_map(
        body, mesh=cache.mesh, in_specs=specs, out_specs=cache.pspec, check_vma=False
    )(*args)
    return _with_kv(cache, kv)


def copy_pages(cache: KVCache, pairs: jax.Array | np.ndarray, *, checks: bool = False) -> KVCache:
    """Copies whole pages (every layer, every head) — the allocator's copy-on-write.

    Args:
      cache: DONATED when called eagerly.
      pairs: int[K, 2] rows (src_page, dst_page), or int[dp, K, 2] with a page axis (pages of
        the group's own pool). Page ids in [0, num_pages). All copies read the contents from
        before the call. Rows with src == dst are no-ops (usable as padding); the dst of the
        other rows must be distinct. Any integer dtype when concrete (cast to int32 after a
        range check); int32 when traced. Traced rows with a page id out of range, and every
        row of a destination written twice, are dropped (write nothing).
      checks: with traced ``pairs``, report the rows that would be dropped as a
        error instead (a host callback raises; see :func:`update`). No effect on concrete
        ``pairs``.

    Returns:
      The cache with the copies applied.

    Raises:
      TypeError: ``pairs`` not an integer array (or traced and not int32).
      ValueError: wrong shape; concrete page id out of range or outside int32, or duplicate
        destination.
    """
    cache = _check_cache(cache)
    pooled = cache.page_axis is not None
    lead = (cache.dp,) if pooled else ()
    _check_array("pairs", pairs, (*lead, None, 2), "[dp, K, 2]" if pooled else "[K, 2]")
    pairs = _guards.as_int32("pairs", pairs)
    host = _concrete(pairs)
    if host is not None:
        _check_pairs(host.reshape(-1, *host.shape[-2:]), cache.spec.num_pages)
    spec = P(cache.page_axis) if pooled else P()
    checks = bool(checks) and _guards.is_traced(pairs)
    return _copy_pages_jit(cache, _place(cache.mesh, pairs, spec), checks=checks)


def _check_pairs(groups: np.ndarray, num_pages: int) -> None:
    for g, pairs in enumerate(groups):
        bad = (pairs < 0) | (pairs >= num_pages)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise ValueError(
                f"pairs row {row} (group {g}) has {('src', 'dst')[col]} page {pairs[row, col]}, "
                f"out of range [0, {num_pages})"
            )
        moving = pairs[pairs[:, 0] != pairs[:, 1]]
        dst, counts = np.unique(moving[:, 1], return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"pairs (group {g}) copy to dst page {dst[counts > 1][0]} twice")
