"""The eager fast path (kvshard/_eager.py): an update or attention call equal to one whose
checks passed is a lookup, and it must never change what a call does.

Each test compares the fast path against the full path (the memo cleared): the same output,
the same exception with the same message on bad input, and nothing changed (the cache not
donated, its contents as before). The fast path is detected by ``check_step`` not being called
(spied on as the public name the operation modules import); kvshard._eager's public names
are this file's internal test hook, as kvshard._device.memo's are test_memo.py's.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import jax
import numpy as np
import pytest
from _cache_helpers import make_mesh, small_spec
from _groups import FULL, GEMMA3, SCALE, SLIDING, History, grouped_spec

import kvshard
from kvshard._attention import api as attention_module
from kvshard._eager import EAGER_CALLS
from kvshard.cache import _update as update_module
from kvshard.step import check_step

SEQS, TOKENS = 4, 4


@pytest.fixture(autouse=True)
def empty_memo():
    EAGER_CALLS.clear()
    yield
    EAGER_CALLS.clear()


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((1, 2))


def decode_step(spec, lens=(5, 9, 2, 12)):
    """A decode step of SEQS requests holding ``lens`` tokens (numpy, from build_step)."""
    alloc = kvshard.PageAllocator(
        spec.num_pages, spec.page_size, max_requests=SEQS, max_pages_per_request=4
    )
    alloc.allocate_batch(list(range(SEQS)), list(lens))
    return kvshard.build_step(
        alloc, list(range(SEQS)), [1] * SEQS, num_tokens_padded=TOKENS, max_num_seqs=SEQS
    )


def tokens(spec, seed, heads=None):
    rng = np.random.default_rng(seed)
    shape = (TOKENS, heads or spec.num_kv_heads, spec.head_dim)
    return rng.standard_normal(shape).astype(np.float32)


def spied(module):
    return mock.patch.object(module, "check_step", wraps=check_step)


SPEC = small_spec(num_pages=16)


def test_a_repeated_update_skips_the_checks_and_writes_what_the_full_path_writes(mesh):
    step, k, v = decode_step(SPEC), tokens(SPEC, 0), tokens(SPEC, 1)
    on_device = jax.device_put(k, jax.devices()[0])  # a jax.Array k: another signature
    calls = [(layer, k + layer, v - layer) for layer in range(SPEC.num_layers)]
    calls += [(0, on_device, on_device), (1, on_device, on_device)]
    with spied(update_module) as spy:
        fast = kvshard.init_cache(SPEC, mesh)
        for layer, kl, vl in calls:
            fast = kvshard.update(fast, layer, kl, vl, step)
    assert spy.call_count == 2  # the first call of each k/v signature
    full = kvshard.init_cache(SPEC, mesh)
    for layer, kl, vl in calls:
        EAGER_CALLS.clear()
        full = kvshard.update(full, layer, kl, vl, step)
    np.testing.assert_array_equal(np.asarray(fast.kv), np.asarray(full.kv))


def bad_update_calls(cache, step, k):
    """(name, call) pairs that must raise; each runs after an equal good call was stored."""
    mutated = step.slices.copy()
    mutated[0, 1] = mutated[0, 0]  # two tokens to one slot: overlapping slices
    return [
        ("layer past L", lambda c: kvshard.update(c, SPEC.num_layers, k, k, step)),
        ("negative layer", lambda c: kvshard.update(c, -1, k, k, step)),
        ("overlapping slices", lambda c: kvshard.update(c, 0, k, k, mutated, step.num_slices)),
        ("k of other tokens", lambda c: kvshard.update(c, 0, k[:2], k[:2], step)),
    ]


def test_a_known_update_refuses_what_the_full_path_refuses_and_changes_nothing(mesh):
    step, k = decode_step(SPEC), tokens(SPEC, 2)
    for index in range(len(bad_update_calls(None, step, k))):
        messages = []
        for warm in (True, False):
            EAGER_CALLS.clear()
            cache = kvshard.update(kvshard.init_cache(SPEC, mesh), 0, k, k, step)
            if warm:  # every good shape of the bad calls is known
                cache = kvshard.update(cache, 0, k, k, step.slices, step.num_slices)
                assert len(EAGER_CALLS) == 2
            before = np.asarray(cache.kv)
            name, call = bad_update_calls(cache, step, k)[index]
            with pytest.raises((ValueError, TypeError)) as err:
                call(cache)
            messages.append((type(err.value), str(err.value)))
            assert not cache.kv.is_deleted(), name
            np.testing.assert_array_equal(np.asarray(cache.kv), before, err_msg=name)
        assert messages[0] == messages[1], name


def test_a_known_update_refuses_a_donated_cache(mesh):
    step, k = decode_step(SPEC), tokens(SPEC, 3)
    cache = kvshard.init_cache(SPEC, mesh)
    kvshard.update(kvshard.update(cache, 0, k, k, step), 1, k, k, step)
    with pytest.raises(ValueError, match="donated to an earlier call"):
        kvshard.update(cache, 0, k, k, step)  # the key is known, the buffer is gone


def test_update_with_stats_is_its_own_entry(mesh):
    step, k = decode_step(SPEC), tokens(SPEC, 4)
    cache = kvshard.update(kvshard.init_cache(SPEC, mesh), 0, k, k, step)
    cache, counts = kvshard.update_with_stats(cache, 1, k, k, step)
    assert isinstance(counts, kvshard.SaturationCounts)
    assert isinstance(kvshard.update(cache, 2, k, k, step), kvshard.KVCache)


def test_a_call_inside_a_callers_jit_stores_nothing(mesh):
    step, k = decode_step(SPEC), tokens(SPEC, 5)
    q = tokens(SPEC, 6)

    @jax.jit
    def forward(cache):
        cache = kvshard.update(cache, 0, k, k, step)
        return cache, kvshard.attention(cache, 0, q, step, sm_scale=SCALE)

    cache, out = forward(kvshard.init_cache(SPEC, mesh))
    assert len(EAGER_CALLS) == 0
    EAGER_CALLS.clear()
    eager = kvshard.update(kvshard.init_cache(SPEC, mesh), 0, k, k, step)
    np.testing.assert_array_equal(np.asarray(cache.kv), np.asarray(eager.kv))
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(kvshard.attention(eager, 0, q, step, sm_scale=SCALE))
    )


def test_a_repeated_attention_skips_the_checks_and_reads_what_the_full_path_reads(mesh):
    step = decode_step(SPEC)
    cache = kvshard.init_cache(SPEC, mesh)
    for layer in range(SPEC.num_layers):
        cache = kvshard.update(cache, layer, tokens(SPEC, layer), tokens(SPEC, 10 + layer), step)
    q = tokens(SPEC, 20, heads=4)
    with spied(attention_module) as spy:
        fast = [kvshard.attention(cache, i, q, step, sm_scale=SCALE) for i in range(3)]
    assert spy.call_count == 1
    for layer, out in enumerate(fast):
        EAGER_CALLS.clear()
        full = kvshard.attention(cache, layer, q, step, sm_scale=SCALE)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(full))


def test_a_known_attention_refuses_what_the_full_path_refuses(mesh):
    step = decode_step(SPEC)
    q = tokens(SPEC, 21, heads=4)
    bad_lens = step.kv_lens.copy()
    bad_lens[1] = 4 * SPEC.page_size + 1  # past its page-table row
    calls = [
        lambda c: kvshard.attention(c, SPEC.num_layers, q, step, sm_scale=SCALE),
        lambda c: kvshard.attention(
            c, 0, q, dataclasses.replace(step, kv_lens=bad_lens), sm_scale=SCALE
        ),
    ]
    for call in calls:
        messages = []
        for warm in (True, False):
            EAGER_CALLS.clear()
            cache = kvshard.init_cache(SPEC, mesh)
            if warm:
                kvshard.attention(cache, 0, q, step, sm_scale=SCALE)
            with pytest.raises(ValueError) as err:
                call(cache)
            messages.append(str(err.value))
        assert messages[0] == messages[1]
    cache = kvshard.init_cache(SPEC, mesh)
    kvshard.attention(cache, 0, q, step, sm_scale=SCALE)
    kvshard.update(cache, 0, tokens(SPEC, 22), tokens(SPEC, 23), step)  # donates it
    with pytest.raises(ValueError, match="donated to an earlier call"):
        kvshard.attention(cache, 1, q, step, sm_scale=SCALE)


def test_a_known_attention_reads_each_layer_with_its_own_type():
    """Layer types: one entry serves every layer, each read through its own window, and a
    window that is not a layer's own is refused as the full path refuses it."""
    spec = grouped_spec(GEMMA3)
    cache = kvshard.init_cache(spec, make_mesh((1, 2)))
    history = History(spec, np.random.default_rng(4))
    step, k, v, q = history.step([9, 5, 3])
    for layer in range(spec.num_layers):
        cache = kvshard.update(cache, layer, k[layer], v[layer], step)
    with spied(attention_module) as spy:
        outs = [
            kvshard.attention(cache, layer, q[layer], step, sm_scale=SCALE)
            for layer in range(spec.num_layers)
        ]
    assert spy.call_count == 1
    for layer, out in enumerate(outs):
        np.testing.assert_allclose(
            np.asarray(out)[:17], history.oracle(layer, q[layer])[:17], atol=2e-5
        )
    sliding, full = GEMMA3.index(SLIDING), GEMMA3.index(FULL)
    kvshard.attention(cache, sliding, q[sliding], step, sm_scale=SCALE, sliding_window=6)
    messages = []
    for _ in range(2):
        with pytest.raises(ValueError, match=rf"layer {full} is a .* reads it as") as err:
            kvshard.attention(cache, full, q[full], step, sm_scale=SCALE, sliding_window=6)
        messages.append(str(err.value))
        EAGER_CALLS.clear()
    assert messages[0] == messages[1]


