"""What a plain ``pip install kvshard`` gets: package data, the demo, the command line.

The fast test reads pyproject.toml; the wheel test builds a real wheel (pip, isolated build),
unpacks it and runs ``python -m kvshard`` from outside the source tree.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_data_file_is_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["kvshard"]
    package = ROOT / "kvshard"
    data = [
        p.relative_to(package).as_posix()
        for p in package.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    ]
    assert "configs/llama-3-8b.json" in data
    for name in data:
        assert any(fnmatch.fnmatch(name, g) for g in globs), f"{name} is not in {globs}"


@pytest.mark.extended  # slow: .ci/run's extended step
@pytest.mark.wheel
def test_wheel_runs_plan_and_demo_outside_the_source_tree(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "kvshard", src / "kvshard", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = tmp_path.glob("kvshard-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in (
        "kvshard/configs/mistral-7b.json",
        "kvshard/py.typed",
        "kvshard/_demo/model.py",
        "kvshard/benchmarks/attention_decode.py",
        "kvshard/benchmarks/update_schedules.py",
    ):
        assert name in names, name
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)

    # LLVM -O0 as in the test process (conftest.py): the demo's time is its compilations.
    xla_flags = "--xla_backend_optimization_level=0"
    env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags}
    run = lambda *argv: subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the source tree
        env=env,
        timeout=300,
        check=False,
    )
    where = run("-c", "import kvshard; print(kvshard.__file__)")
    assert where.stdout.strip() == str(site / "kvshard" / "__init__.py"), where.stderr
    plan = run("-m", "kvshard", "plan", "--model", "mistral-7b", "--hbm-per-device", "1GiB")
    assert plan.returncode == 0 and "with sliding window 4,096" in plan.stdout, plan.stderr
    # Two steps: a prefill and a decode, each checked against the dense model by the demo.
    demo = run("-m", "kvshard", "demo", "--layers", "1", "--num-requests", "2", "--steps", "2")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "max abs diff" in demo.stdout
    # The benchmarks ship too: the suite runs from the wheel (a host-only table, fast).
    bench = run("-m", "kvshard", "bench", "--only", "tpu_schedule", "--out", str(tmp_path / "r"))
    assert bench.returncode == 0, bench.stdout + bench.stderr
    assert (tmp_path / "r" / "tpu_schedule.json").is_file()
