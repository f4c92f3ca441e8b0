"""The demo's model: a small GQA transformer, a dense oracle, and a continuous-batching engine.

The demo is one runnable story read top to bottom: model, oracle and engine side by side.

* :func:`init_params`: random (seeded) weights of a decoder-only transformer with grouped-query
  attention, RMSNorm, RoPE and a SiLU MLP.
* :func:`dense_logits`: the same model in float64 numpy over a whole sequence with plain causal
  attention and no cache: the oracle every paged step is checked against.
* :func:`make_forward`: one ``jax.jit`` function per engine that runs a whole step (prefill
  chunks and decodes mixed in one flat token batch) for every layer: write K/V with
  :func:`kvshard.update`, attend with :func:`kvshard.attention` (each device reads its own heads'
  pages in place), and return the logits. Tensor parallel over heads: query heads and MLP
  columns are sharded over the ``model`` mesh axis; kvshard shards the cache the same way.
* :class:`Engine`: the jitted step and greedy sampling under :class:`kvshard.Scheduler`
  (admission, chunked prefill, decode first, prefix caching, preemption by recompute).

The scripts that import this module set ``XLA_FLAGS``/``JAX_PLATFORMS`` before importing it.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kvshard

# float32 logits of the paged run may differ from the float64 oracle by at most this much.
TOLERANCE = 1e-4


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes of the toy transformer (hashable, so it can be closed over by jit)."""

    vocab: int = 512
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 128
    d_ff: int = 512
    rope_theta: float = 10_000.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads="
                f"{self.num_kv_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads


