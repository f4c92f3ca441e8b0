"""Paged attention on the cache, per device: :func:`attention` (in :mod:`.api`), with the
backends :mod:`.xla` (jnp) and :mod:`.pallas` (kvshard's kernel, or JAX's) and their shared
:mod:`.params`; :func:`fused_attention` (in :mod:`.fused`) writes then attends."""

from kvshard._attention.api import attention as attention
from kvshard._attention.fused import fused_attention as fused_attention

__all__ = ["attention", "fused_attention"]
