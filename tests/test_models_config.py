"""kvshard.models.config and .rope: what each architecture's config.json turns into."""

from __future__ import annotations

import math

import _hf_configs as hf_configs
import numpy as np
import pytest

import kvshard
from kvshard import ConfigError, models
from kvshard.models import read_architecture
from kvshard.models.rope import inv_freq

BASE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 6,
    "vocab_size": 100,
    "max_position_embeddings": 4096,
}


def windows(cfg: dict) -> list[int | None]:
    return [layer.window for layer in read_architecture(cfg).layers]


def test_llama_defaults_and_dtype_keys():
    arch = read_architecture({**BASE, "model_type": "llama", "torch_dtype": "bfloat16"})
    # An absent tie_word_embeddings means what transformers' LlamaConfig defaults to: untied
    # (load_checkpoint decides it from the checkpoint's tensors instead).
    assert not arch.tie_word_embeddings and arch.dtype == "bfloat16" and arch.head_dim == 16
    assert not (arch.qkv_bias or arch.o_bias or arch.mlp_bias or arch.qk_norm)
    tied = read_architecture({**BASE, "model_type": "llama", "tie_word_embeddings": True})
    assert tied.tie_word_embeddings and tied.dtype == "float32"  # no dtype: float32
    assert read_architecture({**BASE, "model_type": "llama", "dtype": "float16"}).dtype == "float16"
    biased = read_architecture({**BASE, "model_type": "llama", "attention_bias": True})
    assert biased.qkv_bias and biased.o_bias and biased.sm_scale == 16**-0.5


def test_per_layer_windows_as_transformers_derives_them():
    assert windows({**BASE, "model_type": "mistral", "sliding_window": 8}) == [8] * 6
    assert windows({**BASE, "model_type": "mistral", "sliding_window": None}) == [None] * 6
    qwen = {**BASE, "model_type": "qwen2", "sliding_window": 8, "max_window_layers": 4}
    assert windows(qwen) == [None] * 6  # use_sliding_window absent: no window at all
    assert windows({**qwen, "use_sliding_window": True}) == [None] * 4 + [8] * 2
    assert windows({**BASE, "model_type": "gemma2", "sliding_window": 8}) == [8, None] * 3
    assert windows({**BASE, "model_type": "gemma3_text", "sliding_window": 8}) == [8] * 5 + [None]
    explicit = ["full_attention", "sliding_attention"] * 3
    assert windows({**qwen, "layer_types": explicit, "use_sliding_window": True}) == [None, 8] * 3


def test_gemma_specifics_and_defaults():
    g2 = read_architecture({**BASE, "model_type": "gemma2", "head_dim": 32})
    assert (g2.attn_soft_cap, g2.final_soft_cap) == (50.0, 30.0)
    assert g2.sm_scale == 256**-0.5 and g2.embed_scale == 8.0 and g2.norm_offset == 1.0
    assert g2.activation == "gelu_tanh" and g2.sandwich_norms and g2.tie_word_embeddings
    g3 = read_architecture(
        {
            **BASE,
            "model_type": "gemma3_text",
            "query_pre_attn_scalar": 32,
            "rope_theta": 1e6,
            "rope_local_base_freq": 1e4,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        }
    )
    assert g3.qk_norm and g3.attn_soft_cap is None and g3.sm_scale == 32**-0.5
    local, glob = g3.layers[0].rope, g3.layers[5].rope
    assert (local.theta, local.kind) == (1e4, "default")
    assert (glob.theta, glob.kind, glob.get("factor")) == (1e6, "linear", 8.0)


def test_transformers_5_rope_parameters():
    per_type = {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    }
    g3 = read_architecture({**BASE, "model_type": "gemma3_text", "rope_parameters": per_type})
    assert g3.layers[0].rope.theta == 1e4 and g3.layers[5].rope.kind == "linear"
    llama = read_architecture(
        {
            **BASE,
            "model_type": "llama",
            "rope_parameters": {
                "rope_type": "llama3",
                "factor": 32.0,
                "rope_theta": 5e5,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        }
    )
    assert llama.layers[0].rope.kind == "llama3" and llama.layers[0].rope.theta == 5e5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "falcon"}, "model_type='falcon' is not one of"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
        ({"torch_dtype": "int8"}, "dtype='int8'"),
        ({"hidden_act": "relu"}, "activation 'relu'"),
        (
            {"layer_types": ["chunked_attention"] * 6, "attention_chunk_size": 8},
            "layer 0 has layer type 'chunked_attention'",
        ),
        ({"head_dim": 0}, "head_dim=0 must be a positive integer"),
        ({"vocab_size": None}, "vocab_size=None must be a positive integer"),
        ({"num_hidden_layers": 0}, "num_hidden_layers=0 must be a positive integer"),
    ],
)
def test_unreadable_configs_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        read_architecture({**BASE, "model_type": "llama", **change})


