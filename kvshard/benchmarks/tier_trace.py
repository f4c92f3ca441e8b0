"""A serving trace on a device pool too small for it: what the host tier buys.

Every trace is driven by :class:`kvshard.Scheduler` over a :class:`kvshard.PageAllocator`; each
step applies the :class:`kvshard.SchedulerOutput`'s pairs in the documented order
(``kvshard.swap_out``, ``kvshard.swap_in``, ``kvshard.copy_pages``, padded to a fixed count)
and runs the cache's work for its tokens: ``kvshard.update`` and ``kvshard.attention`` of
every layer (the model's matmuls are not run, so the recompute side is a lower bound on its
real cost). Every request generates its tokens greedily from random "logits" (seeded), so
both sides of a comparison schedule the same work.

(a) **Preemption.** R requests (a prompt of P tokens, then D decode tokens each), all queued
at once, on a pool one page short of two whole requests: as the running requests grow, the
pool runs out and the scheduler preempts the latest arrival
(``SchedulerConfig.preemption_mode``). *recompute*: the victim is freed and recomputes every
token it held when re-admitted (chunked prefill); *swap*: it is swapped out to the host tier
and back in into new device pages.

(b) **Prefix hits.** S system prompts of P tokens, each request one of them (round robin)
plus its own suffix, served one at a time (``max_num_seqs=1``) on a pool that holds fewer
pages than the S prompts: the device prefix cache evicts each prompt before it returns. With
``host_prefix_pages=0`` the evicted pages are gone; with a host prefix cache they are kept in
host memory and a later hit swaps them in.

Both run interleaved round after round (the first round is a warm-up and compiles), and report
the median and spread (min - max) of a whole trace's time; tokens recomputed, hit and swapped
are deterministic. The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from kvshard.benchmarks._common import jax_machine, table, write_json

NAME = "tier_trace"
HEADS, Q_HEADS = 4, 8
VOCAB = 1000  # prompt ids and the random "sampled" ids


def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


class _Engine:
    """A cache, its host tier, an allocator and its :class:`kvshard.Scheduler`; ``run`` serves
    every queued request to the end, one step at a time."""

    def __init__(
        self, cfg: dict[str, Any], num_pages: int, host_pages: int, sched: dict, **alloc_kw
    ):
        import jax
        import numpy as np

        import kvshard

        self.kvshard, self.np, self.jax = kvshard, np, jax
        self.cfg, page = cfg, cfg["page_size"]
        spec = kvshard.CacheSpec(
            num_layers=cfg["layers"], num_kv_heads=HEADS, head_dim=cfg["head_dim"],
            page_size=page, num_pages=num_pages, dtype="float32",
        )  # fmt: skip
        mesh = jax.make_mesh((1,), ("model",), devices=jax.devices()[:1])
        self.cache = kvshard.init_cache(spec, mesh)
        self.host = kvshard.init_host_cache(spec, mesh, max(host_pages, 2))
        self.alloc = kvshard.PageAllocator(
            num_pages, page, max_requests=max(cfg["requests"], 4),  # swapped-out rows stay
            max_pages_per_request=-(-cfg["max_tokens"] // page),
            num_host_pages=host_pages, **alloc_kw,
        )  # fmt: skip
        config = kvshard.SchedulerConfig(
            max_num_batched_tokens=cfg["chunk"], vocab_size=VOCAB, **sched
        )
        self.scheduler = kvshard.Scheduler(self.alloc, config)
        self.k_pad = num_pages  # a device page moves at most once a step
        self.rng = np.random.default_rng(0)
        self.swapped_pages = self.computed_tokens = self.steps = 0

    def _pad(self, pairs, value):
        np = self.np
        return np.concatenate([pairs, np.full((self.k_pad - len(pairs), 2), value, np.int32)])

    def step(self) -> None:
        """One scheduled step: the output's pairs in order, then every layer's update and
        attention; greedy tokens from random logits back to the scheduler."""
        kvshard, np = self.kvshard, self.np
        out = self.scheduler.schedule()
        self.swapped_pages += len(out.swap_out_pairs) + len(out.swap_in_pairs)
        self.computed_tokens += out.num_tokens
        self.steps += 1
        self.cache, self.host = kvshard.swap_out(
            self.cache, self.host, self._pad(out.swap_out_pairs, -1)
        )
        self.cache, self.host = kvshard.swap_in(
            self.cache, self.host, self._pad(out.swap_in_pairs, -1)
        )
        self.cache = kvshard.copy_pages(self.cache, self._pad(out.copy_pairs, 0))
        step, tokens, dim = out.step, len(out.token_ids), self.cfg["head_dim"]
        kv = self.rng.standard_normal((2, tokens, HEADS, dim), dtype=np.float32)
        q = self.rng.standard_normal((tokens, Q_HEADS, dim), dtype=np.float32)
        for layer in range(self.cfg["layers"]):
            self.cache = kvshard.update(self.cache, layer, kv[0], kv[1], step)
            out_q = kvshard.attention(self.cache, layer, q, step, sm_scale=dim**-0.5)
        self.jax.block_until_ready(out_q)
        self.scheduler.update(out, self.rng.integers(0, VOCAB, len(out.sample_rows)))

    def run(self) -> None:
        while self.scheduler.has_unfinished_requests():
            self.step()


def preemption_trace(cfg: dict[str, Any], mode: str) -> dict[str, Any]:
    """Part (a), one whole trace; returns its time and counters."""
    import kvshard

    page, total = cfg["page_size"], cfg["prompt"] + cfg["decode"]
    per_request = -(-total // page)
    sched = {"max_num_seqs": 4, "preemption_mode": mode}
    engine = _Engine(cfg, 2 * per_request, cfg["requests"] * per_request + 1, sched)
    rng = __import__("numpy").random.default_rng(2)
    for r in range(cfg["requests"]):
        prompt = rng.integers(0, VOCAB, cfg["prompt"]).tolist()
        engine.scheduler.add_request(kvshard.GenerationRequest(r, prompt, cfg["decode"]))
    start = time.perf_counter()
    engine.run()
    seconds = time.perf_counter() - start
    engine.alloc.check_invariants()
    stats = engine.scheduler.stats
    return {
        "seconds": seconds,
        # Every request computes its prompt and all but its last token once; the rest again.
        "recomputed_tokens": engine.computed_tokens - cfg["requests"] * (total - 1),
        "swapped_pages": engine.swapped_pages,
        "preempted_swap": stats["preempted_swap"],
        "preempted_recompute": stats["preempted_recompute"],
        "steps": engine.steps,
        "device_pages": engine.alloc.num_pages,
        "context_pages": cfg["requests"] * per_request,
    }


def prefix_trace(cfg: dict[str, Any], host_prefix_pages: int) -> dict[str, Any]:
    """Part (b), one whole trace with the given host prefix capacity."""
    import kvshard

    np, page = __import__("numpy"), cfg["page_size"]
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, VOCAB, cfg["prompt"]).tolist() for _ in range(cfg["prompts"])]
    prompt_pages = cfg["prompt"] // page
    num_pages = prompt_pages * (cfg["prompts"] - 1) // 2 + 2 * prompt_pages + 1
    engine = _Engine(
        cfg, num_pages, host_prefix_pages + 1 if host_prefix_pages else 0, {"max_num_seqs": 1},
        enable_prefix_caching=True, host_prefix_pages=host_prefix_pages,
    )  # fmt: skip
    for i in range(cfg["prompts"] * cfg["visits"]):  # served one at a time, in this order
        ids = prompts[i % cfg["prompts"]] + rng.integers(0, VOCAB, page).tolist()
        engine.scheduler.add_request(kvshard.GenerationRequest(i, ids, max_new_tokens=1))
    start = time.perf_counter()
    engine.run()  # each request's prompt, then its one sampled token
    seconds = time.perf_counter() - start
    engine.alloc.check_invariants()
    stats = engine.alloc.tier_stats
    return {
        "seconds": seconds,
        "hit_tokens": engine.alloc.prefix_stats["hits"],
        "host_hit_tokens": stats["host_hits"],
        "computed_tokens": engine.computed_tokens,
        "swapped_pages": engine.swapped_pages,
        "device_pages": num_pages,
        "prompt_pages": cfg["prompts"] * prompt_pages,
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    times = [r["seconds"] for r in runs]
    row = {k: v for k, v in runs[-1].items() if k != "seconds"}
    row.update(median_s=statistics.median(times), min_s=min(times), max_s=max(times))
    return row


def _cell(r: dict[str, Any]) -> str:
    return f"{r['median_s'] * 1e3:.0f} [{r['min_s'] * 1e3:.0f}-{r['max_s'] * 1e3:.0f}]"


def run(outdir: str, *, rounds: int, **cfg: Any) -> dict[str, Any]:
    machine, load_before = jax_machine(), _load()
    sides = {
        "recompute": lambda: preemption_trace(cfg, "recompute"),
        "swap": lambda: preemption_trace(cfg, "swap"),
        "no host tier": lambda: prefix_trace(cfg, 0),
        "host prefix cache": lambda: prefix_trace(
            cfg, cfg["prompts"] * cfg["prompt"] // cfg["page_size"]
        ),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    for r in range(rounds + 1):  # round 0: warm-up (compiles), not counted
        for name, fn in sides.items():
            result = fn()
            if r:
                runs[name].append(result)
    rows = {name: _summary(v) for name, v in runs.items()}
    load_after = _load()
    print(f"## tier trace: a device pool too small for the workload\n{machine}")
    print(
        f"{cfg['layers']} layers, {HEADS} KV heads, head_dim {cfg['head_dim']}, page_size "
        f"{cfg['page_size']}, float32, 1 device; {rounds} interleaved rounds after a warm-up; "
        f"load average (1/5/15 min) before {load_before}, after {load_after}\n"
    )
    a = [rows["recompute"], rows["swap"]]
    print(
        f"(a) {cfg['requests']} requests of {cfg['prompt']} + {cfg['decode']} tokens "
        f"({a[0]['context_pages']} pages) on {a[0]['device_pages']} device pages, "
        f"kvshard.Scheduler, {cfg['chunk']} tokens a step"
    )
    header_a = ("policy", "trace ms median [min-max]", "preempted swap/recompute",
                "tokens recomputed", "pages swapped", "steps")  # fmt: skip
    rows_a = [
        (n, _cell(r), f"{r['preempted_swap']}/{r['preempted_recompute']}",
         r["recomputed_tokens"], r["swapped_pages"], r["steps"])
        for n, r in zip(("recompute", "swap"), a, strict=True)
    ]  # fmt: skip
    print(table(header_a, rows_a, 12))
    b = [rows["no host tier"], rows["host prefix cache"]]
    print(
        f"\n(b) {cfg['prompts']} system prompts of {cfg['prompt']} tokens "
        f"({b[0]['prompt_pages']} pages), {cfg['visits']} visits each, on {b[0]['device_pages']} "
        "device pages"
    )
    header = ("host tier", "trace ms median [min-max]", "hit tokens", "of them host", "computed")
    print(table(header, [(n, _cell(r), r["hit_tokens"], r["host_hit_tokens"],
                          r["computed_tokens"]) for n, r in zip(
                              ("none", "prefix cache"), b, strict=True)], 14))  # fmt: skip
    data = {"machine": machine, "load_before": load_before, "load_after": load_after,
            "rounds": rounds, "config": cfg, "rows": rows}  # fmt: skip
    path = write_json(outdir, NAME, data)
    print(f"\nwrote {path}")
    return data


def settings(quick: bool) -> dict[str, Any]:
    common = {"layers": 2, "head_dim": 64, "page_size": 16}
    if quick:
        return {**common, "requests": 4, "prompt": 128, "decode": 16, "chunk": 64,
                "prompts": 4, "visits": 2, "max_tokens": 160, "rounds": 2}  # fmt: skip
    return {**common, "requests": 6, "prompt": 256, "decode": 32, "chunk": 128,
            "prompts": 6, "visits": 3, "max_tokens": 288, "rounds": 5}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m kvshard.benchmarks.tier_trace``: this benchmark alone."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes (the test suite)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds after the warm-up")
    parser.add_argument("--out", default="bench-results", help="results folder")
    args = parser.parse_args(argv)
    chosen = settings(args.quick or args.tiny)
    if args.tiny:
        chosen.update(head_dim=16, page_size=4, requests=3, prompt=8, decode=4, chunk=8,
                      prompts=3, visits=2, max_tokens=16, rounds=1)  # fmt: skip
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error(f"--rounds {args.rounds} must be positive")
        chosen["rounds"] = args.rounds
    return run(args.out, **chosen)


if __name__ == "__main__":
    main()
