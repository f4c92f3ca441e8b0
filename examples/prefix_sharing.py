"""Many requests share one system prompt: prefix caching reuses its KV pages instead of copies.

The same workload is served twice on 8 CPU devices (the model and engine of tp_decode.py):
once with a plain :class:`kvshard.PageAllocator`, once with
``PageAllocator(enable_prefix_caching=True)``, where each request's computed full pages are
registered with ``commit_prefix`` and every new request attaches the cached pages of its prompt
with ``lookup_prefix`` (reference counted; its prefill starts after them). The script prints the
pages and bytes per device saved at peak and the prefill tokens not recomputed, and checks

* both runs against the dense float64 model (every computed position, max abs diff <= 1e-4);
* the runs against each other: identical greedy tokens and sampled logits within 1e-4;
* that the cached requests really point at the first request's system-prompt pages.

Exits 1 on any mismatch.

    python examples/prefix_sharing.py [--num-requests 8] [--system-len 64] [--layers 4]
                                      [--kv-heads 2] [--page-size 16] [--seed 0]
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

import numpy as np

from kvshard._demo.model import (
    TOLERANCE,
    CompileCounter,
    Engine,
    ModelConfig,
    Request,
    RunStats,
    init_params,
    make_mesh,
    make_requests,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=8)
    parser.add_argument("--system-len", type=int, default=64, help="shared prompt tokens")
    parser.add_argument("--steps", type=int, default=64, help="most scheduler steps per run")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2, choices=(1, 2, 4, 8))
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tolerance", type=float, default=TOLERANCE, help="max abs logits diff allowed"
    )
    return parser.parse_args(argv)


def workload(args: argparse.Namespace, vocab: int) -> list[Request]:
    """Fresh requests (same seed -> same prompts) for one run.

    Request 0 arrives alone at step 0; the others arrive from step 1 on, after request 0's
    first prefill chunk has committed the system prompt's pages (requests admitted in the same
    step as the first one would all miss, as in any prefix cache).
    """
    rng = np.random.default_rng(args.seed)
    system_prompt = rng.integers(1, vocab, args.system_len)
    arrivals = [0] + [1 + i // 2 for i in range(args.num_requests - 1)]
    return make_requests(
        rng,
        args.num_requests,
        vocab,
        system_prompt=system_prompt,
        suffix_len=(4, 16),
        new_tokens=(4, 12),
        arrivals=arrivals,
    )


def serve(args, cfg, params, mesh, prefix_caching: bool) -> tuple[Engine, list[Request], RunStats]:
    requests = workload(args, cfg.vocab)
    max_context = max(len(r.prompt) + r.max_new_tokens for r in requests)
    pages_per_request = -(-max_context // args.page_size)
    engine = Engine(
        cfg,
        params,
        mesh,
        page_size=args.page_size,
        # Room for 8 requests without sharing, so both runs admit the same requests when they
        # arrive and the peak difference is the sharing alone.
        num_pages=8 * pages_per_request + 1,
        max_requests=8,
        max_context=max_context,
        max_tokens_per_step=64,
        prefix_caching=prefix_caching,
    )
    name = "with prefix caching" if prefix_caching else "no prefix caching"
    stats = engine.run(requests, args.steps, desc=name)
    return engine, requests, stats


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    compiles = CompileCounter()
    cfg = ModelConfig(num_layers=args.layers, num_kv_heads=args.kv_heads)
    mesh = make_mesh()
    params = init_params(cfg, args.seed)
    tp = int(mesh.shape["model"])

    _, plain_reqs, plain = serve(args, cfg, params, mesh, prefix_caching=False)
    engine, shared_reqs, shared = serve(args, cfg, params, mesh, prefix_caching=True)

    failures = []
    for name, stats in (("no prefix caching", plain), ("with prefix caching", shared)):
        print(
            f"{name + ':':21} peak pages {stats.peak_pages:3d}, prefill+decode tokens computed "
            f"{stats.tokens_computed:4d}, generated {stats.tokens_generated}, "
            f"max abs diff vs dense {stats.max_abs_diff:.2e}, {stats.wall_s:.1f} s"
        )
        if stats.max_abs_diff > args.tolerance:
            failures.append(f"{name}: logits differ from the dense model")
    unfinished = [r.rid for r in plain_reqs + shared_reqs if not r.finished]
    if unfinished:
        failures.append(f"requests {sorted(set(unfinished))} did not finish; raise --steps")

    # The two runs must generate the same tokens from (numerically) the same logits.
    same_tokens = all(
        a.generated == b.generated for a, b in zip(plain_reqs, shared_reqs, strict=True)
    )
    run_diff = max(
        (
            float(np.max(np.abs(np.stack(a.sampled_logits) - np.stack(b.sampled_logits))))
            for a, b in zip(plain_reqs, shared_reqs, strict=True)
            if a.sampled_logits and len(a.sampled_logits) == len(b.sampled_logits)
        ),
        default=0.0,
    )
    if not same_tokens:
        failures.append("generated tokens differ between the runs")
    if run_diff > args.tolerance:
        failures.append(f"sampled logits differ between the runs by {run_diff:.2e}")

    # Every request that hit must hold request 0's system-prompt pages.
    system_pages = args.system_len // args.page_size
    hit_reqs = [r for r in shared_reqs if r.prefix_hit]
    page_sets = {tuple(r.shared_pages[:system_pages].tolist()) for r in hit_reqs}
    if hit_reqs and len(page_sets) != 1:
        failures.append(f"cached requests attached different system-prompt pages: {page_sets}")

    page_bytes = engine.spec.page_bytes_per_device(tp)  # one page of one layer, one device
    saved_pages = plain.peak_pages - shared.peak_pages
    saved_bytes = saved_pages * page_bytes * cfg.num_layers
    prefix = shared.prefix_stats
    print(
        f"prefix cache:          {prefix['hits']} of {prefix['queries']} prompt tokens hit "
        f"({len(hit_reqs)} of {len(shared_reqs)} requests; system prompt {args.system_len} "
        f"tokens = {system_pages} pages of {args.page_size})"
    )
    if page_sets:
        print(f"shared pages:          {sorted(page_sets)[0]} held by {len(hit_reqs)} requests")
    print(
        f"memory saved:          {saved_pages} pages at peak ({plain.peak_pages} -> "
        f"{shared.peak_pages}) = {saved_bytes} bytes per device ({saved_bytes / 2**10:.0f} KiB; "
        f"{page_bytes} bytes per page per layer x {cfg.num_layers} layers)"
    )
    print(
        f"prefill saved:         {plain.tokens_computed - shared.tokens_computed} tokens not "
        f"recomputed"
    )
    print(
        f"outputs:               generated tokens identical: {same_tokens}; max sampled-logit "
        f"diff between runs {run_diff:.2e}"
    )
    print(f"compilations:          XLA total {compiles.count}")
    print(f"wall time:             {time.perf_counter() - start:.1f} s")
    for failure in failures:
        print(f"FAILED: {failure}")
    if not failures:
        print("OK")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
