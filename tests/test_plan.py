"""kvshard/_geometry/plan.py: the planner's arithmetic (pages, tokens, sequences, where the bytes
go), and the query-head rule it shares with kvshard.attention.

Every expected number is worked out by hand in the test from the layout rules: a device's
combined K/V rows (2 per head it holds) are padded to the dtype's packing (32-bit words: 1 row
for float32, 2 for bfloat16, 4 for int8), head_dim to 128 lanes; a page id spans every layer;
page 0 is the null page.
"""

from __future__ import annotations

import pytest
from _plans import plan

from kvshard._geometry.layout import check_query_heads, padded_query_heads
from kvshard._geometry.plan import (
    BudgetTooSmall,
    ContextTooLong,
    HostMemoryTooSmall,
    format_plan,
    window_pages,
)


def test_float32_plan_by_hand():
    p = plan()
    # 2 of 4 heads per device -> 4 combined rows, packing 1, head_dim 128 as is:
    # one layer's page = 16 slots x 4 rows x 128 x 4 B = 32,768; two layers 65,536.
    assert p["replication"] == 1 and p["heads_per_device"] == 2
    assert p["combined_heads_per_device"] == 4 and p["packed_rows_per_device"] == 4
    assert p["page_bytes_per_layer"] == 32_768 and p["page_bytes"] == 65_536
    # 1,000,000 // 65,536 = 15 pages (983,040 bytes), 14 usable, 14 x 16 = 224 tokens.
    assert p["pages_per_device"] == 15 and p["usable_pages_per_device"] == 14
    assert p["cache_bytes_per_device"] == 983_040
    assert p["tokens_per_group"] == p["tokens_total"] == 224
    assert p["local_shape"] == [2, 15 * 16, 4, 128]
    assert p["global_shape"] == [2, 15 * 16, 8, 128]
    # 100 tokens -> ceil(100 / 16) = 7 pages each; 14 // 7 = 2 sequences.
    assert p["pages_per_sequence"] == 7 and p["sequences_per_group"] == 2
    assert p["bytes_per_token"] == 65_536 // 16 == 4_096
    # Nothing padded or copied: the usable pages are all distinct K/V.
    assert p["kv_bytes"] == 14 * 65_536 == 917_504
    assert p["waste_bytes"] == {
        "head_dim_padding": 0,
        "dtype_packing": 0,
        "head_replication": 0,
        "null_page": 65_536,
        "budget_remainder": 1_000_000 - 983_040,
    }
    # bfloat16: 4 rows (packing 2) x 128 x 2 B x 16 = 16,384 per layer, 32,768 per page id:
    # 30 pages, 29 usable, 464 tokens.
    assert p["bfloat16_bytes_per_token"] == 32_768 // 16
    assert p["bfloat16_tokens_per_group"] == 464
    assert p["capacity_vs_bfloat16"] == pytest.approx(224 / 464)


def test_data_parallel_groups_multiply_totals_not_pages():
    p = plan(dp=3)
    assert p["pages_per_device"] == 15  # each group's devices hold the whole pool
    assert p["tokens_total"] == 3 * 224 and p["sequences_total"] == 3 * 2
    assert p["global_shape"] == [2, 3 * 15 * 16, 8, 128]


def test_replicated_heads_and_padding_by_hand():
    # 2 KV heads on a 4-way axis: each head on 2 devices, 1 head (2 rows) per device.
    # head_dim 96 pads to 128; int8 packs 4 rows per word, so 2 rows are stored as 4.
    p = plan(num_kv_heads=2, tp=4, head_dim=96, dtype="int8", hbm_per_device=2**20)
    assert p["replication"] == 2 and p["heads_per_device"] == 1
    assert p["combined_heads_per_device"] == 2 and p["packed_rows_per_device"] == 4
    assert p["padded_head_dim"] == 128
    # one layer: 16 x 4 x 128 x 1 B = 8,192; two layers 16,384 -> 64 pages, 63 usable.
    assert p["page_bytes"] == 16_384 and p["pages_per_device"] == 64
    rows = 2 * 63 * 16  # slot rows of the usable pages, both layers
    unpacked, unpadded = rows * 2 * 128, rows * 2 * 96
    assert p["waste_bytes"]["dtype_packing"] == 63 * 16_384 - unpacked
    assert p["waste_bytes"]["head_dim_padding"] == unpacked - unpadded
    assert p["waste_bytes"]["head_replication"] == unpadded - unpadded // 2
    assert p["kv_bytes"] == unpadded // 2


