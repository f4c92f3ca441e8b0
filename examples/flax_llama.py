"""A flax NNX decoder that serves from a kvshard cache, checked against a dense run.

The template for plugging kvshard into a JAX model (the model code is :mod:`kvshard.models`).
Two modes:

* ``--checkpoint DIR``: a Hugging Face checkpoint from a local folder (config.json and one or
  sharded safetensors files; Llama, Mistral, Qwen2/3, Gemma 1/2/3, gpt-oss with its attention
  sinks, DeepSeek-V3 with its latent attention and routed experts, Bamba's Mamba-2 /
  attention hybrid with its per-request state in the pool's state pages; see docs/models.md),
  weights in the checkpoint's dtype, sharded over the tensor-parallel mesh axis like the
  cache. Serves every prompt of ``--prompts`` (a JSON list of token-id lists) greedily for
  ``--max-new-tokens`` tokens and writes ``--logits-out`` (npz: ``tokens_i`` int32
  [len(prompt_i) + N], ``logits_i`` float32 [len(prompt_i) + N - 1, vocab], row j the logits
  after tokens_i[:j + 1]).
* without it: random weights of the tiny ``flax_llama.json`` (or ``--config``), random requests
  with staggered arrivals.

Either way requests run with continuous batching (chunked prefill mixed with decodes) on a
``--mesh DxM`` of D data-parallel page pools x M tensor-parallel devices: one
:class:`kvshard.PageAllocator` per pool, :func:`kvshard.build_step` per pool stacked with
:func:`kvshard.stack_steps`, one jitted forward per step with the cache donated, each layer
writing with :func:`kvshard.update` and reading with :func:`kvshard.attention` through its own
window. At the end the same weights run densely (no cache) and every served logit must match
them within the dtype's tolerance: exit 1 past it.

    python examples/flax_llama.py --checkpoint DIR --prompts PROMPTS.json --max-new-tokens N \\
        --mesh DxM --logits-out OUT.npz
    python examples/flax_llama.py [--config PATH] [--num-requests 6] [--sliding-window W]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

# Max |paged - dense| logit per compute dtype, relative to max(1, max |dense logit|): float32
# is exact up to summation order; bfloat16/float16 round every activation, so the online
# softmax of paged attention and the dense softmax round differently.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a Hugging Face model folder")
    parser.add_argument("--prompts", type=Path, help="JSON list of prompts (token-id lists)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--logits-out", type=Path, help="npz of tokens_i and logits_i")
    parser.add_argument("--mesh", default="1x2", help="DxM: data-parallel pools x tensor-parallel")
    parser.add_argument("--config", type=Path, default=Path(__file__).with_name("flax_llama.json"))
    parser.add_argument("--num-requests", type=int, default=6)
    parser.add_argument("--sliding-window", type=int, help="override the config's window")
    parser.add_argument("--page-size", type=int, default=8)
    parser.add_argument("--max-seqs", type=int, default=4, help="running requests per pool")
    parser.add_argument("--token-budget", type=int, default=32, help="tokens per step per pool")
    parser.add_argument("--tolerance", type=float, help="default: per dtype (TOLERANCE)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--all-full-cache",
        action="store_true",
        help="store every layer as full attention (no layer groups): the memory baseline",
    )
    args = parser.parse_args(argv)
    found = re.fullmatch(r"(\d+)x(\d+)", args.mesh)
    if not found or min(int(found[1]), int(found[2])) < 1:
        parser.error(f"--mesh {args.mesh!r}: expected DxM with D, M >= 1, e.g. 1x4")
    args.dp, args.tp = int(found[1]), int(found[2])
    if args.checkpoint and not args.prompts:
        parser.error("--checkpoint needs --prompts")
    if args.max_new_tokens < 0:
        parser.error(f"--max-new-tokens {args.max_new_tokens} must be >= 0")
    return args


def read_prompts(path: Path, vocab: int) -> list[list[int]]:
    prompts = json.loads(path.read_text("utf-8"))
    if not isinstance(prompts, list) or not prompts:
        raise SystemExit(f"{path}: expected a non-empty JSON list of prompts")
    for i, p in enumerate(prompts):
        if not isinstance(p, list) or not p or not all(isinstance(t, int) for t in p):
            raise SystemExit(f"{path}: prompt {i} is not a non-empty list of token ids")
        if not all(0 <= t < vocab for t in p):
            raise SystemExit(f"{path}: prompt {i} has a token id outside [0, {vocab})")
    return prompts


def note(message: str) -> None:
    """Progress on stderr (stdout carries the result line)."""
    print(f"flax_llama: {message}", file=sys.stderr, flush=True)


class StepProgress:
    """``models.serve``'s progress callback: a line at most every ``every`` seconds."""

    def __init__(self, num_requests: int, every: float = 5.0) -> None:
        self.num_requests, self.every = num_requests, every
        self.last = time.monotonic()

    def __call__(self, steps: int, finished: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every or finished == self.num_requests:
            self.last = now
            note(f"step {steps}: {finished}/{self.num_requests} requests finished")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    note("importing JAX and flax")
    # Simulated CPU devices for the mesh, set before JAX initialises.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={max(2, args.dp * args.tp)}"
    ).strip()
    import jax
    import numpy as np
    from flax import nnx

    import kvshard
    from kvshard import models

    # Auto axes: XLA places the matmuls around the head-sharded weights and cache (with
    # Explicit axes, splitting an attention output's heads raises ShardingTypeError).
    mesh = jax.make_mesh(
        (args.dp, args.tp), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2
    )
    arch = models.read_architecture(args.checkpoint or args.config)
    try:  # before any weight is read: the heads must split over the tensor-parallel axis
        kvshard.check_tensor_parallel(arch.num_kv_heads, args.tp)
        if arch.num_heads % args.tp:
            raise ValueError(f"num_attention_heads={arch.num_heads} is not a multiple of {args.tp}")
    except ValueError as err:
        raise SystemExit(f"--mesh {args.mesh}: {err}") from None
    if args.checkpoint:
        note(f"loading {args.checkpoint} onto mesh {args.dp}x{args.tp}")
        model = models.load_checkpoint(args.checkpoint, mesh)
        arch = model.arch
        prompts = read_prompts(args.prompts, arch.vocab_size)
        requests = [models.Request(i, list(p), args.max_new_tokens) for i, p in enumerate(prompts)]
    else:
        if args.sliding_window:
            arch = arch.with_window(args.sliding_window)
        note(f"initialising random weights of {args.config.name} on mesh {args.dp}x{args.tp}")
        model = models.shard_model(models.CausalLM(arch, nnx.Rngs(args.seed)), mesh)
        rng = np.random.default_rng(args.seed)
        shape = zip(
            rng.integers(3, 40, args.num_requests),  # prompt lengths
            rng.integers(1, 12, args.num_requests),  # tokens to generate
            rng.integers(0, 8, args.num_requests),  # arrival steps
            strict=True,
        )
        requests = [
            models.Request(i, rng.integers(1, arch.vocab_size, int(n)).tolist(), int(m), int(a))
            for i, (n, m, a) in enumerate(shape)
        ]
    longest = max(len(r.tokens) + r.max_new for r in requests)
    per_pool = -(-len(requests) // args.dp)
    # The cache carries the layers' own attention types (one KV-cache group per type in one
    # pool), so a mixed model's local layers hold only their window's pages.
    spec = models.cache_spec(
        arch,
        page_size=args.page_size,
        longest=longest,
        max_seqs=min(args.max_seqs, per_pool),
        budget=args.token_budget,
        grouped=not args.all_full_cache,
        min_pages=0 if args.checkpoint else 64,
    )
    window = arch.uniform_window if args.all_full_cache else None
    note(f"serving {len(requests)} requests (the first steps compile the model)")
    steps, peak = models.serve(
        model,
        spec,
        mesh,
        requests,
        max_seqs=args.max_seqs,
        budget=args.token_budget,
        window=window,
        progress=StepProgress(len(requests)),
    )

    note("checking every served logit against the dense model (one more compilation)")
    dense = models.dense_logits(model, requests)
    worst = scale = 0.0
    for r, d in zip(requests, dense, strict=True):
        if r.logits:  # none for a one-token prompt with --max-new-tokens 0
            worst = max(worst, float(np.max(np.abs(d - np.stack(r.logits)))))
        scale = max(scale, float(np.max(np.abs(d), initial=0.0)))
    tolerance = args.tolerance if args.tolerance is not None else TOLERANCE[arch.dtype]
    if args.logits_out:
        out = {}
        for i, r in enumerate(requests):
            out[f"tokens_{i}"] = np.asarray(r.tokens, np.int32)
            rows = np.stack(r.logits) if r.logits else np.zeros((0, arch.vocab_size))
            out[f"logits_{i}"] = rows.astype(np.float32)
        np.savez(args.logits_out, **out)
    windows = sorted({str(layer.window) for layer in arch.layers})
    print(
        f"{len(requests)} requests, {steps} steps, {sum(r.computed for r in requests)} tokens "
        f"computed, window {'/'.join(windows)}, at most {peak} pages in use: max |paged - dense| "
        f"logit = {worst:.2e} (tolerance {tolerance:.0e} x {max(1.0, scale):.3g}, {arch.dtype}, "
        f"{arch.model_type}, mesh {args.dp}x{args.tp}); {spec.num_groups} KV-cache group(s) "
        f"of {spec.num_cache_layers} cache layer(s): {peak * spec.num_cache_layers} layer-pages "
        "at the peak"
    )
    return 0 if worst <= tolerance * max(1.0, scale) else 1


if __name__ == "__main__":
    sys.exit(main())
