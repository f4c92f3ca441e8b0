"""The step contract (kvshard.step): StepMetadata's geometry, build_step's refusals, stack_steps,
and every operation's check of a step against the cache and the step's tokens."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvshard
from kvshard import reference

PAGE, DIM = 8, 64


def make_mesh(shape=(1, 2)):
    return jax.make_mesh(shape, ("data", "model"), devices=jax.devices()[: shape[0] * shape[1]])


def make_spec(page_size=PAGE, num_pages=16):
    return kvshard.CacheSpec(
        num_layers=2,
        num_kv_heads=2,
        head_dim=DIM,
        page_size=page_size,
        num_pages=num_pages,
        dtype="float32",
    )


def one_step(page_size=PAGE, num_pages=16, width=4, tokens=16, counts=(5, 3)):
    alloc = kvshard.PageAllocator(num_pages, page_size, max_requests=4, max_pages_per_request=width)
    ids = list(range(len(counts)))
    rows = alloc.allocate_batch(ids, list(counts))
    return alloc, kvshard.build_step(alloc, ids, list(counts), rows=rows, num_tokens_padded=tokens)


def kv(tokens=16, heads=2, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((tokens, heads, DIM)).astype(np.float32) for _ in range(2))


# --------------------------------------------------------------------------------------------
# Geometry travels with the step
# --------------------------------------------------------------------------------------------


def test_build_step_records_its_geometry_as_static_data():
    _, step = one_step(page_size=16, num_pages=12, width=3, tokens=32)
    assert step.geometry == kvshard.StepGeometry(
        page_size=16, num_pages=12, pages_per_seq=3, num_tokens_padded=32, max_num_seqs=8
    )
    leaves, treedef = jax.tree.flatten(step)
    assert len(leaves) == 7  # the geometry is aux data, not a leaf
    assert jax.tree.unflatten(treedef, leaves).geometry == step.geometry


def test_step_of_another_page_size_is_refused_by_update_and_attention():
    """Reproduction: a step built with page_size=16 against a page_size=8 cache used to write
    slots 16..20 while attention read page 1, and nothing complained."""
    cache = kvshard.init_cache(make_spec(page_size=8), make_mesh())
    _, step = one_step(page_size=16)
    k, v = kv()
    before = np.asarray(cache.kv)
    with pytest.raises(ValueError, match=r"step.geometry.page_size=16 .* page_size=8"):
        kvshard.update(cache, 0, k, v, step)
    with pytest.raises(ValueError, match=r"step.geometry.page_size=16 .* page_size=8"):
        kvshard.attention(cache, 0, np.zeros((16, 2, DIM), np.float32), step, sm_scale=0.1)
    np.testing.assert_array_equal(np.asarray(cache.kv), before)  # nothing donated or changed


def test_step_of_another_pool_size_is_refused():
    cache = kvshard.init_cache(make_spec(num_pages=16), make_mesh())
    _, step = one_step(num_pages=32)
    with pytest.raises(ValueError, match=r"step.geometry.num_pages=32 .* num_pages=16"):
        kvshard.update(cache, 0, *kv(), step)


def test_geometry_is_checked_at_trace_time_under_jit():
    cache = kvshard.init_cache(make_spec(page_size=8), make_mesh())
    _, step = one_step(page_size=16)
    run = jax.jit(lambda c, k, v, s: kvshard.update(c, 0, k, v, s))
    with pytest.raises(ValueError, match=r"step.geometry.page_size"):
        run(cache, *kv(), step)


def test_tokens_other_than_the_steps_are_refused():
    """Reproduction: q or k with T=32 against a step built for T=16 was accepted."""
    cache = kvshard.init_cache(make_spec(), make_mesh())
    _, step = one_step(tokens=16)
    with pytest.raises(ValueError, match=r"k has 32 tokens .* num_tokens_padded=16"):
        kvshard.update(cache, 0, *kv(tokens=32), step)
    q = np.zeros((32, 2, DIM), np.float32)
    with pytest.raises(ValueError, match=r"q has 32 tokens .* num_tokens_padded=16"):
        kvshard.attention(cache, 0, q, step, sm_scale=0.1)


def test_replaced_field_of_another_shape_contradicts_the_geometry():
    cache = kvshard.init_cache(make_spec(), make_mesh())
    _, step = one_step()
    bad = dataclasses.replace(step, page_indices=np.zeros((8, 5), np.int32))
    with pytest.raises(ValueError, match=r"step.geometry.pages_per_seq=4 does not match"):
        kvshard.attention(cache, 0, np.zeros((16, 2, DIM), np.float32), bad, sm_scale=0.1)


def test_one_pools_step_on_a_page_axis_says_to_stack_steps():
    """Reproduction: one pool's step given to a cache with a page axis was refused as
    "num_tokens_padded=16 does not match its arrays (size [])"."""
    pooled = kvshard.init_cache(make_spec(), make_mesh((2, 1)), page_axis="data")
    _, step = one_step()
    before = np.asarray(pooled.kv)
    k, v = (np.stack([x, x]) for x in kv())  # [dp, T, heads, head_dim]
    q = np.zeros((2, 16, 2, DIM), np.float32)
    message = r"page axis of 2 pools but step.positions has shape \[16\], one pool's step: pass "
    message += r"kvshard.stack_steps\(\[one step per pool\]\)"
    with pytest.raises(ValueError, match=message):
        kvshard.update(pooled, 0, k, v, step)
    with pytest.raises(ValueError, match=message):
        kvshard.attention(pooled, 0, q, step, sm_scale=0.1)
    np.testing.assert_array_equal(np.asarray(pooled.kv), before)
    # And the other way round: a stacked step for a cache without a page axis.
    cache = kvshard.init_cache(make_spec(), make_mesh())
    with pytest.raises(ValueError, match=r"no page axis but step.positions has shape \[2, 16\]"):
        kvshard.update(cache, 0, *kv(), kvshard.stack_steps([step, step]))


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"sm_scale": 1}, TypeError, r"sm_scale must be a float, got int"),
        ({"sm_scale": float("nan")}, ValueError, r"sm_scale=nan must be a finite float"),
        ({"sm_scale": float("inf")}, ValueError, r"sm_scale=inf"),
        ({"sm_scale": 1e39}, ValueError, r"sm_scale=1e\+39 .*float32"),
        ({"sm_scale": 0.1, "soft_cap": 1e39}, ValueError, r"soft_cap=1e\+39"),
        ({"sm_scale": 0.1, "soft_cap": 2}, TypeError, r"soft_cap must be a float"),
        ({"sm_scale": 0.1, "sliding_window": 2**31}, ValueError, r"sliding_window=2147483648"),
        ({"sm_scale": 0.1, "sliding_window": 0}, ValueError, r"sliding_window=0"),
    ],
)
def test_attention_parameters_are_refused_naming_the_argument(kw, error, match):
    cache = kvshard.init_cache(make_spec(), make_mesh())
    _, step = one_step()
    with pytest.raises(error, match=match):
        kvshard.attention(cache, 0, np.zeros((16, 2, DIM), np.float32), step, **kw)


def test_a_donated_cache_is_refused_before_dispatch():
    """Reproduction: a second update on a donated cache segfaulted on an 8-device CPU mesh.
    Run in a child process, so a crash fails this test instead of killing the suite."""
    script = textwrap.dedent(
        """
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        import jax, numpy as np, kvshard
        mesh = jax.make_mesh((1, 8), ("data", "model"))
        spec = kvshard.CacheSpec(num_layers=1, num_kv_heads=8, head_dim=64, page_size=8,
                                 num_pages=8)
        cache = kvshard.init_cache(spec, mesh)
        alloc = kvshard.PageAllocator(8, 8, max_requests=2, max_pages_per_request=2)
        alloc.allocate_batch([0], [3])
        step = kvshard.build_step(alloc, [0], [3])
        k = np.ones((16, 8, 64), np.float32)
        new = kvshard.update(cache, 0, k, k, step)
        try:
            kvshard.update(cache, 0, k, k, step)
        except ValueError as err:
            print("refused:", err)
        kvshard.update(new, 0, k, k, step)
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused: cache has been donated" in out.stdout
    assert out.stdout.strip().endswith("ok")


