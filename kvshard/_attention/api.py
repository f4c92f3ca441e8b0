"""``attention``: ragged paged attention of one layer, read where the cache lives.

:func:`attention` runs inside ``jax.shard_map``. Each device attends the query heads whose KV
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
(:func:`kvshard._drop.live_requests`): the first request out of contract and every request
after it produce zeros, as does every token of a step whose traced ``layer`` is out of range;
``checks=True`` reports it.

(Just over 400 lines because the public operation is read in one file: its host checks, the
sharded call and its documented contract; the eager fast path is in ``eager.py``.)
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from kvshard import _host_checks as host
from kvshard import _reports
from kvshard._attention.eager import eager_attention_key, known_call
from kvshard._attention.layer_type import ReadType, read_type
from kvshard._attention.pallas import local_pallas
from kvshard._attention.params import Statics
from kvshard._attention.xla import local_xla
from kvshard._drop import route_layer
from kvshard._eager import EAGER_CALLS, placed_metadata
from kvshard._layer_types import LayerType
from kvshard._layout import (
    INT32_MAX,
    QUANTIZED_DTYPES,
    check_query_heads,
    check_scale,
    needs_scales,
)
from kvshard._platform import resolve_attention_backend
from kvshard._sharding import place_all, to_spec
from kvshard._types import Backend, BackendOptions
from kvshard.cache import KVCache, check_cache
from kvshard.step import StepMetadata, check_step

__all__ = ["attention"]

# Field order of the attention metadata handed to the per-device body.
_FIELDS = ("page_indices", "kv_lens", "cu_q_lens", "num_seqs")
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
        fields, whole = fields[: len(_FIELDS)], fields[len(_FIELDS) :]
        if whole:
            if read.readable is not None:
                _reports.check_layer_type(whole[0], read.readable, read.layer_type)
            _reports.check_attention(
                *whole,
                num_layers=spec.num_layers,
                num_tokens=q.shape[1],
                num_pages=spec.num_pages,
                page_size=spec.page_size,
            )
        return local(kv, layer, q[0], *(x[0] for x in fields), *sink)[None]

    out = jax.shard_map(
        body, mesh=cache.mesh, in_specs=tuple(specs), out_specs=q_spec, check_vma=False
    )(*args)
    return out if pa is not None else out[0]


def _check_fields(cache: KVCache, step: StepMetadata, num_tokens: int) -> list[Any]:
    """The attention fields of ``step``: shapes and dtypes always, values when concrete.

    Returns them as int32, in :data:`_FIELDS` order.
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
    fields = [host.as_int32(f"step.{name}", getattr(step, name)) for name in _FIELDS]
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
    """The contract of :func:`kvshard._drop.request_in_contract`, vectorized, raised on the
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
        JAX's kernel: only for an interleaved cache), xla otherwise.
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
      Padding tokens (past ``cu_q_lens[num_seqs]``) are zero. No collective runs: the caller's
      output projection does the usual reduction over the head axis.

    Raises:
      TypeError: wrong cache or step type, q or sinks not floating, step fields not integer
        (int32 when traced), layer not an integer scalar, sm_scale or soft_cap not a float.
      NotImplementedError: with JAX's pallas kernel (``pallas_kernel="jax"`` or an
        ``attention_kernel``): sinks, q_scale or a chunked read (JAX's kernel has neither), or a
        ``kv_layout="packed"`` cache (it reads interleaved rows only).
      ValueError: wrong shapes (q's tokens other than the step's), a step built for another
        geometry, head counts that do not divide, a donated cache, concrete layer or metadata
        out of range (a request's queries past T, kv_len beyond its page-table row or below
        its query count, a page id outside the pool), a bad window, scale or soft cap, sinks
        not of shape [Hq] or holding NaN or +inf; with ``layer_types``: a window or
        ``layer_type`` other than a concrete layer's own, none for a traced layer over
        layers of several types (see ``sliding_window``), or a ``layer_type`` no layer has;
        q_scale on an unquantized cache, or not a positive finite float within its bounds.
    """
    if not isinstance(cache, KVCache) and isinstance(layer, KVCache):
        warnings.warn(
            "attention(q, cache, layer, metadata) is deprecated: call attention(cache, layer, "
            "q, step), cache and layer first like every kvshard operation",
            DeprecationWarning,
            stacklevel=2,
        )
        cache, layer, q = layer, q, cache  # type: ignore[assignment]
    if metadata is not None:
        if step is not None:
            raise TypeError("pass the step once: step or metadata=, not both")
        warnings.warn(
            "attention(metadata=) is deprecated: pass step", DeprecationWarning, stacklevel=2
        )
        step = metadata
    eager = (
        None
        if q_scale is not None
        else eager_attention_key(
            _FIELDS,
            cache,
            layer,
            q,
            step,
            sm_scale,
            sliding_window,
            layer_type,
            soft_cap,
            sinks,
            backend,
            options,
            checks,
        )
    )
    out = None if eager is None else known_call(_read, eager, cache, layer, q)
    if out is not None:  # this call passed every check but the layer's before
        return out
    args, kwargs = checked_read_args(
        cache,
        layer,
        q,
        step,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        layer_type=layer_type,
        soft_cap=soft_cap,
        sinks=sinks,
        backend=backend,
        options=options,
        checks=checks,
        eager=eager,
        q_scale=q_scale,
    )
    return _read(*args, **kwargs)


