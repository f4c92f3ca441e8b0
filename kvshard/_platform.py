"""Picking a device operation's backend from the platform of the cache's devices.

(kvshard's executables need no per-platform compiler options: a bfloat16/float8 cache on CPU
stays in place by its storage dtype, :mod:`kvshard._storage`, in kvshard's own executables and
in a caller's jit alike.)
"""

from __future__ import annotations

from typing import Any

__all__ = ["platform_of", "resolve_backend"]


def platform_of(cache: Any) -> str:
    """The platform of the cache's devices ("cpu", "gpu", "tpu")."""
    return str(cache.mesh.devices.flat[0].platform)


def resolve_backend(cache: Any, backend: str) -> str:
    """``backend``, with "auto" resolved: "pallas" on TPU, "xla" elsewhere."""
    if backend != "auto":
        return backend
    return "pallas" if platform_of(cache) == "tpu" else "xla"
