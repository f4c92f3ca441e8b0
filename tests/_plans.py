"""The planner call both planner test files make: a small layout, overridable per test."""

from __future__ import annotations

from kvshard._geometry.plan import make_plan


def plan(**overrides):
    # 2 layers, 2 of 4 heads per device (4 rows), head_dim 128, float32, 16-token pages:
    # one layer's page is 16 x 4 x 128 x 4 B = 32,768 bytes.
    args = {
        "num_layers": 2,
        "num_kv_heads": 4,
        "head_dim": 128,
        "dtype": "float32",
        "page_size": 16,
        "dp": 1,
        "tp": 2,
        "hbm_per_device": 1_000_000,
        "context": 100,
    }
    return make_plan(**{**args, **overrides})
