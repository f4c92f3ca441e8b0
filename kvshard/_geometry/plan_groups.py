"""The hybrid arithmetic of ``kvshard plan``: layers of several attention types in one page pool.

A model whose layers mix attention types (Gemma 2 and 3, gpt-oss, Llama 4, Qwen2 with
``max_window_layers``; see :func:`kvshard.read_model_config`) keeps only a window's (or a
chunk's) pages for its local layers, if each type has its own page table. The planner counts
the layout vLLM uses for such models (``vllm/v1/core/kv_cache_utils.py``,
``_get_kv_cache_groups_uniform_page_size``), so that the figures say what a pool of this size
holds in a server that does it:

* the layers of each attention type are split into **KV-cache groups** of ``group_size``
  layers: ``group_size`` is the fewest layers of any type (the "1" of an n:1 pattern), or the
  most when no type has 1.25 times the layers of another; a type with ``n`` layers makes
  ``ceil(n / group_size)`` groups, taking ``layers[i::groups]``, the last ones padded with
  unused layer slots;
* one shared pool of page ids: a page id names ``page_size`` token slots in each of
  ``group_size`` layer slots, and every group draws its pages from the pool, so a page costs
  ``group_size`` layers' bytes, not ``num_layers``;
* each request has one page table per group: a full-attention group holds
  ``ceil(context / page_size)`` pages, a sliding-window group at most :func:`window_pages`
  (the pages of the window of its next token), a chunked group at most :func:`chunk_pages`
  (the pages of its current chunk).

The baseline is the same model with every layer treated as full attention: one group of all
layers (kvshard's stacked cache today), ``ceil(context / page_size)`` pages of ``num_layers``
layers each.
"""

from __future__ import annotations

from typing import Any

from kvshard._geometry.layer_types import FULL, LayerType, cache_groups, group_layers, layer_size
from kvshard.allocator import sliding_window_pages

__all__ = [
    "chunk_pages",
    "format_groups",
    "hybrid_capacity",
    "kv_cache_groups",
    "pages_per_request",
    "window_pages",
]


