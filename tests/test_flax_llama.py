"""Runs examples/flax_llama.py (flax NNX Llama on kvshard) and checks it matches its dense run.

A subprocess: the example sets up its own 2 simulated devices before importing JAX. It exits 1
when a paged logit differs from the dense model's by more than its tolerance.
"""

from __future__ import annotations

import re

import pytest
from _scripts import ROOT, run_script, stdout_of_success


@pytest.mark.parametrize("flags", [(), ("--sliding-window", "6")])
def test_flax_llama_matches_dense(flags):
    out = stdout_of_success(run_script(ROOT / "examples" / "flax_llama.py", *flags))
    found = re.search(
        r"(\d+) requests, (\d+) steps, (\d+) tokens computed, window (\S+): "
        r"max \|paged - dense\| logit = (\S+)",
        out,
    )
    assert found, out
    requests, steps, tokens, window, diff = found.groups()
    assert int(requests) == 6 and int(tokens) > int(steps) > 6  # batched, prefill and decode
    assert window == ("6" if flags else "None")
    assert float(diff) <= 1e-4


def test_flax_llama_check_catches_a_wrong_model(tmp_path):
    # The paged run attends a window of 6; a dense model without the window must not match.
    script = tmp_path / "wrong_dense.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT / 'examples')!r})\n"
        "import flax_llama as m\n"
        "full = m.dense_attention\n"
        "m.dense_attention = lambda q, k, v, window: full(q, k, v, None)\n"
        "sys.exit(m.main(['--sliding-window', '6', '--num-requests', '3']))\n"
    )
    proc = run_script(script)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    diff = float(re.search(r"logit = (\S+)", proc.stdout).group(1))
    assert diff > 1e-2
