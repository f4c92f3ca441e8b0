"""Pallas TPU kernel that writes new tokens' K/V into a paged KV cache, in place.

A drop-in replacement for vLLM's ``kv_cache_update`` (same arguments, same ``slices``
metadata), with two DMA schedules to choose from (``schedule=``) and a guard.

Guard
-----
The seed's TODO ("check that the slice lengths are <= page_size") is closed: a slice whose
length is not in ``[1, page_size]``, that crosses a page boundary, or whose source or
destination range leaves ``new_kv`` / ``kv_cache`` is **dropped** (written nowhere), and so
are slices at index ``>= num_kv_update_slices[0]`` (padding). No metadata can make the kernel
write outside the rows its slice names. The guard (:func:`slice_is_writable`) runs once per
slice for the whole call, as one vectorized XLA op before the kernel: a dropped slice becomes
``(0, 0, 0)``, a zero-length copy at row 0, which is what the seed kernel does with its own
padding columns on hardware. So the kernel's scalar core only loads three scalars per slice
and computes addresses: no guard arithmetic and no branch (``scf.if``) per slice. Metadata
wider than int32 is range-checked on the host before the int32 cast
(:func:`kvshard.kernels.checks.to_int32_metadata`); ``validate=True`` turns the silent drops
into host-side ``ValueError``s that name the slice, the field and the bound.

Schedules
---------
Per grid step the kernel handles a block of ``B`` slices (the grid covers the live ones).

``"vmem"`` (the seed's schedule, the one vLLM runs on TPUs): per block, ``B`` HBM->VMEM copies
into a ``[B, page_size, C, D]`` scratch, one wait per copy, then ``B`` VMEM->HBM copies, one
wait per copy. One block in flight; ``2B`` DMAs and ``2B`` waits per step.

``"direct"`` (the default): one HBM->HBM copy per slice, no VMEM, pipelined over grid steps:
step ``b`` starts block ``b``'s copies, then waits for block ``b - 1``; the last step also
drains its own block. Each block is waited for **once**, on a single descriptor whose size is
the block's total rows (summed while starting; tpu-inference's fused kernel waits the same
way), so ``B`` DMAs and at most 2 waits per step. The previous block's row count is carried
between steps in a one-word SMEM scratch.

A DMA semaphore wait consumes the byte count of the descriptor waited on; all copies signal
one semaphore, so block ``b - 1``'s wait may be satisfied by bytes of block ``b``. That is
harmless: nothing reads a destination before the kernel returns (destinations of live slices
never overlap in the contract, sources are read-only), and by the last step every started byte
has been waited for. The waits are flow control, not data dependencies.

Hardware status: the ``"vmem"`` schedule is the one vLLM runs on TPU v5e/v6e. The ``"direct"``
schedule's dynamic-length HBM->HBM copies are verified here only in interpret mode and by
Mosaic lowering; no peer is known to run them on a chip. The docs' kernel page says how to A/B
test the two on a TPU.

Budgets export cannot check
---------------------------
``jax.export(..., platforms=["tpu"])`` stops at the Mosaic module; SMEM and VMEM sizing are
checked only by libtpu on a chip. So the wrapper enforces them on the host:

- SMEM: the scalar-prefetch operand (``slices``) of one call, plus the grid bound and the row
  carry, must fit :func:`scalar_prefetch_budget_bytes`; longer ``slices`` are split into
  several calls, each a whole number of blocks.
- Bytes in flight: at most :data:`INFLIGHT_BUDGET_BYTES` (two blocks for ``"direct"``, one
  VMEM scratch for ``"vmem"``); ``num_slices_per_block=None`` sizes blocks to it, and an
  explicit block larger than that raises.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kvshard._device.drop import slice_is_writable
from kvshard._geometry.layout import page_bytes
from kvshard.kernels.budgets import (
    INFLIGHT_BUDGET_BYTES,
    MAX_SLICES_PER_BLOCK,
    SCHEDULES,
    SMEM_BYTES_PER_CORE,
    Schedule,
    check_block,
    default_num_slices_per_block,
    max_slices_per_call,
    scalar_prefetch_budget_bytes,
)
from kvshard.kernels.checks import (
    as_array,
    check_shapes,
    resolve_interpret,
    to_int32_metadata,
    validate_slices,
)

__all__ = [
    "INFLIGHT_BUDGET_BYTES",
    "MAX_SLICES_PER_BLOCK",
    "SCHEDULES",
    "SMEM_BYTES_PER_CORE",
    "Schedule",
    "default_num_slices_per_block",
    "kv_cache_update",
    "max_slices_per_call",
    "scalar_prefetch_budget_bytes",
    "slice_is_writable",
    "validate_slices",
]


def _wait_rows(ref, sem, rows, max_rows: int) -> None:
    """Waits once for ``rows`` rows' bytes on ``sem`` (0 <= rows <= max_rows, dynamic).

    The descriptor is ``ref[0:rows] -> ref[0:rows]``: only its size matters to a wait, so one
    wait covers every copy of a block. A ref shorter than ``max_rows`` (tiny caches) takes a
    few waits of at most its length; the count is static.
    """
    num_rows = ref.shape[0]
    for part in range(-(-max_rows // num_rows)):
        n = jnp.clip(rows - part * num_rows, 0, num_rows)
        pltpu.make_async_copy(ref.at[pl.ds(0, n)], ref.at[pl.ds(0, n)], sem).wait()


def _direct_kernel(
    slices_ref,  # SMEM int32[3, padded]: (kv_cache_start, new_kv_start, slice_len)
    new_kv_hbm_ref,  # HBM [num_tokens, C, D]
    kv_cache_hbm_ref,  # HBM [num_rows, C, D], aliased to the output
    _,  # HBM output, the same buffer as kv_cache_hbm_ref
    rows_ref,  # SMEM int32[1]: valid rows of the previous block, carried between steps
    sem,  # one DMA semaphore for every copy (waits are flow control, see the module doc)
    *,
    page_size: int,
    num_slices_per_block: int,
):
    # The grid covers the live slices; the wrapper's guard zeroed dropped and padding ones.
    block = pl.program_id(0)
    first = block * num_slices_per_block  # hoisted: one multiply per step, not per slice
    rows = jnp.int32(0)
    for i in range(num_slices_per_block):
        index = first + i
        dst, src, length = slices_ref[0, index], slices_ref[1, index], slices_ref[2, index]
        pltpu.make_async_copy(
            new_kv_hbm_ref.at[pl.ds(src, length)], kv_cache_hbm_ref.at[pl.ds(dst, length)], sem
        ).start()
        rows = rows + length
    max_rows = num_slices_per_block * page_size

    @pl.when(block > 0)
    def _wait_previous_block():
        _wait_rows(kv_cache_hbm_ref, sem, rows_ref[0], max_rows)

    @pl.when(block == pl.num_programs(0) - 1)
    def _drain_own_block():
        _wait_rows(kv_cache_hbm_ref, sem, rows, max_rows)

    rows_ref[0] = rows


def _vmem_kernel(
    slices_ref,  # SMEM int32[3, padded]
    new_kv_hbm_ref,  # HBM [num_tokens, C, D]
    kv_cache_hbm_ref,  # HBM [num_rows, C, D], aliased to the output
    _,
    scratch,  # VMEM [B, page_size, C, D]: one page per slice of the block
    sem,
    *,
    page_size: int,
    num_slices_per_block: int,
):
    first = pl.program_id(0) * num_slices_per_block
    # Three SMEM loads per slice, read once and used by both of its copies.
    indices = [first + i for i in range(num_slices_per_block)]
    columns = [(slices_ref[0, j], slices_ref[1, j], slices_ref[2, j]) for j in indices]
    # The seed's bounce, copy for copy: all loads, all their waits, all stores, all their waits.
    loads = [
        pltpu.make_async_copy(
            new_kv_hbm_ref.at[pl.ds(src, length)], scratch.at[i, pl.ds(0, length)], sem
        )
        for i, (_, src, length) in enumerate(columns)
    ]
    for copy in loads:
        copy.start()
    for copy in loads:
        copy.wait()
    stores = [
        pltpu.make_async_copy(
            scratch.at[i, pl.ds(0, length)], kv_cache_hbm_ref.at[pl.ds(dst, length)], sem
        )
        for i, (dst, _, length) in enumerate(columns)
    ]
    for copy in stores:
        copy.start()
    for copy in stores:
        copy.wait()


def _call(schedule, slices, live, new_kv, kv_cache, *, page_size, block, interpret):
    """One pallas_call over int32[3, padded] ``slices`` (padded to a whole block)."""
    kernel, scratch = {
        "direct": (_direct_kernel, pltpu.SMEM((1,), jnp.int32)),
        "vmem": (_vmem_kernel, pltpu.VMEM((block, page_size, *kv_cache.shape[1:]), kv_cache.dtype)),
    }[schedule]
    # At least one grid step, so the direct schedule's drain always runs; `live // block`
    # rounded up, with python ints only (weakly typed, so int32 survives jax_enable_x64).
    num_blocks = jnp.maximum((live[0] + (block - 1)) // block, 1)
    call = pl.pallas_call(
        functools.partial(kernel, page_size=page_size, num_slices_per_block=block),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            in_specs=[pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=pl.BlockSpec(memory_space=pl.ANY),
            grid=(num_blocks,),
            scratch_shapes=[scratch, pltpu.SemaphoreType.DMA],
        ),
        out_shape=jax.ShapeDtypeStruct(kv_cache.shape, kv_cache.dtype),
        # Operand 2 (after the scalar-prefetch slices and new_kv) is the cache.
        input_output_aliases={2: 0},
        # "direct" blocks wait on their predecessor's DMAs and carry its row count, so grid
        # steps must run in order on one core; "vmem" keeps the seed's sequential grid.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=interpret,
    )
    return call(slices, new_kv, kv_cache)


@functools.partial(
    jax.jit, static_argnames=["page_size", "block", "chunk", "schedule", "interpret"]
)
def _kv_cache_update(
    new_kv, slices, kv_cache, num_kv_update_slices, *, page_size, block, chunk, schedule, interpret
):
    num_slices = slices.shape[1]
    # Clamp so neither a negative count nor one past the columns reaches the kernel.
    live = jnp.clip(num_kv_update_slices, 0, num_slices)
    # The guard, once per slice for the whole call, as one vectorized XLA op: a dropped slice
    # (invalid, or padding) becomes (0, 0, 0), a zero-length copy at row 0, as the seed's own
    # padding columns are. The kernel's scalar core then only loads three scalars per slice.
    keep = (jnp.arange(num_slices) < live[0]) & slice_is_writable(
        slices[0],
        slices[1],
        slices[2],
        num_tokens=new_kv.shape[0],
        num_rows=kv_cache.shape[0],
        page_size=page_size,
    )
    slices = jnp.where(keep[None], slices, 0)
    # One call per `chunk` columns keeps each call's scalar prefetch within the SMEM budget.
    for first in range(0, num_slices, chunk):
        columns = slices[:, first : first + chunk]
        width = columns.shape[1]
        padded = -(-width // block) * block
        columns = jnp.pad(columns, ((0, 0), (0, padded - width)))
        kv_cache = _call(
            schedule,
            columns,
            jnp.clip(live - first, 0, width),
            new_kv,
            kv_cache,
            page_size=page_size,
            block=block,
            interpret=interpret,
        )
    return kv_cache


def kv_cache_update(
    new_kv: jax.Array,
    slices: jax.Array,
    kv_cache: jax.Array,
    num_kv_update_slices: jax.Array,
    *,
    page_size: int = 32,
    num_slices_per_block: int | None = None,
    schedule: Schedule = "direct",
    interpret: bool | pltpu.InterpretParams | None = None,
    validate: bool = False,
) -> jax.Array:
    """Writes slices of ``new_kv`` into ``kv_cache`` and returns the updated cache.

    Shapes are per device (the kernel runs on one device's block; ``kvshard.update`` calls it
    inside ``shard_map``).

    Args:
      new_kv: dtype[num_tokens, combined_heads, head_dim], the K/V of the step's tokens (K and V
        interleaved per head); same dtype as ``kv_cache``; head_dim a multiple of 128.
      slices: int32[3, num_slices]; column ``i`` is ``(kv_cache_start, new_kv_start,
        slice_len)`` and copies ``new_kv[new_kv_start : new_kv_start + slice_len]`` to
        ``kv_cache[kv_cache_start : kv_cache_start + slice_len]``. A valid slice has length in
        ``[1, page_size]`` and stays inside one page; invalid ones are dropped (or raise, with
        ``validate``). ``num_slices`` need not be a multiple of the block. Concrete metadata
        may have any integer dtype (range-checked, then cast); traced metadata must be int32.
      kv_cache: dtype[num_pages * page_size, combined_heads, head_dim], dtype one of float32,
        bfloat16, float16, int8, float8_e4m3fn. The output aliases it: to update in place,
        call this inside a ``jax.jit`` that donates the cache (as ``kvshard.update`` does).
      num_kv_update_slices: int[1], the number of live slices; columns at or past it are
        padding and write nothing.
      page_size: rows per page, >= 1 (any value, not only powers of two).
      num_slices_per_block: slices per grid step; ``None`` picks it from the page size and
        schedule (see :func:`default_num_slices_per_block`).
      schedule: ``"direct"`` (HBM->HBM, pipelined, one wait per block) or ``"vmem"`` (the
        seed's VMEM bounce, the schedule vLLM runs on TPUs). See the module doc.
      interpret: ``None`` runs the Mosaic kernel on TPU and Pallas TPU interpret mode
        elsewhere; ``False`` forces Mosaic, ``True`` or an ``InterpretParams`` forces
        interpret mode (exact, slow: for tests on CPU).
      validate: check concrete ``slices`` on the host first (see :func:`validate_slices`);
        raises ``ValueError`` naming the slice, field and bound; the cache is not touched.

    Returns:
      dtype[num_pages * page_size, combined_heads, head_dim], the updated cache.

    Raises:
      TypeError: non-array arguments; metadata not of an integer dtype, or traced and not int32.
      ValueError: shapes, dtypes or head_dim the kernel cannot take; concrete metadata outside
        int32; an unknown schedule; a block over the in-flight budget; or (with ``validate``)
        invalid live slices.
    """
    new_kv, slices, kv_cache, num_kv_update_slices = (
        as_array(name, x)
        for name, x in (
            ("new_kv", new_kv),
            ("slices", slices),
            ("kv_cache", kv_cache),
            ("num_kv_update_slices", num_kv_update_slices),
        )
    )
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} must be one of {SCHEDULES}")
    check_shapes(new_kv, slices, kv_cache, num_kv_update_slices, page_size)
    slices, num_kv_update_slices = to_int32_metadata(slices, num_kv_update_slices)
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
    _, combined_heads, head_dim = kv_cache.shape
    if num_slices_per_block is None:
        num_slices_per_block = default_num_slices_per_block(
            page_size, combined_heads, head_dim, kv_cache.dtype, schedule
        )
    page = page_bytes(page_size, combined_heads, head_dim, kv_cache.dtype)
    check_block(num_slices_per_block, schedule, page)
    chunk = max_slices_per_call(num_slices_per_block, scalar_prefetch_budget_bytes())
    interpret = resolve_interpret(interpret)
    return _kv_cache_update(
        new_kv,
        jnp.asarray(slices),
        kv_cache,
        jnp.asarray(num_kv_update_slices),
        page_size=page_size,
        block=num_slices_per_block,
        chunk=chunk,
        schedule=schedule,
        interpret=interpret,
    )
