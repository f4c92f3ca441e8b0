"""Paged attention that reads the cache where it lives: per device, on the heads it owns.

:func:`attention` runs inside ``jax.shard_map``. Each device attends the query heads whose KV
heads it holds, reading K/V pages of its own block of the stacked cache through the page table,
and returns its query heads' output: nothing is gathered across devices, nothing is copied out
of the cache (see docs/attention.md for pictures).

Backends:

* ``"pallas"`` (default on TPU): JAX's own ``ragged_paged_attention`` kernel. Its ``kv_pages``
  operand is ``[total_pages, page_size, C, D]`` with K at even and V at odd combined heads:
  exactly one device's stacked block ``[L, num_pages·page_size, C, D_pad]`` reshaped (a free
  bitcast) to ``[L·num_pages, page_size, C, D_pad]``. Page ``p`` of layer ``l`` is page
  ``l·num_pages + p`` of that view, so the page table is offset by ``layer·num_pages`` and
  no layer is ever sliced out.
* ``"xla"`` (default elsewhere): a jnp flash-decoding loop. Each iteration gathers, for every
  query token, one page of its request (only pages the page table names, only pages that hold
  keys the token may see: with a sliding window, the pages before it are never read) and folds
  it into an online softmax. Temporaries are a few pages per token, never a layer.

Both follow ``ref_ragged_paged_attention``'s semantics: request ``i``'s queries are its last
``q_len`` tokens; token at position ``p`` attends positions ``k <= p`` (and ``k > p - W`` with
a sliding window ``W``); scores ``sm_scale·q·k``, then ``soft_cap·tanh(s / soft_cap)``.

Out-of-contract metadata inside ``jit`` (where nothing can raise) is dropped identically on
both backends: the first request whose metadata is out of contract and every request after it
produce zeros, as does every token of a step whose traced ``layer`` is out of range.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention
from jax.sharding import PartitionSpec as P

from kvshard.cache import (
    Backend,
    KVCache,
    _check_array,
    _check_backend,
    _check_cache,
    _check_layer,
    _concrete,
    _dtype,
    _place,
    _PlatformJit,
    _resolve_backend,
    _to_spec,
)
from kvshard.step import StepMetadata

__all__ = ["attention"]

# Block sizes handed to JAX's kernel when lowering for TPU from a host that is not a TPU (its
# tuned-size lookup needs a TPU); the common entries of its tuned table.
CROSS_LOWERING_KV_PAGES_PER_BLOCK = 16
CROSS_LOWERING_QUERIES_PER_BLOCK = 32

# The xla backend folds up to this many keys per loop step (a whole number of pages, at least
# one), and gathers at most about XLA_TOKEN_KEYS_PER_STEP (token, key) pairs per step.
XLA_KEYS_PER_STEP = 128
XLA_TOKEN_KEYS_PER_STEP = 2**15

# Field order of the attention metadata handed to the per-device body.
_FIELDS = ("page_indices", "kv_lens", "cu_q_lens", "num_seqs")


class Statics(NamedTuple):
    """The static (hashable, compile-time) arguments of one attention call."""

    spec: Any  # CacheSpec
    sm_scale: float
    sliding_window: int | None
    soft_cap: float | None
    keys_per_step: int = 0  # xla backend: keys folded per loop step (0: XLA_KEYS_PER_STEP)


# --------------------------------------------------------------------------------------------
# The drop rule (shared by both backends)
# --------------------------------------------------------------------------------------------


def _live_seqs(
    page_indices: jax.Array,
    kv_lens: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    layer: jax.Array,
    *,
    num_layers: int,
    num_tokens: int,
    num_pages: int,
    page_size: int,
) -> jax.Array:
    """Number of leading requests whose metadata is in contract: int32 scalar (0 for a
    ``layer`` outside ``[0, num_layers)``: such a step reads nothing).

    Request ``s`` is in contract iff ``s < num_seqs <= max_num_seqs``, ``0 <= cu_q_lens[s] <=
    cu_q_lens[s + 1] <= T``, ``q_len <= kv_len <= pages_per_seq·page_size`` and the pages
    holding its ``kv_len`` tokens are ids in ``[0, num_pages)``. Cutting at the first bad
    request (rather than masking it alone) keeps the kernel's view a plain prefix of requests.
    """
    max_seqs, pages_per_seq = page_indices.shape
    start, end = cu_q_lens[:-1], cu_q_lens[1:]
    q_len = end - start
    used = jnp.arange(pages_per_seq)[None, :] * page_size < kv_lens[:, None]
    pages_ok = jnp.all(~used | ((page_indices >= 0) & (page_indices < num_pages)), axis=1)
    ok = (
        (start >= 0)
        & (q_len >= 0)
        & (end <= num_tokens)
        & (q_len <= kv_lens)
        & (kv_lens <= pages_per_seq * page_size)
        & pages_ok
        & (jnp.arange(max_seqs) < jnp.clip(num_seqs[0], 0, max_seqs))
    )
    live = jnp.argmin(jnp.append(ok, False)).astype(jnp.int32)
    return jnp.where((layer >= 0) & (layer < num_layers), live, 0)


def _live_tokens(kv, layer, page_indices, kv_lens, cu_q_lens, num_seqs, num_tokens, page_size):
    """Both backends' drop rule on one device's block kv [L, slots, C, D]: (live request count,
    int32[T] request of each token, bool[T] token belongs to a live request)."""
    num_layers, num_slots = kv.shape[:2]
    live = _live_seqs(
        page_indices,
        kv_lens,
        cu_q_lens,
        num_seqs,
        layer,
        num_layers=num_layers,
        num_tokens=num_tokens,
        num_pages=num_slots // page_size,
        page_size=page_size,
    )
    return (live, *_token_rows(cu_q_lens, live, num_tokens))


def _token_rows(cu_q_lens: jax.Array, live: jax.Array, num_tokens: int):
    """(int32[T] request of each token, bool[T] token belongs to a live request)."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_q_lens, t, side="right").astype(jnp.int32) - 1
    seq = jnp.clip(seq, 0, cu_q_lens.shape[0] - 2)
    ok = (seq < live) & (t >= cu_q_lens[seq]) & (t < cu_q_lens[seq + 1])
    return seq, ok


