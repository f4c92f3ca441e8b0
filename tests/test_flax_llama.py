"""Runs examples/flax_llama.py (flax NNX decoders on kvshard) and checks it matches its dense run.

A subprocess: the example sets up its own simulated devices before importing JAX. It exits 1
when a paged logit differs from the dense model's by more than its tolerance. The random-weight
demo, and the checkpoint command line that tests outside the repository call.
"""

from __future__ import annotations

import json
import re

import numpy as np
from _hf_checkpoints import llama32_config, write_checkpoint
from _scripts import ROOT, run_script, stdout_of_success


def run_flax_llama(*flags: str) -> tuple[int, int, int, str, int, float]:
    """(requests, steps, tokens computed, window, most pages in use, max logit diff)."""
    out = stdout_of_success(run_script(ROOT / "examples" / "flax_llama.py", *flags))
    found = re.search(
        r"(\d+) requests, (\d+) steps, (\d+) tokens computed, window (\S+), at most (\d+) "
        r"pages in use: max \|paged - dense\| logit = (\S+)",
        out,
    )
    assert found, out
    requests, steps, tokens, window, peak, diff = found.groups()
    return int(requests), int(steps), int(tokens), window, int(peak), float(diff)


def test_flax_llama_matches_dense_with_and_without_a_window():
    full = run_flax_llama()
    requests, steps, tokens, window, peak, diff = full
    assert requests == 6 and tokens > steps > 6  # batched: prefill chunks and decodes
    assert window == "None" and diff <= 1e-4
    windowed = run_flax_llama("--sliding-window", "6")
    assert windowed[:4] == (requests, steps, tokens, "6")  # the same schedule
    assert windowed[5] <= 1e-4
    assert windowed[4] < peak  # the allocator released out-of-window pages


def test_flax_llama_check_catches_a_wrong_model(tmp_path):
    # The paged run attends a window of 6; a dense model without the window must not match.
    script = tmp_path / "wrong_dense.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT / 'examples')!r})\n"
        "import dataclasses\n"
        "import flax_llama\n"
        "from kvshard.models import model as m\n"
        "full = m.dense_attention\n"
        "def unwindowed(q, k, v, spec, arch, sinks=None):\n"
        "    return full(q, k, v, dataclasses.replace(spec, window=None), arch, sinks)\n"
        "m.dense_attention = unwindowed\n"
        "sys.exit(flax_llama.main(['--sliding-window', '6', '--num-requests', '3']))\n"
    )
    proc = run_script(script)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    diff = float(re.search(r"logit = (\S+)", proc.stdout).group(1))
    assert diff > 1e-2


def test_checkpoint_command_line_writes_tokens_and_logits(tmp_path):
    """The acceptance command line on a Llama-3.2-shaped bf16 checkpoint across a 1x4 mesh."""
    write_checkpoint(tmp_path / "ckpt", llama32_config(), dtype="bfloat16", shards=2)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [42], [1, 2, 3]]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    new = 5
    out = stdout_of_success(
        run_script(
            ROOT / "examples" / "flax_llama.py",
            *("--checkpoint", str(tmp_path / "ckpt"), "--prompts", str(tmp_path / "prompts.json")),
            *(
                "--max-new-tokens",
                str(new),
                "--mesh",
                "1x4",
                "--logits-out",
                str(tmp_path / "o.npz"),
            ),
        )
    )
    assert "bfloat16, llama, mesh 1x4" in out, out
    got = np.load(tmp_path / "o.npz")
    assert sorted(got.files) == sorted(f"{k}_{i}" for i in range(3) for k in ("tokens", "logits"))
    for i, prompt in enumerate(prompts):
        tokens, logits = got[f"tokens_{i}"], got[f"logits_{i}"]
        assert tokens.dtype == np.int32 and tokens.shape == (len(prompt) + new,)
        assert logits.dtype == np.float32 and logits.shape == (len(prompt) + new - 1, 256)
        assert tokens[: len(prompt)].tolist() == prompt
        # Greedy: every generated token is the argmax of the row that read the token before it.
        assert tokens[len(prompt) :].tolist() == logits[len(prompt) - 1 :].argmax(-1).tolist()


def test_checkpoint_command_line_refuses_bad_input(tmp_path):
    write_checkpoint(tmp_path / "ckpt", llama32_config(), dtype="float32")
    (tmp_path / "prompts.json").write_text(json.dumps([[1, 2], [999]]))
    proc = run_script(
        ROOT / "examples" / "flax_llama.py",
        *("--checkpoint", str(tmp_path / "ckpt"), "--prompts", str(tmp_path / "prompts.json")),
        "--mesh",
        "1x3x1",
    )
    assert proc.returncode == 2 and "--mesh '1x3x1'" in proc.stderr
    proc = run_script(
        ROOT / "examples" / "flax_llama.py",
        *("--checkpoint", str(tmp_path / "ckpt"), "--prompts", str(tmp_path / "prompts.json")),
        *("--mesh", "1x3"),
    )
    assert proc.returncode == 1 and "--mesh 1x3: tensor-parallel size 3" in proc.stderr
    proc = run_script(
        ROOT / "examples" / "flax_llama.py",
        *("--checkpoint", str(tmp_path / "ckpt"), "--prompts", str(tmp_path / "prompts.json")),
    )
    assert proc.returncode == 1 and "prompt 1 has a token id outside [0, 256)" in proc.stderr