def test_rope_frequency_variants():
    from kvshard.models.config import RopeSpec

    plain, _ = inv_freq(RopeSpec(10_000.0), 64)
    np.testing.assert_allclose(plain, [10_000.0 ** (-i / 32) for i in range(32)], rtol=1e-6)
    linear, scale = inv_freq(RopeSpec(10_000.0, "linear", (("factor", 4.0),)), 64)
    np.testing.assert_allclose(linear, plain / 4, rtol=1e-6)
    assert scale == 1.0
    params = (
        ("factor", 32.0),
        ("high_freq_factor", 4.0),
        ("low_freq_factor", 1.0),
        ("original_max_position_embeddings", 8192),
    )
    llama3, _ = inv_freq(RopeSpec(500_000.0, "llama3", params), 64)
    base, _ = inv_freq(RopeSpec(500_000.0), 64)
    wavelen = 2 * math.pi / base
    high, low = wavelen < 8192 / 4, wavelen > 8192
    np.testing.assert_allclose(llama3[high], base[high], rtol=1e-6)  # short waves kept
    np.testing.assert_allclose(llama3[low], base[low] / 32, rtol=1e-6)  # long ones / factor
    between = ~high & ~low
    assert between.any() and np.all(
        (llama3[between] < base[between]) & (llama3[between] > base[between] / 32)
    )
    # yarn: the highest frequency extrapolates, the lowest interpolates, cos/sin scaled by
    # 0.1 ln(factor) + 1.
    yarn, scale = inv_freq(
        RopeSpec(150_000.0, "yarn", (("factor", 32.0), ("original_max_position_embeddings", 4096))),
        64,
    )
    plain150, _ = inv_freq(RopeSpec(150_000.0), 64)
    assert yarn[0] == pytest.approx(plain150[0]) and yarn[-1] == pytest.approx(plain150[-1] / 32)
    assert scale == pytest.approx(0.1 * math.log(32) + 1)


def test_gpt_oss_defaults_to_transformers_yarn():
    arch = read_architecture({**BASE, "model_type": "gpt_oss", "num_local_experts": 4})
    rope = arch.layers[0].rope
    assert (rope.kind, rope.theta, rope.get("factor"), rope.get("truncate")) == (
        "yarn",
        150_000.0,
        32.0,
        False,
    )
    assert arch.moe and arch.experts_per_token == 4 and not arch.tie_word_embeddings
    assert [layer.window for layer in arch.layers] == [None] * 6  # no sliding_window given


@pytest.mark.parametrize("family", hf_configs.FAMILIES)
def test_transformers_4_and_5_configs_read_alike_and_as_the_planner_reads_them(family, tmp_path):
    """Each family's config.json as transformers 4.57 and 5.25 write it: the same model, and
    the cache the template serves is the one CacheSpec.from_config (the planner's reader)
    sizes."""
    v4, v5 = (read_architecture(hf_configs.config(v, family)) for v in hf_configs.VERSIONS)
    assert v4 == v5
    for version in hf_configs.VERSIONS:
        directory = tmp_path / version
        directory.mkdir()
        (directory / "config.json").write_text(hf_configs.CONFIG_JSON[version, family])
        arch = read_architecture(directory)
        assert arch == v4
        geometry = kvshard.read_model_config(directory)
        assert (arch.num_layers, arch.num_kv_heads, arch.head_dim, arch.dtype) == (
            geometry.num_layers,
            geometry.num_kv_heads,
            geometry.head_dim,
            geometry.dtype,
        )
        assert arch.layer_types == geometry.layer_types
        spec = models.cache_spec(arch, page_size=16, longest=100, max_seqs=2, budget=32)
        planned = kvshard.CacheSpec.from_config(directory, page_size=16, num_pages=spec.num_pages)
        assert spec == planned


def test_mistral_head_dim_null_and_family_specifics_of_written_configs():
    mistral = hf_configs.config("4.57.6", "mistral")
    assert mistral["head_dim"] is None  # what transformers 4.x writes for every MistralConfig
    arch = read_architecture(mistral)
    assert arch.head_dim == 16 and arch.sm_scale == 16**-0.5 and arch.uniform_window is None
    assert read_architecture(hf_configs.config("4.57.6", "mistral_7b")).uniform_window == 4096
    llama = read_architecture(hf_configs.config("5.25.0", "llama3"))
    assert (llama.layers[0].rope.kind, llama.layers[0].rope.theta) == ("llama3", 500_000.0)
    gemma3 = read_architecture(hf_configs.config("4.57.6", "gemma3_text"))
    assert [layer.rope.theta for layer in gemma3.layers] == [1e4] * 5 + [1e6]
    assert gemma3.attn_soft_cap is None and gemma3.final_soft_cap is None  # written null
    gemma = read_architecture(hf_configs.config("4.57.6", "gemma"))
    assert gemma.activation == "gelu_tanh" and gemma.tie_word_embeddings  # hidden_activation null
    gpt_oss = read_architecture(hf_configs.config("4.57.6", "gpt_oss"))
    assert (gpt_oss.num_experts, gpt_oss.layers[0].rope.kind, gpt_oss.swiglu_limit) == (
        4,
        "yarn",
        7.0,
    )
