"""``copy_pages``: copy whole pages (every layer, every head): the allocator's copy-on-write.

Every device copies the pages of its own block; all copies read the contents from before the
call. Pairs the drop rule refuses (:func:`kvshard._device.drop.copy_pair_mask`) write nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from kvshard._device import reports as _reports
from kvshard._device.arg_checks import check_page_pairs, is_traced
from kvshard._device.drop import copy_pair_mask
from kvshard._device.sharding import place, to_spec
from kvshard.cache._pytree import KVCache, check_cache, with_kv

__all__ = ["copy_pages"]


@functools.partial(jax.jit, donate_argnums=(0,), static_argnames=("checks",))
def _copy_pages_jit(cache, pairs, *, checks=False):
    spec, pa = cache.spec, cache.page_axis
    if pa is None:
        pairs = pairs[None]

    def body(kv, pairs, *whole):
        if whole:  # every device checks all pairs (see kvshard.cache._update)
            _reports.check_copy_pairs(whole[0][..., 0], whole[0][..., 1], spec.num_pages)
        src, dst = pairs[0, :, 0], pairs[0, :, 1]
        # Dropped rows (no-op padding, ids out of range, a destination written twice) write
        # nowhere: an id out of range would otherwise wrap (negative) or clamp onto a real page.
        keep = copy_pair_mask(src, dst, spec.num_pages)
        src, dst = jnp.where(keep, src, 0), jnp.where(keep, dst, spec.num_pages)
        pages = kv.reshape(kv.shape[0], spec.num_pages, spec.page_size, *kv.shape[2:])
        # Gather every source before scattering: all copies read the pre-call contents.
        pages = pages.at[:, dst].set(pages[:, src], mode="drop")
        return pages.reshape(kv.shape)

    specs = (cache.pspec, P(pa, None, None))
    args = [to_spec(cache.mesh, x, s) for x, s in zip((cache.kv, pairs), specs, strict=True)]
    if checks:
        specs = (*specs, P(None, None, None))
        args.append(to_spec(cache.mesh, pairs, P(None, None, None)))
    kv = jax.shard_map(
        body, mesh=cache.mesh, in_specs=specs, out_specs=cache.pspec, check_vma=False
    )(*args)
    return with_kv(cache, kv)


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
    cache = check_cache(cache)
    pooled = cache.page_axis is not None
    pairs, values = check_page_pairs(pairs, pooled, cache.dp)
    if values is not None:
        _check_pairs(values, cache.spec.num_pages)
    spec = P(cache.page_axis) if pooled else P()
    checks = bool(checks) and is_traced(pairs)
    return _copy_pages_jit(cache, place(cache.mesh, pairs, spec), checks=checks)


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
