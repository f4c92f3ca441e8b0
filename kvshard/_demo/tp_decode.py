"""Serves a small GQA transformer with continuous batching on 8 CPU devices, tensor parallel.

The model (random seeded weights; RMSNorm, RoPE, grouped-query attention, SiLU MLP) runs on a
``jax.make_mesh((1, 8), ("data", "model"))`` mesh: query heads and MLP columns are sharded over
"model", and kvshard shards the paged KV cache by KV head over the same axis (replicating KV
heads when there are fewer than 8). Requests with different prompt lengths arrive at different
steps and stop after different numbers of greedy tokens. Every step is one jitted forward over
a flat batch that mixes prefill chunks and decodes:

    allocate_batch -> build_step (token buckets bound the shapes)
    -> per layer: q, k, v -> kvshard.update -> kvshard.attention (each device reads its own
       heads' pages in place) -> logits

and every step's logits are checked against the same model run densely (float64 numpy, no
cache, full causal attention over each request's whole sequence). Exits 1 when the largest
difference exceeds 1e-4.

    kvshard demo [--steps 96] [--num-requests 12] [--kv-heads 2] [--layers 4]
                 [--page-size 16] [--seed 0] [--no-prefix-caching]

(``python -m kvshard demo`` and ``python examples/tp_decode.py`` are the same program.) The
environment variables below are set when this module is imported, before JAX: import it first.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Eight simulated CPU devices; must be set before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("NPROC", "16")  # XLA CPU threads >= devices (interpret mode)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax
import numpy as np

from kvshard._demo.model import (
    TOLERANCE,
    CompileCounter,
    Engine,
    ModelConfig,
    init_params,
    make_mesh,
)
from kvshard._demo.model import make_requests as _make_requests


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=128, help="most scheduler steps to run")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=2, choices=(1, 2, 4, 8))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse cached pages of the prompts' shared system prefix (default: on)",
    )
    parser.add_argument("--max-requests", type=int, default=8, help="concurrent requests")
    parser.add_argument("--max-tokens-per-step", type=int, default=64, help="step token budget")
    parser.add_argument("--num-pages", type=int, default=48, help="cache pages (incl. page 0)")
    parser.add_argument(
        "--tolerance", type=float, default=TOLERANCE, help="max abs logits diff allowed"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    compiles = CompileCounter()
    cfg = ModelConfig(num_layers=args.layers, num_kv_heads=args.kv_heads)
    mesh = make_mesh()
    rng = np.random.default_rng(args.seed)
    params = init_params(cfg, args.seed)

    # Every prompt starts with the same 32-token system prompt (two pages at the default page
    # size), so --prefix-caching has something to find; arrivals are staggered so that the
    # first request has committed those pages before the later ones look them up.
    system_prompt = rng.integers(1, cfg.vocab, 32)
    arrivals = np.sort(rng.integers(0, max(1, args.num_requests * 2), args.num_requests))
    requests = _make_requests(
        rng,
        args.num_requests,
        cfg.vocab,
        system_prompt=system_prompt,
        suffix_len=(3, 48),
        new_tokens=(2, 48),
        arrivals=arrivals,
    )
    max_context = max(len(r.prompt) + r.max_new_tokens for r in requests)
    engine = Engine(
        cfg,
        params,
        mesh,
        page_size=args.page_size,
        num_pages=args.num_pages,
        max_requests=args.max_requests,
        max_context=max_context,
        max_tokens_per_step=args.max_tokens_per_step,
        prefix_caching=args.prefix_caching,
    )
    tp = int(mesh.shape["model"])
    print(
        f"mesh: {dict(mesh.shape)} on {jax.device_count()} x {jax.devices()[0].platform}; "
        f"model: {cfg.num_layers} layers, d_model {cfg.d_model}, {cfg.num_heads} query heads, "
        f"{cfg.num_kv_heads} KV heads (replicated x{engine.spec.replication(tp)} in the cache), "
        f"head_dim {cfg.head_dim}, vocab {cfg.vocab}"
    )
    print(
        f"cache: global {engine.cache.kv.shape}, per device "
        f"{engine.cache.kv.addressable_shards[0].data.shape}, {engine.spec.dtype}; "
        f"{args.num_requests} requests, prompts {min(len(r.prompt) for r in requests)}-"
        f"{max(len(r.prompt) for r in requests)} tokens, token buckets {engine.buckets}"
    )

    stats = engine.run(requests, args.steps, desc="tp_decode")
    finished = sum(r.finished for r in requests)
    prefix = stats.prefix_stats
    page_mib = engine.spec.page_bytes_per_device(tp) * cfg.num_layers / 2**20
    ok = stats.max_abs_diff <= args.tolerance

    print(f"steps:              {stats.steps} ({finished}/{len(requests)} requests finished)")
    print(f"tokens generated:   {stats.tokens_generated} ({stats.tokens_computed} computed)")
    print(
        f"pages used:         peak {stats.peak_pages} of {engine.spec.num_pages - 1} "
        f"({stats.peak_pages * page_mib:.2f} MiB per device)"
    )
    print(f"peak usage:         {stats.peak_usage:.1%}")
    print(
        f"prefix-cache hits:  {prefix['hits']} of {prefix['queries']} prompt tokens "
        f"({'on' if args.prefix_caching else 'off'})"
    )
    print(
        f"compilations:       forward {stats.forward_compiles} "
        f"(buckets used {sorted(stats.buckets_used)}), XLA total {compiles.count}"
    )
    print(f"max abs diff:       {stats.max_abs_diff:.2e} (tolerance {args.tolerance:.0e})")
    print(f"wall time:          {time.perf_counter() - start:.1f} s ({stats.wall_s:.1f} s serving)")
    print("OK" if ok else "FAILED: paged logits differ from the dense model")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
