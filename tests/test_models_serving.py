"""kvshard.models end to end on small random Hugging Face checkpoints written here with NumPy.

Each case loads a checkpoint, serves prompts with continuous batching through kvshard on a
data x model mesh, and checks the served logits against (a) the same weights run densely and
(b) for float32 checkpoints, an independent float64 NumPy forward pass (tests/_hf_reference.py).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from _hf_checkpoints import llama32_config, write_checkpoint
from _hf_reference import forward as reference_forward

import kvshard
from kvshard import models

SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 128,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
}
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9], [7, 9], list(range(20, 41))]
NEW_TOKENS = 4
# Paged vs dense, relative to max(1, max |logit|), per compute dtype (examples/flax_llama.py).
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


def make_mesh(dp: int, tp: int):
    return jax.make_mesh(
        (dp, tp),
        ("data", "model"),
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
        devices=jax.devices()[: dp * tp],
    )


def serve(
    directory, mesh, *, page_size=4, budget=16, max_seqs=2, grouped=True, prompts=None, model=None
):
    """Loads (unless ``model`` is given) and serves ``prompts`` (PROMPTS) from the cache
    :func:`models.cache_spec` sizes: the model's layer groups, or every layer stored full
    (``grouped=False``). Returns (model, requests, spec, peak pages in one pool)."""
    model = model or models.load_checkpoint(directory, mesh)
    requests = [models.Request(i, list(p), NEW_TOKENS) for i, p in enumerate(prompts or PROMPTS)]
    longest = max(len(r.tokens) + r.max_new for r in requests)
    spec = models.cache_spec(
        model.arch,
        page_size=page_size,
        longest=longest,
        max_seqs=max_seqs,
        budget=budget,
        grouped=grouped,
    )
    _, peak = models.serve(model, spec, mesh, requests, max_seqs=max_seqs, budget=budget)
    return model, requests, spec, peak


def check_served(model, requests, cfg=None, oracle_tol=1e-4, prompts=None):
    """Served rows: one per token but the last, prompts kept; paged == dense within the dtype's
    tolerance; and == the float64 oracle when ``cfg`` (float32 checkpoints) is given."""
    prompts = prompts or PROMPTS
    dense = models.dense_logits(model, requests)
    for r, d in zip(requests, dense, strict=True):
        served = np.stack(r.logits)
        assert r.tokens[: len(prompts[r.id])] == prompts[r.id]
        assert len(r.tokens) == len(prompts[r.id]) + NEW_TOKENS
        assert served.shape == (len(r.tokens) - 1, model.arch.vocab_size)
        scale = max(1.0, float(np.abs(d).max()))
        assert np.abs(served - d).max() <= TOLERANCE[model.arch.dtype] * scale
        # Greedy: each generated token is the argmax of the served row before it.
        assert r.tokens[len(prompts[r.id]) :] == list(served.argmax(-1)[len(prompts[r.id]) - 1 :])
        if cfg is not None:
            ref = reference_forward(cfg, cfg["_weights"], r.tokens)[:-1]
            assert np.abs(served - ref).max() <= oracle_tol * max(1.0, np.abs(ref).max())


def test_llama32_shaped_bf16_checkpoint_on_a_1x4_mesh(tmp_path):
    """Acceptance: head_dim 64, llama3 rope scaling, tied embeddings (key absent), bf16, 1x4."""
    cfg = llama32_config()
    assert "tie_word_embeddings" not in cfg
    weights = write_checkpoint(tmp_path, cfg, dtype="bfloat16")
    model, requests, *_ = serve(tmp_path, make_mesh(1, 4))
    assert model.arch.tie_word_embeddings and not hasattr(model, "lm_head")
    assert model.arch.layers[0].rope.kind == "llama3" and model.arch.dtype == "bfloat16"
    q = model.model.layers[0].self_attn.q_proj.kernel[...]
    assert q.dtype == jax.numpy.bfloat16
    # [out, in] stored, [in, out] loaded; query heads split over the 4 model devices.
    hf_q = weights["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(np.asarray(q), hf_q.T)
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp

    def split(param):  # mesh axis of each dimension (a spec may omit trailing Nones)
        spec = tuple(param[...].sharding.spec)
        return spec + (None,) * (param[...].ndim - len(spec))

    assert split(attn.o_proj.kernel) == ("model", None)  # rows: one all-reduce
    assert split(mlp.gate_proj.kernel) == (None, "model")
    assert split(mlp.down_proj.kernel) == ("model", None)
    # 2 KV heads on 4 devices: replicated, as kvshard replicates them in the cache.
    assert attn.k_proj.kernel[...].sharding.is_fully_replicated
    check_served(model, requests)


def test_sharded_float32_llama_matches_the_float64_oracle_on_2x2(tmp_path):
    cfg = llama32_config(
        **SMALL,
        head_dim=16,
        tie_word_embeddings=False,
        attention_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
    )
    weights = write_checkpoint(tmp_path, cfg, dtype="float32", shards=3)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    model, requests, *_ = serve(tmp_path, make_mesh(2, 2))
    check_served(model, requests, {**cfg, "_weights": weights})


def test_qwen2_bias_and_per_layer_windows(tmp_path):
    # max_window_layers=1: layer 0 attends in full, layer 1 through a window of 5.
    cfg = {
        **SMALL,
        "model_type": "qwen2",
        "use_sliding_window": True,
        "sliding_window": 5,
        "max_window_layers": 1,
        "tie_word_embeddings": False,
        "rope_theta": 1_000_000.0,
    }
    weights = write_checkpoint(tmp_path, cfg, dtype="float32")
    assert "model.layers.0.self_attn.q_proj.bias" in weights
    model, requests, *_ = serve(tmp_path, make_mesh(1, 2))
    assert [layer.window for layer in model.arch.layers] == [None, 5]
    oracle = {**cfg, "layer_types": ["full_attention", "sliding_attention"], "_weights": weights}
    check_served(model, requests, oracle)
    # The window matters on these prompts: the oracle without it disagrees.
    full = reference_forward({**oracle, "layer_types": ["full_attention"] * 2}, weights, PROMPTS[2])
    windowed = reference_forward(oracle, weights, PROMPTS[2])
    assert np.abs(full - windowed).max() > 1e-3


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_gemma_soft_caps_norms_and_local_global_layers(tmp_path, model_type):
    cfg = {
        **SMALL,
        "model_type": model_type,
        "head_dim": 16,
        "query_pre_attn_scalar": 24,
        "sliding_window": 6,
        "layer_types": ["sliding_attention", "full_attention"],
        "hidden_activation": "gelu_pytorch_tanh",
    }
    if model_type == "gemma2":
        cfg |= {"attn_logit_softcapping": 2.0, "final_logit_softcapping": 1.5}
    else:  # Gemma 3: qk-norm, its own rope theta on local layers, linear scaling on global
        cfg |= {
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10_000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        }
    weights = write_checkpoint(tmp_path, cfg, dtype="float32")
    model, requests, *_ = serve(tmp_path, make_mesh(1, 2))
    arch = model.arch
    assert arch.tie_word_embeddings and arch.norm_offset == 1.0 and arch.sandwich_norms
    assert [layer.window for layer in arch.layers] == [6, None]
    check_served(model, requests, {**cfg, "_weights": weights})
    if model_type == "gemma2":  # the caps bind: logits never leave (-1.5, 1.5)
        assert max(np.abs(np.stack(r.logits)).max() for r in requests) < 1.5


def test_bf16_gemma2_passes_the_dense_check(tmp_path):
    cfg = {
        **SMALL,
        "model_type": "gemma2",
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 4,
    }
    write_checkpoint(tmp_path, cfg, dtype="bfloat16")
    model, requests, *_ = serve(tmp_path, make_mesh(2, 2))
    assert (model.arch.attn_soft_cap, model.arch.final_soft_cap) == (50.0, 30.0)  # defaults
    check_served(model, requests)


def test_a_checkpoint_that_does_not_fit_the_config_is_refused(tmp_path):
    cfg = {**SMALL, "model_type": "qwen3", "tie_word_embeddings": False}
    weights = write_checkpoint(tmp_path / "ok", cfg, dtype="float32")
    mesh = make_mesh(1, 2)
    # A Qwen3 checkpoint read as Qwen2 lacks biases and has unread q/k norms.
    for name, change, error in (
        ("qwen2", {"model_type": "qwen2"}, KeyError),
        ("llama", {"model_type": "llama"}, ValueError),
        ("wide", {"intermediate_size": 64}, ValueError),
    ):
        directory = tmp_path / name
        write_checkpoint(directory, cfg, dtype="float32")
        (directory / "config.json").write_text(
            json.dumps({**cfg, **change, "torch_dtype": "float32"})
        )
        with pytest.raises(error) as info:
            models.load_checkpoint(directory, mesh)
        assert (
            "q_norm" in str(info.value) or "bias" in str(info.value) or "shape" in str(info.value)
        )
    assert "model.layers.0.self_attn.q_norm.weight" in weights


def test_gpt_oss_sinks_windows_and_experts_served_from_the_cache(tmp_path):
    """gpt-oss: sinks, biases, alternating windows, a mixture of experts. The dense path and the
    paged path (kvshard.attention(..., sinks=)) both match the float64 oracle."""
    cfg = {
        **SMALL,
        "model_type": "gpt_oss",
        "head_dim": 16,
        "sliding_window": 4,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "tie_word_embeddings": False,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_theta": 10_000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0},  # the oracle's rope
    }
    weights = write_checkpoint(tmp_path, cfg, dtype="float32")
    model = models.load_checkpoint(tmp_path, make_mesh(1, 2))
    arch = model.arch
    assert arch.sinks and arch.moe and arch.qkv_bias and arch.o_bias
    assert [layer.window for layer in arch.layers] == [4, None]
    requests = [models.Request(i, [*p, 1, 2], 0) for i, p in enumerate(PROMPTS)]
    for r, dense in zip(requests, models.dense_logits(model, requests), strict=True):
        ref = reference_forward(cfg, weights, r.tokens)[:-1]
        assert np.abs(dense - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    # The sinks matter: without them the oracle differs.
    no_sinks = {k: v for k, v in weights.items() if not k.endswith("sinks")}
    assert (
        np.abs(
            reference_forward(cfg, no_sinks, PROMPTS[0])
            - reference_forward(cfg, weights, PROMPTS[0])
        ).max()
        > 1e-2
    )
    # Served from the cache, sinks through kvshard.attention(..., sinks=): the float64 oracle.
    assert models.model.ATTENTION_TAKES_SINKS
    served_model, served, *_ = serve(tmp_path, make_mesh(1, 2))
    check_served(served_model, served, {**cfg, "_weights": weights})


def test_zero_new_tokens_returns_the_prompt_rows_only(tmp_path):
    cfg = llama32_config(**SMALL, head_dim=16, tie_word_embeddings=True)
    weights = write_checkpoint(tmp_path, cfg, dtype="float32")
    mesh = make_mesh(1, 1)
    model = models.load_checkpoint(tmp_path, mesh)
    requests = [models.Request(0, [5], 0), models.Request(1, [5, 6, 7], 0)]
    spec = kvshard.CacheSpec(2, 2, 16, page_size=4, num_pages=8, dtype="float32")
    models.serve(model, spec, mesh, requests, max_seqs=2, budget=16)
    assert [r.tokens for r in requests] == [[5], [5, 6, 7]]
    assert [len(r.logits) for r in requests] == [0, 2]
    ref = reference_forward(cfg, weights, [5, 6, 7])[:2]
    assert np.abs(np.stack(requests[1].logits) - ref).max() <= 1e-4 * max(1, np.abs(ref).max())
    # The step users run: one jitted forward that consumes (donates) the cache it is given.
    alloc = kvshard.PageAllocator(8, 4, max_requests=2, max_pages_per_request=2)
    alloc.allocate_batch([0], [3])
    step = kvshard.stack_steps([kvshard.build_step(alloc, [0], [3], num_tokens_padded=16)])
    cache = kvshard.init_cache(spec, mesh, page_axis="data")
    tokens = np.zeros((1, 16), np.int32)
    tokens[0, :3] = [5, 6, 7]
    logits, new_cache = models.serve_step(model, cache, tokens, step)
    assert cache.kv.is_deleted() and not new_cache.kv.is_deleted()
    np.testing.assert_allclose(
        np.asarray(logits)[0, :2], ref, atol=1e-4 * max(1, np.abs(ref).max())
    )


# -- layer groups: a mixed model served from one pool of KV-cache groups ---------------------

# Long enough that a window of 4 (one page of 4) leaves most of each prompt behind.
LONG_PROMPTS = [list(range(1, 33)), list(range(50, 70)), [7, 9, 11]]
GEMMA3 = {  # five local layers per global one (sliding_window_pattern 6, the config default)
    **SMALL,
    "model_type": "gemma3_text",
    "num_hidden_layers": 6,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,
    "sliding_window": 4,
    "rope_local_base_freq": 10_000.0,
}


def served_grouped_and_all_full(directory, mesh):
    """The same checkpoint served from its layer groups and from an all-full cache (page size
    4, 8 tokens a step, 2 requests at once): the grouped run passes the dense check, the
    all-full one serves the same tokens and logits."""
    runs, model = [], None
    for grouped in (True, False):
        model, requests, spec, peak = serve(
            directory, mesh, budget=8, grouped=grouped, prompts=LONG_PROMPTS, model=model
        )
        runs.append((requests, spec, peak))
    (grouped_requests, grouped, grouped_peak), (full_requests, full, full_peak) = runs
    check_served(model, grouped_requests, prompts=LONG_PROMPTS)
    for a, b in zip(grouped_requests, full_requests, strict=True):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(np.stack(a.logits), np.stack(b.logits), atol=1e-4)
    assert full.num_cache_layers == full.num_layers and full.num_groups == 1
    # The full-attention group holds what the all-full pool holds; a sliding group holds at
    # most the pages of 4 + 8 - 1 = 11 consecutive positions, 4 pages of 4, per request.
    sliding_groups = sum(t[0] == "sliding" for t in grouped.groups.group_types)
    full_groups = grouped.num_groups - sliding_groups
    assert grouped_peak <= full_groups * full_peak + sliding_groups * 2 * 4
    return grouped, grouped_peak, full, full_peak


@pytest.mark.extended  # slow: .ci/run's extended step
def test_gemma3_shaped_checkpoint_is_served_from_layer_groups(tmp_path):
    """5 local : 1 global layers: six groups of one cache layer; the local groups release
    out-of-window pages, so the peak holds far fewer layer-pages than every layer full."""
    write_checkpoint(tmp_path, GEMMA3, dtype="float32")
    grouped, grouped_peak, full, full_peak = served_grouped_and_all_full(tmp_path, make_mesh(1, 2))
    assert grouped.layer_types == (("sliding", 4),) * 5 + (("full",),)
    assert (grouped.num_cache_layers, grouped.num_groups) == (1, 6)
    # Layer-pages (page ids x cache layers each) at the peak: under half of all-full's.
    assert grouped_peak * grouped.num_cache_layers * 2 < full_peak * full.num_cache_layers


def test_pool_sized_per_group():
    """Per request: 11 pages of 4 for 44 tokens in the full group; a window of 4 with chunks
    of 8 spans at most 11 positions, 4 pages, in each of the five sliding groups."""
    arch = models.read_architecture({**GEMMA3, "torch_dtype": "float32"})
    spec = models.cache_spec(arch, page_size=4, longest=44, max_seqs=2, budget=8)
    assert models.pages_per_request(spec, 44, 8) == 11 + 5 * 4
    assert spec.num_pages == 1 + 2 * (11 + 5 * 4)
    full = models.cache_spec(arch, page_size=4, longest=44, max_seqs=2, budget=8, grouped=False)
    assert (full.layer_types, full.num_pages) == (None, 1 + 2 * 11)
    # A window longer than the request: the sliding groups hold the whole request.
    assert models.pages_per_request(spec, 6, 8) == 2 * 6


def test_serve_refuses_a_spec_whose_layer_types_are_not_the_models(tmp_path):
    write_checkpoint(tmp_path, GEMMA3, dtype="float32")
    mesh = make_mesh(1, 1)
    model = models.load_checkpoint(tmp_path, mesh)
    spec = models.cache_spec(
        model.arch.with_window(5), page_size=4, longest=8, max_seqs=1, budget=8
    )
    requests = [models.Request(0, [1, 2, 3], 2)]
    with pytest.raises(ValueError, match=r"spec.layer_types=.*'sliding', 5.*differ"):
        models.serve(model, spec, mesh, requests, max_seqs=1, budget=8)
    assert (requests[0].tokens, requests[0].computed, requests[0].logits) == ([1, 2, 3], 0, [])
