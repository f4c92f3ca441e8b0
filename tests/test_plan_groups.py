"""kvshard/_geometry/plan_groups.py: the planner's arithmetic for models that mix attention types
(issue 21): vLLM's split of the layers into KV-cache groups, pages per request of each type,
the capacity of one shared pool against every layer full, and the lane padding of head_dim 64.

Every expected number is worked out by hand in the test, from the same layout rules as
tests/test_plan.py: one layer's page is page_size x rows x 128 lanes x itemsize; page 0 is the
null page.
"""

from __future__ import annotations

import pytest
from _plans import plan

from kvshard._geometry.plan import ContextTooLong, format_plan
from kvshard._geometry.plan_groups import chunk_pages, kv_cache_groups, pages_per_request

FULL = ("full",)


@pytest.mark.parametrize(
    ("chunk", "page_size", "context", "pages"),
    [
        (4, 2, 100, 2),  # chunks start on page boundaries: a chunk is 2 pages
        (5, 2, 100, 3),  # chunk 5..9 spans pages 2, 3, 4
        (8192, 32, 131_072, 256),  # Llama 4: 8192 / 32
        (100, 16, 50, 4),  # the chunk never binds: ceil(50 / 16)
        (1, 16, 1000, 1),  # a chunk of 1 reads only the current page
    ],
)
def test_chunk_pages_by_hand(chunk, page_size, context, pages):
    assert chunk_pages(chunk, page_size, context) == pages


def test_chunk_pages_matches_a_simulation():
    """Before computing position n, a chunked request keeps the pages of positions
    C * (n // C) .. n; the most pages over n < context, counted position by position."""
    for chunk in range(1, 10):
        for page_size in range(1, 6):
            for context in (1, 2, 7, 23, 40):
                held = max(
                    n // page_size - (chunk * (n // chunk)) // page_size + 1 for n in range(context)
                )
                assert chunk_pages(chunk, page_size, context) == held, (chunk, page_size, context)


def test_pages_per_request_by_type():
    assert pages_per_request(FULL, 32, 32_768) == 1024
    assert pages_per_request(("sliding", 1024), 32, 32_768) == 33  # ceil(1023 / 32) + 1
    assert pages_per_request(("chunked", 8192), 32, 32_768) == 256
    with pytest.raises(ValueError, match="context=0 must be a positive int"):
        pages_per_request(FULL, 32, 0)


def test_kv_cache_groups_split_as_vllm_does():
    S = ("sliding", 8)
    # vLLM's own example: (full.0, full.1), (sw.0, sw.1, sw.2) -> groups of 2:
    # (full.0, full.1), (sw.0, sw.2), (sw.1, padding).
    assert kv_cache_groups((FULL, FULL, S, S, S)) == (2, [(FULL, (0, 1)), (S, (2, 4)), (S, (3,))])
    # Gemma 3 27B: 52 local, 10 global -> groups of 10; 52 local layers make ceil(52 / 10) = 6
    # groups taking every 6th local layer: 9, 9, 9, 9, 8, 8 layers (8 padding slots in all).
    gemma3 = tuple(FULL if (i + 1) % 6 == 0 else ("sliding", 1024) for i in range(62))
    size, groups = kv_cache_groups(gemma3)
    assert size == 10 and len(groups) == 7
    assert [len(layers) for _, layers in groups] == [9, 9, 9, 9, 8, 8, 10]
    # The first group takes local layers #0, #6, #12, ... of 0, 1, 2, 3, 4, 6, 7, ...: 0, 7, 14.
    assert groups[0][1][:3] == (0, 7, 14)
    assert groups[-1] == (FULL, (5, 11, 17, 23, 29, 35, 41, 47, 53, 59))
    # 12 sliding + 13 full: within 1.25x, so groups of 13 (not 12, which would need 24 slots
    # for the full layers).
    size, groups = kv_cache_groups((S,) * 12 + (FULL,) * 13)
    assert size == 13 and len(groups) == 2


def hybrid(**overrides):
    # 4 layers: 3 sliding (W = 32) and 1 full; float32, 2 of 4 heads per device: one layer's
    # page is 16 x 4 x 128 x 4 B = 32,768 bytes (test_float32_plan_by_hand).
    types = [("sliding", 32)] * 3 + [FULL]
    return plan(num_layers=4, layer_types=types, **{"hbm_per_device": 2_000_000, **overrides})


def test_hybrid_plan_by_hand():
    p = hybrid()
    g = p["layer_groups"]
    # 3 sliding vs 1 full: groups of 1 layer (3 >= 1.25 x 1), 4 KV-cache groups, no padding.
    assert (g["group_size"], g["layer_slots"], g["padding_layer_slots"]) == (1, 4, 0)
    # A page id spans 1 layer slot: 32,768 bytes; 2,000,000 // 32,768 = 61 pages, 60 usable.
    assert g["page_bytes"] == 32_768
    assert (g["pages_per_device"], g["usable_pages_per_device"]) == (61, 60)
    # Context 100, P = 16: full 7 pages; sliding ceil(31 / 16) + 1 = 3 pages, 3 groups x 3 = 9.
    rows = {row["kind"]: row for row in g["groups"]}
    assert rows["sliding"]["layers"] == [0, 1, 2] and rows["full"]["layers"] == [3]
    assert (rows["sliding"]["kv_cache_groups"], rows["sliding"]["pages_per_request_each"]) == (3, 3)
    assert rows["sliding"]["pages_per_request"] == 9 and rows["full"]["pages_per_request"] == 7
    assert g["pages_per_request"] == 16 and g["bytes_per_request"] == 16 * 32_768
    assert g["sequences_per_group"] == 60 // 16 == 3 and g["tokens_per_group"] == 300
    # Every layer full: 4 x 32,768 = 131,072 bytes a page, 15 pages, 14 usable, 7 each: 2.
    assert g["all_full_pages_per_request"] == 7 and g["all_full_bytes_per_request"] == 917_504
    assert g["all_full_sequences_per_group"] == p["sequences_per_group"] == 2
    assert g["capacity_gain"] == pytest.approx(3 / 2)
    assert g["bytes_gain"] == pytest.approx(917_504 / 524_288)
    text = format_plan(p)
    assert "sliding window 32: 3 layers" in text and "3 KV-cache groups x 3" in text
    assert "capacity gain of the groups" in text and "x1.50" in text


