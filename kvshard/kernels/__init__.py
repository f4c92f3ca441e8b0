"""Pallas TPU kernels (interpret mode on other backends)."""

from kvshard.kernels.update import kv_cache_update as kv_cache_update

__all__ = ["kv_cache_update"]
