"""Picking a device operation's backend from the platform of the cache's devices.

(kvshard's executables need no per-platform compiler options: a bfloat16/float8 cache on CPU stays
in place by its storage dtype, :mod:`kvshard._device.storage`, in kvshard's own executables and in a
caller's jit alike.)
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
            "reads K and V on alternate rows only. Use kvshard's own kernel (BackendOptions("
            "pallas_kernel='kvshard'), the default), backend='xla' (or 'auto'), or build the "
            "cache with CacheSpec(..., kv_layout='interleaved') (twice the bytes at head_dim 64)"
        )


def resolve_attention_backend(cache: Any, backend: str, options: Any = None) -> str:
    """:func:`resolve_backend` for :func:`kvshard.attention`. kvshard's own kernel (the
    default, ``options.pallas_kernel="kvshard"``) reads every cache, so "auto" is pallas on
    TPU for every layout. With JAX's kernel (``pallas_kernel="jax"`` or an
    ``attention_kernel``) "auto" picks xla for a packed cache, which that kernel cannot read,
    and "pallas" on one raises (:func:`check_pallas_attention`). A "latent" (MLA) cache is
    read by the xla backend only: "auto" picks it, "pallas" raises NotImplementedError."""
    if cache.spec.kv_layout == "latent":
        if backend == "pallas":
            raise NotImplementedError(
                "backend='pallas' cannot read a kv_layout='latent' (MLA) cache: neither "
                "kvshard's ragged paged attention kernel nor JAX's has the absorbed latent "
                "form; use backend='xla' (or 'auto', which picks it for a latent cache)"
            )
        return "xla"
    jax_kernel = options is not None and options.jax_attention_kernel
    if backend == "auto" and jax_kernel and cache.spec.kv_layout != "interleaved":
        return "xla"
    resolved = resolve_backend(cache, backend)
    if resolved == "pallas" and jax_kernel:
        check_pallas_attention(cache.spec)
    return resolved
