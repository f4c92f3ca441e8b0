"""The sharded, combined-head KV cache and its device operations.

One module per operation, each readable on its own:

* :mod:`kvshard.cache._pytree`: :class:`KVCache`, :func:`init_cache`, :func:`abstract_cache`;
* :mod:`kvshard.cache._codec`: how values are stored (dtype, combined heads, local heads);
* :mod:`kvshard.cache._update`: the update (:func:`update`, :func:`update_with_stats`, whose
  entries, with their eager memo, are in :mod:`kvshard._eager`);
* :mod:`kvshard.cache._gather`: :func:`gather`;
* :mod:`kvshard.cache._copy`: :func:`copy_pages`;
* :mod:`kvshard.cache._host_cache`: :class:`HostCache`, :func:`init_host_cache` (the host tier);
* :mod:`kvshard.cache._swap`: :func:`swap_out`, :func:`swap_in`.

Every operation checks its arguments on the host before anything is donated
(:mod:`kvshard._device.arg_checks`), places them on the mesh (:mod:`kvshard._device.sharding`) and
drops out-of-contract traced rows by the one drop rule (:mod:`kvshard._device.drop`). Attention, the
read of the serving loop, lives in :mod:`kvshard._attention`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvshard._device.options import Backend as Backend
from kvshard._geometry.layout import CacheSpec as CacheSpec
from kvshard._geometry.layout import check_tensor_parallel as check_tensor_parallel
from kvshard.cache._copy import copy_pages as copy_pages
from kvshard.cache._gather import gather as gather
from kvshard.cache._host_cache import HostCache as HostCache
from kvshard.cache._host_cache import init_host_cache as init_host_cache
from kvshard.cache._pytree import KVCache as KVCache
from kvshard.cache._pytree import abstract_cache as abstract_cache
from kvshard.cache._pytree import check_cache as check_cache
from kvshard.cache._pytree import init_cache as init_cache
from kvshard.cache._swap import swap_in as swap_in
from kvshard.cache._swap import swap_out as swap_out
from kvshard.cache._update_local import SaturationCounts as SaturationCounts

if TYPE_CHECKING:  # static typing and IDEs see ordinary imports
    from kvshard._eager import update as update
    from kvshard._eager import update_with_stats as update_with_stats

# The entries sit above the operations (kvshard._eager also imports kvshard._attention, which
# imports this package): imported on first use, as kvshard's own names are.
_EXPORTS: dict[str, str | None] = {
    "update": "kvshard._eager",
    "update_with_stats": "kvshard._eager",
}

__all__ = [
    "Backend",
    "CacheSpec",
    "HostCache",
    "KVCache",
    "SaturationCounts",
    "abstract_cache",
    "check_cache",
    "check_tensor_parallel",
    "copy_pages",
    "gather",
    "init_cache",
    "init_host_cache",
    "swap_in",
    "swap_out",
    "update",
    "update_with_stats",
]


def __getattr__(name: str) -> Any:
    """Imports an entry on first access and caches it in the module's namespace."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvshard.cache' has no attribute {name!r}")
    value = getattr(importlib.import_module(str(_EXPORTS[name])), name)
    globals()[name] = value
    return value