def checked_read_args(
    cache,
    layer,
    q,
    step,
    *,
    sm_scale,
    sliding_window,
    layer_type,
    soft_cap,
    sinks,
    backend,
    options,
    checks,
    eager=None,
    q_scale=None,
):
    """:func:`attention`'s host checks and placement: ``(args, kwargs)`` of ``_read``
    (``(cache, layer, q, fields, sinks)``; ``backend``, ``statics``, ``checks``, ``read``).
    Also used by :func:`kvshard.fused_attention`. Raises what :func:`attention` raises."""
    cache = check_cache(cache)
    host.check_backend(backend)
    options = host.check_options(options)
    resolved = resolve_attention_backend(cache, backend, options)
    scale = _finite_positive("sm_scale", sm_scale, optional=False)
    cap = _finite_positive("soft_cap", soft_cap, optional=True)
    window = _check_window(sliding_window)
    layer_index = host.check_layer(cache.spec.num_layers, layer)
    read = read_type(cache.spec, layer_index, window, layer_type, resolved, options)
    statics = Statics(
        cache.spec,
        scale,  # type: ignore[arg-type]
        read.sliding_window,
        cap,
        options,
        read.chunk_size,
        _check_q_scale(q_scale, cache.spec.dtype, resolved, options.jax_attention_kernel),
    )
    spec, pooled = cache.spec, cache.page_axis is not None
    lead = (cache.dp,) if pooled else ()
    what = "[dp, T, num_q_heads, head_dim]" if pooled else "[T, num_q_heads, head_dim]"
    host.check_shape("q", q, (*lead, None, None, spec.head_dim), what)
    if not jnp.issubdtype(host.dtype_of(q), jnp.floating):
        raise TypeError(f"q must be a floating array, got {host.dtype_of(q)}")
    try:
        check_query_heads(np.shape(q)[-2], spec.num_kv_heads, cache.tp)
    except ValueError as err:
        raise ValueError(f"q has {np.shape(q)[-2]} query heads: {err}") from None
    sinks = _check_sinks(sinks, np.shape(q)[-2], resolved, options.jax_attention_kernel)
    num_tokens = np.shape(q)[-3]
    check_step(step, spec, num_tokens=num_tokens, token_arg="q", lead=lead)
    assert step is not None
    fields = _check_fields(cache, step, num_tokens)
    checks = bool(checks) and any(map(host.is_traced, (layer, *fields)))
    mesh = cache.mesh
    q_spec = _q_spec(cache) if pooled else P(*_q_spec(cache)[1:])
    fields_spec = P(cache.page_axis) if pooled else P()
    sinks_items = [] if sinks is None else [(sinks, P(cache.head_axis))]
    layer_index, q, *placed = place_all(
        mesh,
        [(layer_index, P()), (q, q_spec), *((x, fields_spec) for x in fields), *sinks_items],
        reuse=not any(map(host.is_traced, (cache.kv, q))),  # eager: a step placed once per step
    )
    fields = placed[: len(fields)]
    if eager is not None:  # every check passed: the next equal call is a lookup
        static = (window, layer_type, resolved, scale, cap, options)
        stored = placed_metadata(eager[1], fields)
        EAGER_CALLS.put(eager[0], (stored, None if q is eager[2] else q_spec, resolved, static))
    args = (cache, layer_index, q, fields, None if sinks is None else placed[-1])
    return args, {"backend": resolved, "statics": statics, "checks": checks, "read": read}
