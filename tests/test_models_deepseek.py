"""DeepSeek-V3 in kvshard.models: its config read as transformers writes it, and its pieces
(YaRN frequencies and softmax scale, group-limited routing, the routed MoE, latent attention
in the absorbed form) against float64 NumPy written from DeepSeek's reference code and
transformers' DeepseekV3 modules (expanded per-head keys and values, token-by-token routing).

The whole model against transformers' own DeepseekV3ForCausalLM runs outside the repository
(torch); here nothing needs torch.
"""

from __future__ import annotations

import math

import _hf_configs as hf_configs
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvshard import ConfigError
from kvshard.models import read_architecture
from kvshard.models.deepseek import MLAttention, RoutedMoE, route
from kvshard.models.rope import inv_freq

NO_Q_LORA = hf_configs.MLA_NO_Q_LORA  # 8 routed experts in 4 groups, 3 layers


def _arch(family: str = NO_Q_LORA, **change):
    cfg = {**hf_configs.config("5.25.0", family), "dtype": "float32", **change}
    return read_architecture(cfg)


@pytest.mark.parametrize("family", [*hf_configs.MLA_FAMILIES, NO_Q_LORA])
def test_transformers_4_and_5_configs_read_alike(family):
    v4, v5 = (read_architecture(hf_configs.config(v, family)) for v in hf_configs.VERSIONS)
    assert v4 == v5
    q_lora = family != NO_Q_LORA
    assert v5.model_type == ("kimi_k2" if family == "kimi_k2" else "deepseek_v3")
    assert v5.dtype == "bfloat16" and not v5.tie_word_embeddings and not v5.moe
    assert (v5.num_layers, v5.num_heads, v5.hidden_size, v5.vocab_size) == (
        6 if q_lora else 3,
        4,
        64,
        128,
    )
    assert v5.num_kv_heads == 4  # every query head reads the one latent (config's KV heads unused)
    assert v5.head_dim == 16 + 8
    mla = v5.mla
    assert mla is not None and mla.latent_dim == 32 + 8
    assert (mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim) == (
        32,
        16,
        8,
        16,
    )
    assert mla.q_lora_rank == (48 if q_lora else None)
    assert mla.rope_interleave  # DeepseekV3Config's default, written out
    moe = v5.routed_moe
    assert moe is not None
    assert (moe.num_experts, moe.num_groups, moe.topk_groups) == (
        (4, 2, 1) if q_lora else (8, 4, 2)
    )
    assert (moe.experts_per_token, moe.intermediate_size, moe.num_shared_experts) == (2, 32, 1)
    assert moe.first_dense_layers == 1 and moe.routed_scaling_factor == 2.5 and moe.norm_topk_prob
    assert [moe.is_moe(i) for i in range(3)] == [False, True, True]
    rope = v5.layers[0].rope
    if q_lora:  # DeepSeek-V3's yarn: mscale_all_dim also scales the softmax
        assert (rope.kind, rope.theta, rope.get("factor")) == ("yarn", 10_000.0, 40.0)
        assert rope.get("original_max_position_embeddings") == 4096
        assert v5.sm_scale == pytest.approx(24**-0.5 * (0.1 * math.log(40) + 1) ** 2)
    else:
        assert rope.kind == "default" and v5.sm_scale == pytest.approx(24**-0.5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_routed_experts": 6}, "n_routed_experts=6 is not a multiple of n_group=4"),
        ({"topk_group": 5}, "topk_group=5 exceeds n_group=4"),
        ({"num_experts_per_tok": 5}, "num_experts_per_tok=5 exceeds the 4 experts of topk_group=2"),
        ({"first_k_dense_replace": -1}, "first_k_dense_replace=-1 must be an integer >= 0"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim=7 must be even"),
        ({"kv_lora_rank": 0}, "kv_lora_rank=0 must be a positive integer"),
        ({"q_lora_rank": 0}, "q_lora_rank=0 must be a positive integer"),
        ({"scoring_func": "softmax"}, "scoring_func='softmax': DeepSeek-V3's architecture is"),
        ({"topk_method": "greedy"}, "topk_method='greedy'"),
        ({"moe_layer_freq": 2}, "moe_layer_freq=2"),
    ],
)
def test_bad_deepseek_configs_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        _arch(**change)


