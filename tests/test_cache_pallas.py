"""The Pallas backend of kvshard.cache: interpret mode on 8 CPU devices, and a TPU lowering.

Interpret mode compiles slowly (~10 s per executable) and runs ~1 s per call, so every test here
uses one tiny fixed shape per executable and few examples. The dense oracle and helpers come
from _cache_helpers.py.

Executed tests here use meshes of at most 4 devices; every 8-device mesh shape runs in
test_pallas_meshes.py. Pallas TPU interpret mode starts every kernel with a global
``threading.Barrier`` across the mesh's devices
(jax/_src/pallas/mosaic/interpret/interpret_pallas_call.py, ``_barrier``), which needs a CPU
client thread per device: conftest.py sets ``NPROC=16`` for that (without it, 8 simulated
devices on a 2-core host deadlocked). The 8-device TPU export test only lowers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _cache_helpers import Oracle, assert_matches, fixed_slices, make_mesh, random_kv, small_spec
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kvshard import BackendOptions
from kvshard.cache import CacheSpec, abstract_cache, init_cache, update
from kvshard.testing import update_slices

pytestmark = pytest.mark.slow


# 1 KV head on a 2-way head axis: replication 2, padded head_dim, 2 layers, 16 slots a pool.
SPEC = small_spec(1, head_dim=64, num_layers=2, num_pages=4)


@pytest.mark.usefixtures("small_kernel_blocks")
@pytest.mark.parametrize("kv_layout", ["interleaved", "packed"])
@settings(max_examples=4)
@given(
    st.data(),
    st.lists(st.integers(0, SPEC.num_layers - 1), min_size=1, max_size=2),
    st.integers(0, 2**32 - 1),
)
def test_pallas_matches_oracle_and_xla(kv_layout, data, layers, seed):
    """The kernel DMAs slot rows whatever they hold: [2, 128] interleaved rows or one packed
    [1, 128] K|V row per head."""
    spec = dataclasses.replace(SPEC, kv_layout=kv_layout)
    mesh = make_mesh((2, 2))
    pallas = init_cache(spec, mesh)
    xla = init_cache(spec, mesh)
    oracle = Oracle(spec, 1)
    rng = np.random.default_rng(seed)
    for layer in layers:
        slices, num, num_tokens = data.draw(
            update_slices(
                page_size=SPEC.page_size,
                num_pages=SPEC.num_pages,
                max_slices=4,
                max_padding=2,
                fixed_shapes=True,
            )
        )
        k, v = random_kv(rng, spec, num_tokens)
        pallas = update(pallas, layer, k, v, slices, num, backend="pallas")
        xla = update(xla, layer, k, v, slices, num, backend="xla")
        oracle.update(layer, k, v, slices, num, pooled=False)
    assert_matches(pallas, oracle)
    np.testing.assert_array_equal(np.asarray(pallas.kv), np.asarray(xla.kv))


@pytest.mark.usefixtures("small_kernel_blocks")
def test_pallas_pooled_update_in_place():
    """Data-parallel pools, one compile: checks memory, donation and values together."""
    spec = CacheSpec(
        num_layers=2, num_kv_heads=4, head_dim=128, page_size=4, num_pages=64, dtype="float32"
    )
    mesh = make_mesh((2, 2))
    cache = init_cache(spec, mesh, page_axis="data")
    rng = np.random.default_rng(0)
    k, v = random_kv(rng, spec, 8, 2)
    slices, num = fixed_slices(2)
    rep = NamedSharding(mesh, P())
    args = [jax.device_put(x, rep) for x in (np.int32(1), k, v, slices, num)]
    write = lambda c, *a: update(c, *a, backend="pallas")  # the caller's own jit, cache donated
    compiled = jax.jit(write, donate_argnums=0).lower(cache, *args).compile()
    stats = compiled.memory_analysis()
    layer_bytes = spec.bytes_per_device(2) // spec.num_layers  # 512 KiB a layer a device
    assert stats.temp_size_in_bytes < layer_bytes // 4, stats

    before = cache.kv
    cache = compiled(cache, *args)
    assert before.is_deleted()
    oracle = Oracle(spec, 2)
    oracle.update(1, k, v, slices, num, pooled=True)
    assert_matches(cache, oracle)


@pytest.mark.usefixtures("small_kernel_blocks")
def test_pallas_scan_over_layers():
    spec = small_spec(2, head_dim=128, num_layers=2, num_pages=4)
    mesh = make_mesh((1, 4))
    cache = init_cache(spec, mesh)
    rng = np.random.default_rng(1)
    ks, vs = zip(*(random_kv(rng, spec, 8) for _ in range(2)), strict=True)
    ks, vs = np.stack(ks), np.stack(vs)
    slices, num = fixed_slices()

    @jax.jit
    def step(cache, ks, vs):
        def body(cache, xs):
            layer, k, v = xs
            return update(cache, layer, k, v, slices, num, backend="pallas"), None

        return jax.lax.scan(body, cache, (jnp.arange(2), ks, vs))[0]

    cache = step(cache, ks, vs)
    oracle = Oracle(spec, 1)
    for layer in range(2):
        oracle.update(layer, ks[layer], vs[layer], slices, num, pooled=False)
    assert_matches(cache, oracle)


@pytest.mark.parametrize("head_dim", [128, 64])  # interleaved; packed (one [8, 128] K|V row)
@pytest.mark.parametrize("page_axis", [None, "data"])
def test_sharded_update_lowers_for_tpu(page_axis, head_dim):
    """Export for TPU from this CPU host: the per-device body is a Mosaic custom call."""
    spec = CacheSpec(
        num_layers=4, num_kv_heads=8, head_dim=head_dim, page_size=16, num_pages=32,
        dtype="bfloat16",
    )  # fmt: skip
    assert spec.kv_layout == ("packed" if head_dim == 64 else "interleaved")
    mesh = make_mesh((2, 4))
    # The cache a TPU would hold (native bf16; this CPU mesh's own would store bf16 bits).
    cache = abstract_cache(spec, mesh, page_axis=page_axis, platform="tpu")
    assert cache.kv.dtype == jnp.bfloat16
    lead = (2,) if page_axis else ()

    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))

    args = (
        cache,
        sds((), jnp.int32),
        sds((*lead, 64, 8, head_dim), jnp.bfloat16),
        sds((*lead, 64, 8, head_dim), jnp.bfloat16),
        sds((*lead, 3, 16), jnp.int32),
        sds((*lead, 1), jnp.int32),
    )

    def fn(cache, layer, k, v, slices, num):
        return update(
            cache,
            layer,
            k,
            v,
            slices,
            num,
            backend="pallas",
            options=BackendOptions(interpret=False),
        )

    exported = jax.export.export(jax.jit(fn, donate_argnums=0), platforms=["tpu"])(*args)
    text = exported.mlir_module()
    assert "tpu_custom_call" in text
    # In place on TPU: the kernel aliases its cache operand to its output, and the donated
    # cache argument of the whole program is aliased to output 0.
    assert "output_operand_aliases" in text
    assert "tf.aliasing_output = 0" in text
    assert exported.nr_devices == 8
    assert exported.platforms == ("tpu",)
