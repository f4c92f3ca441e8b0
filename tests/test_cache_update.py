"""Tests of kvshard.cache.update (kvshard/cache/_update.py), XLA backend, concrete arguments.

What update writes is compared with the dense oracle of _cache_helpers on every mesh shape;
update is in place (donated, aliased, one executable for every layer); and every bad host
argument is refused before anything is donated, naming the argument, the value and the bound,
with the cache left exactly as it was. Traced arguments (the drop rule inside jit and
``checks=True``) are test_cache_update_traced.py's; the Pallas backend is
test_cache_pallas.py's (interpret mode is slow).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _cache_helpers import (
    HEADS,
    MESH_SHAPES,
    Oracle,
    assert_matches,
    fixed_slices,
    make_mesh,
    page_marked_cache,
    page_values,
    random_kv,
    small_spec,
)
from _compiles import compile_log
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kvshard
from kvshard.cache import CacheSpec, gather, init_cache, update
from kvshard.cache._update_local import LOCAL_UPDATES, _write_rows
from kvshard.testing import update_slices

# --------------------------------------------------------------------------------------------
# update against the dense oracle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("auto", [False, True], ids=["explicit", "auto"])
@pytest.mark.parametrize("page_axis", [None, "data"])
@pytest.mark.parametrize("shape", MESH_SHAPES)
def test_update_gather_all_meshes_and_heads(shape, page_axis, auto):
    mesh = make_mesh(shape, auto=auto)
    rng = np.random.default_rng(1)
    groups = shape[0] if page_axis else None
    for i, heads in enumerate(HEADS if not auto else [1, 16]):
        # Both layouts on every mesh, at no extra cost: the head counts alternate them.
        spec = small_spec(heads, num_layers=2, kv_layout=("packed", "interleaved")[i % 2])
        cache = init_cache(spec, mesh, page_axis=page_axis)
        oracle = Oracle(spec, groups or 1)
        slices, num = fixed_slices(groups)
        for layer in (1, 0):
            k, v = random_kv(rng, spec, 9, groups)
            cache = update(cache, layer, k, v, slices, num, backend="xla")
            oracle.update(layer, k, v, slices, num, pooled=page_axis is not None)
        assert_matches(cache, oracle)


def _draw_pool_slices(draw, spec, max_slices):
    return draw(
        update_slices(
            page_size=spec.page_size,
            num_pages=spec.num_pages,
            max_slices=max_slices,
            max_padding=2,
            fixed_shapes=True,
        )
    )


@st.composite
def update_sequences(draw):
    """(mesh shape, spec, page_axis, [(layer, slices, num, num_tokens)...])."""
    shape = draw(st.sampled_from(MESH_SHAPES))
    heads = draw(st.sampled_from(HEADS))
    page_axis = draw(st.sampled_from([None, "data"]))
    dtype = draw(st.sampled_from(["float32", "bfloat16"]))
    # head_dim 32 and 64 in both layouts (packed rows: 64 or 128 lanes of values in 128).
    head_dim = draw(st.sampled_from([32, 64]))
    kv_layout = draw(st.sampled_from(["interleaved", "packed"]))
    spec = small_spec(heads, dtype=dtype, head_dim=head_dim, kv_layout=kv_layout)
    groups = shape[0] if page_axis else 1
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        layer = draw(st.integers(0, spec.num_layers - 1))
        drawn = [_draw_pool_slices(draw, spec, max_slices=4) for _ in range(groups)]
        slices = np.stack([d[0] for d in drawn])
        num = np.stack([d[1] for d in drawn])
        steps.append((layer, slices, num, drawn[0][2]))
    return shape, spec, page_axis, steps


@settings(max_examples=15)
@given(update_sequences(), st.randoms(use_true_random=False))
def test_random_updates_match_dense_oracle(case, rand):
    shape, spec, page_axis, steps = case
    pooled = page_axis is not None
    mesh = make_mesh(shape)
    cache = init_cache(spec, mesh, page_axis=page_axis)
    oracle = Oracle(spec, shape[0] if pooled else 1)
    rng = np.random.default_rng(rand.getrandbits(32))
    for layer, slices, num, num_tokens in steps:
        k, v = (x.astype(spec.np_dtype) for x in random_kv(rng, spec, num_tokens, slices.shape[0]))
        if not pooled:
            k, v, slices, num = k[0], v[0], slices[0], num[0]
        cache = update(cache, layer, k, v, slices, num, backend="xla")
        oracle.update(layer, k, v, slices, num, pooled)
    assert_matches(cache, oracle)


@pytest.fixture
def gpu_lowering(monkeypatch):
    """kvshard.update's xla backend lowered as on a GPU (every valid token scattered, no page
    loop: kvshard.cache._update_local), run on this CPU. The traces are cleared on both sides:
    the jitted body keeps its traces by static arguments, not by the function it calls."""

    def scatter_all(cache, layer, k, v, slices, num, *, spec, options):
        return _write_rows(cache, layer, k, v, slices, num, spec=spec, page_copies=False)

    jax.clear_caches()
    monkeypatch.setitem(LOCAL_UPDATES, "xla", scatter_all)
    yield
    monkeypatch.undo()
    jax.clear_caches()


@settings(max_examples=8, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(update_sequences(), st.randoms(use_true_random=False))
def test_gpu_lowering_matches_dense_oracle(gpu_lowering, case, rand):
    test_random_updates_match_dense_oracle.hypothesis.inner_test(case, rand)


def test_xla_backend_lowers_a_page_loop_on_cpu_and_a_scatter_on_gpus():
    """The page loop is the `while` whose state carries the cache. (Other loops may appear:
    from JAX 0.11, cumsum lowers for GPUs to a scan, a `while` over the token count in the
    exported module, which XLA compiles to a library prefix sum.)"""
    spec = small_spec(2, dtype="bfloat16")
    mesh = make_mesh((1, 1))
    k, v = random_kv(np.random.default_rng(0), spec, 32)
    slices, num = np.array([[0, 16], [0, 16], [16, 16]], np.int32), np.array([2], np.int32)
    write = jax.jit(lambda c, k, v, s, n: update(c, 0, k, v, s, n, backend="xla"))
    for platform, loops in (("cpu", 1), ("cuda", 0)):
        cache = kvshard.abstract_cache(spec, mesh, platform="gpu" if platform == "cuda" else "cpu")
        text = jax.export.export(write, platforms=[platform])(cache, k, v, slices, num)
        cache_type = "tensor<" + "x".join(map(str, cache.kv.shape)) + "x"
        page_loops = [
            line
            for line in text.mlir_module().splitlines()
            if "stablehlo.while" in line and cache_type in line
        ]
        assert len(page_loops) == loops, (platform, page_loops)


def test_auto_backend_matches_xla_on_cpu():
    spec = small_spec(2)
    mesh = make_mesh((2, 4))
    rng = np.random.default_rng(3)
    k, v = random_kv(rng, spec, 8)
    slices, num = fixed_slices()
    a = update(init_cache(spec, mesh), 0, k, v, slices, num, backend="auto")
    b = update(init_cache(spec, mesh), 0, k, v, slices, num, backend="xla")
    np.testing.assert_array_equal(np.asarray(a.kv), np.asarray(b.kv))


# --------------------------------------------------------------------------------------------
# In place, donation, compilation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page_axis", [None, "data"])
def test_update_is_in_place(page_axis):
    # Big enough that one layer on one device (1 MiB) dwarfs the new tokens (128 KiB).
    spec = CacheSpec(
        num_layers=4, num_kv_heads=8, head_dim=128, page_size=16, num_pages=64, dtype="float32"
    )
    mesh = make_mesh((2, 4))
    cache = init_cache(spec, mesh, page_axis=page_axis)
    dp = 2 if page_axis else None
    rng = np.random.default_rng(5)
    k, v = random_kv(rng, spec, 32, dp)
    slices, num = fixed_slices(dp)
    layer_bytes_per_device = spec.bytes_per_device(4) // spec.num_layers
    rep = NamedSharding(mesh, P())
    args = [jax.device_put(x, rep) for x in (np.int32(0), k, v, slices, num)]
    write = lambda c, *a: update(c, *a, backend="xla")  # the caller's own jit, cache donated
    compiled = jax.jit(write, donate_argnums=0).lower(cache, *args).compile()
    stats = compiled.memory_analysis()
    assert stats.temp_size_in_bytes < layer_bytes_per_device // 4, stats
    # The donated cache is the output buffer.
    assert stats.alias_size_in_bytes >= spec.bytes_per_device(4), stats

    before = cache.kv
    new = update(cache, 3, k, v, slices, num)
    assert before.is_deleted()
    assert not new.kv.is_deleted()
    with pytest.raises(RuntimeError, match=r"deleted|donated"):
        np.asarray(before)


def test_one_executable_serves_every_layer():
    # Shapes no other test uses, so the first call below must compile (a positive control).
    spec = small_spec(4, num_layers=5)
    mesh = make_mesh((4, 2))
    cache = init_cache(spec, mesh)
    rng = np.random.default_rng(6)
    slices, num = fixed_slices()
    with compile_log() as log:
        k, v = random_kv(rng, spec, 11)
        cache = update(cache, 0, k, v, slices, num)
        for layer in (1, 2, np.int32(3), np.int64(4), jnp.int32(2), 0):
            k, v = random_kv(rng, spec, 11)
            cache = update(cache, layer, k, v, slices, num)
    assert log.count("_write") == 1, log.messages


def test_scan_over_layers_with_traced_layer():
    spec = small_spec(2, num_layers=4)
    mesh = make_mesh((2, 4))
    cache = init_cache(spec, mesh, page_axis="data")
    rng = np.random.default_rng(7)
    ks, vs = zip(*(random_kv(rng, spec, 9, 2) for _ in range(4)), strict=True)
    ks, vs = np.stack(ks), np.stack(vs)  # [L, G, T, H, D]
    slices, num = fixed_slices(2)

    @jax.jit
    def step(cache, ks, vs, slices, num):
        def body(cache, xs):
            layer, k, v = xs
            return update(cache, layer, k, v, slices, num), None

        cache, _ = jax.lax.scan(body, cache, (jnp.arange(4), ks, vs))
        # A traced layer on the read side too.
        reads = jax.lax.map(
            lambda layer: gather(cache, layer, jnp.tile(jnp.arange(8), (2, 1))), jnp.arange(4)
        )
        return cache, reads

    cache, (k_read, _) = step(cache, ks, vs, slices, num)
    oracle = Oracle(spec, 2)
    for layer in range(4):
        oracle.update(layer, ks[layer], vs[layer], slices, num, pooled=True)
    assert_matches(cache, oracle)
    np.testing.assert_array_equal(np.asarray(k_read), oracle.k[:, :, :8])


def test_update_inside_user_jit_with_donation():
    spec = small_spec(8)
    mesh = make_mesh((1, 8), auto=True)
    cache = init_cache(spec, mesh)
    rng = np.random.default_rng(8)
    k, v = random_kv(rng, spec, 8)
    slices, num = fixed_slices()
    step = jax.jit(lambda c, k, v, s, n: update(c, 1, k, v, s, n), donate_argnums=0)
    before = cache.kv
    new = step(cache, k, v, slices, num)
    assert before.is_deleted()
    oracle = Oracle(spec, 1)
    oracle.update(1, k, v, slices, num, pooled=False)
    assert_matches(new, oracle)


# --------------------------------------------------------------------------------------------
# Refused host arguments: raised before donation, the cache survives
# --------------------------------------------------------------------------------------------


def _bad_update_calls():
    s, n = fixed_slices()
    k = np.zeros((8, 2, 64), np.float32)
    cross = s.copy()
    cross[:, 0] = [6, 0, 3]
    too_long = s.copy()
    too_long[:, 0] = [4, 0, 5]
    overrun = s.copy()
    overrun[:, 1] = [12, 6, 4]
    past = s.copy()
    past[:, 1] = [30, 3, 4]
    neg = s.copy()
    neg[:, 0] = [-4, 0, 3]
    dup_dst = s.copy()
    dup_dst[:, 1] = [6, 3, 1]
    dup_src = s.copy()
    dup_src[:, 1] = [12, 1, 2]
    return [
        ("layer", dict(layer=3), ValueError, r"layer=3 is out of range \[0, 3\)"),
        ("layer<0", dict(layer=-1), ValueError, r"layer=-1 is out of range"),
        ("layer float", dict(layer=1.0), TypeError, "layer must be an integer scalar"),
        ("layer vector", dict(layer=np.array([1])), TypeError, "layer must be an integer"),
        ("k rank", dict(k=k[0]), ValueError, r"k must have shape \[T, num_kv_heads, head_dim\]"),
        ("k heads", dict(k=np.zeros((8, 3, 64), np.float32)), ValueError, r"k must .*got \[8, 3"),
        ("v head_dim", dict(v=np.zeros((8, 2, 128), np.float32)), ValueError, r"v must have"),
        ("k/v T", dict(v=np.zeros((7, 2, 64), np.float32)), ValueError, "k and v shapes differ"),
        ("k int", dict(k=k.astype(np.int32), v=k.astype(np.int32)), TypeError, "k has dtype int32"),
        ("k/v dtype", dict(v=k.astype(np.float16)), TypeError, "k and v dtypes differ"),
        (
            "slices dtype",
            dict(slices=s.astype(np.float32)),
            TypeError,
            "slices must be an integer array",
        ),
        (
            "slices past int32",
            dict(slices=np.where(s == 4, 2**31, s.astype(np.int64))),
            ValueError,
            r"slices contains 2147483648, outside int32 \[-2147483648, 2147483647\]",
        ),
        (
            "slices shape",
            dict(slices=np.zeros((4, 3), np.int32)),
            ValueError,
            r"slices must have shape \[3, S\]",
        ),
        ("num shape", dict(num_slices=np.array([2, 0], np.int32)), ValueError, "num_slices must"),
        (
            "num dtype",
            dict(num_slices=n.astype(np.float32)),
            TypeError,
            "num_slices must be an integer array",
        ),
        (
            "num range",
            dict(num_slices=np.array([4], np.int32)),
            ValueError,
            r"num_slices=4 must be in \[0, 3\]",
        ),
        ("num neg", dict(num_slices=np.array([-1], np.int32)), ValueError, "num_slices=-1"),
        ("cross page", dict(slices=cross), ValueError, r"slices\[:, 0\].*crosses a page"),
        ("too long", dict(slices=too_long), ValueError, r"slice_len 5 must be <= page_size 4"),
        (
            "tokens",
            dict(slices=overrun),
            ValueError,
            r"slices\[:, 1\]: new_kv_start \+ slice_len 10 must be <= num_tokens 8",
        ),
        (
            "slots",
            dict(slices=past),
            ValueError,
            r"kv_cache_start \+ slice_len 34 must be <= cache rows 32",
        ),
        (
            "negative",
            dict(slices=neg),
            ValueError,
            r"slices\[:, 0\]: kv_cache_start -4 must be >= 0",
        ),
        ("overlap dst", dict(slices=dup_dst), ValueError, "overlaps the destination of slice"),
        ("overlap src", dict(slices=dup_src), ValueError, "overlaps the source of slice"),
        ("backend", dict(backend="cuda"), ValueError, "backend='cuda'"),
        ("cache", dict(cache="cache"), TypeError, "cache must be a KVCache"),
    ]


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [c[1:] for c in _bad_update_calls()],
    ids=[c[0] for c in _bad_update_calls()],
)
def test_bad_update_raises_and_keeps_cache(override, error, match):
    spec = small_spec(2)
    cache = init_cache(spec, make_mesh((2, 4)))
    rng = np.random.default_rng(9)
    k, v = random_kv(rng, spec, 8)
    slices, num = fixed_slices()
    cache = update(cache, 1, k, v, slices, num)
    snapshot = np.asarray(cache.kv)
    args = dict(cache=cache, layer=1, k=k, v=v, slices=slices, num_slices=num, backend="xla")
    args.update(override)
    with pytest.raises(error, match=match):
        update(**args)
    assert not cache.kv.is_deleted()
    np.testing.assert_array_equal(np.asarray(cache.kv), snapshot)
    # Still usable.
    update(cache, 0, k, v, slices, num)


def test_bad_pooled_update_names_the_pool():
    spec = small_spec(2)
    cache = init_cache(spec, make_mesh((2, 4)), page_axis="data")
    rng = np.random.default_rng(10)
    k, v = random_kv(rng, spec, 8, 2)
    slices, num = fixed_slices(2)
    global_slices = slices.copy()
    global_slices[1, 0, :2] += spec.slots_per_pool  # group 1 addressing global slot ids
    with pytest.raises(ValueError, match=r"slices\[1\]\[:, 0\].*another data-parallel pool"):
        update(cache, 0, k, v, global_slices, num)
    with pytest.raises(ValueError, match=r"slices must have shape \[dp, 3, S\] = \[2, 3, \*\]"):
        update(cache, 0, k, v, slices[0], num)
    with pytest.raises(ValueError, match=r"k must have shape \[dp, T, num_kv_heads, head_dim\]"):
        update(cache, 0, k[0], v[0], slices, num)
    with pytest.raises(ValueError, match=r"num_slices must have shape \[dp, 1\]"):
        update(cache, 0, k, v, slices, num[0])
    assert not cache.kv.is_deleted()
    assert not np.asarray(cache.kv).any()


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((1, 2))


GOOD_SLICES = np.array([[0, 6], [0, 1], [1, 1]])  # slot 0 <- token 0, slot 6 <- token 1


@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.int16, np.uint32, np.uint64])
def test_update_accepts_any_integer_dtype(mesh, dtype):
    k = np.full((2, 2, 8), 7.0, np.float32)
    out = update(page_marked_cache(mesh), 0, k, k, GOOD_SLICES.astype(dtype), np.array([2], dtype))
    np.testing.assert_array_equal(page_values(out)[0], [7, 2, 3, 7, 5, 6, 7, 8])


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("slices", 2**31),
        ("slices", -(2**31) - 1),
        ("num_slices", 2**32 + 2),  # wrapped to 2: would look valid after a cast
    ],
)
def test_update_refuses_values_past_int32_and_nothing_changes(mesh, name, value):
    cache = page_marked_cache(mesh)
    before = np.asarray(cache.kv)
    k = np.full((2, 2, 8), 7.0, np.float32)
    args = {"slices": GOOD_SLICES.astype(np.int64), "num_slices": np.array([2], np.int64)}
    args[name].flat[0] = value
    bound = re.escape("outside int32 [-2147483648, 2147483647]")
    with pytest.raises(ValueError, match=rf"^{name} contains {value}, {bound}$"):
        update(cache, 0, k, k, args["slices"], args["num_slices"])
    np.testing.assert_array_equal(np.asarray(cache.kv), before)  # not donated, unchanged


def test_update_checks_true_on_concrete_arguments_writes(mesh):
    # Concrete values are checked on the host; checks=True adds nothing to them.
    k = np.full((2, 2, 8), 7.0, np.float32)
    out = update(page_marked_cache(mesh), 0, k, k, GOOD_SLICES, np.array([2]), checks=True)
    np.testing.assert_array_equal(page_values(out)[0], [7, 2, 3, 7, 5, 6, 7, 8])
