"""Multi-process meshes (TPU pod slices, several hosts): host inputs and allocator agreement.

On a pod slice every host runs one JAX process (``jax.distributed.initialize``) that drives its
own chips, and the mesh spans every host's devices. kvshard's functions take the same
arguments there as on one host, and every process calls them in the same order with the same
shapes (SPMD). Two things differ from one process:

* Host inputs (numpy metadata, k/v, layer ids) must become global ``jax.Array``s.
  :func:`kvshard.update`, :func:`kvshard.gather` and :func:`kvshard.copy_pages` do it with
  :func:`global_array`: a replicated input is built from each process's own copy, with no
  communication, so **every process must pass the same value** (the caller's contract; JAX's
  ``jax.device_put`` would check it with a collective on every argument of every call). An
  input that differs per host (each host's own page-axis groups of k/v) is built by the caller
  with ``jax.make_array_from_process_local_data`` and passed as a global array, which is used
  as it is; its values are not validated on the host (other hosts hold some of its shards),
  as for a traced argument.
* The page allocator runs on the host, so every host must hold the same allocator state:
  kvshard's choice is that every host runs its own :class:`kvshard.PageAllocator` on the same
  requests in the same order (an SPMD scheduler), rather than process 0 allocating and
  broadcasting the metadata. :func:`check_consistent` verifies the agreement.

docs/guides/multihost.md says what each host passes and what the hosts must agree on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding

from kvshard._errors import KvshardError

__all__ = ["AllocatorDivergence", "check_consistent", "diverging_processes", "global_array"]


class _HasChecksum(Protocol):
    def checksum(self) -> str: ...


class AllocatorDivergence(KvshardError, RuntimeError):
    """The processes' allocators hold different states; ``processes`` lists the odd ones."""

    def __init__(self, message: str, processes: list[int]) -> None:
        super().__init__(message)
        self.processes = processes


def global_array(x: Any, sharding: Sharding) -> jax.Array:
    """A host value that every process holds identically, as a global array with ``sharding``.

    Each process fills its own devices' shards from its own copy of ``x``
    (``jax.make_array_from_callback``): no communication, and no check that the copies agree;
    a process with a different value silently gets different shards. A ``jax.Array`` that
    already spans processes (e.g. from ``jax.make_array_from_process_local_data``) is returned
    unchanged: jit moves it to the sharding it needs.

    Args:
      x: numpy array, scalar, or fully addressable ``jax.Array`` (copied to the host first):
        dtype[shape], the same on every process.
      sharding: the target sharding over a mesh that may span processes.

    Returns:
      dtype[shape] globally, sharded by ``sharding``; each process holds only the shards of its
      own devices.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _digest(allocators: Any) -> np.ndarray:
    """uint8[32]: a fixed-size digest of one allocator's or a sequence's ``checksum()``s.

    Hashing the checksums gives every process an array of the same shape to all-gather,
    whatever the checksum's format.
    """
    group = allocators if isinstance(allocators, Sequence) else [allocators]
    text = "\n".join(str(a.checksum()) for a in group)
    return np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)


def diverging_processes(digests: np.ndarray) -> list[int]:
    """The processes whose digest differs from the most common one.

    Among equally common digests, the one of the lowest-numbered process holding one of them
    is the reference (process 0's, when it is among them).

    Args:
      digests: uint8[num_processes, n], row p the digest of process p.

    Returns:
      Sorted process indices; empty when all rows agree.
    """
    rows = [bytes(r) for r in np.asarray(digests, np.uint8)]
    counts = {r: rows.count(r) for r in rows}
    # The majority state is taken as the right one; the lowest process breaks ties (process 0
    # is usually the one whose scheduler logs are read first).
    best = max(counts.values())
    reference = next(r for r in rows if counts[r] == best)
    return [p for p, r in enumerate(rows) if r != reference]


def check_consistent(allocator: _HasChecksum | Sequence[_HasChecksum]) -> str:
    """Raises unless every process's allocator is in the same state; a collective.

    Every process must call it at the same point of its serving loop (it all-gathers one
    32-byte digest of ``allocator.checksum()`` with
    ``jax.experimental.multihost_utils.process_allgather``). Cheap enough to run every few
    hundred steps, or every step while debugging.

    Args:
      allocator: a :class:`kvshard.PageAllocator` (anything with ``checksum()``), or a
        sequence of them (e.g. one per page-axis group), compared as a whole.

    Returns:
      This process's ``checksum()`` (joined with newlines for a sequence).

    Raises:
      AllocatorDivergence: naming the processes whose state differs from the majority's, with
        their digests; raised on every process.
      TypeError: ``allocator`` has no ``checksum()`` (raised before any communication).
    """
    group = allocator if isinstance(allocator, Sequence) else [allocator]
    for a in group:
        if not callable(getattr(a, "checksum", None)):
            raise TypeError(
                f"allocator must be a PageAllocator (with checksum()) or a sequence of them, "
                f"got {type(a).__name__}"
            )
    mine = "\n".join(str(a.checksum()) for a in group)
    digests = np.asarray(multihost_utils.process_allgather(_digest(group)), np.uint8)
    digests = digests.reshape(jax.process_count(), -1)
    odd = diverging_processes(digests)
    if odd:
        short = {p: bytes(digests[p][:4]).hex() for p in range(len(digests))}
        raise AllocatorDivergence(
            f"allocator state diverges on processes {odd} of {len(digests)} "
            f"(digest prefix by process: {short}); every process must run the allocator on "
            f"the same requests in the same order",
            odd,
        )
    return mine
