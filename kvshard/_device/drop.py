"""The drop rule: which rows of traced metadata a device operation performs (inside jit).

Inside ``jit`` nothing can raise, so a row of metadata that is out of contract is dropped:
it writes nothing and reads nothing, identically on every backend. This module is the one
place that says which rows those are, one function per kind of row:

* a layer: :func:`layer_in_range`; of a cache with layer groups, :func:`route_layer` (its
  group and cache layer, or none);
* an update slice: :func:`slice_is_writable` (the Pallas kernel's own guard) and
  :func:`writable_slices` (plus the live count and the layer), :func:`token_slots` (where each
  token of a step lands, or nowhere);
* a copy pair of ``copy_pages``: :func:`copy_pair_mask`;
* a swap pair of ``swap_out``/``swap_in``: :func:`swap_pair_mask` (padding:
  :func:`swap_pair_is_padding`);
* an attention request: :func:`live_requests`, :func:`live_query_bounds` and
  :func:`token_requests`.

Both backends and the opt-in ``checks=True`` reports (:mod:`kvshard._device.reports`) call these, so
what a report names is exactly what a backend drops, with one deliberate exception: a live
count past its maximum (``num_slices > S``, ``num_seqs > max_num_seqs``) is clamped to the
maximum by the backends (every row is then live and judged on its own), while ``checks=True``
reports the count itself as out of contract.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "SWAP_PAD",
    "copy_pair_mask",
    "layer_in_range",
    "live_query_bounds",
    "live_requests",
    "requests_on_block",
    "route_layer",
    "slice_is_writable",
    "swap_pair_is_padding",
    "swap_pair_mask",
    "token_requests",
    "token_slots",
    "writable_slices",
]


def layer_in_range(layer: jax.Array, num_layers: int) -> jax.Array:
    """bool scalar: ``0 <= layer < num_layers``; a traced layer outside it writes nothing and
    reads zeros (indexing would otherwise wrap -1 to the last layer and clamp L to it, and the
    kernel's flat offset ``layer · slots`` can overflow int32 back into range)."""
    return (layer >= 0) & (layer < num_layers)


def route_layer(
    layer: jax.Array,
    layer_group: tuple[int, ...],
    layer_slot: tuple[int, ...],
    readable: tuple[bool, ...] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(group, cache layer) of model ``layer``, int32 scalars, for a cache with layer groups.

    Read from the static per-layer tables (``CacheGroups.layer_group`` / ``layer_slot``)
    with a possibly traced ``layer``, so one executable serves every layer and ``lax.scan``
    over layers works. A layer outside ``[0, len(layer_slot))``, or one that ``readable``
    (a bool per layer: e.g. attention's layers of the type it reads) marks False, gets cache
    layer -1, which every operation then drops as a layer out of range
    (:func:`layer_in_range`); its group is still a valid index (the clamped layer's), so
    selecting its page table cannot go out of bounds. Identity tables (one group, cache
    layer = layer) return ``(0, layer)`` unchanged: no lookup in the common case.
    """
    num_layers = len(layer_slot)
    identity = layer_slot == tuple(range(num_layers)) and set(layer_group) == {0}
    if identity and readable is None:
        return jnp.zeros((), jnp.int32), layer
    ok = layer_in_range(layer, num_layers)
    index = jnp.clip(layer, 0, num_layers - 1)
    if readable is not None:
        ok &= jnp.asarray(readable, bool)[index]
    group = jnp.asarray(layer_group, jnp.int32)[index]
    slot = jnp.asarray(layer_slot, jnp.int32)[index]
    return group, jnp.where(ok, slot, -1).astype(jnp.int32)


def slice_is_writable(dst, src, length, *, num_tokens: int, num_rows: int, page_size: int):
    """The kernel's drop rule: bool (scalar or [S]) of whether a slice may be written.

    True iff ``1 <= length <= page_size``, the source ``[src, src + length)`` lies in
    ``num_tokens`` rows, the destination ``[dst, dst + length)`` in ``num_rows`` rows, and the
    destination stays inside one page. ``num_rows`` must be a multiple of ``page_size``. Works
    on int32 scalars (inside the kernel) and int32[S] arrays (the XLA backend applies the same
    rule, so both backends agree).
    """
    # Written without `src + length` or `dst + length`, so a start near INT32_MAX cannot
    # overflow past a bound. The destination's end needs no test of its own: a start in
    # [0, num_rows) whose slice stays inside its page ends by that page's end, which is at most
    # num_rows because num_rows is a whole number of pages. Fewer tests, fewer scalar ops.
    return (
        (length >= 1)
        & (length <= page_size)
        & (src >= 0)
        & (src <= num_tokens - length)
        & (dst >= 0)
        & (dst < num_rows)
        # `rem` is negative for a negative `dst`, but then `dst >= 0` already failed.
        # (lax.rem needs matching dtypes; a Python int would be int64 under jax_enable_x64.)
        & (jax.lax.rem(dst, jnp.asarray(page_size, jnp.result_type(dst))) <= page_size - length)
    )


def writable_slices(
    slices: jax.Array,
    num: jax.Array,
    layer: jax.Array,
    *,
    num_layers: int,
    num_tokens: int,
    num_slots: int,
    page_size: int,
) -> jax.Array:
    """bool[S]: the slices of int32[3, S] ``slices`` an update writes.

    A slice is written iff ``0 <= layer < num_layers``, its index is below ``num[0]``, and
    :func:`slice_is_writable` holds; every other slice writes nothing.
    """
    live = (jnp.arange(slices.shape[1]) < num[0]) & layer_in_range(layer, num_layers)
    return live & slice_is_writable(
        slices[0],
        slices[1],
        slices[2],
        num_tokens=num_tokens,
        num_rows=num_slots,
        page_size=page_size,
    )


def token_slots(slices: jax.Array, valid: jax.Array, num_tokens: int, num_slots: int) -> jax.Array:
    """Destination slot of each token of a step: int32[T]; tokens no valid slice covers get
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


def copy_pair_mask(src: jax.Array, dst: jax.Array, num_pages: int) -> jax.Array:
    """bool[K]: the (src, dst) page pairs ``copy_pages`` performs.

    A pair is performed iff both page ids lie in ``[0, num_pages)``, ``src != dst`` (no-op
    padding), and no other such pair writes the same ``dst``. Out-of-range ids would otherwise
    wrap (negative) or clamp (too large) onto real pages; two pairs writing one page would
    race, so both are dropped rather than letting the scatter pick a winner.
    """
    ok = (src >= 0) & (src < num_pages) & (dst >= 0) & (dst < num_pages) & (src != dst)
    return ok & ~_written_twice(dst, ok)


def swap_pair_mask(
    device: jax.Array, host: jax.Array, *, num_pages: int, num_host_pages: int, into_host: bool
) -> jax.Array:
    """bool[K]: the (device page, host page) pairs ``swap_out``/``swap_in`` perform.

    A pair is performed iff its device page lies in ``[0, num_pages)``, its host page in
    ``[0, num_host_pages)``, and no other such pair writes the same destination: the host page
    for ``swap_out`` (``into_host``), the device page for ``swap_in``. Sources may repeat (one
    page copied to two places). Padding rows ``(SWAP_PAD, SWAP_PAD)`` are out of range, hence
    never performed; :func:`swap_pair_is_padding` tells them from bad rows, which only the
    eager check and the ``checks=True`` report care about.
    """
    ok = (device >= 0) & (device < num_pages) & (host >= 0) & (host < num_host_pages)
    return ok & ~_written_twice(host if into_host else device, ok)


SWAP_PAD = -1
"""Page id of both fields of a padding row of swap pairs (pads K to a fixed bucket)."""


def swap_pair_is_padding(device: jax.Array, host: jax.Array) -> jax.Array:
    """bool[K]: rows ``(SWAP_PAD, SWAP_PAD)``, which swaps accept and perform nowhere."""
    return (device == SWAP_PAD) & (host == SWAP_PAD)


def _written_twice(dst: jax.Array, ok: jax.Array) -> jax.Array:
    """bool[K]: rows still ``ok`` whose ``dst`` another ``ok`` row also writes (all of them:
    two rows writing one page race, so neither wins)."""
    if dst.shape[0] < 2:
        return jnp.zeros_like(ok)
    # Sort, compare neighbours, scatter back; rows not ok get unique negative keys.
    key = jnp.where(ok, dst, -1 - jnp.arange(dst.shape[0], dtype=dst.dtype))
    order = jnp.argsort(key)
    same = key[order][1:] == key[order][:-1]
    dup_sorted = jnp.concatenate([same, jnp.zeros(1, bool)]) | jnp.concatenate(
        [jnp.zeros(1, bool), same]
    )
    return jnp.zeros_like(ok).at[order].set(dup_sorted)


def request_in_contract(
    page_indices: jax.Array,
    kv_lens: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    num_tokens: int,
    num_pages: int,
    page_size: int,
) -> jax.Array:
    """bool[max_num_seqs]: each request's attention metadata is in contract on its own.

    Request ``s`` is in contract iff ``s < min(num_seqs, max_num_seqs)`` (a count past the
    maximum is clamped, see the module docstring), ``0 <= cu_q_lens[s] <=
    cu_q_lens[s + 1] <= T``, ``q_len <= kv_len <= pages_per_seq·page_size`` and the pages
    holding its ``kv_len`` tokens are ids in ``[0, num_pages)``. Entries past ``num_seqs``
    are never read, so JAX's padding (zeros) and kvshard's (the total repeated) both hold.
    """
    max_seqs, pages_per_seq = page_indices.shape
    start, end = cu_q_lens[:-1], cu_q_lens[1:]
    q_len = end - start
    used = jnp.arange(pages_per_seq)[None, :] * page_size < kv_lens[:, None]
    pages_ok = jnp.all(~used | ((page_indices >= 0) & (page_indices < num_pages)), axis=1)
    return (
        (start >= 0)
        & (q_len >= 0)
        & (end <= num_tokens)
        & (q_len <= kv_lens)
        & (kv_lens <= pages_per_seq * page_size)
        & pages_ok
        & (jnp.arange(max_seqs) < jnp.clip(num_seqs[0], 0, max_seqs))
    )


def live_requests(
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
    """int32 scalar: the leading requests attention serves; 0 for a layer out of range.

    The first request out of contract (:func:`request_in_contract`) and every later one are
    dropped: cutting at the first bad request, rather than masking it alone, keeps the
    kernel's view a plain prefix of requests.
    """
    ok = request_in_contract(
        page_indices,
        kv_lens,
        cu_q_lens,
        num_seqs,
        num_tokens=num_tokens,
        num_pages=num_pages,
        page_size=page_size,
    )
    live = jnp.argmin(jnp.append(ok, False)).astype(jnp.int32)
    return jnp.where(layer_in_range(layer, num_layers), live, 0)


def requests_on_block(
    kv: jax.Array,
    layer: jax.Array,
    page_indices,
    kv_lens,
    cu_q_lens,
    num_seqs,
    num_tokens: int,
    page_size: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Both attention backends' drop rule on one device's block kv [L, slots, C, D]:
    (live request count, int32[T] request of each token, bool[T] token of a live request)."""
    num_layers, num_slots = kv.shape[:2]
    live = live_requests(
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
    return (live, *token_requests(cu_q_lens, live, num_tokens))


def live_query_bounds(cu_q_lens: jax.Array, live: jax.Array) -> jax.Array:
    """int32[max_num_seqs + 1]: ``cu_q_lens`` with every entry past ``live`` replaced by
    ``cu_q_lens[live]``: sorted whatever padding convention the caller used, and every request
    from ``live`` on owns no query token."""
    return jnp.where(jnp.arange(cu_q_lens.shape[0]) <= live, cu_q_lens, cu_q_lens[live])


def token_requests(
    cu_q_lens: jax.Array, live: jax.Array, num_tokens: int
) -> tuple[jax.Array, jax.Array]:
    """(int32[T] request of each token, bool[T] the token belongs to a live request).

    The search runs over :func:`live_query_bounds`, sorted whatever padding convention the
    caller used.
    """
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    bounds = live_query_bounds(cu_q_lens, live)
    seq = jnp.searchsorted(bounds, t, side="right").astype(jnp.int32) - 1
    seq = jnp.clip(seq, 0, cu_q_lens.shape[0] - 2)
    ok = (seq < live) & (t >= bounds[seq]) & (t < bounds[seq + 1])
    return seq, ok
