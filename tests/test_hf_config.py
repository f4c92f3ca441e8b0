"""Model configs: CacheSpec.from_config and read_model_config on Hugging Face config.json shapes.

Pure Python (no JAX): the planner's path.
"""

from __future__ import annotations

import json
import subprocess
import sys

import _hf_configs as hf_configs
import pytest

import kvshard
from kvshard._geometry.hf_config import PRESETS, preset_config

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
            "sliding_window 4096 on 4 of 32 layers, full attention on 28",
        ),
        (
            {"sliding_window": 4096, "use_sliding_window": True, "max_window_layers": 0},
            4096,
            None,
        ),
        (
            {"sliding_window": 1024, "sliding_window_pattern": 4},
            None,
            "sliding_window 1024 on 24 of 32 layers, full attention on 8",
        ),
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
        assert note in g.window_note and "layer_types has each layer's type" in g.window_note


# ------------------------------------------------------------------ per-layer attention types

FULL = ("full",)


def types_of(**fields):
    return kvshard.read_model_config({**LLAMA, **fields}).layer_types


def test_uniform_configs_give_one_type_per_layer():
    assert types_of() == (FULL,) * 32
    assert types_of(sliding_window=4096) == (("sliding", 4096),) * 32  # Mistral: every layer
    g = kvshard.read_model_config(LLAMA)
    assert g.layer_groups == {FULL: tuple(range(32))}


def test_layer_types_field_is_read_layer_by_layer():
    # gpt-oss: explicit, alternating sliding (window 128) and full, starting with sliding.
    names = ["sliding_attention", "full_attention"] * 16
    types = types_of(sliding_window=128, layer_types=names)
    assert types[:3] == (("sliding", 128), FULL, ("sliding", 128))
    g = kvshard.read_model_config({**LLAMA, "sliding_window": 128, "layer_types": names})
    assert g.layer_groups == {
        ("sliding", 128): tuple(range(0, 32, 2)),
        FULL: tuple(range(1, 32, 2)),
    }
    assert g.sliding_window is None
    # Without layer_types, transformers' GptOssConfig derives the same alternation.
    assert types_of(sliding_window=128, model_type="gpt_oss") == types


def test_gemma2_even_layers_are_local():
    # transformers' Gemma2Config: "sliding_attention" if (i + 1) % 2 else "full_attention".
    types = types_of(sliding_window=4096, model_type="gemma2")
    assert [t[0] for t in types[:4]] == ["sliding", "full", "sliding", "full"]


def test_gemma3_five_local_per_global_by_default_pattern_or_layer_types():
    # Gemma 3 27B: 62 layers, layer i global when (i + 1) % 6 == 0: i = 5, 11, ..., 59 (10
    # layers), the other 52 local with window 1024.
    text = {**LLAMA, "num_hidden_layers": 62, "model_type": "gemma3_text", "sliding_window": 1024}
    by_default = kvshard.read_model_config(text)
    assert by_default.layer_groups[FULL] == (5, 11, 17, 23, 29, 35, 41, 47, 53, 59)
    assert len(by_default.layer_groups[("sliding", 1024)]) == 52
    by_pattern = kvshard.read_model_config({**text, "sliding_window_pattern": 6})
    names = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(62)]
    by_names = kvshard.read_model_config({**text, "layer_types": names})
    assert by_default.layer_types == by_pattern.layer_types == by_names.layer_types
    # Cohere 2 defaults to a pattern of 4 (3 local per global).
    cohere = types_of(sliding_window=4096, model_type="cohere2")
    assert [t[0] for t in cohere[:4]] == ["sliding", "sliding", "sliding", "full"]


def test_gemma3_wrapper_reads_text_config_and_the_wrapper_dtype():
    config = preset_config("gemma-3-27b")
    assert "torch_dtype" not in config["text_config"]  # the published layout
    g = kvshard.read_model_config(config)
    assert (g.num_layers, g.num_kv_heads, g.head_dim, g.dtype) == (62, 16, 128, "bfloat16")
    assert g.name == "google/gemma-3-27b-it"
    assert g.window_note.startswith("sliding_window 1024 on 52 of 62 layers, full attention on 10")


@pytest.mark.parametrize(
    ("fields", "windowed"),
    [
        # transformers' Qwen2Config: layer i slides when use_sliding_window and
        # i >= max_window_layers; without use_sliding_window (default false) none does.
        ({"max_window_layers": 20, "use_sliding_window": True}, range(20, 32)),
        ({"max_window_layers": 20}, ()),
        ({"max_window_layers": 20, "use_sliding_window": False}, ()),
        ({"use_sliding_window": True}, range(28, 32)),  # max_window_layers defaults to 28
    ],
)
def test_qwen2_max_window_layers(fields, windowed):
    types = types_of(model_type="qwen2", sliding_window=4096, **fields)
    assert [i for i, t in enumerate(types) if t != FULL] == list(windowed)


