"""Runs examples/flax_llama.py (flax NNX decoders on kvshard) and checks it matches its dense run.

A subprocess: the example sets up its own simulated devices before importing JAX. It exits 1
when a paged logit differs from the dense model's by more than its tolerance. The random-weight
demo, and the checkpoint command line that tests outside the repository call.
"""

from __future__ import annotations

import json
import re

import _hf_configs as hf_configs
import numpy as np
import pytest
from _hf_checkpoints import llama32_config, write_checkpoint
from _scripts import ROOT, run_script, stdout_of_success

_RESULT = re.compile(
    r"(\d+) requests, (\d+) steps, (\d+) tokens computed, window (\S+), at most (\d+) "
    r"pages in use: max \|paged - dense\| logit = (\S+)"
)

# Three runs of the example in ONE process (a process start, the imports and the weights'
# initialisers cost more than a run): without a window, with a window of 6, then with a dense
# model that ignores the window. The paged run attends a window of 6, so that wrong dense model
# must not match. Its 3 requests give the dense check new shapes, so it is traced afresh with
# the replaced dense attention (had an earlier trace been reused, it would exit 0 and fail here).
_THREE_RUNS = """
import sys
sys.path.insert(0, {examples!r})
import dataclasses
import flax_llama
from kvshard.models import model as m
codes = [flax_llama.main([]), flax_llama.main(["--sliding-window", "6"])]
full = m.dense_attention
def unwindowed(q, k, v, spec, arch, sinks=None):
    return full(q, k, v, dataclasses.replace(spec, window=None), arch, sinks)
m.dense_attention = unwindowed
codes.append(flax_llama.main(["--sliding-window", "6", "--num-requests", "3"]))
print("exit codes:", *codes)
"""


def test_flax_llama_matches_dense_with_and_without_a_window_and_catches_a_wrong_model(tmp_path):
    script = tmp_path / "three_runs.py"
    script.write_text(_THREE_RUNS.format(examples=str(ROOT / "examples")))
    proc = run_script(script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "exit codes: 0 0 1" in proc.stdout, proc.stdout + proc.stderr
    runs = [
        (int(r), int(s), int(t), w, int(peak), float(d))
        for r, s, t, w, peak, d in _RESULT.findall(proc.stdout)
    ]
    assert len(runs) == 3, proc.stdout
    full, windowed, wrong = runs
    requests, steps, tokens, window, peak, diff = full
    assert requests == 6 and tokens > steps > 6  # batched: prefill chunks and decodes
    assert window == "None" and diff <= 1e-4
    assert windowed[:4] == (requests, steps, tokens, "6")  # the same schedule
    assert windowed[5] <= 1e-4
    assert windowed[4] < peak  # the allocator released out-of-window pages
    assert wrong[0] == 3 and wrong[3] == "6" and wrong[5] > 1e-2


@pytest.mark.extended  # slow: .ci/run's extended step
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


def test_a_mistral_checkpoint_saved_by_transformers_4_serves(tmp_path):
    """MistralConfig.save_pretrained in transformers 4.x writes "head_dim": null (and Mistral
    v0.3's "sliding_window": null): the default, hidden_size / num_attention_heads."""
    cfg = hf_configs.config("4.57.6", "mistral")
    assert cfg["head_dim"] is None
    write_checkpoint(tmp_path / "ckpt", cfg, dtype="bfloat16")
    (tmp_path / "prompts.json").write_text(json.dumps([[5, 6, 7, 8, 9, 10, 11], [42]]))
    proc = run_script(
        ROOT / "examples" / "flax_llama.py",
        *("--checkpoint", str(tmp_path / "ckpt"), "--prompts", str(tmp_path / "prompts.json")),
        *("--max-new-tokens", "3", "--mesh", "1x2"),
    )
    out = stdout_of_success(proc)
    assert "bfloat16, mistral, mesh 1x2" in out, out
    assert "2 requests" in out and "window None" in out, out
    # Progress on stderr, from the imports to the dense check: it never sits silent.
    stages = ("importing JAX", "loading ", "serving 2 requests", "2/2 requests finished", "dense")
    positions = [proc.stderr.find(f"flax_llama: {stage}") for stage in stages[:3]]
    positions += [proc.stderr.find(stage) for stage in stages[3:]]
    assert -1 not in positions and positions == sorted(positions), proc.stderr


# Each command line below as its own "process" in ONE interpreter (the imports are most of a
# refused run): main's SystemExit becomes the exit status and stderr text Python itself would
# give it (None -> 0, an int as is, anything else printed to stderr -> 1).
_COMMAND_LINES = """
import sys
sys.path.insert(0, {examples!r})
import flax_llama
for argv in {runs!r}:
    try:
        code = flax_llama.main(list(argv))
    except SystemExit as exit:
        code = exit.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    print("=== exit", code or 0, flush=True)
    print("=== end", file=sys.stderr, flush=True)
"""


def run_command_lines(tmp_path, runs: list[tuple[str, ...]]) -> list[tuple[int, str]]:
    """[(exit status, stderr)] of examples/flax_llama.py's main for each argv, in turn."""
    script = tmp_path / "command_lines.py"
    script.write_text(_COMMAND_LINES.format(examples=str(ROOT / "examples"), runs=runs))
    proc = run_script(script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    codes = [int(c) for c in re.findall(r"=== exit (-?\d+)", proc.stdout)]
    errors = proc.stderr.split("=== end\n")[: len(codes)]
    assert len(codes) == len(errors) == len(runs), proc.stdout + proc.stderr
    return list(zip(codes, errors, strict=True))


def test_checkpoint_command_line_refuses_bad_input(tmp_path):
    write_checkpoint(tmp_path / "ckpt", llama32_config(), dtype="float32")
    (tmp_path / "prompts.json").write_text(json.dumps([[1, 2], [999]]))
    inputs = ("--checkpoint", str(tmp_path / "ckpt"), "--prompts", str(tmp_path / "prompts.json"))
    bad_mesh, untiled_heads, bad_token = run_command_lines(
        tmp_path, [(*inputs, "--mesh", "1x3x1"), (*inputs, "--mesh", "1x3"), inputs]
    )
    assert bad_mesh[0] == 2 and "--mesh '1x3x1'" in bad_mesh[1]
    assert untiled_heads[0] == 1 and "--mesh 1x3: tensor-parallel size 3" in untiled_heads[1]
    assert bad_token[0] == 1 and "prompt 1 has a token id outside [0, 256)" in bad_token[1]
