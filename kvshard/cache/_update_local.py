"""The per-device bodies of :func:`kvshard.update` (inside ``shard_map``, on one device's block)
and the saturation count of a quantized write.

xla: whole pages copied in a loop, one contiguous page at a time (its rows interleaved on the
way; on GPUs no loop), and the other tokens scattered into the block viewed as
[L, slots, C/n, n, D] (a free bitcast; n rows per head: 2 interleaved, 1 packed), each row
apart: no combined [T, C, D] copy. pallas: the kernel on the [L·slots, C, D] view, with
``kv_cache_start`` offset by ``layer · slots``. Both write exactly the slices
:func:`kvshard._device.drop.writable_slices` keeps.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kvshard import quant
from kvshard._device.drop import layer_in_range, token_slots, writable_slices
from kvshard._device.kv_rows import to_rows
from kvshard._device.storage import from_bits, to_bits
from kvshard._geometry.layout import CacheSpec
from kvshard.cache._codec import combine, encode
from kvshard.kernels.update import kv_cache_update

__all__ = ["LOCAL_UPDATES", "SaturationCounts", "count_saturated"]


# --------------------------------------------------------------------------------------------
# Per-device bodies (inside shard_map, on one device's block)
# --------------------------------------------------------------------------------------------


def _local_update_xla(cache, layer, k, v, slices, num, *, spec, options):
    """One device: cache [L, slots, C, D], k/v [T, h, D] (this device's heads, real values)
    -> cache, lowered per platform (:func:`jax.lax.platform_dependent`, so an export for
    several platforms carries each one's): on GPUs every valid token is scattered (XLA's GPU
    scatter ran at the speed of a copy of the same bytes on an H100, and a loop there costs a
    host round trip per iteration); elsewhere whole pages are copied in a loop
    (:func:`_write_rows`)."""
    del options  # the xla body moves the stored bits, whatever they are
    scatter_all = functools.partial(_write_rows, spec=spec, page_copies=False)
    page_copies = functools.partial(_write_rows, spec=spec, page_copies=True)
    return jax.lax.platform_dependent(
        cache, layer, k, v, slices, num, cuda=scatter_all, rocm=scatter_all, default=page_copies
    )


def _write_rows(cache, layer, k, v, slices, num, *, spec, page_copies):
    """:func:`_local_update_xla`'s body: no combined [T, C, D] copy and no encoded copy of
    k/v: the rows (:func:`_encoded_bits`: n of them, K and V interleaved, K|V packed) are
    encoded where they are written, inside the write's fusion.

    ``page_copies``: whole-page slices (a prefill's) are copied page by page with
    ``dynamic_update_slice`` in a loop (XLA's CPU scatter moves one row at a time). Each page
    is one contiguous write of [P, C, D], its rows interleaved by a select fused into the
    copy, rather than each row written apart. The tokens of the other valid slices (a
    decode's; all of them without ``page_copies``) are scattered on the
    [L, slots, C/n, n, D] view (a bitcast), one scatter of [T, C/n, D] per row with
    out-of-bounds slots dropped.

    k/v are encoded slice by slice where they are written, never whole into a temporary
    buffer (which, above glibc's mmap threshold, is a fresh mapping first-touched page by
    page on every call).
    """
    page_size = spec.page_size
    num_layers, num_slots, combined, dim = cache.shape
    num_tokens = k.shape[0]
    n = spec.rows_per_head  # 2 interleaved, 1 packed or latent
    valid = writable_slices(
        slices,
        num,
        layer,
        num_layers=num_layers,
        num_tokens=num_tokens,
        num_slots=num_slots,
        page_size=page_size,
    )
    # A writable slice never crosses a page: a full one starts on a page boundary.
    whole = valid & (slices[2] == page_size) & page_copies
    partial = valid & ~whole
    # A bad layer leaves nothing valid; index layer 0 rather than let a negative layer wrap.
    # Unique, in-bounds-or-dropped indices let XLA scatter in place.
    layer = jnp.where(layer_in_range(layer, num_layers), layer, 0)
    # The [L, slots, C/n, n, D] view writes each row apart, but a size-1 axis in it made XLA's
    # CPU layout assignment copy the whole block in and out (1x8, 8 KV heads: temporaries =
    # the cache), so a block of one interleaved head (C = n) or of packed rows (n = 1) is
    # written as it is, [L, slots, C, D].
    split = n > 1 and combined > n
    heads = cache.reshape(num_layers, num_slots, combined // n, n, dim) if split else cache

    def page_bits(i):
        """The stored bits of slice i's whole page as ``heads`` holds it ([P, C/n, n, D] split,
        else [P, C, D]): the rows interleaved by a select on the row index, all fused into the
        page's copy."""
        parts = _encoded_bits(
            spec,
            cache.dtype,
            k,
            v,
            lambda x: jax.lax.dynamic_slice_in_dim(x, slices[1, i], page_size, axis=0),
        )
        if n == 1:
            return parts[0]
        shape = (page_size, combined // n, n, dim)
        which = jax.lax.broadcasted_iota(jnp.int32, shape, 2)
        page = jnp.broadcast_to(parts[-1][:, :, None], shape)
        for row in reversed(range(n - 1)):
            page = jnp.where(which == row, parts[row][:, :, None], page)
        return page if split else page.reshape(page_size, combined, dim)

    def copy_page(j, heads):
        i = whole_order[j]

        def write(heads):
            start = (layer, slices[0, i]) + (0,) * (heads.ndim - 2)
            return jax.lax.dynamic_update_slice(heads, page_bits(i)[None], start)

        # Always true; the `cond` keeps the page slices inside a branch, where XLA's CPU
        # pipeline leaves them. In the loop body itself it hoists a bf16 slice's float32
        # normalization out of the loop: all of k and v converted (4x their bytes) first.
        return jax.lax.cond(whole[i], write, lambda heads: heads, heads)

    if page_copies and num_tokens >= page_size:  # else no slice can fill a page
        # The loop visits the whole slices only, in order (their indices packed to the front):
        # a decode step, which has none, runs it zero times; a per-slice `cond` had cost
        # every live slice an iteration.
        index = jnp.arange(whole.shape[0], dtype=jnp.int32)
        rank = jnp.where(whole, jnp.cumsum(whole, dtype=jnp.int32) - 1, whole.shape[0] + index)
        whole_order = jnp.zeros_like(index).at[rank].set(index, mode="drop", unique_indices=True)
        num_whole = jnp.sum(whole, dtype=jnp.int32)
        heads = jax.lax.fori_loop(0, num_whole, copy_page, heads)

    def scatter_tokens(heads):
        slots = token_slots(slices, partial, num_tokens, num_slots)
        for which, x in enumerate(_encoded_bits(spec, cache.dtype, k, v, lambda x: x)):
            if split:
                at = heads.at[layer, slots, :, which]
            elif n == 1:  # packed rows: x is [T, C, D]
                at = heads.at[layer, slots]
            else:  # one interleaved head: x is [T, 1, D]
                at, x = heads.at[layer, slots, which], x[:, 0]
            heads = at.set(x, mode="drop", unique_indices=True)
        return heads

    # Skipped when every token went with a whole page (a prefill): on CPU the scatter's source
    # is a bitcast of all of k and v that XLA materialises first (T·C·D elements written and
    # read again), and the tokens' slots (a T-long cumulative sum) are only needed here.
    heads = jax.lax.cond(jnp.any(partial), scatter_tokens, lambda h: h, heads)
    return heads.reshape(cache.shape)


def _encoded_bits(spec, stored, k, v, tokens):
    """The stored bits of the rows of ``tokens(k)``, ``tokens(v)`` (a slice of the tokens):
    :func:`kvshard.cache._codec.encode`, then the bitcast to the storage dtype ``stored``.

    Values that need no conversion (the cache's own float dtype) are bitcast before the slice
    and laid out as bits: a bf16 slice is not float-normalized on CPU through float32 per
    page, and padding or packing bits is exact (zero bits are 0).
    """
    if not spec.quantized and k.dtype == spec.np_dtype and v.dtype == spec.np_dtype:
        return to_rows(spec, tokens(to_bits(k, stored)), tokens(to_bits(v, stored)))
    return tuple(to_bits(row, stored) for row in encode(spec, tokens(k), tokens(v)))


def _local_update_pallas(cache, layer, k, v, slices, num, *, spec, options):
    """One device: the kernel on the [L·slots, C, D] view of the stacked block.

    The reshape is a bitcast, so the kernel's input/output alias still covers the donated
    buffer; offsetting kv_cache_start by ``layer · slots`` selects the layer. The kernel takes
    the logical ``dtype``: a CPU cache storing bf16/fp8 bits (interpret mode) is bitcast to it
    and back, which XLA's CPU backend materialises; on TPU storage is already ``dtype``.
    """
    page_size, dtype, rows = spec.page_size, spec.np_dtype, encode(spec, k, v)
    num_layers, num_slots, heads, dim = cache.shape
    stored = cache.dtype
    flat = from_bits(cache.reshape(num_layers * num_slots, heads, dim), dtype)
    valid = writable_slices(
        slices,
        num,
        layer,
        num_layers=num_layers,
        num_tokens=rows[0].shape[0],
        num_slots=num_slots,
        page_size=page_size,
    )
    # The kernel bounds-checks against all L layers; a slice past this layer's slots (or of a
    # layer out of range) must be dropped here or it would land in another layer.
    slices = jnp.stack([slices[0] + layer * num_slots, slices[1], jnp.where(valid, slices[2], 0)])
    out = kv_cache_update(
        combine(rows),  # the kernel takes the head axis as the cache stores it
        slices,
        flat,
        num,
        page_size=page_size,
        interpret=options.interpret,
        schedule=options.schedule,
    )
    return to_bits(out, stored).reshape(cache.shape)


LOCAL_UPDATES = {"xla": _local_update_xla, "pallas": _local_update_pallas}


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
      v: int32[] the same for V (0 for a latent cache: its one row is counted in ``k``).
    """

    k: jax.Array
    v: jax.Array


def count_saturated(cache, k, v, layer, slices, num, num_slots):
    """int32[2] (K, V) saturated elements of the tokens this step writes, over all devices.

    Inside shard_map: k, v [T, h, D] are this device's heads; the psum adds the other heads and
    page pools, and dividing by r undoes the r devices that each quantize a copy of one head.
    """
    spec: CacheSpec = cache.spec
    if not spec.quantized:
        return jnp.zeros(2, jnp.int32)
    num_tokens = k.shape[0]
    valid = writable_slices(
        slices,
        num,
        layer,
        num_layers=spec.num_cache_layers,
        num_tokens=num_tokens,
        num_slots=num_slots,
        page_size=spec.page_size,
    )
    written = (token_slots(slices, valid, num_tokens, num_slots) < num_slots)[:, None, None]
    counts = jnp.stack(
        [
            jnp.sum(quant.saturated(x, scale, spec.np_dtype) & written, dtype=jnp.int32)
            for x, scale in ((k, spec.k_scale), (v, spec.v_scale))
        ]
    )
    if spec.latent:  # v is k (the latent row is K and V at once): count it once, as K
        counts = counts * jnp.array([1, 0], jnp.int32)
    axes = tuple(a for a in (cache.head_axis, cache.page_axis) if a is not None)
    if axes:
        counts = jax.lax.psum(counts, axes)
    return counts // cache.replication
