"""Test set-up: 8 simulated CPU devices, set before JAX initialises its backends."""

import os

# Must run before `import jax` anywhere in the test process (pytest imports conftest first).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
from hypothesis import HealthCheck, settings

jax.config.update("jax_num_cpu_devices", 8)

# JAX calls compile on first use; hypothesis must not count that against a deadline.
settings.register_profile(
    "kvshard",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("kvshard")
