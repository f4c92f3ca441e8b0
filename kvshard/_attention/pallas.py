"""The pallas attention backend: a Pallas TPU kernel on the device's own block, in place.

Two kernels (``BackendOptions.pallas_kernel``):

* "kvshard" (the default): kvshard's own kernel,
  :func:`kvshard.kernels.attention.ragged_paged_attention`, handed the device's whole stacked
  block and the layer (it offsets the page table itself); every layout and layer type,
  sinks; runs in Pallas TPU interpret mode off TPU (``BackendOptions.interpret``).
  :func:`local_kvshard` below.
* "jax": JAX's bundled ``ragged_paged_attention`` (or a kernel of its contract,
  ``BackendOptions.attention_kernel``), described next.

JAX's kernel's ``kv_pages`` operand is ``[total_pages, page_size, C, D]`` with K at even and V
at odd combined heads: exactly one device's stacked block ``[L, num_pages·page_size, C, D_pad]``
reshaped (a free bitcast) to ``[L·num_pages, page_size, C, D_pad]``. Page ``p`` of layer ``l``
is page ``l·num_pages + p`` of that view, so the page table is offset by ``layer·num_pages``
and no layer is ever sliced out. JAX's kernel zeroes K and V of every slot at or past a
request's ``kv_len`` before its matmuls and reads only the pages of the request's row, so stale
values there (NaN included) cannot reach the output; inside ``kv_len`` it masks the scores only,
so with a sliding window a non-finite value before the window would (the xla backend masks it;
docs/attention.md). Attention sinks and a "packed" cache (K and V of a head in one row) are
refused before this backend is reached: JAX's kernel has no sinks and reads interleaved rows
only.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

from kvshard._attention.params import Statics, spec_scale, stored_query
from kvshard._device.backend import check_pallas_attention
from kvshard._device.drop import live_query_bounds, requests_on_block
from kvshard._device.options import BackendOptions
from kvshard._device.storage import from_bits, to_bits
from kvshard.cache._codec import combine, encode
from kvshard.kernels import attention as kernel
from kvshard.kernels.budgets import default_attention_blocks

__all__ = [
    "CROSS_LOWERING_KV_PAGES_PER_BLOCK",
    "CROSS_LOWERING_QUERIES_PER_BLOCK",
    "local_kvshard",
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
    spec, sm_scale, window, soft_cap = statics[:4]
    check_pallas_attention(spec)
    num_layers, num_slots, combined, padded_dim = kv.shape
    num_tokens, _, head_dim = q.shape
    page_size = spec.page_size
    num_pages = num_slots // page_size
    live, _, tok_ok = requests_on_block(
        kv, layer, page_indices, kv_lens, cu_q_lens, num_seqs, num_tokens, page_size
    )
    cu_q_lens = live_query_bounds(cu_q_lens, live)
    layer = jnp.clip(layer, 0, num_layers - 1)
    # Rows past `live` are never read by the kernel; clamp them anyway so no index can leave
    # this layer's pages.
    pages = jnp.clip(page_indices, 0, num_pages - 1) + layer * num_pages
    kv_pages = kv.reshape(num_layers * num_pages, page_size, combined, padded_dim)  # bitcast
    # A CPU cache storing bf16/fp8 bits (interpret mode, tests): the kernel reads values. On
    # TPU the storage is the logical dtype and this is the block itself (kvshard._device.storage).
    kv_pages = from_bits(kv_pages, spec.np_dtype)
    q_pad = jnp.pad(q, [(0, 0), (0, 0), (0, padded_dim - head_dim)])
    operands = (q_pad, kv_pages, kv_lens, pages, cu_q_lens, live[None])
    kwargs: dict[str, Any] = {
        "sm_scale": sm_scale,
        "sliding_window": window,
        "soft_cap": soft_cap,
        "k_scale": spec_scale(spec, "k"),
        "v_scale": spec_scale(spec, "v"),
    }
    return operands, kwargs, tok_ok


def pallas_output(out: jax.Array, tok_ok: jax.Array, head_dim: int, dtype: Any) -> jax.Array:
    """The kernel's [T, Hq, D_pad] output -> [T, Hq, D], zero outside live requests."""
    return jnp.where(tok_ok[:, None, None], out[..., :head_dim], 0).astype(dtype)