def _check_sizes(**values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")


def window_pages(window: int, page_size: int, context: int) -> int:
    """Most pages a request of up to ``context`` tokens holds when pages outside its window go.

    The rule (vLLM's ``SlidingWindowManager``): before a step computes the token at position
    ``n`` (``n`` tokens already in the cache), the pages holding only positions ``< n - W + 1``
    are released, since no query from ``n`` on reads them. For ``n < W - 1`` nothing is
    released and the count grows with ``n``, so the most is the allocator's decode bound
    (:func:`kvshard.allocator.sliding_window_pages`, where the rule lives) capped at
    ``ceil(context / P)``.

    This counts decode steps (one new token per step); a prefill chunk of ``C`` tokens holds
    the pages of ``C - 1`` more positions while it runs.

    Raises:
      ValueError: a non-positive argument.
    """
    _check_sizes(window=window, page_size=page_size, context=context)
    return min(sliding_window_pages(window, page_size), -(-context // page_size))


def chunk_pages(chunk: int, page_size: int, context: int) -> int:
    """Most pages a request of up to ``context`` tokens holds under chunked local attention.

    A query at position ``p`` reads keys ``s .. p`` with ``s = chunk * (p // chunk)`` (Llama 4),
    so before the step that computes position ``n`` the pages wholly before ``s`` can go (vLLM's
    ``ChunkedLocalAttentionManager``). The pages held peak at the last position ``e`` of a chunk
    (or ``context - 1``): ``e // P - s // P + 1``. Chunk starts repeat their offset within a
    page every ``P`` chunks, so ``P`` chunks at most are examined.

    Raises:
      ValueError: a non-positive argument.
    """
    _check_sizes(chunk=chunk, page_size=page_size, context=context)
    most = 0
    for k in range(min(-(-context // chunk), page_size)):
        start = k * chunk
        end = min(start + chunk, context) - 1
        most = max(most, end // page_size - start // page_size + 1)
    return most


def pages_per_request(layer_type: LayerType, page_size: int, context: int) -> int:
    """Most pages one request of up to ``context`` tokens holds in a group of this type."""
    size = layer_size(layer_type)
    if layer_type == FULL or size is None:
        _check_sizes(page_size=page_size, context=context)
        return -(-context // page_size)
    if layer_type[0] == "sliding":
        return window_pages(size, page_size, context)
    return chunk_pages(size, page_size, context)


def kv_cache_groups(
    layer_types: tuple[LayerType, ...],
) -> tuple[int, list[tuple[LayerType, tuple[int, ...]]]]:
    """Returns ``(group_size, [(type, layers), ...])``:
    :func:`kvshard._geometry.layer_types.cache_groups` (vLLM's split of the layers into KV-cache
    groups) as the planner prints it.

    ``kv_cache_groups((FULL, FULL, S, S, S))`` with ``S = ("sliding", 8)`` is
    ``(2, [(FULL, (0, 1)), (S, (2, 4)), (S, (3,))])``: the last group has one padding slot.
    """
    groups = cache_groups(layer_types)
    return groups.group_size, list(zip(groups.group_types, groups.group_layers, strict=True))


def _kind(t: LayerType) -> dict[str, Any]:
    return {"kind": t[0], "size": layer_size(t)}


def hybrid_capacity(
    *,
    layer_types: tuple[LayerType, ...],
    page_bytes_per_layer: int,
    page_size: int,
    hbm_per_device: int,
    context: int,
    dp: int,
    all_full_sequences_per_group: int,
    all_full_page_bytes: int,
) -> dict[str, Any]:
    """The plan's ``layer_groups`` entry: per-type pages and the capacity of vLLM's hybrid
    layout against every layer full (``all_full_*``: the baseline's sequences per DP group
    and bytes per page id). All byte counts per device; page 0 is the null page.
    """
    group_size, groups = kv_cache_groups(layer_types)
    page_bytes = group_size * page_bytes_per_layer
    pages = hbm_per_device // page_bytes
    usable = max(pages - 1, 0)
    rows = []
    for t, layers in group_layers(layer_types).items():
        each = pages_per_request(t, page_size, context)
        count = sum(1 for gt, _ in groups if gt == t)
        rows.append(
            {
                **_kind(t),
                "layers": list(layers),
                "num_layers": len(layers),
                "kv_cache_groups": count,
                "pages_per_request_each": each,
                "pages_per_request": count * each,
            }
        )
    per_request = sum(row["pages_per_request"] for row in rows)
    sequences = usable // per_request
    full_pages = -(-context // page_size)
    return {
        "group_size": group_size,
        "layer_slots": group_size * len(groups),
        "padding_layer_slots": group_size * len(groups) - len(layer_types),
        "groups": rows,
        "kv_cache_groups": [{**_kind(t), "layers": list(layers)} for t, layers in groups],
        "page_bytes": page_bytes,
        "pages_per_device": pages,
        "usable_pages_per_device": usable,
        "pages_per_request": per_request,
        "bytes_per_request": per_request * page_bytes,
        "sequences_per_group": sequences,
        "sequences_total": dp * sequences,
        "tokens_per_group": sequences * context,
        "tokens_total": dp * sequences * context,
        "all_full_pages_per_request": full_pages,
        "all_full_bytes_per_request": full_pages * all_full_page_bytes,
        "all_full_sequences_per_group": all_full_sequences_per_group,
        "all_full_sequences_total": dp * all_full_sequences_per_group,
        "all_full_tokens_per_group": all_full_sequences_per_group * context,
        "all_full_tokens_total": dp * all_full_sequences_per_group * context,
        "capacity_gain": (
            sequences / all_full_sequences_per_group if all_full_sequences_per_group else None
        ),
        "bytes_gain": full_pages * all_full_page_bytes / (per_request * page_bytes),
    }


def _type_label(row: dict[str, Any]) -> str:
    if row["kind"] == "sliding":
        return f"sliding window {row['size']:,}"
    if row["kind"] == "chunked":
        return f"chunked local {row['size']:,}"
    return "full attention"


def format_groups(p: dict[str, Any]) -> tuple[str, list[tuple[str, str, str]]]:
    """The text section of a plan's ``layer_groups``: (title, rows of label, value, note)."""
    g, L, ctx = p["layer_groups"], p["num_layers"], p["context"]
    rows: list[tuple[str, str, str]] = []
    for row in g["groups"]:
        n = row["kv_cache_groups"]
        rows.append(
            (
                f"{_type_label(row)}: {row['num_layers']} layers",
                f"{row['pages_per_request']:,}",
                f"pages per request: {n} KV-cache group{'s' if n > 1 else ''} x "
                f"{row['pages_per_request_each']:,}",
            )
        )
    pad = g["padding_layer_slots"]
    rows += [
        (
            f"bytes per page per device, {g['group_size']} layer slots",
            f"{g['page_bytes']:,}",
            f"{len(g['kv_cache_groups'])} groups x {g['group_size']} slots for {L} layers"
            + (f" ({pad} padding slot{'s' if pad > 1 else ''})" if pad else ""),
        ),
        (
            "pages per device",
            f"{g['pages_per_device']:,}",
            f"{g['usable_pages_per_device']:,} usable: page 0 is the null page",
        ),
        (
            f"bytes per request of {ctx:,} tokens",
            f"{g['bytes_per_request']:,}",
            f"{g['pages_per_request']:,} pages; every layer full: "
            f"{g['all_full_bytes_per_request']:,} ({g['all_full_pages_per_request']:,} pages of "
            f"{L} layers), x{g['bytes_gain']:.2f}",
        ),
        (
            f"concurrent sequences of {ctx:,} tokens",
            f"{g['sequences_total']:,}",
            f"{g['sequences_per_group']:,} per DP group, {g['tokens_total']:,} tokens",
        ),
        (
            "  every layer full",
            f"{g['all_full_sequences_total']:,}",
            f"{g['all_full_sequences_per_group']:,} per DP group, "
            f"{g['all_full_tokens_total']:,} tokens",
        ),
        (
            "  capacity gain of the groups",
            "none fit all full" if g["capacity_gain"] is None else f"x{g['capacity_gain']:.2f}",
            "sequences, grouped / every layer full",
        ),
    ]
    return (
        "layer groups (vLLM's hybrid layout: one page pool, a page table per KV-cache group)",
        rows,
    )
