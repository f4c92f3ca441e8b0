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
