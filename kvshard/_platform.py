"""Compiling kvshard's device operations per platform, and picking their backend.

:class:`PlatformJit` is ``jax.jit`` with the compiler options of the cache's platform
(:func:`compiler_options`); :func:`resolve_backend` turns ``backend="auto"`` into the backend
that runs on the cache's devices.
"""

from __future__ import annotations

import functools
from typing import Any

import jax

__all__ = ["PlatformJit", "compiler_options", "platform_of", "resolve_backend"]

# XLA's CPU compiler cannot compute in bfloat16 or float8, so its float-normalization passes
# rewrite every op of those types in float32. For a scatter into a donated bf16 cache that means
# convert(whole cache) -> f32 scatter -> convert back: two passes over the buffer and a temporary
# twice its size (about 300 ms per 256 MiB, against 0.2 ms in place). `update` and `copy_pages`
# only move, pad and convert data, which the CPU emitter does natively in every dtype, so their
# own executables skip those passes. The option is per executable: nothing else is affected.
# (Storing bf16 as uint16 also stays in place, but changes what `cache.kv` holds for every
# reader; bitcasting back inside the same jit materialises the copy again.)
_CPU_COMPILER_OPTIONS = {
    "xla_disable_hlo_passes": ",".join(
        f"float-normalization-{t}" for t in ("bf16", "f8e4m3fn", "f8e5m2")
    )
}


def trace_state_clean() -> bool:
    """True outside any trace (jit, scan, shard_map...), where a top-level jit is compiled."""
    from jax._src import core  # no public spelling in JAX 0.10

    return bool(core.trace_state_clean())


def platform_of(cache: Any) -> str:
    """The platform of the cache's devices ("cpu", "gpu", "tpu")."""
    return str(cache.mesh.devices.flat[0].platform)


def compiler_options(platform: str) -> dict[str, str] | None:
    """XLA compiler options under which kvshard's donated writes stay in place on ``platform``.

    On CPU: skip float normalization (see the comment above); elsewhere None. Only for
    executables that do no bf16/fp8 arithmetic (the CPU dot emitter rejects bf16 without it).
    """
    return dict(_CPU_COMPILER_OPTIONS) if platform == "cpu" else None


class PlatformJit:
    """``jax.jit(fun, **kwargs)`` compiled with :func:`compiler_options` of the cache's platform.

    Called like the jitted function (first argument a :class:`KVCache`); ``lower`` too, for
    memory analysis. Inside a caller's own jit the caller's compiler options apply instead.
    """

    def __init__(self, fun: Any, **kwargs: Any) -> None:
        self._fun, self._kwargs = fun, kwargs
        self._jitted: dict[str, Any] = {}
        functools.update_wrapper(self, fun)

    def jitted(self, platform: str) -> Any:
        if platform not in self._jitted:
            options = compiler_options(platform)
            self._jitted[platform] = jax.jit(self._fun, compiler_options=options, **self._kwargs)
        return self._jitted[platform]

    def __call__(self, cache: Any, *args: Any, **kwargs: Any) -> Any:
        # Compiler options only apply to a top-level jit (JAX rejects them on a nested one):
        # under a caller's trace the caller's compilation decides.
        platform = platform_of(cache) if trace_state_clean() else "traced"
        return self.jitted(platform)(cache, *args, **kwargs)

    def lower(self, cache: Any, *args: Any, **kwargs: Any) -> Any:
        return self.jitted(platform_of(cache)).lower(cache, *args, **kwargs)

    def _cache_size(self) -> int:
        """Compiled entries over every platform's jit (as ``jax.jit``'s own, for tests)."""
        return sum(f._cache_size() for f in self._jitted.values())


def resolve_backend(cache: Any, backend: str) -> str:
    """``backend``, with "auto" resolved: "pallas" on TPU, "xla" elsewhere."""
    if backend != "auto":
        return backend
    return "pallas" if platform_of(cache) == "tpu" else "xla"
