"""kvshard's Pallas attention kernel against JAX's bundled one, on one device's block.

Run it on a TPU: it first checks kvshard's kernel (and, on a TPU, JAX's) against the kernel's
jnp reference on a decode step and a prefill chunk, then times each kernel jitted as the
pallas backend calls it (the whole stacked block, the layer offset in the page table). Off a
TPU kvshard's kernel runs in Pallas interpret mode and JAX's cannot run: the check is exact,
the times say nothing about a chip, and the default sizes are tiny. docs/attention.md gives
the HBM bytes and DMAs of both on paper.

Usage::

    python -m kvshard.benchmarks.attention_kernels [--batch 64] [--context 2048]
    kvshard bench --only attention_kernels                     # in the suite, with its JSON

Times are min (median) over ``--repeats`` calls, ms.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any

import numpy as np

from kvshard.benchmarks._common import (
    jax_machine,
    run_parsed,
    step_times_table,
    timed,
    write_report,
)

NAME = "attention_kernels"
TPU_COMMAND = "python -m kvshard.benchmarks.attention_kernels --batch 64 --context 2048"


def settings(on_tpu: bool) -> dict[str, Any]:
    """Chip-sized on a TPU (Llama-3-8B-like, one KV head a device), tiny in interpret mode."""
    return {
        "kv_heads": 1,
        "q_heads": 4,
        "head_dim": 128,
        "page_size": 16 if on_tpu else 4,
        "batch": 64 if on_tpu else 2,
        "context": 2048 if on_tpu else 12,
        "prefill": 2048 if on_tpu else 8,
        "repeats": 20 if on_tpu else 1,
        "dtype": "bfloat16",
    }


def _steps(batch: int, context: int, prefill: int, page_size: int):
    """(name, page_indices, kv_lens, cu_q_lens, num_tokens, num_pages) of a decode step of
    ``batch`` requests at ``context`` tokens, and a prefill chunk of ``prefill`` tokens."""
    per = -(-max(context, prefill) // page_size)
    out = []
    rows = np.arange(batch * per, dtype=np.int32).reshape(batch, per)
    cu = np.arange(batch + 1, dtype=np.int32)
    out.append(("decode", rows, np.full(batch, context, np.int32), cu, batch, batch * per))
    out.append(
        (
            "prefill",
            np.arange(per, dtype=np.int32)[None],
            np.array([prefill], np.int32),
            np.array([0, prefill], np.int32),
            prefill,
            per,
        )
    )
    return out


def run(
    outdir: str,
    *,
    kv_heads: int,
    q_heads: int,
    head_dim: int,
    page_size: int,
    batch: int,
    context: int,
    prefill: int,
    repeats: int,
    dtype: str,
) -> dict[str, Any]:
    """Checks, then times, both kernels on both steps; returns (and writes) the rows.

    Raises:
      RuntimeError: a kernel's output differs from the reference beyond 2e-2 (bfloat16).
    """
    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

    from kvshard.kernels import attention as kernel

    on_tpu = jax.default_backend() == "tpu"
    rng = np.random.default_rng(0)
    machine = jax_machine()
    print(f"## attention kernels: {kv_heads} KV heads, {q_heads} q heads, D={head_dim}, {dtype}")
    print(machine)
    if not on_tpu:
        print("interpret mode: results are checked, times are NOT chip times; JAX's kernel skipped")
    rows = []
    for name, pages, kv_lens, cu_q_lens, num_tokens, num_pages in _steps(
        batch, context, prefill, page_size
    ):
        block = rng.standard_normal((1, num_pages * page_size, 2 * kv_heads, 128))
        kv = jnp.asarray(block, dtype)
        q = jnp.asarray(rng.standard_normal((num_tokens, q_heads, head_dim)), dtype)
        meta = [jnp.asarray(x) for x in (kv_lens, pages, cu_q_lens)]
        num_seqs = jnp.array([pages.shape[0]], jnp.int32)
        statics = {"kv_layout": "interleaved", "page_size": page_size, "sm_scale": head_dim**-0.5}
        args = (q, kv, jnp.int32(0), *meta, num_seqs)
        want = np.asarray(kernel.ref_ragged_paged_attention(*args, **statics), np.float32)
        calls = {"kvshard": jax.jit(functools.partial(kernel.ragged_paged_attention, **statics))}
        if on_tpu:
            q_pad = jnp.pad(q, [(0, 0), (0, 0), (0, 128 - head_dim)])
            pages_view = kv.reshape(num_pages, page_size, 2 * kv_heads, 128)
            jax_args = (q_pad, pages_view, meta[0], meta[1], meta[2], num_seqs)

            def jax_call(*_, jax_args=jax_args):
                return ragged_paged_attention(*jax_args, sm_scale=head_dim**-0.5)[..., :head_dim]

            calls["jax"] = jax.jit(jax_call)
        for kernel_name, call in calls.items():
            got = np.asarray(call(*args), np.float32)
            err = float(np.abs(got[:num_tokens] - want[:num_tokens]).max())
            if not err <= 2e-2:
                raise RuntimeError(f"{name}/{kernel_name}: differs from the reference by {err}")

            def once(call: Any = call, args: tuple[Any, ...] = args) -> None:
                jax.block_until_ready(call(*args))

            best, median = timed(once, max(1, repeats))
            rows.append(
                {
                    "step": name,
                    "kernel": kernel_name,
                    "tokens": num_tokens,
                    "max_abs_err": err,
                    "min_ms": best * 1e3,
                    "median_ms": median * 1e3,
                }
            )
    print(step_times_table(rows, "kernel", "tokens"))
    if not on_tpu:
        print(f"on a TPU VM, compare the kernels with:\n  {TPU_COMMAND}")
    data = {"machine": machine, "on_tpu": on_tpu, "rows": rows}
    return write_report(outdir, NAME, data)


def main(argv: list[str] | None = None) -> int:
    import jax

    defaults = settings(jax.default_backend() == "tpu")
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    for key, value in defaults.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--out", default="bench-results", help="results folder")
    return run_parsed(parser, argv, run)


if __name__ == "__main__":
    sys.exit(main())
