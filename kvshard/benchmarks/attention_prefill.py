"""Prefill attention: ``kvshard.attention`` (xla backend) vs dense attention, prompt 128 to 8k.

B requests each prefill a whole prompt of P tokens (one step, causal), 8 KV heads and 32 query
heads sharded over the head axis of a 1 x tp mesh (tp = 8 when the process has 8 devices, as
``python -m kvshard.benchmarks.attention_prefill`` arranges on CPU), head_dim 128, float32.
Three sides, each the caller's own ``jax.jit`` around it:

* ``kvshard.attention``: the xla backend reading the cache's pages in place, per device;
* ``dense``: causal softmax attention on contiguous K/V ``[B, P, H, D]`` (the same values),
  per device under ``jax.shard_map`` over the head axis: the physical reference;
* ``gather + dense``: ``kvshard.gather`` of every request's P slots, then the same dense.

Timed prompts: one call of each side per round, rounds interleaved (the three sides see the same
machine load), median and spread (min-max) over the rounds; the load average is printed before
and after. Every prompt (timed or not): each side's compiled temporaries per device
(``jax.jit(...).lower(...).compile().memory_analysis()``, lowered on abstract arrays: nothing is
allocated, so 8k prompts cost only a compilation). Timed sides are checked to agree first.
Writes ``attention_prefill.json`` to ``--out``.

    python -m kvshard.benchmarks.attention_prefill [--batch 4] [--prompts 128 ... 8192]
        [--time-up-to 1024] [--rounds 5] [--quick]
    kvshard bench --only attention_prefill
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

from kvshard.benchmarks._common import (
    compiled_memory,
    jax_machine,
    one_layer_pool,
    simulate_cpu_devices,
    table,
    with_overrides,
    write_report,
)

NAME = "attention_prefill"
KV_HEADS, Q_HEADS, HEAD_DIM, PAGE_SIZE = 8, 32, 128, 16
# float32 sums of up to 8k terms in different orders agree far tighter than this.
TOLERANCE = 1e-3
SIDES = ("kvshard.attention", "dense", "gather + dense")


def _head_axis_size(num_devices: int) -> int:
    """The largest of 8, 4, 2, 1 the devices allow: it divides both head counts."""
    return next(tp for tp in (8, 4, 2, 1) if tp <= num_devices)


def _setup(batch: int, prompt: int, tp: int):
    """The mesh, spec, step and the three jitted sides (not yet lowered)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import kvshard

    B, H, Hq, D = batch, KV_HEADS, Q_HEADS, HEAD_DIM
    mesh = jax.make_mesh((1, tp), ("data", "model"), devices=jax.devices()[:tp])
    spec, alloc = one_layer_pool(B, prompt, PAGE_SIZE, H, D)
    ids = list(range(B))
    step = kvshard.build_step(alloc, ids, [prompt] * B, num_tokens_padded=B * prompt)
    table_rows = alloc.page_table[:B]  # host copy: each request's pages, in order
    page_slots = (table_rows[:, :, None] * PAGE_SIZE + np.arange(PAGE_SIZE)).reshape(B, -1)
    slots = jnp.asarray(page_slots[:, :prompt].reshape(-1), jnp.int32)
    scale = D**-0.5
    heads = P(None, None, "model", None)

    def dense_local(q, k, v):  # one device: q [B, P, Hq/tp, D], k/v [B, P, H/tp, D]
        h = k.shape[2]
        qg = q.reshape(*q.shape[:2], h, q.shape[2] // h, D)
        s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k) * scale
        causal = jnp.tril(jnp.ones((prompt, prompt), bool))
        w = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
        return jnp.einsum("bhgqk,bkhd->bqhgd", w, v).reshape(q.shape)

    dense_heads = jax.shard_map(
        dense_local, mesh=mesh, in_specs=(heads,) * 3, out_specs=heads, check_vma=False
    )

    def gather_dense(cache, q, slots):
        k, v = kvshard.gather(cache, 0, slots)  # [B·P, H, D] each, global
        k, v = (x.reshape(B, prompt, H, D) for x in (k, v))
        return dense_heads(q.reshape(B, prompt, Hq, D), k, v)

    sides = {
        SIDES[0]: jax.jit(lambda c, q, s: kvshard.attention(c, 0, q, s, sm_scale=scale)),
        SIDES[1]: jax.jit(dense_heads),
        SIDES[2]: jax.jit(gather_dense),
    }
    return mesh, spec, step, slots, sides


