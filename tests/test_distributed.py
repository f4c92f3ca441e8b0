"""kvshard.distributed in one process: the divergence rule, and check_consistent's contract.

The multi-process behaviour (a diverged allocator caught on every process, global arrays from
host inputs) runs in test_multihost.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import kvshard
from kvshard.distributed import check_consistent, diverging_processes


def _digests(*rows):
    return np.array([[r] * 4 for r in rows], np.uint8)


@pytest.mark.parametrize(
    ("rows", "odd"),
    [
        ((7, 7, 7, 7), []),
        ((7, 7, 7, 9), [3]),
        ((9, 7, 7, 7), [0]),  # the majority wins over process 0
        ((7, 9, 9, 7), [1, 2]),  # a tie: process 0's state is the reference
        ((1, 2, 3), [1, 2]),
        ((5,), []),
    ],
)
def test_diverging_processes(rows, odd):
    assert diverging_processes(_digests(*rows)) == odd


def _allocator():
    return kvshard.PageAllocator(8, 4, max_requests=2, max_pages_per_request=2)


def test_check_consistent_in_one_process_returns_the_checksum():
    a, b = _allocator(), _allocator()
    b.allocate("r", 5)
    assert check_consistent(a) == a.checksum()
    assert check_consistent([a, b]) == f"{a.checksum()}\n{b.checksum()}"


@pytest.mark.parametrize("bad", [object(), [object()], "allocator"])
def test_check_consistent_rejects_non_allocators(bad):
    with pytest.raises(TypeError, match="allocator must be a PageAllocator"):
        check_consistent(bad)
