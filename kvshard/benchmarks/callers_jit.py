"""kvshard inside the caller's own jit: a bf16 model's layers in a ``lax.scan``, cache donated.

The pattern a serving loop runs: one ``jax.jit(forward, donate_argnums=0)`` whose body scans
over the layers; each layer projects bf16 activations with bf16 weights (so XLA's CPU float
normalization stays on, as it must for a model computing in bf16), then calls
``kvshard.update`` and ``kvshard.attention`` on the layer. Rows, per cache dtype:

- **kvshard**: the cache as :func:`kvshard.init_cache` builds it (on CPU a bfloat16/float8
  cache stores its bits as uint16/uint8: :mod:`kvshard._device.storage`);
- **native**: the same cache stored in its own dtype (``init_cache(..., platform="gpu")``, the
  storage GPUs and TPUs use): what a bf16 cache costs on CPU without the storage trick.

Columns: compiled temporaries (``memory_analysis()``, against the cache's bytes: in place means
well under 1x), and the step's time over interleaved rounds (every variant once per round, so
a load spike hits all of them), median and spread (min to max), with the load printed.
A second table gives the host share of the eager ``update``/``attention`` call at decode.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from kvshard.benchmarks._common import interleaved, jax_machine, table, unit_scales, write_json

NAME = "callers_jit"
HEADS, DIM, HIDDEN, PAGE = 2, 128, 256, 16


def decode_forward(spec: Any, mesh: Any, requests: int, context: int, *, platform=None):
    """(jitted forward, example arguments, cache): ``requests`` requests decoding one token
    each with ``context`` tokens held; weights and activations bf16; the cache donated.

    ``platform`` is handed to :func:`kvshard.abstract_cache` (None: the mesh's storage)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import kvshard

    layers, tokens = spec.num_layers, requests
    alloc = kvshard.PageAllocator(
        spec.num_pages, PAGE, max_requests=requests, max_pages_per_request=-(-context // PAGE)
    )
    ids = list(range(requests))
    alloc.allocate_batch(ids, [context] * requests)
    step = kvshard.build_step(alloc, ids, [1] * requests, num_tokens_padded=tokens)
    step = jax.tree.map(jnp.asarray, step)

    def forward(cache, x, w, step):
        def layer(carry, i):
            cache, x = carry
            qkv = (x @ w[i]).reshape(tokens, 3, HEADS, DIM)  # a bf16 dot
            cache = kvshard.update(cache, i, qkv[:, 1], qkv[:, 2], step)
            out = kvshard.attention(cache, i, qkv[:, 0], step, sm_scale=DIM**-0.5)
            return (cache, x + out.reshape(tokens, HEADS * DIM)[:, :HIDDEN]), None

        (cache, x), _ = jax.lax.scan(layer, (cache, x), jnp.arange(layers))
        return cache, x

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((tokens, HIDDEN)), jnp.bfloat16)
    w = jnp.asarray(0.05 * rng.standard_normal((layers, HIDDEN, 3 * HEADS * DIM)), jnp.bfloat16)
    cache = kvshard.abstract_cache(spec, mesh, platform=platform)
    return jax.jit(forward, donate_argnums=0), (x, w, step), cache


def sized_spec(dtype: str, cache_mib: int, layers: int = 2) -> Any:
    """A ``layers``-layer spec of about ``cache_mib`` MiB (2 KV heads, head_dim 128)."""
    import numpy as np

    from kvshard import CacheSpec

    page_bytes = layers * PAGE * 2 * HEADS * DIM * np.dtype(dtype).itemsize
    pages = max(64, cache_mib * 2**20 // page_bytes)
    return CacheSpec(layers, HEADS, DIM, PAGE, int(pages), dtype=dtype, **unit_scales(dtype))


def temporaries(dtype: str, *, cache_mib: int = 64, platform=None, requests: int = 8) -> dict:
    """Compiled memory of the decode forward (nothing allocated): temp / alias / cache bytes."""
    import jax

    spec = sized_spec(dtype, cache_mib)
    mesh = jax.make_mesh((1,), ("model",), devices=jax.devices()[:1])
    fn, args, cache = decode_forward(spec, mesh, requests, 200, platform=platform)
    mem = fn.lower(cache, *args).compile().memory_analysis()
    return {
        "cache_bytes": spec.bytes_per_device(1),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
    }


def run(
    outdir: str,
    *,
    dtypes: list[str],
    cache_mib: int,
    requests: int,
    rounds: int,
) -> dict[str, Any]:
    """The table: for each dtype, kvshard's storage and native storage."""
    import jax

    import kvshard

    mesh = jax.make_mesh((1,), ("model",), devices=jax.devices()[:1])
    variants = []
    for dtype in dtypes:
        for storage, platform in (("kvshard", None), ("native", "gpu")):
            if storage == "native" and kvshard.init_cache(
                sized_spec(dtype, 1), mesh
            ).kv.dtype == jax.numpy.dtype(dtype):
                continue  # already native here: the same row twice
            spec = sized_spec(dtype, cache_mib, layers=4)
            fn, args, abstract = decode_forward(spec, mesh, requests, 256, platform=platform)
            compiled = fn.lower(abstract, *args).compile()
            mem = compiled.memory_analysis()
            state = {"cache": kvshard.init_cache(spec, mesh, platform=platform)}
            variants.append(
                {
                    "dtype": dtype,
                    "storage": str(state["cache"].kv.dtype),
                    "cache_bytes": spec.bytes_per_device(1),
                    "temp_bytes": int(mem.temp_size_in_bytes),
                    "alias_bytes": int(mem.alias_size_in_bytes),
                    "call": (compiled, args, state),
                    "times": [],
                }
            )
    loads = []
    for _ in range(rounds + 1):  # round 0 warms up, untimed
        loads.append(_load())
        for v in variants:
            compiled, args, state = v["call"]
            start = time.perf_counter()
            state["cache"], x = compiled(state["cache"], *args)
            jax.block_until_ready((state["cache"].kv, x))
            v["times"].append(time.perf_counter() - start)
    for v in variants:
        v.pop("call")
        v["times"] = v["times"][1:]
    machine = jax_machine()
    print("## kvshard in the caller's jit: bf16 model, lax.scan over 4 layers, cache donated")
    print(f"{machine}; load during the rounds {min(loads):.1f} to {max(loads):.1f}")
    print(
        f"decode: {requests} requests x 1 token, 256-token contexts, 2 KV heads, head_dim 128, "
        f"cache {cache_mib} MiB; {rounds} interleaved rounds, ms median (min - max)\n"
    )
    mib = 2**20
    print(
        table(
            ("dtype", "storage", "temp MiB", "temp / cache", "in place", "step ms"),
            [
                (
                    v["dtype"],
                    v["storage"],
                    f"{v['temp_bytes'] / mib:.1f}",
                    f"{v['temp_bytes'] / v['cache_bytes']:.2f}x",
                    "yes" if v["temp_bytes"] < v["cache_bytes"] / 4 else "no",
                    _spread(v["times"]),
                )
                for v in variants
            ],
            first_width=16,
        )
    )
    eager = [row for dtype in dtypes for row in eager_share(dtype, 64, rounds)]
    print_eager(eager)
    data = {
        "machine": machine,
        "loads": loads,
        "requests": requests,
        "rows": variants,
        "eager": eager,
    }
    write_json(outdir, NAME, data)
    return data


def print_eager(eager: list[dict[str, Any]]) -> None:
    loads = [load for r in eager for load in r["loads"]]
    print(
        "\n## eager dispatch at decode (T = 64 requests x 1 token, one device): eager call vs "
        "the same call in a jit, each after the same untimed call (an update after an "
        "attention, an attention after an update); host share = 1 - jit median / eager "
        f"median; load during the rounds {min(loads):.1f} to {max(loads):.1f}\n"
    )
    print(
        table(
            ("op dtype", "eager ms", "in a jit ms", "host share"),
            [
                (
                    f"{r['op']} {r['dtype']}",
                    _spread(r["eager_s"]),
                    _spread(r["jit_s"]),
                    f"{100 * r['host']:.0f}%",
                )
                for r in eager
            ],
            first_width=20,
        )
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m kvshard.benchmarks.callers_jit --eager-only``: the eager table alone."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eager-only", action="store_true", help="only the eager table")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--dtype", dest="dtypes", action="append")
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    dtypes = args.dtypes or ["float32", "bfloat16"]
    if not args.eager_only:
        run(args.out, dtypes=dtypes, cache_mib=64, requests=8, rounds=args.rounds)
        return
    print(f"{jax_machine()}; load before {_load():.1f}")
    print_eager([row for dtype in dtypes for row in eager_share(dtype, 64, args.rounds)])
    print(f"load after {_load():.1f}")


def eager_share(dtype: str, requests: int, rounds: int) -> list[dict[str, Any]]:
    """Host share of an eager decode call: ``kvshard.update`` and ``kvshard.attention`` called
    eagerly (a numpy step from ``build_step``, device k/v/q) against the same call inside a
    jit with device arguments (the device time plus one dispatch), interleaved rounds.

    Each timed call follows the same untimed one, as in a decode loop: an update follows the
    previous layer's attention, an attention its layer's update. (Timed back to back, the
    first update after an attention paid 0.3-0.5 ms of waking XLA's CPU threads whichever
    variant it was: the earlier table's host share was mostly that order.)"""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import kvshard

    spec = sized_spec(dtype, 128, layers=4)  # room for 64 requests of 200 tokens
    mesh = jax.make_mesh((1,), ("model",), devices=jax.devices()[:1])
    alloc = kvshard.PageAllocator(
        spec.num_pages, PAGE, max_requests=requests, max_pages_per_request=32
    )
    ids = list(range(requests))
    alloc.allocate_batch(ids, [200] * requests)
    step = kvshard.build_step(alloc, ids, [1] * requests, num_tokens_padded=requests)
    on_device = jax.tree.map(jnp.asarray, step)
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.standard_normal((requests, HEADS, DIM)), dtype)
    q = jnp.asarray(rng.standard_normal((requests, HEADS, DIM)), jnp.float32)
    state = {"cache": kvshard.init_cache(spec, mesh)}
    write = jax.jit(lambda c, k, s: kvshard.update(c, 1, k, k, s), donate_argnums=0)
    read = jax.jit(lambda c, q, s: kvshard.attention(c, 1, q, s, sm_scale=0.1))

    def update_eager():
        state["cache"] = kvshard.update(state["cache"], 1, k, k, step)
        state["cache"].kv.block_until_ready()

    def update_jit():
        state["cache"] = write(state["cache"], k, on_device)
        state["cache"].kv.block_until_ready()

    def attention_eager():
        kvshard.attention(state["cache"], 1, q, step, sm_scale=0.1).block_until_ready()

    def attention_jit():
        read(state["cache"], q, on_device).block_until_ready()

    calls = {f.__name__: f for f in (update_eager, update_jit, attention_eager, attention_jit)}
    for f in calls.values():  # compiles
        f()
    before = {
        "update_eager": attention_jit,
        "update_jit": attention_jit,
        "attention_eager": update_jit,
        "attention_jit": update_jit,
    }
    times, loads = interleaved(calls, rounds, before=before)
    rows = []
    for op in ("update", "attention"):
        eager, jitted = times[f"{op}_eager"], times[f"{op}_jit"]
        share = 1 - statistics.median(jitted) / statistics.median(eager)
        rows.append(
            {
                "op": op,
                "dtype": dtype,
                "eager_s": eager,
                "jit_s": jitted,
                "host": share,
                "loads": loads,
            }
        )
    return rows


def _spread(times: list[float]) -> str:
    ms = [t * 1e3 for t in times]
    return f"{statistics.median(ms):.2f} ({min(ms):.2f} - {max(ms):.2f})"


def _load() -> float:
    import os

    return os.getloadavg()[0]


if __name__ == "__main__":
    main()
