"""The arithmetic of ``kvshard plan``: pages, tokens and sequences of a cache, and where bytes go.

Pure Python on top of :class:`kvshard.CacheSpec` (no JAX). A *page* is one page id: it names the
same ``page_size`` token slots in every layer's cache, so "bytes per page" counts all layers.
Each device of a data-parallel group holds the whole page pool for its own heads, so pages per
device = pages per pool.

Sliding windows: for a model whose every layer attends a window of ``W`` tokens (a query at
position ``p`` reads keys ``p - W + 1 .. p``), the allocator can release a request's pages that
lie wholly before the window of its next token (vLLM's sliding-window rule), so a decoding
request holds at most :func:`window_pages` pages however long it grows.

The host tier (:func:`kvshard.init_host_cache`): a host page has the device page's bytes (the
host cache mirrors each device's block), so host memory per device // page bytes host pages
per device, all usable (no null page on the host), each holding ``page_size`` tokens of one
pool. The plan's arithmetic and its one renderer stay side by side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from kvshard._geometry.int32 import INT32_MAX
from kvshard._geometry.layer_types import LayerType, check_layer_types, group_layers, uniform_window
from kvshard._geometry.layout import (
    CacheSpec,
    check_query_heads,
    check_tensor_parallel,
    needs_scales,
    round_up,
)
from kvshard._geometry.plan_groups import format_groups, hybrid_capacity, window_pages

__all__ = [
    "BudgetTooSmall",
    "ContextTooLong",
    "HostMemoryTooSmall",
    "format_plan",
    "make_plan",
    "window_pages",
]

# Pages 0 .. num_pages-1 of one pool; page 0 is the allocator's null page.
_MIN_PAGES = 2


class BudgetTooSmall(ValueError):
    """The HBM budget holds fewer than two pages (the null page and one usable page)."""


class ContextTooLong(ValueError):
    """One sequence of the requested context needs more pages than the cache holds."""


class HostMemoryTooSmall(ValueError):
    """The host memory of one device holds no page."""


def host_tier(
    *,
    host_memory: int,
    devices_per_host: int,
    page_bytes: int,
    page_size: int,
    dp: int,
    device_pages: int,
    pages_per_sequence: int,
) -> dict[str, Any]:
    """The host tier's capacity: ``host_memory`` bytes per host shared by ``devices_per_host``
    devices, pages of ``page_bytes`` (every layer, one device) as on the device.

    Raises:
      ValueError: a non-positive ``devices_per_host``.
      HostMemoryTooSmall: one device's share holds no page.
    """
    if not isinstance(devices_per_host, int) or isinstance(devices_per_host, bool):
        raise ValueError(f"devices_per_host={devices_per_host!r} must be a positive int")
    if devices_per_host < 1:
        raise ValueError(f"devices_per_host={devices_per_host!r} must be a positive int")
    per_device = host_memory // devices_per_host
    pages = per_device // page_bytes
    if pages < 1:
        raise HostMemoryTooSmall(
            f"{host_memory:,} bytes ({human(host_memory)}) over {devices_per_host} device(s) "
            f"is {per_device:,} bytes per device, under one page of {page_bytes:,} bytes; "
            f"need >= {page_bytes * devices_per_host:,} bytes "
            f"({human(page_bytes * devices_per_host)}) per host"
        )
    tokens = pages * page_size
    return {
        "host_memory": host_memory,
        "devices_per_host": devices_per_host,
        "bytes_per_device": per_device,
        "pages_per_device": pages,
        "used_bytes_per_device": pages * page_bytes,
        "used_bytes_per_host": pages * page_bytes * devices_per_host,
        "tokens_per_group": tokens,
        "tokens_total": dp * tokens,
        "sequences_per_group": pages // pages_per_sequence,
        "sequences_total": dp * (pages // pages_per_sequence),
        "device_and_host_tokens_per_group": (device_pages - 1 + pages) * page_size,
        "capacity_vs_device": pages / (device_pages - 1),
        "int32_ok": dp * tokens <= INT32_MAX,
    }


def _spec(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    num_pages: int,
    dtype: str,
    kv_layout: str | None = None,
    kv_lora_rank: int | None = None,
) -> CacheSpec:
    """A :class:`CacheSpec` for sizing: a quantized dtype gets unit scales (the spec requires
    scales; they change no byte count); ``kv_lora_rank`` makes a latent (MLA) cache."""
    scale = 1.0 if needs_scales(dtype) else None
    if kv_lora_rank is not None and kv_layout is None:
        kv_layout = "latent"
    return CacheSpec(
        num_layers, num_kv_heads, head_dim, page_size, num_pages, dtype, k_scale=scale,
        v_scale=scale, kv_layout=kv_layout, kv_lora_rank=kv_lora_rank,
    )  # fmt: skip


def _tokens_per_group(page_bytes: int, budget: int, page_size: int) -> int:
    """Usable token slots per pool for pages of ``page_bytes`` within ``budget`` (0 if < 2)."""
    pages = budget // page_bytes
    return (pages - 1) * page_size if pages >= _MIN_PAGES else 0


def make_plan(
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: str,
    page_size: int,
    dp: int,
    tp: int,
    hbm_per_device: int,
    context: int,
    model: str | None = None,
    layer_types: Sequence[LayerType] | None = None,
    sliding_window: int | None = None,
    num_q_heads: int | None = None,
    host_memory: int | None = None,
    devices_per_host: int | None = None,
    kv_layout: str | None = None,
    kv_lora_rank: int | None = None,
) -> dict[str, Any]:
    """Returns the plan as a JSON-ready dict (all byte counts are per device).

    ``kv_layout`` (None: :class:`CacheSpec`'s automatic choice, "packed" for head_dim <= 64)
    is the cache's row layout; the plan's ``interleaved`` entry compares a packed plan's
    pages with the "interleaved" layout's (each head_dim padded to 128 lanes).

    ``kv_lora_rank`` (multi-head latent attention: DeepSeek-V3, Kimi-K2) plans a "latent"
    cache: ``num_kv_heads`` 1 and ``head_dim = kv_lora_rank + qk_rope_head_dim``; its one row
    is replicated over the ``tp``-way head axis (one copy per device), and the plan's
    ``latent`` entry gives its bytes per token and what the copies cost.

    ``layer_types`` (None: every layer full, or ``sliding_window`` on every layer) gives each
    layer's attention type (:data:`kvshard._geometry.layer_types.LayerType`); for a mix of types, or
    chunked layers, the plan's ``layer_groups`` counts vLLM's hybrid layout against every layer full
    (:func:`kvshard._geometry.plan_groups.hybrid_capacity`). A uniform sliding window in it is the
    same as ``sliding_window``.
    ``num_q_heads`` (None: unknown, not checked) must split over the head axis as
    :func:`kvshard.attention` needs (:func:`~kvshard._geometry.layout.check_query_heads`).
    ``host_memory`` (bytes per host for the host tier; None: no tier) is shared by
    ``devices_per_host`` devices (default: the whole ``dp x tp`` mesh on one host); see
    :func:`host_tier`.

    Raises:
      BudgetTooSmall: the budget holds fewer than 2 pages (page 0 is the null page).
      HostMemoryTooSmall: ``host_memory`` gives a device less than one page.
      ValueError: ``tp`` neither divides nor is a multiple of ``num_kv_heads`` (the message of
        :func:`kvshard.check_tensor_parallel`), query heads that do not split over the head
        axis (the message says the per-group padding that does), a bad size/dtype (from
        :class:`kvshard.CacheSpec`), or ``layer_types`` not one valid type per layer or given
        with ``sliding_window``.
    """
    replication = check_tensor_parallel(num_kv_heads, tp)
    if num_q_heads is not None:
        check_query_heads(num_q_heads, num_kv_heads, tp)
    types = None
    if layer_types is not None:
        if sliding_window is not None:
            raise ValueError(
                f"sliding_window={sliding_window!r} and layer_types both given: a window in "
                "layer_types is ('sliding', W); pass one of them"
            )
        types = check_layer_types(layer_types, num_layers)
        sliding_window = uniform_window(types)
        if len(group_layers(types)) == 1 and types[0][0] != "chunked":
            types = None  # uniform: the plan's own rows (and its sliding_window row) say it all
    one = _spec(num_layers, num_kv_heads, head_dim, page_size, 1, dtype, kv_layout, kv_lora_rank)
    page_bytes_layer = one.page_bytes_per_device(tp)
    page_bytes = one.bytes_per_device(tp, dp)  # one page id, every layer
    num_pages = hbm_per_device // page_bytes
    if num_pages < _MIN_PAGES:
        need = _MIN_PAGES * page_bytes
        raise BudgetTooSmall(
            f"{hbm_per_device:,} bytes ({human(hbm_per_device)}) holds {num_pages} page(s) of "
            f"{page_bytes:,} bytes ({num_layers} layers x {page_bytes_layer:,}); need at least "
            f"{_MIN_PAGES} pages (page 0 is the null page): >= {need:,} bytes ({human(need)})"
        )
    spec = dataclasses.replace(one, num_pages=num_pages)
    cache_bytes = spec.bytes_per_device(tp, dp)
    usable = num_pages - 1

    # Where the bytes of the usable pages go: stored = distinct K/V + replicas + lane
    # padding + packing padding, each from the spec's own per-page counts. Every term is exact
    # except the distinct/replica split, which rounds down (a device may hold a fraction of a
    # head's "distinct" share).
    layer_pages = num_layers * usable  # (layer, page) blocks of the usable pages
    combined = spec.combined_heads_per_device(tp)
    lane_padding = spec.lane_padding_bytes_per_page(tp)
    unpadded = layer_pages * spec.kv_bytes_per_page(tp)
    distinct = unpadded // replication
    waste = {
        "head_dim_padding": layer_pages * lane_padding,
        "dtype_packing": layer_pages * spec.packing_padding_bytes_per_page(tp),
        "head_replication": unpadded - distinct,
        "null_page": page_bytes,
        "budget_remainder": hbm_per_device - cache_bytes,
    }
    pages_per_sequence = -(-context // page_size)
    per_group = usable // pages_per_sequence
    held = pages_per_sequence  # pages one sequence holds at its longest
    window: dict[str, Any] | None = None
    if sliding_window is not None:
        held = window_pages(sliding_window, page_size, context)
        window_per_group = usable // held
        window = {
            "window": sliding_window,
            "pages_per_sequence": held,
            "sequences_per_group": window_per_group,
            "sequences_total": dp * window_per_group,
            "capacity_gain": window_per_group / per_group if per_group else None,
        }
    groups = None
    if types is not None:
        groups = hybrid_capacity(
            layer_types=types,
            page_bytes_per_layer=page_bytes_layer,
            page_size=page_size,
            hbm_per_device=hbm_per_device,
            context=context,
            dp=dp,
            all_full_sequences_per_group=per_group,
            all_full_page_bytes=page_bytes,
        )
    if held > usable and not (groups and groups["sequences_per_group"]):
        need = (held + 1) * page_bytes
        if groups:  # the grouped layout needs fewer bytes
            need = min(need, (groups["pages_per_request"] + 1) * groups["page_bytes"])
        raise ContextTooLong(
            f"{context:,} tokens need {held:,} pages per sequence ({page_size} tokens each) but "
            f"the cache holds {usable:,} usable page(s) per DP group: no sequence fits"
            + (" (nor in the layer groups)" if groups else "")
            + f"; lower --context or raise --hbm-per-device to >= {need:,} bytes ({human(need)})"
        )

    # Per-token bytes and the capacity of the same budget in bfloat16, the usual model dtype.
    bf16_page_bytes = _spec(
        num_layers, num_kv_heads, head_dim, page_size, 1, "bfloat16",
        "latent" if one.latent else None, kv_lora_rank,
    ).bytes_per_device(tp, dp)  # fmt: skip
    bf16_tokens = _tokens_per_group(bf16_page_bytes, hbm_per_device, page_size)
    interleaved = None
    if spec.packed:  # what the same budget holds with each head_dim padded to 128 lanes
        wide = dataclasses.replace(one, kv_layout="interleaved")
        wide_tokens = _tokens_per_group(wide.bytes_per_device(tp, dp), hbm_per_device, page_size)
        interleaved = {
            "page_bytes_per_layer": wide.page_bytes_per_device(tp),
            "page_bytes": wide.bytes_per_device(tp, dp),
            "lane_padding_bytes_per_page_layer": wide.lane_padding_bytes_per_page(tp),
            "saved_bytes_per_page": wide.bytes_per_device(tp, dp) - page_bytes,
            "tokens_per_group": wide_tokens,
            "capacity_vs_interleaved": usable * page_size / wide_tokens if wide_tokens else None,
        }
    host = None
    if host_memory is not None:
        host = host_tier(
            host_memory=host_memory,
            devices_per_host=dp * tp if devices_per_host is None else devices_per_host,
            page_bytes=page_bytes,
            page_size=page_size,
            dp=dp,
            device_pages=num_pages,
            pages_per_sequence=pages_per_sequence,
        )
    return {
        "model": model,
        "num_layers": num_layers,
        "num_kv_heads": num_kv_heads,
        "num_q_heads": num_q_heads,
        "q_heads_per_device": None if num_q_heads is None else num_q_heads // tp,
        "head_dim": head_dim,
        "dtype": spec.dtype,
        "page_size": page_size,
        "mesh": {"data": dp, "model": tp},
        "hbm_per_device": hbm_per_device,
        "context": context,
        "replication": replication,
        "heads_per_device": spec.heads_per_device(tp),
        "combined_heads_per_device": combined,
        "packing": spec.packing,
        "packed_rows_per_device": round_up(combined, spec.packing),
        "kv_layout": spec.kv_layout,
        "row_dim": spec.row_dim,
        "padded_head_dim": spec.padded_head_dim,
        # Bytes of each page spent on the lanes past head_dim (head_dim 64 stored in 128).
        "lane_padding_bytes_per_page_layer": lane_padding,
        "lane_padding_bytes_per_page": num_layers * lane_padding,
        "padding_bytes_per_page_layer": lane_padding + spec.packing_padding_bytes_per_page(tp),
        "interleaved": interleaved,
        "local_shape": list(spec.local_shape(tp)),
        "global_shape": list(spec.global_shape(tp, dp)),
        "page_bytes_per_layer": page_bytes_layer,
        "page_bytes": page_bytes,
        "pages_per_device": num_pages,
        "usable_pages_per_device": usable,
        "cache_bytes_per_device": cache_bytes,
        "tokens_per_group": usable * page_size,
        "tokens_total": dp * usable * page_size,
        "pages_per_sequence": pages_per_sequence,
        "sequences_per_group": per_group,
        "sequences_total": dp * per_group,
        "layer_groups": groups,
        "kv_bytes": distinct,
        "waste_bytes": waste,
        "waste_percent": {k: 100 * v / hbm_per_device for k, v in waste.items()},
        "int32_ok": num_layers * spec.slots_per_pool <= INT32_MAX,
        "bytes_per_token": page_bytes // page_size,
        "bfloat16_bytes_per_token": bf16_page_bytes // page_size,
        "bfloat16_tokens_per_group": bf16_tokens,
        "capacity_vs_bfloat16": usable * page_size / bf16_tokens if bf16_tokens else None,
        "sliding_window": window,
        "host_tier": host,
        "latent": _latent(spec, tp) if spec.latent else None,
    }


def _latent(spec: CacheSpec, tp: int) -> dict[str, Any]:
    """A latent (MLA) cache's bytes per token: one copy of the row, what one device stores
    (lane and sublane padding included), and the ``tp`` copies of a data-parallel group."""
    rank = spec.kv_lora_rank
    assert rank is not None
    # Every layer, one device, padding included.
    stored = spec.num_cache_layers * spec.page_bytes_per_device(tp) // spec.page_size
    return {
        "kv_lora_rank": rank,
        "qk_rope_head_dim": spec.head_dim - rank,
        "values_per_token_layer": spec.head_dim,
        "bytes_per_token_layer": spec.head_dim * spec.bits // 8,
        "bytes_per_token": spec.num_cache_layers * spec.head_dim * spec.bits // 8,
        "stored_bytes_per_token_per_device": stored,
        "copies_per_group": tp,
        "stored_bytes_per_token_per_group": tp * stored,
        "replication_bytes_per_token": (tp - 1) * stored,
    }


def human(n: int) -> str:
    """1310720 -> '1.25 MiB'."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} B"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def format_plan(plan: dict[str, Any]) -> str:
    """Renders :func:`make_plan`'s dict as plain aligned text."""
    p = plan
    dp, tp = p["mesh"]["data"], p["mesh"]["model"]
    L, P, budget = p["num_layers"], p["page_size"], p["hbm_per_device"]
    name = p["model"] or "custom model"
    r = p["replication"]
    latent = p.get("latent")
    head_note = (
        f"{p['heads_per_device']} of {p['num_kv_heads']} heads per device"
        if r == 1
        else f"each of {p['num_kv_heads']} heads on {r} devices, 1 per device"
    )
    if latent:
        head_note = f"the latent row (shared by every query head) on each of {tp} device(s)"
    sections: list[tuple[str, list[tuple[str, str, str]]]] = [
        (
            "layout (per device)",
            [
                ("latent replication" if latent else "KV head replication", f"x{r}", head_note),
                *(
                    [
                        (
                            "query heads per device",
                            f"{p['q_heads_per_device']}",
                            f"of {p['num_q_heads']}: "
                            f"{p['num_q_heads'] // p['num_kv_heads']} per KV head",
                        )
                    ]
                    if p.get("num_q_heads") is not None
                    else []
                ),
                (
                    "latent rows per slot"
                    if latent
                    else f"{p.get('kv_layout', 'interleaved')} K/V rows per slot",
                    f"{p['combined_heads_per_device']}",
                    f"stored as {p['packed_rows_per_device']} (packing {p['packing']} for "
                    f"{p['dtype']})",
                ),
                _row_lanes(p),
                *_packed_rows(p),
                *(
                    [
                        (
                            "lane padding per page, 1 layer",
                            f"{p['lane_padding_bytes_per_page_layer']:,}",
                            f"{_percent(p, 'lane_padding_bytes_per_page_layer')} of each page "
                            f"(lanes {p.get('row_dim', p['head_dim'])}.."
                            f"{p['padded_head_dim'] - 1}); "
                            f"{p['lane_padding_bytes_per_page']:,} of a page id, {L} layers",
                        )
                    ]
                    if p.get("lane_padding_bytes_per_page_layer")
                    else []
                ),
                ("cache shape, one device", _shape(p["local_shape"]), ""),
                ("cache shape, global", _shape(p["global_shape"]), ""),
            ],
        ),
        (
            "capacity",
            [
                (
                    "bytes per page per device, 1 layer",
                    f"{p['page_bytes_per_layer']:,}",
                    human(p["page_bytes_per_layer"]),
                ),
                (
                    f"bytes per page per device, {L} layers",
                    f"{p['page_bytes']:,}",
                    f"{human(p['page_bytes'])}; a page id spans every layer",
                ),
                (
                    "pages per device (= per DP pool)",
                    f"{p['pages_per_device']:,}",
                    f"{p['usable_pages_per_device']:,} usable: page 0 is the null page",
                ),
                ("cache bytes per device", f"{p['cache_bytes_per_device']:,}", ""),
                (
                    "tokens per DP group",
                    f"{p['tokens_per_group']:,}",
                    f"{p['usable_pages_per_device']:,} pages x {P}",
                ),
                (f"tokens in total ({_plural(dp, 'DP group')})", f"{p['tokens_total']:,}", ""),
                (
                    f"bytes per token per device, {L} layers",
                    f"{p['bytes_per_token']:,}",
                    _dtype_note(p),
                ),
                (
                    f"concurrent sequences of {p['context']:,} tokens",
                    f"{p['sequences_total']:,}",
                    f"{p['sequences_per_group']:,} per DP group, "
                    f"{p['pages_per_sequence']:,} pages each"
                    + ("; no page released" if p["sliding_window"] else ""),
                ),
            ],
        ),
    ]
    w = p["sliding_window"]
    if w:
        gain = w["capacity_gain"]
        sections[1][1].append(
            (
                f"  with sliding window {w['window']:,}",
                f"{w['sequences_total']:,}",
                f"{w['sequences_per_group']:,} per DP group, at most {w['pages_per_sequence']:,} "
                "pages each (pages before the window released): "
                + (f"x{gain:.2f}" if gain is not None else "none fit without release"),
            )
        )
    if p.get("layer_groups"):
        sections.append(format_groups(p))
    if latent:
        sections.append(_latent_section(p))
    padding = (
        f"row padding (K|V {p['row_dim']} -> {p['padded_head_dim']} lanes)"
        if p.get("kv_layout") == "packed"
        else f"head_dim padding ({p['head_dim']} -> {p['padded_head_dim']})"
    )
    if latent:
        padding = f"row padding (latent {p['row_dim']} -> {p['padded_head_dim']} lanes)"
    labels = {
        "head_dim_padding": padding,
        "dtype_packing": (
            f"dtype packing ({p['combined_heads_per_device']} -> "
            f"{p['packed_rows_per_device']} rows)"
        ),
        "head_replication": f"{'latent' if latent else 'head'} replication (x{r})",
        "null_page": "null page 0 (reserved)",
        "budget_remainder": "remainder (< 1 page)",
    }
    budget_rows = [
        (
            "latent, one copy" if latent else "K/V of distinct heads",
            f"{p['kv_bytes']:,}",
            f"{100 * p['kv_bytes'] / budget:.2f}%",
        )
    ]
    for key, label in labels.items():
        budget_rows.append((label, f"{p['waste_bytes'][key]:,}", f"{p['waste_percent'][key]:.2f}%"))
    sections.append(("where the budget goes (bytes per device, % of budget)", budget_rows))
    if p.get("host_tier"):
        sections.append(_host_section(p))

    width = max(len(label) for _, rows in sections for label, _, _ in rows)
    value_width = max(len(value) for _, rows in sections for _, value, _ in rows)
    heads = (
        f"MLA latent {latent['kv_lora_rank']} + rope {latent['qk_rope_head_dim']}"
        if latent
        else f"{p['num_kv_heads']} KV heads, head_dim {p['head_dim']}"
    )
    lines = [
        f"kvshard plan: {name} ({L} layers, {heads}), {p['dtype']}, page_size {P}",
        f"mesh {dp}x{tp}: {_plural(dp, 'data-parallel group')} x {tp}-way tensor parallelism "
        + ("over query heads, the latent replicated" if latent else "over KV heads"),
        f"budget: {budget:,} bytes ({human(budget)}) of HBM per device for the KV cache",
    ]
    for title, rows in sections:
        lines += ["", title]
        for label, value, note in rows:
            lines.append(f"  {label:<{width}}  {value:>{value_width}}  {note}".rstrip())
    for note in p.get("notes", ()):
        lines += ["", f"note: {note}"]
    return "\n".join(lines)


def _latent_section(p: dict[str, Any]) -> tuple[str, list[tuple[str, str, str]]]:
    """A latent (MLA) cache's bytes per token: one copy, one device, the group's copies."""
    t, L, tp = p["latent"], p["num_layers"], p["mesh"]["model"]
    return (
        "latent (MLA) bytes per token",
        [
            (
                "latent values per token, 1 layer",
                f"{t['values_per_token_layer']:,}",
                f"c_kv {t['kv_lora_rank']} + k_pe {t['qk_rope_head_dim']}: "
                f"{t['bytes_per_token_layer']:,} bytes in {p['dtype']}",
            ),
            (f"latent bytes per token, {L} layers", f"{t['bytes_per_token']:,}", "one copy"),
            (
                "stored per token per device",
                f"{t['stored_bytes_per_token_per_device']:,}",
                "with lane and sublane padding",
            ),
            (
                "stored per token per DP group",
                f"{t['stored_bytes_per_token_per_group']:,}",
                f"{t['copies_per_group']} cop{'y' if tp == 1 else 'ies'} (one per device of "
                "the head axis)",
            ),
            (
                "replication cost per token",
                f"{t['replication_bytes_per_token']:,}",
                "the copies past the first: a page axis (--mesh DATAx1) spends those devices on "
                "more pages instead",
            ),
        ],
    )


def _row_lanes(p: dict[str, Any]) -> tuple[str, str, str]:
    """The head_dim row: how a head's K and V sit in the lanes."""
    if p.get("latent"):
        t, d = p["latent"], p["head_dim"]
        return (
            "latent row",
            f"{d}",
            f"c_kv lanes 0..{t['kv_lora_rank'] - 1}, k_pe lanes {t['kv_lora_rank']}..{d - 1}, "
            f"stored as {p['padded_head_dim']}",
        )
    if p.get("kv_layout") == "packed":
        d = p["head_dim"]
        return (
            "head_dim",
            f"{d}",
            f"K|V of a head in one row: K lanes 0..{d - 1}, V lanes {d}..{2 * d - 1}, "
            f"stored as {p['padded_head_dim']}",
        )
    return ("head_dim", f"{p['head_dim']}", f"stored as {p['padded_head_dim']}")


def _packed_rows(p: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The packed layout's saving against padding each head_dim to 128 lanes (interleaved)."""
    w = p.get("interleaved")
    if not w:
        return []
    gain = w["capacity_vs_interleaved"]
    return [
        (
            "padding bytes per page, 1 layer",
            f"{p['padding_bytes_per_page_layer']:,}",
            f"interleaved (each head_dim padded to 128 lanes): "
            f"{w['lane_padding_bytes_per_page_layer']:,} of {w['page_bytes_per_layer']:,}",
        ),
        (
            f"saved per page, {p['num_layers']} layers",
            f"{w['saved_bytes_per_page']:,}",
            f"{w['page_bytes']:,} -> {p['page_bytes']:,} bytes; "
            + (f"x{gain:.2f} the tokens of interleaved" if gain else "interleaved: < 2 pages"),
        ),
    ]


def _percent(p: dict[str, Any], key: str) -> str:
    """A per-page byte count as a share of the page: '50.00%'."""
    return f"{100 * p[key] / p['page_bytes_per_layer']:.2f}%"


def _dtype_note(p: dict[str, Any]) -> str:
    """'x2.00 the tokens of bfloat16 (1,024 bytes per token)', or '' for bfloat16 itself."""
    if p["dtype"] == "bfloat16":
        return ""
    bf16 = f"{p['bfloat16_bytes_per_token']:,} bytes per token"
    gain = p["capacity_vs_bfloat16"]
    if gain is None:
        return f"bfloat16: {bf16}, under 2 pages in this budget"
    return f"x{gain:.2f} the tokens of bfloat16 ({bf16})"


def _host_section(p: dict[str, Any]) -> tuple[str, list[tuple[str, str, str]]]:
    h, P, dp = p["host_tier"], p["page_size"], p["mesh"]["data"]
    n = h["devices_per_host"]
    return (
        f"host tier ({human(h['host_memory'])} of pinned host memory per host, {n} devices)",
        [
            ("host bytes per device", f"{h['bytes_per_device']:,}", human(h["bytes_per_device"])),
            (
                "host pages per device (= per DP pool)",
                f"{h['pages_per_device']:,}",
                f"{p['page_bytes']:,} bytes each, as on the device; no null page",
            ),
            (
                "host bytes used per device",
                f"{h['used_bytes_per_device']:,}",
                f"{h['used_bytes_per_host']:,} per host ({human(h['used_bytes_per_host'])})",
            ),
            (
                "host tokens per DP group",
                f"{h['tokens_per_group']:,}",
                f"{h['pages_per_device']:,} pages x {P}; x{h['capacity_vs_device']:.2f} the "
                "device's usable pages",
            ),
            (f"host tokens in total ({_plural(dp, 'DP group')})", f"{h['tokens_total']:,}", ""),
            (
                "device + host tokens per DP group",
                f"{h['device_and_host_tokens_per_group']:,}",
                "",
            ),
            (
                f"sequences of {p['context']:,} tokens parked in host",
                f"{h['sequences_total']:,}",
                f"{h['sequences_per_group']:,} per DP group",
            ),
        ],
    )