def _abstract_args(mesh, spec, step, slots, batch: int, prompt: int):
    """Each side's arguments as abstract arrays (for lowering without allocating)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import kvshard

    def arr(shape, spec_):
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec_))

    T, B = batch * prompt, batch
    q = arr((T, Q_HEADS, HEAD_DIM), P(None, "model", None))
    cache = kvshard.abstract_cache(spec, mesh)
    qb = arr((B, prompt, Q_HEADS, HEAD_DIM), P(None, None, "model", None))
    kv = arr((B, prompt, KV_HEADS, HEAD_DIM), P(None, None, "model", None))
    return {
        SIDES[0]: (cache, q, step),
        SIDES[1]: (qb, kv, kv),
        SIDES[2]: (cache, q, slots),
    }


def _concrete_args(mesh, spec, step, slots, batch: int, prompt: int):
    """Each side's arguments: a cache holding random K/V (written by kvshard.update) and the
    same K/V as contiguous arrays."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import kvshard

    T = batch * prompt
    keys = jax.random.split(jax.random.key(prompt), 3)
    q, k, v = (
        jax.random.normal(key, (T, h, HEAD_DIM), jnp.float32)
        for key, h in zip(keys, (Q_HEADS, KV_HEADS, KV_HEADS), strict=True)
    )
    cache = kvshard.init_cache(spec, mesh)
    cache = jax.jit(lambda c, k, v, s: kvshard.update(c, 0, k, v, s), donate_argnums=0)(
        cache, k, v, step
    )
    q = jax.device_put(q, NamedSharding(mesh, P(None, "model", None)))
    heads = NamedSharding(mesh, P(None, None, "model", None))
    qb, kb, vb = (jax.device_put(x.reshape(batch, prompt, *x.shape[1:]), heads) for x in (q, k, v))
    return {SIDES[0]: (cache, q, step), SIDES[1]: (qb, kb, vb), SIDES[2]: (cache, q, slots)}


def measure(batch: int, prompt: int, tp: int, rounds: int, timed: bool) -> dict[str, Any]:
    """One prompt length: temporaries of each side and, when ``timed``, their times."""
    import jax
    import jax.numpy as jnp

    mesh, spec, step, slots, sides = _setup(batch, prompt, tp)
    abstract = _abstract_args(mesh, spec, step, slots, batch, prompt)
    row: dict[str, Any] = {"prompt": prompt, "batch": batch}
    for name, fn in sides.items():
        mem = compiled_memory(fn.lower(*abstract[name]).compile())
        row[f"{name} temp_bytes"] = int(mem.temp_size_in_bytes)
    if not timed:
        return row
    args = _concrete_args(mesh, spec, step, slots, batch, prompt)
    exes = {name: fn.lower(*args[name]).compile() for name, fn in sides.items()}
    outs = {name: exe(*args[name]) for name, exe in exes.items()}
    paged = outs[SIDES[0]].reshape(outs[SIDES[1]].shape)
    for name in SIDES[1:]:
        diff = float(jnp.max(jnp.abs(paged - outs[name])))
        row[f"max_abs_diff vs {name}"] = diff
        if not diff < TOLERANCE:
            raise RuntimeError(f"kvshard.attention and {name} differ by {diff:.2e} at P={prompt}")
    times: dict[str, list[float]] = {name: [] for name in SIDES}
    for _ in range(rounds):  # interleaved: each round times every side once
        for name, exe in exes.items():
            start = time.perf_counter()
            jax.block_until_ready(exe(*args[name]))
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        row[f"{name} ms"] = [t * 1e3 for t in ts]
        row[f"{name} median_ms"] = statistics.median(ts) * 1e3
    row["xla/dense"] = row[f"{SIDES[0]} median_ms"] / row[f"{SIDES[1]} median_ms"]
    row["xla/gather+dense"] = row[f"{SIDES[0]} median_ms"] / row[f"{SIDES[2]} median_ms"]
    return row


