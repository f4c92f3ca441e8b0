"""The attention operation: ragged paged attention of one layer, read where the cache lives.

:func:`check_read` checks a call's arguments on the host and places them on the mesh;
:func:`read` makes the one jitted, sharded call (``_read``). The public entry
:func:`kvshard.attention` (:mod:`kvshard._eager`) calls the two in turn, or skips the checks
for a call equal to one that passed them.

``_read`` runs inside ``jax.shard_map``. Each device attends the query heads whose KV
heads it holds, reading K/V pages of its own block of the stacked cache through the page table,
and returns its query heads' output: nothing is gathered across devices, nothing is copied out
of the cache (see docs/attention.md for pictures). Backends: :mod:`kvshard._attention.pallas`
(kvshard's kernel, or JAX's; TPU) and :mod:`kvshard._attention.xla` (jnp, elsewhere).

Both follow ``ref_ragged_paged_attention``'s semantics: request ``i``'s queries are its last
``q_len`` tokens; token at position ``p`` attends positions ``k <= p`` (and ``k > p - W`` with
a sliding window ``W``); scores ``sm_scale·q·k``, then ``soft_cap·tanh(s / soft_cap)``;
optional attention sinks (not with JAX's kernel) add ``exp(sink)`` per query head to the
denominator.
Out-of-contract metadata inside ``jit`` is dropped identically on both backends
(:func:`kvshard._device.drop.live_requests`): the first request out of contract and every request
after it produce zeros, as does every token of a step whose traced ``layer`` is out of range;
``checks=True`` reports it.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from kvshard._attention.layer_type import ReadType, read_type
from kvshard._attention.pallas import local_pallas
from kvshard._attention.params import Statics
from kvshard._attention.xla import local_xla
from kvshard._device import arg_checks as host
from kvshard._device import reports as _reports
from kvshard._device.backend import resolve_attention_backend
from kvshard._device.drop import route_layer
from kvshard._device.options import BackendOptions
from kvshard._device.sharding import place_all, to_spec
from kvshard._geometry.int32 import INT32_MAX
from kvshard._geometry.layout import QUANTIZED_DTYPES, check_query_heads, check_scale, needs_scales
from kvshard.cache._pytree import KVCache, check_cache
from kvshard.step import StepMetadata, check_step

__all__ = [
    "LayerRead",
    "ReadCall",
    "ReadOptions",
    "check_layer_read",
    "check_read",
    "read",
    "report_read",
]

# Field order of the attention metadata handed to the per-device body.
FIELDS = ("page_indices", "kv_lens", "cu_q_lens", "num_seqs")
_LOCAL = {"xla": local_xla, "pallas": local_pallas}


def _q_spec(cache: KVCache) -> P:
    """q / out [G, T, Hq, D]: query heads split over the head axis like the KV heads."""
    return P(cache.page_axis, None, cache.head_axis, None)


@functools.partial(jax.jit, static_argnames=("backend", "statics", "checks", "read"))
def _read(cache, layer, q, fields, sinks, *, backend, statics, checks, read: ReadType):
    spec, pa = cache.spec, cache.page_axis
    # The devices read cache layer `cache_layer` (-1: nothing) through the layer's group's
    # page table: [(dp,) G, max_num_seqs, P] -> [(dp,) max_num_seqs, P]. The reports below
    # judge the model layer.
    groups = spec.groups
    group, cache_layer = route_layer(layer, groups.layer_group, groups.layer_slot, read.readable)
    if spec.num_groups > 1:
        tables = fields[0]
        fields = [
            jax.lax.dynamic_index_in_dim(tables, group, tables.ndim - 3, keepdims=False),
            *fields[1:],
        ]
    if pa is None:  # one pool: give every per-pool argument a group axis of size 1
        q, fields = q[None], [x[None] for x in fields]
    q_spec = _q_spec(cache)
    field_specs = [P(pa, *([None] * (np.ndim(x) - 1))) for x in fields]
    # Sinks: per query head, split over the head axis like q's heads; every pool the same.
    sink_specs = [] if sinks is None else [P(cache.head_axis)]
    specs = [cache.pspec, P(), q_spec, *sink_specs, *field_specs]
    inputs = (cache.kv, cache_layer, q, *([] if sinks is None else [sinks]), *fields)
    args = [to_spec(cache.mesh, x, s) for x, s in zip(inputs, specs, strict=True)]
    if checks:  # every device checks every group's metadata and raises alike (see _reports)
        whole = [P(), *(P(*([None] * np.ndim(x))) for x in fields)]
        specs += whole
        checked = (layer, *fields)
        args += [to_spec(cache.mesh, x, s) for x, s in zip(checked, whole, strict=True)]
    local = functools.partial(_LOCAL[backend], statics=statics)

    def body(kv, layer, q, *rest):  # layer: the cache layer (-1: none)
        sink = () if sinks is None else rest[:1]
        fields = rest[len(sink) :]
        fields, whole = fields[: len(FIELDS)], fields[len(FIELDS) :]
        if whole:
            report_read(spec, read, whole, num_tokens=q.shape[1])
        return local(kv, layer, q[0], *(x[0] for x in fields), *sink)[None]

    out = jax.shard_map(
        body, mesh=cache.mesh, in_specs=tuple(specs), out_specs=q_spec, check_vma=False
    )(*args)
    return out if pa is not None else out[0]


def _check_fields(cache: KVCache, step: StepMetadata, num_tokens: int) -> list[Any]:
    """The attention fields of ``step``: shapes and dtypes always, values when concrete.

    Returns them as int32, in :data:`FIELDS` order.
    """
    pooled = cache.page_axis is not None
    lead: tuple[int, ...] = (cache.dp,) if pooled else ()
    what = "[dp, " if pooled else "["
    num_groups = cache.spec.num_groups
    grouped = (num_groups,) if num_groups > 1 else ()  # a page table per layer group
    host.check_shape(
        "step.page_indices",
        step.page_indices,
        (*lead, *grouped, None, None),
        what + ("num_groups, " if grouped else "") + "max_num_seqs, pages_per_seq]",
    )
    max_seqs = np.shape(step.page_indices)[-2]
    for name, expected, text in (
        ("kv_lens", (*lead, max_seqs), "max_num_seqs]"),
        ("cu_q_lens", (*lead, max_seqs + 1), "max_num_seqs + 1]"),
        ("num_seqs", (*lead, 1), "1]"),
    ):
        host.check_shape(f"step.{name}", getattr(step, name), expected, what + text)
    fields = [host.as_int32(f"step.{name}", getattr(step, name)) for name in FIELDS]
    hosts = [host.concrete(x) for x in fields]
    if all(h is not None for h in hosts):
        spec = cache.spec
        groups = zip(*hosts, strict=True) if pooled else [hosts]
        for g, (tables, *group) in enumerate(groups):
            for i, table in enumerate(tables if grouped else [tables]):
                _check_values(
                    table,
                    *group,
                    num_tokens=num_tokens,
                    num_pages=spec.num_pages,
                    page_size=spec.page_size,
                    where=(f" (group {g})" if pooled else "")
                    + (f" (layer group {i})" if grouped else ""),
                )
    return fields


def _check_values(
    page_indices, kv_lens, cu_q_lens, num_seqs, *, num_tokens, num_pages, page_size, where
):
    """The contract of :func:`kvshard._device.drop.request_in_contract`, vectorized, raised on the
    host with the field and the bound."""
    max_seqs, pages_per_seq = page_indices.shape
    n = int(num_seqs[0])
    if not 0 <= n <= max_seqs:
        raise ValueError(f"step.num_seqs={n}{where} is out of range [0, {max_seqs}]")
    if pages_per_seq * page_size > INT32_MAX:
        raise ValueError(
            f"step.page_indices has {pages_per_seq} pages per request × page_size {page_size}"
            f" = {pages_per_seq * page_size} tokens, past int32 ({INT32_MAX})"
        )
    start, end = cu_q_lens[:n].astype(np.int64), cu_q_lens[1 : n + 1].astype(np.int64)
    lens = kv_lens[:n].astype(np.int64)
    bad = (start < 0) | (end < start) | (end > num_tokens)
    if bad.any():
        s = int(np.argmax(bad))
        raise ValueError(
            f"step.cu_q_lens[{s}:{s + 2}]=[{start[s]}, {end[s]}]{where} must be "
            f"non-decreasing within [0, {num_tokens}] (the query tokens)"
        )
    bad = (lens < end - start) | (lens > pages_per_seq * page_size)
    if bad.any():
        s = int(np.argmax(bad))
        raise ValueError(
            f"step.kv_lens[{s}]={lens[s]}{where} must lie in [{end[s] - start[s]}, "
            f"{pages_per_seq * page_size}] (its query count, pages_per_seq × page_size)"
        )
    used = np.arange(pages_per_seq)[None, :] * page_size < lens[:, None]
    ids = page_indices[:n]
    bad = used & ((ids < 0) | (ids >= num_pages))
    if bad.any():
        s, j = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"step.page_indices[{s}, {j}]={int(ids[s, j])}{where} is out of range [0, {num_pages})"
        )


def _finite_positive(name: str, value: Any, *, optional: bool) -> float | None:
    """A static float parameter: a Python or NumPy float, finite and > 0 in float32."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, float | np.floating):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    bound = float(np.finfo(np.float32).max)
    if not (np.isfinite(value) and 0 < value <= bound):
        raise ValueError(f"{name}={value!r} must be a finite float in (0, {bound:.4g}] (float32)")
    return float(value)


