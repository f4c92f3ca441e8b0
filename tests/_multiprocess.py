"""Launches N local JAX processes (one jax.distributed job on 127.0.0.1) for the tests.

Every process gets a fresh CPU-only environment: no inherited ``XLA_FLAGS`` (the worker asks for
its share of the 8 global devices with ``jax_num_cpu_devices``), ``NPROC=16`` (a CPU client
thread per device, for interpret mode; see conftest.py), and this repository on ``PYTHONPATH``.
The coordinator port is picked free at run time. The launcher waits at most ``timeout``
seconds, stops the whole job as soon as one process fails (the others would wait forever in
a collective), and kills every process it started on the way out, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Finished:
    """One process's exit status and combined stdout/stderr (None status: killed by us)."""

    process_id: int
    returncode: int | None
    output: str
    os_pid: int


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_env() -> dict[str, str]:
    env = dict(os.environ)
    # LLVM at -O0, as in the test process (conftest.py): compiling dominates these runs.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    env["JAX_PLATFORMS"] = "cpu"
    env["NPROC"] = "16"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_processes(
    script: Path, num_processes: int, *args: str, timeout: float = 120.0
) -> list[Finished]:
    """Runs ``python script PROCESS_ID NUM_PROCESSES PORT args...`` N times, concurrently.

    Returns every process's result once all have exited, or once one has failed or the time is
    up (the rest are then killed and reported with returncode None).
    """
    port = free_port()
    env = process_env()
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as files:
        logs = [
            files.enter_context(tempfile.TemporaryFile(mode="w+")) for _ in range(num_processes)
        ]
        try:
            for pid, log in enumerate(logs):
                cmd = [sys.executable, str(script), str(pid), str(num_processes), str(port), *args]
                # A session of its own, so the kill below reaches anything the process started.
                procs.append(
                    subprocess.Popen(
                        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                    )
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                codes = [p.poll() for p in procs]
                if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                    break
                time.sleep(0.1)
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            for p in procs:
                p.wait()
        results = []
        for pid, (p, log) in enumerate(zip(procs, logs, strict=True)):
            log.seek(0)
            killed = p.returncode == -signal.SIGKILL
            results.append(Finished(pid, None if killed else p.returncode, log.read(), p.pid))
    return results


def _status(r: Finished) -> str:
    if r.returncode is None:
        return "killed (timeout, or another process failed)"
    return f"exit {r.returncode}"


def assert_all_succeeded(results: list[Finished]) -> None:
    """Fails with every process's output unless all exited 0."""
    if any(r.returncode != 0 for r in results):
        report = "\n".join(
            f"--- process {r.process_id}: {_status(r)}\n{r.output[-4000:]}" for r in results
        )
        raise AssertionError(f"multi-process run failed:\n{report}")
