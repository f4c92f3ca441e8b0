"""Runs examples/flax_llama.py (flax NNX Llama on kvshard) and checks it matches its dense run.

A subprocess: the example sets up its own 2 simulated devices before importing JAX. It exits 1
when a paged logit differs from the dense model's by more than its tolerance.
"""

from __future__ import annotations

import re

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
