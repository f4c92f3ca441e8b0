"""The plan of a hybrid model with state layers (Mamba-2, gated DeltaNet): one page pool for
attention K/V and per-request states, with vLLM's unified page size.

``kvshard plan --config`` of a hybrid family's config.json (see
:mod:`kvshard._geometry.state_layers`) prints this plan: the layers are grouped by
:func:`kvshard._geometry.layer_types.cache_groups` (vLLM's equal-size KV-cache groups, attention
groups first), a state group's page holds one request's state of its layers, and the attention page
size in tokens is the least multiple of ``--page-size`` whose page is at least a state page (vLLM's
``HybridAttentionMambaModelConfig``); the state page is padded to it, so every page of the pool has
the same bytes. A request of ``context`` tokens holds ``ceil(context / page_size)`` pages in each
attention group and one page in each state group. Bytes are per device: K/V heads and state heads
are split over the tensor axis.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvshard._geometry.layer_types import cache_groups, describe_groups, group_layers, is_state
from kvshard._geometry.state_layers import hybrid_layers, unified_page_size

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "int8": 1, "float8_e4m3fn": 1}


def state_plan(
    config: Mapping[str, Any],
    *,
    dtype: str,
    page_alignment: int,
    dp: int,
    tp: int,
    hbm_per_device: int,
    context: int,
    model: str,
) -> dict[str, Any]:
    """Returns the plan (a JSON-able dict) of a hybrid config on a ``dp x tp`` mesh.

    Raises:
      ValueError: the config is not a hybrid family read by :mod:`kvshard._geometry.state_layers`
        (or is Mamba-1), ``tp`` does not divide the K/V heads or the state heads, or the
        budget holds no request; the message names the value and the bound.
    """
    layers = hybrid_layers(config, where=model)
    text = config.get("text_config") if "num_hidden_layers" not in config else None
    data = text if isinstance(text, Mapping) else config
    state = layers.state
    types = layers.layer_types
    attention = [t for t in types if not is_state(t)]
    if not attention:
        raise ValueError(f"{model}: no attention layer; kvshard's pool needs one")
    heads = data.get("num_attention_heads")
    kv_heads = data.get("num_key_value_heads") or heads
    head_dim = data.get("head_dim") or (
        data["hidden_size"] // heads if heads and data.get("hidden_size") else None
    )
    if not kv_heads or not head_dim:
        raise ValueError(f"{model}: num_key_value_heads and head_dim are needed for attention")
    for what, count in (("num_key_value_heads", kv_heads), ("state heads", state.heads)):
        if count % tp:
            raise ValueError(f"--mesh {dp}x{tp}: {what}={count} is not divisible by tp={tp}")
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} must be one of {', '.join(_DTYPE_BYTES)}")
    groups = cache_groups(types)
    gsize = groups.group_size
    token_bytes = gsize * 2 * (kv_heads // tp) * head_dim * _DTYPE_BYTES[dtype]
    state_bytes = gsize * state.nbytes // tp  # conv channels and SSM heads split over tp
    page_size = unified_page_size(state_bytes, token_bytes, page_alignment)
    page_bytes = page_size * token_bytes
    pages = hbm_per_device // page_bytes
    usable = max(pages - 1, 0)
    n_state = sum(1 for t in groups.group_types if is_state(t))
    n_attn = groups.num_groups - n_state
    per_request = n_attn * -(-context // page_size) + n_state
    sequences = usable // per_request
    if sequences == 0:
        raise ValueError(
            f"--hbm-per-device {hbm_per_device}: holds {usable} usable pages of {page_bytes:,} "
            f"bytes; one request of {context} tokens needs {per_request}"
        )
    return {
        "model": model,
        "mesh": [dp, tp],
        "dtype": dtype,
        "num_cache_layers": len(types),
        "layers": describe_groups(group_layers(types), len(types)),
        "state": {
            "kind": state.kind,
            "conv_shape": list(state.conv),
            "ssm_shape": list(state.ssm),
            "conv_dtype": state.conv_dtype,
            "ssm_dtype": state.ssm_dtype,
            "bytes_per_layer": state.nbytes,
            "bytes_per_layer_per_device": state.nbytes // tp,
        },
        "group_size": gsize,
        "kv_cache_groups": [
            {"kind": t[0], "layers": list(members)}
            for t, members in zip(groups.group_types, groups.group_layers, strict=True)
        ],
        "attention_token_bytes_per_device": token_bytes,
        "state_page_bytes_per_device": state_bytes,
        "page_alignment": page_alignment,
        "page_size": page_size,
        "page_bytes": page_bytes,
        "state_padding_bytes": page_bytes - state_bytes,
        "pages_per_device": pages,
        "usable_pages_per_device": usable,
        "context": context,
        "pages_per_request": per_request,
        "sequences_per_group": sequences,
        "sequences_total": dp * sequences,
        "tokens_total": dp * sequences * context,
        "layer_types": [list(t) for t in types],
    }


def format_state_plan(p: dict[str, Any]) -> str:
    """The plan's text."""
    s = p["state"]
    dp, tp = p["mesh"]
    n_state = sum(1 for g in p["kv_cache_groups"] if g["kind"] in ("mamba", "linear_attention"))
    n_attn = len(p["kv_cache_groups"]) - n_state
    rows = [
        ("model", p["model"], f"mesh {dp}x{tp} (dp x tp), cache dtype {p['dtype']}"),
        ("cache layers", f"{p['num_cache_layers']}", p["layers"]),
        (
            "state per layer per request",
            f"{s['bytes_per_layer']:,}",
            f"{s['kind']}: conv {s['conv_shape']} {s['conv_dtype']} + ssm {s['ssm_shape']} "
            f"{s['ssm_dtype']}; {s['bytes_per_layer_per_device']:,} per device",
        ),
        (
            "KV-cache groups",
            f"{len(p['kv_cache_groups'])}",
            f"{n_attn} attention + {n_state} state, {p['group_size']} layers each",
        ),
        (
            "page size (tokens, attention groups)",
            f"{p['page_size']:,}",
            f"least multiple of {p['page_alignment']} whose page holds a state page "
            "(vLLM's unification rule)",
        ),
        (
            "bytes per page per device",
            f"{p['page_bytes']:,}",
            f"attention {p['attention_token_bytes_per_device']:,} per token; state page "
            f"{p['state_page_bytes_per_device']:,} + {p['state_padding_bytes']:,} padding",
        ),
        (
            "pages per device",
            f"{p['pages_per_device']:,}",
            f"{p['usable_pages_per_device']:,} usable: page 0 is the null page",
        ),
        (
            f"pages per request of {p['context']:,} tokens",
            f"{p['pages_per_request']:,}",
            f"{n_attn} attention group(s) x ceil(context / page_size) + {n_state} state page(s)",
        ),
        (
            "concurrent sequences",
            f"{p['sequences_total']:,}",
            f"{p['sequences_per_group']:,} per DP group, {p['tokens_total']:,} tokens",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    lines = ["hybrid plan (state layers in the page pool, vLLM's unified page size)"]
    lines += [f"  {a:<{width}}  {b:>{vwidth}}  {c}" for a, b, c in rows]
    return "\n".join(lines)
