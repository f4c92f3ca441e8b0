"""Memory: compiled temporaries of update and attention per dtype, and the allocator's host memory.

- **Device**: XLA's memory analysis of the compiled update (``kvshard.update`` in the caller's
  ``jax.jit(..., donate_argnums=0)``) on a cache of ``--cache-mib`` per dtype, writing T tokens.
  In place means the output aliases the donated cache and the temporaries stay within a small
  multiple of the new tokens' bytes (target: at most 2x), whatever the cache size. Nothing is
  allocated: the cache is an abstract array.
- **Attention**: the same analysis for ``kvshard.attention`` (in the caller's jit) reading one
  request's 4,096-token context from that cache, ``T`` queries; temporaries should scale with
  the pages read, not with the cache.
- **Host**: bytes the :class:`kvshard.PageAllocator` holds (``tracemalloc``) for ``--pages``
  pages and ``--requests`` request rows.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

from kvshard.benchmarks._common import (
    bar_plot,
    compiled_memory,
    jax_machine,
    table,
    unit_scales,
    write_json,
    wrote,
)

NAME = "memory"


def _sized_spec(
    dtype: str, cache_bytes: int, page_size: int, heads: int, dim: int, min_pages: int = 2
):
    """A one-layer CacheSpec of about ``cache_bytes`` per device (one device, no replication),
    and of at least ``min_pages`` pages."""
    from kvshard import CacheSpec

    probe = CacheSpec(1, heads, dim, page_size, 2, dtype=dtype, **unit_scales(dtype))
    page_bytes = probe.bytes_per_device(1) // 2
    num_pages = max(min_pages, cache_bytes // page_bytes)
    return CacheSpec(1, heads, dim, page_size, num_pages, dtype=dtype, **unit_scales(dtype))


def _prefill_step(spec: Any, tokens: int, context: int):
    """One request holding ``context`` tokens whose last ``tokens`` this step writes/queries."""
    import kvshard

    alloc = kvshard.PageAllocator(
        spec.num_pages,
        spec.page_size,
        max_requests=1,
        max_pages_per_request=-(-context // spec.page_size),
    )
    alloc.allocate_batch([0], [context])
    return kvshard.build_step(alloc, [0], [tokens], num_tokens_padded=tokens, max_num_seqs=1)


def update_memory(
    dtype: str, cache_bytes: int, tokens: int, *, page_size: int = 16, devices: int = 1
) -> dict[str, Any]:
    """Compiled memory of one donated update: temp / output / alias / argument bytes.

    8 KV heads, head_dim 128, heads split over ``devices`` devices (byte counts per device);
    k/v in the cache dtype; one request prefilling ``tokens`` tokens. The executable is the
    caller's ``jax.jit(kvshard.update, donate_argnums=0)``, lowered on an abstract cache:
    nothing is allocated.
    """
    import jax

    import kvshard

    heads, dim = 8, 128
    spec = _sized_spec(dtype, cache_bytes, page_size, heads, dim)
    mesh = jax.make_mesh((devices,), ("model",), devices=jax.devices()[:devices])
    cache = kvshard.abstract_cache(spec, mesh)
    new = jax.ShapeDtypeStruct((tokens, heads, dim), spec.np_dtype)
    step = _prefill_step(spec, tokens, tokens)
    write = jax.jit(
        lambda cache, k, v, step: kvshard.update(cache, 0, k, v, step),
        donate_argnums=0,
    )
    mem = compiled_memory(write.lower(cache, new, new, step).compile())
    return {
        "cache_bytes": spec.bytes_per_device(devices),
        "new_token_bytes": 2 * tokens * heads * dim * spec.np_dtype.itemsize // devices,
        "temp_bytes": int(mem.temp_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
    }


def attention_memory(
    dtype: str, cache_bytes: int, tokens: int, *, context: int = 4096, page_size: int = 16
) -> dict[str, Any]:
    """Compiled memory of ``kvshard.attention`` reading a cache of ``cache_bytes``.

    One request holding ``context`` tokens whose last ``tokens`` are this step's queries
    (8 query heads = 8 KV heads, head_dim 128), in the caller's ``jax.jit`` (with the same
    compiler options as :func:`update_memory`), lowered on an abstract cache.
    """
    import jax

    import kvshard

    heads, dim = 8, 128
    # The context's pages and the null page fit whatever the size asked for.
    min_pages = -(-context // page_size) + 1
    spec = _sized_spec(dtype, cache_bytes, page_size, heads, dim, min_pages)
    mesh = jax.make_mesh((1,), ("model",), devices=jax.devices()[:1])
    cache = kvshard.abstract_cache(spec, mesh)
    step = _prefill_step(spec, tokens, context)
    q = jax.ShapeDtypeStruct((tokens, heads, dim), jax.numpy.float32)
    read = jax.jit(
        lambda cache, q, step: kvshard.attention(cache, 0, q, step, sm_scale=dim**-0.5),
    )
    mem = compiled_memory(read.lower(cache, q, step).compile())
    return {
        "cache_bytes": spec.bytes_per_device(1),
        "new_token_bytes": 2 * tokens * heads * dim * spec.np_dtype.itemsize,
        "context_kv_bytes": 2 * context * heads * dim * spec.np_dtype.itemsize,
        "temp_bytes": int(mem.temp_size_in_bytes),
    }


def allocator_memory(pages: int, requests: int, pages_per_request: int) -> dict[str, Any]:
    """Host bytes held by a PageAllocator after construction and after filling every row."""
    import numpy as np

    from kvshard.allocator import PageAllocator

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    alloc = PageAllocator(pages, 16, max_requests=requests, max_pages_per_request=pages_per_request)
    built = tracemalloc.get_traced_memory()[0] - base
    per = min(pages_per_request, (pages - 1) // requests)
    alloc.allocate_batch(list(range(requests)), np.full(requests, per * 16))
    filled, peak = (x - base for x in tracemalloc.get_traced_memory())
    tracemalloc.stop()
    del alloc
    return {
        "pages": pages,
        "requests": requests,
        "pages_per_request": pages_per_request,
        "bytes_after_init": built,
        "bytes_after_filling": filled,
        "peak_bytes": peak,
    }


def run(
    outdir: str,
    *,
    cache_mib: int,
    tokens: int,
    dtypes: list[str],
    pages: int,
    requests: int,
    pages_per_request: int,
    context: int = 4096,
) -> dict[str, Any]:
    """The three tables; ``context``: tokens the attention's one request holds."""
    machine = jax_machine()
    rows = []
    for dtype in dtypes:
        m = update_memory(dtype, cache_mib * 2**20, tokens)
        m["dtype"] = dtype
        rows.append(m)
    print(f"## memory: compiled kvshard.update (in a donating jit), T={tokens}\n{machine}\n")
    mib = 2**20
    print(
        table(
            ("dtype", "cache MiB", "new tokens MiB", "temp MiB", "temp / new", "aliased MiB"),
            [
                (
                    r["dtype"],
                    f"{r['cache_bytes'] / mib:.0f}",
                    f"{r['new_token_bytes'] / mib:.2f}",
                    f"{r['temp_bytes'] / mib:.2f}",
                    f"{r['temp_bytes'] / r['new_token_bytes']:.2f}x",
                    f"{r['alias_bytes'] / mib:.0f}",
                )
                for r in rows
            ],
            first_width=16,
        )
    )
    attn = []
    for dtype in dtypes:
        try:
            a = attention_memory(dtype, cache_mib * 2**20, tokens, context=context)
        except Exception as err:  # a dtype the attention does not read yet: say so, go on
            a = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"}
        a["dtype"] = dtype
        attn.append(a)
    print(
        f"\n## memory: compiled kvshard.attention (in a jit), {tokens} queries, "
        f"{context}-token context\n"
    )
    print(
        table(
            ("dtype", "context K/V MiB", "temp MiB", "temp / new tokens", "temp / cache"),
            [
                (a["dtype"], a["error"], "", "", "")
                if "error" in a
                else (
                    a["dtype"],
                    f"{a['context_kv_bytes'] / mib:.1f}",
                    f"{a['temp_bytes'] / mib:.1f}",
                    f"{a['temp_bytes'] / a['new_token_bytes']:.2f}x",
                    f"{a['temp_bytes'] / a['cache_bytes']:.3f}",
                )
                for a in attn
            ],
            first_width=16,
        )
    )
    host = allocator_memory(pages, requests, pages_per_request)
    print("\n## memory: PageAllocator host bytes (tracemalloc)\n")
    print(
        table(
            ("allocator", "after init MiB", "filled MiB", "peak MiB"),
            [
                (
                    f"{pages} pages, {requests} requests x {pages_per_request} pages",
                    f"{host['bytes_after_init'] / mib:.1f}",
                    f"{host['bytes_after_filling'] / mib:.1f}",
                    f"{host['peak_bytes'] / mib:.1f}",
                )
            ],
            first_width=44,
        )
    )
    data = {
        "machine": machine,
        "tokens": tokens,
        "context": context,
        "update": rows,
        "attention": attn,
        "allocator": host,
    }
    write_json(outdir, NAME, data)
    png = bar_plot(
        outdir,
        NAME,
        f"Compiled update memory, {cache_mib} MiB cache, T={tokens}",
        [r["dtype"] for r in rows],
        {
            "new tokens": [r["new_token_bytes"] / mib for r in rows],
            "temporaries": [max(r["temp_bytes"], 1) / mib for r in rows],
            "cache (aliased)": [r["cache_bytes"] / mib for r in rows],
        },
        "MiB",
    )
    print("\n" + wrote(f"{outdir}/{NAME}.json", png))
    return data
