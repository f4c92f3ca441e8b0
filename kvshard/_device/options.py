"""Types shared by every device operation: backend names and the backends' knobs.

:class:`BackendOptions` groups what only a backend reads (as JAX's ``BlockSizes`` groups a
kernel's knobs), so :func:`kvshard.update` and :func:`kvshard.attention` take the same
``backend=`` and ``options=`` arguments and every other argument means the same in both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

from kvshard.kernels.budgets import SCHEDULES, Schedule

__all__ = ["BACKENDS", "PALLAS_KERNELS", "Backend", "BackendOptions", "PallasKernel", "Schedule"]

Backend = Literal["auto", "pallas", "xla"]
BACKENDS: tuple[str, ...] = ("auto", "pallas", "xla")
# The pallas attention backend's kernel: kvshard's own (kvshard.kernels.attention, every layout
# and layer type) or JAX's bundled ragged_paged_attention (interleaved caches, no sinks, no
# chunked local attention).
PallasKernel = Literal["kvshard", "jax"]
PALLAS_KERNELS: tuple[str, ...] = ("kvshard", "jax")


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """Knobs of the backends, accepted by :func:`kvshard.update` and :func:`kvshard.attention`.

    Frozen and hashable: it is a static (compile-time) argument. Each field names the backend
    that reads it; the others ignore it, so one object serves every call of a model.

    Attributes:
      interpret: pallas: run Pallas in interpret mode; None = interpret unless on TPU. False
        forces a TPU lowering (exporting for TPU from a CPU host).
      schedule: pallas update: the kernel's DMA schedule, "direct" (HBM->HBM, pipelined) or
        "vmem" (vLLM's VMEM bounce); see :func:`kvshard.kernels.kv_cache_update`.
      keys_per_step: xla attention: keys folded per loop step (rounded to whole pages, at least
        one), by the decode loop and per prefill query block; None picks (decode: by the
        step's size, at most 128; prefill: 512).
      kv_pages_per_block: pallas attention: pages per K/V block; kvshard's kernel: None =
        :func:`kvshard.kernels.budgets.default_attention_blocks`; JAX's kernel
        (``num_kv_pages_per_block``): None = its tuned table on TPU (a fixed default when
        lowering for TPU from another host).
      queries_per_block: pallas attention: query tokens per block, None as above. xla
        attention: query tokens per prefill block (None: 256).
      pallas_kernel: pallas attention: "kvshard" (default: kvshard's own kernel,
        :func:`kvshard.kernels.attention.ragged_paged_attention`, every layout and layer
        type, sinks) or "jax" (JAX's bundled ``ragged_paged_attention``: interleaved caches
        only, no sinks, no chunked local attention; runs on TPU only).
      attention_kernel: pallas attention: a kernel called with JAX's
        ``ragged_paged_attention`` signature instead of JAX's own (implies
        ``pallas_kernel="jax"``'s operands and limits). Lets a stack plug in another kernel of
        the same contract (or ``ref_ragged_paged_attention``, to test the operands).
    """

    interpret: bool | None = None
    schedule: Schedule = "direct"
    keys_per_step: int | None = None
    kv_pages_per_block: int | None = None
    queries_per_block: int | None = None
    attention_kernel: Callable[..., Any] | None = None
    pallas_kernel: PallasKernel = "kvshard"

    @property
    def jax_attention_kernel(self) -> bool:
        """True when the pallas attention backend calls a kernel of JAX's contract."""
        return self.pallas_kernel == "jax" or self.attention_kernel is not None

    def __post_init__(self) -> None:
        if self.interpret not in (None, True, False):
            raise TypeError(f"interpret={self.interpret!r} must be None, True or False")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} must be one of {SCHEDULES}")
        for name in ("keys_per_step", "kv_pages_per_block", "queries_per_block"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name}={value!r} must be None or an int >= 1")
        if self.pallas_kernel not in PALLAS_KERNELS:
            raise ValueError(
                f"pallas_kernel={self.pallas_kernel!r} must be one of {PALLAS_KERNELS}"
            )
        if self.attention_kernel is not None and not callable(self.attention_kernel):
            raise TypeError(f"attention_kernel={self.attention_kernel!r} is not callable")