def test_the_key_tells_numpy_from_device_metadata_and_content_from_identity():
    from kvshard._device.memo import call_key as eager_key

    slices = np.array([[0, 1], [0, 1], [1, 1]], np.int32)
    key = eager_key(("update",), (), (slices,))
    assert eager_key(("update",), (), (slices.copy(),)) == key  # content, not identity
    assert eager_key(("update",), (), (jax.numpy.asarray(slices),)) != key  # a device array
    assert eager_key(("update",), (), (slices.astype(np.int64),)) != key  # another dtype
    assert eager_key(("update",), (), (slices.reshape(2, 3),)) != key  # another shape
    slices[2, 1] = 2
    assert eager_key(("update",), (), (slices,)) != key  # mutated in place
    assert eager_key(("update",), (), ([[0, 1]],)) is None  # a list has no key


def test_the_same_step_object_mutated_in_place_is_checked_again(mesh):
    """The last call's slot answers a call with the same StepMetadata object by identity, but
    reads its arrays again: a step changed in place writes where it now says, or is refused
    as the full path refuses it, and nothing changes."""
    step, k = decode_step(SPEC), tokens(SPEC, 5)
    cache = kvshard.update(kvshard.init_cache(SPEC, mesh), 0, k, k, step)
    cache = kvshard.update(cache, 1, k, k, step)  # known: the next equal call is the slot's
    free = int(SPEC.num_pages * SPEC.page_size - 1)  # the last slot: no request's page
    step.slices[0, 0] = free  # request 0's token now goes to the free slot
    with spied(update_module) as spy:
        cache = kvshard.update(cache, 1, 2 * k, 2 * k, step)
    assert spy.call_count == 1  # checked again: new content
    got = np.asarray(kvshard.gather(cache, 1, np.array([free], np.int32)))
    np.testing.assert_array_equal(got[0][0], 2 * k[0])  # K of token 0, at its new slot
    before = np.asarray(cache.kv)
    step.slices[0, 1] = step.slices[0, 0]  # two tokens to one slot: overlapping
    with pytest.raises(ValueError, match="overlap"):
        kvshard.update(cache, 1, k, k, step)
    assert not cache.kv.is_deleted()
    np.testing.assert_array_equal(np.asarray(cache.kv), before)


