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

The package is layered, one concern a file, each using only the ones before it:
``_base`` (constants, exceptions, state, queries), ``_lru`` (prefix keys, eviction order),
``_pool`` (free stack, reference counts, rows), ``_grow`` (``allocate``, copy-on-write,
sliding-window release), ``_prefix`` (``lookup_prefix``, ``commit_prefix``), ``_state``
(``state_dict``, validated ``load_state_dict``, ``checksum``, ``check_invariants``) and
``_allocator`` (:class:`PageAllocator`: ``free``, ``fork``, ``truncate``); ``_window`` holds
the pure capacity arithmetic of sliding windows.
"""

from kvshard.allocator._allocator import PageAllocator as PageAllocator
from kvshard.allocator._base import NULL_PAGE as NULL_PAGE
from kvshard.allocator._base import OutOfPages as OutOfPages
from kvshard.allocator._base import UnknownRequest as UnknownRequest
from kvshard.allocator._window import sliding_window_pages as sliding_window_pages

__all__ = ["NULL_PAGE", "OutOfPages", "PageAllocator", "UnknownRequest", "sliding_window_pages"]