@pytest.mark.parametrize("preset", ["deepseek-v3", "kimi-k2"])
def test_the_shipped_presets_read_as_the_published_models(preset):
    from kvshard._geometry.hf_config import preset_config, read_model_config

    cfg = preset_config(preset)
    arch = read_architecture(cfg)
    geometry = read_model_config(cfg)
    mla, moe = arch.mla, arch.routed_moe
    assert mla is not None and moe is not None
    # The template's cache row is the planner's: one latent of 512 + 64 values per token.
    assert (geometry.num_kv_heads, geometry.head_dim) == (1, mla.latent_dim) == (1, 576)
    assert geometry.kv_lora_rank == mla.kv_lora_rank == 512 and mla.q_lora_rank == 1536
    assert arch.num_layers == 61 and arch.head_dim == 192 and arch.dtype == "bfloat16"
    rope = arch.layers[0].rope
    factor = 40 if preset == "deepseek-v3" else 32
    assert rope.kind == "yarn" and rope.get("factor") == factor
    assert arch.sm_scale == pytest.approx(192**-0.5 * (0.1 * math.log(factor) + 1) ** 2)
    experts, groups, dense = (256, 8, 3) if preset == "deepseek-v3" else (384, 1, 1)
    assert (moe.num_experts, moe.num_groups, moe.first_dense_layers) == (experts, groups, dense)


def _reference_yarn(dim, base, factor, original, beta_fast, beta_slow, mscale, mscale_all_dim):
    """DeepSeek-V3's reference yarn (inference/model.py and DeepseekV3YarnRotaryEmbedding):
    (inverse frequencies, cos/sin scale, softmax scale factor)."""

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extra = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    inter = extra / factor
    mask = 1.0 - ramp
    freq = inter * (1 - mask) + extra * mask

    def get_mscale(m):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    return freq, get_mscale(mscale) / get_mscale(mscale_all_dim), get_mscale(mscale_all_dim) ** 2


@pytest.mark.parametrize(("mscale", "mscale_all_dim"), [(1.0, 1.0), (0.707, 0.707), (1.0, 0.5)])
def test_yarn_frequencies_and_softmax_scale_match_deepseeks_reference(mscale, mscale_all_dim):
    rope = {
        "rope_type": "yarn",
        "rope_theta": 10_000.0,
        "factor": 40.0,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": mscale,
        "mscale_all_dim": mscale_all_dim,
        "original_max_position_embeddings": 4096,
    }
    arch = _arch(rope_parameters=rope, qk_rope_head_dim=64)
    freq, scale = inv_freq(arch.layers[0].rope, 64)
    want, want_scale, softmax_factor = _reference_yarn(
        64, 1e4, 40.0, 4096, 32, 1, mscale, mscale_all_dim
    )
    np.testing.assert_allclose(freq, want, rtol=1e-6)
    assert not np.allclose(freq, 1e4 ** (-np.arange(0, 64, 2) / 64))  # scaling happened
    assert scale == pytest.approx(want_scale)
    assert arch.sm_scale == pytest.approx((16 + 64) ** -0.5 * softmax_factor)