# --------------------------------------------------------------------------------------------
# build_step refusals (19: rows, duplicates, zero paddings, int32)
# --------------------------------------------------------------------------------------------


def test_rows_that_are_not_the_requests_rows_are_refused():
    """Reproduction: rows swapped between two requests wrote A's token into B's page."""
    alloc = kvshard.PageAllocator(16, PAGE, max_requests=4, max_pages_per_request=4)
    rows = alloc.allocate_batch(["a", "b"], [3, 5])
    before = alloc.checksum()
    with pytest.raises(ValueError, match=r"rows\[0\]=1 is not the row of request 'a' \(row 0\)"):
        kvshard.build_step(alloc, ["a", "b"], [3, 5], rows=rows[::-1])
    for bad in ([99, 1], [-1, 1]):
        with pytest.raises(ValueError, match=r"rows\[0\]=-?\d+ is not the row"):
            kvshard.build_step(alloc, ["a", "b"], [3, 5], rows=bad)
    assert alloc.checksum() == before


def test_duplicate_req_ids_are_refused_naming_req_ids():
    alloc = kvshard.PageAllocator(16, PAGE, max_requests=4, max_pages_per_request=4)
    alloc.allocate_batch(["a"], [3])
    with pytest.raises(ValueError, match=r"req_ids holds 'a' twice"):
        kvshard.build_step(alloc, ["a", "a"], [1, 1])