def test_hybrid_fits_where_every_layer_full_does_not():
    # 1,000,000 bytes: all full 7 pages (6 usable) cannot hold 7 pages; grouped 30 pages
    # (29 usable) hold one request of 16.
    p = hybrid(hbm_per_device=1_000_000)
    assert p["sequences_per_group"] == 0 and p["layer_groups"]["sequences_per_group"] == 1
    assert p["layer_groups"]["capacity_gain"] is None
    assert "none fit all full" in format_plan(p)
    # Neither fits 3 pages per group: the refusal says so and asks for the grouped bytes,
    # (16 + 1) pages x 32,768 = 557,056.
    with pytest.raises(ContextTooLong, match=r"nor in the layer groups.*>= 557,056 bytes"):
        hybrid(hbm_per_device=16 * 32_768)


def test_layer_types_are_checked_and_uniform_ones_need_no_groups():
    with pytest.raises(ValueError, match="layer_types has 3 entries; need one per layer"):
        plan(num_layers=4, layer_types=[FULL] * 3)
    with pytest.raises(ValueError, match="sliding_window=32 and layer_types both given"):
        plan(layer_types=[FULL, FULL], sliding_window=32)
    assert plan(layer_types=[FULL, FULL])["layer_groups"] is None
    windowed = plan(layer_types=[("sliding", 32)] * 2)
    assert windowed["layer_groups"] is None and windowed == plan(sliding_window=32)
    # Chunked layers alone are one group of every layer, counted like a mix.
    chunked = plan(layer_types=[("chunked", 32)] * 2)["layer_groups"]
    assert chunked["group_size"] == 2 and chunked["pages_per_request"] == 2  # 32 / 16


def test_lane_padding_per_page_by_hand():
    # head_dim 64 interleaved in 128 lanes: 16 slots x 4 rows x 64 lanes x 4 B = 16,384 bytes
    # of each 32,768-byte layer page are padding; a page id of 2 layers wastes 32,768.
    p = plan(head_dim=64, kv_layout="interleaved")
    assert p["kv_layout"] == "interleaved" and p["interleaved"] is None
    assert p["page_bytes_per_layer"] == 32_768
    assert p["lane_padding_bytes_per_page_layer"] == 16_384
    assert p["lane_padding_bytes_per_page"] == 32_768
    # The budget row is the same waste over the usable pages: 14 x 32,768.
    assert p["waste_bytes"]["head_dim_padding"] == 14 * 32_768
    assert "lane padding per page, 1 layer" in format_plan(
        p
    ) and "50.00% of each page" in format_plan(p)
    assert plan()["lane_padding_bytes_per_page"] == 0
    assert "lane padding" not in format_plan(plan())


def test_packed_head_dim_64_has_no_padding_by_hand():
    # head_dim 64 packed (the default): 2 heads a device, one K|V row each: a layer's page is
    # 16 slots x 2 rows x 128 lanes x 4 B = 16,384 bytes, every byte a value. 1,000,000 bytes
    # hold 1,000,000 // 32,768 = 30 page ids (29 usable, 464 tokens); interleaved pages of
    # 65,536 bytes: 15 (14 usable, 224 tokens): x464/224.
    p = plan(head_dim=64)
    assert p["kv_layout"] == "packed" and p["row_dim"] == 128 and p["padded_head_dim"] == 128
    assert p["combined_heads_per_device"] == 2 and p["local_shape"] == [2, 30 * 16, 2, 128]
    assert p["page_bytes_per_layer"] == 16_384 and p["page_bytes"] == 32_768
    assert p["lane_padding_bytes_per_page_layer"] == 0
    assert p["padding_bytes_per_page_layer"] == 0
    assert p["waste_bytes"]["head_dim_padding"] == 0 and p["waste_bytes"]["dtype_packing"] == 0
    assert p["kv_bytes"] == 29 * 32_768  # every byte of the usable pages is K or V
    w = p["interleaved"]
    assert w["page_bytes_per_layer"] == 32_768 and w["lane_padding_bytes_per_page_layer"] == 16_384
    assert w["saved_bytes_per_page"] == 32_768
    assert p["tokens_per_group"] == 464 and w["tokens_per_group"] == 224
    assert w["capacity_vs_interleaved"] == pytest.approx(464 / 224)
    text = format_plan(p)
    assert "K|V of a head in one row: K lanes 0..63, V lanes 64..127" in text
    assert "x2.07 the tokens of interleaved" in text
    assert "lane padding per page" not in text
