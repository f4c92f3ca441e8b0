"""Input guards shared by the cache's device operations (:mod:`kvshard.cache`).

Two halves:

* Host side, before anything is traced or donated: :func:`as_int32` accepts concrete metadata
  of any integer dtype, range-checks it against int32 and casts it (so ``np.array([1])``, int64
  on most hosts, works as well as int32), and insists that traced metadata is already int32.
* Inside jit, where nothing can raise: the drop masks (:func:`layer_in_range`,
  :func:`copy_pair_mask`) that make a bad row write nothing, and the opt-in ``checks=True``
  reports (:func:`check_update`, :func:`check_copy_pairs`, :func:`check_gather`): a host
  callback that raises ``ValueError`` naming the bad row, which the runtime re-raises as a
  ``JaxRuntimeError`` carrying that message when the result is used.

Why a host callback rather than :mod:`jax.experimental.checkify`: checkify threads its error
through ``shard_map`` as a per-device array, and a later check with the same payload types
(the next layer's ``update``) then fails to trace ("select cases must have the same shapes",
JAX 0.10), so checkify errors would work for one kvshard call per function only.

The in-jit checks run inside ``shard_map`` on the whole (every group's) metadata, handed to
every device replicated: every device then raises alike. A check on one device only would
leave the others running into a collective or Pallas interpret mode's start barrier, waiting
forever for the failed device.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvshard.kernels.update import slice_is_writable

_INT32 = np.iinfo(np.int32)


def is_traced(x: Any) -> bool:
    """Whether ``x`` is a tracer (its values are unknown on the host)."""
    return isinstance(x, jax.core.Tracer)


def _dtype(x: Any) -> np.dtype:
    """The dtype as given (jnp.result_type would map NumPy int64 to int32 without x64)."""
    return np.dtype(x.dtype) if hasattr(x, "dtype") else jnp.result_type(x)


def as_int32(name: str, x: Any) -> Any:
    """Returns metadata ``x`` as int32: as given when int32 (traced or not), else a host array.

    Concrete ``x`` may have any integer dtype; its values are checked against int32 first, so
    a cast can never wrap a huge id into a valid-looking one. Traced ``x`` must already be
    int32: its values cannot be checked, and a cast inside jit would wrap silently.

    Raises:
      TypeError: ``x`` is not an integer array, or is traced with a dtype other than int32.
      ValueError: a concrete value lies outside int32 (names ``name``, the value, the bound).
    """
    dtype = _dtype(x)
    if is_traced(x):
        if dtype != np.int32:
            raise TypeError(
                f"{name} is traced with dtype {dtype}; traced {name} must be int32 (its values "
                "cannot be range-checked inside jit; cast on the host, before jit)"
            )
        return x
    if not np.issubdtype(dtype, np.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {dtype}")
    if dtype == np.int32 and hasattr(x, "dtype"):
        return x  # nothing to check or cast; a device array stays where it is
    host = np.asarray(x)
    if host.size and dtype.itemsize >= 4 and dtype != np.int32:
        low, high = host.min(), host.max()
        if low < _INT32.min or high > _INT32.max:
            bad = low if low < _INT32.min else high
            raise ValueError(
                f"{name} contains {int(bad)}, outside int32 [{_INT32.min}, {_INT32.max}]"
            )
    return host.astype(np.int32, copy=False)


# --------------------------------------------------------------------------------------------
# Drop masks (inside jit, always on)
# --------------------------------------------------------------------------------------------


def layer_in_range(layer: jax.Array, num_layers: int) -> jax.Array:
    """bool scalar: ``0 <= layer < num_layers``; a traced layer outside it writes nothing and
    reads zeros (indexing would otherwise wrap -1 to the last layer and clamp L to it)."""
    return (layer >= 0) & (layer < num_layers)


def copy_pair_mask(src: jax.Array, dst: jax.Array, num_pages: int) -> jax.Array:
    """bool[K]: pairs ``copy_pages`` performs.

    A pair is performed iff both page ids lie in ``[0, num_pages)``, ``src != dst`` (no-op
    padding), and no other such pair writes the same ``dst``. Out-of-range ids would otherwise
    wrap (negative) or clamp (too large) onto real pages; two pairs writing one page would
    race, so both are dropped rather than letting the scatter pick a winner.
    """
    ok = (src >= 0) & (src < num_pages) & (dst >= 0) & (dst < num_pages) & (src != dst)
    if src.shape[0] < 2:
        return ok
    # Duplicate destinations among the pairs still `ok`: sort, compare neighbours, scatter back.
    key = jnp.where(ok, dst, -1 - jnp.arange(src.shape[0], dtype=dst.dtype))  # unique when not ok
    order = jnp.argsort(key)
    same = key[order][1:] == key[order][:-1]
    dup_sorted = jnp.concatenate([same, jnp.zeros(1, bool)]) | jnp.concatenate(
        [jnp.zeros(1, bool), same]
    )
    dup = jnp.zeros_like(ok).at[order].set(dup_sorted)
    return ok & ~dup


# --------------------------------------------------------------------------------------------
# Opt-in reports (checks=True): a host callback that raises
# --------------------------------------------------------------------------------------------


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


def check_layer(where: str, layer: jax.Array, num_layers: int) -> jax.Array:
    """Reports unless ``0 <= layer < num_layers``; returns an int32 zero (see :func:`_check`)."""
    return _check(
        layer_in_range(layer, num_layers),
        f"{where}: layer={{layer}} is out of range [0, {num_layers})",
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
    bad_count = (count < 0) | (count > size)
    g = _first(bad_count)
    zero = zero + _check(
        ~bad_count.any(),
        f"update: num_slices[{{g}}]={{n}} must be in [0, {size}] (columns of slices)",
        g=g,
        n=count[g],
    )
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
        i = _first(bad)
        zero = zero + _check(
            ~bad.any(),
            f"copy_pages: pairs[{{g}}][{{row}}] has {field} page {{page}}, out of range "
            f"[0, {num_pages})",
            g=i // size,
            row=i % size,
            page=page.reshape(-1)[i],
        )
    kept = jax.vmap(lambda s, d: copy_pair_mask(s, d, num_pages))(src, dst)
    in_range = (src >= 0) & (src < num_pages) & (dst >= 0) & (dst < num_pages)
    dup = in_range & (src != dst) & ~kept
    i = _first(dup)
    zero = zero + _check(
        ~dup.any(),
        "copy_pages: pairs[{g}][{row}] copies to dst page {page}, which another pair also writes",
        g=i // size,
        row=i % size,
        page=dst.reshape(-1)[i],
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
