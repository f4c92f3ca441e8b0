"""Host-side budgets of the update kernel that ``jax.export`` cannot check.

``jax.export(..., platforms=["tpu"])`` stops at the Mosaic module: SMEM and VMEM sizing are
checked only by libtpu on a chip (export accepted a 48 MiB ``slices`` operand in SMEM and an
8 GiB VMEM scratch). So the kernel's wrapper sizes its calls and blocks with the numbers here,
on the host, before tracing. Pure Python: no JAX arrays are built.
"""

from __future__ import annotations

from typing import Literal

from kvshard._geometry.layout import page_bytes

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


def _of_generation(table: dict[str, int], generation: str | None) -> int:
    """``table[generation]``; None takes the smallest entry (safe on any chip).

    Raises:
      ValueError: an unknown generation, naming the known ones.
    """
    if generation is None:
        return min(table.values())
    if generation not in table:
        raise ValueError(f"generation={generation!r} must be one of {sorted(table)}")
    return table[generation]


def scalar_prefetch_budget_bytes(generation: str | None = None) -> int:
    """SMEM bytes one call's scalar-prefetch operands may take on ``generation``.

    ``None`` (the default) takes the smallest generation in :data:`SMEM_BYTES_PER_CORE`, safe
    for a kernel exported from a host that does not know which chip will run it.

    Raises:
      ValueError: an unknown generation.
    """
    return int(_of_generation(SMEM_BYTES_PER_CORE, generation) * SCALAR_PREFETCH_SMEM_FRACTION)


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


# --------------------------------------------------------------------------------------------
# The attention kernel (kvshard.kernels.attention)
# --------------------------------------------------------------------------------------------

# VMEM (vector memory) per TensorCore, by TPU generation, from JAX's public TPU hardware table
# (`get_tpu_info_for_chip(chip, 1).vmem_capacity_bytes`, jax/_src/pallas/mosaic/tpu_info.py);
# tests/test_kernel_attention.py checks these numbers against it.
VMEM_BYTES_PER_CORE = {
    "v5e": 128 * 1024 * 1024,
    "v5p": 64 * 1024 * 1024,
    "v6e": 128 * 1024 * 1024,
}
# Mosaic gives a kernel a scoped part of VMEM unless its compiler params ask for more: 16 MiB
# by default on v5e/v5p, 32 MiB on v6e (XLA's default `xla_tpu_scoped_vmem_limit_kib`). The
# attention kernel asks for nothing, so its scratch and temporaries must fit the scoped limit;
# half of it is left to Mosaic's own spills and double-buffered operands.
SCOPED_VMEM_BYTES = {
    "v5e": 16 * 1024 * 1024,
    "v5p": 16 * 1024 * 1024,
    "v6e": 32 * 1024 * 1024,
}
ATTENTION_VMEM_FRACTION = 0.5
# Default query tokens per work item, and the keys one K/V block aims for (whole pages).
ATTENTION_QUERIES_PER_BLOCK = 16
ATTENTION_KEYS_PER_BLOCK = 256
_F32_BYTES = 4


def attention_vmem_budget_bytes(generation: str | None = None) -> int:
    """VMEM bytes the attention kernel's scratch and temporaries may take on ``generation``
    (None: the smallest scoped limit of :data:`SCOPED_VMEM_BYTES`, safe for any chip).

    Raises:
      ValueError: an unknown generation.
    """
    return int(_of_generation(SCOPED_VMEM_BYTES, generation) * ATTENTION_VMEM_FRACTION)


def _lane_padded(n: int) -> int:
    return -(-n // 128) * 128


def attention_vmem_bytes(
    queries_per_block: int,
    kv_pages_per_block: int,
    *,
    page_size: int,
    combined_heads: int,
    padded_head_dim: int,
    dtype,
    q_heads: int,
    head_dim: int,
    q_dtype,
    fused: bool = False,
) -> int:
    """VMEM one attention grid step holds: two K/V page blocks (double buffering), the query
    and output rows of one item, and the float32 temporaries of one KV head (scores and
    probabilities [R, KB], K and V [KB, D], the accumulators [R, D] of every head), lanes
    padded to 128.
    """
    import numpy as np

    rows = queries_per_block * q_heads  # score rows over every KV head: QB·G·H
    keys = kv_pages_per_block * page_size
    page = page_bytes(page_size, combined_heads, padded_head_dim, dtype)
    kv_blocks = 2 * kv_pages_per_block * page
    if fused:  # the new-token rows beside each block, and their int32 flags (lanes padded)
        kv_blocks *= 2
        kv_blocks += 2 * kv_pages_per_block * page_size * 128 * _INT32_BYTES
    qo = 2 * rows * _lane_padded(head_dim) * np.dtype(q_dtype).itemsize
    temps = _F32_BYTES * (
        2 * rows * _lane_padded(keys)  # scores and probabilities (every head: an upper bound)
        + 2 * keys * _lane_padded(head_dim)  # K and V of one head in float32
        + rows * (_lane_padded(head_dim) + 2 * 128)  # acc, max and denominator of every head
    )
    return kv_blocks + qo + temps


def attention_smem_bytes(
    max_num_seqs: int, pages_per_seq: int, num_tokens: int, queries_per_block: int
) -> int:
    """SMEM of the attention kernel's scalar-prefetch operands: the page table, kv_lens, the
    query bounds, the work items int32[3, max_num_seqs + ceil(T / QB)], plus the grid bound."""
    items = max_num_seqs + -(-num_tokens // queries_per_block)
    words = max_num_seqs * pages_per_seq + max_num_seqs + (max_num_seqs + 1) + 3 * items + 1
    return words * _INT32_BYTES


def default_attention_blocks(
    *,
    page_size: int,
    combined_heads: int,
    padded_head_dim: int,
    dtype,
    q_heads: int,
    head_dim: int,
    pages_per_seq: int,
    num_tokens: int,
    q_dtype="float32",
    generation: str | None = None,
    fused: bool = False,
):
    """The attention kernel's :class:`~kvshard.kernels.attention.BlockSizes`: up to
    :data:`ATTENTION_QUERIES_PER_BLOCK` tokens (at most the step's) and pages of about
    :data:`ATTENTION_KEYS_PER_BLOCK` keys (at most a row's), both halved until
    :func:`attention_vmem_bytes` fits :func:`attention_vmem_budget_bytes`."""
    from kvshard.kernels.attention import BlockSizes

    qb = max(1, min(ATTENTION_QUERIES_PER_BLOCK, num_tokens))
    kbp = max(1, min(pages_per_seq, ATTENTION_KEYS_PER_BLOCK // page_size))
    budget = attention_vmem_budget_bytes(generation)

    def fits(qb: int, kbp: int) -> bool:
        need = attention_vmem_bytes(
            qb,
            kbp,
            page_size=page_size,
            combined_heads=combined_heads,
            padded_head_dim=padded_head_dim,
            dtype=dtype,
            q_heads=q_heads,
            head_dim=head_dim,
            q_dtype=q_dtype,
            fused=fused,
        )
        return need <= budget

    while not fits(qb, kbp) and (qb > 1 or kbp > 1):
        if kbp > 1:
            kbp //= 2
        else:
            qb //= 2
    return BlockSizes(queries_per_block=qb, kv_pages_per_block=kbp)
