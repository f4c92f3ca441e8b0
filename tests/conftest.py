"""Test set-up: 8 simulated CPU devices and a 16-thread CPU client, set before JAX initialises."""

import os

# Must run before `import jax` anywhere in the test process (pytest imports conftest first).
# LLVM at -O0: the suite compiles hundreds of small executables and runs each a few times, so
# code generation time dominates (measured: 92 s -> 80 s on the attention grid, the grouped
# cache and the memory tests). Buffer assignment, aliasing and donation are HLO passes, which
# this flag leaves alone, so the in-place and temporaries tests test the same executables'
# memory; no test asserts a timing. The example scripts the tests start (tests/_scripts.py)
# get -O0 too; `kvshard bench` and the examples run by hand keep the default level.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + (
        ""
        if "optimization_level" in os.environ.get("XLA_FLAGS", "")
        else " --xla_backend_optimization_level=0"
    )
    + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's CPU client sizes its thread pool from NPROC (else the core count); Pallas TPU interpret
# mode needs every simulated device's thread at once, so 8 devices on 2 cores would deadlock
# (docs/guides/fuzzing.md). Read once, when JAX creates its CPU client.
os.environ.setdefault("NPROC", "16")
# One OpenBLAS thread for numpy (the float64 oracles), here and in every script the tests start
# (they inherit the environment): with both cores busy (`-n 2`), its default thread a core
# waits on the other worker's core. Measured with one core kept busy: the demo's dense model
# 31-43 ms -> 12-21 ms a call; examples/prefix_sharing.py (the test's flags) 23.5 s -> 12.7 s.
# Read when numpy loads its BLAS, which no plugin imports before this file.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import pytest
from hypothesis import HealthCheck, settings
from jax.experimental.pallas import tpu as pltpu

jax.config.update("jax_num_cpu_devices", 8)

# JAX calls compile on first use; hypothesis must not count that against a deadline.
settings.register_profile(
    "kvshard",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("kvshard")

# The longest tests (each tens of seconds on 2 cores: subprocesses, state machines) run first,
# so that `pytest -n auto` does not end with one worker finishing a long test alone. Order
# within each group is the collection order; nothing is skipped.
_LONG_FIRST = (
    "tests/test_system_state_machine.py",
    "tests/test_multihost.py",
    "tests/test_flax_llama.py",
    "tests/test_packaging.py",
    "tests/test_examples.py",
    "tests/test_allocator_machine.py",
    "tests/test_models_serving.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::", 1)[0]
        return _LONG_FIRST.index(path) if path in _LONG_FIRST else len(_LONG_FIRST)

    items.sort(key=rank)  # stable: the collection order within a group


@pytest.fixture
def small_kernel_blocks(monkeypatch):
    """2 slices a kernel block instead of up to 64, for tests of the Pallas update path whose
    subject is not the block size: interpret mode compiles every unrolled DMA into host
    callbacks and runs all 64 of a block, used or not (about 18 vs 1 CPU-seconds an executable,
    see test_pallas_meshes.py; test_attention_groups' pallas test: 14.5 s -> 3.3 s), and a
    step's slices then span several grid steps. The default block stays under test where the
    update kernel is the subject (test_kernel*.py), in test_attention.py and test_quant.py."""
    from kvshard.kernels import budgets

    monkeypatch.setattr(budgets, "MAX_SLICES_PER_BLOCK", 2)
    # Fails if the block rule stops reading the constant there (the fixture would do nothing).
    assert budgets.default_num_slices_per_block(4, 2, 128, "float32") == 2


@pytest.fixture(autouse=True)
def _fresh_tpu_interpret_state():
    """Pallas TPU interpret mode keeps its simulated memory in process-global state and leaves
    it behind when a kernel raises (for debugging); the next kernel on another number of
    devices then fails an internal assert. Each test starts from a clean simulator, whatever
    ran before it on this worker."""
    yield
    pltpu.reset_tpu_interpret_mode_state()
