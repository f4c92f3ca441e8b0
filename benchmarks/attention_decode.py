"""Decode attention: kvshard.attention (per device, in place) vs gather + dense attention.

Both read the same cache on 8 simulated CPU devices (a 1 x 8 mesh, 8 KV heads, one per
device), for a decode step of B requests with C tokens of context each:

* ``kvshard.attention`` (xla backend): each device attends its own query heads over the pages
  of its own KV head, gathering one page per token per loop step;
* ``gather + dense``: ``kvshard.gather`` of every request's C slots (the whole context as a
  global array), then dense attention.

Prints the time per call (median of repeats, side by side in one run), their ratio, and each
compiled executable's temporary bytes per device against the bytes of the pages the step
actually reads per device. Writes JSON to --out.

    python benchmarks/attention_decode.py [--batch 64] [--context 2048] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax
import jax.numpy as jnp
import numpy as np

import kvshard
from kvshard._attention import Statics, _attention_jit
from kvshard.cache import _gather_jit


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="B=16, context 512, 3 repeats")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.context, args.repeats = 16, 512, 3
    return args


def timed(fn, repeats):
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None) -> int:
    args = parse_args(argv)
    mesh = jax.make_mesh((1, 8), ("data", "model"))
    B, C, P, H, Hq, D = args.batch, args.context, args.page_size, 8, 32, 128
    pages_per_seq = C // P
    spec = kvshard.CacheSpec(
        num_layers=1,
        num_kv_heads=H,
        head_dim=D,
        page_size=P,
        num_pages=B * pages_per_seq + 1,
        dtype="float32",
    )
    alloc = kvshard.PageAllocator(
        spec.num_pages, P, max_requests=B, max_pages_per_request=pages_per_seq
    )
    ids = list(range(B))
    alloc.allocate_batch(ids, [C] * B)  # the whole context; the step decodes the last token
    step = kvshard.build_step(alloc, ids, [1] * B, max_num_seqs=B)
    cache = kvshard.init_cache(spec, mesh)
    # Fill the cache with noise (one jitted fill, sharded like the cache).
    fill = jax.jit(
        lambda: jax.random.normal(jax.random.key(0), spec.global_shape(8), jnp.float32),
        out_shardings=cache.sharding,
    )
    cache = cache.__class__(kv=fill(), spec=spec, mesh=mesh, head_axis="model", page_axis=None)
    T = step.num_tokens_padded
    q = jax.device_put(
        jax.random.normal(jax.random.key(1), (T, Hq, D), jnp.float32),
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model", None)),
    )
    step = jax.tree.map(jnp.asarray, step)
    slots = (np.asarray(step.page_indices)[:B, :, None] * P + np.arange(P)).reshape(-1)
    slots = jnp.asarray(slots, jnp.int32)
    layer = jnp.int32(0)
    scale = D**-0.5

    def paged():
        return kvshard.attention(q, cache, layer, step, sm_scale=scale, backend="xla")

    @jax.jit
    def dense(cache, q, slots):
        k, v = _gather_jit(cache, layer, slots)  # [B·C, H, D] each, global
        k, v = (x.reshape(B, C, H, D) for x in (k, v))
        qb = q[:B].reshape(B, H, Hq // H, D)
        s = jnp.einsum("bhgd,bchd->bhgc", qb, k) * scale
        return jnp.einsum("bhgc,bchd->bhgd", jax.nn.softmax(s, axis=-1), v).reshape(B, Hq, D)

    got, want = paged()[:B], dense(cache, q, slots)
    diff = float(jnp.max(jnp.abs(got - want)))

    statics = Statics(spec, float(scale), None, None)
    from jax.sharding import PartitionSpec as Ps

    from kvshard.cache import _place

    mem_paged = (
        _attention_jit.lower(
            cache,
            _place(mesh, np.int32(0), Ps()),
            q,
            step,
            backend="xla",
            statics=statics,
            kernel=None,
        )
        .compile()
        .memory_analysis()
    )
    mem_dense = dense.lower(cache, q, slots).compile().memory_analysis()
    t_paged = timed(paged, args.repeats)
    t_dense = timed(lambda: dense(cache, q, slots), args.repeats)
    read_bytes = B * C * 2 * D * 4  # per device: one KV head's K and V of every context token
    rows = {
        "batch": B,
        "context": C,
        "paged_ms": t_paged * 1e3,
        "dense_ms": t_dense * 1e3,
        "speedup": t_dense / t_paged,
        "paged_temp_bytes": int(mem_paged.temp_size_in_bytes),
        "dense_temp_bytes": int(mem_dense.temp_size_in_bytes),
        "pages_read_bytes_per_device": read_bytes,
        "max_abs_diff": diff,
        "machine": f"{os.cpu_count()} CPU cores, jax {jax.__version__}, 8 simulated devices",
    }
    print(f"decode attention, B={B}, context {C}, 8 KV heads on 1x8 CPU devices")
    print(f"{'':28}{'time/call':>12}{'temp bytes':>14}")
    print(f"{'kvshard.attention (xla)':28}{t_paged * 1e3:>10.1f}ms{rows['paged_temp_bytes']:>14,}")
    print(f"{'gather + dense':28}{t_dense * 1e3:>10.1f}ms{rows['dense_temp_bytes']:>14,}")
    print(f"speed-up {rows['speedup']:.2f}x; pages read per device {read_bytes:,} bytes")
    print(f"max abs diff between the two: {diff:.2e}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention_decode.json").write_text(json.dumps(rows, indent=2))
    return 0 if diff < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