def test_llama4_chunked_layers_from_no_rope_layers():
    # Llama4TextConfig: no_rope_layers[i] = 1 (RoPE) -> chunked attention, 0 (NoPE) -> full;
    # by default every 4th layer (i = 3, 7, ...) is NoPE.
    by_default = types_of(attention_chunk_size=8192)
    assert [i for i, t in enumerate(by_default) if t == FULL] == list(range(3, 32, 4))
    assert set(by_default) == {FULL, ("chunked", 8192)}
    assert types_of(attention_chunk_size=8192, no_rope_layers=[]) == by_default
    every_2nd = types_of(attention_chunk_size=8192, no_rope_layer_interval=2)
    assert [i for i, t in enumerate(every_2nd) if t == FULL] == list(range(1, 32, 2))
    explicit = types_of(attention_chunk_size=64, no_rope_layers=[1, 0] * 16)
    assert explicit[:2] == (("chunked", 64), FULL)
    names = ["chunked_attention", "full_attention"] * 16
    assert types_of(attention_chunk_size=64, layer_types=names) == explicit
    scout = kvshard.read_model_config(preset_config("llama-4-scout"))
    assert {t: len(ls) for t, ls in scout.layer_groups.items()} == {("chunked", 8192): 36, FULL: 12}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"layer_types": ["full_attention"] * 31}, "layer_types must be a list of 32 entries"),
        (
            {"layer_types": ["linear_attention"] + ["full_attention"] * 31},
            "layer_types[0]='linear_attention': kvshard caches full_attention, "
            "sliding_attention, chunked_attention layers only",
        ),
        (
            {"layer_types": ["chunked_attention"] * 32},
            "layer_types[0]='chunked_attention' needs attention_chunk_size",
        ),
        ({"attention_chunk_size": 0}, "attention_chunk_size=0 must be a positive integer"),
        ({"attention_chunk_size": 8, "no_rope_layers": [2] * 32}, "no_rope_layers must list 0"),
        ({"sliding_window_pattern": 0, "sliding_window": 8}, "sliding_window_pattern=0 must be"),
        ({"attention_chunk_size": 8, "no_rope_layer_interval": 0}, "no_rope_layer_interval=0"),
        ({"max_window_layers": "28", "sliding_window": 8}, "max_window_layers='28' must be an"),
    ],
)
def test_bad_layer_conventions_name_the_field(fields, message):
    with pytest.raises(kvshard.ConfigError) as info:
        kvshard.read_model_config({**LLAMA, "_name_or_path": "org/m", **fields})
    assert str(info.value).startswith("org/m: "), info.value
    assert message in str(info.value)


def test_model_geometry_fills_and_checks_layer_types():
    assert kvshard.ModelGeometry(2, 1, 64).layer_types == (FULL, FULL)
    assert kvshard.ModelGeometry(2, 1, 64, sliding_window=8).layer_types == (("sliding", 8),) * 2
    mixed = kvshard.ModelGeometry(2, 1, 64, layer_types=[["sliding", 8], ["full"]])
    assert mixed.layer_types == (("sliding", 8), FULL)  # JSON lists become tuples
    assert hash(mixed) == hash(kvshard.ModelGeometry(2, 1, 64, layer_types=mixed.layer_types))
    with pytest.raises(ValueError, match="layer_types has 1 entries; need one per layer"):
        kvshard.ModelGeometry(2, 1, 64, layer_types=[FULL])
    with pytest.raises(ValueError, match=r"layer_types\[1\]=\('sliding', 0\) must be"):
        kvshard.ModelGeometry(2, 1, 64, layer_types=[FULL, ("sliding", 0)])
    with pytest.raises(ValueError, match="sliding_window=8 disagrees with layer_types"):
        kvshard.ModelGeometry(2, 1, 64, sliding_window=8, layer_types=mixed.layer_types)
    with pytest.raises(ValueError, match="sliding_window=None disagrees"):
        kvshard.ModelGeometry(2, 1, 64, layer_types=[("sliding", 8)] * 2)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({**LLAMA, "kv_lora_rank": 512}, "config: qk_rope_head_dim is missing (multi-head latent"),
        (
            {**LLAMA, "kv_lora_rank": 0, "qk_rope_head_dim": 64},
            "kv_lora_rank=0 must be a positive",
        ),
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


def test_from_config_of_a_hybrid_wrapper_config():
    # Gemma 3's text_config has no torch_dtype: the wrapper's bfloat16 is the cache dtype.
    spec = kvshard.CacheSpec.from_config(preset_config("gemma-3-27b"), page_size=32, num_pages=8)
    types = kvshard.read_model_config(preset_config("gemma-3-27b")).layer_types
    assert spec == kvshard.CacheSpec(
        62, 16, 128, page_size=32, num_pages=8, dtype="bfloat16", layer_types=types
    )


# ------------------------------------------- config.json files as transformers writes them

