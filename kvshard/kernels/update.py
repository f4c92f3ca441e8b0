"""Pallas TPU kernel that writes new tokens' K/V into a paged KV cache, in place.

A drop-in replacement for vLLM's ``kv_cache_update`` (same arguments, same ``slices`` metadata),
with three differences that matter on a chip:

DMA schedule
------------
The seed kernel bounces every slice through VMEM: per block of ``B`` slices it starts ``B``
HBM->VMEM copies, waits for all of them, starts ``B`` VMEM->HBM copies, waits for all of them,
and only then lets the next grid step begin. That is ``2B`` DMAs and ``2B`` waits per block, a
VMEM scratch of ``B`` pages, and an idle DMA engine at every wait barrier.

This kernel copies each slice **directly HBM->HBM** (one DMA per slice, no VMEM scratch, no
VMEM budget) and **pipelines across grid steps**: step ``b`` starts the DMAs of block ``b`` and
only then waits for the DMAs of block ``b - 1``; the last step also drains its own block. So
two blocks are in flight at any time and the engine never idles at a barrier::

    step 0:  start(block 0)
    step 1:  start(block 1)  wait(block 0)
    ...
    step n:  start(block n)  wait(block n-1)  wait(block n)

Waiting on a DMA semaphore consumes the byte count of the descriptor waited on; all copies
signal one semaphore, so the waits of block ``b - 1`` may be satisfied by bytes of block ``b``.
That is harmless: nothing reads the destination before the kernel returns (destinations of
distinct slices never overlap and sources are read-only), and by the last step every started
byte has been waited for. The waits are flow control, not data dependencies.

Safety guard
------------
The seed's TODO ("check that the slice lengths are <= page_size") is closed in the kernel: a
slice whose length is not in ``[1, page_size]``, that crosses a page boundary, or whose source
or destination range leaves ``new_kv`` / ``kv_cache`` is **dropped** (written nowhere), so no
metadata can make the kernel write outside the rows the slice names. Slices at index
``>= num_kv_update_slices[0]`` (padding) are dropped too. ``validate=True`` turns those silent
drops into host-side ``ValueError``s that name the slice, the field and the bound.

Block size
----------
``num_slices_per_block=None`` uses the peers' rule: the largest power of two whose pages fit
the in-flight byte budget, capped at :data:`MAX_SLICES_PER_BLOCK` (each block's loop is
unrolled into scalar code; vLLM reports a regression on v6e at 128 slices per block, which it
attributes to scalar registers; not measured here, where no TPU is available).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kvshard._layout import LANES, SUPPORTED_DTYPES, page_bytes

# Bytes of K/V one block of slices may put in flight. vLLM sizes its VMEM bounce buffer with the
# same number; this kernel needs no VMEM but keeps the bound so the DMA queue stays as deep as
# the one tuned on hardware.
INFLIGHT_BUDGET_BYTES = 16 * 1024 * 1024
# Upper bound on slices per grid step: the per-block loop is unrolled into scalar code.
MAX_SLICES_PER_BLOCK = 64


def default_num_slices_per_block(page_size: int, combined_heads: int, head_dim: int, dtype) -> int:
    """The peers' block rule: ``min(64, prev_pow2(budget // page_bytes))``, at least 1."""
    fit = max(1, INFLIGHT_BUDGET_BYTES // page_bytes(page_size, combined_heads, head_dim, dtype))
    return min(MAX_SLICES_PER_BLOCK, 1 << (fit.bit_length() - 1))


def slice_is_writable(dst, src, length, *, num_tokens: int, num_rows: int, page_size: int):
    """The kernel's drop rule: bool (scalar or [S]) of whether a slice may be written.

    True iff ``1 <= length <= page_size``, the source ``[src, src + length)`` lies in
    ``num_tokens`` rows, the destination ``[dst, dst + length)`` in ``num_rows`` rows, and the
    destination stays inside one page. Works on int32 scalars (inside the kernel) and int32[S]
    arrays (the cache's XLA backend applies the same rule, so both backends agree).
    """
    # Written without `dst + length` so a start near INT32_MAX cannot overflow past a bound.
    in_bounds = (
        (length >= 1)
        & (length <= page_size)
        & (src >= 0)
        & (src <= num_tokens - length)
        & (dst >= 0)
        & (dst <= num_rows - length)
    )
    # `dst` is non-negative whenever the remainder matters (in_bounds is false otherwise).
    within_page = jax.lax.rem(jnp.maximum(dst, 0), page_size) <= page_size - length
    return in_bounds & within_page


def _slice_copy(slices_ref, new_kv_hbm_ref, kv_cache_hbm_ref, sem, index, *, page_size):
    """Returns (is_valid, copy descriptor) for slice ``index`` of ``slices_ref``."""
    dst = slices_ref[0, index]
    src = slices_ref[1, index]
    length = slices_ref[2, index]
    valid = slice_is_writable(
        dst,
        src,
        length,
        num_tokens=new_kv_hbm_ref.shape[0],
        num_rows=kv_cache_hbm_ref.shape[0],
        page_size=page_size,
    )
    copy = pltpu.make_async_copy(
        new_kv_hbm_ref.at[pl.ds(src, length)],
        kv_cache_hbm_ref.at[pl.ds(dst, length)],
        sem,
    )
    return valid, copy


def _kernel(
    # Scalar prefetch (SMEM)
    slices_ref,  # int32[3, padded_num_slices]: (kv_cache_start, new_kv_start, slice_len)
    num_slices_ref,  # int32[1]: live slices; later ones are padding
    # Inputs (HBM, memory_space=ANY)
    new_kv_hbm_ref,  # [num_tokens, combined_heads, head_dim]
    kv_cache_hbm_ref,  # [num_rows, combined_heads, head_dim], aliased to the output
    # Output (HBM), the same buffer as kv_cache_hbm_ref
    _,
    # Scratch
    sem,  # one DMA semaphore, signalled by every copy; waits consume bytes, see module doc
    *,
    page_size: int,
    num_slices_per_block: int,
):
    block = pl.program_id(0)
    num_blocks = pl.num_programs(0)
    num_slices = num_slices_ref[0]

    def for_each_valid_slice(block_index, action):
        for i in range(num_slices_per_block):
            index = block_index * num_slices_per_block + i
            valid, copy = _slice_copy(
                slices_ref,
                new_kv_hbm_ref,
                kv_cache_hbm_ref,
                sem,
                # Padding rows past `num_slices` still exist in SMEM (the wrapper pads to a
                # whole block), so this read is in bounds; `index < num_slices` drops them.
                index,
                page_size=page_size,
            )
            pl.when(valid & (index < num_slices))(lambda copy=copy: action(copy))

    for_each_valid_slice(block, lambda copy: copy.start())

    @pl.when(block > 0)
    def _wait_previous_block():
        for_each_valid_slice(block - 1, lambda copy: copy.wait())

    @pl.when(block == num_blocks - 1)
    def _drain_own_block():
        for_each_valid_slice(block, lambda copy: copy.wait())


def _as_array(name, x):
    """``x`` unchanged if it is an array (or tracer), else as a numpy array; names the argument."""
    if isinstance(x, jax.Array | np.ndarray):
        return x
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be an array, got {type(x).__name__}") from err


def _check_shapes(new_kv, slices, kv_cache, num_kv_update_slices, page_size):
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
    if not jnp.issubdtype(slices.dtype, jnp.integer):
        raise ValueError(f"slices must be int32, got dtype {slices.dtype}")
    if num_kv_update_slices.shape != (1,):
        raise ValueError(
            f"num_kv_update_slices must be int32[1], got shape {num_kv_update_slices.shape}"
        )


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
    """
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


def _default_interpret():
    """Interpret mode unless JAX's default backend is a TPU."""
    return None if jax.default_backend() == "tpu" else pltpu.InterpretParams()


@functools.partial(jax.jit, static_argnames=["page_size", "num_slices_per_block", "interpret"])
def _kv_cache_update(
    new_kv, slices, kv_cache, num_kv_update_slices, *, page_size, num_slices_per_block, interpret
):
    num_slices = slices.shape[1]
    padded = -(-num_slices // num_slices_per_block) * num_slices_per_block
    slices = jnp.pad(slices.astype(jnp.int32), ((0, 0), (0, padded - num_slices)))
    # Clamp so neither a negative count nor one past the padded columns reaches the kernel.
    live = jnp.clip(num_kv_update_slices.astype(jnp.int32), 0, num_slices)
    # At least one grid step so the kernel's drain step always runs; zero live slices do nothing.
    num_blocks = jnp.maximum(1, pl.cdiv(live[0], num_slices_per_block))
    kernel = pl.pallas_call(
        functools.partial(_kernel, page_size=page_size, num_slices_per_block=num_slices_per_block),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            in_specs=[pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=pl.BlockSpec(memory_space=pl.ANY),
            grid=(num_blocks,),
            scratch_shapes=[pltpu.SemaphoreType.DMA],
        ),
        out_shape=jax.ShapeDtypeStruct(kv_cache.shape, kv_cache.dtype),
        # Operand 3 (after the two scalar-prefetch operands and new_kv) is the cache.
        input_output_aliases={3: 0},
        # Blocks wait on their predecessor's DMAs, so grid steps must run in order on one core.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=interpret,
    )
    return kernel(slices, live, new_kv, kv_cache)


def kv_cache_update(
    new_kv: jax.Array,
    slices: jax.Array,
    kv_cache: jax.Array,
    num_kv_update_slices: jax.Array,
    *,
    page_size: int = 32,
    num_slices_per_block: int | None = None,
    interpret: bool | pltpu.InterpretParams | None = None,
    validate: bool = False,
) -> jax.Array:
    """Writes slices of ``new_kv`` into ``kv_cache`` and returns the updated cache.

    Args:
      new_kv: dtype[num_tokens, combined_heads, head_dim], the K/V of the step's tokens (K and V
        interleaved per head); same dtype as ``kv_cache``; head_dim a multiple of 128.
      slices: int32[3, num_slices]; column ``i`` is ``(kv_cache_start, new_kv_start,
        slice_len)`` and copies ``new_kv[new_kv_start : new_kv_start + slice_len]`` to
        ``kv_cache[kv_cache_start : kv_cache_start + slice_len]``. A valid slice has length in
        ``[1, page_size]`` and stays inside one page; invalid ones are dropped (or raise, with
        ``validate``). ``num_slices`` need not be a multiple of the block.
      kv_cache: dtype[num_pages * page_size, combined_heads, head_dim], dtype one of float32,
        bfloat16, float16, int8, float8_e4m3fn. The output aliases it: to update in place,
        call this inside a ``jax.jit`` that donates the cache (as ``kvshard.update`` does).
      num_kv_update_slices: int32[1], the number of live slices; columns at or past it are
        padding and write nothing.
      page_size: rows per page, >= 1 (any value, not only powers of two).
      num_slices_per_block: slices per grid step; ``None`` picks it from the page size (see
        :func:`default_num_slices_per_block`).
      interpret: ``None`` runs the Mosaic kernel on TPU and Pallas TPU interpret mode
        elsewhere; ``False`` forces Mosaic, ``True`` or an ``InterpretParams`` forces
        interpret mode (exact, slow: for tests on CPU).
      validate: check concrete ``slices`` on the host first (see :func:`validate_slices`);
        raises ``ValueError`` naming the slice, field and bound; the cache is not touched.

    Returns:
      dtype[num_pages * page_size, combined_heads, head_dim], the updated cache.

    Raises:
      ValueError: on shapes, dtypes or head_dim the kernel cannot take, or (with ``validate``)
        on invalid live slices.
    """
    new_kv, slices, kv_cache, num_kv_update_slices = (
        _as_array(name, x)
        for name, x in (
            ("new_kv", new_kv),
            ("slices", slices),
            ("kv_cache", kv_cache),
            ("num_kv_update_slices", num_kv_update_slices),
        )
    )
    _check_shapes(new_kv, slices, kv_cache, num_kv_update_slices, page_size)
    if validate:
        try:
            host_slices, host_num = np.asarray(slices), np.asarray(num_kv_update_slices)
        except jax.errors.TracerArrayConversionError as err:
            raise ValueError(
                "validate=True needs concrete slices and num_kv_update_slices; "
                "validate on the host before entering jit"
            ) from err
        validate_slices(
            host_slices,
            host_num,
            num_tokens=new_kv.shape[0],
            num_rows=kv_cache.shape[0],
            page_size=page_size,
        )
    if num_slices_per_block is None:
        _, combined_heads, head_dim = kv_cache.shape
        num_slices_per_block = default_num_slices_per_block(
            page_size, combined_heads, head_dim, kv_cache.dtype
        )
    elif num_slices_per_block < 1:
        raise ValueError(f"num_slices_per_block must be >= 1, got {num_slices_per_block}")
    if interpret is None:
        interpret = _default_interpret()
    elif interpret is True:
        interpret = pltpu.InterpretParams()
    elif interpret is False:
        interpret = None
    return _kv_cache_update(
        new_kv,
        jnp.asarray(slices),
        kv_cache,
        jnp.asarray(num_kv_update_slices),
        page_size=page_size,
        num_slices_per_block=num_slices_per_block,
        interpret=interpret,
    )
