"""Compilations over a random serving trace: the bucketing keeps the compiled shapes bounded.

A warm-up runs one step per token bucket (a fresh request prefilling exactly the bucket), then a
random trace of ``--steps`` steps runs through the same path: arrivals with random prompt
lengths (prefilled in chunks within a per-step token budget), decodes of every running request,
random finishes. Every step pads its tokens to a bucket (:func:`kvshard.token_buckets`) and
its metadata to a shape fixed by the bucket (:func:`kvshard.build_step` when present, else
:func:`kvshard.pad_slices`), then runs ``kvshard.update`` on one layer, and
``kvshard.attention`` when the library has it. XLA compilations are counted with a
``jax.monitoring`` listener on ``/jax/core/compile/backend_compile_duration``.

Target: at most 12 distinct compilations in all, none after warm-up.
"""

from __future__ import annotations

from typing import Any

from kvshard.benchmarks._common import (
    jax_machine,
    pyplot,
    save_figure,
    table,
    write_json,
    wrote,
)

NAME = "compilations"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class _Counter:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, event: str, duration_secs: float, **kwargs: str | int) -> None:
        if event == COMPILE_EVENT:
            self.count += 1


def run(outdir: str, *, steps: int, budget: int = 256, seed: int = 0) -> dict[str, Any]:
    import jax
    import numpy as np

    import kvshard

    counter = _Counter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    page, max_reqs, max_pages = 16, 16, 32
    spec = kvshard.CacheSpec(2, 2, 128, page, max_reqs * max_pages + 1, dtype="float32")
    mesh = jax.make_mesh((1,), ("model",), devices=jax.devices()[:1])
    alloc = kvshard.PageAllocator(
        spec.num_pages, page, max_requests=max_reqs, max_pages_per_request=max_pages
    )
    buckets = kvshard.token_buckets(16, budget)
    use_step = hasattr(kvshard, "build_step")
    use_attention = hasattr(kvshard, "attention") and use_step
    before = counter.count
    cache = kvshard.init_cache(spec, mesh, head_axis=None)
    rng = np.random.default_rng(seed)
    heads, dim = spec.num_kv_heads, spec.head_dim

    def step(reqs: list[int], counts: list[int]) -> None:
        nonlocal cache
        rows = alloc.allocate_batch(reqs, counts)
        total = int(sum(counts))
        padded = kvshard.padded_token_count(total, buckets)
        # Host arrays, as a model's k/v would come from its own jit: a committed device array
        # would add a resharding program per bucket.
        k: Any = rng.standard_normal((padded, heads, dim), np.float32)
        if use_step:
            meta = kvshard.build_step(
                alloc, reqs, counts, num_tokens_padded=padded, max_num_seqs=max_reqs
            )
            cache = kvshard.update(cache, 0, k, k, meta)
            if use_attention:
                q: Any = rng.standard_normal((padded, heads, dim), np.float32)
                kvshard.attention(cache, 0, q, meta, sm_scale=dim**-0.5).block_until_ready()
        else:
            computed = alloc.row_num_tokens[rows] - np.asarray(counts)
            slices = kvshard.build_update_slices(
                computed, np.asarray(counts), alloc.page_table, page, rows=rows
            )
            slices, num, _ = kvshard.pad_slices(
                slices, total, max_num_seqs=max_reqs, page_size=page, buckets=buckets
            )
            cache = kvshard.update(cache, 0, k, k, slices, num)
        cache.kv.block_until_ready()

    # Warm-up: one step per bucket, through the same path as the trace.
    for i, b in enumerate(buckets):
        req = 10_000 + i
        step([req], [b])
        alloc.free(req)
    warm = counter.count - before
    # The trace.
    running: dict[int, int] = {}  # request -> tokens still to prefill
    lengths: dict[int, int] = {}
    next_id, per_step, token_counts = 0, [], []
    for _ in range(steps):
        if len(running) < max_reqs and rng.random() < 0.3:
            running[next_id] = int(rng.integers(1, 300))
            lengths[next_id] = 0
            next_id += 1
        reqs, counts, left = [], [], budget
        for req, todo in running.items():
            n = min(todo, left) if todo else min(1, left)
            if n == 0:
                continue
            if lengths[req] + n > (max_pages - 1) * page:
                continue
            reqs.append(req)
            counts.append(n)
            left -= n
        if not reqs:
            per_step.append(0)
            continue
        c0 = counter.count
        step(reqs, counts)
        per_step.append(counter.count - c0)
        token_counts.append(sum(counts))
        for req, n in zip(reqs, counts, strict=True):
            running[req] = max(running[req] - n, 0)
            lengths[req] += n
        for req in list(running):
            full = lengths[req] + 1 > (max_pages - 1) * page
            if full or (running[req] == 0 and rng.random() < 0.05):
                alloc.free(req)
                del running[req], lengths[req]
    jax.monitoring.unregister_event_duration_listener(counter)
    after = sum(per_step)
    machine = jax_machine()
    ops = "update" + (" + attention" if use_attention else "")
    print(f"## compilations over a {steps}-step serving trace ({ops})\n{machine}\n")
    print(
        table(
            ("phase", "steps", "compilations"),
            [
                ("init + warm-up (one step per bucket)", len(buckets), warm),
                ("random trace after warm-up", steps, after),
                ("total", len(buckets) + steps, warm + after),
            ],
            first_width=40,
        )
    )
    print(
        f"\nbuckets {buckets}; tokens per step: mean {np.mean(token_counts):.0f}, "
        f"max {max(token_counts)}; requests served {next_id}; target <= 12 total, 0 after warm-up"
    )
    data = {
        "machine": machine,
        "ops": ops,
        "buckets": buckets,
        "warmup_compilations": warm,
        "trace_compilations": after,
        "steps": steps,
        "requests": next_id,
        "per_step": per_step,
    }
    path = write_json(outdir, NAME, data)
    plt, png = pyplot(), None
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
        ax.plot(np.cumsum(per_step) + warm, label="compilations (cumulative)")
        ax.axhline(12, color="tab:red", linestyle="--", label="target 12")
        ax.set_xlabel("trace step (after warm-up)")
        ax.set_ylabel("compilations")
        ax.set_ylim(0, max(14, warm + after + 2))
        ax.set_title(f"Compilations over a serving trace ({ops})", fontsize=9)
        ax.legend(fontsize=8)
        png = save_figure(fig, outdir, NAME)
    print(wrote(path, png))
    return data
