"""Bandwidth of the host tier: ``kvshard.swap_out`` / ``kvshard.swap_in`` of N pages against a
plain ``jax.device_put`` of the same bytes to ``pinned_host`` and back.

One device, a cache of 8 KV heads, head_dim 128, page_size 16, L layers; N pages move per call
(every layer of each page), drawn at random (scattered device pages, scattered host pages), so
each swap gathers N pages on one side, transfers them and scatters them on the other. The
reference moves one contiguous array of exactly those bytes (N · L · page bytes) with
``jax.device_put`` to the device's pinned host memory and back: the runtime's own transfer,
with no gather or scatter and a fresh output buffer each call.

The four operations run interleaved, round after round, so machine load affects them alike;
each reports the median and the spread (min - max) over the rounds, plus the time a swap call
takes to return (dispatch only: the copy runs behind it). The load average is printed before
and after. Before timing, one swap out and back in is checked against the pages it moved.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from typing import Any

from kvshard.benchmarks._common import (
    bar_plot,
    jax_machine,
    table,
    unit_scales,
    with_overrides,
    write_json,
    wrote,
)

NAME = "swap_bandwidth"
HEADS, DIM, PAGE = 8, 128, 16


def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _stats(times: list[float], nbytes: int) -> dict[str, float]:
    median = statistics.median(times)
    return {
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "gb_per_s": nbytes / median / 1e9,
    }


def measure(pages: int, layers: int, dtype: str, rounds: int, seed: int = 0) -> dict[str, Any]:
    """One row: the four operations on N = ``pages`` pages, timed over ``rounds`` rounds."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import kvshard

    spec = kvshard.CacheSpec(
        num_layers=layers,
        num_kv_heads=HEADS,
        head_dim=DIM,
        page_size=PAGE,
        num_pages=2 * pages + 1,
        dtype=dtype,
        **unit_scales(dtype),
    )
    mesh = jax.make_mesh((1,), ("model",), devices=jax.devices()[:1])
    rng = np.random.default_rng(seed)
    cache = kvshard.init_cache(spec, mesh)
    host = kvshard.init_host_cache(spec, mesh, 2 * pages)
    if spec.quantized:
        raw = rng.integers(-100, 100, cache.kv.shape).astype(spec.np_dtype)
    else:
        raw = rng.standard_normal(cache.kv.shape, dtype=np.float32).astype(spec.np_dtype)
    # cache.kv holds the storage dtype (bf16/fp8 bits on CPU): the same bytes, viewed as it.
    cache = dataclasses.replace(cache, kv=jax.device_put(raw.view(cache.kv.dtype), cache.sharding))
    device_pages = rng.choice(np.arange(1, spec.num_pages), pages, replace=False)
    host_pages = rng.choice(np.arange(2 * pages), pages, replace=False)
    pairs = jax.device_put(
        np.stack([device_pages, host_pages], axis=1).astype(np.int32), NamedSharding(mesh, P())
    )

    # Correctness first: out, then back in to the same pages, must leave the cache unchanged
    # and put exactly those pages into the host pages.
    cache, host = kvshard.swap_out(cache, host, pairs)
    got = np.asarray(host.kv).reshape(layers, 2 * pages, PAGE, *raw.shape[2:])[:, host_pages]
    want = raw.reshape(layers, spec.num_pages, PAGE, *raw.shape[2:])[:, device_pages]
    if not np.array_equal(got.view(np.uint8), want.view(np.uint8)):
        raise SystemExit(f"N={pages}: swap_out did not copy the pages it was given")
    cache, host = kvshard.swap_in(cache, host, pairs)
    if not np.array_equal(np.asarray(cache.kv).view(np.uint8), raw.view(np.uint8)):
        raise SystemExit(f"N={pages}: swap_in did not restore the pages")

    nbytes = pages * layers * spec.page_bytes_per_device(1)
    block = jax.device_put(
        np.ones(nbytes // spec.np_dtype.itemsize, spec.np_dtype), NamedSharding(mesh, P())
    )
    to_host = NamedSharding(mesh, P(), memory_kind="pinned_host")
    to_device = NamedSharding(mesh, P(), memory_kind="device")
    state = {"cache": cache, "host": host, "block": block}

    def swap(op):
        def step() -> float:
            start = time.perf_counter()
            state["cache"], state["host"] = op(state["cache"], state["host"], pairs)
            dispatched = time.perf_counter() - start
            jax.block_until_ready((state["cache"].kv, state["host"].kv))
            return dispatched

        return step

    def put(sharding):
        def step() -> float:
            state["block"] = jax.device_put(state["block"], sharding)
            state["block"].block_until_ready()
            return 0.0

        return step

    ops = {
        "swap_out": swap(kvshard.swap_out),
        "device_put to pinned_host": put(to_host),
        "swap_in": swap(kvshard.swap_in),
        "device_put to device": put(to_device),
    }
    for step in ops.values():
        step()  # compile / warm up
    times: dict[str, list[float]] = {name: [] for name in ops}
    dispatch: dict[str, list[float]] = {"swap_out": [], "swap_in": []}
    for _ in range(rounds):
        for name, step in ops.items():
            start = time.perf_counter()
            returned = step()
            times[name].append(time.perf_counter() - start)
            if name in dispatch:
                dispatch[name].append(returned)
    state.clear()
    row: dict[str, Any] = {
        "pages": pages,
        "layers": layers,
        "dtype": dtype,
        "bytes": nbytes,
        "layer_page_bytes": spec.page_bytes_per_device(1),
    }
    row.update({name: _stats(t, nbytes) for name, t in times.items()})
    for name, t in dispatch.items():
        row[name]["dispatch_median_s"] = statistics.median(t)
    row["out_vs_device_put"] = (
        row["device_put to pinned_host"]["median_s"] / row["swap_out"]["median_s"]
    )
    row["in_vs_device_put"] = row["device_put to device"]["median_s"] / row["swap_in"]["median_s"]
    return row


def _cell(stats: dict[str, float]) -> str:
    ms = 1e3
    return f"{stats['median_s'] * ms:.2f} [{stats['min_s'] * ms:.2f}-{stats['max_s'] * ms:.2f}]"


def format_rows(rows: list[dict[str, Any]]) -> str:
    header = ("N pages (MiB)", "op", "median ms [min-max]", "GB/s", "dispatch ms", "swap / put")
    body = []
    for r in rows:
        label = f"N={r['pages']} ({r['bytes'] / 2**20:.1f} MiB)"
        for name, ratio in (
            ("swap_out", r["out_vs_device_put"]),
            ("device_put to pinned_host", None),
            ("swap_in", r["in_vs_device_put"]),
            ("device_put to device", None),
        ):
            s = r[name]
            dispatch = f"{s['dispatch_median_s'] * 1e3:.3f}" if "dispatch_median_s" in s else "-"
            speed = "-" if ratio is None else f"{ratio:.2f}x"
            body.append((label, name, _cell(s), f"{s['gb_per_s']:.2f}", dispatch, speed))
            label = ""
    return table(header, body, first_width=20)


def run(outdir: str, *, pages: list[int], layers: int, dtype: str, rounds: int) -> dict[str, Any]:
    machine = jax_machine()
    load_before = _load()
    rows = [measure(n, layers, dtype, rounds) for n in pages]
    load_after = _load()
    print(f"## swap bandwidth: kvshard.swap_out/swap_in vs jax.device_put\n{machine}")
    print(
        f"1 device, {dtype}, {layers} layers, {HEADS} KV heads, head_dim {DIM}, page_size "
        f"{PAGE}: one page = {layers} layers x {rows[0]['layer_page_bytes']} B; "
        f"{rounds} interleaved rounds; load average (1/5/15 min) before {load_before}, after "
        f"{load_after}; 'swap / put' = device_put time / swap time (above 1: the swap is faster)\n"
    )
    print(format_rows(rows))
    data = {
        "machine": machine,
        "load_before": load_before,
        "load_after": load_after,
        "rounds": rounds,
        "rows": rows,
    }
    write_json(outdir, NAME, data)
    labels = [f"N={r['pages']}" for r in rows]
    names = ("swap_out", "device_put to pinned_host", "swap_in", "device_put to device")
    png = bar_plot(
        outdir,
        NAME,
        f"Moving N pages between device and pinned host ({machine})",
        labels,
        {name: [r[name]["gb_per_s"] for r in rows] for name in names},
        "GB/s (median)",
        log=False,
    )
    print("\n" + wrote(os.path.join(outdir, NAME + ".json"), png))
    return data


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"pages": [16, 128], "layers": 4, "dtype": "bfloat16", "rounds": 7}
    return {"pages": [16, 128, 512], "layers": 8, "dtype": "bfloat16", "rounds": 15}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m kvshard.benchmarks.swap_bandwidth``: this benchmark alone."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages", type=int, nargs="+", help="N values (default 16 128 512)")
    parser.add_argument("--layers", type=int, help="layers of the cache (default 8)")
    parser.add_argument("--dtype", help="cache dtype (default bfloat16)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 15)")
    parser.add_argument("--quick", action="store_true", help="N in {16, 128}, 4 layers, 7 rounds")
    parser.add_argument("--out", default="bench-results", help="results folder")
    args = parser.parse_args(argv)
    chosen = with_overrides(settings(args.quick), args, ("pages", "layers", "dtype", "rounds"))
    for n in chosen["pages"]:
        if n < 1:
            parser.error(f"--pages {n} must be positive")
    return run(args.out, **chosen)


if __name__ == "__main__":
    main()