def _check_window(sliding_window: Any) -> int | None:
    if sliding_window is None:
        return None
    if (
        isinstance(sliding_window, bool)
        or not isinstance(sliding_window, int | np.integer)
        or not 1 <= sliding_window <= INT32_MAX
    ):
        raise ValueError(
            f"sliding_window={sliding_window!r} must be None or an int in [1, {INT32_MAX}]"
        )
    return int(sliding_window)


def _check_sinks(sinks: Any, num_q_heads: int, backend: str, jax_kernel: bool) -> Any:
    """``sinks`` as float32[Hq] (or None); refused on the pallas backend with JAX's kernel."""
    if sinks is None:
        return None
    if backend == "pallas" and jax_kernel:
        raise NotImplementedError(
            "sinks= is not supported with backend='pallas' and JAX's kernel: JAX's "
            "ragged_paged_attention has no attention sinks; use kvshard's kernel "
            "(BackendOptions(pallas_kernel='kvshard'), the default) or backend='xla'"
        )
    host.check_shape("sinks", sinks, (num_q_heads,), "[num_q_heads] (one logit per query head)")
    if not jnp.issubdtype(host.dtype_of(sinks), jnp.floating):
        raise TypeError(f"sinks must be a floating array, got {host.dtype_of(sinks)}")
    values = host.concrete(sinks)
    if values is not None:
        bad = np.isnan(values) | (values == np.inf)
        if bad.any():
            h = int(np.argmax(bad))
            raise ValueError(
                f"sinks[{h}]={values[h]} must be finite or -inf (-inf: no sink for that head)"
            )
    return sinks if host.dtype_of(sinks) == np.float32 else jnp.asarray(sinks, jnp.float32)


