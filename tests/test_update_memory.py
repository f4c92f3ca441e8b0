"""The donated update stays in place in every supported dtype: compiled temporaries are bounded
by the new tokens, never by the cache (the bfloat16/float8 full-cache copy on CPU must not return),
in kvshard's own executables and inside the caller's jit with a bf16 model.
"""

from __future__ import annotations

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16/float8 names with NumPy)
import numpy as np
import pytest

import kvshard
from kvshard._geometry.layout import SUPPORTED_DTYPES
from kvshard.benchmarks.callers_jit import sized_spec, temporaries
from kvshard.benchmarks.memory import attention_memory, update_memory


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_update_temporaries_at_most_twice_the_new_tokens(dtype):
    tokens = 64
    m = update_memory(dtype, 8 * 2**20, tokens)  # an 8 MiB cache, 64 new tokens (4 pages)
    itemsize = np.dtype(dtype).itemsize
    assert m["new_token_bytes"] == tokens * 2 * 8 * 128 * itemsize  # k and v, 8 heads, D=128
    assert m["cache_bytes"] == 8 * 2**20
    # A full-cache copy needs temporaries of at least the cache: 64x the new tokens here. A
    # quantized (or bit-stored) write holds its converted k/v twice (read by the page loop and
    # by the scatter) plus the int32 slot indices (T x 3 per scatter): 4 KiB covers those.
    assert m["temp_bytes"] <= 2 * m["new_token_bytes"] + 4096, m
    assert m["alias_bytes"] == m["cache_bytes"], m  # the output is the donated buffer


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_update_with_one_kv_head_per_device_stays_in_place(dtype):
    # 8 KV heads over 8 devices: each device's block holds one K/V pair, whose view with a
    # size-1 head axis once made XLA copy the whole block in and out (temporaries = the cache).
    m = update_memory(dtype, 8 * 2**20, 64, devices=8)
    assert m["cache_bytes"] == 2**20  # per device
    assert m["temp_bytes"] <= 2 * m["new_token_bytes"] + 4096, m
    assert m["alias_bytes"] == m["cache_bytes"], m


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_attention_never_copies_or_upcasts_the_cache(dtype):
    # 16 queries over one request's 256-token context, on an 8 MiB and a 32 MiB cache: the
    # temporaries (the pages each step gathers) must not grow with the cache, as they did when
    # the bf16/fp8 gather upcast the whole cache to float32 on CPU.
    small = attention_memory(dtype, 8 * 2**20, 16, context=256)
    large = attention_memory(dtype, 32 * 2**20, 16, context=256)
    assert (small["cache_bytes"], large["cache_bytes"]) == (8 * 2**20, 32 * 2**20)
    assert large["temp_bytes"] == small["temp_bytes"], (small, large)


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_callers_jit_with_a_bf16_model_stays_in_place(dtype):
    # The serving pattern: the caller's own jit, a lax.scan over 2 layers, the cache donated,
    # bf16 weights and activations (so XLA's CPU float normalization stays on), update +
    # attention per layer, no compiler option. A copy of the cache (the bf16/fp8 convert round
    # trip) would need temporaries of at least the cache; a decode step needs a few pages.
    m = temporaries(dtype, cache_mib=64)
    assert m["cache_bytes"] >= 63 * 2**20
    assert m["temp_bytes"] < 0.25 * m["cache_bytes"], m
    assert m["alias_bytes"] == m["cache_bytes"], m  # the output is the donated buffer


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float8_e5m2"])
def test_native_storage_on_cpu_copies_the_cache_where_kvshard_stores_bits(dtype):
    # The control: the same forward on a cache stored natively (the GPU/TPU storage). XLA's
    # CPU compiler rewrites float8 ops in float32 on every JAX version kvshard supports, and
    # bfloat16 ones up to JAX 0.10 (0.11 computes on a bfloat16 cache in place): a copy of
    # the cache exactly where kvshard stores the bits instead (kvshard._device.storage).
    copies = dtype != "bfloat16" or jax.__version_info__ < (0, 11)
    m = temporaries(dtype, cache_mib=64, platform="gpu")
    assert (m["temp_bytes"] > m["cache_bytes"]) == copies, m
    mesh = jax.make_mesh((1,), ("model",), devices=jax.devices()[:1])
    stored = kvshard.abstract_cache(sized_spec(dtype, 1), mesh).kv.dtype
    assert (stored != np.dtype(dtype)) == copies, stored
