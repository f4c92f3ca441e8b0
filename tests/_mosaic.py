"""Op counts of the update kernel's lowered Mosaic module, for tests and the docs' kernel page.

``python tests/_mosaic.py`` (from the repository root, ``PYTHONPATH=.``) prints the table the
docs quote: per grid step, for the seed's (vLLM's) schedule and both of kvshard's, at 8 and 64
slices a block. Lowering for TPU runs on any host; nothing here executes a kernel.
"""

from __future__ import annotations

import collections
import functools
import re

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kvshard.kernels import kv_cache_update
from kvshard.kernels.budgets import SCHEDULES


def _seed_schedule_kernel(slices_ref, new_kv_ref, cache_ref, _, scratch, sem):
    """The seed's (vLLM's) schedule as it runs on TPUs, for the op-count baseline: per slice,
    HBM->VMEM, wait all, VMEM->HBM, wait all; no guard."""
    block, width = pl.program_id(0), scratch.shape[0]
    for phase in range(2):
        copies = []
        for i in range(width):
            index = i + block * width
            length = slices_ref[2, index]
            hbm = (
                new_kv_ref.at[pl.ds(slices_ref[1, index], length)]
                if phase == 0
                else cache_ref.at[pl.ds(slices_ref[0, index], length)]
            )
            vmem = scratch.at[i, pl.ds(0, length)]
            src, dst = (hbm, vmem) if phase == 0 else (vmem, hbm)
            copies.append(pltpu.make_async_copy(src, dst, sem))
            copies[-1].start()
        for copy in copies:
            copy.wait()


def _seed_schedule(new_kv, slices, kv_cache, num, *, page_size, block):
    return pl.pallas_call(
        _seed_schedule_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * 2,
            out_specs=pl.BlockSpec(memory_space=pl.ANY),
            grid=((num[0] + block - 1) // block,),
            scratch_shapes=[
                pltpu.VMEM((block, page_size, *kv_cache.shape[1:]), kv_cache.dtype),
                pltpu.SemaphoreType.DMA,
            ],
        ),
        out_shape=jax.ShapeDtypeStruct(kv_cache.shape, kv_cache.dtype),
        input_output_aliases={2: 0},
    )(slices, new_kv, kv_cache)


def mosaic_op_counts(fn, page_size=16, num_slices=128):
    """Counts of each op in the Mosaic module(s) ``fn`` lowers to for TPU (on this CPU host).

    The module is captured as Pallas hands it to Mosaic, before any canonicalization, so
    every constant is counted where the kernel's Python emits it.
    """
    from jax._src.pallas.mosaic import pallas_call_registration as registration

    captured = []
    lower = registration.lowering.lower_jaxpr_to_pipelined_module

    def capture(*args, **kwargs):
        module = lower(*args, **kwargs)
        captured.append(str(module))
        return module

    registration.lowering.lower_jaxpr_to_pipelined_module = capture
    try:
        jax.export.export(jax.jit(fn), platforms=["tpu"])(
            jax.ShapeDtypeStruct((256, 2, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((3, num_slices), jnp.int32),
            jax.ShapeDtypeStruct((page_size * 128, 2, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((1,), jnp.int32),
        )
    finally:
        registration.lowering.lower_jaxpr_to_pipelined_module = lower
    text = "\n".join(captured)
    ops = collections.Counter(
        re.findall(r"^\s*(?:%[\w:#]+(?:, %[\w:#]+)* = )?(\w+\.\w+)", text, re.M)
    )
    ops["arith"] = sum(n for op, n in ops.items() if op.startswith("arith."))
    ops["dma"] = ops["tpu.enqueue_dma"]
    ops["wait"] = ops["tpu.wait_dma"] + ops["tpu.wait_dma2"]
    return ops


def _ours(schedule, block):
    return functools.partial(
        kv_cache_update,
        page_size=16,
        num_slices_per_block=block,
        schedule=schedule,
        interpret=False,
    )


def op_count_table(blocks=(8, 64)):
    """{(name, block): op Counter} for "seed", "direct" and "vmem" at each block size."""
    counts = {}
    for block in blocks:
        seed = functools.partial(_seed_schedule, page_size=16, block=block)
        counts["seed", block] = mosaic_op_counts(seed)
        for schedule in SCHEDULES:
            counts[schedule, block] = mosaic_op_counts(_ours(schedule, block))
    return counts


COLUMNS = ("dma", "wait", "memref.load", "arith", "arith.constant", "scf.if")

if __name__ == "__main__":
    print("per grid step; page 16, 2 combined heads, head_dim 128, bfloat16, 128 slice columns")
    print(f"{'schedule':<8} {'B':>3} " + " ".join(f"{c:>14}" for c in COLUMNS))
    for (name, block), ops in op_count_table().items():
        print(f"{name:<8} {block:>3} " + " ".join(f"{ops[c]:>14}" for c in COLUMNS))
