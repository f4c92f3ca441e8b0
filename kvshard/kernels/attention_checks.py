"""Input checks of the attention kernel (:mod:`kvshard.kernels.attention`), named as JAX's
Pallas ops name theirs: :func:`static_validate_inputs` (what ``jit`` knows: shapes, dtypes,
static parameters) and :func:`dynamic_validate_inputs` (concrete metadata on the host, the
contract the drop rule enforces inside ``jit``). Both raise naming the argument, the value and
the bound.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvshard._geometry.layout import KV_LAYOUTS, SUPPORTED_DTYPES

__all__ = ["dynamic_validate_inputs", "static_validate_inputs"]


def static_validate_inputs(
    q,
    kv_cache,
    layer,
    kv_lens,
    page_indices,
    cu_q_lens,
    num_seqs,
    sinks=None,
    *,
    kv_layout: str,
    sm_scale: float,
    sliding_window: int | None = None,
    chunk_size: int | None = None,
    soft_cap: float | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
    q_scale: float | None = None,
    block_sizes: Any = None,
) -> None:
    """Shapes, dtypes and static parameters (what ``jit`` knows); raises naming the value.

    Raises:
      TypeError: q or sinks not floating, metadata not int32, a cache dtype the kernel cannot
        read.
      ValueError: any shape, layout or parameter out of its bound.
    """
    kernel_layouts = tuple(x for x in KV_LAYOUTS if x != "latent")  # MLA: the xla backend
    if kv_layout not in kernel_layouts:
        raise ValueError(
            f"kv_layout={kv_layout!r} must be one of {kernel_layouts}"
            + (
                " (a latent cache is read by kvshard.attention's xla backend)"
                if kv_layout == "latent"
                else ""
            )
        )
    if q.ndim != 3:
        raise ValueError(f"q must be [num_tokens, num_q_heads, head_dim], got {list(q.shape)}")
    if kv_cache.ndim != 4:
        raise ValueError(
            f"kv_cache must be [num_layers, num_slots, combined_heads, padded_head_dim], got "
            f"{list(kv_cache.shape)}"
        )
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"q must be a floating array, got {q.dtype}")
    if np.dtype(kv_cache.dtype).name not in SUPPORTED_DTYPES:
        raise TypeError(f"kv_cache dtype {kv_cache.dtype} must be one of {SUPPORTED_DTYPES}")
    _, q_heads, head_dim = q.shape
    _, _, combined, padded = kv_cache.shape
    per_head = 1 if kv_layout == "packed" else 2
    if combined % per_head:
        raise ValueError(
            f"kv_cache has {combined} combined heads, not a multiple of {per_head} "
            f"(kv_layout={kv_layout!r})"
        )
    kv_heads = combined // per_head
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q has {q_heads} query heads, not a multiple of {kv_heads} KV heads")
    row = 2 * head_dim if kv_layout == "packed" else head_dim
    if row > padded:
        raise ValueError(
            f"head_dim={head_dim} needs {row} lanes per row (kv_layout={kv_layout!r}); the "
            f"cache rows have {padded}"
        )
    if page_indices.ndim != 2:
        raise ValueError(
            f"page_indices must be [max_num_seqs, pages_per_seq], got {list(page_indices.shape)}"
        )
    max_seqs = page_indices.shape[0]
    for name, x, shape in (
        ("kv_lens", kv_lens, (max_seqs,)),
        ("cu_q_lens", cu_q_lens, (max_seqs + 1,)),
        ("num_seqs", num_seqs, (1,)),
        ("layer", layer, ()),
    ):
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    for name, x in (
        ("page_indices", page_indices),
        ("kv_lens", kv_lens),
        ("cu_q_lens", cu_q_lens),
        ("num_seqs", num_seqs),
        ("layer", layer),
    ):
        if x.dtype != jnp.int32:
            raise TypeError(f"{name} must be int32, got {x.dtype}")
    if sinks is not None and tuple(sinks.shape) != (q_heads,):
        raise ValueError(
            f"sinks must have shape [{q_heads}] (query heads), got {list(sinks.shape)}"
        )
    if sinks is not None and not jnp.issubdtype(sinks.dtype, jnp.floating):
        raise TypeError(f"sinks must be a floating array, got {sinks.dtype}")
    for name, value in (
        ("sm_scale", sm_scale),
        ("soft_cap", soft_cap),
        ("k_scale", k_scale),
        ("v_scale", v_scale),
        ("q_scale", q_scale),
    ):
        if value is None and name != "sm_scale":
            continue
        if not (isinstance(value, float | int) and np.isfinite(value) and value > 0):
            raise ValueError(f"{name}={value!r} must be a finite number > 0")
    for name, value in (("sliding_window", sliding_window), ("chunk_size", chunk_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r} must be None or an int >= 1")
    if sliding_window is not None and chunk_size is not None:
        raise ValueError(
            f"sliding_window={sliding_window} and chunk_size={chunk_size}: a layer has one type"
        )
    if block_sizes is not None and type(block_sizes).__name__ != "BlockSizes":
        raise TypeError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")


def dynamic_validate_inputs(
    q, kv_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs, *, page_size: int
) -> None:
    """Concrete metadata on the host: the contract the drop rule enforces inside ``jit``
    (:func:`kvshard._device.drop.request_in_contract`), raised naming the field and the bound.

    Raises:
      ValueError: layer out of range, num_seqs out of range, or a live request out of
        contract; also if any argument is traced (validate before entering ``jit``).
    """
    from kvshard._attention.api import _check_values  # the one host check of the contract

    try:
        values = [np.asarray(x) for x in (layer, page_indices, kv_lens, cu_q_lens, num_seqs)]
    except jax.errors.TracerArrayConversionError as err:
        raise ValueError(
            "dynamic_validate_inputs needs concrete metadata: validate before entering jit"
        ) from err
    layer_value, *fields = values
    num_layers = kv_cache.shape[0]
    if not 0 <= int(layer_value) < num_layers:
        raise ValueError(f"layer={int(layer_value)} is out of range [0, {num_layers})")
    _check_values(
        *fields,
        num_tokens=q.shape[0],
        num_pages=kv_cache.shape[1] // page_size,
        page_size=page_size,
        where="",
    )
