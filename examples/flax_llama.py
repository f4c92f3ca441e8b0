"""A Llama decoder in flax NNX that serves from a kvshard cache, checked against a dense run.

The template for plugging kvshard into a JAX model. Shapes come from a Hugging Face config.json
(default: the tiny ``flax_llama.json`` next to this file; weights are random). Each attention
layer writes its K/V with :func:`kvshard.update` and attends through the page table with
:func:`kvshard.attention`; the host runs continuous batching (staggered arrivals, chunked
prefill mixed with decodes) with :class:`kvshard.PageAllocator` and :func:`kvshard.build_step`.
At the end the same model runs densely (no cache, plain causal attention over each whole
sequence) and every logit of the paged run must match it: exit 1 past ``--tolerance``.

The cache is passed explicitly, ``model(tokens, positions, cache, step) -> (logits, cache)``,
not kept in ``nnx`` state: it is donated to ``jit`` every step so that ``kvshard.update``
writes in place (a buffer inside the module's state would be copied or need its own donation
plumbing), it is sharded by KV head independently of the weights, it changes every step while
the weights never do, and one model can serve from several caches (or none: the dense path).

    python examples/flax_llama.py [--config PATH] [--num-requests 6] [--sliding-window W]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Two simulated CPU devices, so the cache really is sharded (one KV head per device).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
).strip()

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kvshard


def rope(x, positions, theta: float):
    """Rotary embedding of x: [T, heads, D] at int32[T] positions (rotate-half convention)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[:, None].astype(jnp.float32) * freqs  # [T, D/2]
    cos, sin = jnp.cos(angles)[:, None], jnp.sin(angles)[:, None]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):
    def __init__(self, cfg: dict, layer: int, window: int | None, rngs: nnx.Rngs):
        d, self.heads, self.kv_heads = (
            cfg["hidden_size"],
            cfg["num_attention_heads"],
            cfg["num_key_value_heads"],
        )
        self.head_dim = cfg.get("head_dim") or d // self.heads
        self.layer, self.window, self.theta = layer, window, cfg["rope_theta"]  # static
        linear = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)
        self.q = linear(d, self.heads * self.head_dim)
        self.k = linear(d, self.kv_heads * self.head_dim)
        self.v = linear(d, self.kv_heads * self.head_dim)
        self.o = linear(self.heads * self.head_dim, d)

    def __call__(self, x, positions, cache, step):
        T, D = x.shape[0], self.head_dim
        q = rope(self.q(x).reshape(T, self.heads, D), positions, self.theta)
        k = rope(self.k(x).reshape(T, self.kv_heads, D), positions, self.theta)
        v = self.v(x).reshape(T, self.kv_heads, D)
        if cache is None:  # dense: x is one whole sequence
            out = dense_attention(q, k, v, self.window)
        else:  # paged: write this step's K/V first, so new tokens also attend to themselves
            cache = kvshard.update(cache, self.layer, k, v, step)
            out = kvshard.attention(
                cache, self.layer, q, step, sm_scale=D**-0.5, sliding_window=self.window
            )
        return self.o(out.reshape(T, -1)), cache


def dense_attention(q, k, v, window):
    """Causal (optionally windowed) grouped-query attention over one sequence: [T, H, D]."""
    T, group = q.shape[0], q.shape[1] // k.shape[1]
    k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
    i, j = jnp.arange(T)[:, None], jnp.arange(T)[None]
    mask = (j <= i) & ((i - j < window) if window else True)
    scores = jnp.einsum("thd,shd->hts", q, k) * q.shape[-1] ** -0.5
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    return jnp.einsum("hts,shd->thd", probs, v)


