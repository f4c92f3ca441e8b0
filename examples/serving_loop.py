"""A complete data-parallel x tensor-parallel serving loop on a 2 x 4 mesh, checked densely.

The loop of docs/guides/serving-loop.md, runnable: two page pools (the mesh's "data" axis),
each with its own :class:`kvshard.PageAllocator`; KV heads sharded over "model". Every step

    allocate_batch -> take_pending_copies -> build_step   (per pool, on the host)
    stack_steps, pad the copy pairs to one length         (one [dp, ...] step)
    forward(params, cache, tokens, step, pairs)           (ONE jit, cache donated):
        copy_pages, then per layer update -> attention -> row-parallel output projection

Pool 1 is idle on the step where pool 0 forks a request (its step holds no request; its
copy list is all no-op padding), and the fork makes both children write into a shared
partial page, so the step carries copy-on-write pairs. The served logits of every request are
compared with the same model run densely on its whole sequence (float64 numpy); the script
exits 1 past 1e-4.

    python examples/serving_loop.py
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import kvshard

VOCAB, D_MODEL, LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM = 128, 64, 2, 8, 4, 32
PAGE, PAGES, TOKENS, SEQS = 4, 32, 16, 8
TOLERANCE = 1e-4

# Auto axes: with jax.make_mesh's default on jax 0.10 (Explicit axes), contracting the
# head-sharded attention output in the output projection fails inside JAX with
# ShardingTypeError; under Auto axes XLA inserts the all-reduce over "model" itself.
mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def init_params(seed: int = 0) -> dict:
    """Random weights, sharded as the cache is: heads over "model" (q/k/v column-parallel,
    the output projection row-parallel), everything else replicated."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
    heads = NamedSharding(mesh, P(None, "model", None))
    rows = NamedSharding(mesh, P("model", None, None))
    layers = [
        {
            "wq": jax.device_put(normal(D_MODEL, Q_HEADS, HEAD_DIM), heads),
            "wk": jax.device_put(normal(D_MODEL, KV_HEADS, HEAD_DIM), heads),
            "wv": jax.device_put(normal(D_MODEL, KV_HEADS, HEAD_DIM), heads),
            "wo": jax.device_put(normal(Q_HEADS, HEAD_DIM, D_MODEL), rows),
        }
        for _ in range(LAYERS)
    ]
    return {
        "embed": normal(VOCAB, D_MODEL) * 2,
        "unembed": normal(D_MODEL, VOCAB),
        "layers": layers,
    }


def rope(x, positions):
    """Rotary embedding of x [..., T, heads, D] at int positions [..., T] (numpy or jnp)."""
    xp = jnp if isinstance(x, jax.Array) else np
    freq = 10_000.0 ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    angle = positions[..., None, None] * freq
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = xp.cos(angle), xp.sin(angle)
    return xp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x.shape)


def forward(params, cache, tokens, step, pairs):
    """One step of every pool: tokens int32[dp, T] -> (cache, logits float32[dp, T, VOCAB])."""
    cache = kvshard.copy_pages(cache, pairs)  # copy-on-write before this step's writes
    x = params["embed"][tokens]
    for layer, w in enumerate(params["layers"]):
        q = rope(jnp.einsum("gtd,dhk->gthk", x, w["wq"]), step.positions)
        k = rope(jnp.einsum("gtd,dhk->gthk", x, w["wk"]), step.positions)
        v = jnp.einsum("gtd,dhk->gthk", x, w["wv"])
        cache = kvshard.update(cache, layer, k, v, step)
        out = kvshard.attention(cache, layer, q, step, sm_scale=HEAD_DIM**-0.5)
        x = x + jnp.einsum("gthk,hkd->gtd", out, w["wo"])  # row-parallel: psum over "model"
    return cache, x @ params["unembed"]