def test_the_same_slices_arrays_mutated_in_place_are_checked_again(mesh):
    """vLLM's form, update(cache, layer, k, v, slices, num_slices), with the same two arrays:
    answered by the last call's slot, but a change made to them in place is read again."""
    step, k = decode_step(SPEC), tokens(SPEC, 6)
    slices, num = step.slices.copy(), step.num_slices.copy()
    cache = kvshard.update(kvshard.init_cache(SPEC, mesh), 0, k, k, slices, num)
    cache = kvshard.update(cache, 1, k, k, slices, num)
    free = int(SPEC.num_pages * SPEC.page_size - 1)
    slices[0, 0] = free
    cache = kvshard.update(cache, 1, 2 * k, 2 * k, slices, num)
    got = np.asarray(kvshard.gather(cache, 1, np.array([free], np.int32)))
    np.testing.assert_array_equal(got[0][0], 2 * k[0])
    num[0] = 0  # no slice is live now: nothing is written
    before = np.asarray(cache.kv)
    cache = kvshard.update(cache, 1, 3 * k, 3 * k, slices, num)
    np.testing.assert_array_equal(np.asarray(cache.kv), before)
    num[0] = slices.shape[1] + 1  # more live slices than there are: refused, nothing changes
    with pytest.raises(ValueError, match="num_slices"):
        kvshard.update(cache, 1, k, k, slices, num)
    assert not cache.kv.is_deleted()
    np.testing.assert_array_equal(np.asarray(cache.kv), before)


