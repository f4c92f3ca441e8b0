"""Pallas TPU kernels (interpret mode on other backends)."""

from kvshard.kernels.kv_cache_update import kv_cache_update as kv_cache_update

__all__ = ["kv_cache_update"]
