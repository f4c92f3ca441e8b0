"""Device cost of writing T new tokens into the cache: ``kvshard.update`` against its references.

For every dtype and token count T, side by side in one process on one device:

- **donated**: ``kvshard.update`` (xla backend) called eagerly with a NumPy step, which
  donates the cache and writes in place;
- **in a jit**: the same update inside a donating ``jax.jit`` with device arguments: the
  device work plus one dispatch (the eager call's host work is the difference);
- **undonated**: the same update jitted without donation (with the same compiler options), what a
  caller gets who forgets to donate: XLA copies the whole cache every call;
- **copy**: a plain copy of the new tokens' bytes (``numpy.copyto`` on CPU, a jitted
  device-to-device copy on an accelerator): the physical reference for moving those bytes.

The update writes T tokens as T/page_size whole-page slices on distinct random pages (a prefill
batch), 8 KV heads, head_dim 128 (combined heads 16, no padding), k/v given in the cache dtype.
Bytes moved = T · 16 · 128 · itemsize. Before timing, the donated and undonated results are
checked equal. ``--repeats`` interleaved rounds (every variant once per round, the undonated
one every third round), so a load spike on a shared machine hits all of them; the bandwidth
fraction is taken per round and its median printed with its spread and the load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import textwrap
from typing import Any

from kvshard.benchmarks._common import (
    bar_plot,
    interleaved,
    jax_machine,
    spread,
    table,
    unit_scales,
    write_json,
    wrote,
)

NAME = "cache_update"


def _setup(dtype: str, tokens: int, cache_bytes: int, rng: Any):
    import jax
    import numpy as np

    import kvshard

    heads, dim, page = 8, 128, 16
    itemsize = np.dtype(
        kvshard.CacheSpec(1, 1, 128, 16, 2, dtype=dtype, **unit_scales(dtype)).np_dtype
    ).itemsize
    page_bytes = page * 2 * heads * dim * itemsize
    num_pages = max(cache_bytes // page_bytes, tokens // page + 2)
    spec = kvshard.CacheSpec(
        num_layers=1,
        num_kv_heads=heads,
        head_dim=dim,
        page_size=page,
        num_pages=int(num_pages),
        dtype=dtype,
        **unit_scales(dtype),
    )
    mesh = jax.make_mesh((1,), ("model",), devices=jax.devices()[:1])
    n = tokens // page
    pages = rng.choice(np.arange(1, spec.num_pages), size=n, replace=False)
    slices = np.stack([pages * page, np.arange(n) * page, np.full(n, page)]).astype(np.int32)
    num = np.array([n], np.int32)
    shape = (tokens, heads, dim)
    if np.dtype(spec.np_dtype).kind in "iu":
        k = rng.integers(-100, 100, shape).astype(spec.np_dtype)
        v = rng.integers(-100, 100, shape).astype(spec.np_dtype)
    else:
        k = rng.standard_normal(shape, dtype=np.float32).astype(spec.np_dtype)
        v = rng.standard_normal(shape, dtype=np.float32).astype(spec.np_dtype)
    return spec, mesh, jax.device_put(k), jax.device_put(v), slices, num


def measure(dtype: str, tokens: int, cache_bytes: int, rounds: int) -> dict[str, Any]:
    """One row, from ``rounds`` interleaved rounds of: the eager donated update, the same update
    inside a donating jit (device arguments: the device work plus one dispatch), the undonated
    jit (every third round: it copies the whole cache) and the copy of the same bytes."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import kvshard

    rng = np.random.default_rng(0)
    spec, mesh, k, v, slices, num = _setup(dtype, tokens, cache_bytes, rng)
    platform = jax.devices()[0].platform
    slices_d, num_d = jax.device_put(slices), jax.device_put(num)
    undonated = jax.jit(
        lambda c, k, v, s, n: kvshard.update(c, 0, k, v, s, n, backend="xla"),
    )
    jitted = jax.jit(
        lambda c, k, v, s, n: kvshard.update(c, 0, k, v, s, n, backend="xla"),
        donate_argnums=0,
    )
    ours = kvshard.update(kvshard.init_cache(spec, mesh), 0, k, v, slices, num, backend="xla")
    base = undonated(kvshard.init_cache(spec, mesh), k, v, slices_d, num_d)
    if not bool(jnp.array_equal(ours.kv, base.kv)):
        raise SystemExit(f"{dtype} T={tokens}: donated and undonated updates disagree")
    in_jit = jitted(kvshard.init_cache(spec, mesh), k, v, slices_d, num_d)
    state = {"ours": ours, "base": base, "jit": in_jit}

    def donated_step() -> None:  # what a caller runs eagerly: a NumPy step, device k/v
        state["ours"] = kvshard.update(state["ours"], 0, k, v, slices, num, backend="xla")
        state["ours"].kv.block_until_ready()

    def jitted_step() -> None:
        state["jit"] = jitted(state["jit"], k, v, slices_d, num_d)
        state["jit"].kv.block_until_ready()

    def undonated_step() -> None:
        state["base"] = undonated(state["base"], k, v, slices_d, num_d)
        state["base"].kv.block_until_ready()

    moved = tokens * 2 * spec.num_kv_heads * spec.padded_head_dim * spec.np_dtype.itemsize
    if platform == "cpu":
        src = np.ones(moved, np.uint8)
        dst = np.ones_like(src)  # written once: no first touch inside the timed copies

        def copy_step() -> None:
            np.copyto(dst, src)

        copy_what = "numpy.copyto"
    else:
        src_d = jnp.ones(moved // 4, jnp.uint32)
        copy = jax.jit(lambda x: x + jnp.uint32(0))  # reads and writes every byte once

        def copy_step() -> None:
            copy(src_d).block_until_ready()

        copy_what = "device-to-device copy (jitted x + 0)"
    steps = {
        "donated": donated_step,
        "jitted": jitted_step,
        "undonated": undonated_step,
        "copy": copy_step,
    }
    for step in steps.values():
        step()  # warm-up / compile
    times, loads = interleaved(steps, rounds, every={"undonated": 3})
    state.clear()
    # Per round (the copy right after the update, under the same load), then the median.
    fractions = [c / d for c, d in zip(times["copy"], times["donated"], strict=True)]
    jit_fractions = [c / d for c, d in zip(times["copy"], times["jitted"], strict=True)]
    row: dict[str, Any] = {
        "dtype": dtype,
        "tokens": tokens,
        "cache_bytes": spec.bytes_per_device(1),
        "moved_bytes": moved,
        "copy_what": copy_what,
        "loads": (min(loads), max(loads)),
        "rounds": {name: t for name, t in times.items()},
        "fraction_of_copy_bandwidth": statistics.median(fractions),
        "fraction_spread": (min(fractions), max(fractions)),
        "jitted_fraction_of_copy_bandwidth": statistics.median(jit_fractions),
        "speedup_vs_undonated": statistics.median(times["undonated"])
        / statistics.median(times["donated"]),
    }
    for name, t in times.items():  # (min, median) seconds, as the other benchmarks give them
        row[f"{name}_s"] = (min(t), statistics.median(t))
    return row


def format_rows(rows: list[dict[str, Any]]) -> str:
    header = (
        "dtype T",
        "donated ms",
        "in a jit ms",
        "undonated ms",
        "copy ms",
        "undonated/donated",
        "copy/donated",
        "copy/in a jit",
        "load",
    )
    body = [
        (
            f"{r['dtype']} T={r['tokens']}",
            spread(r["rounds"]["donated"]),
            spread(r["rounds"]["jitted"]),
            spread(r["rounds"]["undonated"]),
            spread(r["rounds"]["copy"]),
            f"{r['speedup_vs_undonated']:.0f}x",
            f"{100 * r['fraction_of_copy_bandwidth']:.0f}% "
            f"({100 * r['fraction_spread'][0]:.0f}-{100 * r['fraction_spread'][1]:.0f})",
            f"{100 * r['jitted_fraction_of_copy_bandwidth']:.0f}%",
            f"{r['loads'][0]:.1f}-{r['loads'][1]:.1f}",
        )
        for r in rows
    ]
    return table(header, body, first_width=18)


# What the table's columns are and what is good, printed under it.
LEGEND = (
    "donated: kvshard.update called eagerly with the cache donated (in place); in a jit: the "
    "same inside the caller's donating jit; undonated: the same update without donation (XLA "
    "copies the whole cache first); copy: a plain copy of only the bytes the update moves. "
    "Good: undonated/donated well above 1 (the update does not copy the cache; it grows with "
    "the cache size), copy/donated and copy/in a jit near 100% (the update writes its tokens "
    "as fast as copying them; far below 100% is per-call overhead)."
)


def run(
    outdir: str,
    *,
    dtypes: list[str],
    tokens: list[int],
    cache_mib: int,
    repeats: int,
) -> dict[str, Any]:
    machine = jax_machine()
    rows = [measure(dtype, t, cache_mib * 2**20, repeats) for dtype in dtypes for t in tokens]
    print(f"## cache update: kvshard.update (xla, donated) vs undonated vs copy\n{machine}")
    print(
        f"cache >= {cache_mib} MiB on 1 device, 8 KV heads, head_dim 128, page_size 16; "
        f"{repeats} interleaved rounds (undonated every third), ms median (min - max); "
        "undonated/donated: ratio of the medians; copy/donated: copy time / donated time per "
        "round, median (min-max); copy/in a jit: the same for the update in a jit; load during "
        "the rounds\n"
    )
    print(format_rows(rows))
    print("\n" + textwrap.fill(LEGEND, 100))
    data = {"machine": machine, "cache_mib": cache_mib, "repeats": repeats, "rows": rows}
    write_json(outdir, NAME, data)
    labels = [f"{r['dtype']}\nT={r['tokens']}" for r in rows]
    png = bar_plot(
        outdir,
        NAME,
        f"Writing T tokens into a {cache_mib} MiB cache ({machine})",
        labels,
        {
            "kvshard.update donated": [r["donated_s"][0] * 1e3 for r in rows],
            "undonated": [r["undonated_s"][0] * 1e3 for r in rows],
            "copy of the same bytes": [r["copy_s"][0] * 1e3 for r in rows],
        },
        "ms (min)",
    )
    print("\n" + wrote(os.path.join(outdir, NAME + ".json"), png))
    return data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        dest="dtypes",
        action="append",
        help="cache dtype (repeat for several; default float32 bfloat16 int8)",
    )
    parser.add_argument("--tokens", type=int, nargs="+", help="T values (default 1024 4096 16384)")
    parser.add_argument("--cache-mib", type=int, help="cache size per dtype (default 256)")
    parser.add_argument("--repeats", type=int, help="interleaved rounds (default 10)")


def settings(args: argparse.Namespace, quick: bool) -> dict[str, Any]:
    return {
        "dtypes": args.dtypes
        or (["float32", "bfloat16"] if quick else ["float32", "bfloat16", "int8"]),
        "tokens": args.tokens or ([1024] if quick else [1024, 4096, 16384]),
        "cache_mib": args.cache_mib or (32 if quick else 256),
        "repeats": args.repeats or (3 if quick else 10),
    }


def main(argv: list[str] | None = None) -> None:
    """``kvshard bench-cache``: this benchmark alone."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument(
        "--quick", action="store_true", help="float32 and bfloat16, 32 MiB, T=1024, 3 rounds"
    )
    parser.add_argument("--out", default="bench-results", help="results folder")
    args = parser.parse_args(argv)
    for t in args.tokens or []:
        if t < 16 or t % 16:
            parser.error(f"--tokens {t} must be a positive multiple of the page size 16")
    run(args.out, **settings(args, args.quick))


if __name__ == "__main__":
    main()
