"""Model configs: CacheSpec.from_config and read_model_config on Hugging Face config.json shapes.

Pure Python (no JAX): the planner's path.
"""

from __future__ import annotations

import json

import pytest

import kvshard
from kvshard._config import PRESETS, preset_config

LLAMA = {
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "torch_dtype": "bfloat16",
}


def test_from_config_dict_path_and_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    expected = kvshard.CacheSpec(32, 8, 128, page_size=16, num_pages=100, dtype="bfloat16")
    for source in (LLAMA, tmp_path / "config.json", str(tmp_path / "config.json"), tmp_path):
        assert kvshard.CacheSpec.from_config(source, page_size=16, num_pages=100) == expected


def test_from_config_dtype_overrides_torch_dtype():
    spec = kvshard.CacheSpec.from_config(LLAMA, page_size=16, num_pages=4, dtype="float32")
    assert spec.dtype == "float32"


def test_from_config_without_torch_dtype_needs_a_dtype():
    config = {k: v for k, v in LLAMA.items() if k != "torch_dtype"}
    with pytest.raises(kvshard.ConfigError, match="torch_dtype is missing; pass dtype="):
        kvshard.CacheSpec.from_config(config, page_size=16, num_pages=4)
    spec = kvshard.CacheSpec.from_config(config, page_size=16, num_pages=4, dtype="float16")
    assert spec.dtype == "float16"


def test_from_config_checks_the_spec_arguments():
    with pytest.raises(ValueError, match=r"CacheSpec\.page_size=0"):
        kvshard.CacheSpec.from_config(LLAMA, page_size=0, num_pages=4)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({}, (32, 8, 128, "bfloat16")),
        ({"num_key_value_heads": None}, (32, 32, 128, "bfloat16")),  # multi-head attention
        ({"head_dim": 96}, (32, 8, 96, "bfloat16")),  # explicit head_dim wins (Mistral Nemo)
        ({"torch_dtype": None, "dtype": "float16"}, (32, 8, 128, "float16")),  # newer configs
        ({"torch_dtype": "torch.float32"}, (32, 8, 128, "float32")),
        ({"torch_dtype": "auto"}, (32, 8, 128, None)),
    ],
)
def test_read_model_config_fields(change, expected):
    config = {k: v for k, v in {**LLAMA, **change}.items() if v is not None}
    g = kvshard.read_model_config(config)
    assert (g.num_layers, g.num_kv_heads, g.head_dim, g.dtype) == expected


def test_query_heads_are_read_when_present():
    assert kvshard.read_model_config(LLAMA).num_q_heads == 32
    # Without num_attention_heads (head_dim and KV heads given) they are unknown, not guessed.
    config = {k: v for k, v in LLAMA.items() if k != "num_attention_heads"}
    config["head_dim"] = 128
    assert kvshard.read_model_config(config).num_q_heads is None
    with pytest.raises(kvshard.ConfigError, match="num_attention_heads=0 must be a positive"):
        kvshard.read_model_config({**LLAMA, "num_attention_heads": 0, "head_dim": 128})


def test_text_config_of_a_multimodal_model():
    g = kvshard.read_model_config({"model_type": "llava", "text_config": LLAMA})
    assert (g.num_layers, g.num_kv_heads, g.head_dim) == (32, 8, 128)


@pytest.mark.parametrize(
    ("window_fields", "window", "note"),
    [
        ({"sliding_window": 4096}, 4096, None),  # Mistral v0.1
        ({"sliding_window": None}, None, None),  # Mistral v0.3
        ({"sliding_window": 4096, "use_sliding_window": False}, None, None),  # Qwen2
        (
            {"sliding_window": 4096, "use_sliding_window": True, "max_window_layers": 28},
            None,
            "sliding_window 4096 on 4 of 32 layers",
        ),
        (
            {"sliding_window": 4096, "use_sliding_window": True, "max_window_layers": 0},
            4096,
            None,
        ),
        ({"sliding_window": 1024, "sliding_window_pattern": 4}, None, "on 24 of 32 layers"),
        ({"sliding_window": 4096, "model_type": "gemma2"}, None, "on 16 of 32 layers"),
        ({"sliding_window": 512, "layer_types": ["sliding_attention"] * 32}, 512, None),
        ({"sliding_window": 512, "layer_types": ["full_attention"] * 32}, None, None),
    ],
)
def test_sliding_window_applies_only_to_every_layer(window_fields, window, note):
    g = kvshard.read_model_config({**LLAMA, **window_fields})
    assert g.sliding_window == window
    if note is None:
        assert g.window_note is None
    else:
        assert note in g.window_note and "no page can be released" in g.window_note


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({**LLAMA, "kv_lora_rank": 512}, "config: kv_lora_rank=512: multi-head latent attention"),
        ({**LLAMA, "num_hidden_layers": True}, "num_hidden_layers=True must be a positive"),
        ({**LLAMA, "num_hidden_layers": 32.0}, "num_hidden_layers=32.0 must be a positive"),
        (
            {"num_hidden_layers": 2, "hidden_size": 64},
            "num_key_value_heads is missing (and no num_attention_heads to fall back on)",
        ),
        (
            {"num_hidden_layers": 2, "num_key_value_heads": 2, "num_attention_heads": 4},
            "head_dim is missing and so is hidden_size",
        ),
        ({"_name_or_path": "org/model"}, "org/model: num_hidden_layers is missing"),
    ],
)
def test_bad_configs_name_the_field(config, message):
    with pytest.raises(kvshard.ConfigError) as info:
        kvshard.read_model_config(config)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_presets_are_shipped_configs():
    for name in PRESETS:
        config = preset_config(name)
        assert config["architectures"] and config["torch_dtype"] == "bfloat16"
        assert kvshard.read_model_config(config).name == config["_name_or_path"]
    with pytest.raises(kvshard.ConfigError, match="unknown model 'gpt'"):
        preset_config("gpt")
