"""PageAllocator's vLLM hybrid-manager switches: ``eagle_layers`` (vLLM's per-group
``is_eagle_group``: which groups an EAGLE lookup drops a block in) and ``disable_hybrid``
(vLLM's ``disable_hybrid_kv_cache_manager``: full attention with windows as one full group)."""

from __future__ import annotations

import numpy as np
import pytest

from kvshard.allocator import PageAllocator, unified_group_page_sizes

F, M = ("full",), ("mamba",)
S4, S8 = ("sliding", 4), ("sliding", 8)
TOKENS = np.arange(100) % 7 + 10 * (np.arange(100) // 4)  # every 4-token block distinct


def full_and_drafter(**kw):
    """Full attention with 16-token pages and an MTP drafter's window of 4 (4-token pages,
    the hash block): vLLM's test_hybrid_local_kv_retention_mtp_reuses_latest_boundary at
    half the sizes."""
    args = dict(
        max_requests=4,
        max_pages_per_request=32,
        layer_types=[F, S4],
        group_page_sizes=[16, 4],
        enable_prefix_caching=True,
    )
    return PageAllocator(100, 4, **(args | kw))


def cached(a, n):
    a.allocate("a", n)
    a.commit_prefix("a", TOKENS[:n])
    a.free("a")
    return a


def test_eagle_layers_drop_a_block_only_in_the_drafter_groups():
    # 63 tokens: the full group holds 3 pages (48 tokens); the hit may be 48 (12 blocks).
    flagged = cached(full_and_drafter(eagle_layers=[1]), 63)
    assert flagged.eagle_groups == (1,)
    assert flagged.peek_prefix(TOKENS[:63]) == 48
    # only the window group drops: it needs block 12 as well, which is cached
    assert flagged.peek_prefix(TOKENS[:63], eagle=True) == 48
    assert flagged.lookup_prefix("b", TOKENS[:63], eagle=True) == 48
    assert np.count_nonzero(flagged.pages("b")[0]) == 3  # the full group keeps its 3 pages
    flagged.check_invariants()
    # the default (every group, vLLM's fallback with no group flagged): the full group
    # would need a 4th page, so the hit falls to the previous boundary
    every = cached(full_and_drafter(), 63)
    assert every.eagle_groups is None
    assert every.peek_prefix(TOKENS[:63], eagle=True) == 32
    # the drafter's block after the hit must be cached: 51 tokens hold block 12 only partly
    short = cached(full_and_drafter(eagle_layers=[1]), 51)
    assert short.peek_prefix(TOKENS[:63]) == 48
    assert short.peek_prefix(TOKENS[:63], eagle=True) == 32


def test_eagle_layers_flag_every_group_of_the_drafters_type():
    a = PageAllocator(
        60, 4, max_requests=2, max_pages_per_request=8, layer_types=[F, S8, S8, F, S4],
        enable_prefix_caching=True, eagle_layers=[2],
    )  # fmt: skip
    assert a.group_types == (F, F, S8, S8, S4)
    assert a.groups.layer_group[2] == 3  # layer 2 is in group 3, its sibling group 2 too
    assert a.eagle_groups == (2, 3)
    assert a.eagle_layers == (2,)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(layer_types=None), r"eagle_layers=\[0\] needs layer_types"),
        (dict(eagle_layers=[]), r"eagle_layers=\[\] must be None .* non-empty"),
        (dict(eagle_layers="1"), r"eagle_layers='1' must be None"),
        (dict(eagle_layers=[2]), r"eagle_layers\[0\]=2 must be an int in \[0, 2\)"),
        (dict(eagle_layers=[-1]), r"eagle_layers\[0\]=-1 must be an int in \[0, 2\)"),
        (dict(eagle_layers=[True]), r"eagle_layers\[0\]=True must be an int"),
        (dict(layer_types=[F, M], eagle_layers=[1]), r"eagle_layers\[0\]=1 is a state layer"),
    ],
)
def test_eagle_layers_refusals_name_the_argument(kw, match):
    args = dict(max_requests=2, max_pages_per_request=8, layer_types=[F, S4], eagle_layers=[0])
    with pytest.raises(ValueError, match=match):
        PageAllocator(20, 4, **(args | kw))