@pytest.mark.parametrize("field", ["num_tokens_padded", "max_num_seqs"])
def test_zero_paddings_are_refused(field):
    alloc = kvshard.PageAllocator(16, PAGE, max_requests=4, max_pages_per_request=4)
    with pytest.raises(ValueError, match=rf"{field}=0 must be None or an int >= 1"):
        kvshard.build_step(alloc, [], [], **{field: 0})


# --------------------------------------------------------------------------------------------
# stack_steps names what differs
# --------------------------------------------------------------------------------------------


def test_stack_steps_names_the_geometry_field_that_differs():
    """Reproduction: allocators with different max_pages_per_request gave a message naming
    only num_tokens_padded and max_num_seqs."""
    _, a = one_step(width=4)
    _, b = one_step(width=3)
    with pytest.raises(ValueError, match=r"steps\[1\].geometry.pages_per_seq=3 but .*=4"):
        kvshard.stack_steps([a, b])
    _, c = one_step(tokens=32)
    with pytest.raises(ValueError, match=r"num_tokens_padded=32"):
        kvshard.stack_steps([a, c])
    stacked = kvshard.stack_steps([a, a])
    assert stacked.geometry == a.geometry and stacked.kv_lens.shape == (2, 8)


# --------------------------------------------------------------------------------------------
# Padding conventions: kvshard's (total repeated) and JAX's (zeros) read alike
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["xla", "pallas-operands"])
def test_cu_q_lens_padded_with_zeros_reads_like_kvshards_padding(backend):
    """Reproduction: cu_q_lens = [0, 3, 0, 0, ...] (JAX's convention) zeroed every output."""
    mesh = make_mesh((1, 2))
    cache = kvshard.init_cache(make_spec(), mesh)
    _, step = one_step(counts=(3,))
    k, v = kv()
    cache = kvshard.update(cache, 1, k, v, step)
    jax_style = dataclasses.replace(step, cu_q_lens=np.array([0, 3] + [0] * 7, np.int32))
    q = np.random.default_rng(1).standard_normal((16, 4, DIM)).astype(np.float32)
    want = reference.paged_attention(q, [k[:3]], [v[:3]], [3], sm_scale=0.125)
    if backend == "xla":
        for s in (step, jax_style):
            got = np.asarray(kvshard.attention(cache, 1, q, s, sm_scale=0.125, backend="xla"))
            np.testing.assert_allclose(got, want, atol=2e-5)
        return
    # The pallas backend's operands hand JAX's kernel sorted cu_q_lens either way.
    from kvshard._attention.pallas import pallas_operands  # the documented test hook
    from kvshard._attention.params import Statics

    fields = [jnp.asarray(getattr(jax_style, f)) for f in ("page_indices", "kv_lens")]
    ops, _, tok_ok = pallas_operands(
        jnp.zeros((2, 16 * PAGE, 2, 128)),
        jnp.int32(1),
        jnp.asarray(q[:, :2]),
        *fields,
        jnp.asarray(jax_style.cu_q_lens),
        jnp.asarray(jax_style.num_seqs),
        # The layout JAX's kernel reads (a packed cache is refused before the kernel).
        statics=Statics(
            dataclasses.replace(cache.spec, kv_layout="interleaved"), 0.125, None, None
        ),
    )
    np.testing.assert_array_equal(np.asarray(ops[4]), [0, 3, 3, 3, 3, 3, 3, 3, 3])
    assert int(ops[5][0]) == 1 and np.asarray(tok_ok).sum() == 3


# --------------------------------------------------------------------------------------------
# attention(checks=True) reports what the drop rule drops, inside jit
# --------------------------------------------------------------------------------------------


def test_attention_checks_report_a_dropped_request_inside_jit():
    cache = kvshard.init_cache(make_spec(), make_mesh())
    _, step = one_step(counts=(3, 2))
    cache = kvshard.update(cache, 0, *kv(), step)
    bad = dataclasses.replace(step, kv_lens=np.array([3, 99, 0, 0, 0, 0, 0, 0], np.int32))
    q = jnp.zeros((16, 2, DIM))
    quiet = jax.jit(lambda s: kvshard.attention(cache, 0, q, s, sm_scale=0.1))
    np.testing.assert_array_equal(np.asarray(quiet(bad))[3:5], 0)  # dropped silently
    loud = jax.jit(lambda s: kvshard.attention(cache, 0, q, s, sm_scale=0.1, checks=True))
    with pytest.raises(Exception, match=r"attention: request 1 \(group 0\) is dropped"):
        np.asarray(loud(bad))
        jax.effects_barrier()
    np.asarray(loud(step))  # a good step passes the checks


