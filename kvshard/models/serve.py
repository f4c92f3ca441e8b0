"""Continuous batching of a :class:`~kvshard.models.CausalLM` over data-parallel page pools.

The host loop a server runs, small: requests are spread round-robin over the ``G`` page pools
of the mesh's data axis (``init_cache(..., page_axis=...)``), each pool with its own
:class:`kvshard.PageAllocator` and its own schedule (every running request gets its next
prompt chunk or one decode token, within a token budget). Every step builds each pool's
:func:`kvshard.build_step` at one padded shape, stacks them (:func:`kvshard.stack_steps`) and
runs ONE jitted forward with the cache donated (:func:`serve_step`). Each pool's admission and
schedule is its :class:`kvshard.Scheduler`'s. Greedy sampling (``kvshard serve``'s engine,
:mod:`kvshard.server.engine`, adds the others).

:func:`cache_spec` gives the cache the model's per-layer attention types
(``CacheSpec(layer_types=arch.layer_types)``): a mixed model (Gemma 2/3, gpt-oss, Qwen2 with
``max_window_layers``) is served from KV-cache groups in one pool, each group with its own
page table, so its local layers hold only their window's pages and a page id costs
``spec.num_cache_layers`` layers, not ``num_layers``. The pool is sized per group
(:func:`pages_per_request`). A Mamba-2 hybrid (Bamba) keeps its attention layers' K/V in
that cache and its Mamba layers' per-request state in the same pool's state groups: the
allocator takes ``arch.cache_layer_types`` and gives each request one state page per state
group, which the model reads and writes in place (:mod:`kvshard.models.state_cache`).

:func:`dense_logits` runs the same weights with no cache over each whole sequence: the check
that every served logit is right.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import kvshard
from kvshard._geometry.layer_types import cache_groups, is_state
from kvshard.allocator import sliding_window_pages
from kvshard.models.model import check_servable
from kvshard.models.state_cache import (
    HybridCache,
    StateSpec,
    copy_state_pages,
    init_state,
    kv_step,
    state_layout,
)

__all__ = [
    "Request",
    "cache_spec",
    "dense_logits",
    "pages_per_request",
    "serve",
    "serve_step",
]


@dataclass
class Request:
    id: int
    tokens: list[int]  # prompt, then generated tokens
    max_new: int
    arrival: int = 0  # first step it may run
    prompt_len: int = 0
    computed: int = 0  # tokens whose K/V is in the cache
    logits: list[np.ndarray] = field(default_factory=list)  # one float32 row per computed token

    def __post_init__(self) -> None:
        self.prompt_len = self.prompt_len or len(self.tokens)


@nnx.jit(donate_argnums=1)
def serve_step(model, cache, tokens, step, pages=None):
    """``(logits, cache)`` of one step: tokens int32[G, T] packed as ``step`` (a stacked
    :class:`kvshard.StepMetadata`) says. One jit per step shape; the cache is donated (its
    buffers are consumed: rebind the returned one) so every layer's update writes in place.
    A hybrid's cache is a :class:`~kvshard.models.state_cache.HybridCache` (its Mamba state
    written in place too) and ``pages`` int32[G, S, R] each request row's state page in each
    of the S state groups."""
    if pages is None:
        return model(tokens, step.positions, cache, step)
    return model(tokens, step.positions, cache, step, pages)


def pages_per_request(spec: kvshard.CacheSpec, longest: int, max_new_tokens: int) -> int:
    """Most pages of the pool one request of up to ``longest`` tokens holds at once, summed
    over the spec's KV-cache groups (``spec.groups``), when each allocation adds at most
    ``max_new_tokens`` tokens (the step's token budget: a prefill chunk).

    A full group holds every page of the request, ``ceil(longest / page_size)``; a sliding
    group of window W at most :func:`kvshard.allocator.sliding_window_pages` ``(W, page_size,
    max_new_tokens)`` (the allocator releases the rest), capped at the former. A chunked group
    is counted as full (an upper bound; no architecture here has one).
    """
    full = -(-longest // spec.page_size)
    total = 0
    for kind in spec.groups.group_types:
        if len(kind) == 2 and kind[0] == "sliding":
            bound = sliding_window_pages(kind[1], spec.page_size, max_new_tokens)
            total += min(bound, full)
        else:
            total += full
    return total


def cache_spec(
    arch,
    *,
    page_size: int,
    longest: int,
    max_seqs: int,
    budget: int,
    grouped: bool = True,
    min_pages: int = 0,
) -> kvshard.CacheSpec:
    """The cache :func:`serve` needs for ``max_seqs`` running requests of up to ``longest``
    tokens each in one pool, ``budget`` tokens per step.

    ``grouped``: the layers' own attention types (``arch.layer_types``), one KV-cache group per
    type (or several of equal size, vLLM's split); False: every layer stored as full
    attention (one group of all layers, each layer still attending through its own window):
    the baseline the groups save memory against. ``num_pages`` is the null page plus
    ``max_seqs`` times :func:`pages_per_request` (plus, for a hybrid, its state groups: one
    state page per request each), at least ``min_pages``.
    """
    # DeepSeek's latent attention caches one K-only row per token shared by every head (a
    # latent cache: kvshard.models.deepseek.latent_attention), else K/V per KV head.
    heads, dim = (1, arch.mla.latent_dim) if arch.mla else (arch.num_kv_heads, arch.head_dim)
    latent = {"kv_layout": "latent", "kv_lora_rank": arch.mla.kv_lora_rank} if arch.mla else {}
    spec = kvshard.CacheSpec(
        len(arch.layer_types),  # attention layers (a hybrid's Mamba layers keep no K/V)
        heads,
        dim,
        **latent,
        page_size=page_size,
        num_pages=2,  # replaced below, once the groups are known
        dtype=arch.dtype,
        layer_types=arch.layer_types if grouped else None,
    )
    per_request = pages_per_request(spec, longest, budget)
    if arch.mamba is not None:  # one state page per request per state group, same pool
        per_request += state_layout(arch).num_state_groups
    pages = 1 + max_seqs * per_request
    return dataclasses.replace(spec, num_pages=max(pages, min_pages))


def serve(
    model,
    spec: kvshard.CacheSpec,
    mesh: Mesh,
    requests: list[Request],
    *,
    max_seqs: int,
    budget: int,
    window: int | None = None,
    data_axis: str = "data",
    model_axis: str = "model",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Runs every request to completion; returns (steps, most pages in use in one pool).

    Each pool is scheduled by its own :class:`kvshard.Scheduler` (chunked prefill within the
    ``budget`` tokens of a step, running requests in arrival order, recompute if a pool ever
    runs out); a request joins its pool's scheduler at its ``arrival`` step. Greedy: the
    argmax of each sampled row. ``progress``: called after every step with (steps so far,
    requests finished so far).

    The allocators take ``spec.layer_types`` (:func:`cache_spec`): with layer groups each
    group has its own page table and the sliding ones release the pages that fell out of
    their window. A page id holds ``spec.num_cache_layers`` layers, so the memory held at the
    peak is ``pages * spec.num_cache_layers`` layer-pages.

    ``window``: for a spec without ``layer_types`` (every layer stored as full), the allocator
    releases pages that fell out of it; only valid when every layer attends through that
    window.

    Raises:
      ValueError: ``spec.layer_types`` other than the model's own (before anything is
        allocated).
    """
    check_servable(model.arch)  # before anything is allocated
    if spec.layer_types is not None and tuple(spec.layer_types) != model.arch.layer_types:
        raise ValueError(
            f"spec.layer_types={spec.layer_types!r} differ from the model's layer types "
            f"{model.arch.layer_types!r}"
        )
    pools = int(mesh.shape[data_axis])
    # A request of max_new = 0 is scheduled for one token that is not kept (its prompt's
    # logits are all it needs).
    longest = max(len(r.tokens) + max(r.max_new, 1) for r in requests)
    layer_types, layout = spec.layer_types, None
    if model.arch.mamba is not None:  # a hybrid: state groups in the same pool
        layer_types, layout = _hybrid_layer_types(model.arch, spec), state_layout(model.arch)
    allocators = [
        kvshard.PageAllocator(
            spec.num_pages,
            spec.page_size,
            max_requests=max_seqs,
            max_pages_per_request=-(-longest // spec.page_size),
            sliding_window=window,
            layer_types=layer_types,
        )
        for _ in range(pools)
    ]
    # Every pool padded to one shape (one bucket): one stacked step, one compilation.
    config = kvshard.SchedulerConfig(
        max_num_batched_tokens=budget,
        max_num_seqs=max_seqs,
        decode_first=False,
        preemption_mode="recompute",
        token_buckets=(budget,),
    )
    schedulers = [kvshard.Scheduler(alloc, config) for alloc in allocators]
    cache: Any = kvshard.init_cache(spec, mesh, head_axis=model_axis, page_axis=data_axis)
    if layout is not None:
        state = StateSpec.from_arch(model.arch, spec.num_pages)
        mamba = init_state(state, mesh, head_axis=model_axis, page_axis=data_axis)
        cache = HybridCache(cache, mamba)
    waiting = [sorted(requests[g::pools], key=lambda r: r.arrival) for g in range(pools)]
    by_id: dict[Any, Request] = {r.id: r for r in requests}
    token_sharding = NamedSharding(mesh, P(data_axis, None))
    steps, peak, finished = 0, 0, 0
    while any(waiting) or any(s.has_unfinished_requests() for s in schedulers):
        for g, scheduler in enumerate(schedulers):
            while waiting[g] and waiting[g][0].arrival <= steps:
                r = waiting[g].pop(0)
                scheduler.add_request(
                    kvshard.GenerationRequest(r.id, list(r.tokens), max(r.max_new, 1))
                )
        outs = [s.schedule() for s in schedulers]
        steps += 1
        if not any(out.seq_ids for out in outs):  # nothing has arrived yet
            for scheduler, out in zip(schedulers, outs, strict=True):
                scheduler.update(out, [])
            continue
        peak = max(peak, *(a.num_pages - 1 - a.num_free_pages for a in allocators))
        step = kvshard.stack_steps([out.step for out in outs])
        tokens = jax.device_put(np.stack([out.token_ids for out in outs]), token_sharding)
        copies = [out.copy_pairs for out in outs]  # copy-on-write (none without forks)
        if any(len(c) for c in copies):
            cache = _copy_pages(cache, copies)
        if layout is None:
            logits, cache = serve_step(model, cache, tokens, step)
        else:  # each scheduled sequence's page in each state group
            state_pages = np.zeros((pools, layout.num_state_groups, max_seqs), np.int32)
            for g, (alloc, out) in enumerate(zip(allocators, outs, strict=True)):
                rows = [alloc.row(seq_id) for seq_id in out.seq_ids]
                state_pages[g, :, : len(rows)] = alloc.state_pages(rows)
            pages_on_mesh = jax.device_put(state_pages, NamedSharding(mesh, P(data_axis)))
            step = kv_step(step, layout.num_kv_groups)  # the KV cache's groups only
            logits, cache = serve_step(model, cache, tokens, step, pages_on_mesh)
        logits = np.asarray(logits.astype(jnp.float32))
        for g, (scheduler, out) in enumerate(zip(schedulers, outs, strict=True)):
            cu, positions = out.step.cu_q_lens, out.step.positions
            for i, (req_id, _) in enumerate(out.seq_ids):
                r = by_id[req_id]
                del r.logits[int(positions[cu[i]]) :]  # a recomputed request's rows again
                r.logits.extend(logits[g, cu[i] : cu[i + 1]])
                r.computed = len(r.logits)
            greedy = logits[g, out.sample_rows].argmax(-1)
            for (req_id, _), token in zip(out.sample_seq_ids, greedy.tolist(), strict=True):
                r = by_id[req_id]
                if len(r.tokens) - r.prompt_len < r.max_new:
                    r.tokens.append(token)
            finished += len(scheduler.update(out, greedy))
        if progress is not None:
            progress(steps, finished)
    for r in requests:  # no logits after the last token (N = 0: the prompt's last is unused)
        del r.logits[len(r.tokens) - 1 :]
    return steps, peak


def _hybrid_layer_types(arch, spec: kvshard.CacheSpec) -> tuple:
    """The allocator's layer types of a hybrid: ``("mamba",)`` for its Mamba layers, the KV
    cache's type for its attention layers.

    Raises:
      NotImplementedError: vLLM's grouping of all the layers splits the attention layers
        otherwise than the KV cache's grouping of them alone (more attention than Mamba layers
        by 1.25 times or more): the cache would need the allocator's groups.
    """
    kv_types = spec.layer_types or [("full",)] * len(arch.attention_layers)
    types, attention = list(arch.cache_layer_types), arch.attention_layers
    for k, layer in enumerate(attention):
        types[layer] = tuple(kv_types[k])
    every = cache_groups(tuple(types))
    mine = [
        (t, tuple(attention.index(i) for i in layers))
        for t, layers in zip(every.group_types, every.group_layers, strict=True)
        if not is_state(t)
    ]
    theirs = list(zip(spec.groups.group_types, spec.groups.group_layers, strict=True))
    if mine != theirs:
        raise NotImplementedError(
            f"{arch.model_type}: the pool's attention groups {mine} differ from the KV cache's "
            f"{theirs}; serving needs a KV cache built on the allocator's groups"
        )
    return tuple(types)


def _copy_pages(cache, copies: list[np.ndarray]):
    """The allocators' copy-on-write pairs applied to the KV pages and the state pages (one
    list per pool, padded with no-op rows to one length)."""
    width = max(len(c) for c in copies)
    pairs = np.zeros((len(copies), width, 2), np.int32)
    for g, c in enumerate(copies):
        pairs[g, : len(c)] = c
    if isinstance(cache, HybridCache):
        kv = kvshard.copy_pages(cache.kv, pairs)
        return HybridCache(kv, copy_state_pages(cache.state, pairs))
    return kvshard.copy_pages(cache, pairs)


def dense_logits(model, requests: list[Request]) -> list[np.ndarray]:
    """float32[len(tokens) - 1, vocab] per request: the same model over each whole sequence at
    once (no cache), all requests in one call, right-padded to one length."""
    longest = max(len(r.tokens) for r in requests)
    tokens = np.zeros((len(requests), longest), np.int32)
    for i, r in enumerate(requests):
        tokens[i, : len(r.tokens)] = r.tokens
    positions = np.broadcast_to(np.arange(longest, dtype=np.int32), tokens.shape)
    out = np.asarray(_dense(model, tokens, positions).astype(jnp.float32))
    return [out[i, : len(r.tokens) - 1] for i, r in enumerate(requests)]


@nnx.jit
def _dense(model, tokens, positions):
    return model(tokens, positions)[0]
