"""kvshard: a paged KV cache for LLM inference, sharded by KV head over a JAX device mesh.

The public API, re-exported from private modules:

* cache layout and device ops: :class:`CacheSpec`, :class:`KVCache`, :func:`init_cache`,
  :func:`update`, :func:`update_with_stats`, :func:`attention`, :func:`fused_attention`,
  :func:`gather`, :func:`copy_pages`, :func:`check_tensor_parallel`, :func:`abstract_cache`
  (ahead-of-time compilation);
* the host tier: :class:`HostCache`, :func:`init_host_cache`, :func:`swap_out`,
  :func:`swap_in`;
* quantized caches: :func:`calibrate_scales` (scales from sample activations),
  :class:`SaturationCounts`, submodule :mod:`kvshard.quant` (quantize/dequantize);
* model configs: :func:`read_model_config`, :class:`ModelGeometry`, :class:`ConfigError`
  (and :meth:`CacheSpec.from_config`);
* host-side bookkeeping: :class:`PageAllocator`, :class:`OutOfPages`, :class:`UnknownRequest`,
  :data:`NULL_PAGE`;
* step metadata: :class:`StepMetadata`, :func:`build_step`, :func:`stack_steps`,
  :func:`build_update_slices`, :func:`padded_num_slices`, :func:`pad_slices`,
  :func:`token_buckets`, :func:`padded_token_count`;
* continuous batching: :class:`Scheduler`, :class:`SchedulerConfig`,
  :class:`GenerationRequest`, :class:`SchedulerOutput`, :class:`FinishedRequest`;
* submodules :mod:`kvshard.distributed` (multi-process meshes: host arrays, allocator
  agreement), :mod:`kvshard.kernels` (Pallas kernels), :mod:`kvshard.reference` (numpy oracle)
  and :mod:`kvshard.testing` (hypothesis strategies; needs the ``test`` extra, not imported here).

Names are imported on first use (module ``__getattr__``), so ``import kvshard`` and the
``kvshard plan`` command never import JAX; ``kvshard.update`` imports it when first touched.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # static typing and IDEs see ordinary imports
    from kvshard import distributed as distributed
    from kvshard import kernels as kernels
    from kvshard import quant as quant
    from kvshard import reference as reference
    from kvshard._attention import fused_attention as fused_attention
    from kvshard._device.options import Backend as Backend
    from kvshard._device.options import BackendOptions as BackendOptions
    from kvshard._device.options import Schedule as Schedule
    from kvshard._eager import attention as attention
    from kvshard._errors import KvshardError as KvshardError
    from kvshard._geometry.hf_config import ConfigError as ConfigError
    from kvshard._geometry.hf_config import ModelGeometry as ModelGeometry
    from kvshard._geometry.hf_config import read_model_config as read_model_config
    from kvshard._geometry.layout import CacheSpec as CacheSpec
    from kvshard._geometry.layout import check_tensor_parallel as check_tensor_parallel
    from kvshard.allocator import NULL_PAGE as NULL_PAGE
    from kvshard.allocator import OutOfPages as OutOfPages
    from kvshard.allocator import PageAllocator as PageAllocator
    from kvshard.allocator import UnknownRequest as UnknownRequest
    from kvshard.cache import HostCache as HostCache
    from kvshard.cache import KVCache as KVCache
    from kvshard.cache import SaturationCounts as SaturationCounts
    from kvshard.cache import abstract_cache as abstract_cache
    from kvshard.cache import copy_pages as copy_pages
    from kvshard.cache import gather as gather
    from kvshard.cache import init_cache as init_cache
    from kvshard.cache import init_host_cache as init_host_cache
    from kvshard.cache import swap_in as swap_in
    from kvshard.cache import swap_out as swap_out
    from kvshard.cache import update as update
    from kvshard.cache import update_with_stats as update_with_stats
    from kvshard.metadata import build_update_slices as build_update_slices
    from kvshard.metadata import pad_slices as pad_slices
    from kvshard.metadata import padded_num_slices as padded_num_slices
    from kvshard.metadata import padded_token_count as padded_token_count
    from kvshard.metadata import token_buckets as token_buckets
    from kvshard.quant import calibrate_scales as calibrate_scales
    from kvshard.scheduler import FinishedRequest as FinishedRequest
    from kvshard.scheduler import GenerationRequest as GenerationRequest
    from kvshard.scheduler import Scheduler as Scheduler
    from kvshard.scheduler import SchedulerConfig as SchedulerConfig
    from kvshard.scheduler import SchedulerOutput as SchedulerOutput
    from kvshard.step import StepGeometry as StepGeometry
    from kvshard.step import StepMetadata as StepMetadata
    from kvshard.step import build_step as build_step
    from kvshard.step import stack_steps as stack_steps

# Public name -> the module that defines it. A name that is itself a submodule maps to None.
_EXPORTS: dict[str, str | None] = {
    "distributed": None,
    "kernels": None,
    "quant": None,
    "reference": None,
    "attention": "kvshard._eager",
    "fused_attention": "kvshard._attention",
    "ConfigError": "kvshard._geometry.hf_config",
    "KvshardError": "kvshard._errors",
    "ModelGeometry": "kvshard._geometry.hf_config",
    "read_model_config": "kvshard._geometry.hf_config",
    "CacheSpec": "kvshard._geometry.layout",
    "check_tensor_parallel": "kvshard._geometry.layout",
    "NULL_PAGE": "kvshard.allocator",
    "OutOfPages": "kvshard.allocator",
    "PageAllocator": "kvshard.allocator",
    "UnknownRequest": "kvshard.allocator",
    "HostCache": "kvshard.cache",
    "KVCache": "kvshard.cache",
    "SaturationCounts": "kvshard.cache",
    "abstract_cache": "kvshard.cache",
    "copy_pages": "kvshard.cache",
    "gather": "kvshard.cache",
    "init_cache": "kvshard.cache",
    "init_host_cache": "kvshard.cache",
    "swap_in": "kvshard.cache",
    "swap_out": "kvshard.cache",
    "update": "kvshard.cache",
    "update_with_stats": "kvshard.cache",
    "calibrate_scales": "kvshard.quant",
    "build_update_slices": "kvshard.metadata",
    "pad_slices": "kvshard.metadata",
    "padded_num_slices": "kvshard.metadata",
    "padded_token_count": "kvshard.metadata",
    "token_buckets": "kvshard.metadata",
    "FinishedRequest": "kvshard.scheduler",
    "GenerationRequest": "kvshard.scheduler",
    "Scheduler": "kvshard.scheduler",
    "SchedulerConfig": "kvshard.scheduler",
    "SchedulerOutput": "kvshard.scheduler",
    "Backend": "kvshard._device.options",
    "BackendOptions": "kvshard._device.options",
    "Schedule": "kvshard._device.options",
    "StepGeometry": "kvshard.step",
    "StepMetadata": "kvshard.step",
    "build_step": "kvshard.step",
    "stack_steps": "kvshard.step",
}

try:
    __version__ = version("kvshard")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    """Imports a public name on first access and caches it in the module's namespace."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvshard' has no attribute {name!r}")
    module_name = _EXPORTS[name]
    if module_name is None:
        value: Any = importlib.import_module(f"kvshard.{name}")
    else:
        value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    # The public API only: not this module's own imports (importlib, typing, annotations).
    return sorted(__all__)
