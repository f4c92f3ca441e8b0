"""The stacked cache of a model with layer groups: CacheSpec(layer_types=...), its shapes and
memory, update / gather / copy_pages / swaps through each layer's group, the drop rule and
the refusals. Reads through attention are test_attention_groups.py's.

A Gemma-3-shaped model (12 layers, five sliding per full) stacks group_size = 2 cache layers,
not 12: the memory saving is asserted from the spec's own numbers against the all-full layout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _cache_helpers import make_mesh, run_checked
from _compiles import compile_log
from _groups import FULL, GEMMA3, GPT_OSS, PAGE, SLIDING, STEPS, History, grouped_spec

import kvshard
from kvshard.cli import preset_config

# --------------------------------------------------------------------------------------------
# The spec: groups, shapes, memory
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer_types", "cache_layers", "groups"), [(GEMMA3, 2, 6), (GPT_OSS, 3, 2)]
)
def test_grouped_layout_stacks_group_size_cache_layers(layer_types, cache_layers, groups):
    spec = grouped_spec(layer_types)
    everything_full = dataclasses.replace(spec, layer_types=(FULL,) * len(layer_types))
    assert everything_full.layer_types is None  # an all-full list is the spec without types
    assert (spec.num_cache_layers, spec.num_groups) == (cache_layers, groups)
    assert spec.global_shape(2)[0] == spec.local_shape(2)[0] == cache_layers
    assert everything_full.global_shape(2)[0] == len(layer_types)
    # Gemma 3: 2 of 12 layers' bytes (a sixth), gpt-oss: 3 of 6 (a half).
    saving = everything_full.bytes_per_device(2) * cache_layers
    assert spec.bytes_per_device(2) * len(layer_types) == saving
    mesh = make_mesh((1, 2))
    cache = kvshard.init_cache(spec, mesh)
    assert cache.kv.shape == spec.global_shape(2)
    assert kvshard.abstract_cache(spec, mesh).kv.shape == spec.global_shape(2)
    host = kvshard.init_host_cache(spec, mesh, 3)
    assert host.kv.shape == (cache_layers, 3 * PAGE, *spec.global_shape(2)[2:])


def test_layer_types_are_checked_and_stored_hashable():
    spec = grouped_spec([list(t) for t in GEMMA3])  # JSON spells tuples as lists
    assert spec.layer_types == GEMMA3 and hash(spec) == hash(grouped_spec(GEMMA3))
    assert spec.groups.layer_group[:6] == (0, 1, 2, 3, 4, 5)
    assert spec.groups.layer_slot == (0,) * 6 + (1,) * 6
    for bad, message in (
        (GEMMA3[:-1], r"CacheSpec\.layer_types has 11 entries; need one per layer \(12\)"),
        ((*GEMMA3[:-1], ("sliding", 0)), r"CacheSpec\.layer_types\[11\]=\('sliding', 0\)"),
        ("full", r"CacheSpec\.layer_types='full' must be a sequence"),
    ):
        with pytest.raises(ValueError, match=message):
            kvshard.CacheSpec(12, 2, 64, PAGE, 8, layer_types=bad)


def test_from_config_reads_each_layers_type():
    config = preset_config("gemma-3-27b")
    spec = kvshard.CacheSpec.from_config(config, page_size=32, num_pages=8)
    assert spec.layer_types == kvshard.read_model_config(config).layer_types
    assert spec.layer_types.count(("sliding", 1024)) == 52 and spec.layer_types.count(FULL) == 10
    assert (spec.num_cache_layers, spec.num_groups) == (10, 7)  # 52 local -> 6 groups of <= 10
    plain = kvshard.CacheSpec.from_config(config, page_size=32, num_pages=8, layer_types=None)
    assert plain.num_cache_layers == 62


# --------------------------------------------------------------------------------------------
# update and gather through the layer's group
# --------------------------------------------------------------------------------------------


def _written(spec, backend, *, traced=False):
    """One step of every layer (update through each layer's group); returns the cache and the
    history, whose step wrote layer l's tokens at its group's pages."""
    cache = kvshard.init_cache(spec, make_mesh((1, 2)))
    history = History(spec, np.random.default_rng(1))
    step, k, v, _ = history.step(STEPS[0])
    write = (lambda c, *a: kvshard.update(c, *a, backend=backend)) if not traced else None
    if traced:
        write = jax.jit(lambda c, *a: kvshard.update(c, *a, backend=backend), donate_argnums=0)
    for layer in range(spec.num_layers):
        layer_arg = jnp.int32(layer) if traced else layer
        cache = write(cache, layer_arg, k[layer], v[layer], step)
    return cache, history, step


def _read_back(cache, history, layer):
    """K, V that gather reads at the slots of each request's tokens in the layer's group."""
    spec = cache.spec
    pages = history.pages[spec.groups.layer_group[layer]]
    for r, n in enumerate(history.lengths):
        slots = (pages[r][np.arange(n) // PAGE] * PAGE + np.arange(n) % PAGE).astype(np.int32)
        k, v = kvshard.gather(cache, layer, slots)
        yield np.asarray(k), np.asarray(v), history.k[layer][r], history.v[layer][r]


@pytest.mark.usefixtures("small_kernel_blocks")  # the pallas backend's (conftest.py)
@pytest.mark.parametrize(("backend", "traced"), [("xla", False), ("pallas", False), ("xla", True)])
def test_update_writes_each_layer_into_its_cache_layer_of_its_groups_pages(backend, traced):
    spec = grouped_spec(GPT_OSS)
    cache, history, _ = _written(spec, backend, traced=traced)
    for layer in range(spec.num_layers):
        for k, v, want_k, want_v in _read_back(cache, history, layer):
            np.testing.assert_array_equal(k, want_k)
            np.testing.assert_array_equal(v, want_v)
    # Nothing else was written: the null page and every unused page hold zeros.
    kv = np.asarray(cache.kv)
    used = {int(p) for g in range(spec.num_groups) for p in history.pages[g][:, :3].ravel()}
    unused = [p for p in range(spec.num_pages) if p not in used]
    assert not kv.reshape(spec.num_cache_layers, spec.num_pages, -1)[:, unused].any()


def test_one_update_executable_serves_every_layer_of_every_group():
    # Shapes no other test uses (5 tokens, 9 pages), so the first call
    # below must compile: a positive control.
    spec = kvshard.CacheSpec(6, 2, 64, PAGE, 9, "float32", layer_types=GPT_OSS)
    cache = kvshard.init_cache(spec, make_mesh((1, 2)))
    slices = np.array([[[4, 0, 2]], [[8, 0, 2]]], np.int32).transpose(0, 2, 1).copy()
    k = np.ones((5, 2, 64), np.float32)
    with compile_log() as log:
        for layer in (0, 1, np.int32(2), 3, jnp.int32(4), 5):
            cache = kvshard.update(cache, layer, k, k, slices, np.array([1], np.int32))
    assert log.count("_write") == 1, log.messages


def test_vllm_form_takes_slices_with_a_group_axis():
    spec = grouped_spec(GPT_OSS)
    cache, _, step = _written(spec, "xla")
    again = kvshard.init_cache(spec, make_mesh((1, 2)))
    # History's stream of _written's seed: the same k, v as its step.
    _, k, v, _ = History(spec, np.random.default_rng(1)).step(STEPS[0])
    for layer in range(spec.num_layers):
        again = kvshard.update(again, layer, k[layer], v[layer], step.slices, step.num_slices)
    np.testing.assert_array_equal(np.asarray(again.kv), np.asarray(cache.kv))
    with pytest.raises(ValueError, match=r"slices must have shape \[num_groups, 3, S\]"):
        kvshard.update(again, 0, k[0], v[0], step.slices[0], step.num_slices)


def test_a_step_of_another_group_count_is_refused_before_anything_is_donated():
    spec = grouped_spec(GPT_OSS)
    cache, _, step = _written(spec, "xla")
    before = np.asarray(cache.kv)
    k = np.zeros((32, 2, 64), np.float32)
    other = step.__class__(**{**step.__dict__, "geometry": step.geometry._replace(num_groups=3)})
    with pytest.raises(
        ValueError, match=r"step\.geometry\.num_groups=3 but the cache has num_groups=2"
    ):
        kvshard.update(cache, 0, k, k, other)
    one_group = dataclasses.replace(spec, layer_types=(SLIDING,) * 6)
    ungrouped = kvshard.init_cache(one_group, make_mesh((1, 2)))
    with pytest.raises(
        ValueError, match=r"step\.geometry\.num_groups=2 but the cache has num_groups=1"
    ):
        kvshard.attention(ungrouped, 0, np.zeros((32, 4, 64), np.float32), step, sm_scale=0.1)
    short = step.__class__(**{**step.__dict__, "page_indices": step.page_indices[:1]})
    with pytest.raises(ValueError, match=r"step\.geometry\.num_groups=2 does not match its arrays"):
        kvshard.update(cache, 0, k, k, short)
    assert not cache.kv.is_deleted()
    np.testing.assert_array_equal(np.asarray(cache.kv), before)


@pytest.mark.usefixtures("small_kernel_blocks")  # the pallas backend's (conftest.py)
@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_a_traced_layer_out_of_range_writes_nothing_and_checks_report_it(backend):
    spec = grouped_spec(GPT_OSS)
    cache, _, step = _written(spec, "xla")
    before = np.asarray(cache.kv)
    k = np.full((32, 2, 64), 7.0, np.float32)

    def write(c, layer, checks=False):
        return kvshard.update(c, layer, k, k, step, backend=backend, checks=checks)

    write_traced = jax.jit(write)
    for layer in (-1, spec.num_layers, 2**31 - 1):
        out = write_traced(cache, jnp.int32(layer))
        np.testing.assert_array_equal(np.asarray(out.kv), before)
        cache = out
    error, _ = run_checked(lambda c, layer: write(c, layer, True), cache, jnp.int32(6))
    assert error is not None and "update: layer=6 is out of range [0, 6)" in error


def test_caller_jit_updates_the_grouped_cache_in_place():
    spec = kvshard.CacheSpec(12, 8, 128, 16, 64, "float32", layer_types=GEMMA3)
    mesh = make_mesh((1, 4))
    cache = kvshard.init_cache(spec, mesh)
    slices = np.zeros((spec.num_groups, 3, 4), np.int32)
    slices[:, :, 0] = [[16 * (g + 1), 0, 16] for g in range(spec.num_groups)]
    k = np.ones((16, 8, 128), np.float32)
    num = np.array([1], np.int32)
    write = jax.jit(
        lambda c, layer, k, s, n: kvshard.update(c, layer, k, k, s, n), donate_argnums=0
    )
    stats = write.lower(cache, np.int32(0), k, slices, num).compile().memory_analysis()
    assert stats.alias_size_in_bytes >= spec.bytes_per_device(4), stats
    assert stats.temp_size_in_bytes < spec.bytes_per_device(4) // spec.num_cache_layers // 4
    before = cache.kv
    cache = write(cache, np.int32(11), k, slices, num)
    assert before.is_deleted()
    got, _ = kvshard.gather(cache, 11, np.arange(6 * 16, 7 * 16, dtype=np.int32))  # group 5
    np.testing.assert_array_equal(np.asarray(got), k)


# --------------------------------------------------------------------------------------------
# copy_pages and swaps move whole pages: every cache layer
# --------------------------------------------------------------------------------------------


def test_copy_pages_and_swaps_move_every_cache_layer_of_a_page():
    spec = grouped_spec(GPT_OSS)
    cache, history, _ = _written(spec, "xla")
    src = history.pages[0][0, :2]  # request 0's first two pages of group 0
    dst = np.array([spec.num_pages - 2, spec.num_pages - 1], np.int32)
    cache = kvshard.copy_pages(cache, np.stack([src, dst], axis=1))
    host = kvshard.init_host_cache(spec, cache.mesh, 4)
    cache, host = kvshard.swap_out(cache, host, np.array([[dst[0], 1]], np.int32))
    # Rows are (device page, host page) both ways.
    cache, host = kvshard.swap_in(cache, host, np.array([[dst[1] - 2, 1]], np.int32))
    for layer in spec.groups.group_layers[0]:  # every cache layer of group 0
        slots = lambda pages: (pages[:, None] * PAGE + np.arange(PAGE)).ravel().astype(np.int32)
        want = np.asarray(kvshard.gather(cache, layer, slots(src))[0])
        np.testing.assert_array_equal(np.asarray(kvshard.gather(cache, layer, slots(dst))[0]), want)
        swapped = np.asarray(kvshard.gather(cache, layer, slots(dst[1:] - 2))[0])
        np.testing.assert_array_equal(swapped, want[:PAGE])
