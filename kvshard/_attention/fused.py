"""``fused_attention``: write one layer's new K/V, then attend, in one call.

Today the composition itself on every backend: :func:`kvshard.update` (on pallas the update
kernel, in place, the cache donated) followed by :func:`kvshard.attention` (on pallas kvshard's
attention kernel, which reads the step's tokens back from the pages just written). One kernel
per layer that attends the new tokens from VMEM as it writes them (tpu-inference's RPA v3) is
the next step (issue 29); the contract below is the one it will keep.
"""

from __future__ import annotations

from typing import Any

import jax

from kvshard._attention.api import attention
from kvshard._types import Backend, BackendOptions
from kvshard.cache import KVCache, update
from kvshard.step import StepMetadata

__all__ = ["fused_attention"]


def fused_attention(
    cache: KVCache,
    layer: int | jax.Array,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    step: StepMetadata,
    *,
    backend: Backend = "auto",
    options: BackendOptions | None = None,
    checks: bool = False,
    **attention_kwargs: Any,
) -> tuple[jax.Array, KVCache]:
    """``update(cache, layer, k, v, step)`` then ``attention(cache, layer, q, step, ...)``.

    Args:
      cache: DONATED when called eagerly, as by :func:`kvshard.update`; use the returned one.
      layer, step, backend, options, checks: as :func:`kvshard.update` and
        :func:`kvshard.attention` take them (the same drop rule and reports for both parts).
      q: the step's queries, as :func:`kvshard.attention` takes them.
      k, v: the step's new keys and values, as :func:`kvshard.update` takes them.
      **attention_kwargs: :func:`kvshard.attention`'s keywords (``sm_scale`` required;
        ``sliding_window``, ``layer_type``, ``soft_cap``, ``sinks``).

    Returns:
      (out, cache): attention's output and the updated cache, equal to the two calls'.

    Raises:
      Whatever :func:`kvshard.update` or :func:`kvshard.attention` raises for the same
      arguments; ``step`` must be a :class:`~kvshard.StepMetadata` (TypeError otherwise).
    """
    if not isinstance(step, StepMetadata):
        raise TypeError(f"step must be a kvshard.StepMetadata, got {type(step).__name__}")
    cache = update(cache, layer, k, v, step, backend=backend, options=options, checks=checks)
    out = attention(
        cache, layer, q, step, backend=backend, options=options, checks=checks, **attention_kwargs
    )
    return out, cache