def _check_q_scale(q_scale: Any, dtype: str, backend: str, jax_kernel: bool) -> float | None:
    """``q_scale`` as a float (or None): a quantized cache's scale rule (``check_scale``);
    refused on an unquantized cache and by JAX's pallas kernel (it has no q scale)."""
    if q_scale is None:
        return None
    scale = check_scale("q_scale", q_scale, dtype)
    if not needs_scales(dtype):
        raise ValueError(
            f"q_scale={q_scale!r} needs a quantized cache ({', '.join(QUANTIZED_DTYPES)}): "
            f"this one stores {dtype}, which q is used in as is (pass q_scale=None)"
        )
    if backend == "pallas" and jax_kernel:
        raise NotImplementedError(
            "q_scale= is not supported with backend='pallas' and JAX's kernel: JAX's "
            "ragged_paged_attention has no q scale; use kvshard's kernel "
            "(BackendOptions(pallas_kernel='kvshard'), the default) or backend='xla'"
        )
    return scale


class ReadOptions(NamedTuple):
    """The keyword arguments of one attention call, as the caller gave them."""

    sm_scale: Any
    sliding_window: Any
    layer_type: Any
    soft_cap: Any
    sinks: Any
    backend: Any
    options: Any
    checks: Any
    q_scale: Any = None


class LayerRead(NamedTuple):
    """What a call's checked keywords fix for every layer it may read: with the layer, they
    give its :class:`ReadType` and :class:`Statics` (:func:`check_layer_read`)."""

    sliding_window: int | None
    layer_type: Any
    backend: str  # resolved
    sm_scale: float
    soft_cap: float | None
    options: BackendOptions
    q_scale: float | None  # checked (_check_q_scale)


class ReadCall(NamedTuple):
    """A checked attention call: ``_read``'s arguments, placed on the mesh."""

    cache: KVCache
    layer: Any  # int32[], the checked layer
    q: Any
    fields: tuple[Any, ...]  # the step's attention fields, in FIELDS order
    sinks: Any
    statics: Statics
    read_type: ReadType
    checks: bool
    layer_read: LayerRead
    q_spec: P  # where q was placed


def check_layer_read(spec: Any, layer: Any, given: LayerRead) -> tuple[Any, ReadType, Statics]:
    """The one place an attention call's layer is checked and resolved: its range and type
    (:func:`kvshard._device.arg_checks.check_layer`), then the type it is read with
    (:func:`kvshard._attention.layer_type.read_type`). Returns (the layer as int32, its
    :class:`ReadType`, the call's :class:`Statics`)."""
    index = host.check_layer(spec.num_layers, layer)
    if host.is_traced(index):
        return index, *_resolve(spec, index, given)
    try:
        return index, *_resolve_concrete(spec, int(index), given)
    except TypeError as err:  # a layer_type the cache cannot hash (a list): checked uncached
        if "unhashable" not in str(err):
            raise
        return index, *_resolve(spec, index, given)


