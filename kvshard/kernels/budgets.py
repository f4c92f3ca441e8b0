"""Host-side budgets of the update kernel that ``jax.export`` cannot check.

``jax.export(..., platforms=["tpu"])`` stops at the Mosaic module: SMEM and VMEM sizing are
checked only by libtpu on a chip (export accepted a 48 MiB ``slices`` operand in SMEM and an
8 GiB VMEM scratch). So the kernel's wrapper sizes its calls and blocks with the numbers here,
on the host, before tracing. Pure Python: no JAX arrays are built.
"""

from __future__ import annotations

from typing import Literal

from kvshard._layout import page_bytes

Schedule = Literal["direct", "vmem"]
SCHEDULES: tuple[str, ...] = ("direct", "vmem")

# Bytes of K/V the kernel may have in flight at once. vLLM tuned its VMEM bounce buffer (one
# block in flight) to 16 MiB on hardware. The direct schedule keeps two blocks in flight, so
# each of its blocks gets half, and the total stays at the tuned 16 MiB rather than 32.
INFLIGHT_BUDGET_BYTES = 16 * 1024 * 1024
# Upper bound on slices per grid step: the per-block loop is unrolled into scalar code, and
# vLLM reports a regression on v6e at 128 slices per block (scalar registers).
MAX_SLICES_PER_BLOCK = 64
# SMEM (scalar memory) per TensorCore, by TPU generation: 1 MiB on each generation Pallas TPU
# targets. Source: JAX's public TPU hardware table, `jax.experimental.pallas.tpu.
# get_tpu_info_for_chip(chip, cores).smem_capacity_bytes` (jax/_src/pallas/mosaic/tpu_info.py,
# "TPU Hardware Reference" on docs.jax.dev); v2/v3 have 16 KiB but are not Pallas targets.
# tests/test_kernel_contract.py::test_smem_constants_match_jax_tpu_table checks these numbers
# against that table.
SMEM_BYTES_PER_CORE = {
    "v4": 1024 * 1024,
    "v5e": 1024 * 1024,
    "v5p": 1024 * 1024,
    "v6e": 1024 * 1024,
    "7x": 1024 * 1024,
}
# Share of SMEM the scalar-prefetch operands may take: Mosaic also keeps its own scalars,
# spills and the grid bookkeeping in SMEM, so half is left to it.
SCALAR_PREFETCH_SMEM_FRACTION = 0.5
_INT32_BYTES = 4


def scalar_prefetch_budget_bytes(generation: str | None = None) -> int:
    """SMEM bytes one call's scalar-prefetch operands may take on ``generation``.

    ``None`` (the default) takes the smallest generation in :data:`SMEM_BYTES_PER_CORE`, safe
    for a kernel exported from a host that does not know which chip will run it.

    Raises:
      ValueError: an unknown generation.
    """
    if generation is None:
        smem = min(SMEM_BYTES_PER_CORE.values())
    elif generation in SMEM_BYTES_PER_CORE:
        smem = SMEM_BYTES_PER_CORE[generation]
    else:
        raise ValueError(f"generation={generation!r} must be one of {sorted(SMEM_BYTES_PER_CORE)}")
    return int(smem * SCALAR_PREFETCH_SMEM_FRACTION)


def max_slices_per_call(num_slices_per_block: int, budget_bytes: int) -> int:
    """Most ``slices`` columns (a multiple of the block) one call may prefetch into SMEM.

    One call holds int32[3, columns] slices in SMEM, plus two words: the dynamic grid bound and
    the direct schedule's int32[1] row carry.

    Raises:
      ValueError: not even one block fits ``budget_bytes``.
    """
    columns = (budget_bytes - 2 * _INT32_BYTES) // (3 * _INT32_BYTES)
    columns -= columns % num_slices_per_block
    if columns < num_slices_per_block:
        raise ValueError(
            f"num_slices_per_block={num_slices_per_block} needs "
            f"{(3 * num_slices_per_block + 2) * _INT32_BYTES} bytes of SMEM for scalar prefetch; "
            f"the budget is {budget_bytes} bytes"
        )
    return columns


def _blocks_in_flight(schedule: str) -> int:
    return 2 if schedule == "direct" else 1


def default_num_slices_per_block(
    page_size: int, combined_heads: int, head_dim: int, dtype, schedule: Schedule = "direct"
) -> int:
    """The peers' block rule, per schedule: ``min(64, prev_pow2(fit))``, at least 1.

    ``fit`` is how many pages fit :data:`INFLIGHT_BUDGET_BYTES` divided by the blocks the
    schedule keeps in flight (2 for ``"direct"``, 1 for ``"vmem"``).
    """
    per_block = INFLIGHT_BUDGET_BYTES // _blocks_in_flight(schedule)
    fit = max(1, per_block // page_bytes(page_size, combined_heads, head_dim, dtype))
    return min(MAX_SLICES_PER_BLOCK, 1 << (fit.bit_length() - 1))


def check_block(block: int, schedule: str, page: int) -> None:
    """An explicit block must keep the bytes in flight within budget (one page always may)."""
    if block < 1:
        raise ValueError(f"num_slices_per_block must be >= 1, got {block}")
    inflight = _blocks_in_flight(schedule) * block * page
    if block > 1 and inflight > INFLIGHT_BUDGET_BYTES:
        raise ValueError(
            f"num_slices_per_block={block} puts {inflight} bytes in flight with "
            f"schedule={schedule!r} ({_blocks_in_flight(schedule)} block(s) of {block} pages of "
            f"{page} bytes); the budget is INFLIGHT_BUDGET_BYTES={INFLIGHT_BUDGET_BYTES}"
        )
    if schedule == "vmem" and page > INFLIGHT_BUDGET_BYTES:
        raise ValueError(
            f"schedule='vmem' needs a VMEM scratch of at least one page ({page} bytes); the "
            f"budget is INFLIGHT_BUDGET_BYTES={INFLIGHT_BUDGET_BYTES}; use schedule='direct'"
        )
