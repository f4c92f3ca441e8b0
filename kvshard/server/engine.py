"""The serving engine: a :class:`~kvshard.models.CausalLM` under :class:`kvshard.Scheduler`.

One :class:`kvshard.PageAllocator` and one :class:`kvshard.Scheduler` per page pool of the
mesh's data axis (``G`` pools; a request goes to the pool with the fewest live requests).
Each :meth:`Engine.step` schedules every pool, applies the swap-out, swap-in and copy-on-write
pairs in the documented order (stacked ``[G, K, 2]``, K padded to a power of two), runs the
template's jitted forward (:func:`kvshard.models.serve_step`: every layer, the cache donated)
on the stacked steps, samples on the device (:func:`kvshard.server.sampling.sample_rows`:
greedy, temperature, top-k, top-p, seeded per request) and hands the tokens back to the
schedulers. Host work only, no threads: :mod:`kvshard.server.loop` runs it in the background.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

import kvshard
from kvshard.models.model import check_servable
from kvshard.models.serve import cache_spec, serve_step
from kvshard.server.sampling import sample_rows

__all__ = ["Engine", "SamplingParams", "TokenEvent"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples.

    Attributes:
        max_tokens: tokens to generate per sample at most; int >= 1.
        temperature: 0 samples greedily; > 0 divides the logits.
        top_k: keep the k most likely tokens; <= 0 keeps all.
        top_p: keep the most likely tokens up to this probability mass, in (0, 1].
        seed: None (a fresh seed per request) or an int: the same seed, prompt and
            parameters give the same tokens.
        n: parallel samples (the prompt computed once, then forked).
        stop_token_ids: ids that end a sample (kept in its ids).
        ignore_eos: do not stop at the checkpoint's end-of-sequence ids.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """What one step did for one request: a token of sample ``index``, or (``finished``) the
    request's end with one finish reason per sample (``"stop"``, ``"length"``)."""

    req_id: Hashable
    index: int = 0
    token: int = -1
    finished: tuple[str, ...] | None = None


class _Live:
    __slots__ = ("generated", "params", "pool", "seed")

    def __init__(self, params: SamplingParams, pool: int, seed: int) -> None:
        self.params, self.pool, self.seed = params, pool, seed
        self.generated = [0] * params.n


def _pad_pairs(pairs: list[np.ndarray], fill: int) -> np.ndarray:
    width = max(8, 1 << max(len(p) for p in pairs).bit_length())
    out = np.full((len(pairs), width, 2), fill, np.int32)
    for g, p in enumerate(pairs):
        out[g, : len(p)] = p
    return out