def _resolve(spec: Any, layer: Any, given: LayerRead) -> tuple[ReadType, Statics]:
    window, layer_type, backend, scale, cap, options, q_scale = given
    read = read_type(spec, layer, window, layer_type, backend, options)
    statics = Statics(spec, scale, read.sliding_window, cap, options, read.chunk_size, q_scale)
    return read, statics


_resolve_concrete = functools.lru_cache(maxsize=1024)(_resolve)


def report_read(spec: Any, read: ReadType, whole: Any, *, num_tokens: int) -> None:
    """``checks=True`` inside the sharded body: every device reports what the drop rule drops
    from the whole (layer, *fields) (:mod:`kvshard._device.reports`)."""
    if read.readable is not None:
        _reports.check_layer_type(whole[0], read.readable, read.layer_type)
    _reports.check_attention(
        *whole,
        num_layers=spec.num_layers,
        num_tokens=num_tokens,
        num_pages=spec.num_pages,
        page_size=spec.page_size,
    )


def check_read(cache, layer, q, step, given: ReadOptions) -> ReadCall:
    """The host checks and placement of an attention call (see :func:`kvshard.attention` for
    the arguments and what is refused). Also used by :func:`kvshard.fused_attention`."""
    cache = check_cache(cache)
    host.check_backend(given.backend)
    options = host.check_options(given.options)
    resolved = resolve_attention_backend(cache, given.backend, options)
    scale = _finite_positive("sm_scale", given.sm_scale, optional=False)
    cap = _finite_positive("soft_cap", given.soft_cap, optional=True)
    window = _check_window(given.sliding_window)
    q_scale = _check_q_scale(
        given.q_scale, cache.spec.dtype, resolved, options.jax_attention_kernel
    )
    layer_read = LayerRead(window, given.layer_type, resolved, scale, cap, options, q_scale)  # type: ignore[arg-type]
    layer_index, read, statics = check_layer_read(cache.spec, layer, layer_read)
    spec, pooled = cache.spec, cache.page_axis is not None
    lead = (cache.dp,) if pooled else ()
    dim = "kv_lora_rank + qk_rope_head_dim" if spec.latent else "head_dim"
    what = f"[dp, T, num_q_heads, {dim}]" if pooled else f"[T, num_q_heads, {dim}]"
    host.check_shape("q", q, (*lead, None, None, spec.head_dim), what)
    if not jnp.issubdtype(host.dtype_of(q), jnp.floating):
        raise TypeError(f"q must be a floating array, got {host.dtype_of(q)}")
    try:
        check_query_heads(np.shape(q)[-2], spec.num_kv_heads, cache.tp)
    except ValueError as err:
        raise ValueError(f"q has {np.shape(q)[-2]} query heads: {err}") from None
    sinks = _check_sinks(given.sinks, np.shape(q)[-2], resolved, options.jax_attention_kernel)
    num_tokens = np.shape(q)[-3]
    check_step(step, spec, num_tokens=num_tokens, token_arg="q", lead=lead)
    assert step is not None
    fields = _check_fields(cache, step, num_tokens)
    checks = bool(given.checks) and any(map(host.is_traced, (layer, *fields)))
    mesh = cache.mesh
    q_spec = _q_spec(cache) if pooled else P(*_q_spec(cache)[1:])
    fields_spec = P(cache.page_axis) if pooled else P()
    sinks_items = [] if sinks is None else [(sinks, P(cache.head_axis))]
    layer_index, q, *placed = place_all(
        mesh,
        [(layer_index, P()), (q, q_spec), *((x, fields_spec) for x in fields), *sinks_items],
        reuse=not any(map(host.is_traced, (cache.kv, q))),  # eager: a step placed once per step
    )
    return ReadCall(
        cache,
        layer_index,
        q,
        tuple(placed[: len(fields)]),
        None if sinks is None else placed[-1],
        statics,
        read,
        checks,
        layer_read,
        q_spec,
    )


def read(call: ReadCall) -> jax.Array:
    """The checked call's one jitted, sharded read: q.dtype[(dp,) T, Hq, D]."""
    return _read(
        call.cache,
        call.layer,
        call.q,
        call.fields,
        call.sinks,
        backend=call.layer_read.backend,
        statics=call.statics,
        checks=call.checks,
        read=call.read_type,
    )
