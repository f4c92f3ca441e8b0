"""attention and update on a cache with layer groups (CacheSpec(layer_types=...)).

Each layer writes and reads its own cache layer through its own group's page table
(hand-built in tests/_groups.py: disjoint pages of one pool, out-of-window pages released
into the null page), and every read equals the float64 oracle run on that layer's dense
history with its own window. The cache starts full of NaN, so a read of another group's
pages, of a released (null) page or of another cache layer would show. Then the window
rule: a concrete layer reads with its own type, another type is refused, and a traced layer
over layers of several types must say which it reads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _cache_helpers import make_mesh, run_checked
from _groups import (
    CHUNKED,
    FULL,
    GEMMA3,
    GPT_OSS,
    LLAMA4,
    SCALE,
    SLIDING,
    STEPS,
    History,
    dense_kernel,
    filled,
    grouped_spec,
)

import kvshard

ATOL = 2e-5
PALLAS = kvshard.BackendOptions(attention_kernel=dense_kernel)


def serve(layer_types, mesh_shape=(1, 2), *, pools=None, backend="xla", null_page=None):
    """Runs STEPS over every layer (update, then attention, layer by layer in a Python loop)
    on a NaN-filled cache; asserts each output equals the oracle, padding rows zero."""
    # JAX's kernel (the pallas backend) reads the interleaved layout only.
    spec = grouped_spec(
        layer_types, **({"kv_layout": "interleaved"} if backend == "pallas" else {})
    )
    mesh = make_mesh(mesh_shape)
    page_axis = None if pools is None else "data"
    cache = filled(kvshard.init_cache(spec, mesh, page_axis=page_axis), np.nan, null_page)
    histories = [History(spec, np.random.default_rng(g)) for g in range(pools or 1)]
    options = PALLAS if backend == "pallas" else None
    for counts in STEPS:
        made = [h.step(counts) for h in histories]
        if pools is None:
            (step, k, v, q), stacked = made[0], False
        else:
            step = kvshard.stack_steps([m[0] for m in made])
            k, v, q = (np.stack([m[i] for m in made], axis=1) for i in (1, 2, 3))  # [L, dp, ...]
            stacked = True
        total = sum(counts)
        for layer in range(spec.num_layers):
            cache = kvshard.update(cache, layer, k[layer], v[layer], step, backend=backend)
            out = kvshard.attention(
                cache, layer, q[layer], step, sm_scale=SCALE, backend=backend, options=options
            )
            outs = np.asarray(out) if stacked else np.asarray(out)[None]
            for g, h in enumerate(histories):
                qg = q[layer, g] if stacked else q[layer]
                expected = h.oracle(layer, qg)
                np.testing.assert_allclose(outs[g, :total], expected[:total], atol=ATOL)
                assert not outs[g, total:].any(), "padding tokens are zero"
    return cache, histories


@pytest.mark.parametrize(
    ("layer_types", "mesh_shape", "pools"),
    [(GEMMA3, (1, 2), None), (GPT_OSS, (2, 2), 2), (LLAMA4, (1, 1), None)],
    ids=["gemma3", "gpt-oss-pooled", "llama4-chunked"],
)
def test_every_layer_reads_its_own_group_through_its_own_window(layer_types, mesh_shape, pools):
    serve(layer_types, mesh_shape, pools=pools)


@pytest.mark.usefixtures("small_kernel_blocks")
def test_pallas_backend_serves_every_layer_of_its_group():
    # The update kernel in interpret mode; attention through the pallas backend's operands
    # with a kernel of JAX's contract (JAX's own runs only on TPU). Like JAX's kernel it
    # masks scores only inside kv_len, so the released (null) page holds finite garbage here;
    # every other slot is NaN.
    serve(GPT_OSS, backend="pallas", null_page=1e3)


def test_lax_scan_over_one_groups_layers_with_a_traced_layer():
    spec = grouped_spec(GEMMA3)
    mesh = make_mesh((1, 2))
    cache = filled(kvshard.init_cache(spec, mesh), np.nan)
    history = History(spec, np.random.default_rng(3))
    sliding = [i for i, t in enumerate(GEMMA3) if t == SLIDING]
    full = [i for i, t in enumerate(GEMMA3) if t == FULL]

    @jax.jit
    def scan(cache, layers, k, v, q, step, *, layer_type):
        def body(cache, xs):
            layer, k, v, q = xs
            cache = kvshard.update(cache, layer, k, v, step)
            return cache, kvshard.attention(
                cache, layer, q, step, sm_scale=SCALE, layer_type=layer_type
            )

        return jax.lax.scan(body, cache, (layers, k, v, q))

    scan = jax.jit(scan.__wrapped__, static_argnames="layer_type", donate_argnums=0)
    for counts in STEPS:
        step, k, v, q = history.step(counts)
        total = sum(counts)
        for layers, layer_type in ((sliding, SLIDING), (full, FULL)):
            idx = np.array(layers, np.int32)
            cache, outs = scan(cache, idx, k[idx], v[idx], q[idx], step, layer_type=layer_type)
            for layer, out in zip(layers, np.asarray(outs), strict=True):
                expected = history.oracle(layer, q[layer])
                np.testing.assert_allclose(out[:total], expected[:total], atol=ATOL)


# --------------------------------------------------------------------------------------------
# The window rule
# --------------------------------------------------------------------------------------------


def _one_step(layer_types=GEMMA3, **spec_fields):
    spec = grouped_spec(layer_types, **spec_fields)
    cache = kvshard.init_cache(spec, make_mesh((1, 2)))
    history = History(spec, np.random.default_rng(4))
    step, k, v, q = history.step(STEPS[0])
    for layer in range(spec.num_layers):
        cache = kvshard.update(cache, layer, k[layer], v[layer], step)
    return cache, history, step, q


def test_a_window_other_than_the_layers_own_is_refused():
    cache, history, step, q = _one_step()
    full, sliding = GEMMA3.index(FULL), GEMMA3.index(SLIDING)
    for layer, kw in (
        (sliding, {"sliding_window": 7}),  # another window
        (full, {"sliding_window": 6}),  # a window on a full layer
        (sliding, {"layer_type": FULL}),
        (sliding, {"layer_type": CHUNKED}),
    ):
        with pytest.raises(ValueError, match=rf"layer {layer} is a .* layer .* reads it as"):
            kvshard.attention(cache, layer, q[layer], step, sm_scale=SCALE, **kw)
    # The layer's own type, stated or left out, reads the same.
    for kw in ({}, {"sliding_window": 6}, {"layer_type": SLIDING}):
        out = kvshard.attention(cache, sliding, q[sliding], step, sm_scale=SCALE, **kw)
        np.testing.assert_allclose(
            np.asarray(out)[:17], history.oracle(sliding, q[sliding])[:17], atol=ATOL
        )
    with pytest.raises(ValueError, match=r"sliding_window=6 and layer_type=\('full',\) disagree"):
        kvshard.attention(
            cache, sliding, q[sliding], step, sm_scale=SCALE, sliding_window=6, layer_type=FULL
        )
    with pytest.raises(ValueError, match=r"layer_type=\('sliding', 0\)"):
        kvshard.attention(cache, 0, q[0], step, sm_scale=SCALE, layer_type=("sliding", 0))


def test_a_traced_layer_over_several_types_must_say_which_it_reads():
    cache, history, step, q = _one_step()
    read = jax.jit(
        lambda c, layer, q, **kw: kvshard.attention(c, layer, q, step, sm_scale=SCALE, **kw)
    )
    with pytest.raises(
        ValueError,
        match=r"layer is traced .* pass a Python int layer, or lax\.scan one group's layers",
    ):
        read(cache, jnp.int32(0), q[0])
    with pytest.raises(ValueError, match=r"no layer of the cache has that type"):
        jax.jit(
            lambda c, layer, q: kvshard.attention(
                c, layer, q, step, sm_scale=SCALE, layer_type=("sliding", 9)
            )
        )(cache, jnp.int32(0), q[0])

    # A full read of a traced sliding layer reads nothing (dropped); checks=True reports it.
    def full_read(c, layer, q, checks=False):
        return kvshard.attention(c, layer, q, step, sm_scale=SCALE, layer_type=FULL, checks=checks)

    def checked_read(c, layer, q):
        return full_read(c, layer, q, checks=True)

    sliding, full = GEMMA3.index(SLIDING), GEMMA3.index(FULL)
    out = jax.jit(full_read)(cache, jnp.int32(sliding), q[sliding])
    assert not np.asarray(out).any()
    for outside in (-1, len(GEMMA3)):  # a layer out of range reads nothing either
        assert not np.asarray(jax.jit(full_read)(cache, jnp.int32(outside), q[0])).any()
    out = jax.jit(full_read)(cache, jnp.int32(full), q[full])
    np.testing.assert_allclose(np.asarray(out)[:17], history.oracle(full, q[full])[:17], atol=ATOL)
    error, _ = run_checked(checked_read, cache, jnp.int32(sliding), q[sliding])
    assert error is not None and f"layer={sliding} is not a ('full',) layer" in error
    error, _ = run_checked(checked_read, cache, jnp.int32(full), q[full])
    assert error is None


def test_one_type_per_cache_needs_no_type_for_a_traced_layer():
    cache, history, step, q = _one_step((SLIDING,) * 3)
    assert cache.spec.num_groups == 1
    out = jax.jit(lambda c, layer, q: kvshard.attention(c, layer, q, step, sm_scale=SCALE))(
        cache, jnp.int32(2), q[2]
    )
    np.testing.assert_allclose(np.asarray(out)[:17], history.oracle(2, q[2])[:17], atol=ATOL)


def test_pallas_refuses_chunked_layers_by_name():
    cache, _, step, q = _one_step(LLAMA4, kv_layout="interleaved")
    with pytest.raises(NotImplementedError, match=r"chunked local attention .*backend='pallas'"):
        kvshard.attention(cache, 0, q[0], step, sm_scale=SCALE, backend="pallas", options=PALLAS)
