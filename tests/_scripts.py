"""Runs the repository's example and benchmark scripts as subprocesses for the tests.

Subprocesses because each script configures its own 8 simulated devices before importing JAX.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(path: Path, *flags: str) -> subprocess.CompletedProcess:
    """Runs ``python path flags...`` on the CPU; returns the finished process (no check)."""
    env = dict(os.environ)
    # The scripts add the 8-device flag themselves; start from a clean slate so the test
    # process's copy is not appended twice. LLVM at -O0, as in the test process (conftest.py):
    # each run compiles a few executables and runs them a few steps, so code generation time
    # dominates (tp_decode --layers 2 --num-requests 4 --steps 8: 10.9 s at -O2, 8.6 s at -O0).
    # The scripts assert numerics against their oracles and bytes against the spec, no timing.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    env["JAX_PLATFORMS"] = "cpu"
    env["NPROC"] = "16"  # a thread per simulated device for interpret mode (conftest.py)
    # The checkout under test, not whichever kvshard the interpreter has installed (an
    # editable install of another checkout would otherwise be what the script imports).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(path), *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )


def stdout_of_success(proc: subprocess.CompletedProcess) -> str:
    """The process's stdout, after asserting it exited 0 (else shows both streams)."""
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout
