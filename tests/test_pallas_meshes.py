"""The Pallas backend executed (interpret mode) on every 8-device mesh shape, against XLA.

Runs in the test process: conftest.py sets ``NPROC=16``, so XLA's CPU client has a thread for
each of the 8 simulated devices and interpret mode's per-kernel barrier across devices is
always reached (with the core-count default of 2 threads on the 2-core CI machines it
deadlocked; see docs/guides/fuzzing.md). One tiny update per case, one executable per backend
and mesh, checked against the dense numpy oracle of _cache_helpers.py.

The kernel unrolls its block of slices three times (start, wait, drain), and interpret mode
turns every unrolled DMA into host callbacks: with the default block of 64 slices one
executable took ~18 CPU-seconds to compile here, with 2 slices ~1. The fixture below shrinks
the block to 2, which also makes the 3 slices of a step span two grid steps, so the
cross-block wait runs too.
"""

from __future__ import annotations

import numpy as np
import pytest
from _cache_helpers import MESH_SHAPES, Oracle, assert_matches, fixed_slices, make_mesh, random_kv

from kvshard.cache import CacheSpec, init_cache, update

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("small_kernel_blocks")]

# 2 KV heads: split over a 2-way head axis, replicated 2x/4x on 4/8-way ones. 32 slots a pool.
SPEC = CacheSpec(
    num_layers=2, num_kv_heads=2, head_dim=64, page_size=4, num_pages=8, dtype="float32"
)


@pytest.mark.parametrize("page_axis", [None, "data"])
@pytest.mark.parametrize("shape", MESH_SHAPES, ids=[f"{a}x{b}" for a, b in MESH_SHAPES])
def test_pallas_equals_xla_equals_oracle(shape, page_axis):
    mesh = make_mesh(shape)
    groups = shape[0] if page_axis else None
    slices, num = fixed_slices(groups)
    k, v = random_kv(np.random.default_rng(sum(shape)), SPEC, 7, groups)
    oracle = Oracle(SPEC, groups or 1)
    oracle.update(1, k, v, slices, num, pooled=page_axis is not None)
    out = {}
    for backend in ("pallas", "xla"):
        cache = init_cache(SPEC, mesh, page_axis=page_axis)
        out[backend] = update(cache, 1, k, v, slices, num, backend=backend)
    assert_matches(out["pallas"], oracle)
    np.testing.assert_array_equal(np.asarray(out["pallas"].kv), np.asarray(out["xla"].kv))
