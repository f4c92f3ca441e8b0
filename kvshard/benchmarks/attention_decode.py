"""Decode attention: ``kvshard.attention`` (per device, in place) vs ``kvshard.gather`` + dense.

Both read the same cache, 8 KV heads and 32 query heads sharded over the head axis of a 1 x tp
mesh (tp = 8 when the process has 8 devices, as ``python -m kvshard.benchmarks.attention_decode``
arranges on CPU), for a decode step of B requests holding C tokens of context each:

* ``kvshard.attention``: each device attends its own query heads over the pages of its own KV
  heads (the backend ``"auto"`` picks: xla off TPU);
* ``gather + dense``: ``kvshard.gather`` of every request's C slots (the whole context as a
  global array), then dense attention.

Each side is the caller's own ``jax.jit`` around the public call, as a serving loop runs it.
Prints the time per call (median of repeats, side by side in one run), their ratio, and each
compiled executable's temporary bytes per device (``jax.jit(...).lower(...).compile()
.memory_analysis()``) against the bytes of the pages the step reads per device. Checks the two
agree first. Writes ``attention_decode.json`` to ``--out``.

    python -m kvshard.benchmarks.attention_decode [--batch 64] [--context 2048] [--quick]
    kvshard bench --only attention_decode
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kvshard.benchmarks._common import (
    compiled_memory,
    jax_machine,
    one_layer_pool,
    simulate_cpu_devices,
    table,
    timed,
    write_report,
)

NAME = "attention_decode"
KV_HEADS, Q_HEADS, HEAD_DIM = 8, 32, 128
# The two sides sum in different orders; float32 over a few thousand keys agrees far tighter.
TOLERANCE = 1e-3


def _head_axis_size(num_devices: int) -> int:
    """The largest of 8, 4, 2, 1 the devices allow: it divides both head counts."""
    return next(tp for tp in (8, 4, 2, 1) if tp <= num_devices)


def run(
    outdir: str, *, batch: int, context: int, page_size: int = 16, repeats: int = 5
) -> dict[str, Any]:
    """Measures both sides once; returns (and writes) the row."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import kvshard

    if context % page_size:
        raise ValueError(f"context={context} must be a multiple of page_size={page_size}")
    B, C, H, Hq, D = batch, context, KV_HEADS, Q_HEADS, HEAD_DIM
    tp = _head_axis_size(len(jax.devices()))
    mesh = jax.make_mesh((1, tp), ("data", "model"), devices=jax.devices()[:tp])
    pages_per_seq = C // page_size
    # The whole context in the cache; the step decodes the last token.
    spec, alloc = one_layer_pool(B, C, page_size, H, D)
    ids = list(range(B))
    step = kvshard.build_step(alloc, ids, [1] * B, max_num_seqs=B)
    T = step.num_tokens_padded

    # Fill every slot with noise through the public write: one prefill-shaped update of all
    # B·C tokens (k = v = noise), inside the caller's donating jit.
    cache = kvshard.init_cache(spec, mesh)
    fill_alloc = kvshard.PageAllocator(
        spec.num_pages, page_size, max_requests=B, max_pages_per_request=pages_per_seq
    )
    fill_alloc.allocate_batch(ids, [C] * B)
    fill_step = kvshard.build_step(fill_alloc, ids, [C] * B, max_num_seqs=B)
    noise = jax.random.normal(jax.random.key(0), (fill_step.num_tokens_padded, H, D), jnp.float32)
    fill = jax.jit(lambda c, kv, s: kvshard.update(c, 0, kv, kv, s), donate_argnums=0)
    cache = fill(cache, noise, fill_step)

    q = jax.device_put(
        jax.random.normal(jax.random.key(1), (T, Hq, D), jnp.float32),
        NamedSharding(mesh, P(None, "model", None)),
    )
    page_slots = np.asarray(step.page_indices)[:B, :, None] * page_size + np.arange(page_size)
    slots = jnp.asarray(page_slots.reshape(-1), jnp.int32)
    scale = D**-0.5

    paged = jax.jit(lambda cache, q, step: kvshard.attention(cache, 0, q, step, sm_scale=scale))

    @jax.jit
    def dense(cache, q, slots):
        k, v = kvshard.gather(cache, 0, slots)  # [B·C, H, D] each, global
        k, v = (x.reshape(B, C, H, D) for x in (k, v))
        qb = q[:B].reshape(B, H, Hq // H, D)
        s = jnp.einsum("bhgd,bchd->bhgc", qb, k) * scale
        return jnp.einsum("bhgc,bchd->bhgd", jax.nn.softmax(s, axis=-1), v).reshape(B, Hq, D)

    # Compiled once each, ahead of time: the executables timed are the ones measured.
    paged_exe = paged.lower(cache, q, step).compile()
    dense_exe = dense.lower(cache, q, slots).compile()
    got, want = paged_exe(cache, q, step)[:B], dense_exe(cache, q, slots)
    diff = float(jnp.max(jnp.abs(got - want)))
    mem_paged, mem_dense = compiled_memory(paged_exe), compiled_memory(dense_exe)
    t_paged = timed(lambda: jax.block_until_ready(paged_exe(cache, q, step)), repeats)
    t_dense = timed(lambda: jax.block_until_ready(dense_exe(cache, q, slots)), repeats)
    # Per device: the K and V of its H/tp KV heads for every context token.
    read_bytes = B * C * 2 * (H // tp) * D * 4
    row = {
        "batch": B,
        "context": C,
        "mesh": f"1x{tp}",
        "paged_ms": t_paged[1] * 1e3,
        "dense_ms": t_dense[1] * 1e3,
        "speedup": t_dense[1] / t_paged[1],
        "paged_temp_bytes": int(mem_paged.temp_size_in_bytes),
        "dense_temp_bytes": int(mem_dense.temp_size_in_bytes),
        "pages_read_bytes_per_device": read_bytes,
        "max_abs_diff": diff,
        "machine": jax_machine(),
    }
    print(f"## attention decode: B={B}, context {C}, {H} KV heads on a 1x{tp} mesh")
    print(f"{row['machine']}; median of {repeats} calls\n")
    print(
        table(
            ("", "time/call ms", "temp bytes/device"),
            [
                ("kvshard.attention", f"{row['paged_ms']:.1f}", f"{row['paged_temp_bytes']:,}"),
                ("gather + dense", f"{row['dense_ms']:.1f}", f"{row['dense_temp_bytes']:,}"),
            ],
            first_width=20,
        )
    )
    print(f"speed-up {row['speedup']:.2f}x; pages read per device {read_bytes:,} bytes")
    print(f"max abs diff between the two: {diff:.2e}")
    if not diff < TOLERANCE:
        raise RuntimeError(f"kvshard.attention and gather + dense differ by {diff:.2e}")
    return write_report(outdir, NAME, row)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="B=16, context 512, 3 repeats")
    parser.add_argument("--out", default="bench-results", help="results folder")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.context, args.repeats = 16, 512, 3
    run(
        args.out,
        batch=args.batch,
        context=args.context,
        page_size=args.page_size,
        repeats=args.repeats,
    )
    return 0


if __name__ == "__main__":
    simulate_cpu_devices(8)
    sys.exit(main())
