"""A float64 NumPy forward pass of a Hugging Face decoder checkpoint: the tests' oracle.

Written from transformers' modeling code (Llama, Mistral, Qwen2/3, Gemma 2/3, gpt-oss), sharing
nothing with kvshard.models: its own config reading, rotary frequencies (default, linear,
llama3), norms, attention masks and sinks over one whole sequence, experts token by token.
"""

from __future__ import annotations

import math

import numpy as np


def _inv_freq(theta: float, dim: int, scaling: dict | None) -> np.ndarray:
    freq = np.array([1.0 / theta ** (2 * i / dim) for i in range(dim // 2)])
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        return freq / scaling["factor"]
    if kind == "llama3":
        out = []
        old, factor = scaling["original_max_position_embeddings"], scaling["factor"]
        lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
        for f in freq:
            wavelen = 2 * math.pi / f
            if wavelen < old / hi:  # high frequency: unchanged
                out.append(f)
            elif wavelen > old / lo:  # low frequency: interpolated
                out.append(f / factor)
            else:
                s = (old / wavelen - lo) / (hi - lo)
                out.append((1 - s) * f / factor + s * f)
        return np.array(out)
    assert kind == "default", kind
    return freq


def _rope(x: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """x [T, H, D] at positions 0..T-1."""
    angles = np.arange(x.shape[0])[:, None] * freq[None]  # [T, D/2]
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def forward(cfg: dict, w: dict[str, np.ndarray], tokens) -> np.ndarray:
    """float64[T, vocab] logits of every position of ``tokens``."""
    t = cfg["model_type"]
    gemma = t.startswith("gemma")
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    d, H, Hkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or d // H
    eps = cfg.get("rms_norm_eps", 1e-6)

    def norm(x, name):
        g = w[name] + 1 if gemma else w[name]
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g

    def experts(h, p):  # gpt-oss: top-k router, clamped SwiGLU experts, each token on its own
        out = np.zeros_like(h)
        for t_, x_ in enumerate(h):
            logits = w[p + "mlp.router.weight"] @ x_ + w[p + "mlp.router.bias"]
            top = np.argsort(-logits)[: cfg["num_experts_per_tok"]]
            probs = np.exp(logits[top] - logits[top].max())
            for e, prob in zip(top, probs / probs.sum(), strict=True):
                gu = (
                    x_ @ w[p + "mlp.experts.gate_up_proj"][e]
                    + w[p + "mlp.experts.gate_up_proj_bias"][e]
                )
                gate, up = np.minimum(gu[0::2], 7.0), np.clip(gu[1::2], -7.0, 7.0)
                glu = gate / (1 + np.exp(-1.702 * gate))
                y = ((up + 1) * glu) @ w[p + "mlp.experts.down_proj"][e]
                out[t_] += prob * (y + w[p + "mlp.experts.down_proj_bias"][e])
        return out

    def act(x):
        if gemma:
            return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
        return x / (1 + np.exp(-x))

    def linear(x, name):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    tokens = np.asarray(tokens)
    T = len(tokens)
    x = w["model.embed_tokens.weight"][tokens] * (math.sqrt(d) if gemma else 1.0)
    i, j = np.arange(T)[:, None], np.arange(T)[None]
    for layer in range(cfg["num_hidden_layers"]):
        kind = cfg["layer_types"][layer] if "layer_types" in cfg else "full_attention"
        window = cfg.get("sliding_window") if kind == "sliding_attention" else None
        if t == "gemma3_text" and kind == "sliding_attention":
            freq = _inv_freq(cfg.get("rope_local_base_freq", 10_000.0), D, None)
        else:
            freq = _inv_freq(cfg.get("rope_theta", 10_000.0), D, cfg.get("rope_scaling"))
        p = f"model.layers.{layer}."
        h = norm(x, p + "input_layernorm.weight")
        q = linear(h, p + "self_attn.q_proj").reshape(T, H, D)
        k = linear(h, p + "self_attn.k_proj").reshape(T, Hkv, D)
        v = linear(h, p + "self_attn.v_proj").reshape(T, Hkv, D)
        if p + "self_attn.q_norm.weight" in w:
            q, k = norm(q, p + "self_attn.q_norm.weight"), norm(k, p + "self_attn.k_norm.weight")
        q, k = _rope(q, freq), _rope(k, freq)
        k, v = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)
        scale = cfg["query_pre_attn_scalar"] ** -0.5 if gemma else D**-0.5
        s = np.einsum("thd,shd->hts", q, k) * scale
        if cfg.get("attn_logit_softcapping"):
            cap = cfg["attn_logit_softcapping"]
            s = cap * np.tanh(s / cap)
        visible = (j <= i) & ((i - j < window) if window else True)
        s = np.where(visible, s, -np.inf)
        sink = w.get(p + "self_attn.sinks", np.full(H, -np.inf))[:, None, None]  # [H, 1, 1]
        top = np.maximum(s.max(-1, keepdims=True), sink)
        p_ = np.exp(s - top)
        p_ /= p_.sum(-1, keepdims=True) + np.exp(sink - top)  # a sink: denominator only
        attn = linear(np.einsum("hts,shd->thd", p_, v).reshape(T, H * D), p + "self_attn.o_proj")
        if t in ("gemma2", "gemma3_text"):
            x = x + norm(attn, p + "post_attention_layernorm.weight")
            h = norm(x, p + "pre_feedforward_layernorm.weight")
            mlp = linear(
                act(linear(h, p + "mlp.gate_proj")) * linear(h, p + "mlp.up_proj"),
                p + "mlp.down_proj",
            )
            x = x + norm(mlp, p + "post_feedforward_layernorm.weight")
        elif t == "gpt_oss":
            x = x + attn
            x = x + experts(norm(x, p + "post_attention_layernorm.weight"), p)
        else:
            x = x + attn
            h = norm(x, p + "post_attention_layernorm.weight")
            x = x + linear(
                act(linear(h, p + "mlp.gate_proj")) * linear(h, p + "mlp.up_proj"),
                p + "mlp.down_proj",
            )
    x = norm(x, "model.norm.weight")
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    logits = x @ head.T
    if cfg.get("final_logit_softcapping"):
        cap = cfg["final_logit_softcapping"]
        logits = cap * np.tanh(logits / cap)
    return logits
