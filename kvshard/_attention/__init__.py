"""Paged attention on the cache, per device: the operation (:mod:`.api`; its public entry
:func:`kvshard.attention` is in :mod:`kvshard._eager`), with the backends :mod:`.xla` (jnp) and
:mod:`.pallas` (kvshard's kernel, or JAX's) and their shared :mod:`.params`;
:func:`fused_attention` (in :mod:`.fused`) writes then attends."""

from kvshard._attention.fused import fused_attention as fused_attention

__all__ = ["fused_attention"]
