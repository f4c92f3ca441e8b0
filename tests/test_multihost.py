"""Multi-process runs on one CPU machine: 2 and 4 JAX processes, one global 8-device mesh.

Each test spawns tests/_multihost_worker.py as N processes that join one ``jax.distributed``
job on 127.0.0.1 (a free port picked at run time, gloo collectives) with 8 / N CPU devices each,
run random serving steps through kvshard on meshes spanning every process, and check their own
shards against the numpy oracle; tests/_multiprocess.py bounds the time and kills every process
on the way out. A worker exits 0 only after all of its checks passed. The 2-process run also
takes the Pallas backend (interpret mode) through two of the meshes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _multiprocess import assert_all_succeeded, run_processes
from _scripts import ROOT, run_script, stdout_of_success

WORKER = Path(__file__).with_name("_multihost_worker.py")


@pytest.mark.parametrize(
    ("num_processes", "backends", "cases"),
    [
        # Every mesh case (see CASES in the worker), both update backends.
        pytest.param(2, "xla,pallas", "0,1,2,3", marks=pytest.mark.slow),
        # Each process compiles every program itself: two cases keep 4 processes on 2 cores
        # short, one pool with replicated heads and per-process pools with split heads.
        (4, "xla", "0,2"),
    ],
    ids=["2proc", "4proc"],
)
def test_serving_steps_on_a_mesh_spanning_processes(num_processes, backends, cases):
    results = run_processes(WORKER, num_processes, backends, cases, timeout=150)
    assert_all_succeeded(results)
    for r in results:
        assert f"process {r.process_id}: OK" in r.output, r.output


def test_multihost_example_runs_as_two_local_processes():
    """examples/multihost.py: one command, 2 processes, attention checked on every process."""
    out = stdout_of_success(run_script(ROOT / "examples" / "multihost.py", "--steps", "4"))
    assert "all 2 processes agree and match the oracle" in out
    assert "mesh {'data': 2, 'model': 4}" in out
