"""What differs between the JAX versions kvshard supports (0.10.2 to 0.12.x), in one place.

Every other module calls these names and never tests JAX's version itself:

- :func:`on_host`: run a function on the host of the device tracing it (host-memory compute,
  the host tier's gathers and scatters). JAX 0.10 spells it ``compute_on2(f, ...)`` beside
  the older context manager ``compute_on("device_host")``; from 0.11 ``compute_on`` itself is
  the function transform and the context manager is gone.
- :data:`CPU_REWRITES_BFLOAT16`: whether XLA's CPU compiler rewrites ops on a bfloat16 array
  in float32 inside a caller's jit (so a donated bfloat16 cache is copied whole:
  :mod:`kvshard._device.storage` stores its bits instead). True on JAX 0.10; from 0.11 a natively
  stored bfloat16 cache stays in place (float8 is rewritten on every version; docs/layout.md).
- :func:`is_deleted`: whether an array was donated or deleted. On JAX 0.11 an array that
  NumPy has read (``np.asarray`` keeps a view of some of its shards) is donated only partly:
  the shards without a view are gone, yet ``is_deleted()`` says False; passed again, it fails
  in the runtime instead of being refused by name.
- :func:`interpret_params`: Pallas TPU interpret mode's parameters. From 0.12 its race
  detector raises on a race by default (``on_race="raise"``); kvshard's tests read the
  detector's findings instead, so :func:`interpret_params` asks for the 0.11 behaviour
  (record, do not raise) where the option exists.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
from jax.experimental import compute_on as _compute_on_module

__all__ = ["CPU_REWRITES_BFLOAT16", "JAX_VERSION", "interpret_params", "is_deleted", "on_host"]

JAX_VERSION: tuple[int, ...] = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())

# Whether XLA:CPU rewrites a natively stored bfloat16 cache through float32 temporaries (JAX
# 0.10; docs/performance.md has the sizes, from kvshard.benchmarks.callers_jit.temporaries).
CPU_REWRITES_BFLOAT16: bool = JAX_VERSION < (0, 11)

# The function-transform form of compute_on: ``compute_on2`` where both forms exist (0.10),
# ``compute_on`` once it is the only one (0.11+).
_compute_on_transform: Callable[..., Any] = getattr(
    _compute_on_module, "compute_on2", _compute_on_module.compute_on
)


def on_host(f: Callable[..., Any]) -> Callable[..., Any]:
    """``f`` run on the host of the device that traces it, its outputs left in host memory.

    Operands must already be in host memory (``jax.device_put(x, jax.memory.Space.Host)``).
    """
    return _compute_on_transform(
        jax.jit(f), compute_type="device_host", out_memory_spaces=jax.memory.Space.Host
    )


_PARTIAL_DONATION = (0, 11) <= JAX_VERSION < (0, 12)


def is_deleted(x: jax.Array) -> bool:
    """Whether the concrete array ``x`` (or any shard of it) was donated or deleted."""
    if x.is_deleted():
        return True
    return _PARTIAL_DONATION and any(s.data.is_deleted() for s in x.addressable_shards)


def interpret_params(**kwargs: Any) -> Any:
    """``pltpu.InterpretParams(**kwargs)``, with races recorded (and warned of) rather than
    raised on JAX versions whose detector raises by default (0.12+; ``on_race`` given wins)."""
    from jax.experimental.pallas import tpu as pltpu

    if "on_race" in inspect.signature(pltpu.InterpretParams).parameters:
        kwargs.setdefault("on_race", "warn")
    return pltpu.InterpretParams(**kwargs)