def local_kvshard(
    kv,
    layer,
    q,
    page_indices,
    kv_lens,
    cu_q_lens,
    num_seqs,
    sinks=None,
    *,
    statics: Statics,
    writes=None,
):
    """One device: kvshard's kernel on the stacked block [L, slots, C, D_pad] (either layout),
    q [T, Hq_local, D], sinks float32[Hq_local] or None -> [T, Hq_local, D].

    ``writes`` (fused_attention): (k, v [T, h, D] this device's heads, real values, slices
    int32[3, S], num_slices int32[1], write_layer): the fused kernel writes them as
    :func:`kvshard.update` does (:func:`kvshard.cache._codec.encode`, the same rows) and
    attends; returns (out, kv) then, kv in the block's storage dtype."""
    spec, options = statics.spec, statics.options
    stored = kv.dtype
    # A CPU cache storing bf16/fp8 bits (interpret mode, tests) is read as values; on TPU the
    # storage is the logical dtype and this is the block itself (kvshard._device.storage).
    kv = from_bits(kv, spec.np_dtype)
    blocks = None
    if options.queries_per_block is not None or options.kv_pages_per_block is not None:
        default = default_attention_blocks(
            page_size=spec.page_size,
            combined_heads=kv.shape[2],
            padded_head_dim=kv.shape[3],
            dtype=kv.dtype,
            q_heads=q.shape[1],
            head_dim=q.shape[2],
            pages_per_seq=page_indices.shape[1],
            num_tokens=q.shape[0],
            q_dtype=q.dtype,
            fused=writes is not None,
        )
        blocks = kernel.BlockSizes(
            queries_per_block=options.queries_per_block or default.queries_per_block,
            kv_pages_per_block=options.kv_pages_per_block or default.kv_pages_per_block,
        )
    kwargs: dict[str, Any] = {}
    if writes is not None:
        k, v, slices, num_slices, write_layer = writes
        call: Any = kernel.fused_ragged_paged_attention
        tail: tuple[Any, ...] = (slices, num_slices)
        kwargs["write_layer"] = write_layer
        operands: tuple[Any, ...] = (stored_query(q, statics), combine(encode(spec, k, v)), kv)
    else:
        call, tail, operands = kernel.ragged_paged_attention, (), (stored_query(q, statics), kv)
    result = call(
        *operands,
        layer,
        kv_lens,
        page_indices,
        cu_q_lens,
        num_seqs,
        *tail,
        **kwargs,
        kv_layout="packed" if spec.packed else "interleaved",
        page_size=spec.page_size,
        sm_scale=statics.sm_scale,
        sliding_window=statics.sliding_window,
        chunk_size=statics.chunk_size,
        soft_cap=statics.soft_cap,
        sinks=sinks,
        k_scale=spec_scale(spec, "k"),
        v_scale=spec_scale(spec, "v"),
        q_scale=statics.q_scale,
        block_sizes=blocks,
        interpret=options.interpret,
    )
    if writes is None:
        return result
    out, kv = result
    return out, to_bits(kv, stored)


def local_pallas(
    kv, layer, q, page_indices, kv_lens, cu_q_lens, num_seqs, sinks=None, *, statics: Statics
):
    """One device: kvshard's kernel (:func:`local_kvshard`), or JAX's on the
    [L·num_pages, P, C, D_pad] view (``options.pallas_kernel="jax"``, ``attention_kernel``)."""
    if not statics.options.jax_attention_kernel:
        return local_kvshard(
            kv, layer, q, page_indices, kv_lens, cu_q_lens, num_seqs, sinks, statics=statics
        )
    assert sinks is None, "sinks are refused for JAX's kernel before tracing"
    assert statics.q_scale is None, "q_scale is refused for JAX's kernel before tracing"
    operands, kwargs, tok_ok = pallas_operands(
        kv, layer, q, page_indices, kv_lens, cu_q_lens, num_seqs, statics=statics
    )
    options = statics.options
    if options.attention_kernel is not None:  # a kernel of the same contract, its own blocks
        out = options.attention_kernel(*operands, **kwargs)
    else:
        out = ragged_paged_attention(*operands, **kwargs, **_block_sizes(options, page_indices))
    return pallas_output(out, tok_ok, q.shape[-1], q.dtype)


def _block_sizes(options: BackendOptions, page_indices: jax.Array) -> dict[str, int]:
    """The block-size arguments of JAX's kernel: the options', else the kernel's own choice
    on a TPU host, else (lowering for TPU from another host) the tuned table's usual values."""
    blocks = {
        "num_kv_pages_per_block": options.kv_pages_per_block,
        "num_queries_per_block": options.queries_per_block,
    }
    if jax.devices()[0].platform != "tpu":
        # The kernel looks its block sizes up by TPU generation, which fails on any other host.
        blocks["num_kv_pages_per_block"] = blocks["num_kv_pages_per_block"] or min(
            CROSS_LOWERING_KV_PAGES_PER_BLOCK, page_indices.shape[1]
        )
        blocks["num_queries_per_block"] = (
            blocks["num_queries_per_block"] or CROSS_LOWERING_QUERIES_PER_BLOCK
        )
    return {k: v for k, v in blocks.items() if v is not None}