class Block(nnx.Module):
    def __init__(self, cfg: dict, layer: int, window: int | None, rngs: nnx.Rngs):
        d, f, eps = cfg["hidden_size"], cfg["intermediate_size"], cfg["rms_norm_eps"]
        self.attn_norm = nnx.RMSNorm(d, epsilon=eps, rngs=rngs)
        self.attn = Attention(cfg, layer, window, rngs)
        self.mlp_norm = nnx.RMSNorm(d, epsilon=eps, rngs=rngs)
        self.gate = nnx.Linear(d, f, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(d, f, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(f, d, use_bias=False, rngs=rngs)

    def __call__(self, x, positions, cache, step):
        h, cache = self.attn(self.attn_norm(x), positions, cache, step)
        x = x + h
        h = self.mlp_norm(x)
        return x + self.down(jax.nn.silu(self.gate(h)) * self.up(h)), cache


class Llama(nnx.Module):
    def __init__(self, cfg: dict, window: int | None, rngs: nnx.Rngs):
        d, vocab = cfg["hidden_size"], cfg["vocab_size"]
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.layers = nnx.List(
            [Block(cfg, i, window, rngs) for i in range(cfg["num_hidden_layers"])]
        )
        self.norm = nnx.RMSNorm(d, epsilon=cfg["rms_norm_eps"], rngs=rngs)
        self.lm_head = nnx.Linear(d, vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens, positions, cache=None, step=None):
        """tokens, positions: int32[T] -> (logits float32[T, vocab], cache).

        Paged (``cache`` and ``step`` given): the step's tokens, request by request in the
        order of ``step``. Dense (``cache=None``): one whole sequence, ``positions = 0..T-1``.
        """
        x = self.embed(tokens)
        for block in self.layers:
            x, cache = block(x, positions, cache, step)
        return self.lm_head(self.norm(x)), cache


@nnx.jit(donate_argnums=1)
def forward(model, cache, tokens, positions, step):
    logits, cache = model(tokens, positions, cache, step)
    return logits, cache


@nnx.jit
def dense_forward(model, tokens):
    return model(tokens, jnp.arange(tokens.shape[0], dtype=jnp.int32))[0]


@dataclass
class Request:
    id: int
    tokens: list[int]  # prompt, then generated tokens
    max_new: int
    arrival: int  # first step it may run
    prompt_len: int = 0
    computed: int = 0  # tokens whose K/V is in the cache
    logits: list[np.ndarray] = field(default_factory=list)  # one row per computed token


def serve(model, spec, mesh, requests, *, max_seqs: int, budget: int, window: int | None):
    """Runs every request to completion with continuous batching.

    Returns (steps, most pages in use at once). With a window, the allocator releases each
    request's pages that fell out of it (attention never reads them again).
    """
    longest = max(len(r.tokens) + r.max_new for r in requests)
    alloc = kvshard.PageAllocator(
        spec.num_pages,
        spec.page_size,
        max_requests=max_seqs,
        max_pages_per_request=-(-longest // spec.page_size),
        sliding_window=window,
    )
    cache = kvshard.init_cache(spec, mesh)  # sharded by KV head over "model"
    waiting, running, steps, peak = sorted(requests, key=lambda r: r.arrival), [], 0, 0
    while waiting or running:
        while waiting and waiting[0].arrival <= steps and len(running) < max_seqs:  # admit
            running.append(waiting.pop(0))
        # Schedule: every running request gets its next prompt chunk or one decode token.
        batch, left = [], budget
        for r in running:
            if n := min(len(r.tokens) - r.computed, left):
                batch.append((r, n))
                left -= n
        steps += 1
        if not batch:  # nothing has arrived yet
            continue
        ids, counts = [r.id for r, _ in batch], [n for _, n in batch]
        alloc.allocate_batch(ids, counts)  # grow each request's pages (release out-of-window)
        peak = max(peak, alloc.num_pages - 1 - alloc.num_free_pages)
        # Every step padded to the token budget: one shape, one compilation (a server with a
        # large budget pads to buckets instead: kvshard.token_buckets).
        step = kvshard.build_step(
            alloc, ids, counts, num_tokens_padded=budget, max_num_seqs=max_seqs
        )
        tokens, positions = np.zeros(budget, np.int32), np.zeros(budget, np.int32)
        offset = 0
        for r, n in batch:  # request by request, in the order given to build_step
            tokens[offset : offset + n] = r.tokens[r.computed : r.computed + n]
            positions[offset : offset + n] = np.arange(r.computed, r.computed + n)
            offset += n
        logits, cache = forward(model, cache, tokens, positions, step)
        logits = np.asarray(logits)
        offset = 0
        for r, n in batch:
            r.logits.extend(logits[offset : offset + n])
            r.computed, offset = r.computed + n, offset + n
            if r.computed == len(r.tokens):  # prompt done or decoded: sample greedily
                r.tokens.append(int(np.argmax(r.logits[-1])))
                if len(r.tokens) - r.prompt_len == r.max_new:
                    running.remove(r)
                    alloc.free(r.id)
    return steps, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path(__file__).with_name("flax_llama.json"))
    parser.add_argument("--num-requests", type=int, default=6)
    parser.add_argument("--sliding-window", type=int, help="override the config's window")
    parser.add_argument("--page-size", type=int, default=8)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit diff")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cfg = json.loads(args.config.read_text())
    window = args.sliding_window or kvshard.read_model_config(cfg).sliding_window
    spec = kvshard.CacheSpec.from_config(cfg, page_size=args.page_size, num_pages=64)
    # Auto axes: XLA places the (replicated) weights' matmuls around the head-sharded cache.
    mesh = jax.make_mesh((1, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    model = Llama(cfg, window, nnx.Rngs(args.seed))

    rng = np.random.default_rng(args.seed)
    requests = [
        Request(i, rng.integers(1, cfg["vocab_size"], int(n)).tolist(), int(m), int(a))
        for i, (n, m, a) in enumerate(
            zip(
                rng.integers(3, 40, args.num_requests),  # prompt lengths
                rng.integers(1, 12, args.num_requests),  # tokens to generate
                rng.integers(0, 8, args.num_requests),  # arrival steps
                strict=True,
            )
        )
    ]
    for r in requests:
        r.prompt_len = len(r.tokens)
    steps, peak = serve(model, spec, mesh, requests, max_seqs=4, budget=32, window=window)

    # The same model, densely: each whole sequence at once, padded to one length (causal
    # attention keeps the padding out of the real positions) so it compiles once.
    longest = max(r.computed for r in requests)
    worst = 0.0
    for r in requests:
        tokens = np.zeros(longest, np.int32)
        tokens[: r.computed] = r.tokens[: r.computed]
        dense = np.asarray(dense_forward(model, tokens))[: r.computed]
        worst = max(worst, float(np.max(np.abs(dense - np.stack(r.logits)))))
    print(
        f"{len(requests)} requests, {steps} steps, {sum(r.computed for r in requests)} tokens "
        f"computed, window {window}, at most {peak} pages in use: max |paged - dense| logit = "
        f"{worst:.2e} (tolerance {args.tolerance:.0e})"
    )
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
