"""The TPU update kernel on paper: DMAs, semaphore waits and bytes per step, by the rules.

No TPU is needed: the counts follow from the slices (built by :func:`kvshard.build_update_slices`
for a decode and a prefill batch) and from each schedule's rules, stated here so that they can
be checked against the kernels' code:

- **seed** (vLLM's ``kv_cache_update``; kvshard's ``schedule="vmem"`` is the same bounce):
  grid = ceil(S / B) steps over the S live slices (the last block padded with zero-length
  slices); per step, B HBM->VMEM DMAs, B waits, B VMEM->HBM DMAs, B waits. Every slice's rows
  cross HBM twice (read new_kv, write cache) and VMEM twice. One block in flight.
- **kvshard direct** (``schedule="direct"``): grid = max(1, ceil(S / B)); per step, B HBM->HBM
  DMAs (zero-length for padding), then one wait for the previous block (steps >= 1) on a
  descriptor of that block's total rows, plus one wait draining its own block at the last
  step: grid waits in all. No VMEM. Two blocks in flight.
- **B** (both): ``min(64, prev_pow2(budget / page_bytes))`` with a 16 MiB in-flight budget,
  divided by the blocks in flight (1 for the seed/vmem, 2 for direct): vLLM's
  ``_get_num_slices_per_kv_cache_update_block`` for the seed.

Bytes per row = combined heads x head_dim x itemsize (the page's bytes / page_size with the
dtype's sublane packing). Context for reading the table: vLLM's kernel moved about 92 GB/s on a
v6e (1.6 TB/s HBM), so the update is bound by DMA count and latency, not bandwidth.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvshard._geometry.layout import page_bytes
from kvshard.benchmarks._common import bar_plot, machine, table, write_json, wrote
from kvshard.benchmarks.update_schedules import TPU_COMMAND
from kvshard.metadata import build_update_slices

NAME = "tpu_schedule"
BUDGET = 16 * 2**20
MAX_BLOCK = 64


def block_size(page: int, blocks_in_flight: int) -> int:
    fit = max(1, BUDGET // blocks_in_flight // page)
    return min(MAX_BLOCK, 1 << (fit.bit_length() - 1))


def counts(slice_lens: np.ndarray, row_bytes: int, page: int) -> dict[str, dict[str, float]]:
    """Per-schedule totals for one call writing slices of ``slice_lens`` rows."""
    live = len(slice_lens)
    rows = int(slice_lens.sum())
    out = {}
    for name, in_flight in (("seed / vmem", 1), ("kvshard direct", 2)):
        b = block_size(page, in_flight)
        grid = max(1, -(-live // b))
        if in_flight == 1:
            dmas, waits, vmem = 2 * b * grid, 2 * b * grid, 2 * rows * row_bytes
        else:
            dmas, waits, vmem = b * grid, grid, 0
        out[name] = {
            "block": b,
            "grid_steps": grid,
            "dmas": dmas,
            "nonempty_dmas": (2 if in_flight == 1 else 1) * int((slice_lens > 0).sum()),
            "waits": waits,
            "hbm_bytes": 2 * rows * row_bytes,
            "vmem_bytes": vmem,
            "dmas_per_step": dmas / grid,
            "waits_per_step": waits / grid,
        }
    return out


def scenario(kind: str, rng: np.random.Generator, page_size: int) -> np.ndarray:
    """Slice lengths of one step: decode of 256 requests, or 4 prefills of 2,048 tokens."""
    if kind.startswith("decode"):
        batch, new = 256, np.ones(256, np.int64)
        computed = rng.integers(100, 4000, batch)
    else:
        batch, new = 4, np.full(4, 2048)
        computed = rng.integers(0, 100, batch)  # chunked prefill: some tokens already cached
    total = computed + new
    pages = -(-total // page_size)
    table_ = np.zeros((batch, int(pages.max())), np.int32)
    for i, n in enumerate(pages):
        table_[i, :n] = 1 + np.arange(n) + i * pages.max()
    slices = build_update_slices(computed, new, table_, page_size)
    return np.asarray(slices[2])


def run(outdir: str) -> dict[str, Any]:
    page_size, combined, head_dim, dtype = 16, 16, 128, "bfloat16"
    page = page_bytes(page_size, combined, head_dim, dtype)
    row = page // page_size
    rng = np.random.default_rng(0)
    rows: list[tuple] = []
    scenarios: dict[str, Any] = {}
    data = {"machine": machine(), "page_bytes": page, "scenarios": scenarios}
    for kind in ("decode 256 x 1 token", "prefill 4 x 2048 tokens"):
        lens = scenario(kind, rng, page_size)
        res = counts(lens, row, page)
        scenarios[kind] = {"slices": len(lens), "rows": int(lens.sum()), **res}
        for name, r in res.items():
            rows.append(
                (
                    f"{kind}: {name}",
                    len(lens),
                    r["block"],
                    r["grid_steps"],
                    r["dmas"],
                    r["waits"],
                    f"{r['dmas_per_step']:.0f}",
                    f"{r['waits_per_step']:.0f}",
                    f"{r['hbm_bytes'] / 2**20:.2f}",
                    f"{r['vmem_bytes'] / 2**20:.2f}",
                )
            )
    print(
        f"## TPU update kernel on paper (page_size {page_size}, {combined} combined heads, "
        f"head_dim {head_dim}, {dtype}: {page // 1024} KiB pages)\n"
    )
    print(
        table(
            (
                "step: schedule",
                "slices",
                "B",
                "steps",
                "DMAs",
                "waits",
                "DMA/step",
                "wait/step",
                "HBM MiB",
                "VMEM MiB",
            ),
            rows,
            first_width=42,
        )
    )
    write_json(outdir, NAME, data)
    labels = [r[0].replace(": ", "\n") for r in rows]
    png = bar_plot(
        outdir,
        NAME,
        "TPU update kernel on paper: DMAs and semaphore waits per call",
        labels,
        {"DMAs": [r[4] for r in rows], "waits": [r[5] for r in rows]},
        "count",
    )
    print(
        "\nOn a TPU VM, A/B-test the two schedules on the chip (both are checked against the "
        f"oracle first):\n  {TPU_COMMAND}"
    )
    print("\n" + wrote(f"{outdir}/{NAME}.json", png))
    return data
