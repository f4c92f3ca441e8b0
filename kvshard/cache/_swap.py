"""``swap_out`` / ``swap_in``: move whole pages (every layer, every head) between the device
cache and its host tier (:class:`~kvshard.cache._host_cache.HostCache`).

Every device moves the pages of its own block between its device memory and its own host
memory; nothing crosses devices. Each op is three steps inside one executable, per device:

1. gather the K source pages into one contiguous buffer, on the side that holds them;
2. one transfer of that buffer to the other memory (``jax.device_put`` to a memory space
   inside jit: XLA emits the copy of exactly K pages, nothing else crosses the link);
3. scatter it into the destination pages, on the side that holds them (the host-side gather
   and scatter run on the host, :func:`kvshard._device.jax_compat.on_host`).

Both caches are donated, so XLA writes both in place (tests/test_cache_swap.py checks the
compiled module's input/output aliasing and the buffer addresses). The call returns once
dispatched; ordering with later steps comes from JAX itself: executables run on a device in
dispatch order, and a later step that reads the cache takes the swap's output buffer as input,
so it cannot start before the swap wrote it (docs/tiers.md).

Pairs are rows ``(device page, host page)``; which rows are performed is the drop rule's
(:func:`kvshard._device.drop.swap_pair_mask`). Concrete pairs are checked first (nothing is donated
when they are refused).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from kvshard._device import reports as _reports
from kvshard._device.arg_checks import check_page_pairs, is_traced
from kvshard._device.drop import SWAP_PAD, swap_pair_mask
from kvshard._device.jax_compat import on_host
from kvshard._device.sharding import place, to_spec
from kvshard.cache._host_cache import HostCache, check_host, with_host_kv
from kvshard.cache._pytree import KVCache, check_cache, with_kv

__all__ = ["swap_in", "swap_out"]


def _as_pages(kv: jax.Array, page_size: int) -> jax.Array:
    """One device's block [L, pages·page_size, C, D] viewed as [L, pages, page_size, C, D]."""
    return kv.reshape(kv.shape[0], kv.shape[1] // page_size, page_size, *kv.shape[2:])


def _read_pages(kv: jax.Array, pages: jax.Array, page_size: int) -> jax.Array:
    """[L, K, page_size, C, D]: the pages ``pages`` of a block (every id in range)."""
    return _as_pages(kv, page_size)[:, pages]


def _write_pages(kv: jax.Array, pages: jax.Array, values: jax.Array, page_size: int):
    """The block with ``values`` written to ``pages``; ids out of range write nothing."""
    return _as_pages(kv, page_size).at[:, pages].set(values, mode="drop").reshape(kv.shape)


@functools.partial(jax.jit, donate_argnums=(0, 1), static_argnames=("into_host", "checks"))
def _swap_jit(cache, host, pairs, *, into_host, checks=False):
    spec, pa = cache.spec, cache.page_axis
    num_pages, num_host_pages, page_size = spec.num_pages, host.num_host_pages, spec.page_size
    if pa is None:
        pairs = pairs[None]

    def body(kv, host_kv, pairs, *whole):
        if whole:  # every device checks all pairs (see kvshard._device.reports)
            _reports.check_swap_pairs(
                "swap_out" if into_host else "swap_in",
                whole[0][..., 0],
                whole[0][..., 1],
                num_pages=num_pages,
                num_host_pages=num_host_pages,
                into_host=into_host,
            )
        device, hostp = pairs[0, :, 0], pairs[0, :, 1]
        keep = swap_pair_mask(
            device, hostp, num_pages=num_pages, num_host_pages=num_host_pages, into_host=into_host
        )
        # Dropped rows read page 0 (any page in range will do) and write one past the end,
        # which mode="drop" writes nowhere: a negative id would otherwise wrap onto a page.
        # The host side's page ids travel with it (every operand of a host computation
        # lives in host memory).
        if into_host:
            values = _read_pages(kv, jnp.where(keep, device, 0), page_size)
            values, dst = jax.device_put(
                (values, jnp.where(keep, hostp, num_host_pages)), jax.memory.Space.Host
            )
            host_kv = on_host(functools.partial(_write_pages, page_size=page_size))(
                host_kv, dst, values
            )
        else:
            src = jax.device_put(jnp.where(keep, hostp, 0), jax.memory.Space.Host)
            values = on_host(functools.partial(_read_pages, page_size=page_size))(host_kv, src)
            values = jax.device_put(values, jax.memory.Space.Device)
            kv = _write_pages(kv, jnp.where(keep, device, num_pages), values, page_size)
        return kv, host_kv

    specs = (cache.pspec, host.pspec, P(pa, None, None))
    # The host array already has exactly its sharding (init_host_cache, or a swap's output);
    # resharding it here would name device memory and move it.
    args = [
        to_spec(cache.mesh, cache.kv, cache.pspec),
        host.kv,
        to_spec(cache.mesh, pairs, specs[2]),
    ]
    if checks:
        specs = (*specs, P(None, None, None))
        args.append(to_spec(cache.mesh, pairs, P(None, None, None)))
    kv, host_kv = jax.shard_map(
        body,
        mesh=cache.mesh,
        in_specs=specs,
        out_specs=(cache.pspec, host.pspec),
        check_vma=False,
    )(*args)
    return with_kv(cache, kv), with_host_kv(host, host_kv)


def swap_out(
    cache: KVCache, host: HostCache, pairs: jax.Array | np.ndarray, *, checks: bool = False
) -> tuple[KVCache, HostCache]:
    """Copies whole device pages (every layer, every head) into host pages.

    The device pages keep their contents (the allocator decides when to reuse them). Returns
    once dispatched; a later call that reads ``host`` (a :func:`swap_in`) sees the copies.

    Args:
      cache: the device cache; DONATED when called eagerly.
      host: its host tier (:func:`init_host_cache` with the same spec, mesh and axes);
        DONATED when called eagerly.
      pairs: int[K, 2] rows (device page, host page), or int[dp, K, 2] with a page axis
        (pages of the group's own pools). Device pages in [0, spec.num_pages), host pages in
        [0, host.num_host_pages); the host pages of the rows must be distinct. Rows
        ``(-1, -1)`` are padding (usable to pad K to a fixed size): they move nothing. Any
        integer dtype when concrete (cast to int32 after a range check); int32 when traced.
        Traced rows with a page id out of range, and every row of a host page written twice,
        are dropped (move nothing).
      checks: with traced ``pairs``, report the rows that would be dropped as an error
        instead (a host callback raises; see :func:`kvshard.update`). No effect on concrete
        ``pairs``.

    Returns:
      ``(cache, host)``: the device cache (unchanged contents, new buffer handle) and the host
      tier with the copies applied.

    Raises:
      TypeError: ``cache``/``host`` of the wrong type; ``pairs`` not an integer array (or
        traced and not int32).
      ValueError: a donated cache or host tier, one whose layout differs from the other's;
        wrong shape of ``pairs``; a concrete page id out of range or outside int32 (the row,
        the field and the bound are named), or a host page written twice. Nothing is donated.
    """
    return _swap(cache, host, pairs, into_host=True, checks=checks)


def swap_in(
    cache: KVCache, host: HostCache, pairs: jax.Array | np.ndarray, *, checks: bool = False
) -> tuple[KVCache, HostCache]:
    """Copies whole host pages (every layer, every head) into device pages.

    The host pages keep their contents. Returns once dispatched; a later step that reads
    the device pages (:func:`kvshard.attention`, :func:`kvshard.gather`) sees the copies.

    Args:
      cache, host: as for :func:`swap_out` (both DONATED when called eagerly).
      pairs: as for :func:`swap_out`, rows (device page, host page); here the device pages
        are written, so they must be distinct, and a traced device page written twice drops
        every row writing it.
      checks: as for :func:`swap_out`.

    Returns:
      ``(cache, host)``: the device cache with the copies applied, and the host tier
      (unchanged contents, new buffer handle).

    Raises:
      As :func:`swap_out`, with "device page written twice" for the duplicate rule.
    """
    return _swap(cache, host, pairs, into_host=False, checks=checks)


def _swap(cache, host, pairs, *, into_host: bool, checks: bool):
    cache = check_cache(cache)
    host = check_host(host, cache)
    pooled = cache.page_axis is not None
    pairs, values = check_page_pairs(pairs, pooled, cache.dp)
    if values is not None:
        _check_pairs(
            values,
            cache.spec.num_pages,
            host.num_host_pages,
            into_host=into_host,
        )
    spec = P(cache.page_axis) if pooled else P()
    checks = bool(checks) and is_traced(pairs)
    return _swap_jit(
        cache, host, place(cache.mesh, pairs, spec), into_host=into_host, checks=checks
    )


def _check_pairs(groups: np.ndarray, num_pages: int, num_host_pages: int, *, into_host: bool):
    """The eager form of :func:`kvshard._device.drop.swap_pair_mask`: raises on the first row it
    would drop, padding rows excepted."""
    op = "swap_out" if into_host else "swap_in"
    for g, pairs in enumerate(groups):
        padding = (pairs[:, 0] == SWAP_PAD) & (pairs[:, 1] == SWAP_PAD)
        bounds = np.array([num_pages, num_host_pages])
        bad = ~padding[:, None] & ((pairs < 0) | (pairs >= bounds))
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise ValueError(
                f"{op}: pairs row {row} (group {g}) has {('device', 'host')[col]} page "
                f"{pairs[row, col]}, out of range [0, {bounds[col]}) (rows (-1, -1) are padding)"
            )
        col = 1 if into_host else 0
        dst, counts = np.unique(pairs[~padding, col], return_counts=True)
        if (counts > 1).any():
            page = dst[counts > 1][0]
            rows = np.flatnonzero(~padding & (pairs[:, col] == page))
            zeros = (pairs[rows[:2]] == 0).all()
            raise ValueError(
                f"{op}: pairs rows {rows[0]} and {rows[1]} (group {g}) both write "
                f"{('device', 'host')[col]} page {page}"
                + ("; (0, 0) is a pair, not padding: pad pairs with (-1, -1)" if zeros else "")
            )
