"""Host-side checks of the update kernel's arguments (shapes, dtypes, metadata values).

Everything here runs in Python before the kernel is traced: it raises clear exceptions that
name the argument, the value and the bound, and never touches the cache. Concrete metadata is
checked with vectorized numpy; traced metadata can only be checked for shape and dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvshard._device.jax_compat import interpret_params
from kvshard._device.memo import ContentMemo, content_key
from kvshard._geometry.int32 import INT32_MAX, INT32_MIN, first_outside_int32
from kvshard._geometry.layout import LANES, SUPPORTED_DTYPES

# Row names of ``slices`` in messages.
SLICE_FIELDS = ("kv_cache_start", "new_kv_start", "slice_len")


def resolve_interpret(interpret):
    """A kernel's ``interpret`` argument as ``pallas_call`` takes it: None -> Pallas TPU
    interpret mode unless JAX's default backend is a TPU, True -> interpret mode, False ->
    Mosaic (also to lower for a TPU from any host), ``InterpretParams`` as given."""
    if interpret is None:
        return None if jax.default_backend() == "tpu" else interpret_params()
    if interpret is True:
        return interpret_params()
    if interpret is False:
        return None
    return interpret


def as_array(name, x):
    """``x`` unchanged if it is an array (or tracer), else as a numpy array; names the argument."""
    if isinstance(x, jax.Array | np.ndarray):
        return x
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be an array, got {type(x).__name__}") from err


def check_shapes(new_kv, slices, kv_cache, num_kv_update_slices, page_size):
    """Raises ``ValueError`` on shapes, dtypes or head_dim the kernel cannot take."""
    if new_kv.ndim != 3:
        raise ValueError(
            f"new_kv must be [num_tokens, combined_heads, head_dim], got shape {new_kv.shape}"
        )
    if kv_cache.ndim != 3:
        raise ValueError(
            "kv_cache must be [num_pages * page_size, combined_heads, head_dim], "
            f"got shape {kv_cache.shape}"
        )
    if new_kv.shape[1:] != kv_cache.shape[1:]:
        raise ValueError(
            "new_kv and kv_cache must agree on (combined_heads, head_dim), "
            f"got {new_kv.shape[1:]} and {kv_cache.shape[1:]}"
        )
    if new_kv.dtype != kv_cache.dtype:
        raise ValueError(
            f"new_kv dtype must equal kv_cache dtype {kv_cache.dtype}, got {new_kv.dtype}"
        )
    if jnp.dtype(kv_cache.dtype).name not in SUPPORTED_DTYPES:
        names = ", ".join(SUPPORTED_DTYPES)
        raise ValueError(f"kv_cache dtype must be one of {names}, got {kv_cache.dtype}")
    head_dim = kv_cache.shape[2]
    if head_dim % LANES:
        raise ValueError(
            f"head_dim must be a multiple of {LANES} (pad it in the cache layout), got {head_dim}"
        )
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    if kv_cache.shape[0] % page_size:
        raise ValueError(
            f"kv_cache rows ({kv_cache.shape[0]}) must be a multiple of page_size ({page_size})"
        )
    if slices.ndim != 2 or slices.shape[0] != 3 or slices.shape[1] < 1:
        raise ValueError(f"slices must be int32[3, num_slices >= 1], got shape {slices.shape}")
    if num_kv_update_slices.shape != (1,):
        raise ValueError(
            f"num_kv_update_slices must be int32[1], got shape {num_kv_update_slices.shape}"
        )


def to_int32_metadata(slices, num_kv_update_slices):
    """(slices, num) as int32, range-checked before the cast when they are concrete.

    The kernel reads int32 scalars from SMEM; a wider integer cast to int32 would wrap silently
    (``2**32 + 8`` becomes row 8), breaking the promise that no metadata writes outside the
    rows its slice names. So concrete metadata of any integer dtype is checked on the host and
    cast only when every value fits; traced metadata must already be int32, since its values
    cannot be seen before the cast.

    Raises:
      TypeError: a non-integer dtype, or a traced (under ``jit``) dtype other than int32.
      ValueError: a concrete value outside int32, naming the slice column and field.
    """
    out = []
    for name, x in (("slices", slices), ("num_kv_update_slices", num_kv_update_slices)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{name} must be an int32 array, got dtype {x.dtype}")
        if x.dtype == jnp.int32:
            out.append(x)
            continue
        if isinstance(x, jax.core.Tracer):
            raise TypeError(
                f"{name} must be int32 under jit, got traced {x.dtype}: its values cannot be "
                "range-checked before the int32 cast; cast (and check) it before entering jit"
            )
        host = np.asarray(x)
        where = first_outside_int32(host)
        if where is not None:
            if name == "slices":
                row, column = where
                label = f"slices[:, {column}]: {SLICE_FIELDS[row]}"
            else:
                label = "num_kv_update_slices[0]:"
            raise ValueError(
                f"{label} {host[where]} must be in int32 range [{INT32_MIN}, {INT32_MAX}]"
            )
        out.append(host.astype(np.int32))
    return tuple(out)


def validate_slices(
    slices,
    num_kv_update_slices,
    *,
    num_tokens: int,
    num_rows: int,
    page_size: int,
    name: str = "slices",
    count_name: str = "num_kv_update_slices",
    allow_empty: bool = False,
    contiguous_sources: bool = True,
    rows_hint: str = "",
) -> None:
    """Host-side checks of concrete ``slices``; raises ``ValueError`` on the first violation.

    Checks every live slice ``i < num_kv_update_slices[0]``: non-negative starts; length in
    ``[1, page_size]`` (``[0, page_size]`` with ``allow_empty``); source inside ``new_kv``
    (``num_tokens`` rows) and destination inside the cache (``num_rows`` rows); no page
    crossing; no two destinations or sources overlapping; and, with ``contiguous_sources``, the
    sources tiling one range of ``new_kv`` without gaps. Vectorized: cheap for thousands of
    slices. Messages read ``{name}[:, i]: <field> <value> must be <bound>``; ``rows_hint`` is
    appended to the cache-overrun message (e.g. to point at another data-parallel pool).

    Slices that passed once with the same bounds are not checked again: an eager loop hands
    every layer the same step. The memo is keyed by their content (:mod:`kvshard._device.memo`), so
    a step mutated in place, or another step, is checked as if new; a failure stores nothing.
    """
    bounds = (num_tokens, num_rows, page_size, name, count_name, allow_empty, contiguous_sources)
    content = content_key(slices, num_kv_update_slices)
    key = None if content is None else (content, *bounds, rows_hint)
    if key is not None and _PASSED.get(key):
        return
    _validate_slices(
        slices,
        num_kv_update_slices,
        num_tokens=num_tokens,
        num_rows=num_rows,
        page_size=page_size,
        name=name,
        count_name=count_name,
        allow_empty=allow_empty,
        contiguous_sources=contiguous_sources,
        rows_hint=rows_hint,
    )
    if key is not None:
        _PASSED.put(key, True)


# Content keys of slices validate_slices has passed (with their bounds).
_PASSED = ContentMemo(maxsize=64)


def _validate_slices(
    slices,
    num_kv_update_slices,
    *,
    num_tokens,
    num_rows,
    page_size,
    name,
    count_name,
    allow_empty,
    contiguous_sources,
    rows_hint,
):
    """:func:`validate_slices` without the memo."""
    slices = np.asarray(slices, dtype=np.int64)
    num = int(np.asarray(num_kv_update_slices).reshape(-1)[0])
    if not 0 <= num <= slices.shape[1]:
        raise ValueError(
            f"{count_name}={num} must be in [0, {slices.shape[1]}] (columns of {name})"
        )
    dst, src, length = slices[:, :num]
    min_length = 0 if allow_empty else 1
    checks = [
        (dst < 0, "kv_cache_start", lambda i: f"{dst[i]} must be >= 0"),
        (src < 0, "new_kv_start", lambda i: f"{src[i]} must be >= 0"),
        (length < min_length, "slice_len", lambda i: f"{length[i]} must be >= {min_length}"),
        (
            length > page_size,
            "slice_len",
            lambda i: f"{length[i]} must be <= page_size {page_size}",
        ),
        (
            src + length > num_tokens,
            "new_kv_start + slice_len",
            lambda i: f"{src[i] + length[i]} must be <= num_tokens {num_tokens}",
        ),
        (
            dst + length > num_rows,
            "kv_cache_start + slice_len",
            lambda i: f"{dst[i] + length[i]} must be <= cache rows {num_rows}{rows_hint}",
        ),
        (
            (length > 0) & (dst % page_size + length > page_size),
            "kv_cache_start",
            lambda i: (
                f"{dst[i]} with slice_len {length[i]} crosses a page boundary "
                f"(page_size {page_size})"
            ),
        ),
    ]
    for bad, field, message in checks:
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{name}[:, {i}]: {field} {message(i)}")
    live = np.flatnonzero(length > 0)  # empty slices (allow_empty) occupy nothing
    _check_intervals(dst, length, live, name, "kv_cache_start", "overlaps the destination of slice")
    _check_intervals(
        src,
        length,
        live,
        name,
        "new_kv_start",
        "overlaps the source of slice",
        tile=contiguous_sources,
    )


def _check_intervals(starts, lengths, live, name, field, overlap_text, *, tile=False):
    """Raises if the sorted live intervals overlap (or, with ``tile``, leave a gap)."""
    if live.size < 2:
        return
    order = live[np.argsort(starts[live], kind="stable")]
    ends = starts[order] + lengths[order]
    nxt = starts[order][1:]
    overlap = nxt < ends[:-1]
    if overlap.any():
        k = int(np.argmax(overlap))
        i, j = int(order[k + 1]), int(order[k])
        raise ValueError(f"{name}[:, {i}]: {field} {starts[i]} {overlap_text} {j}")
    if tile:
        gap = nxt > ends[:-1]
        if gap.any():
            k = int(np.argmax(gap))
            i, j = int(order[k + 1]), int(order[k])
            raise ValueError(
                f"{name}[:, {i}]: {field} {starts[i]} leaves a gap in new_kv after slice {j}, "
                f"which ends at {ends[k]}"
            )
