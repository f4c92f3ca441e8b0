"""A serving trace on a device pool too small for it: what the host tier buys.

(a) **Preemption.** R requests (a prompt of P tokens, then D decode tokens each) share a pool
that holds only two of them; they run two at a time, and every Q steps the one that ran
longest is preempted and the one that waited longest resumes. *recompute*: a preempted
request is freed and, when it resumes, recomputes every token it held (chunked prefill);
*swap*: it is swapped out (``swap_out_request`` -> ``kvshard.swap_out``) and back in
(``swap_in_request`` -> ``kvshard.swap_in``) into new device pages. Every step runs the
cache's work for its tokens: ``kvshard.update`` and ``kvshard.attention`` of every layer (the
model's matmuls are not run, so the recompute side is a lower bound on its real cost).

(b) **Prefix hits.** S system prompts of P tokens, each request one of them (round robin)
plus its own suffix, on a pool that holds fewer pages than the S prompts: the device prefix
cache evicts each prompt before it returns. With ``host_prefix_pages=0`` the evicted pages are
gone; with a host prefix cache they are kept in host memory and a later hit swaps them in.

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


def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


class _Engine:
    """A cache, its host tier and an allocator; ``step`` runs one step in the documented order
    (swap-outs, swap-ins, copies, update, attention)."""

    def __init__(self, cfg: dict[str, Any], num_pages: int, host_pages: int, **alloc_kw):
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
        self.k_pad = num_pages  # a device page moves at most once a step
        self.rng = np.random.default_rng(0)
        self.swapped_pages = 0

    def _pad(self, pairs, value):
        np = self.np
        return np.concatenate([pairs, np.full((self.k_pad - len(pairs), 2), value, np.int32)])

    def step(self, reqs: list, counts: list[int]) -> None:
        kvshard, np = self.kvshard, self.np
        rows = self.alloc.allocate_batch(reqs, counts)
        out, into = self.alloc.take_pending_swaps()
        self.swapped_pages += len(out) + len(into)
        self.cache, self.host = kvshard.swap_out(self.cache, self.host, self._pad(out, -1))
        self.cache, self.host = kvshard.swap_in(self.cache, self.host, self._pad(into, -1))
        self.cache = kvshard.copy_pages(self.cache, self._pad(self.alloc.take_pending_copies(), 0))
        step = kvshard.build_step(self.alloc, reqs, counts, rows=rows, max_num_seqs=4)
        tokens, dim = step.geometry.num_tokens_padded, self.cfg["head_dim"]
        kv = self.rng.standard_normal((2, tokens, HEADS, dim), dtype=np.float32)
        q = self.rng.standard_normal((tokens, Q_HEADS, dim), dtype=np.float32)
        for layer in range(self.cfg["layers"]):
            self.cache = kvshard.update(self.cache, layer, kv[0], kv[1], step)
            out_q = kvshard.attention(self.cache, layer, q, step, sm_scale=dim**-0.5)
        self.jax.block_until_ready(out_q)

    def prefill(self, reqs: list, held: dict, target: dict) -> None:
        """Steps until each of ``reqs`` holds ``target`` tokens, ``chunk`` tokens a step."""
        while any(held[r] < target[r] for r in reqs):
            todo = [r for r in reqs if held[r] < target[r]]
            counts = [min(self.cfg["chunk"], target[r] - held[r]) for r in todo]
            self.step(todo, counts)
            for r, n in zip(todo, counts, strict=True):
                held[r] += n


def preemption_trace(cfg: dict[str, Any], mode: str) -> dict[str, Any]:
    """Part (a), one whole trace; returns its time and counters."""
    page, total = cfg["page_size"], cfg["prompt"] + cfg["decode"]
    per_request = -(-total // page)
    engine = _Engine(cfg, 2 * per_request + 1, cfg["requests"] * per_request + 1)
    alloc = engine.alloc
    waiting, running = list(range(cfg["requests"])), list[int]()
    held: dict[int, int] = {}
    recomputed = ticks = 0
    start = time.perf_counter()
    while waiting or running:
        if ticks % cfg["quantum"] == 0 and waiting:
            if len(running) == 2:  # preempt the one that ran longest
                victim = running.pop(0)
                if mode == "swap":
                    alloc.swap_out_request(victim)
                else:
                    alloc.free(victim)
                waiting.append(victim)
            while len(running) < 2 and waiting:
                nxt = waiting.pop(0)
                if nxt in held and mode == "swap":
                    alloc.swap_in_request(nxt)
                elif nxt in held:  # recompute what it held
                    recomputed += held[nxt]
                    lost = {nxt: 0}
                    engine.prefill([nxt], lost, dict(held))
                else:
                    held[nxt] = 0
                    engine.prefill([nxt], held, {nxt: cfg["prompt"]})
                running.append(nxt)
        engine.step(running, [1] * len(running))
        ticks += 1
        for r in list(running):
            held[r] += 1
            if held[r] >= total:
                running.remove(r)
                alloc.free(r)
    return {
        "seconds": time.perf_counter() - start,
        "recomputed_tokens": recomputed,
        "swapped_pages": engine.swapped_pages,
        "decode_steps": ticks,
        "device_pages": engine.alloc.num_pages,
        "context_pages": cfg["requests"] * per_request,
    }


def prefix_trace(cfg: dict[str, Any], host_prefix_pages: int) -> dict[str, Any]:
    """Part (b), one whole trace with the given host prefix capacity."""
    np, page = __import__("numpy"), cfg["page_size"]
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 1000, cfg["prompt"]).tolist() for _ in range(cfg["prompts"])]
    prompt_pages = cfg["prompt"] // page
    num_pages = prompt_pages * (cfg["prompts"] - 1) // 2 + 2 * prompt_pages + 1
    engine = _Engine(
        cfg, num_pages, host_prefix_pages + 1 if host_prefix_pages else 0,
        enable_prefix_caching=True, host_prefix_pages=host_prefix_pages,
    )  # fmt: skip
    alloc, computed = engine.alloc, 0
    start = time.perf_counter()
    for i in range(cfg["prompts"] * cfg["visits"]):
        ids = prompts[i % cfg["prompts"]] + rng.integers(1000, 2000, page).tolist()
        hit = alloc.lookup_prefix(i, ids)
        held = {i: hit}
        engine.prefill([i], held, {i: len(ids)})  # the hit pages swap in with the first step
        computed += len(ids) - hit
        alloc.commit_prefix(i, ids)
        alloc.free(i)
    stats = alloc.tier_stats
    return {
        "seconds": time.perf_counter() - start,
        "hit_tokens": alloc.prefix_stats["hits"],
        "host_hit_tokens": stats["host_hits"],
        "computed_tokens": computed,
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
        f"({a[0]['context_pages']} pages) on {a[0]['device_pages']} device pages, 2 running, "
        f"preempted every {cfg['quantum']} steps"
    )
    header_a = ("policy", "trace ms median [min-max]", "tokens recomputed", "pages swapped")
    print(table(header_a, [(n, _cell(r), r["recomputed_tokens"], r["swapped_pages"])
                         for n, r in zip(("recompute", "swap"), a, strict=True)], 12))  # fmt: skip
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
    common = {"layers": 2, "head_dim": 64, "page_size": 16, "quantum": 8}
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
                      prompts=3, visits=2, max_tokens=12, quantum=2, rounds=1)  # fmt: skip
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error(f"--rounds {args.rounds} must be positive")
        chosen["rounds"] = args.rounds
    return run(args.out, **chosen)


if __name__ == "__main__":
    main()
