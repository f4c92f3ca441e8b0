"""The opt-in ``checks=True`` reports: what a device operation drops, raised from inside jit.

With traced metadata nothing can raise, so a bad row is dropped (:mod:`kvshard._device.drop`). A
caller debugging a serving loop passes ``checks=True`` to :func:`kvshard.update`,
:func:`kvshard.gather`, :func:`kvshard.copy_pages`, :func:`kvshard.swap_out`,
:func:`kvshard.swap_in` or :func:`kvshard.attention`: a host
callback then raises ``ValueError`` naming the bad row, which the runtime re-raises as a
``JaxRuntimeError`` carrying that message when the result is used. Each report tests exactly
the rule in :mod:`kvshard._device.drop` that the backends apply.

Why a host callback rather than :mod:`jax.experimental.checkify`: checkify threads its error
through ``shard_map`` as a per-device array, and a later check with the same payload types
(the next layer's ``update``) then fails to trace ("select cases must have the same shapes",
JAX 0.10), so checkify errors would work for one kvshard call per function only.

The reports run inside ``shard_map`` on the whole (every group's) metadata, handed to every
device replicated: every device then raises alike. A check on one device only would leave the
others running into a collective or Pallas interpret mode's start barrier, waiting forever for
the failed device.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvshard._device.drop import (
    copy_pair_mask,
    layer_in_range,
    request_in_contract,
    slice_is_writable,
    swap_pair_is_padding,
    swap_pair_mask,
)

__all__ = [
    "check_attention",
    "check_copy_pairs",
    "check_gather",
    "check_layer",
    "check_layer_type",
    "check_swap_pairs",
    "check_update",
]


def _raise_unless(ok: Any, *, template: str, **payload: Any) -> None:
    """Host side of a check: raises ValueError(template.format(payload)) unless ``ok``."""
    if not bool(np.asarray(ok)):
        raise ValueError(template.format(**{k: int(np.asarray(v)) for k, v in payload.items()}))


def _check(ok: Any, template: str, **payload: Any) -> jax.Array:
    """Reports ``template`` (formatted with ``payload``) from the host when ``ok`` is False.

    ``jax.debug.callback``: an effect, so it is never dead-code eliminated, and it has no
    result, so no device waits on it. (A ``jax.pure_callback`` returning a value would make
    the other devices wait in a collective for a device whose callback raised: a deadlock on a
    multi-device mesh.) JAX keeps the failed callback's runtime token, so a later
    ``jax.effects_barrier()`` re-raises the error until another effectful computation runs on
    those devices. Returns an int32 zero, for callers that fold the checks into an input.
    """
    jax.debug.callback(functools.partial(_raise_unless, template=template), ok, **payload)
    return jnp.zeros((), jnp.int32)


def _first(bad: jax.Array) -> jax.Array:
    """Flat index of the first True of ``bad`` (0 when none)."""
    return jnp.argmax(bad.reshape(-1)).astype(jnp.int32)


def _check_count(field: str, count: jax.Array, size: int, what: str) -> jax.Array:
    """Reports a live count of each group (``count`` int32[G]) outside ``[0, size]``."""
    bad = (count < 0) | (count > size)
    g = _first(bad)
    return _check(
        ~bad.any(), f"{field}[{{g}}]={{n}} must be in [0, {size}] ({what})", g=g, n=count[g]
    )


def _report_row(bad: jax.Array, template: str, page: jax.Array) -> jax.Array:
    """Reports the first True row of ``bad`` (bool[G, K]): ``template`` formatted with its group
    ``g``, row ``row`` and ``page`` (that row's entry of ``page`` [G, K])."""
    i = _first(bad)
    size = bad.shape[-1]
    return _check(~bad.any(), template, g=i // size, row=i % size, page=page.reshape(-1)[i])


def check_layer(where: str, layer: jax.Array, num_layers: int) -> jax.Array:
    """Reports unless ``0 <= layer < num_layers``; returns an int32 zero (see :func:`_check`)."""
    return _check(
        layer_in_range(layer, num_layers),
        f"{where}: layer={{layer}} is out of range [0, {num_layers})",
        layer=layer,
    )


def check_layer_type(layer: jax.Array, readable: tuple[bool, ...], read: tuple) -> jax.Array:
    """Reports a layer in range that ``readable`` marks False: attention of a traced layer
    over layers of several types reads ``read`` layers only, and drops the others
    (:func:`kvshard._device.drop.route_layer`). A layer out of range is :func:`check_layer`'s."""
    index = jnp.clip(layer, 0, len(readable) - 1)
    ok = ~layer_in_range(layer, len(readable)) | jnp.asarray(readable, bool)[index]
    return _check(
        ok,
        f"attention: layer={{layer}} is not a {read!r} layer, the type this call reads "
        "(CacheSpec.layer_types): it reads nothing; scan only that type's layers",
        layer=layer,
    )


def check_update(
    layer: jax.Array,
    slices: jax.Array,
    num: jax.Array,
    *,
    num_layers: int,
    num_tokens: int,
    num_rows: int,
    page_size: int,
) -> jax.Array:
    """Reports what ``update`` would drop: a bad layer, count or live slice.

    ``slices`` int32[G, 3, S] and ``num`` int32[G, 1] carry a group axis (size 1 without a
    page axis). A live slice (index < num) with ``slice_len == 0`` writes nothing and is fine,
    as on the host; any other live slice the drop rule refuses is reported, and so are two
    live slices whose destinations or sources overlap (pairwise, O(S²): a debugging mode).
    Returns an int32 zero to add to an input of the update (see :func:`_check`).
    """
    zero = check_layer("update", layer, num_layers)
    size = slices.shape[-1]
    if size == 0:
        return zero
    count = num[:, 0]
    zero = zero + _check_count("update: num_slices", count, size, "columns of slices")
    dst, src, length = slices[:, 0], slices[:, 1], slices[:, 2]  # [G, S]
    live = jnp.arange(size)[None, :] < count[:, None]
    writable = slice_is_writable(
        dst, src, length, num_tokens=num_tokens, num_rows=num_rows, page_size=page_size
    )
    bad = live & (length != 0) & ~writable
    i = _first(bad)
    gi, si = i // size, i % size
    zero = zero + _check(
        ~bad.any(),
        "update: slices[{g}][:, {i}] = (kv_cache_start {dst}, new_kv_start {src}, slice_len "
        f"{{length}}) is dropped: it must have 0 <= slice_len <= page_size {page_size}, stay "
        f"in one page, read tokens in [0, {num_tokens}) and write slots in [0, {num_rows})",
        g=gi,
        i=si,
        dst=dst[gi, si],
        src=src[gi, si],
        length=length[gi, si],
    )
    used = live & writable & (length > 0)
    for field, start in (("destination", dst), ("source", src)):
        end = start + length
        both = used[:, :, None] & used[:, None, :] & ~jnp.eye(size, dtype=bool)[None]
        overlap = (
            both & (start[:, :, None] < end[:, None, :]) & (start[:, None, :] < end[:, :, None])
        )
        j = _first(overlap)
        gj, a, b = j // (size * size), j // size % size, j % size
        zero = zero + _check(
            ~overlap.any(),
            f"update: slices[{{g}}]: the {field}s of slices {{a}} and {{b}} overlap",
            g=gj,
            a=a,
            b=b,
        )
    return zero


def check_copy_pairs(src: jax.Array, dst: jax.Array, num_pages: int) -> jax.Array:
    """Reports what ``copy_pages`` would drop. ``src``, ``dst``: int32[G, K].

    Returns an int32 zero to add to the pairs (see :func:`_check`).
    """
    zero = jnp.zeros((), jnp.int32)
    size = src.shape[-1]
    if size == 0:
        return zero
    for field, page in (("src", src), ("dst", dst)):
        bad = (page < 0) | (page >= num_pages)
        zero = zero + _report_row(
            bad,
            f"copy_pages: pairs[{{g}}][{{row}}] has {field} page {{page}}, out of range "
            f"[0, {num_pages})",
            page,
        )
    kept = jax.vmap(lambda s, d: copy_pair_mask(s, d, num_pages))(src, dst)
    in_range = (src >= 0) & (src < num_pages) & (dst >= 0) & (dst < num_pages)
    dup = in_range & (src != dst) & ~kept
    zero = zero + _report_row(
        dup,
        "copy_pages: pairs[{g}][{row}] copies to dst page {page}, which another pair also writes",
        dst,
    )
    return zero


def check_swap_pairs(
    op: str,
    device: jax.Array,
    host: jax.Array,
    *,
    num_pages: int,
    num_host_pages: int,
    into_host: bool,
) -> jax.Array:
    """Reports what ``swap_out``/``swap_in`` (``op``) would drop. ``device``, ``host``:
    int32[G, K] page ids; padding rows are not reported.

    Returns an int32 zero to add to the pairs (see :func:`_check`).
    """
    zero = jnp.zeros((), jnp.int32)
    size = device.shape[-1]
    if size == 0:
        return zero
    padding = swap_pair_is_padding(device, host)
    for field, page, bound in (("device", device, num_pages), ("host", host, num_host_pages)):
        bad = ~padding & ((page < 0) | (page >= bound))
        zero = zero + _report_row(
            bad,
            f"{op}: pairs[{{g}}][{{row}}] has {field} page {{page}}, out of range [0, {bound})",
            page,
        )
    kept = jax.vmap(
        lambda d, h: swap_pair_mask(
            d, h, num_pages=num_pages, num_host_pages=num_host_pages, into_host=into_host
        )
    )(device, host)
    in_range = (device >= 0) & (device < num_pages) & (host >= 0) & (host < num_host_pages)
    dup = in_range & ~kept
    dst, field = (host, "host") if into_host else (device, "device")
    zero = zero + _report_row(
        dup,
        f"{op}: pairs[{{g}}][{{row}}] writes {field} page {{page}}, which another pair also writes",
        dst,
    )
    return zero


def check_gather(
    layer: jax.Array, slots: jax.Array, *, num_layers: int, num_slots: int
) -> jax.Array:
    """Reports what ``gather`` reads as zeros. ``slots``: int32[G, N].

    Returns an int32 zero to add to the layer (see :func:`_check`).
    """
    zero = check_layer("gather", layer, num_layers)
    if slots.size == 0:
        return zero
    bad = (slots < 0) | (slots >= num_slots)
    i = _first(bad)
    zero = zero + _check(
        ~bad.any(),
        f"gather: slots[{{g}}][{{n}}]={{slot}} is out of range [0, {num_slots})",
        g=i // slots.shape[-1],
        n=i % slots.shape[-1],
        slot=slots.reshape(-1)[i],
    )
    return zero


def check_attention(
    layer: jax.Array,
    page_indices: jax.Array,
    kv_lens: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    num_layers: int,
    num_tokens: int,
    num_pages: int,
    page_size: int,
) -> jax.Array:
    """Reports what ``attention`` drops: a bad layer, or the first request out of contract.

    Fields carry a group axis ``[G, ...]`` (size 1 without a page axis). Returns an int32 zero
    (see :func:`_check`).
    """
    zero = check_layer("attention", layer, num_layers)
    max_seqs = page_indices.shape[-2]
    count = num_seqs[:, 0]
    zero = zero + _check_count("attention: step.num_seqs", count, max_seqs, "max_num_seqs")
    ok = jax.vmap(
        functools.partial(
            request_in_contract, num_tokens=num_tokens, num_pages=num_pages, page_size=page_size
        )
    )(page_indices, kv_lens, cu_q_lens, num_seqs)
    live = jnp.arange(max_seqs)[None, :] < jnp.clip(count, 0, max_seqs)[:, None]
    bad = live & ~ok
    i = _first(bad)
    gi, si = i // max_seqs, i % max_seqs
    zero = zero + _check(
        ~bad.any(),
        "attention: request {s} (group {g}) is dropped with every later one: cu_q_lens "
        "[{start}, {end}], kv_len {kv_len}; it needs 0 <= cu_q_lens[s] <= cu_q_lens[s + 1] <= "
        f"{num_tokens}, q_len <= kv_len <= pages_per_seq × page_size and page ids in "
        f"[0, {num_pages})",
        g=gi,
        s=si,
        start=cu_q_lens[gi, si],
        end=cu_q_lens[gi, si + 1],
        kv_len=kv_lens[gi, si],
    )
    return zero
