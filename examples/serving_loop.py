"""A complete data-parallel x tensor-parallel serving loop on a 2 x 4 mesh, checked densely.

The loop of docs/guides/serving-loop.md, runnable: a hybrid model (sliding-window and full
attention layers: two KV-cache groups) served on two page pools (the mesh's "data" axis), KV
heads sharded over "model". Each pool has its own :class:`kvshard.PageAllocator` (prefix
caching, a host tier) and its own :class:`kvshard.Scheduler`, which does admission, prefix
hits, chunked prefill, forks (``n = 2``) and preemption by swap to the host tier. The code
below is only what an integrator writes. Every step

    out = scheduler.schedule()                       (per pool, on the host)
    stack_steps, pad the pairs to one length         (one [dp, ...] step)
    forward(params, cache, host, pairs, tokens, step)  (ONE jit, cache and host donated):
        swap_out, swap_in, copy_pages (in that order), then per layer update -> attention
    greedy tokens at out.sample_rows -> scheduler.update(out, tokens)

Pool 1 is idle on the first step (its requests arrive later). In pool 0, request "a" (n = 2)
is forked when its prompt is done and "c" hits the system prompt "a" committed; pool 1 runs out
of pages and preempts by swap. The served logits of every request are compared with the same
model run densely on its whole sequence (float64 numpy); the script exits 1 past 1e-4.

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

VOCAB, D_MODEL, Q_HEADS, KV_HEADS, HEAD_DIM = 128, 64, 8, 4, 32
WINDOW = 8  # layer 0 attends to its last 8 tokens, layer 1 to all of them
LAYER_TYPES = [("sliding", WINDOW), ("full",)]
PAGE, PAGES, HOST_PAGES, TOKENS, SEQS = 4, 16, 16, 16, 4
K = PAGES  # swap and copy pairs per pool and step, padded: a device page moves once a step
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
        for _ in LAYER_TYPES
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


def forward(params, cache, host, swap_out, swap_in, copies, tokens, step):
    """One step of every pool: tokens int32[dp, T] -> (cache, host, logits float32[dp, T, V]).

    The pairs are int32[dp, K, 2], applied in the documented order before this step's writes:
    preempted pages leave for the host, resumed ones come back, then copy-on-write."""
    cache, host = kvshard.swap_out(cache, host, swap_out)
    cache, host = kvshard.swap_in(cache, host, swap_in)
    cache = kvshard.copy_pages(cache, copies)
    x = params["embed"][tokens]
    for layer, w in enumerate(params["layers"]):  # Python ints: each layer reads its own type
        q = rope(jnp.einsum("gtd,dhk->gthk", x, w["wq"]), step.positions)
        k = rope(jnp.einsum("gtd,dhk->gthk", x, w["wk"]), step.positions)
        v = jnp.einsum("gtd,dhk->gthk", x, w["wv"])
        cache = kvshard.update(cache, layer, k, v, step)
        out = kvshard.attention(cache, layer, q, step, sm_scale=HEAD_DIM**-0.5)
        x = x + jnp.einsum("gthk,hkd->gtd", out, w["wo"])  # row-parallel: psum over "model"
    return cache, host, x @ params["unembed"]


def dense_logits(params, tokens: list[int]) -> np.ndarray:
    """The same model on a whole sequence, no cache, float64: logits [len(tokens), VOCAB]."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = p["embed"][tokens]
    pos = np.arange(len(tokens))
    group = Q_HEADS // KV_HEADS
    for w, layer_type in zip(p["layers"], LAYER_TYPES, strict=True):
        seen = pos[None, :] <= pos[:, None]
        if layer_type[0] == "sliding":
            seen &= pos[None, :] > pos[:, None] - layer_type[1]
        q = rope(np.einsum("td,dhk->thk", x, w["wq"]), pos)
        k = np.repeat(rope(np.einsum("td,dhk->thk", x, w["wk"]), pos), group, axis=1)
        v = np.repeat(np.einsum("td,dhk->thk", x, w["wv"]), group, axis=1)
        s = np.where(seen[None], np.einsum("qhk,shk->hqs", q, k) * HEAD_DIM**-0.5, -np.inf)
        prob = np.exp(s - s.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        x = x + np.einsum("hqs,shk,hkd->qd", prob, v, w["wo"])
    return x @ p["unembed"]


def pad_pairs(per_pool: list[np.ndarray], fill: int) -> np.ndarray:
    """Each pool's pairs padded to K rows with no-op rows: int32[dp, K, 2]. Swaps pad with
    (-1, -1), copies with (0, 0) (src == dst)."""
    return np.stack(
        [np.concatenate([p, np.full((K - len(p), 2), fill, np.int32)]) for p in per_pool]
    )


def main() -> int:
    params = init_params()
    spec = kvshard.CacheSpec(
        num_layers=len(LAYER_TYPES),
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        page_size=PAGE,
        num_pages=PAGES,
        dtype="float32",
        layer_types=LAYER_TYPES,
    )
    cache = kvshard.init_cache(spec, mesh, head_axis="model", page_axis="data")
    host = kvshard.init_host_cache(spec, mesh, HOST_PAGES, head_axis="model", page_axis="data")
    allocs = [
        kvshard.PageAllocator(
            PAGES,
            PAGE,
            max_requests=SEQS,
            max_pages_per_request=8,
            layer_types=LAYER_TYPES,
            enable_prefix_caching=True,
            num_host_pages=HOST_PAGES,
        )
        for _ in range(cache.dp)
    ]
    # One bucket: every pool's step has TOKENS tokens, so the steps stack and the forward
    # compiles once.
    config = kvshard.SchedulerConfig(
        max_num_batched_tokens=TOKENS,
        max_num_seqs=SEQS,
        vocab_size=VOCAB,
        preemption_mode="swap",
        token_buckets=(TOKENS,),
    )
    schedulers = [kvshard.Scheduler(alloc, config) for alloc in allocs]
    step_fn = jax.jit(forward, donate_argnums=(1, 2))

    rng = np.random.default_rng(1)
    ids = lambda n: rng.integers(0, VOCAB, n).tolist()
    system = ids(2 * PAGE)  # pool 0's system prompt: 2 full pages
    # (arrival step, pool, request): pool 0 forks "a" and hits the system prompt with "c";
    # pool 1's three requests outgrow its pages.
    arrivals = [
        (0, 0, kvshard.GenerationRequest("a", system + ids(3), max_new_tokens=6, n=2)),
        (1, 1, kvshard.GenerationRequest("d", ids(9), max_new_tokens=10)),
        (1, 1, kvshard.GenerationRequest("e", ids(7), max_new_tokens=10)),
        (2, 1, kvshard.GenerationRequest("f", ids(6), max_new_tokens=8)),
        (3, 0, kvshard.GenerationRequest("c", system + ids(4), max_new_tokens=5)),
    ]
    prompts = {r.req_id: list(r.prompt_token_ids) for _, _, r in arrivals}
    rows: dict[tuple, dict[int, np.ndarray]] = {}  # seq_id -> position -> served logits
    done: dict = {}
    moved = {"swap-out": 0, "swap-in": 0, "copy-on-write": 0}  # pairs applied
    released = 0  # most pages the sliding group had released at once, one pool
    i = 0
    while arrivals or any(s.has_unfinished_requests() for s in schedulers):
        while arrivals and arrivals[0][0] <= i:
            _, g, request = arrivals.pop(0)
            schedulers[g].add_request(request)
        outs = [s.schedule() for s in schedulers]
        step = kvshard.stack_steps([out.step for out in outs])
        pairs = {
            "swap-out": [out.swap_out_pairs for out in outs],
            "swap-in": [out.swap_in_pairs for out in outs],
            "copy-on-write": [out.copy_pairs for out in outs],
        }
        tokens = np.stack([out.token_ids for out in outs])
        cache, host, logits = step_fn(
            params, cache, host, pad_pairs(pairs["swap-out"], -1),
            pad_pairs(pairs["swap-in"], -1), pad_pairs(pairs["copy-on-write"], 0), tokens, step,
        )  # fmt: skip
        logits = np.asarray(logits)
        for g, (scheduler, out) in enumerate(zip(schedulers, outs, strict=True)):
            cu, positions = out.step.cu_q_lens, out.step.positions
            for j, seq_id in enumerate(out.seq_ids):  # kept for the dense check
                for t in range(cu[j], cu[j + 1]):
                    rows.setdefault(seq_id, {})[int(positions[t])] = logits[g, t]
            greedy = logits[g, out.sample_rows].argmax(-1)
            for finished in scheduler.update(out, greedy):
                done[finished.req_id] = finished.token_ids
        for name, per_pool in pairs.items():
            moved[name] += sum(len(p) for p in per_pool)
        released = max(released, *(int(a.row_num_released[0].sum()) for a in allocs))
        print(
            f"step {i}: pools {[[f'{r}{s}' for r, s in out.seq_ids] for out in outs]}, "
            + ", ".join(f"{name} {[len(p) for p in pp]}" for name, pp in pairs.items())
        )
        i += 1

    worst = 0.0
    for (req_id, sample), served in rows.items():
        want = dense_logits(params, prompts[req_id] + list(done[req_id][sample]))
        for position, got in served.items():
            worst = max(worst, float(np.abs(got - want[position]).max()))
    for alloc in allocs:
        alloc.check_invariants()
        assert alloc.usage == 0, alloc.usage  # every page came back
    hits = [alloc.prefix_stats["hits"] for alloc in allocs]
    swapped = [s.stats["preempted_swap"] for s in schedulers]
    recomputed = [s.stats["preempted_recompute"] for s in schedulers]
    print(f"requests finished: {sorted(done)}, samples of 'a': {len(done['a'])}")
    print(f"sliding group: up to {released} pages released (window {WINDOW} tokens)")
    print(f"prefix cache hits per pool: {hits} tokens")
    print(f"preempted per pool: by swap {swapped}, by recompute {recomputed}")
    print("pairs applied: " + ", ".join(f"{name} {n}" for name, n in moved.items()))
    print(f"max abs diff against the dense model: {worst:.2e} (tolerance {TOLERANCE:.0e})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
