"""Host-side page allocator for the paged KV cache: numpy state, transactional, prefix caching.

A :class:`PageAllocator` decides which cache pages each request owns. It runs on the host at
every scheduler step, for thousands of requests, so

* all state lives in a handful of numpy arrays (a free stack of page ids, reference counts, the
  page table) plus one ``dict`` from request id to page-table row: no Python object per page,
  so a large pool adds nothing for the garbage collector to walk (under tensor parallelism a GC
  pause on one host stalls every host);
* every public method checks everything first and mutates only once nothing can fail
  (check-then-commit): a call that raises leaves :meth:`PageAllocator.checksum` unchanged;
* :meth:`PageAllocator.allocate_batch` grows a whole step's requests with vectorized numpy.

Pages are logical: one page id names the same rows on every device of a head-sharded mesh, so
one page table serves all tensor-parallel shards; a data-parallel deployment keeps one
allocator per pool.

A :class:`PageAllocator` (``_allocator``, one class) owns its parts, as vLLM's
``KVCacheManager`` owns its ``BlockPool`` and ``KVCacheCoordinator``: it validates each call's
arguments, documents the contract and delegates. The parts are classes with a small interface
and their own invariant checks:

* ``_pool.PagePool``: reference counts, the free stack, the null page and the copy-on-write
  queue; every page table draws from it;
* ``_table.PageTable``: one KV-cache group's page table (vLLM's ``SingleTypeKVCacheManager``):
  each request's pages and the rules of its attention type (sliding-window and chunk release,
  copy-on-write planning);
* ``_rows.RequestRows``: request id -> row, the free-row stack, tokens held and prefix-cache
  progress (what is per request, not per group);
* ``_prefix_index.PrefixIndex``: chained page keys, the key -> page index and the LRU order of
  cached pages nobody owns;
* ``_host.HostTier``: the host tier's pages (swapped-out requests' pages, the second-level
  prefix cache with its own LRU and capacity) and the pending (device, host) swap pairs;
* ``_events.EventQueue``: the KV-cache events;
* ``_state.AllocatorParts``: the parts together: ``state_dict``, validated ``load``,
  ``checksum`` and ``check_invariants`` (each part's, then those between parts).

Transactions that span parts are functions of them: ``_grow.grow`` (``allocate``,
``allocate_batch``), ``_prefix`` (``lookup``, ``peek``, ``commit``; host hits) and ``_swap``
(``swap_out``, ``swap_in``). With ``layer_types`` the layers form KV-cache groups (full
attention, sliding window, chunked local; ``kvshard._geometry.layer_types.cache_groups``): one
``PageTable`` per group over the same pool and rows, their page needs summed before any
commit, and prefix hits that every group serves. ``_config`` validates the constructor
arguments, ``_vllm_options`` checks vLLM's ``eagle_layers`` and ``disable_hybrid`` switches,
and ``_window`` holds the pure capacity arithmetic of sliding windows.
"""

from kvshard._geometry.state_layers import unified_group_page_sizes as unified_group_page_sizes
from kvshard.allocator._allocator import PageAllocator as PageAllocator
from kvshard.allocator._common import NULL_PAGE as NULL_PAGE
from kvshard.allocator._common import OutOfPages as OutOfPages
from kvshard.allocator._common import UnknownRequest as UnknownRequest
from kvshard.allocator._events import AllPagesCleared as AllPagesCleared
from kvshard.allocator._events import PagesRemoved as PagesRemoved
from kvshard.allocator._events import PagesStored as PagesStored
from kvshard.allocator._window import sliding_window_pages as sliding_window_pages

__all__ = [
    "NULL_PAGE",
    "AllPagesCleared",
    "OutOfPages",
    "PageAllocator",
    "PagesRemoved",
    "PagesStored",
    "UnknownRequest",
    "sliding_window_pages",
    "unified_group_page_sizes",
]