@pytest.mark.parametrize(
    ("tp", "gain"),
    [
        # 1 KV head per device: int8's 2 rows pad to 4, bfloat16's 2 rows fit its packing of 2:
        # both 16 x 4 x 128 = 8,192 bytes per layer page -> the same 100 pages: x1.00.
        (8, 1.0),
        # 2 heads per device: int8 4 rows x 1 B = 8,192 bytes per layer page, bfloat16 16,384:
        # int8 100 pages (99 usable), bfloat16 50 (49 usable).
        (4, 99 / 49),
    ],
)
def test_int8_gain_over_bfloat16_depends_on_heads_per_device(tp, gain):
    p = plan(num_layers=1, num_kv_heads=8, tp=tp, dtype="int8", hbm_per_device=100 * 8_192)
    assert p["capacity_vs_bfloat16"] == pytest.approx(gain)
    assert f"x{gain:.2f} the tokens of bfloat16" in format_plan(p)


def test_budget_below_two_pages_is_refused():
    with pytest.raises(BudgetTooSmall, match=r"holds 1 page\(s\) of 65,536 bytes"):
        plan(hbm_per_device=2 * 65_536 - 1)
    two_pages = plan(hbm_per_device=2 * 65_536, context=16)
    assert two_pages["usable_pages_per_device"] == 1


def test_context_longer_than_the_pool_is_refused():
    # 14 usable pages hold 224 tokens; 225 need 15 pages.
    assert plan(context=224)["sequences_per_group"] == 1
    with pytest.raises(ContextTooLong, match="225 tokens need 15 pages per sequence"):
        plan(context=225)


def test_sliding_window_bounds_pages_per_sequence():
    # W = 32, P = 16: a request holds the pages of positions n - 31 .. n, at most
    # ceil(31 / 16) + 1 = 3 pages, against 7 without release: 14 // 3 = 4 sequences.
    p = plan(sliding_window=32)
    assert p["sliding_window"]["pages_per_sequence"] == 3
    assert p["sliding_window"]["sequences_per_group"] == 4
    assert p["sliding_window"]["capacity_gain"] == pytest.approx(4 / 2)


@pytest.mark.parametrize(
    ("window", "page_size", "context", "pages"),
    [
        (4, 2, 100, 3),  # n = 4: pages of positions 1..4 = pages 0, 1, 2
        (4, 2, 2, 1),  # positions 0, 1: one page
        (1, 16, 1000, 1),  # a window of 1 reads only the current page
        (100, 16, 50, 4),  # the window never binds: ceil(50 / 16)
    ],
)
def test_window_pages_by_hand(window, page_size, context, pages):
    assert window_pages(window, page_size, context) == pages


# ------------------------------------------------------------------ query heads


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "tp", "padded"),
    [
        (28, 4, 4, 28),  # tp divides the KV heads: any whole groups split
        (28, 4, 8, 32),  # 2 copies of each KV head: a group of 7 splits in halves once 8
        (32, 8, 64, 64),  # 8 copies of each: groups of 4 grow to 8
        (14, 2, 4, 16),  # 2 copies: groups of 7 grow to 8
        (24, 4, 8, 24),  # groups of 6 already split in halves
    ],
)
def test_padded_query_heads_by_hand(q_heads, kv_heads, tp, padded):
    assert padded_query_heads(q_heads, kv_heads, tp) == padded
    assert padded % tp == 0 and padded % kv_heads == 0


def test_query_heads_that_do_not_split_are_refused_with_the_padding():
    with pytest.raises(ValueError) as err:
        check_query_heads(28, 4, 8)
    message = str(err.value)
    assert "num_q_heads=28 (7 per KV head)" in message
    assert "head axis of size 8" in message
    assert "from 7 to 8 query heads (32 in all" in message
    assert "head axis size of 1, 2, 4, 28" in message  # 28 = 4 KV heads x 7, one group each
    with pytest.raises(ValueError, match="num_q_heads=30 is not a multiple of num_kv_heads=4"):
        check_query_heads(30, 4, 1)
    with pytest.raises(ValueError, match="tp=0 must be a positive int"):
        check_query_heads(28, 4, 0)
    check_query_heads(28, 4, 4)  # accepted: returns None, raises nothing


def test_make_plan_checks_query_heads_when_given():
    with pytest.raises(ValueError, match="from 7 to 8 query heads"):
        plan(num_kv_heads=4, tp=8, num_q_heads=28)
    p = plan(num_kv_heads=4, tp=4, num_q_heads=28)
    assert p["num_q_heads"] == 28 and p["q_heads_per_device"] == 7
    assert "query heads per device" in format_plan(p)
    assert plan()["num_q_heads"] is None  # unknown: nothing checked, nothing shown
    assert "query heads per device" not in format_plan(plan())