def _aligned_copy(x, alignment=64):
    """A copy of x in memory aligned to ``alignment`` bytes: on CPU, jax.device_put shares the
    memory of such a NumPy array instead of copying it."""
    buffer = np.empty(x.nbytes + alignment, np.uint8)
    start = -buffer.ctypes.data % alignment
    out = buffer[start : start + x.nbytes].view(x.dtype).reshape(x.shape)
    out[...] = x
    return out


def test_a_step_buffer_refilled_in_place_changes_no_earlier_call(mesh):
    """A serving loop refills one persistent slices buffer every step. The device copy an
    earlier call made (and memoized by content) must not follow the buffer: the same content
    in a later call is written where that content says, not where the buffer now points."""
    step, k = decode_step(SPEC), tokens(SPEC, 7)
    first = step.slices.copy()
    buffer, num = _aligned_copy(first), step.num_slices.copy()
    cache = kvshard.update(kvshard.init_cache(SPEC, mesh), 0, k, k, buffer, num)
    moved = first.copy()
    moved[0, 0] = int(SPEC.num_pages * SPEC.page_size - 1)  # a free slot, another page
    buffer[...] = moved  # the next step, in the same buffer
    cache = kvshard.update(cache, 0, 2 * k, 2 * k, buffer, num)
    cache = kvshard.update(cache, 0, 3 * k, 3 * k, first.copy(), num)  # the first step again
    slots = np.array([first[0, 0], moved[0, 0]], np.int32)
    got = np.asarray(kvshard.gather(cache, 0, slots)[0])
    np.testing.assert_array_equal(got[0], 3 * k[0])
    np.testing.assert_array_equal(got[1], 2 * k[0])


def test_fused_attention_on_xla_checks_each_part_once(mesh):
    """fused_attention off the fused kernel is update then attention, each checked once (its
    own checks, not the entries': nothing of it is stored in the memo), with the entries'
    results."""
    step, k, v = decode_step(SPEC), tokens(SPEC, 30), tokens(SPEC, 31)
    q = tokens(SPEC, 32, heads=4)
    with spied(update_module) as writes, spied(attention_module) as reads:
        out, fused = kvshard.fused_attention(
            kvshard.init_cache(SPEC, mesh), 1, q, k, v, step, sm_scale=SCALE, backend="xla"
        )
    assert (writes.call_count, reads.call_count) == (1, 1)
    assert len(EAGER_CALLS) == 0
    cache = kvshard.update(kvshard.init_cache(SPEC, mesh), 1, k, v, step, backend="xla")
    want = kvshard.attention(cache, 1, q, step, sm_scale=SCALE, backend="xla")
    np.testing.assert_array_equal(np.asarray(fused.kv), np.asarray(cache.kv))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
