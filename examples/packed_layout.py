"""Measures the bytes of a Qwen2-0.5B-shaped cache in both kv_layouts, from the spec and the arrays.

Qwen2-0.5B: 24 layers, 2 KV heads, head_dim 64, bfloat16. "interleaved" stores K and V of a
head in two rows of 128 lanes (half of each page is lane padding); "packed" (the default at
head_dim 64) stores them in one row, K in lanes 0..63 and V in 64..127. For each layout and
tensor-parallel size this allocates the cache (kvshard.init_cache) and prints what the spec
says (CacheSpec.bytes_per_device, the padding per page) next to what the arrays hold (every
device shard's nbytes). The spec counts TPU HBM tiles, whose sublane packing pads the head axis
(bfloat16: to 2 rows); an array's nbytes has no tile padding, so the two agree up to exactly
that padding (CacheSpec.packing_padding_bytes_per_page), which the script checks. It then
writes the same tokens into both layouts and checks that attention (xla backend) reads the
same output from each, bit for bit. Exits 1 on a mismatch.

    python examples/packed_layout.py [--pages 256] [--page-size 16] [--tp 1 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax
import numpy as np

import kvshard

CONFIG = Path(kvshard.__file__).parent / "configs" / "qwen2.5-0.5b.json"


def measure(spec: kvshard.CacheSpec, tp: int) -> dict:
    """Spec numbers and array bytes of ``spec``'s cache on a 1 x tp mesh."""
    mesh = jax.make_mesh((1, tp), ("data", "model"), devices=jax.devices()[:tp])
    cache = kvshard.init_cache(spec, mesh)
    shard_bytes = {s.data.nbytes for s in cache.kv.addressable_shards}
    assert len(shard_bytes) == 1, shard_bytes  # every device holds the same block
    return {
        "kv_layout": spec.kv_layout,
        "tp": tp,
        "shape": list(cache.kv.shape),
        "shard_shape": list(cache.kv.addressable_shards[0].data.shape),
        "spec_bytes_per_device": spec.bytes_per_device(tp),
        "array_bytes_per_device": shard_bytes.pop(),
        "array_bytes_global": cache.kv.nbytes,
        "page_bytes_per_layer": spec.page_bytes_per_device(tp),
        "lane_padding_per_page_layer": spec.lane_padding_bytes_per_page(tp),
        "packing_padding_per_page_layer": spec.packing_padding_bytes_per_page(tp),
    }


def same_attention(packed: kvshard.CacheSpec, tp: int) -> bool:
    """The same K/V written into both layouts: attention reads identical outputs."""
    mesh = jax.make_mesh((1, tp), ("data", "model"), devices=jax.devices()[:tp])
    alloc = kvshard.PageAllocator(
        packed.num_pages, packed.page_size, max_requests=2, max_pages_per_request=8
    )
    ids, counts = [0, 1], [37, 5]
    rows = alloc.allocate_batch(ids, counts)
    step = kvshard.build_step(alloc, ids, counts, rows=rows)
    rng = np.random.default_rng(0)
    tokens, heads, dim = step.num_tokens_padded, packed.num_kv_heads, packed.head_dim
    k, v = (rng.standard_normal((tokens, heads, dim)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((tokens, 14, dim)).astype(np.float32)
    outs = []
    for spec in (packed, dataclasses.replace(packed, kv_layout="interleaved")):
        cache = kvshard.update(kvshard.init_cache(spec, mesh), 3, k, v, step)
        out = kvshard.attention(cache, 3, q, step, sm_scale=dim**-0.5, backend="xla")
        outs.append(np.asarray(out.astype(np.float32)))
    return np.array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=256, help="pages per pool")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    base = kvshard.CacheSpec.from_config(CONFIG, page_size=args.page_size, num_pages=args.pages)
    rows, ok = [], True
    for tp in args.tp:
        for layout in ("interleaved", "packed"):
            row = measure(dataclasses.replace(base, kv_layout=layout), tp)
            tiles = base.num_layers * base.num_pages * row["packing_padding_per_page_layer"]
            ok &= row["spec_bytes_per_device"] - tiles == row["array_bytes_per_device"]
            rows.append(row)
        ok &= same_attention(dataclasses.replace(base, kv_layout="packed"), tp)
    if args.json:
        print(json.dumps(rows, indent=1))
    print(
        f"Qwen2-0.5B-shaped cache: {base.num_layers} layers, {base.num_kv_heads} KV heads, "
        f"head_dim {base.head_dim}, {base.dtype}, {args.pages} pages x {args.page_size} tokens"
    )
    print("| tp | kv_layout | device block | spec bytes/device (TPU tiles) |", end="")
    print(" array nbytes/device | padding/page (spec) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        pad = r["lane_padding_per_page_layer"] + r["packing_padding_per_page_layer"]
        print(
            f"| {r['tp']} | {r['kv_layout']} | {r['shard_shape']} | "
            f"{r['spec_bytes_per_device']:,} | {r['array_bytes_per_device']:,} | "
            f"{pad:,} of {r['page_bytes_per_layer']:,} |"
        )
    for tp in args.tp:
        wide, narrow = (r for r in rows if r["tp"] == tp)
        ratio = wide["array_bytes_per_device"] / narrow["array_bytes_per_device"]
        print(f"tp={tp}: interleaved / packed array bytes = {ratio:.2f}")
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