def _reference_route(scores, bias, E, groups, topk_groups, k, norm, scale):
    """DeepseekV3TopkRouter, token by token, in float64."""
    out = np.zeros_like(scores)
    for t, s in enumerate(scores):
        biased = s + bias
        per_group = biased.reshape(groups, E // groups)
        group_scores = np.sort(per_group, axis=-1)[:, -2:].sum(-1)
        keep = np.argsort(-group_scores)[:topk_groups]
        masked = np.full(E, -np.inf)
        for g in keep:
            group = slice(g * (E // groups), (g + 1) * (E // groups))
            masked[group] = biased[group]
        chosen = np.argsort(-masked)[:k]
        w = s[chosen]
        if norm:
            w = w / (w.sum() + 1e-20)
        out[t, chosen] = w * scale
    return out


@pytest.mark.parametrize("norm", [True, False])
def test_group_limited_routing_matches_the_reference(norm):
    import dataclasses

    spec = dataclasses.replace(_arch().routed_moe, norm_topk_prob=norm)
    rng = np.random.default_rng(0)
    scores = 1 / (1 + np.exp(-rng.normal(size=(64, 8))))
    bias = rng.normal(size=8) * 0.3
    got = np.asarray(route(jnp.asarray(scores, jnp.float32), jnp.asarray(bias, jnp.float32), spec))
    want = _reference_route(scores, bias, 8, 4, 2, 2, norm, 2.5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all((got > 0).sum(-1) == 2)
    # The group limit and the bias both matter on these tokens: without them the choice differs.
    unlimited = _reference_route(scores, bias, 8, 1, 1, 2, norm, 2.5)
    unbiased = _reference_route(scores, 0 * bias, 8, 4, 2, 2, norm, 2.5)
    assert not np.array_equal(want > 0, unlimited > 0) and not np.array_equal(
        want > 0, unbiased > 0
    )


def _silu(x):
    return x / (1 + np.exp(-x))


@pytest.mark.extended  # builds and runs flax modules op by op: seconds on 2 cores
def test_routed_moe_matches_the_reference():
    arch = _arch()
    moe = RoutedMoE(arch, nnx.Rngs(0))
    x = np.random.default_rng(1).normal(size=(1, 5, 64)).astype(np.float32)
    got = np.asarray(moe(jnp.asarray(x)))
    f64 = lambda a: np.asarray(a[...], np.float64)
    w = f64(moe.gate.weight)
    xs = x[0].astype(np.float64)
    weights = _reference_route(
        1 / (1 + np.exp(-(xs @ w.T))), f64(moe.gate.e_score_correction_bias), 8, 4, 2, 2, True, 2.5
    )

    def mlp(m, h):
        return (_silu(h @ f64(m.gate_proj.kernel)) * (h @ f64(m.up_proj.kernel))) @ f64(
            m.down_proj.kernel
        )

    want = mlp(moe.shared_experts, xs)
    for e, expert in enumerate(moe.experts):
        want += weights[:, e : e + 1] * mlp(expert, xs)
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)


def _build(arch):
    return MLAttention(arch, 0, nnx.Rngs(0))


def _attend(attn, x, positions):
    return attn(x, positions, None, None)[0][0]


@pytest.mark.extended  # builds and runs flax modules op by op: seconds on 2 cores
@pytest.mark.parametrize("family", ["deepseek_v3", NO_Q_LORA])
def test_absorbed_latent_attention_matches_expanded_keys_and_values(family):
    """MLAttention's dense path (absorbed, in latent space) against DeepseekV3Attention's
    arithmetic: per-head keys [k_nope, k_rope] and values from kv_b_proj, interleaved rope."""
    arch = _arch(family)
    attn = _build(arch)
    T = 7
    x = np.random.default_rng(2).normal(size=(1, T, 64)).astype(np.float32)
    positions = jnp.arange(T, dtype=jnp.int32)[None]
    got = np.asarray(_attend(attn, jnp.asarray(x), positions))

    f64 = lambda a: np.asarray(a[...], np.float64)
    lin = lambda m, h: h @ f64(m.kernel) + (f64(m.bias) if m.bias is not None else 0)

    def norm(m, h):
        return h / np.sqrt(np.mean(h * h, -1, keepdims=True) + 1e-6) * f64(m.scale)

    xs, mla, H = x[0].astype(np.float64), arch.mla, 4
    if mla.q_lora_rank is None:
        q = lin(attn.q_proj, xs)
    else:
        q = lin(attn.q_b_proj, norm(attn.q_a_layernorm, lin(attn.q_a_proj, xs)))
    q = q.reshape(T, H, 24)
    kv = lin(attn.kv_a_proj_with_mqa, xs)
    c, k_rot = norm(attn.kv_a_layernorm, kv[:, :32]), kv[:, 32:]
    freq, mscale = inv_freq(arch.layers[0].rope, 8)
    angles = np.arange(T)[:, None] * np.asarray(freq, np.float64)
    cos, sin = np.cos(angles) * mscale, np.sin(angles) * mscale

    def rope_interleaved(v):  # apply_rotary_pos_emb_interleave, v [T, ..., 8]
        a, b = v[..., 0::2], v[..., 1::2]
        shape = (T,) + (1,) * (v.ndim - 2) + (4,)
        cs, sn = cos.reshape(shape), sin.reshape(shape)
        return np.concatenate([a * cs - b * sn, b * cs + a * sn], -1)

    q = np.concatenate([q[..., :16], rope_interleaved(q[..., 16:])], -1)
    kvb = (c @ f64(attn.kv_b_proj.kernel)).reshape(T, H, 32)
    k = np.concatenate(
        [kvb[..., :16], np.broadcast_to(rope_interleaved(k_rot)[:, None], (T, H, 8))], -1
    )
    v = kvb[..., 16:]
    s = np.einsum("thd,shd->hts", q, k) * arch.sm_scale
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = lin(attn.o_proj, np.einsum("hts,shd->thd", p, v).reshape(T, H * 16))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # The rope layout matters: reading the rotary dims as halves gives another answer.
    wrong = _build(_arch(family, rope_interleave=False))
    other = np.asarray(_attend(wrong, jnp.asarray(x), positions))
    assert np.max(np.abs(other - want)) > 1e-3


@pytest.mark.extended  # loads and serves a checkpoint: seconds on 2 cores
def test_a_deepseek_checkpoint_is_served_from_a_replicated_latent_cache(tmp_path):
    """A float32 checkpoint with DeepSeek-V3's tensor names (experts one by one, a
    multi-token-prediction layer past num_hidden_layers, which is skipped) served on a 1x2 mesh
    through chunked prefill and decode: the cache is one latent row per token, the heads'
    projections are split over the model axis and every served logit matches the dense run."""
    from _hf_checkpoints import deepseek_shapes, write_checkpoint
    from test_models_serving import check_served, make_mesh, serve

    from kvshard.models import load_checkpoint

    cfg = hf_configs.config("5.25.0", "deepseek_v3")
    cfg = {**cfg, "num_hidden_layers": 2, "vocab_size": 128}
    write_checkpoint(tmp_path, cfg, dtype="float32", shapes=deepseek_shapes(cfg, layers=3))
    mesh = make_mesh(1, 2)
    model = load_checkpoint(tmp_path, mesh)
    model, requests, spec, _ = serve(tmp_path, mesh, page_size=4, budget=8, model=model)
    assert (spec.kv_layout, spec.num_kv_heads, spec.head_dim, spec.kv_lora_rank) == (
        "latent",
        1,
        40,
        32,
    )
    attn, moe = model.model.layers[1].self_attn, model.model.layers[1].mlp
    split = lambda p: (
        tuple(p[...].sharding.spec) + (None,) * (p[...].ndim - len(p[...].sharding.spec))
    )
    assert split(attn.q_b_proj.kernel) == split(attn.kv_b_proj.kernel) == (None, "model")
    assert split(attn.o_proj.kernel) == ("model", None)
    assert attn.kv_a_proj_with_mqa.kernel[...].sharding.is_fully_replicated
    assert split(moe.experts[0].gate_proj.kernel) == (None, "model")
    assert moe.gate.weight[...].sharding.is_fully_replicated
    check_served(model, requests)
    # Reading the rope dims as halves (rope_interleave false) is another model: the dense
    # check of the served rows must then fail against it.
    import dataclasses

    from kvshard.models import dense_logits

    halves = dataclasses.replace(model.arch.mla, rope_interleave=False)
    for layer in model.model.layers:
        layer.self_attn.mla = halves
    other = dense_logits(model, requests)
    diffs = [np.abs(np.stack(r.logits) - o).max() for r, o in zip(requests, other, strict=True)]
    assert max(diffs) > 1e-2