class Engine:
    """Continuous batching of a :class:`~kvshard.models.CausalLM` with sampling.

    Args:
        model: the model, sharded over ``mesh`` (:func:`kvshard.models.load_checkpoint`).
        mesh: a ``(data_axis, model_axis)`` mesh: its data axis is the number of page pools.
        max_num_seqs: sequences running at once per pool.
        max_model_len: longest ``prompt + max_tokens``; default the smaller of the config's
            ``max_position_embeddings`` and 2048.
        page_size: tokens per page.
        num_pages: pages per pool (null page included); default room for ``max_num_seqs``
            sequences of ``max_model_len`` tokens.
        max_num_batched_tokens: the token budget of one step per pool.
        kv_dtype: the cache's dtype; default the model's.
        host_memory: bytes of the host tier over the whole mesh (0: none; preemption then
            recomputes): ``host_memory // (pools * bytes of one page on every device)``
            host pages per pool.
        eos_token_ids: ids that end a sample unless a request sets ``ignore_eos``.
        enable_prefix_caching: share the pages of identical prompt prefixes.
    """

    def __init__(
        self,
        model,
        mesh: Mesh,
        *,
        max_num_seqs: int = 16,
        max_model_len: int | None = None,
        page_size: int = 16,
        num_pages: int | None = None,
        max_num_batched_tokens: int = 256,
        kv_dtype: str | None = None,
        host_memory: int = 0,
        eos_token_ids: Sequence[int] = (),
        enable_prefix_caching: bool = True,
        data_axis: str = "data",
        model_axis: str = "model",
    ) -> None:
        arch = model.arch
        check_servable(arch)
        self.model, self.mesh, self.arch = model, mesh, arch
        self.pools = int(mesh.shape[data_axis])
        limit = arch.layers[0].rope.max_position_embeddings or 2048
        self.max_model_len = int(max_model_len or min(limit, 2048))
        self.max_num_seqs = max_num_seqs
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        spec = cache_spec(
            arch,
            page_size=page_size,
            longest=self.max_model_len,
            max_seqs=max_num_seqs,
            budget=max_num_batched_tokens,
        )
        if num_pages is not None:
            spec = dataclasses.replace(spec, num_pages=num_pages)
        if kv_dtype is not None:
            spec = dataclasses.replace(spec, dtype=kv_dtype)
        self.spec = spec
        tp = int(mesh.shape[model_axis])
        page_bytes = spec.page_bytes_per_device(tp) * spec.num_cache_layers * tp
        num_host_pages = int(host_memory) // (self.pools * page_bytes)
        if host_memory and num_host_pages < 2:
            raise ValueError(
                f"host_memory={host_memory} bytes holds {num_host_pages} host pages per pool "
                f"({page_bytes} bytes each, {self.pools} pools); at least 2 are needed"
            )
        self.num_host_pages = num_host_pages
        self.cache = kvshard.init_cache(spec, mesh, head_axis=model_axis, page_axis=data_axis)
        self.host = (
            kvshard.init_host_cache(
                spec, mesh, num_host_pages, head_axis=model_axis, page_axis=data_axis
            )
            if num_host_pages
            else None
        )
        # One padded token count for every pool when there are several (the steps stack).
        buckets = tuple(kvshard.token_buckets(16, max_num_batched_tokens))
        if self.pools > 1:
            buckets = (buckets[-1],)
        self.allocators = [
            kvshard.PageAllocator(
                spec.num_pages,
                page_size,
                max_requests=max_num_seqs,
                max_pages_per_request=-(-self.max_model_len // page_size),
                num_host_pages=num_host_pages,
                enable_prefix_caching=enable_prefix_caching,
                layer_types=spec.layer_types,
            )
            for _ in range(self.pools)
        ]
        config = kvshard.SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            max_model_len=self.max_model_len,
            vocab_size=arch.vocab_size,
            token_buckets=buckets,
            preemption_mode="swap" if num_host_pages else "recompute",
        )
        self.schedulers = [kvshard.Scheduler(a, config) for a in self.allocators]
        self.buckets = buckets
        self._live: dict[Hashable, _Live] = {}
        self._seeds = np.random.default_rng()
        self.stats = {
            "steps": 0,
            "tokens_generated": 0,
            "prompt_tokens": 0,
            "requests": 0,
            "aborted": 0,
        }

    # ------------------------------------------------------------------ requests

    def add_request(
        self, req_id: Hashable, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> None:
        """Queues a request in the least loaded pool.

        Raises:
            ValueError: as :meth:`kvshard.Scheduler.add_request` (the field, the value and
                the bound), or a sampling parameter out of range. Nothing changes then.
        """
        if not params.temperature >= 0:
            raise ValueError(f"temperature={params.temperature!r} must be >= 0")
        if not 0 < params.top_p <= 1:
            raise ValueError(f"top_p={params.top_p!r} must be in (0, 1]")
        load = [0] * self.pools
        for live in self._live.values():
            load[live.pool] += 1
        pool = load.index(min(load))
        stops = tuple(params.stop_token_ids) + (() if params.ignore_eos else self.eos_token_ids)
        self.schedulers[pool].add_request(
            kvshard.GenerationRequest(
                req_id,
                list(prompt_token_ids),
                max_new_tokens=params.max_tokens,
                stop_token_ids=tuple(dict.fromkeys(stops)),
                n=params.n,
            )
        )
        seed = self._seeds.integers(2**32) if params.seed is None else params.seed
        self._live[req_id] = _Live(params, pool, int(seed) % 2**32)
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(prompt_token_ids)

    def abort(self, req_id: Hashable) -> bool:
        """Drops a live request and frees its pages; returns whether it was live."""
        live = self._live.pop(req_id, None)
        if live is None:
            return False
        self.stats["aborted"] += 1
        return self.schedulers[live.pool].abort(req_id)

    def has_unfinished_requests(self) -> bool:
        """Whether any request is live (queued, running or swapped out)."""
        return bool(self._live)

    # ------------------------------------------------------------------ one step

    def step(self) -> list[TokenEvent]:
        """Schedules, runs and samples one step of every pool; returns its events."""
        outs = [s.schedule() for s in self.schedulers]
        if not any(o.seq_ids for o in outs):
            for s, o in zip(self.schedulers, outs, strict=True):
                s.update(o, [])
            return []
        self._move_pages(outs)
        step = kvshard.stack_steps([o.step for o in outs])
        tokens = np.stack([o.token_ids for o in outs])
        logits, self.cache = serve_step(self.model, self.cache, tokens, step)
        S = self.max_num_seqs
        shape = (self.pools, S)
        rows, top_k = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
        temperature, top_p = np.zeros(shape, np.float32), np.ones(shape, np.float32)
        seeds, counters = np.zeros(shape, np.uint32), np.zeros((*shape, 2), np.int32)
        for g, out in enumerate(outs):
            for j, ((req_id, index), row) in enumerate(
                zip(out.sample_seq_ids, out.sample_rows, strict=True)
            ):
                live = self._live.get(req_id)
                if live is None:  # aborted: sampled but ignored
                    continue
                p = live.params
                rows[g, j], temperature[g, j], top_k[g, j] = row, p.temperature, p.top_k
                top_p[g, j], seeds[g, j] = p.top_p, live.seed
                counters[g, j] = index, live.generated[index]
        sampled = np.asarray(sample_rows(logits, rows, temperature, top_k, top_p, seeds, counters))
        events: list[TokenEvent] = []
        for g, (sched, out) in enumerate(zip(self.schedulers, outs, strict=True)):
            ids = sampled[g, : len(out.sample_seq_ids)]
            for (req_id, index), token in zip(out.sample_seq_ids, ids.tolist(), strict=True):
                live = self._live.get(req_id)
                if live is not None:
                    live.generated[index] += 1
                    events.append(TokenEvent(req_id, index, token))
            for done in sched.update(out, ids):
                self._live.pop(done.req_id, None)
                events.append(TokenEvent(done.req_id, finished=done.finish_reasons))
        self.stats["steps"] += 1
        self.stats["tokens_generated"] += sum(e.finished is None for e in events)
        return events

    def warmup(self) -> None:
        """Compiles the forward for every token bucket and the sampler, with empty steps
        (they write nothing), so that no request waits for a compilation."""
        S = self.max_num_seqs
        shape = (self.pools, S)
        for bucket in self.buckets:
            step = kvshard.stack_steps(
                [
                    kvshard.build_step(
                        a, [], np.zeros(0, np.int32), num_tokens_padded=bucket, max_num_seqs=S
                    )
                    for a in self.allocators
                ]
            )
            tokens = np.zeros((self.pools, bucket), np.int32)
            logits, self.cache = serve_step(self.model, self.cache, tokens, step)
            zeros = np.zeros(shape, np.int32)
            sample_rows(
                logits,
                zeros,
                zeros.astype(np.float32),
                zeros,
                np.ones(shape, np.float32),
                zeros.astype(np.uint32),
                np.zeros((*shape, 2), np.int32),
            ).block_until_ready()

    def _move_pages(self, outs: list[kvshard.SchedulerOutput]) -> None:
        """Swap-out, swap-in, then copy-on-write pairs, stacked over the pools."""
        if self.host is not None and any(len(o.swap_out_pairs) for o in outs):
            pairs = _pad_pairs([o.swap_out_pairs for o in outs], -1)
            self.cache, self.host = kvshard.swap_out(self.cache, self.host, pairs)
        if self.host is not None and any(len(o.swap_in_pairs) for o in outs):
            pairs = _pad_pairs([o.swap_in_pairs for o in outs], -1)
            self.cache, self.host = kvshard.swap_in(self.cache, self.host, pairs)
        if any(len(o.copy_pairs) for o in outs):
            self.cache = kvshard.copy_pages(self.cache, _pad_pairs([o.copy_pairs for o in outs], 0))

    # ------------------------------------------------------------------ state

    def metrics(self) -> dict[str, float]:
        """Counters and gauges summed over the pools (see docs/guides/serve.md)."""
        queries = hits = 0
        for a in self.allocators:
            stats = a.prefix_stats if a.enable_prefix_caching else {"queries": 0, "hits": 0}
            queries, hits = queries + stats["queries"], hits + stats["hits"]
        return {
            "num_requests_running": sum(s.num_running for s in self.schedulers),
            "num_requests_waiting": sum(s.num_waiting for s in self.schedulers),
            "num_requests_swapped": sum(s.num_swapped for s in self.schedulers),
            "kv_cache_usage": float(np.mean([a.usage for a in self.allocators])),
            "prefix_cache_queries": queries,
            "prefix_cache_hits": hits,
            "prefix_cache_hit_rate": hits / queries if queries else 0.0,
            "num_preemptions": sum(
                s.stats["preempted_swap"] + s.stats["preempted_recompute"] for s in self.schedulers
            ),
            "generation_tokens": self.stats["tokens_generated"],
            "prompt_tokens": self.stats["prompt_tokens"],
            "requests": self.stats["requests"],
            "aborted": self.stats["aborted"],
            "steps": self.stats["steps"],
        }

    def check_invariants(self) -> None:
        """Each allocator's own checks; with no live request, every page must be free."""
        for a in self.allocators:
            a.check_invariants()
            if not self._live and a.usage != 0:
                raise AssertionError(f"no live request, yet {a.usage:.1%} of a pool is owned")


def device_count_for(mesh_text: str) -> tuple[int, int]:
    """(D, M) of a ``DxM`` mesh argument; ValueError naming it otherwise."""
    parts = mesh_text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"--mesh {mesh_text!r}: expected DxM with D, M >= 1, e.g. 1x2")
    return int(parts[0]), int(parts[1])


def make_mesh(dp: int, tp: int) -> Mesh:
    """A ``("data", "model")`` mesh of ``dp * tp`` devices with Auto axes (as the template)."""
    return jax.make_mesh((dp, tp), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