def test_legacy_argument_order_still_works_and_warns():
    cache = kvshard.init_cache(make_spec(), make_mesh())
    _, step = one_step()
    q = np.zeros((16, 2, DIM), np.float32)
    want = np.asarray(kvshard.attention(cache, 0, q, step, sm_scale=0.1))
    with pytest.warns(DeprecationWarning, match=r"attention\(cache, layer, q, step\)"):
        got = np.asarray(kvshard.attention(q, cache, 0, step, sm_scale=0.1))
    np.testing.assert_array_equal(got, want)


def test_deprecated_update_keywords_fold_into_options():
    cache = kvshard.init_cache(make_spec(), make_mesh())
    _, step = one_step()
    k, v = kv()
    with pytest.warns(DeprecationWarning, match=r"options=kvshard.BackendOptions"):
        cache = kvshard.update(cache, 0, k, v, step, backend="xla", schedule="vmem")
    with pytest.raises(ValueError, match=r"schedule='fast' must be one of"):
        kvshard.BackendOptions(schedule="fast")
    first = int(step.slices[0, 0])  # request 0's 5 tokens fill one slice of one page
    got = kvshard.gather(cache, 0, first + np.arange(5))[0]
    np.testing.assert_array_equal(np.asarray(got), k[:5])


# --------------------------------------------------------------------------------------------
# Layer groups: a page table per KV-cache group
# --------------------------------------------------------------------------------------------

GEMMA3 = ([("sliding", 8)] * 5 + [("full",)]) * 2  # 12 layers: 5 sliding groups, 1 full


def grouped_step(counts=(9, 3), grow=(1, 2), page_size=4):
    alloc = kvshard.PageAllocator(
        64, page_size, max_requests=4, max_pages_per_request=6, layer_types=GEMMA3
    )
    ids = list(range(len(counts)))
    alloc.allocate_batch(ids, list(counts))
    alloc.allocate_batch(ids, [8, 0])  # request 0 reaches 17 tokens
    rows = alloc.allocate_batch(ids, list(grow))  # token 17 reads 10..: page 0, 1 released
    step = kvshard.build_step(alloc, ids, list(grow), rows=rows, num_tokens_padded=16)
    return alloc, ids, step


def test_grouped_step_has_a_group_axis_of_page_indices_and_slices():
    alloc, ids, step = grouped_step()
    assert alloc.num_groups == 6
    assert step.geometry.num_groups == 6
    assert step.page_indices.shape == (6, 8, 6)
    assert step.slices.shape[:2] == (6, 3)
    assert step.kv_lens.shape == (8,) and step.positions.shape == (16,)
    for g in range(6):
        for i, req in enumerate(ids):
            assert list(step.page_indices[g, i]) == list(alloc.page_table[g, alloc.row(req)])
        assert not step.page_indices[g, len(ids) :].any()
    assert list(step.page_indices[0, 0, :2]) == [0, 0]  # released by the window
    assert step.page_indices[5, 0, :2].all()  # the full group keeps them


def test_grouped_slices_write_each_token_into_its_groups_page():
    alloc, ids, step = grouped_step()
    live = int(step.num_slices[0])
    # The same boundaries in every group; only kv_cache_start differs.
    assert (step.slices[:, 1:, :live] == step.slices[0, 1:, :live]).all()
    assert not step.slices[:, :, live:].any()
    P = alloc.page_size
    for g in range(6):
        start, new_start, length = step.slices[g, :, :live]
        for s, n, k in zip(start, new_start, length, strict=True):
            for j in range(k):
                t = n + j  # the step's token t: request i at position positions[t]
                i = int(np.searchsorted(step.cu_q_lens, t, side="right")) - 1
                pos = int(step.positions[t])
                page = alloc.page_table[g, alloc.row(ids[i]), pos // P]
                assert s + j == page * P + pos % P


def test_grouped_steps_stack_with_the_dp_axis_first():
    _, _, a = grouped_step()
    stacked = kvshard.stack_steps([a, a])
    assert stacked.page_indices.shape == (2, 6, 8, 6)
    assert stacked.slices.shape[:3] == (2, 6, 3)
    assert stacked.geometry.num_groups == 6


def test_one_group_step_keeps_todays_shapes():
    alloc = kvshard.PageAllocator(
        16, PAGE, max_requests=4, max_pages_per_request=4, layer_types=[("full",)] * 3
    )
    rows = alloc.allocate_batch([0, 1], [5, 3])
    step = kvshard.build_step(alloc, [0, 1], [5, 3], rows=rows, num_tokens_padded=16)
    _, today = one_step()
    assert step.geometry == today.geometry and step.geometry.num_groups == 1
    for field in ("slices", "page_indices", "kv_lens", "cu_q_lens", "positions"):
        assert np.array_equal(getattr(step, field), getattr(today, field)), field