def test_the_planner_refuses_what_attention_refuses():
    """The planner's rule is attention's: 28 query heads over 4 KV heads fail on a 1x8 mesh in
    both, and the padding the planner suggests (32) runs."""
    import jax
    import numpy as np

    import kvshard

    mesh = jax.make_mesh((1, 8), ("data", "model"))
    spec = kvshard.CacheSpec(1, 4, 128, 16, 4, dtype="float32")
    cache = kvshard.init_cache(spec, mesh)
    alloc = kvshard.PageAllocator(4, 16, max_requests=1, max_pages_per_request=2)
    alloc.allocate_batch(["r"], [3])
    step = kvshard.build_step(alloc, ["r"], [3])
    T = step.num_tokens_padded
    with pytest.raises(ValueError, match="28 query heads"):
        kvshard.attention(cache, 0, np.zeros((T, 28, 128), np.float32), step, sm_scale=1.0)
    with pytest.raises(ValueError, match="32 in all"):
        plan(num_kv_heads=4, tp=8, num_q_heads=28)
    out = kvshard.attention(cache, 0, np.ones((T, 32, 128), np.float32), step, sm_scale=1.0)
    assert out.shape == (T, 32, 128)


def test_host_tier_by_hand():
    # Host pages have the device page's bytes: 65,536 (see test_float32_plan_by_hand).
    # 1,000,000 bytes over 2 devices = 500,000 each -> 7 pages (458,752 bytes), all usable.
    p = plan(host_memory=1_000_000, devices_per_host=2)
    h = p["host_tier"]
    assert h["bytes_per_device"] == 500_000 and h["pages_per_device"] == 7
    assert h["used_bytes_per_device"] == 458_752 and h["used_bytes_per_host"] == 917_504
    assert h["tokens_per_group"] == h["tokens_total"] == 7 * 16 == 112
    # 7 pages per 100-token sequence: 1 parks in host; device 14 usable + host 7 = 21 pages.
    assert h["sequences_per_group"] == 1
    assert h["device_and_host_tokens_per_group"] == 21 * 16 == 336
    assert h["capacity_vs_device"] == pytest.approx(7 / 14)
    assert h["int32_ok"]
    # The default: the whole mesh (1 x 2 devices) on one host, the same split.
    assert plan(host_memory=1_000_000)["host_tier"] == h
    # Data-parallel groups: each has its own host pool; totals multiply.
    wide = plan(dp=3, host_memory=3_000_000)["host_tier"]  # 6 devices: 500,000 each
    assert wide["pages_per_device"] == 7 and wide["tokens_total"] == 3 * 112
    assert wide["sequences_total"] == 3
    assert plan()["host_tier"] is None
    text = format_plan(p)
    assert "host tier (976.6 KiB of pinned host memory per host, 2 devices)" in text
    assert "host tokens per DP group" in text and "112" in text


def test_host_memory_below_one_page_per_device_is_refused():
    with pytest.raises(HostMemoryTooSmall, match=r"50,000 bytes per device, under one page of "):
        plan(host_memory=100_000, devices_per_host=2)
    with pytest.raises(HostMemoryTooSmall, match=r"need >= 131,072 bytes"):
        plan(host_memory=100_000, devices_per_host=2)
    with pytest.raises(ValueError, match=r"devices_per_host=0 must be a positive int"):
        plan(host_memory=100_000, devices_per_host=0)


_LATENT = {
    "num_layers": 61,
    "num_kv_heads": 1,
    "head_dim": 576,
    "page_size": 32,
    "dtype": "bfloat16",
    "dp": 2,
    "tp": 4,
    "hbm_per_device": 2**30,
    "context": 1024,
    "num_q_heads": 128,
    "kv_lora_rank": 512,
}


def test_latent_plan_by_hand():
    """DeepSeek-V3's latent (61 layers, 512 + 64 values) in bfloat16 on a 2x4 mesh: the row
    padded to 640 lanes and, one row per device, to 2 sublane rows; replicated x4."""
    p = plan(**_LATENT)
    page_layer = 32 * 2 * 640 * 2  # slots x packed rows x lanes x bytes
    assert p["kv_layout"] == "latent" and p["replication"] == 4
    assert p["page_bytes_per_layer"] == page_layer
    assert p["pages_per_device"] == 2**30 // (61 * page_layer)
    t = p["latent"]
    assert (t["bytes_per_token_layer"], t["bytes_per_token"]) == (1152, 61 * 1152)
    assert t["stored_bytes_per_token_per_device"] == 61 * 2 * 640 * 2
    assert t["stored_bytes_per_token_per_group"] == 4 * 61 * 2 * 640 * 2
    assert t["replication_bytes_per_token"] == 3 * 61 * 2 * 640 * 2
    # Of the usable pages' unpadded latent (one copy per device), a quarter is distinct.
    unpadded = 61 * (p["pages_per_device"] - 1) * 32 * 1152
    assert p["kv_bytes"] == unpadded // 4
    assert p["waste_bytes"]["head_replication"] == unpadded - unpadded // 4
    text = format_plan(p)
    assert "latent replication (x4)" in text and "replication cost per token" in text
    assert plan(**{**_LATENT, "tp": 1})["latent"]["replication_bytes_per_token"] == 0
    assert plan(**{**_LATENT, "kv_lora_rank": None, "num_kv_heads": 8})["latent"] is None
