"""State groups (Mamba-2, gated DeltaNet layers) in the PageAllocator, the hybrid config reading,
vLLM's unified page size and the hybrid plan; and the vLLM-parity options of lookups and events
(EAGLE, lora_id, per-page removed events, cached-page announcements)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvshard._geometry.state_layers import hybrid_layers, unified_page_size
from kvshard.allocator import PageAllocator, PagesRemoved, PagesStored

M, F, G = ("mamba",), ("full",), ("linear_attention",)
TOKENS = np.arange(100) % 7


def hybrid(**kw):
    """40 pages of 4 tokens; 2 attention layers and 4 Mamba-2 layers."""
    args = dict(max_requests=4, max_pages_per_request=8, layer_types=[M, F, M, M, F, M])
    return PageAllocator(40, 4, **(args | kw))


def test_groups_put_attention_first_and_one_state_page_per_request():
    a = hybrid()
    assert a.group_types == (F, M, M)  # 2 attention layers: group size 2, 4 mamba: 2 groups
    assert a.state_groups == (1, 2)
    a.allocate("r", 9)  # 3 attention pages, one state page per state group
    row = a.row("r")
    assert (a.page_table[0, row, :3] > 0).all()
    states = a.state_pages([row])
    assert states.shape == (2, 1) and (states > 0).all()
    assert np.array_equal(a.page_table[1:, row, 0], states[:, 0])
    assert not a.page_table[1:, row, 1:].any()
    assert a.num_free_pages == 39 - 5
    a.allocate("r", 20)  # growth adds attention pages only
    assert np.array_equal(a.state_pages([row]), states)
    a.check_invariants()
    assert a.state_pages([]).shape == (2, 0)  # a pool with nothing scheduled this step


def test_fork_copies_the_state_on_write():
    a = hybrid()
    a.allocate("p", 4)
    a.fork("p", "c")
    parent = a.state_pages([a.row("p")])[:, 0]
    assert np.array_equal(a.state_pages([a.row("c")])[:, 0], parent)  # shared
    a.allocate("c", 1)
    child = a.state_pages([a.row("c")])[:, 0]
    pairs = a.take_pending_copies()
    assert set(child).isdisjoint(parent)
    assert {(int(s), int(d)) for s, d in pairs} == set(
        zip(parent.tolist(), child.tolist(), strict=True)
    )
    a.allocate("p", 1)  # the parent is the last owner: it keeps its page, no copy
    assert np.array_equal(a.state_pages([a.row("p")])[:, 0], parent)
    assert a.take_pending_copies().shape == (0, 2)
    a.check_invariants()


def test_prefix_hits_only_where_the_state_was_cached():
    a = hybrid(enable_prefix_caching=True)
    a.allocate("a", 8)
    assert a.commit_prefix("a", TOKENS[:8]) == 2 + 2  # 2 attention pages, 2 states at 8
    a.allocate("a", 6)  # 14 tokens: not at a boundary, the new state is not cached
    assert a.take_pending_copies().shape == (2, 2)  # the cached states were frozen
    assert a.commit_prefix("a", TOKENS[:14]) == 1  # the attention page [4, 8) -> 3 pages
    # Attention holds 3 pages of the prompt, the states only the one at 8 tokens: vLLM's rule.
    assert a.peek_prefix(TOKENS[:20]) == 8
    # EAGLE (vLLM's rule): attention matches 3 pages and drops one; the states serve 2.
    assert a.peek_prefix(TOKENS[:20], eagle=True) == 8
    assert a.peek_prefix(TOKENS[:12]) == 8
    assert a.peek_prefix(TOKENS[:12], eagle=True) == 0  # 2 matched, 1 kept: no state at 4
    assert a.lookup_prefix("b", TOKENS[:20]) == 8
    row_a, row_b = a.row("a"), a.row("b")
    cached_states = a.state_pages([row_b])[:, 0]
    assert (cached_states > 0).all()
    assert set(cached_states).isdisjoint(a.state_pages([row_a])[:, 0])
    a.allocate("b", 12)
    assert a.take_pending_copies().shape == (2, 2)  # the hit's states are copied on write
    a.check_invariants()


def test_truncate_refuses_a_state_rollback_and_changes_nothing():
    a = hybrid()
    a.allocate("r", 10)
    before = a.checksum()
    with pytest.raises(ValueError, match=r"num_tokens=6 .* must be 0 or 10"):
        a.truncate("r", 6)
    assert a.checksum() == before
    a.truncate("r", 10)
    assert a.checksum() == before
    a.truncate("r", 0)
    assert not a.state_pages([a.row("r")]).any()
    a.check_invariants()


def test_swap_moves_the_state_and_state_dict_round_trips():
    a = hybrid(num_host_pages=10)
    a.allocate("r", 5)
    row = a.row("r")
    states = a.state_pages([row])[:, 0]
    assert a.swap_out_frees("r") == 4  # 2 attention + 2 state pages
    a.swap_out_request("r")
    out, _ = a.take_pending_swaps()
    assert set(states) <= set(out[:, 0].tolist())
    assert not a.state_pages([row]).any()
    a.swap_in_request("r")
    _, back = a.take_pending_swaps()
    assert (a.state_pages([row]) > 0).all()
    assert set(a.state_pages([row])[:, 0]) <= set(back[:, 0].tolist())
    state = a.state_dict()
    b = hybrid(num_host_pages=10)
    b.load_state_dict(state)
    assert b.checksum() == a.checksum()
    broken = {**state, "page_table": state["page_table"].copy()}
    broken["page_table"][1, row, 1] = 7  # a second page in a state row
    with pytest.raises(ValueError, match="state entry"):
        b.load_state_dict(broken)
    assert b.checksum() == a.checksum()


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="no attention layer"):
        PageAllocator(8, 4, max_requests=1, max_pages_per_request=2, layer_types=[M, M])
    with pytest.raises(ValueError, match=r"layer_types\[1\]"):
        PageAllocator(8, 4, max_requests=1, max_pages_per_request=2, layer_types=[F, ("ssm",)])
    a = hybrid()
    with pytest.raises(ValueError, match=r"rows\[1\]=4 must be in \[0, max_requests=4\)"):
        a.state_pages([0, 4])
    with pytest.raises(ValueError, match="lora_id"):
        hybrid(enable_prefix_caching=True).commit_prefix("x", [1], lora_id="a")


def test_eagle_drops_the_last_page_of_a_hit():
    a = PageAllocator(20, 4, max_requests=2, max_pages_per_request=8, enable_prefix_caching=True)
    a.allocate("a", 16)
    a.commit_prefix("a", TOKENS[:16])
    assert a.peek_prefix(TOKENS[:17]) == 16
    assert a.peek_prefix(TOKENS[:17], eagle=True) == 12
    assert a.lookup_prefix("b", TOKENS[:17], eagle=True) == 12
    assert len(a.pages("b")) == 3


def test_events_lora_per_page_and_announced_on_demand():
    a = PageAllocator(
        4,
        2,
        max_requests=2,
        max_pages_per_request=3,
        enable_prefix_caching=True,
        enable_kv_events=True,
        kv_events_per_page=True,
    )
    a.allocate("a", 6)
    a.commit_prefix("a", TOKENS[:6], lora_id=3)
    (stored,) = a.take_kv_events()
    assert isinstance(stored, PagesStored) and stored.lora_id == 3 and len(stored.page_hashes) == 3
    a.free("a")
    a.allocate("b", 6)  # evicts the 3 cached pages: one PagesRemoved each, as vLLM
    removed = a.take_kv_events()
    assert [type(e) for e in removed] == [PagesRemoved] * 3
    assert sorted(e.page_hashes[0] for e in removed) == sorted(stored.page_hashes)
    assert a.announce_cached_pages() == 0
    a.free("b")
    a.allocate("c", 2)
    a.commit_prefix("c", TOKENS[10:12])
    a.take_kv_events()
    assert a.announce_cached_pages() == 1
    (again,) = a.take_kv_events()
    assert isinstance(again, PagesStored) and again.token_ids is None


def test_hybrid_layers_of_each_family():
    nemo = hybrid_layers({"model_type": "nemotron_h", "hybrid_override_pattern": "M-M*E-M"})
    assert nemo.layer_types == (M, M, F, M) and nemo.model_layer == (0, 2, 3, 6)
    conv_dim = 128 * 64 + 2 * 8 * 128  # heads * head_dim + 2 * groups * state (defaults)
    assert nemo.state.conv == (3, conv_dim) and nemo.state.ssm == (128, 64, 128)
    bamba_config = {"model_type": "bamba", "num_hidden_layers": 4, "attn_layer_indices": [1]}
    bamba_config |= {"hidden_size": 64, "mamba_n_heads": 4, "mamba_d_state": 8, "mamba_n_groups": 2}
    bamba = hybrid_layers(bamba_config)
    assert bamba.layer_types == (M, F, M, M)
    assert bamba.state.ssm == (4, 32, 8)  # head_dim = 2 * 64 / 4
    # conv in the model's dtype (bfloat16 by default), the SSM state in float32
    assert bamba.state.nbytes == 3 * (128 + 2 * 2 * 8) * 2 + 4 * 32 * 8 * 4
    assert (
        hybrid_layers({**bamba_config, "mamba_ssm_cache_dtype": "bfloat16"}).state.nbytes
        == (3 * (128 + 2 * 2 * 8) + 4 * 32 * 8) * 2
    )
    granite = {"model_type": "granitemoehybrid", "num_hidden_layers": 2, "hidden_size": 64}
    granite["layer_types"] = ["mamba", "attention"]
    assert hybrid_layers(granite).layer_types == (M, F)
    granite["layer_types"] = ["linear_attention", "full_attention"]  # transformers 5 spelling
    assert hybrid_layers(granite).layer_types == (M, F)
    qwen = hybrid_layers({"model_type": "qwen3_next", "num_hidden_layers": 8})
    assert qwen.layer_types == (G, G, G, F) * 2
    assert qwen.state.ssm == (32, 128, 128) and qwen.state.conv == (3, 2 * 16 * 128 + 32 * 128)
    falcon = hybrid_layers({"model_type": "falcon_h1", "num_hidden_layers": 2, "hidden_size": 64})
    assert falcon.layer_types == (F, M, F, M) and falcon.model_layer == (0, 0, 1, 1)
    with pytest.raises(ValueError, match="Mamba-1"):
        hybrid_layers({"model_type": "jamba", "num_hidden_layers": 2})
    with pytest.raises(ValueError, match="hybrid_override_pattern='MX'"):
        hybrid_layers({"model_type": "nemotron_h", "hybrid_override_pattern": "MX"})


def test_unified_page_size_is_vllms_rule():
    assert unified_page_size(1000, 16) == 64  # ceil(1000 / (16 * 16)) = 4 blocks of 16
    assert unified_page_size(256, 16) == 16
    assert unified_page_size(257, 16, alignment=1) == 17
    with pytest.raises(ValueError, match="alignment=0 must be an int >= 1"):
        unified_page_size(1, 1, alignment=0)


def test_plan_of_a_hybrid_config(tmp_path, capsys):
    from kvshard.cli import main

    config = {
        "model_type": "bamba",
        "num_hidden_layers": 32,
        "attn_layer_indices": [9, 18, 27],
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "mamba_n_heads": 128,
        "mamba_d_head": 64,
        "mamba_d_state": 128,
        "torch_dtype": "bfloat16",
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    argv = ["plan", "--config", str(path), "--mesh", "1x4", "--hbm-per-device", "8GiB"]
    assert main([*argv, "--page-size", "16", "--context", "32768", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    # 3 attention + 29 mamba layers: groups of 3. State per layer: conv 3 x (8192 + 2 * 128)
    # bfloat16 + ssm 128 x 64 x 128 float32 = 4,244,992 bytes; per device (tp 4) 1,061,248;
    # a state page of 3 layers 3,183,744. An attention token: 3 layers x K,V x 2 heads x 128
    # x 2 bytes = 3,072; 3,183,744 / (16 x 3,072) = 64.8 -> 65 blocks of 16 = 1,040 tokens.
    assert plan["state"]["bytes_per_layer"] == 4_244_992
    assert plan["page_size"] == 1040
    assert plan["page_bytes"] == 1040 * 3072
    assert len(plan["kv_cache_groups"]) == 1 + 10


def test_announce_prefix_reports_a_reused_prefix_and_changes_nothing():
    a = PageAllocator(
        9, 4, max_requests=2, max_pages_per_request=4,
        enable_prefix_caching=True, enable_kv_events=True,
    )  # fmt: skip
    a.allocate("a", 16)
    a.commit_prefix("a", TOKENS[:16])
    (first,) = a.take_kv_events()
    assert a.lookup_prefix("b", TOKENS[:13]) == 12
    before = a.checksum()
    assert a.announce_prefix("b", TOKENS[:13], lora_id=7) == 3
    assert a.checksum() == before
    (event,) = a.take_kv_events()
    assert event.page_hashes == first.page_hashes[:3] and event.parent_hash is None
    assert event.token_ids == tuple(int(t) for t in TOKENS[:12]) and event.lora_id == 7
    with pytest.raises(ValueError, match="token_ids has 8 tokens"):
        a.announce_prefix("b", TOKENS[:8])
    assert a.checksum() == before


def test_group_page_sizes_align_hits_and_key_pages_by_their_last_block():
    S = ("sliding", 8)
    a = PageAllocator(
        64, 4, max_requests=4, max_pages_per_request=16, layer_types=[F, S],
        group_page_sizes=[8, 4], enable_prefix_caching=True, enable_kv_events=True,
    )  # fmt: skip
    assert a.page_sizes == (8, 4)
    a.allocate("a", 20)
    pages = a.pages("a")
    assert np.count_nonzero(pages[0]) == 3 and np.count_nonzero(pages[1]) == 5  # 8 vs 4 tokens
    assert a.commit_prefix("a", TOKENS[:20]) == 2 + 5  # whole pages only: 16 of 20 in group 0
    full, sliding = a.take_kv_events()
    assert full.page_size == 8 and len(full.page_hashes) == 2 and len(full.token_ids) == 16
    assert sliding.page_size == 4 and sliding.page_hashes[1::2] == full.page_hashes
    # 20 tokens are cached in the sliding group but hits align to 8 (the lcm): 16.
    assert a.peek_prefix(TOKENS[:30]) == 16
    assert a.peek_prefix(TOKENS[:30], eagle=True) == 8  # group 0 needs its page after the hit
    assert a.lookup_prefix("b", TOKENS[:30]) == 16
    assert np.array_equal(a.pages("b")[0, :2], pages[0, :2])
    a.allocate("b", 10)
    a.check_invariants()
    b = PageAllocator(
        64, 4, max_requests=4, max_pages_per_request=16, layer_types=[F, S],
        group_page_sizes=[8, 4], enable_prefix_caching=True, enable_kv_events=True,
    )  # fmt: skip
    b.load_state_dict(a.state_dict())
    assert b.checksum() == a.checksum()


def test_group_page_sizes_refusals_name_the_entry():
    kw = dict(max_requests=1, max_pages_per_request=4, layer_types=[F, ("sliding", 4)])
    with pytest.raises(ValueError, match=r"group_page_sizes\[0\]=6 must be a positive multiple"):
        PageAllocator(8, 4, group_page_sizes=[6, 4], **kw)
    with pytest.raises(ValueError, match="one page size per KV-cache group"):
        PageAllocator(8, 4, group_page_sizes=[8], **kw)
    with pytest.raises(ValueError, match="state group's"):
        PageAllocator(8, 4, group_page_sizes=[4, 8], **(kw | {"layer_types": [F, M]}))
    with pytest.raises(ValueError, match="needs layer_types"):
        PageAllocator(8, 4, max_requests=1, max_pages_per_request=4, group_page_sizes=[8])


def test_plan_refuses_a_mamba1_config_by_name(tmp_path, capsys):
    from kvshard.cli import main

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "jamba", "num_hidden_layers": 4}))
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--config", str(path), "--hbm-per-device", "1GiB"])
    assert exit_info.value.code == 2
    assert "Mamba-1" in capsys.readouterr().err
