"""Paged attention on the cache, per device: :func:`attention` (in :mod:`.api`), with the
backends :mod:`.xla` (jnp) and :mod:`.pallas` (JAX's kernel) and their shared :mod:`.params`."""

from kvshard._attention.api import attention as attention

__all__ = ["attention"]
