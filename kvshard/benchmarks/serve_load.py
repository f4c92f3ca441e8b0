"""Load run of ``kvshard serve``: 1, 4 and 16 concurrent streaming clients over loopback.

    python -m kvshard.benchmarks.serve_load [--checkpoint DIR] [--mesh 1x1] [--requests 32]
        [--max-tokens 32] [--concurrency 1 4 16] [--num-pages 64] [--out results/]

The server (engine thread + uvicorn, :mod:`kvshard.server`) runs in this process on
127.0.0.1 (a free port); the clients are asyncio tasks with ``httpx`` streaming
``/v1/completions``. Without ``--checkpoint`` the model is a small Llama with random weights
(:data:`CONFIG`). Every level serves the same ``--requests`` prompts (a shared 32-token system
prefix, then a random suffix) at temperature 0; concurrency 1 is the same engine serving one
request at a time, the baseline. Per level: output tokens/s, time to first token and
inter-token latency (p50/p99, ms), prefix-cache hit tokens and preemptions (from the engine's
counters), and after the level: every request completed with ``max_tokens`` tokens, no live
request, every allocator's ``check_invariants`` and ``usage == 0``. Exits 1 when a check
fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from kvshard.benchmarks._common import simulate_cpu_devices

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "num_hidden_layers": 4,
    "vocab_size": 1024,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="default: random weights of CONFIG")
    parser.add_argument("--mesh", default="1x1", help="DxM")
    parser.add_argument("--requests", type=int, default=32, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--num-pages", type=int, default=64, help="pages per pool")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=256)
    parser.add_argument("--host-memory", help="host tier, e.g. 64MiB (default: recompute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write serve_load.json there")
    return parser.parse_args(argv)


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


async def _client(client, queue: asyncio.Queue, results: list, max_tokens: int) -> None:
    while not queue.empty():
        prompt = queue.get_nowait()
        body = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        start = time.perf_counter()
        stamps, ids, done = [], [], False
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {await response.aread()!r}")
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    new = [t for c in chunk["choices"] for t in c["token_ids"]]
                    if new:
                        stamps.append(time.perf_counter())
                        ids += new
        results.append({"start": start, "stamps": stamps, "tokens": len(ids), "done": done})


async def _level(base_url: str, prompts: list[list[int]], concurrency: int, max_tokens: int):
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(
            *(_client(client, queue, results, max_tokens) for _ in range(concurrency))
        )
        wall = time.perf_counter() - start
    return results, wall


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dp, tp = (int(x) for x in args.mesh.lower().split("x"))
    simulate_cpu_devices(max(dp * tp, 1))
    import numpy as np
    from flax import nnx

    from kvshard import models
    from kvshard.benchmarks._common import jax_machine, table, write_json
    from kvshard.cli import parse_bytes
    from kvshard.server.engine import make_mesh
    from kvshard.server.main import serve_in_thread, start_app

    mesh = make_mesh(dp, tp)
    if args.checkpoint:
        model = models.load_checkpoint(args.checkpoint, mesh)
    else:
        arch = models.read_architecture(CONFIG)
        model = models.shard_model(models.CausalLM(arch, nnx.Rngs(args.seed)), mesh)
    app, loop = start_app(
        model,
        mesh,
        "bench",
        None,
        max_num_seqs=args.max_num_seqs,
        page_size=args.page_size,
        num_pages=args.num_pages,
        max_num_batched_tokens=args.max_num_batched_tokens,
        host_memory=parse_bytes(args.host_memory) if args.host_memory else 0,
    )
    server, port = serve_in_thread(app)
    base_url = f"http://127.0.0.1:{port}"
    rng = np.random.default_rng(args.seed)
    vocab = model.arch.vocab_size
    system = rng.integers(1, vocab, 32).tolist()
    prompts = [
        system + rng.integers(1, vocab, int(n)).tolist() for n in rng.integers(8, 40, args.requests)
    ]
    print(f"# serve load: {jax_machine()}", flush=True)
    print("warming up (compiling every token bucket)", flush=True)
    asyncio.run(_level(base_url, prompts[:8], 8, 4))
    levels: list[dict[str, Any]] = []
    rows, ok = [], True
    report = {"machine": jax_machine(), "args": vars(args), "levels": levels}
    base_tps = None
    for concurrency in args.concurrency:
        before = loop.metrics
        results, wall = asyncio.run(_level(base_url, prompts, concurrency, args.max_tokens))
        after = loop.metrics
        tokens = sum(r["tokens"] for r in results)
        ttft = [1e3 * (r["stamps"][0] - r["start"]) for r in results if r["stamps"]]
        itl = [1e3 * float(d) for r in results for d in np.diff(r["stamps"])]
        state = loop.call(lambda e: (e.has_unfinished_requests(), [a.usage for a in e.allocators]))
        loop.call(lambda e: e.check_invariants())
        complete = len(results) == len(prompts) and all(
            r["done"] and r["tokens"] == args.max_tokens for r in results
        )
        leaked = state[0] or any(u != 0 for u in state[1])
        ok &= complete and not leaked
        tps = tokens / wall
        base_tps = base_tps or tps
        level = {
            "concurrency": concurrency,
            "requests": len(results),
            "output_tokens": tokens,
            "wall_s": wall,
            "tokens_per_s": tps,
            "speedup_vs_one_at_a_time": tps / base_tps,
            "ttft_ms_p50": _percentile(ttft, 50),
            "ttft_ms_p99": _percentile(ttft, 99),
            "itl_ms_p50": _percentile(itl, 50),
            "itl_ms_p99": _percentile(itl, 99),
            "prefix_hit_tokens": after["prefix_cache_hits"] - before["prefix_cache_hits"],
            "prefix_query_tokens": after["prefix_cache_queries"] - before["prefix_cache_queries"],
            "preemptions": after["num_preemptions"] - before["num_preemptions"],
            "all_completed": complete,
            "pages_leaked": leaked,
        }
        levels.append(level)
        rows.append(
            [
                concurrency,
                f"{tps:.1f}",
                f"{tps / base_tps:.2f}x",
                f"{level['ttft_ms_p50']:.0f} / {level['ttft_ms_p99']:.0f}",
                f"{level['itl_ms_p50']:.0f} / {level['itl_ms_p99']:.0f}",
                f"{level['prefix_hit_tokens']} / {level['prefix_query_tokens']}",
                level["preemptions"],
                "yes" if complete else "NO",
                "no" if not leaked else "YES",
            ]
        )
        print(f"concurrency {concurrency}: {tps:.1f} tok/s", flush=True)
    server.should_exit = True
    loop.stop()
    print(
        table(
            [
                "clients",
                "out tok/s",
                "vs 1",
                "TTFT p50/p99 ms",
                "ITL p50/p99 ms",
                "prefix hits/queried",
                "preempt",
                "completed",
                "leak",
            ],
            rows,
            first_width=8,
        )
    )
    if args.out:
        print(f"wrote {write_json(args.out, 'serve_load', report)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