def test_disable_hybrid_makes_full_and_windows_one_full_group():
    kw = dict(max_requests=2, max_pages_per_request=16, enable_prefix_caching=True)
    hybrid = PageAllocator(40, 4, layer_types=[F, S4, F, S4], **kw)
    a = PageAllocator(40, 4, layer_types=[F, S4, F, S4], disable_hybrid=True, **kw)
    assert hybrid.group_types == (F, S4)
    assert a.group_types == (F,) and a.layer_types == (F,) * 4 and a.groups.group_size == 4
    assert a.disable_hybrid is True and a.sliding_window is None
    for alloc in (hybrid, a):
        alloc.allocate("r", 20)
        alloc.allocate("r", 20)
    assert a.num_free_pages == 39 - 10  # every page kept: no window release
    assert hybrid.num_free_pages < 39 - 10 - 1  # two groups, the window's pages released
    # the same pool as a plain full-attention allocator: its state dict loads there
    plain = PageAllocator(40, 4, layer_types=[F] * 4, **kw)
    plain.load_state_dict(a.state_dict())
    assert plain.checksum() == a.checksum()
    # one type is left as it is (vLLM leaves a uniform model alone)
    windows = PageAllocator(40, 4, layer_types=[S4, S4], disable_hybrid=True, **kw)
    assert windows.sliding_window == 4


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(layer_types=[F, M]), r"disable_hybrid=True cannot make layer_types=.*mamba"),
        (dict(layer_types=[S4, S8]), r"disable_hybrid=True cannot make layer_types"),
        (dict(layer_types=None), r"disable_hybrid=True needs layer_types"),
        (dict(disable_hybrid=1), r"disable_hybrid=1 must be a bool"),
        # a malformed entry is refused as without disable_hybrid, not converted to full
        (dict(layer_types=[F, ("sliding", -1)]), r"sliding.*-1"),
        (dict(layer_types="full"), r"layer_types='full' must be None or a non-empty sequence"),
    ],
)
def test_disable_hybrid_refusals_name_the_argument(kw, match):
    args = dict(max_requests=2, max_pages_per_request=8, disable_hybrid=True)
    with pytest.raises(ValueError, match=match):
        PageAllocator(20, 4, **(args | kw))


def test_unified_group_page_sizes_give_every_page_the_same_bytes():
    # full attention with head size 64 and a window with head size 32 (2 KV heads, float32)
    head64, head32 = 2 * 2 * 64 * 4, 2 * 2 * 32 * 4
    assert unified_group_page_sizes([head64, head32], 16) == (16, 32)
    assert unified_group_page_sizes([head32, head64, head32 // 2], 4) == (8, 4, 16)
    assert unified_group_page_sizes([7], 3) == (3,)
    a = PageAllocator(
        40, 16, max_requests=2, max_pages_per_request=8, layer_types=[F, S4],
        group_page_sizes=unified_group_page_sizes([head64, head32], 16),
    )  # fmt: skip
    assert a.page_sizes == (16, 32)


@pytest.mark.parametrize(
    "args, match",
    [
        (([1536, 1024], 16), r"token_bytes\[1\]=1024 does not divide the largest, 1536"),
        (([1024, 0], 16), r"token_bytes\[1\]=0 must be an int >= 1"),
        (([], 16), r"token_bytes=\[\] must be a non-empty sequence"),
        (([8], 0), r"page_size=0 must be an int >= 1"),
        (([8.0], 4), r"token_bytes\[0\]=8.0 must be an int >= 1"),
    ],
)
def test_unified_group_page_sizes_refusals_name_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        unified_group_page_sizes(*args)
