"""The pallas attention backend: JAX's ``ragged_paged_attention`` on the device's own block.

Its ``kv_pages`` operand is ``[total_pages, page_size, C, D]`` with K at even and V at odd
combined heads: exactly one device's stacked block ``[L, num_pages·page_size, C, D_pad]``
reshaped (a free bitcast) to ``[L·num_pages, page_size, C, D_pad]``. Page ``p`` of layer ``l``
is page ``l·num_pages + p`` of that view, so the page table is offset by ``layer·num_pages``
and no layer is ever sliced out. JAX's kernel masks the KV slots a query may not see, so
stale values there (NaN included) cannot reach the output.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

from kvshard._attention.params import Statics, spec_scale
from kvshard._drop import live_requests, token_requests

__all__ = [
    "CROSS_LOWERING_KV_PAGES_PER_BLOCK",
    "CROSS_LOWERING_QUERIES_PER_BLOCK",
    "local_pallas",
    "pallas_operands",
    "pallas_output",
]

# Block sizes handed to JAX's kernel when lowering for TPU from a host that is not a TPU (its
# tuned-size lookup needs a TPU); the common entries of its tuned table.
CROSS_LOWERING_KV_PAGES_PER_BLOCK = 16
CROSS_LOWERING_QUERIES_PER_BLOCK = 32


def pallas_operands(kv, layer, q, page_indices, kv_lens, cu_q_lens, num_seqs, *, statics: Statics):
    """What the pallas backend hands the kernel on one device: (operands, kwargs, tok_ok).

    ``operands`` are the kernel's positional arguments: q padded to D_pad, the device's whole
    stacked block viewed as pages [L·num_pages, P, C, D_pad] (a bitcast, no copy), kv_lens,
    page indices offset by ``layer·num_pages``, cu_q_lens (entries past the live requests
    repeat their total) and the live request count. ``tok_ok`` (bool[T]) marks the tokens of
    live requests; the rest of the output is zeroed.
    """
    spec, sm_scale, window, soft_cap, options = statics
    num_layers, num_slots, combined, padded_dim = kv.shape
    num_tokens, _, head_dim = q.shape
    page_size = spec.page_size
    num_pages = num_slots // page_size
    live = live_requests(
        page_indices,
        kv_lens,
        cu_q_lens,
        num_seqs,
        layer,
        num_layers=num_layers,
        num_tokens=num_tokens,
        num_pages=num_pages,
        page_size=page_size,
    )
    _, tok_ok = token_requests(cu_q_lens, live, num_tokens)
    cu_q_lens = jnp.where(jnp.arange(cu_q_lens.shape[0]) <= live, cu_q_lens, cu_q_lens[live])
    layer = jnp.clip(layer, 0, num_layers - 1)
    # Rows past `live` are never read by the kernel; clamp them anyway so no index can leave
    # this layer's pages.
    pages = jnp.clip(page_indices, 0, num_pages - 1) + layer * num_pages
    kv_pages = kv.reshape(num_layers * num_pages, page_size, combined, padded_dim)  # bitcast
    q_pad = jnp.pad(q, [(0, 0), (0, 0), (0, padded_dim - head_dim)])
    operands = (q_pad, kv_pages, kv_lens, pages, cu_q_lens, live[None])
    kwargs: dict[str, Any] = {
        "sm_scale": sm_scale,
        "sliding_window": window,
        "soft_cap": soft_cap,
        "k_scale": spec_scale(spec, "k"),
        "v_scale": spec_scale(spec, "v"),
    }
    blocks = {
        "num_kv_pages_per_block": options.kv_pages_per_block,
        "num_queries_per_block": options.queries_per_block,
    }
    if jax.devices()[0].platform != "tpu":
        # The kernel looks its block sizes up by TPU generation, which fails on any other
        # host; exporting for TPU from such a host needs them given (the tuned table's usual
        # values). On a TPU host the kernel's own table is used.
        blocks = {
            "num_kv_pages_per_block": options.kv_pages_per_block
            or min(CROSS_LOWERING_KV_PAGES_PER_BLOCK, page_indices.shape[1]),
            "num_queries_per_block": options.queries_per_block or CROSS_LOWERING_QUERIES_PER_BLOCK,
        }
    if options.attention_kernel is None:  # a custom kernel picks its own blocks
        kwargs |= {k: v for k, v in blocks.items() if v is not None}
    return operands, kwargs, tok_ok


def pallas_output(out: jax.Array, tok_ok: jax.Array, head_dim: int, dtype: Any) -> jax.Array:
    """The kernel's [T, Hq, D_pad] output -> [T, Hq, D], zero outside live requests."""
    return jnp.where(tok_ok[:, None, None], out[..., :head_dim], 0).astype(dtype)


def local_pallas(kv, layer, q, page_indices, kv_lens, cu_q_lens, num_seqs, *, statics: Statics):
    """One device: the kernel on the [L·num_pages, P, C, D_pad] view."""
    operands, kwargs, tok_ok = pallas_operands(
        kv, layer, q, page_indices, kv_lens, cu_q_lens, num_seqs, statics=statics
    )
    kernel = statics.options.attention_kernel or ragged_paged_attention
    return pallas_output(kernel(*operands, **kwargs), tok_ok, q.shape[-1], q.dtype)
