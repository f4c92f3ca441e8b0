"""Served logits of examples/flax_llama.py vs transformers' own forward pass, per architecture.

NOT part of the project's dependencies or tests: run it with a separate virtualenv that has
torch, transformers and numpy (the project never imports them)::

    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install torch transformers numpy
    /tmp/hf/bin/python benchmarks/hf_compare.py --python .venv/bin/python --dtype float32 \
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
PROMPTS = [list(range(1, 14)), [7, 8, 9], list(range(30, 60)), [200]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", required=True, help="the project's interpreter")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--mesh", default="1x2")
    parser.add_argument("--init", type=float, default=0.02, help="initializer_range")
    parser.add_argument("--new-tokens", type=int, default=6)
    parser.add_argument("--only", help="comma-separated case names")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "prompts.json").write_text(json.dumps(PROMPTS))
        for name, (config_class, extra) in CASES.items():
            if args.only and name not in args.only.split(","):
                continue
            torch.manual_seed(0)
            cfg = config_class(**COMMON, **extra, initializer_range=args.init)
            model = tf.AutoModelForCausalLM.from_config(cfg)
            with torch.no_grad():
                for param_name, p in model.named_parameters():
                    if "norm" in param_name or param_name.endswith("bias"):
                        p.add_(0.1 * torch.randn_like(p))
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
    print(json.dumps(results))


if __name__ == "__main__":
    main()