# --------------------------------------------------------------------------------------------
# Per-device bodies (inside shard_map)
# --------------------------------------------------------------------------------------------


def _dequantize(x: jax.Array, scale: float | None) -> jax.Array:
    x = x.astype(jnp.float32)
    return x if scale is None else x * scale


def _local_xla(kv, layer, q, page_indices, kv_lens, cu_q_lens, num_seqs, *, statics, kernel):
    """One device: kv [L, slots, C, D_pad], q [T, Hq_local, D] -> [T, Hq_local, D]."""
    del kernel
    spec, sm_scale, window, soft_cap, keys_per_step = statics
    num_layers, num_slots, combined, _ = kv.shape
    num_tokens, q_heads, head_dim = q.shape
    page_size = spec.page_size
    kv_heads = combined // 2
    group = q_heads // kv_heads
    pages_per_seq = page_indices.shape[1]

    _, seq, tok_ok = _live_tokens(
        kv, layer, page_indices, kv_lens, cu_q_lens, num_seqs, num_tokens, page_size
    )
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    pos = kv_lens[seq] - q_len + (jnp.arange(num_tokens) - cu_q_lens[seq])  # int32[T]
    lo = jnp.zeros_like(pos) if window is None else jnp.maximum(pos - window + 1, 0)
    first, last = lo // page_size, pos // page_size
    # Pages per loop step: enough keys per step that the loop's per-step overhead is paid
    # rarely (decode), few enough that the per-step gather of every token's keys stays small
    # (a long prefill folds one page per step).
    keys = keys_per_step or max(1, min(XLA_KEYS_PER_STEP, XLA_TOKEN_KEYS_PER_STEP // num_tokens))
    block = max(1, min(pages_per_seq, keys // page_size))
    num_steps = -(-jnp.max(jnp.where(tok_ok, last - first + 1, 0), initial=0) // block)
    rows = page_indices[seq]  # int32[T, pages_per_seq]: each token's page-table row
    layer = jnp.clip(layer, 0, num_layers - 1)
    qf = q.astype(jnp.float32).reshape(num_tokens, kv_heads, group, head_dim)
    within = jnp.arange(page_size, dtype=jnp.int32)
    offsets = jnp.arange(block, dtype=jnp.int32)

    def fold_page(i, carry):
        m, denom, acc = carry
        # int32[T, block]: which pages of its request each token reads in this step
        page_pos = first[:, None] + i * block + offsets
        page = jnp.take_along_axis(rows, jnp.clip(page_pos, 0, pages_per_seq - 1), 1)
        slots = (page[..., None] * page_size + within).reshape(num_tokens, -1)  # [T, keys]
        kv_block = kv[layer, jnp.clip(slots, 0, num_slots - 1)]  # [T, keys, C, D_pad]
        k = _dequantize(kv_block[:, :, 0::2, :head_dim], spec_scale(spec, "k"))
        v = _dequantize(kv_block[:, :, 1::2, :head_dim], spec_scale(spec, "v"))
        s = jnp.einsum("thgd,tphd->thgp", qf, k) * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        k_pos = (page_pos[..., None] * page_size + within).reshape(num_tokens, -1)
        in_row = jnp.repeat(page_pos <= last[:, None], page_size, axis=1)
        seen = in_row & (k_pos <= pos[:, None]) & (k_pos >= lo[:, None])
        seen = seen & tok_ok[:, None]
        s = jnp.where(seen[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        base = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # rows that saw nothing yet
        p = jnp.exp(s - base[..., None])
        alpha = jnp.exp(m - base)
        denom = alpha * denom + p.sum(axis=-1)
        acc = alpha[..., None] * acc + jnp.einsum("thgp,tphd->thgd", p, v)
        return m_new, denom, acc

    init = (
        jnp.full((num_tokens, kv_heads, group), -jnp.inf, jnp.float32),
        jnp.zeros((num_tokens, kv_heads, group), jnp.float32),
        jnp.zeros((num_tokens, kv_heads, group, head_dim), jnp.float32),
    )
    _, denom, acc = jax.lax.fori_loop(0, num_steps, fold_page, init)
    # Tokens that saw no key (padding, dropped requests) are zero; NaN in the cache stays NaN.
    empty = (denom == 0)[..., None]
    out = jnp.where(empty, 0.0, acc / jnp.where(empty, 1.0, denom[..., None]))
    return out.reshape(num_tokens, q_heads, head_dim).astype(q.dtype)


def pallas_operands(kv, layer, q, page_indices, kv_lens, cu_q_lens, num_seqs, *, statics):
    """What the pallas backend hands JAX's kernel on one device: (operands, kwargs, tok_ok).

    ``operands`` are the kernel's positional arguments: q padded to D_pad, the device's whole
    stacked block viewed as pages [L·num_pages, P, C, D_pad] (a bitcast, no copy), kv_lens,
    page indices offset by ``layer·num_pages``, cu_q_lens and the live request count.
    ``tok_ok`` (bool[T]) marks the tokens of live requests; the rest of the output is zeroed.
    Public within the package so tests can hand the same operands to
    ``ref_ragged_paged_attention``.
    """
    spec, sm_scale, window, soft_cap, _ = statics
    num_layers, num_slots, combined, padded_dim = kv.shape
    num_tokens, _, head_dim = q.shape
    page_size = spec.page_size
    num_pages = num_slots // page_size
    live, _, tok_ok = _live_tokens(
        kv, layer, page_indices, kv_lens, cu_q_lens, num_seqs, num_tokens, page_size
    )
    layer = jnp.clip(layer, 0, num_layers - 1)
    # Rows past `live` are never read by the kernel; clamp them anyway so no index can leave
    # this layer's pages.
    pages = jnp.clip(page_indices, 0, num_pages - 1) + layer * num_pages
    kv_pages = kv.reshape(num_layers * num_pages, page_size, combined, padded_dim)  # bitcast
    q_pad = jnp.pad(q, [(0, 0), (0, 0), (0, padded_dim - head_dim)])
    operands = (q_pad, kv_pages, kv_lens, pages, cu_q_lens, live[None])
    kwargs = {
        "sm_scale": sm_scale,
        "sliding_window": window,
        "soft_cap": soft_cap,
        "k_scale": spec_scale(spec, "k"),
        "v_scale": spec_scale(spec, "v"),
    }
    return operands, kwargs, tok_ok


def pallas_output(out: jax.Array, tok_ok: jax.Array, head_dim: int, dtype: Any) -> jax.Array:
    """The kernel's [T, Hq, D_pad] output -> [T, Hq, D], zero outside live requests."""
    return jnp.where(tok_ok[:, None, None], out[..., :head_dim], 0).astype(dtype)


def _local_pallas(kv, layer, q, page_indices, kv_lens, cu_q_lens, num_seqs, *, statics, kernel):
    """One device: JAX's ragged paged attention on the [L·num_pages, P, C, D_pad] view."""
    operands, kwargs, tok_ok = pallas_operands(
        kv, layer, q, page_indices, kv_lens, cu_q_lens, num_seqs, statics=statics
    )
    if jax.devices()[0].platform != "tpu":
        # The kernel looks its block sizes up by TPU generation, which fails on any other
        # host; exporting for TPU from such a host needs them given (the tuned table's usual
        # values). On a TPU host the kernel's own table is used.
        kwargs |= {
            "num_kv_pages_per_block": min(CROSS_LOWERING_KV_PAGES_PER_BLOCK, page_indices.shape[1]),
            "num_queries_per_block": CROSS_LOWERING_QUERIES_PER_BLOCK,
        }
    return pallas_output(kernel(*operands, **kwargs), tok_ok, q.shape[-1], q.dtype)


def spec_scale(spec: Any, which: str) -> float | None:
    """The spec's per-tensor dequantization scale for K or V (None: stored unscaled)."""
    scale = getattr(spec, f"{which}_scale", None)
    return None if scale is None else float(scale)


_LOCAL = {"xla": _local_xla, "pallas": _local_pallas}


# --------------------------------------------------------------------------------------------
# The sharded call
# --------------------------------------------------------------------------------------------


def _q_spec(cache: KVCache) -> P:
    """q / out [G, T, Hq, D]: query heads split over the head axis like the KV heads."""
    return P(cache.page_axis, None, cache.head_axis, None)


# _PlatformJit: on CPU, XLA's float normalization would upcast the whole bf16/fp8 cache operand
# of the page gather to f32 (temporaries of twice the cache); every op after the gather is f32.
@functools.partial(_PlatformJit, static_argnames=("backend", "statics", "kernel"))
def _attention_jit(cache, layer, q, metadata, *, backend, statics, kernel):
    pa = cache.page_axis
    fields = [getattr(metadata, f) for f in _FIELDS]
    if pa is None:  # one pool: give every per-pool argument a group axis of size 1
        q, fields = q[None], [x[None] for x in fields]
    q_spec = _q_spec(cache)
    specs = (cache.pspec, P(), q_spec, *(P(pa, *([None] * (np.ndim(x) - 1))) for x in fields))
    args = [
        _to_spec(cache.mesh, x, s)
        for x, s in zip((cache.kv, layer, q, *fields), specs, strict=True)
    ]
    local = functools.partial(_LOCAL[backend], statics=statics, kernel=kernel)

    def body(kv, layer, q, *fields):
        return local(kv, layer, q[0], *(x[0] for x in fields))[None]

    out = jax.shard_map(body, mesh=cache.mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(
        *args
    )
    return out if pa is not None else out[0]


def _check_metadata(cache: KVCache, metadata: Any, num_tokens: int) -> StepMetadata:
    """Shapes and dtypes always; values when concrete. Returns int32 metadata."""
    if not isinstance(metadata, StepMetadata):
        raise TypeError(
            f"metadata must be a kvshard.StepMetadata (from build_step), got "
            f"{type(metadata).__name__}"
        )
    pooled = cache.page_axis is not None
    lead: tuple[int, ...] = (cache.dp,) if pooled else ()
    what = "[dp, " if pooled else "["
    page_indices = metadata.page_indices
    _check_array(
        "metadata.page_indices",
        page_indices,
        (*lead, None, None),
        what + "max_num_seqs, pages_per_seq]",
    )
    max_seqs = np.shape(page_indices)[-2]
    for name, expected, text in (
        ("kv_lens", (*lead, max_seqs), "max_num_seqs]"),
        ("cu_q_lens", (*lead, max_seqs + 1), "max_num_seqs + 1]"),
        ("num_seqs", (*lead, 1), "1]"),
    ):
        _check_array(f"metadata.{name}", getattr(metadata, name), expected, what + text)
    out = {}
    for name in _FIELDS:
        x = getattr(metadata, name)
        dtype = _dtype(x)
        if not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(f"metadata.{name} must be an integer array, got {dtype}")
        host = _concrete(x)
        if host is None:
            if dtype != jnp.int32:
                raise TypeError(f"metadata.{name} must be int32 when traced, got {dtype}")
            out[name] = x
            continue
        if host.size and (host.min() < np.iinfo(np.int32).min or host.max() > 2**31 - 1):
            raise ValueError(f"metadata.{name} holds values past int32")
        out[name] = host.astype(np.int32)
    hosts = [_concrete(out[n]) for n in _FIELDS]
    if all(h is not None for h in hosts):
        spec = cache.spec
        per_group = zip(*hosts, strict=True) if pooled else [hosts]
        for g, group in enumerate(per_group):
            _check_step_values(
                *group,  # type: ignore[arg-type]
                num_tokens=num_tokens,
                num_pages=spec.num_pages,
                page_size=spec.page_size,
                where=f" (group {g})" if pooled else "",
            )
    return StepMetadata(
        slices=metadata.slices,
        num_slices=metadata.num_slices,
        positions=metadata.positions,
        **out,
    )


def _check_step_values(
    page_indices: np.ndarray,
    kv_lens: np.ndarray,
    cu_q_lens: np.ndarray,
    num_seqs: np.ndarray,
    *,
    num_tokens: int,
    num_pages: int,
    page_size: int,
    where: str,
) -> None:
    """The contract of :func:`_live_seqs`, raised on the host with the field and the bound."""
    max_seqs, pages_per_seq = page_indices.shape
    n = int(num_seqs[0])
    if not 0 <= n <= max_seqs:
        raise ValueError(f"metadata.num_seqs={n}{where} is out of range [0, {max_seqs}]")
    for s in range(n):
        start, end, kv_len = int(cu_q_lens[s]), int(cu_q_lens[s + 1]), int(kv_lens[s])
        if not 0 <= start <= end <= num_tokens:
            raise ValueError(
                f"metadata.cu_q_lens[{s}:{s + 2}]=[{start}, {end}]{where} must be "
                f"non-decreasing within [0, {num_tokens}] (the query tokens)"
            )
        if not end - start <= kv_len <= pages_per_seq * page_size:
            raise ValueError(
                f"metadata.kv_lens[{s}]={kv_len}{where} must lie in [{end - start}, "
                f"{pages_per_seq * page_size}] (its query count, pages_per_seq × page_size)"
            )
        used = page_indices[s, : -(-kv_len // page_size)]
        bad = (used < 0) | (used >= num_pages)
        if bad.any():
            j = int(np.argmax(bad))
            raise ValueError(
                f"metadata.page_indices[{s}, {j}]={int(used[j])}{where} is out of range "
                f"[0, {num_pages})"
            )


def _check_static(sm_scale: Any, sliding_window: Any, soft_cap: Any) -> tuple:
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, int | float | np.floating):
        raise TypeError(f"sm_scale must be a Python float, got {type(sm_scale).__name__}")
    if sliding_window is not None and (
        isinstance(sliding_window, bool)
        or not isinstance(sliding_window, int | np.integer)
        or sliding_window < 1
    ):
        raise ValueError(f"sliding_window={sliding_window!r} must be None or an int >= 1")
    if soft_cap is not None and (
        isinstance(soft_cap, bool)
        or not isinstance(soft_cap, int | float | np.floating)
        or not np.isfinite(soft_cap)
        or soft_cap <= 0
    ):
        raise ValueError(f"soft_cap={soft_cap!r} must be None or a finite float > 0")
    return (
        float(sm_scale),
        None if sliding_window is None else int(sliding_window),
        None if soft_cap is None else float(soft_cap),
    )


def _attention(
    q: jax.Array,
    cache: KVCache,
    layer: Any,
    metadata: StepMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    backend: Backend,
    kernel: Any,
    keys_per_step: int = 0,
) -> jax.Array:
    cache = _check_cache(cache)
    _check_backend(backend)
    scale, window, cap = _check_static(sm_scale, sliding_window, soft_cap)
    statics = Statics(cache.spec, scale, window, cap, int(keys_per_step))
    layer_index = _check_layer(cache, layer)
    spec, pooled = cache.spec, cache.page_axis is not None
    lead = (cache.dp,) if pooled else ()
    what = "[dp, T, num_q_heads, head_dim]" if pooled else "[T, num_q_heads, head_dim]"
    _check_array("q", q, (*lead, None, None, spec.head_dim), what)
    q_heads = np.shape(q)[-2]
    if q_heads % spec.num_kv_heads or q_heads % cache.tp:
        raise ValueError(
            f"q has {q_heads} query heads; it must be a multiple of num_kv_heads="
            f"{spec.num_kv_heads} and of the head axis size {cache.tp}"
        )
    if not jnp.issubdtype(_dtype(q), jnp.floating):
        raise TypeError(f"q must be a floating array, got {_dtype(q)}")
    metadata = _check_metadata(cache, metadata, np.shape(q)[-3])
    mesh = cache.mesh
    q_spec = _q_spec(cache)
    if not pooled:
        q_spec = P(*q_spec[1:])
    fields_spec = P(cache.page_axis) if pooled else P()
    metadata = jax.tree.map(lambda x: _place(mesh, x, fields_spec), metadata)
    return _attention_jit(
        cache,
        _place(mesh, layer_index, P()),
        _place(mesh, q, q_spec),
        metadata,
        backend=_resolve_backend(cache, backend),
        statics=statics,
        kernel=kernel,
    )


def attention(
    q: jax.Array,
    cache: KVCache,
    layer: int | jax.Array,
    metadata: StepMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    backend: Backend = "auto",
) -> jax.Array:
    """Ragged paged attention of one layer, per device on the heads it owns, in place.

    Args:
      q: float[T, Hq, D] queries of the step's tokens (packed as ``metadata`` says), or
        float[dp, T, Hq, D] with a page axis (group g's queries attend its own pool). ``Hq`` a
        multiple of ``num_kv_heads`` and of the head-axis size ``tp``; query head ``i``
        attends KV head ``i // (Hq / num_kv_heads)``. Sharded (or resharded)
        ``P(page_axis, None, head_axis, None)``: per device float[T, Hq/tp, D], the query
        heads of the KV heads (with replication, of the KV-head copy) the device holds.
      cache: not donated; read in place.
      layer: int or int scalar array in [0, L); may be traced (``lax.scan`` over layers).
      metadata: the step's :class:`~kvshard.StepMetadata` (``[dp, ...]`` fields with a page
        axis).
      sm_scale: softmax scale (usually ``head_dim ** -0.5``).
      sliding_window: W >= 1: token at position p attends positions (p - W, p]; None: all.
      soft_cap: logit soft cap > 0, or None.
      backend: "pallas" (JAX's ragged paged attention kernel; TPU only), "xla" (jnp), or
        "auto": pallas when the mesh is made of TPUs, xla otherwise.

    Returns:
      q.dtype[T, Hq, D] (or [dp, T, Hq, D]) sharded like ``q``: per device [T, Hq/tp, D].
      Padding tokens (past ``cu_q_lens[num_seqs]``) are zero. No collective runs: the caller's
      output projection does the usual reduction over the head axis.

    Raises:
      TypeError: wrong cache or metadata type, q not floating, metadata not integer (int32
        when traced), layer not an integer scalar, sm_scale not a float.
      ValueError: wrong shapes, head counts that do not divide, concrete layer or metadata
        out of range (a request's queries past T, kv_len beyond its page-table row or below
        its query count, a page id outside the pool), a bad window or soft cap.
    """
    return _attention(
        q,
        cache,
        layer,
        metadata,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        backend=backend,
        kernel=ragged_paged_attention,
    )