def init_params(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Returns float32 numpy weights; per-layer weights are stacked on a leading layer axis.

    Scaled by 1/sqrt(fan_in) so activations and logits stay O(1) through the layers: then an
    absolute tolerance on the logits means the same thing at every depth.
    """
    rng = np.random.default_rng(seed)
    L, d, f = cfg.num_layers, cfg.d_model, cfg.d_ff
    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

    def dense(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[-2])).astype(np.float32)

    def gain(*shape: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)

    return {
        "embed": rng.standard_normal((cfg.vocab, d)).astype(np.float32),
        "attn_norm": gain(L, d),
        "wq": dense(L, d, q_dim),
        "wk": dense(L, d, kv_dim),
        "wv": dense(L, d, kv_dim),
        "wo": dense(L, q_dim, d),
        "mlp_norm": gain(L, d),
        "w1": dense(L, d, f),
        "w2": dense(L, f, d),
        "final_norm": gain(d),
        "unembed": dense(d, cfg.vocab),
    }


LAYER_WEIGHTS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w1", "w2")


def param_specs(cfg: ModelConfig, tp: int) -> dict[str, P]:
    """Megatron-style tensor parallelism over the ``model`` axis.

    Query heads and MLP hidden units are split (column-parallel), ``wo``/``w2`` are split on
    their input (row-parallel, one all-reduce each). K/V projections are split only when every
    device gets whole KV heads; with fewer KV heads than devices they are replicated, which is
    also how kvshard replicates those heads in the cache.
    """
    kv = "model" if cfg.num_kv_heads % tp == 0 else None
    return {
        "embed": P(),
        "attn_norm": P(),
        "wq": P(None, None, "model"),
        "wk": P(None, None, kv),
        "wv": P(None, None, kv),
        "wo": P(None, "model", None),
        "mlp_norm": P(),
        "w1": P(None, None, "model"),
        "w2": P(None, "model", None),
        "final_norm": P(),
        "unembed": P(),
    }


def shard_params(params: dict[str, np.ndarray], cfg: ModelConfig, mesh) -> dict[str, jax.Array]:
    """Puts the weights on ``mesh`` with :func:`param_specs`."""
    specs = param_specs(cfg, int(mesh.shape["model"]))
    return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}


def _rope_angles(cfg: ModelConfig, positions, xp):
    """cos, sin [T, 1, head_dim / 2] of the rotary embedding at ``positions`` (numpy or jnp)."""
    half = cfg.head_dim // 2
    inv_freq = cfg.rope_theta ** (-xp.arange(half, dtype=xp.float32) * 2 / cfg.head_dim)
    angles = positions.astype(xp.float32)[:, None] * inv_freq[None, :]
    return xp.cos(angles)[:, None, :], xp.sin(angles)[:, None, :]


def _rope(x, cos, sin, xp):
    """Rotates the two halves of the head dimension of x [T, H, D] (the GPT-NeoX layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _rms_norm(x, gain, eps, xp):
    return x / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps) * gain


def _silu(x, xp):
    return x / (1 + xp.exp(-x))


def dense_logits(
    params64: dict[str, np.ndarray], cfg: ModelConfig, tokens, kv_out: list | None = None
) -> np.ndarray:
    """float64[n, vocab]: logits of every position of ``tokens`` with no cache (the oracle).

    ``params64`` are the weights cast to float64. Full causal attention over the sequence,
    K/V heads repeated for their query groups: nothing here shares code paths with paging.
    ``kv_out``, when given, receives each layer's (k, v) float64[n, num_kv_heads, head_dim]
    (activations to calibrate a quantized cache's scales on).
    """
    p, xp = params64, np
    tokens = np.asarray(tokens)
    n, H, Hkv, D = len(tokens), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    cos, sin = (a.astype(np.float64) for a in _rope_angles(cfg, np.arange(n), xp))
    causal = np.tril(np.ones((n, n), bool))
    x = p["embed"][tokens]
    for layer in range(cfg.num_layers):
        h = _rms_norm(x, p["attn_norm"][layer], cfg.eps, xp)
        q = _rope((h @ p["wq"][layer]).reshape(n, H, D), cos, sin, xp)
        k = _rope((h @ p["wk"][layer]).reshape(n, Hkv, D), cos, sin, xp)
        v = (h @ p["wv"][layer]).reshape(n, Hkv, D)
        if kv_out is not None:
            kv_out.append((k, v))
        k, v = np.repeat(k, cfg.group, axis=1), np.repeat(v, cfg.group, axis=1)
        # Head-major batched matmuls (BLAS) rather than np.einsum, which would not use BLAS.
        q, k, v = (a.transpose(1, 0, 2) for a in (q, k, v))  # [H, n, D]
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(D)  # [H, n, n]
        scores = np.where(causal[None], scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        attn = (weights @ v).transpose(1, 0, 2).reshape(n, H * D)
        x = x + attn @ p["wo"][layer]
        h = _rms_norm(x, p["mlp_norm"][layer], cfg.eps, xp)
        x = x + _silu(h @ p["w1"][layer], xp) @ p["w2"][layer]
    return _rms_norm(x, p["final_norm"], cfg.eps, xp) @ p["unembed"]


@functools.lru_cache(maxsize=8)
def make_forward(cfg: ModelConfig, spec: kvshard.CacheSpec, mesh):
    """Returns ``forward(params, cache, token_ids, step) -> (cache, logits)``, jitted with the
    cache donated.

    Args of the returned function (T: padded token count of the step's bucket):
      token_ids: int32[T], the step's tokens in batch order (requests contiguous, padding at
        the end).
      step: the step's :class:`kvshard.StepMetadata` (:func:`kvshard.build_step`): update
        slices, page table rows, kv lengths and token positions.

    Every layer writes this step's K/V with :func:`kvshard.update`, then attends with
    :func:`kvshard.attention`: each device reads its own KV heads' pages in place and attends
    its own query heads, so the only collectives are the two all-reduces of each layer's
    row-parallel projections (``wo`` and ``w2``). All shapes depend only on the step's
    buckets, so the function compiles once per bucket. Cached: engines with the same geometry
    share one jitted function and its compilations.
    """
    H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    heads = NamedSharding(mesh, P(None, "model", None))  # [T, heads, D], split heads
    flat = NamedSharding(mesh, P(None, "model"))  # [T, heads·D]
    replicated = NamedSharding(mesh, P())
    sm_scale = float(D) ** -0.5

    def layer_step(consts, carry, xs):
        cos, sin, step = consts
        x, cache = carry
        layer, w = xs
        T = x.shape[0]
        h = _rms_norm(x, w["attn_norm"], cfg.eps, jnp)
        q = jnp.reshape(h @ w["wq"], (T, H, D), out_sharding=heads)
        q = _rope(q, cos, sin, jnp)
        k = _rope((h @ w["wk"]).reshape(T, Hkv, D), cos, sin, jnp)
        v = (h @ w["wv"]).reshape(T, Hkv, D)
        # Write first: this step's tokens attend to themselves through the cache.
        cache = kvshard.update(cache, layer, k, v, step)
        attn = kvshard.attention(cache, layer, q, step, sm_scale=sm_scale)  # [T, H, D] split
        attn = jnp.reshape(attn, (T, H * D), out_sharding=flat)
        x = x + jnp.matmul(attn, w["wo"], out_sharding=replicated)
        h = _rms_norm(x, w["mlp_norm"], cfg.eps, jnp)
        x = x + jnp.matmul(_silu(h @ w["w1"], jnp), w["w2"], out_sharding=replicated)
        return (x, cache), None

    def forward(params, cache, token_ids, step):
        cos, sin = _rope_angles(cfg, step.positions, jnp)
        consts = (cos, sin, step)
        x = params["embed"][token_ids]
        layers = {k: params[k] for k in LAYER_WEIGHTS}  # stacked [L, ...]: scanned over
        (x, cache), _ = jax.lax.scan(
            lambda c, xs: layer_step(consts, c, xs),
            (x, cache),
            (jnp.arange(cfg.num_layers, dtype=jnp.int32), layers),
        )
        logits = _rms_norm(x, params["final_norm"], cfg.eps, jnp) @ params["unembed"]
        return cache, logits

    return jax.jit(forward, donate_argnums=(1,))


# --------------------------------------------------------------------------------------------
# Workload and engine
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Request:
    """One generation request and its progress."""

    rid: int
    prompt: np.ndarray  # int[n]
    max_new_tokens: int
    arrival: int  # first step at which the scheduler may admit it
    tokens: list[int] = dataclasses.field(default_factory=list)  # prompt + generated
    computed: int = 0  # tokens whose K/V is in the cache
    generated: list[int] = dataclasses.field(default_factory=list)
    sampled_logits: list[np.ndarray] = dataclasses.field(default_factory=list)
    prefix_hit: int = 0  # prompt tokens found in the prefix cache
    shared_pages: np.ndarray | None = None  # page ids of those cached tokens
    finished: bool = False

    def __post_init__(self) -> None:
        self.tokens = [int(t) for t in self.prompt]


def make_requests(
    rng: np.random.Generator,
    num: int,
    vocab: int,
    *,
    system_prompt: np.ndarray,
    suffix_len: tuple[int, int],
    new_tokens: tuple[int, int],
    arrivals: Iterable[int],
) -> list[Request]:
    """Requests = shared system prompt + random suffix, each with its own generation length."""
    out = []
    for rid, arrival in zip(range(num), arrivals, strict=False):
        suffix = rng.integers(1, vocab, int(rng.integers(suffix_len[0], suffix_len[1] + 1)))
        prompt = np.concatenate([system_prompt, suffix]).astype(np.int64)
        new = int(rng.integers(new_tokens[0], new_tokens[1] + 1))
        out.append(Request(rid=rid, prompt=prompt, max_new_tokens=new, arrival=int(arrival)))
    return out


def tokens_to_serve(requests: Iterable[Request]) -> int:
    """Tokens whose K/V a run puts in the cache (computed or found in the prefix cache) once
    every request has finished: its prompt and every generated token but the last."""
    return sum(len(r.prompt) + max(r.max_new_tokens - 1, 0) for r in requests)


class _Progress:
    """Tokens served out of :func:`tokens_to_serve`: tqdm when it is installed (the
    ``examples`` extra), else a plain line per 10 updates. Counting tokens, not steps, its
    total is the run's own: the bar ends full when every request finishes (a run cut short by
    ``max_steps`` ends short of it)."""

    def __init__(self, total: int, desc: str) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self._bar = tqdm(total=total, desc=desc, unit="token") if tqdm else None
        self._total, self._desc, self._n, self._updates = total, desc, 0, 0

    def update(self, done: int, **info) -> None:
        """``done``: tokens served so far (cumulative)."""
        self._updates += 1
        if self._bar is not None:
            self._bar.set_postfix(info, refresh=False)
            self._bar.update(done - self._n)
        elif self._updates % 10 == 0 or done == self._total:
            fields = " ".join(f"{k}={v}" for k, v in info.items())
            print(f"{self._desc}: {done}/{self._total} tokens {fields}", file=sys.stderr)
        self._n = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@dataclasses.dataclass
class RunStats:
    steps: int = 0
    tokens_generated: int = 0
    tokens_computed: int = 0
    peak_pages: int = 0
    peak_usage: float = 0.0
    max_abs_diff: float = 0.0
    sum_abs_diff: float = 0.0  # over every logit of every computed position
    num_logits: int = 0
    top1_agree: int = 0  # computed positions whose argmax matches the dense model's
    positions_checked: int = 0
    forward_compiles: int = 0
    buckets_used: set = dataclasses.field(default_factory=set)
    prefix_stats: dict = dataclasses.field(default_factory=dict)
    wall_s: float = 0.0


class Engine:
    """Continuous batching over a paged, head-sharded kvshard cache.

    Each step: :class:`kvshard.Scheduler` admits arrived requests, schedules decodes first and
    then prefill chunks within the token budget, grows their pages and builds the step; the
    engine applies the copy-on-write pairs, runs the jitted forward, samples greedily at the
    rows the scheduler names and hands the tokens back (which frees finished requests). With
    ``check=True`` every computed position's logits are compared with :func:`dense_logits`.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        params: dict[str, np.ndarray],
        mesh,
        *,
        page_size: int,
        num_pages: int,
        max_requests: int,
        max_context: int,
        max_tokens_per_step: int,
        prefix_caching: bool,
        check: bool = True,
        kv_dtype: str = "float32",
        kv_scales: tuple[float, float] | None = None,
    ) -> None:
        self.cfg, self.mesh, self.check = cfg, mesh, check
        self.page_size, self.max_requests = page_size, max_requests
        self.max_pages = -(-max_context // page_size)
        self.spec = kvshard.CacheSpec(
            num_layers=cfg.num_layers,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            page_size=page_size,
            num_pages=num_pages,
            # float32 by default so the 1e-4 check against the float64 oracle is fair; int8 /
            # float8 (with their k, v scales) to measure what quantizing the cache costs.
            dtype=kv_dtype,
            k_scale=None if kv_scales is None else kv_scales[0],
            v_scale=None if kv_scales is None else kv_scales[1],
        )
        self.cache = kvshard.init_cache(self.spec, mesh, head_axis="model")
        self.allocator = kvshard.PageAllocator(
            num_pages,
            page_size,
            max_requests=max_requests,
            max_pages_per_request=self.max_pages,
            enable_prefix_caching=prefix_caching,
        )
        self.prefix_caching = prefix_caching
        self.params = shard_params(params, cfg, mesh)
        self.params64 = {k: v.astype(np.float64) for k, v in params.items()}
        self.buckets = kvshard.token_buckets(min(8, max_tokens_per_step), max_tokens_per_step)
        self.budget = max_tokens_per_step
        self.forward = make_forward(cfg, self.spec, mesh)
        self.scheduler = kvshard.Scheduler(
            self.allocator,
            kvshard.SchedulerConfig(
                max_num_batched_tokens=max_tokens_per_step,
                max_num_seqs=max_requests,
                max_model_len=self.max_pages * page_size,
                vocab_size=cfg.vocab,
                token_buckets=tuple(self.buckets),
                preemption_mode="recompute",
            ),
        )

    # -- one step ------------------------------------------------------------------------

    def _step(self, out: kvshard.SchedulerOutput, by_id: dict, stats: RunStats) -> None:
        """Runs the scheduled step, checks each computed position against the oracle, samples
        greedily and hands the tokens back to the scheduler."""
        if not out.seq_ids:  # nothing to run (every request waits for pages or arrival)
            self.scheduler.update(out, [])
            return
        if len(out.copy_pairs):  # copy-on-write of shared partial pages
            self.cache = kvshard.copy_pages(self.cache, out.copy_pairs)
        step = out.step
        self.cache, logits = self.forward(self.params, self.cache, out.token_ids, step)
        logits = np.asarray(logits)
        stats.buckets_used.add(step.num_tokens_padded)
        stats.tokens_computed += out.num_tokens
        alloc = self.allocator
        stats.peak_pages = max(stats.peak_pages, alloc.num_pages - 1 - alloc.num_free_pages)
        stats.peak_usage = max(stats.peak_usage, alloc.usage)

        cu, positions = step.cu_q_lens, step.positions
        for i, (rid, _) in enumerate(out.seq_ids):
            req = by_id[rid]
            first, end = int(positions[cu[i]]), int(positions[cu[i + 1] - 1]) + 1
            if not req.computed and not req.generated:
                req.prefix_hit = first  # the prompt tokens its first step found cached
                req.shared_pages = alloc.pages((rid, 0))[: first // self.page_size]
            if self.check:
                mine = logits[cu[i] : cu[i + 1]]
                ref = dense_logits(self.params64, self.cfg, req.tokens[:end])
                err = np.abs(ref[first:] - mine)
                stats.max_abs_diff = max(stats.max_abs_diff, float(np.max(err)))
                stats.sum_abs_diff += float(err.sum())
                stats.num_logits += err.size
                stats.top1_agree += int((ref[first:].argmax(-1) == mine.argmax(-1)).sum())
                stats.positions_checked += end - first
            req.computed = end
        sampled = logits[out.sample_rows]
        greedy = sampled.argmax(-1)
        for (rid, _), token, row in zip(out.sample_seq_ids, greedy.tolist(), sampled, strict=True):
            req = by_id[rid]
            req.generated.append(token)
            req.sampled_logits.append(row.copy())
            req.tokens.append(token)
            stats.tokens_generated += 1
        for done in self.scheduler.update(out, greedy):
            by_id[done.req_id].finished = True

    def run(self, requests: list[Request], max_steps: int, desc: str = "decode") -> RunStats:
        """Serves ``requests`` for at most ``max_steps`` steps (stops early when all finish);
        each is added to the scheduler at its arrival step."""
        stats = RunStats()
        waiting = sorted(requests, key=lambda r: (r.arrival, r.rid))
        by_id = {r.rid: r for r in requests}
        progress = _Progress(tokens_to_serve(requests), desc)
        start = time.perf_counter()
        try:
            for step in range(max_steps):
                if not waiting and not self.scheduler.has_unfinished_requests():
                    break
                while waiting and waiting[0].arrival <= step:
                    req = waiting.pop(0)
                    self.scheduler.add_request(
                        kvshard.GenerationRequest(req.rid, req.prompt, req.max_new_tokens)
                    )
                out = self.scheduler.schedule()
                self._step(out, by_id, stats)
                stats.steps = step + 1
                progress.update(
                    sum(r.computed for r in requests),
                    step=step + 1,
                    running=self.scheduler.num_running,
                    waiting=self.scheduler.num_waiting + len(waiting),
                    diff=f"{stats.max_abs_diff:.1e}",
                )
        finally:
            progress.close()
        jax.block_until_ready(self.cache.kv)
        stats.wall_s = time.perf_counter() - start
        stats.forward_compiles = self.forward._cache_size()
        stats.prefix_stats = self.allocator.prefix_stats
        return stats


class CompileCounter:
    """Counts XLA backend compilations of the whole process (a jax.monitoring listener)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self) -> None:
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration_secs: float, **kwargs: str | int) -> None:
        del duration_secs, kwargs
        if event == self.EVENT:
            self.count += 1


def make_mesh():
    """The examples' mesh: 1 x 8 ("data", "model"); heads are sharded over "model"."""
    return jax.make_mesh((1, 8), ("data", "model"))
