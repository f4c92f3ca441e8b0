"""Picking a device operation's backend from the platform of the cache's devices.

(kvshard's executables need no per-platform compiler options: a bfloat16/float8 cache on CPU
stays in place by its storage dtype, :mod:`kvshard._storage`, in kvshard's own executables and
in a caller's jit alike.)
"""

from __future__ import annotations

from typing import Any

__all__ = ["check_pallas_attention", "platform_of", "resolve_attention_backend", "resolve_backend"]


def platform_of(cache: Any) -> str:
    """The platform of the cache's devices ("cpu", "gpu", "tpu")."""
    return str(cache.mesh.devices.flat[0].platform)


def resolve_backend(cache: Any, backend: str) -> str:
    """``backend``, with "auto" resolved: "pallas" on TPU, "xla" elsewhere."""
    if backend != "auto":
        return backend
    return "pallas" if platform_of(cache) == "tpu" else "xla"


def check_pallas_attention(spec: Any) -> None:
    """Refuses a cache JAX's ragged paged attention kernel cannot read: it takes pages
    [pages, page_size, 2·H, D] with K and V on alternate rows (the "interleaved" layout).

    Raises:
      NotImplementedError: ``spec.kv_layout`` is "packed"; names the layout and both ways out.
    """
    if spec.kv_layout != "interleaved":
        raise NotImplementedError(
            f"backend='pallas' cannot read a kv_layout={spec.kv_layout!r} cache (head_dim "
            f"{spec.head_dim}: K and V of a head share one row): JAX's ragged_paged_attention "
            "reads K and V on alternate rows only. Use backend='xla' (or 'auto'), or build the "
            "cache with CacheSpec(..., kv_layout='interleaved') (twice the bytes at head_dim 64)"
        )


def resolve_attention_backend(cache: Any, backend: str) -> str:
    """:func:`resolve_backend` for :func:`kvshard.attention`: "auto" picks xla for a packed
    cache, which JAX's kernel cannot read; "pallas" on one raises
    (:func:`check_pallas_attention`)."""
    if backend == "auto" and cache.spec.kv_layout != "interleaved":
        return "xla"
    resolved = resolve_backend(cache, backend)
    if resolved == "pallas":
        check_pallas_attention(cache.spec)
    return resolved
