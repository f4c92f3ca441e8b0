"""Small random Hugging Face checkpoints, written with NumPy alone (no torch, no network).

The safetensors writer and the tensor list per architecture are written here from the format
and from transformers' module names, independently of kvshard.models (which reads them).
Weights are scaled so activations stay O(1) through the layers.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_CODES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {
            "dtype": _CODES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def deepseek_shapes(cfg: dict, layers: int | None = None) -> dict[str, tuple[int, ...]]:
    """DeepseekV3ForCausalLM's tensors as save_pretrained names them (experts one by one);
    ``layers`` more than the config's: the extra ones as a multi-token-prediction layer
    (DeepSeek-V3's layer 61) would add them."""
    d, f, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, E, fe = cfg["num_attention_heads"], cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    r, q_lora = cfg["kv_lora_rank"], cfg.get("q_lora_rank")
    shapes = {
        "model.embed_tokens.weight": (vocab, d),
        "model.norm.weight": (d,),
        "lm_head.weight": (vocab, d),
    }
    for i in range(layers or cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        a = p + "self_attn."
        if q_lora is None:
            shapes[a + "q_proj.weight"] = (H * (nope + rope), d)
        else:
            shapes[a + "q_a_proj.weight"] = (q_lora, d)
            shapes[a + "q_a_layernorm.weight"] = (q_lora,)
            shapes[a + "q_b_proj.weight"] = (H * (nope + rope), q_lora)
        shapes[a + "kv_a_proj_with_mqa.weight"] = (r + rope, d)
        shapes[a + "kv_a_layernorm.weight"] = (r,)
        shapes[a + "kv_b_proj.weight"] = (H * (nope + v), r)
        shapes[a + "o_proj.weight"] = (d, H * v)
        mlps = {p + "mlp.": f}
        if i >= cfg["first_k_dense_replace"]:
            shapes[p + "mlp.gate.weight"] = (E, d)
            shapes[p + "mlp.gate.e_score_correction_bias"] = (E,)
            mlps = {p + f"mlp.experts.{e}.": fe for e in range(E)}
            mlps[p + "mlp.shared_experts."] = fe * cfg["n_shared_experts"]
        for m, width in mlps.items():
            shapes[m + "gate_proj.weight"] = (width, d)
            shapes[m + "up_proj.weight"] = (width, d)
            shapes[m + "down_proj.weight"] = (d, width)
    return shapes


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names -> shapes ([out, in] for linear layers) of a config."""
    t = cfg["model_type"]
    if "kv_lora_rank" in cfg:
        return deepseek_shapes(cfg)
    d, f, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or d // H
    bias = cfg.get("attention_bias", t == "gpt_oss")
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    if not cfg.get("tie_word_embeddings", True):
        shapes["lm_head.weight"] = (vocab, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        if t in ("gemma2", "gemma3_text"):
            shapes[p + "pre_feedforward_layernorm.weight"] = (d,)
            shapes[p + "post_feedforward_layernorm.weight"] = (d,)
        for name, out in (("q", H * D), ("k", Hkv * D), ("v", Hkv * D)):
            shapes[p + f"self_attn.{name}_proj.weight"] = (out, d)
            if bias or t == "qwen2":
                shapes[p + f"self_attn.{name}_proj.bias"] = (out,)
        shapes[p + "self_attn.o_proj.weight"] = (d, H * D)
        if bias:
            shapes[p + "self_attn.o_proj.bias"] = (d,)
        if t in ("qwen3", "gemma3_text"):
            shapes[p + "self_attn.q_norm.weight"] = (D,)
            shapes[p + "self_attn.k_norm.weight"] = (D,)
        if t == "gpt_oss":  # sinks and a mixture of experts (stored [E, in, out])
            E = cfg["num_local_experts"]
            shapes[p + "self_attn.sinks"] = (H,)
            shapes[p + "mlp.router.weight"] = (E, d)
            shapes[p + "mlp.router.bias"] = (E,)
            shapes[p + "mlp.experts.gate_up_proj"] = (E, d, 2 * f)
            shapes[p + "mlp.experts.gate_up_proj_bias"] = (E, 2 * f)
            shapes[p + "mlp.experts.down_proj"] = (E, f, d)
            shapes[p + "mlp.experts.down_proj_bias"] = (E, d)
            continue
        shapes[p + "mlp.gate_proj.weight"] = (f, d)
        shapes[p + "mlp.up_proj.weight"] = (f, d)
        shapes[p + "mlp.down_proj.weight"] = (d, f)
    return shapes


def write_checkpoint(
    directory: Path,
    cfg: dict,
    *,
    seed: int = 0,
    shards: int = 1,
    dtype: str = "bfloat16",
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, np.ndarray]:
    """Writes config.json and random weights (``shards`` > 1: an index and that many files) of
    ``shapes`` (default: :func:`tensor_shapes` of the config); returns the tensors as written."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {**cfg, "torch_dtype": dtype}
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    rng = np.random.default_rng(seed)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    gemma = cfg["model_type"].startswith("gemma")
    tensors = {}
    for name, shape in (shapes or tensor_shapes(cfg)).items():
        if name.endswith("norm.weight"):  # gains near 1 (Gemma stores them minus 1)
            value = (0.0 if gemma else 1.0) + 0.1 * rng.standard_normal(shape)
        elif name.endswith("embed_tokens.weight"):
            value = rng.standard_normal(shape) * cfg["hidden_size"] ** -0.5
        elif name.endswith((".bias", "_bias", ".sinks", "e_score_correction_bias")):
            value = 0.1 * rng.standard_normal(shape) * (10 if name.endswith("sinks") else 1)
        else:
            value = rng.standard_normal(shape) / np.sqrt(shape[-1])
        tensors[name] = value.astype(np_dtype)
    names = list(tensors)
    if shards == 1:
        write_safetensors(directory / "model.safetensors", tensors)
        return tensors
    weight_map = {}
    for s, chunk in enumerate(np.array_split(np.arange(len(names)), shards)):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(directory / file, {names[i]: tensors[names[i]] for i in chunk})
        weight_map.update({names[i]: file for i in chunk})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return tensors


def llama32_config(**overrides) -> dict:
    """Llama-3.2-1B's shape features at tiny width: head_dim 64, GQA, llama3 rope scaling, tied
    embeddings (no tie_word_embeddings key: absent means tied)."""
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "num_hidden_layers": 2,
        "vocab_size": 256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    }
    return {**cfg, **overrides}
