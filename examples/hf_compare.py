"""Served logits of examples/flax_llama.py vs transformers' own forward pass, per architecture.

NOT part of the project's dependencies or tests: run it with a separate virtualenv that has
torch, transformers and numpy (the project never imports them)::

    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install torch transformers numpy
    /tmp/hf/bin/python examples/hf_compare.py --python .venv/bin/python --dtype float32 \
        --mesh 2x2 --init 0.15

For each case it builds a tiny random model with transformers, perturbs its norms and biases
(transformers initialises them to constants), writes it with ``save_pretrained`` (the
Llama-3.2-shaped case in several shards), runs the example with the acceptance command line
in the project's interpreter, then teacher-forces transformers on the served tokens and prints
the largest logit difference and the greedy agreement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers as tf

ROOT = Path(__file__).resolve().parents[1]
COMMON = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "max_position_embeddings": 4096,
}
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,  # small, so the prompts reach scaled bands
}
CASES = {
    "llama32": (
        tf.LlamaConfig,
        {"head_dim": 64, "rope_scaling": LLAMA3, "rope_theta": 5e5, "tie_word_embeddings": True},
    ),
    "llama_bias_linear": (
        tf.LlamaConfig,
        {
            "attention_bias": True,
            "mlp_bias": True,
            "rope_scaling": {"rope_type": "linear", "factor": 4.0},
        },
    ),
    "llama_yarn": (
        tf.LlamaConfig,
        {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
    ),
    "mistral": (tf.MistralConfig, {"sliding_window": 5}),
    "qwen2": (
        tf.Qwen2Config,
        {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1},
    ),
    "qwen3": (
        tf.Qwen3Config,
        {"head_dim": 32, "use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1},
    ),
    "gemma2": (
        tf.Gemma2Config,
        {
            "head_dim": 32,
            "sliding_window": 6,
            "query_pre_attn_scalar": 32,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 3.0,
        },
    ),
    "gemma3": (
        tf.Gemma3TextConfig,
        {
            "head_dim": 32,
            "sliding_window": 6,
            "layer_types": ["sliding_attention", "full_attention"],
            "query_pre_attn_scalar": 32,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        },
    ),
}
# DeepSeek-V3's architecture: latent attention with a query LoRA, DeepSeek-V3's yarn (its
# mscale_all_dim in the softmax scale; a small original context so the prompts reach the
# scaled bands), 8 routed experts in 4 groups (2 eligible, 2 per token) and a shared expert
# after one dense layer; and DeepSeek-V2-Lite's query without a LoRA.
DEEPSEEK = {
    "num_key_value_heads": 4,
    "kv_lora_rank": 32,
    "q_lora_rank": 48,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "moe_intermediate_size": 32,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "first_k_dense_replace": 1,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 16,
    },
}
CASES["deepseek_v3"] = (tf.DeepseekV3Config, DEEPSEEK)
CASES["deepseek_v3_no_q_lora"] = (tf.DeepseekV3Config, {**DEEPSEEK, "q_lora_rank": None})
PROMPTS = [list(range(1, 14)), [7, 8, 9], list(range(30, 60)), [200]]
# gpt-oss runs densely only (serving needs kvshard.attention(..., sinks=)): its logits over
# each prompt, from the project's interpreter.
GPT_OSS = {
    "head_dim": 32,
    "sliding_window": 6,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "rope_parameters": {
        "rope_type": "yarn",
        "factor": 8.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 16,
        "rope_theta": 150000.0,
    },
}
DENSE = """
import sys, jax, numpy as np
from kvshard import models
mesh = jax.make_mesh((1, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
model = models.load_checkpoint(sys.argv[1], mesh)
prompts = [list(map(int, p.split(","))) for p in sys.argv[3:]]
reqs = [models.Request(i, p + [0], 0) for i, p in enumerate(prompts)]
np.savez(sys.argv[2], *models.dense_logits(model, reqs))
"""


def compare_gpt_oss(args, tmp: Path) -> None:
    torch.manual_seed(0)
    cfg = tf.GptOssConfig(**COMMON, **GPT_OSS, initializer_range=args.init)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if "norm" in param_name or "bias" in param_name or "sinks" in param_name:
                p.add_(0.1 * torch.randn_like(p))
    model = model.to(getattr(torch, args.dtype)).eval()
    ckpt, out = tmp / "gpt_oss", tmp / "gpt_oss.npz"
    model.save_pretrained(ckpt)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    proc = subprocess.run(
        [args.python, "-c", DENSE, str(ckpt), str(out), *(",".join(map(str, p)) for p in PROMPTS)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode:
        print(f"gpt_oss: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        return
    dense = np.load(out)
    worst = scale = 0.0
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            ref = model(torch.tensor([prompt])).logits[0].float().numpy()
        worst = max(worst, float(np.abs(ref - dense[f"arr_{i}"]).max()))
        if args.verbose:
            print(i, np.round(np.abs(ref - dense[f"arr_{i}"]).max(-1), 3).tolist())
        scale = max(scale, float(np.abs(ref).max()))
    print(
        f"{'gpt_oss (dense)':18s} {args.dtype}: max |dense - transformers| = {worst:.2e} "
        f"(max |logit| {scale:.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", required=True, help="the project's interpreter")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--mesh", default="1x2")
    parser.add_argument("--init", type=float, default=0.02, help="initializer_range")
    parser.add_argument("--new-tokens", type=int, default=6)
    parser.add_argument("--only", help="comma-separated case names")
    parser.add_argument("--verbose", action="store_true", help="per-position differences")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "prompts.json").write_text(json.dumps(PROMPTS))
        for name, (config_class, extra) in CASES.items():
            if args.only and name not in args.only.split(","):
                continue
            torch.manual_seed(0)
            cfg = config_class(**{**COMMON, **extra}, initializer_range=args.init)
            model = tf.AutoModelForCausalLM.from_config(cfg)
            with torch.no_grad():
                for param_name, p in model.named_parameters():
                    if "norm" in param_name or param_name.endswith("bias"):
                        p.add_(0.1 * torch.randn_like(p))
                for buffer_name, b in model.named_buffers():  # DeepSeek's routing bias
                    if buffer_name.endswith("e_score_correction_bias"):
                        b.add_(0.1 * torch.randn_like(b))
            model = model.to(getattr(torch, args.dtype)).eval()
            ckpt, out = tmp / name, tmp / f"{name}.npz"
            model.save_pretrained(ckpt, max_shard_size="200KB" if name == "llama32" else "1GB")
            proc = subprocess.run(
                [
                    args.python,
                    str(ROOT / "examples/flax_llama.py"),
                    "--checkpoint",
                    str(ckpt),
                    "--prompts",
                    str(tmp / "prompts.json"),
                    "--max-new-tokens",
                    str(args.new_tokens),
                    "--mesh",
                    args.mesh,
                    "--logits-out",
                    str(out),
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                check=False,
            )
            if proc.returncode:
                print(f"{name}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}")
                continue
            served = np.load(out)
            worst, scale, agree, total = 0.0, 0.0, 0, 0
            for i, prompt in enumerate(PROMPTS):
                tokens, logits = served[f"tokens_{i}"], served[f"logits_{i}"]
                assert tokens.shape == (len(prompt) + args.new_tokens,) and tokens.dtype == np.int32
                assert (
                    logits.shape == (len(tokens) - 1, cfg.vocab_size) and logits.dtype == np.float32
                )
                with torch.no_grad():
                    ids = torch.tensor(tokens[None].astype(np.int64))
                    ref = model(ids).logits[0, :-1].float().numpy()
                worst = max(worst, float(np.abs(ref - logits).max()))
                scale = max(scale, float(np.abs(ref).max()))
                agree += int((ref.argmax(-1) == logits.argmax(-1)).sum())
                total += len(ref)
            shards = len(list(ckpt.glob("*.safetensors")))
            results[name] = worst
            print(
                f"{name:18s} {args.dtype} mesh {args.mesh}: max |served - transformers| = "
                f"{worst:.2e} (max |logit| {scale:.2f}), greedy agree {agree}/{total}, "
                f"{shards} safetensors file(s); example: {proc.stdout.strip().split(': ')[-1]}"
            )
        if not args.only or "gpt_oss" in args.only.split(","):
            compare_gpt_oss(args, tmp)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