SLIDING_8, SLIDING_4096 = ("sliding", 8), ("sliding", 4096)
# Family -> (KV heads, head_dim, each layer's type) of the 6-layer configs of _hf_configs.
WRITTEN = {
    "llama3": (2, 16, (FULL,) * 6),
    "mistral": (2, 16, (FULL,) * 6),  # head_dim and sliding_window null (4.x)
    "mistral_7b": (8, 128, (SLIDING_4096,) * 32),
    "qwen2": (2, 16, (FULL,) * 6),  # sliding_window null, use_sliding_window false
    "qwen3": (2, 16, (FULL,) * 6),
    "gemma": (2, 16, (FULL,) * 6),
    "gemma2": (2, 16, (SLIDING_8, FULL) * 3),
    "gemma3_text": (2, 16, (SLIDING_8,) * 5 + (FULL,)),
    "gpt_oss": (2, 16, (SLIDING_8, FULL) * 3),
}


@pytest.mark.parametrize("family", hf_configs.FAMILIES)
@pytest.mark.parametrize("version", hf_configs.VERSIONS)
def test_configs_as_transformers_writes_them(version, family, tmp_path):
    kv_heads, head_dim, layer_types = WRITTEN[family]
    text = hf_configs.CONFIG_JSON[version, family]
    (tmp_path / "config.json").write_text(text)
    g = kvshard.read_model_config(tmp_path)
    assert (g.num_layers, g.num_kv_heads, g.head_dim, g.dtype) == (
        len(layer_types),
        kv_heads,
        head_dim,
        "bfloat16",
    )
    assert g.layer_types == layer_types
    spec = kvshard.CacheSpec.from_config(tmp_path, page_size=16, num_pages=8)
    assert spec == kvshard.CacheSpec(
        len(layer_types), kv_heads, head_dim, 16, 8, "bfloat16", layer_types=layer_types
    )


@pytest.mark.parametrize("family", hf_configs.MLA_FAMILIES)
@pytest.mark.parametrize("version", hf_configs.VERSIONS)
def test_mla_configs_as_transformers_writes_them(version, family, tmp_path):
    """DeepSeek-V3 / Kimi-K2: one latent row of kv_lora_rank 32 + qk_rope_head_dim 8 per
    token, whatever num_key_value_heads (2) and head_dim (8, the rope's) the file says."""
    (tmp_path / "config.json").write_text(hf_configs.CONFIG_JSON[version, family])
    g = kvshard.read_model_config(tmp_path)
    assert (g.num_layers, g.num_kv_heads, g.head_dim, g.kv_lora_rank) == (6, 1, 40, 32)
    assert (g.num_q_heads, g.dtype, g.layer_types, g.kv_layout) == (
        4,
        "bfloat16",
        (FULL,) * 6,
        "latent",
    )
    spec = kvshard.CacheSpec.from_config(tmp_path, page_size=16, num_pages=8)
    assert spec == kvshard.CacheSpec(
        6, 1, 40, 16, 8, "bfloat16", kv_layout="latent", kv_lora_rank=32
    )
    assert (spec.padded_head_dim, spec.value_dim) == (128, 32)


@pytest.mark.parametrize(("name", "heads"), [("deepseek-v3", 128), ("kimi-k2", 64)])
def test_mla_presets(name, heads):
    g = kvshard.read_model_config(preset_config(name))
    assert (g.num_layers, g.num_kv_heads, g.head_dim, g.kv_lora_rank, g.num_q_heads) == (
        61,
        1,
        512 + 64,
        512,
        heads,
    )


def test_explicit_nulls_are_the_config_class_defaults():
    # transformers 4.x's MistralConfig writes "head_dim": null: hidden_size / heads.
    mistral = hf_configs.config("4.57.6", "mistral")
    assert mistral["head_dim"] is None and mistral["sliding_window"] is None
    assert kvshard.read_model_config(mistral).head_dim == 64 // 4
    nulls = {
        "num_key_value_heads": None,  # multi-head attention
        "max_window_layers": None,  # Qwen2Config's 28
        "use_sliding_window": None,  # Qwen2Config's false
        "sliding_window_pattern": None,
        "torch_dtype": None,
        "dtype": "float16",
    }
    g = kvshard.read_model_config({**LLAMA, **nulls, "model_type": "qwen2", "sliding_window": 8})
    assert (g.num_kv_heads, g.dtype, g.layer_types) == (32, "float16", (FULL,) * 32)
    qwen = {**LLAMA, "model_type": "qwen2", "sliding_window": 8, "use_sliding_window": True}
    windowed = kvshard.read_model_config({**qwen, "max_window_layers": None}).layer_types
    assert windowed == (FULL,) * 28 + (("sliding", 8),) * 4
    gemma3 = {**LLAMA, "model_type": "gemma3_text", "sliding_window": 8, "num_hidden_layers": 6}
    for pattern in ({"sliding_window_pattern": None}, {"_sliding_window_pattern": 3}):
        types = kvshard.read_model_config({**gemma3, **pattern}).layer_types
        period = pattern.get("_sliding_window_pattern") or 6
        assert [t == FULL for t in types] == [(i + 1) % period == 0 for i in range(6)]
    with pytest.raises(kvshard.ConfigError, match=r"num_hidden_layers=None must be a positive"):
        kvshard.read_model_config({**LLAMA, "num_hidden_layers": None})


def test_the_config_reader_imports_no_jax():
    code = (
        "import sys, kvshard._geometry.hf_config, kvshard.cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert out.strip() == "[]"
