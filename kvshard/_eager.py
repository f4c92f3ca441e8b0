"""The public entries of the device operations an eager serving loop calls once per layer
(:func:`update`, :func:`update_with_stats`, :func:`attention`), and the memo they consult.

An entry turns a deprecated call form into the current one (:mod:`kvshard._deprecated`),
looks the call up in :data:`EAGER_CALLS` and, on a miss, calls the operation: its host checks
and placement, then its one jitted call (:func:`kvshard.cache._update.check_write` and
:func:`~kvshard.cache._update.write`; :func:`kvshard._attention.api.check_read` and
:func:`~kvshard._attention.api.read`). What a call's checks read falls in two kinds:

- its **signature**: the cache's layout, every array's type, shape, dtype and sharding, the
  step's geometry, the static arguments (backend, options);
- the **content** of its small integer metadata (slices, page tables), read as
  :func:`kvshard._device.memo.content_key` reads it (dtype, shape and bytes, never identity).

The key of a call holds both, and not the layer (an eager decode loop makes one call per
layer with the same step). Once every check of a call has passed, the entry stores under its
key what the checks derived: the metadata's device copies (immutable, never donated; equal
content means equal copies) and the jitted call's static arguments. A later call with an equal
key checks only what the key does not hold (that the cache was not donated, the layer's range
and, for attention, the layer's type, through the operation's own functions) and makes the
same jitted call with the same arguments: it compiles nothing new and writes or reads exactly
what the checked path would. A call that raises stores nothing, and a call the key cannot
describe (a traced argument, a Python list, an option of another type, sinks) has no key and
is always checked.

:func:`update` also keeps the last call that passed (:class:`_LastUpdate`): a call with the
same step object, cache layout and static arguments is answered from it by comparing those by
identity and reading again only what can change inside them (the step's NumPy bytes, k/v's
signatures), without building the whole key.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import jax
import numpy as np

from kvshard import _deprecated
from kvshard._attention import api as attention_op
from kvshard._device.arg_checks import check_layer
from kvshard._device.memo import (
    MAX_KEY_BYTES,
    ContentMemo,
    array_signature,
    call_key,
    is_concrete,
    placed_index,
    placed_metadata,
    shape_of,
    stored_metadata,
)
from kvshard._device.options import Backend, BackendOptions, Schedule
from kvshard._device.sharding import place_all
from kvshard._geometry.layer_types import LayerType
from kvshard.cache import _update as update_op
from kvshard.cache._pytree import KVCache, check_cache
from kvshard.cache._update_local import SaturationCounts
from kvshard.step import StepMetadata

__all__ = ["EAGER_CALLS", "attention", "update", "update_with_stats"]

# Keys of calls that passed, with what their checks derived. A decode loop needs one entry per
# step and operation (the layer is not in the key), so a larger memo would only hold older
# steps; a key holds at most a few arrays of MAX_KEY_BYTES (kvshard._device.memo).
EAGER_CALLS = ContentMemo(maxsize=64)


def _plain_statics(backend: Any, options: Any, checks: Any) -> bool:
    """Whether the static arguments every operation takes are of the types its checks accept
    and a key can hold: a str backend, None or a BackendOptions, a bool ``checks`` (anything
    else, even if accepted, is always checked)."""
    return (
        type(backend) is str
        and type(checks) is bool
        and (options is None or type(options) is BackendOptions)
    )


def _layout(cache: KVCache) -> tuple[Any, ...]:
    return (cache.spec, cache.mesh, cache.head_axis, cache.page_axis)


# --------------------------------------------------------------------------------------------
# The keys, side by side: what each operation's checks read, but the cache's liveness and the
# layer's value. None: the call is always checked.
# --------------------------------------------------------------------------------------------


def _update_key(cache, layer, k, v, step, num_slices, given: update_op.WriteOptions):
    """(key, metadata as given) of an update call."""
    if (
        type(cache) is not KVCache
        or type(layer) is not int
        or not is_concrete(cache.kv)  # a traced cache: inside the caller's trace
        or not _plain_statics(given.backend, given.options, given.checks)
    ):
        return None
    if type(step) is StepMetadata:
        if num_slices is not None:
            return None
        metadata = (step.slices, step.num_slices)
        geometry = (
            step.geometry,
            shape_of(step.positions),
            shape_of(step.kv_lens),
            shape_of(step.page_indices),
        )
    else:
        metadata, geometry = (step, num_slices), None
    key = call_key(("update", _layout(cache), geometry, *given), (k, v), metadata)
    return None if key is None else (key, metadata)


def _attention_key(cache, layer, q, step, given: attention_op.ReadOptions):
    """(key, the step's fields as given) of an attention call."""
    if (
        type(cache) is not KVCache
        or type(layer) is not int
        or type(step) is not StepMetadata
        or not is_concrete(cache.kv)  # a traced cache: inside the caller's trace
        or given.sinks is not None
        or type(given.sm_scale) is not float
        or not (given.soft_cap is None or type(given.soft_cap) is float)
        or not (given.q_scale is None or type(given.q_scale) is float)
        or not (given.sliding_window is None or type(given.sliding_window) is int)
        or not (given.layer_type is None or _plain_tuple(given.layer_type))
        or not _plain_statics(given.backend, given.options, given.checks)
    ):
        return None
    fields = tuple(getattr(step, name) for name in attention_op.FIELDS)
    geometry = (step.geometry, shape_of(step.positions))
    key = call_key(("attention", _layout(cache), geometry, *given), (q,), fields)
    return None if key is None else (key, fields)


def _plain_tuple(value: Any) -> bool:
    return type(value) is tuple and all(type(x) in (str, int) for x in value)


# --------------------------------------------------------------------------------------------
# update
# --------------------------------------------------------------------------------------------


class _KnownWrite(NamedTuple):
    """What an update call's checks derived, stored under its key."""

    metadata: tuple[Any, ...]  # placed_metadata of (slices, num_slices)
    kv_spec: Any  # where k/v must be placed first (None: passed as given)
    static: dict[str, Any]  # write's static keywords


def _known_write(known: _KnownWrite, cache, layer, k, v, metadata, layers=None) -> Any:
    """The write of a call equal to one that passed: the cache's liveness and the layer's
    range checked (``check_cache``, ``check_layer``), k/v placed if the first call's were.
    ``layers``: layer -> placed index, filled as met."""
    cache = check_cache(cache)  # a donated buffer is refused before dispatch
    if not 0 <= layer < cache.spec.num_layers:
        check_layer(cache.spec.num_layers, layer)  # raises, with the checked path's message
    placed_layer = None if layers is None else layers.get(layer)
    if placed_layer is None:
        placed_layer = placed_index(cache.mesh, layer)
        if layers is not None:
            layers[layer] = placed_layer
    if known.kv_spec is not None:  # k/v not already on the mesh as shard_map takes them
        k, v = place_all(cache.mesh, [(k, known.kv_spec), (v, known.kv_spec)])
    slices, num_slices = metadata
    call = update_op.WriteCall(
        cache, placed_layer, k, v, slices, num_slices, known.static, known.kv_spec
    )
    return update_op.write(call)


class _LastUpdate(NamedTuple):
    """The last update call that passed. An eager decode loop calls update once per layer with
    the same step, the same cache layout and new k/v of one signature; comparing the frozen
    objects by identity (spec, mesh, the step, whose fields cannot be rebound, the static
    arguments) and reading again only what can change under them answers such a call without
    building its key, whose few hundred Python objects miss the CPU's caches right after a
    long device call."""

    layout: tuple[Any, ...]  # (spec, mesh, head_axis, page_axis), compared by identity
    step: tuple[Any, ...]  # (the StepMetadata,) or (slices, num_slices): the same objects
    given: update_op.WriteOptions  # compared by identity
    reads: tuple[Any, ...]  # _step_reads then: what may change inside the same objects
    signatures: tuple[Any, ...]  # array_signature of k and v
    metadata: list[Any]  # slices and num_slices as the jitted call takes them
    known: _KnownWrite
    layers: dict[int, Any]  # layer -> its placed int32 index (placed_index), filled as met
    generation: int  # EAGER_CALLS.generation then: clearing the memo forgets this call too


_LAST: list[_LastUpdate | None] = [None]


def _given_step(step, num_slices) -> tuple[tuple[Any, ...], tuple[Any, Any]] | None:
    """(the objects compared by identity, the metadata arrays as given) of a call's step:
    a StepMetadata (frozen: its fields cannot be rebound) or the vLLM form's two arrays."""
    if type(step) is StepMetadata:
        return None if num_slices is not None else ((step,), (step.slices, step.num_slices))
    return None if num_slices is None else ((step, num_slices), (step, num_slices))


def _step_reads(step, given) -> tuple[Any, ...] | None:
    """What the key reads of the step that an in-place change could alter: the dtype, shape
    and bytes of slices and num_slices (NumPy only: None otherwise, and the call is left to
    the key), and a StepMetadata's positions/kv_lens/page_indices shapes."""
    s, n = given
    if type(s) is not np.ndarray or type(n) is not np.ndarray or s.nbytes > MAX_KEY_BYTES:
        return None
    # The dtype objects, not their .str (a string built per read): a builtin dtype is one
    # object, compared by identity first.
    reads = (s.dtype, s.shape, s.tobytes(), n.dtype, n.shape, n.tobytes())
    if type(step) is StepMetadata:
        shapes = (shape_of(step.positions), shape_of(step.kv_lens), shape_of(step.page_indices))
        return reads + shapes
    return reads


def _remember(cache, k, v, step, num_slices, given, known: _KnownWrite) -> None:
    """Files a call that passed (by the key or the checks) as the last one."""
    ident_given = _given_step(step, num_slices)
    if ident_given is None:
        return
    ident, metadata = ident_given
    reads = _step_reads(step, metadata)
    signatures = (array_signature(k), array_signature(v))
    if reads is None or None in signatures:
        return
    last = _LAST[0]
    layers = last.layers if last is not None and last.layout[1] is cache.mesh else {}
    _LAST[0] = _LastUpdate(
        _layout(cache),
        ident,
        given,
        reads,
        signatures,
        stored_metadata(known.metadata, metadata),
        known,
        layers,
        EAGER_CALLS.generation,
    )


def _same_step_write(cache, layer, k, v, step, num_slices, given) -> Any:
    """The result of a call the last one answers (:class:`_LastUpdate`), else None."""
    last = _LAST[0]
    if (
        last is None
        or step is not last.step[0]
        or (num_slices is not None and (len(last.step) == 1 or num_slices is not last.step[1]))
        or (num_slices is None and len(last.step) == 2)
        or last.generation != EAGER_CALLS.generation
        or type(cache) is not KVCache
        or type(layer) is not int
        or cache.spec is not last.layout[0]
        or cache.mesh is not last.layout[1]
        or cache.head_axis != last.layout[2]
        or cache.page_axis != last.layout[3]
        or given.backend is not last.given.backend
        or given.options is not last.given.options
        or given.checks is not last.given.checks
        or given.stats is not last.given.stats
        or not is_concrete(cache.kv)
    ):
        return None
    ident_given = _given_step(step, num_slices)
    if (
        ident_given is None
        or _step_reads(step, ident_given[1]) != last.reads
        or (array_signature(k), array_signature(v)) != last.signatures
    ):
        return None
    return _known_write(last.known, cache, layer, k, v, last.metadata, last.layers)


def _update(cache, layer, k, v, step, num_slices, slices, given: update_op.WriteOptions) -> Any:
    """:func:`update` and :func:`update_with_stats`: the last call, the memo, else the
    operation's checks and write."""
    k, v = update_op.latent_kv(cache, k, v)
    if slices is not None:  # the keyword spelling of vLLM's form
        if step is not None:
            raise TypeError("pass step or slices=, not both")
        step = slices
    if step is None:
        raise TypeError("update needs the step: a StepMetadata, or slices and num_slices")
    result = _same_step_write(cache, layer, k, v, step, num_slices, given)
    if result is not None:
        return result
    eager = _update_key(cache, layer, k, v, step, num_slices, given)
    known = None if eager is None else EAGER_CALLS.get(eager[0])
    if known is not None:
        _remember(cache, k, v, step, num_slices, given, known)
        return _known_write(known, cache, layer, k, v, stored_metadata(known.metadata, eager[1]))
    call = update_op.check_write(cache, layer, k, v, step, num_slices, given)
    result = update_op.write(call)
    if eager is not None:  # every check passed: the next equal call is a lookup
        moved = call.k is not k or call.v is not v  # a function of the key's shardings
        known = _KnownWrite(
            placed_metadata(eager[1], (call.slices, call.num_slices)),
            call.kv_spec if moved else None,
            call.static,
        )
        EAGER_CALLS.put(eager[0], known)
        _remember(cache, k, v, step, num_slices, given, known)
    return result


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
    rule, :mod:`kvshard._device.drop`). Overlapping traced slices are outside the contract.

    Raises:
      TypeError: wrong cache or step type or dtypes (slices/num_slices not integer arrays, or
        traced and not int32; k/v not floating or the cache dtype; k/v dtypes differ; layer not
        an integer scalar); num_slices given with a StepMetadata or missing without one.
      ValueError: wrong shapes (k/v tokens other than the step's), a step built for another
        geometry, a donated cache, a concrete layer or slice out of range, a concrete
        slices/num_slices value outside int32, overlapping slices, unknown backend. Nothing
        is donated when an error is raised.
    """
    options = _deprecated.update_options(options, interpret, schedule, stacklevel=2)
    given = update_op.WriteOptions(backend, options, checks, False)
    return _update(cache, layer, k, v, step, num_slices, slices, given)


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
    a = bound.arguments
    options = _deprecated.update_options(a["options"], a["interpret"], a["schedule"], stacklevel=2)
    given = update_op.WriteOptions(a["backend"], options, a["checks"], True)
    step, num_slices, slices = a["step"], a["num_slices"], a["slices"]
    return _update(a["cache"], a["layer"], a["k"], a["v"], step, num_slices, slices, given)


# Documentation tools and IDEs show update's own parameters.
update_with_stats.__signature__ = inspect.signature(update).replace(  # type: ignore[attr-defined]
    return_annotation="tuple[KVCache, SaturationCounts]"
)


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------


class _KnownRead(NamedTuple):
    """What an attention call's checks derived, stored under its key."""

    fields: tuple[Any, ...]  # placed_metadata of the step's fields
    q_spec: Any  # where q must be placed first (None: passed as given)
    layer_read: attention_op.LayerRead


def _known_read(known: _KnownRead, cache, layer, q, fields) -> jax.Array:
    """The read of a call equal to one that passed: the cache's liveness, the layer's range
    and its type checked (``check_cache``, ``check_layer_read``), q placed if the first
    call's was."""
    cache = check_cache(cache)
    _, read_type, statics = attention_op.check_layer_read(cache.spec, layer, known.layer_read)
    if known.q_spec is not None:  # q not already on the mesh as shard_map takes it
        (q,) = place_all(cache.mesh, [(q, known.q_spec)])
    layer_index = placed_index(cache.mesh, layer)
    call = attention_op.ReadCall(
        cache,
        layer_index,
        q,
        tuple(fields),
        None,
        statics,
        read_type,
        False,
        known.layer_read,
        known.q_spec,
    )
    return attention_op.read(call)


def attention(
    cache: KVCache,
    layer: int | jax.Array,
    q: jax.Array,
    step: StepMetadata | None = None,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    layer_type: LayerType | None = None,
    soft_cap: float | None = None,
    sinks: jax.Array | None = None,
    backend: Backend = "auto",
    options: BackendOptions | None = None,
    checks: bool = False,
    metadata: StepMetadata | None = None,
    q_scale: float | None = None,
) -> jax.Array:
    """Ragged paged attention of one layer, per device on the heads it owns, in place.

    Called like every device operation, cache and layer first: ``attention(cache, layer, q,
    step, sm_scale=...)``. The earlier form ``attention(q, cache, layer, metadata, ...)`` still
    works and warns (DeprecationWarning).

    Args:
      cache: not donated; read in place. A donated cache is refused (ValueError).
      layer: int or int scalar array in [0, L); may be traced (``lax.scan`` over layers).
        With layer groups it reads cache layer ``spec.groups.layer_slot[layer]`` through the
        page table ``step.page_indices[(pool,) spec.groups.layer_group[layer]]``.
      q: float[T, Hq, D] queries of the step's tokens (packed as ``step`` says; ``T`` its
        ``num_tokens_padded``), or float[dp, T, Hq, D] with a page axis (group g's queries
        attend its own pool). ``Hq`` a multiple of ``num_kv_heads`` and of the head-axis size
        ``tp``; query head ``i`` attends KV head ``i // (Hq / num_kv_heads)``. Sharded (or
        resharded) ``P(page_axis, None, head_axis, None)``: per device float[T, Hq/tp, D].
        A ``kv_layout="latent"`` (MLA) cache takes the absorbed form: ``D = kv_lora_rank +
        qk_rope_head_dim`` (the spec's ``head_dim``), ``q = concat([q_nope @ W_UK, q_pe],
        -1)`` per head, scored against the latent row ``[c_kv | k_pe]`` that every query head
        shares (docs/layout.md, "Latent caches").
      step: the step's :class:`~kvshard.StepMetadata` (``[dp, ...]`` fields with a page axis);
        its geometry must be the cache's. Fields may be traced (int32).
      sm_scale: softmax scale, a float (usually ``head_dim ** -0.5``), finite and > 0.
      sliding_window: W >= 1: token at position p attends positions (p - W, p]; None: all,
        or, when the spec has ``layer_types``, the layer's own type. With ``layer_types`` a
        window other than a concrete layer's own is refused (its group's page table holds
        only the pages its own type can see), and a traced layer over layers of several types
        needs the type stated: here (``("sliding", W)``) or with ``layer_type``; inside
        ``jit`` a layer of another type then reads nothing (``checks=True`` reports it).
      layer_type: the attention type read, as in ``CacheSpec.layer_types``: ``("full",)``,
        ``("sliding", W)`` (the same as ``sliding_window=W``) or ``("chunked", C)`` (Llama 4's
        chunked local attention: a query at p attends positions ``C·(p // C)`` .. p; not with
        JAX's pallas kernel). None: the layer's own type (full without ``layer_types``). The same
        rules as ``sliding_window``.
      soft_cap: logit soft cap, a finite float > 0, or None.
      sinks: attention sinks (gpt-oss), float[Hq]: a logit per query head added to that head's
        softmax denominator, ``out = Σ_j e^(s_j - m) v_j / (e^(sink - m) + Σ_j e^(s_j - m))``;
        -inf is no sink. Traced or not (not a static argument), computed in float32, sharded
        ``P(head_axis)`` like q's heads (with a page axis every pool uses the same sinks).
        None: no sinks. Refused by JAX's pallas kernel (``pallas_kernel="jax"``).
      backend: "pallas" (kvshard's ragged paged attention kernel,
        :mod:`kvshard.kernels.attention`: either ``kv_layout``, every layer type, sinks;
        Mosaic on TPU, Pallas interpret mode elsewhere; or JAX's kernel with
        ``BackendOptions(pallas_kernel="jax")``: TPU only, interleaved caches only), "xla"
        (jnp, either ``kv_layout``), or "auto": pallas when the mesh is made of TPUs (with
        JAX's kernel: only for an interleaved cache), xla otherwise (and for a latent cache).
      options: :class:`~kvshard.BackendOptions` (xla reads ``keys_per_step`` and
        ``queries_per_block``; pallas ``interpret``, ``kv_pages_per_block``,
        ``queries_per_block``, ``pallas_kernel``, ``attention_kernel``).
      checks: with traced metadata or layer, report what the drop rule drops (a layer out of
        range, ``num_seqs`` out of range, the first request out of contract) as an error
        raised by a host callback, as :func:`kvshard.update` does. No effect when concrete.
      metadata: deprecated keyword spelling of ``step``.
      q_scale: per-tensor q scale of a quantized cache (int8 or float8), the ``q_scale`` of
        tpu-inference's ragged paged attention v3: q holds real values and is quantized to
        the cache's storage dtype as K/V are, ``stored_q = quantize(q, q_scale, dtype)``
        (q / q_scale, saturated to the dtype's finite range; :func:`kvshard.quant.quantize`),
        and the scores are ``sm_scale · q_scale · k_scale · (stored_q · stored_k)``, i.e. those
        of the dequantized ``stored_q · q_scale``. A Python float within the
        scale bounds of the cache's dtype (the rule of ``CacheSpec.k_scale``/``v_scale``);
        refused on an unquantized cache and with JAX's pallas kernel. None: q is used as is.

    Returns:
      q.dtype[T, Hq, D] (or [dp, T, Hq, D]) sharded like ``q``: per device [T, Hq/tp, D].
      A latent cache returns q.dtype[T, Hq, kv_lora_rank]: the output in latent space,
      ``Σ w·c_kv`` (the caller applies W_UV per head).
      Padding tokens (past ``cu_q_lens[num_seqs]``) are zero. No collective runs: the caller's
      output projection does the usual reduction over the head axis.

    Raises:
      TypeError: wrong cache or step type, q or sinks not floating, step fields not integer
        (int32 when traced), layer not an integer scalar, sm_scale or soft_cap not a float.
      NotImplementedError: with JAX's pallas kernel (``pallas_kernel="jax"`` or an
        ``attention_kernel``): sinks, q_scale or a chunked read (JAX's kernel has neither), or a
        ``kv_layout="packed"`` cache (it reads interleaved rows only); ``backend="pallas"``
        on a ``kv_layout="latent"`` cache (no kernel reads it; "auto" picks xla).
      ValueError: wrong shapes (q's tokens other than the step's), a step built for another
        geometry, head counts that do not divide, a donated cache, concrete layer or metadata
        out of range (a request's queries past T, kv_len beyond its page-table row or below
        its query count, a page id outside the pool), a bad window, scale or soft cap, sinks
        not of shape [Hq] or holding NaN or +inf; with ``layer_types``: a window or
        ``layer_type`` other than a concrete layer's own, none for a traced layer over
        layers of several types (see ``sliding_window``), or a ``layer_type`` no layer has;
        q_scale on an unquantized cache, or not a positive finite float within its bounds.
    """
    cache, layer, q, step = _deprecated.attention_arguments(cache, layer, q, step, metadata)
    given = attention_op.ReadOptions(
        sm_scale, sliding_window, layer_type, soft_cap, sinks, backend, options, checks, q_scale
    )
    eager = _attention_key(cache, layer, q, step, given)
    known = None if eager is None else EAGER_CALLS.get(eager[0])
    if known is not None:
        return _known_read(known, cache, layer, q, stored_metadata(known.fields, eager[1]))
    call = attention_op.check_read(cache, layer, q, step, given)
    if eager is not None:  # every check passed: the next equal call is a lookup
        fields = placed_metadata(eager[1], call.fields)
        q_spec = None if call.q is q else call.q_spec
        EAGER_CALLS.put(eager[0], _KnownRead(fields, q_spec, call.layer_read))
    return attention_op.read(call)