def dense_logits(params, tokens: list[int]) -> np.ndarray:
    """The same model on a whole sequence, no cache, float64: logits [len(tokens), VOCAB]."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = p["embed"][tokens]
    pos = np.arange(len(tokens))
    causal = np.tril(np.ones((len(tokens), len(tokens)), bool))
    group = Q_HEADS // KV_HEADS
    for w in p["layers"]:
        q = rope(np.einsum("td,dhk->thk", x, w["wq"]), pos)
        k = np.repeat(rope(np.einsum("td,dhk->thk", x, w["wk"]), pos), group, axis=1)
        v = np.repeat(np.einsum("td,dhk->thk", x, w["wv"]), group, axis=1)
        s = np.where(causal[None], np.einsum("qhk,shk->hqs", q, k) * HEAD_DIM**-0.5, -np.inf)
        prob = np.exp(s - s.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        x = x + np.einsum("hqs,shk,hkd->qd", prob, v, w["wo"])
    return x @ p["unembed"]


def pad_pairs(per_pool: list[np.ndarray]) -> np.ndarray:
    """Each pool's copy pairs padded to one length with no-op rows (src == dst): [dp, K, 2]."""
    width = max(1, *(len(p) for p in per_pool))
    return np.stack(
        [np.concatenate([p, np.zeros((width - len(p), 2), np.int32)]) for p in per_pool]
    )


def main() -> int:
    params = init_params()
    spec = kvshard.CacheSpec(
        num_layers=LAYERS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        page_size=PAGE,
        num_pages=PAGES,
        dtype="float32",
    )
    cache = kvshard.init_cache(spec, mesh, head_axis="model", page_axis="data")
    allocs = [
        kvshard.PageAllocator(PAGES, PAGE, max_requests=SEQS, max_pages_per_request=8)
        for _ in range(cache.dp)
    ]
    step_fn = jax.jit(forward, donate_argnums=1)
    rng = np.random.default_rng(1)
    # Per pool: request id -> its tokens so far (prompt, then generated).
    seqs: list[dict[str, list[int]]] = [
        {"a": list(rng.integers(0, VOCAB, 10))},
        {"c": list(rng.integers(0, VOCAB, 7))},
    ]
    computed: list[dict[str, int]] = [{"a": 0}, {"c": 0}]
    worst = 0.0
    for i in range(6):
        if i == 1:  # pool 0 forks "a" after its prefill; pool 1 sits this step out
            allocs[0].fork("a", "b")
            seqs[0]["b"], computed[0]["b"] = list(seqs[0]["a"]), computed[0]["a"]
        idle = {1} if i == 1 else set()
        steps, pairs, batches = [], [], []
        for g, alloc in enumerate(allocs):
            ids = [] if g in idle else list(seqs[g])
            counts = [len(seqs[g][r]) - computed[g][r] for r in ids]
            rows = alloc.allocate_batch(ids, counts)
            pairs.append(alloc.take_pending_copies())
            steps.append(
                kvshard.build_step(
                    alloc, ids, counts, rows=rows, num_tokens_padded=TOKENS, max_num_seqs=SEQS
                )
            )
            batches.append((ids, counts))
        step = kvshard.stack_steps(steps)
        tokens = np.zeros((cache.dp, TOKENS), np.int32)
        for g, (ids, counts) in enumerate(batches):
            packed = [t for r, n in zip(ids, counts, strict=True) for t in seqs[g][r][-n:]]
            tokens[g, : len(packed)] = packed
        cache, logits = step_fn(params, cache, tokens, step, pad_pairs(pairs))
        logits = np.asarray(logits)
        for g, (ids, counts) in enumerate(batches):
            for j, (r, n) in enumerate(zip(ids, counts, strict=True)):
                end = int(step.cu_q_lens[g, j + 1])
                want = dense_logits(params, seqs[g][r])[-n:]
                worst = max(worst, float(np.abs(logits[g, end - n : end] - want).max()))
                computed[g][r] = len(seqs[g][r])
                seqs[g][r].append(int(logits[g, end - 1].argmax()))
        copies = sum(len(p) for p in pairs)
        print(f"step {i}: pools {[b[0] for b in batches]}, copy-on-write pairs {copies}")
    for alloc in allocs:
        alloc.check_invariants()
    print(f"max abs diff against the dense model: {worst:.2e} (tolerance {TOLERANCE:.0e})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
