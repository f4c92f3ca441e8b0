"""kvshard: a paged KV cache for LLM inference, sharded by KV head over a JAX device mesh.

The public API, re-exported from private modules:

* cache layout and device ops: :class:`CacheSpec`, :class:`KVCache`, :func:`init_cache`,
  :func:`update`, :func:`attention`, :func:`gather`, :func:`copy_pages`,
  :func:`check_tensor_parallel`;
* host-side bookkeeping: :class:`PageAllocator`, :class:`OutOfPages`, :class:`UnknownRequest`,
  :data:`NULL_PAGE`;
* step metadata: :class:`StepMetadata`, :func:`build_step`, :func:`stack_steps`,
  :func:`build_update_slices`, :func:`padded_num_slices`, :func:`pad_slices`,
  :func:`token_buckets`, :func:`padded_token_count`;
* submodules :mod:`kvshard.kernels` (Pallas kernels), :mod:`kvshard.reference` (numpy oracle)
  and :mod:`kvshard.testing` (hypothesis strategies; needs the ``test`` extra, not imported here).
"""

from importlib.metadata import PackageNotFoundError, version

from kvshard import kernels as kernels
from kvshard import reference as reference
from kvshard._attention import attention as attention
from kvshard._layout import CacheSpec as CacheSpec
from kvshard._layout import check_tensor_parallel as check_tensor_parallel
from kvshard.allocator import NULL_PAGE as NULL_PAGE
from kvshard.allocator import OutOfPages as OutOfPages
from kvshard.allocator import PageAllocator as PageAllocator
from kvshard.allocator import UnknownRequest as UnknownRequest
from kvshard.cache import KVCache as KVCache
from kvshard.cache import copy_pages as copy_pages
from kvshard.cache import gather as gather
from kvshard.cache import init_cache as init_cache
from kvshard.cache import update as update
from kvshard.metadata import build_update_slices as build_update_slices
from kvshard.metadata import pad_slices as pad_slices
from kvshard.metadata import padded_num_slices as padded_num_slices
from kvshard.metadata import padded_token_count as padded_token_count
from kvshard.metadata import token_buckets as token_buckets
from kvshard.step import StepMetadata as StepMetadata
from kvshard.step import build_step as build_step
from kvshard.step import stack_steps as stack_steps

try:
    __version__ = version("kvshard")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "NULL_PAGE",
    "CacheSpec",
    "KVCache",
    "OutOfPages",
    "PageAllocator",
    "StepMetadata",
    "UnknownRequest",
    "__version__",
    "attention",
    "build_step",
    "build_update_slices",
    "check_tensor_parallel",
    "copy_pages",
    "gather",
    "init_cache",
    "kernels",
    "pad_slices",
    "padded_num_slices",
    "padded_token_count",
    "reference",
    "stack_steps",
    "token_buckets",
    "update",
]