def _time_cell(row: dict[str, Any], name: str) -> str:
    if f"{name} ms" not in row:
        return "-"
    ts = row[f"{name} ms"]
    return f"{row[f'{name} median_ms']:.0f} ({min(ts):.0f}-{max(ts):.0f})"


def run(
    outdir: str, *, batch: int, prompts: list[int], time_up_to: int, rounds: int
) -> dict[str, Any]:
    """Every prompt length; returns (and writes) the rows."""
    import jax

    tp = _head_axis_size(len(jax.devices()))
    load_before = os.getloadavg()[0]
    print(
        f"## attention prefill: B={batch} prompts of P tokens, {KV_HEADS} KV heads, "
        f"{Q_HEADS} query heads, head_dim {HEAD_DIM}, float32, 1x{tp} mesh"
    )
    print(f"{jax_machine()}; load before {load_before:.1f}")
    start = time.perf_counter()
    rows = [measure(batch, p, tp, rounds, p <= time_up_to) for p in prompts]
    load_after = os.getloadavg()[0]
    print(f"median (min-max) of {rounds} interleaved rounds, ms; temporaries per device, MiB\n")
    header = ("P", *(f"{s} ms" for s in SIDES), "xla/dense", *(f"{s} MiB" for s in SIDES))
    cells = []
    for r in rows:
        ratio = f"{r['xla/dense']:.2f}" if "xla/dense" in r else "-"
        mibs = [f"{r[f'{s} temp_bytes'] / 2**20:.1f}" for s in SIDES]
        cells.append((r["prompt"], *(_time_cell(r, s) for s in SIDES), ratio, *mibs))
    print(table(header, cells, first_width=6))
    diffs = [v for r in rows for k, v in r.items() if k.startswith("max_abs_diff")]
    if diffs:
        print(f"max abs diff of kvshard.attention vs the dense sides: {max(diffs):.2e}")
    print(f"load after {load_after:.1f}; {time.perf_counter() - start:.0f} s wall")
    data = {
        "rows": rows,
        "batch": batch,
        "mesh": f"1x{tp}",
        "rounds": rounds,
        "load_before": load_before,
        "load_after": load_after,
        "machine": jax_machine(),
    }
    return write_report(outdir, NAME, data)


def settings(quick: bool) -> dict[str, Any]:
    """The suite's sizes: full (prompts 128..8k, timed to 1k) or quick (small, timed to 256)."""
    if quick:
        return {"batch": 1, "prompts": [128, 256, 8192], "time_up_to": 256, "rounds": 2}
    prompts = [128, 256, 512, 1024, 2048, 4096, 8192]
    return {"batch": 4, "prompts": prompts, "time_up_to": 1024, "rounds": 5}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--batch", type=int)
    parser.add_argument("--prompts", type=int, nargs="+")
    parser.add_argument("--time-up-to", type=int, help="time prompts up to this; larger: memory")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--quick", action="store_true", help="B=1, prompts 128 256 8192")
    parser.add_argument("--out", default="bench-results", help="results folder")
    args = parser.parse_args(argv)
    chosen = with_overrides(
        settings(args.quick), args, ("batch", "prompts", "time_up_to", "rounds")
    )
    bad = [p for p in chosen["prompts"] if p < 1 or p % PAGE_SIZE]
    if bad:
        parser.error(f"--prompts {bad[0]} must be a positive multiple of {PAGE_SIZE}")
    run(args.out, **chosen)
    return 0


if __name__ == "__main__":
    simulate_cpu_devices(8)
    sys.exit(main())
