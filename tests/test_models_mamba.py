"""kvshard.models' Mamba-2 hybrid (Bamba): config reading, the SSD scan, the state in place.

The scan is checked against a float64 NumPy recurrence written here; the paged mixer (token by
token through state pages) against the dense one (chunked SSD); serving end to end against
the dense model. transformers' own forward is the reference of the tests kept outside the
repository (they run examples/flax_llama.py on checkpoints BambaForCausalLM writes).
"""

from __future__ import annotations

import math

import _hf_configs as hf_configs
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvshard
from kvshard import models
from kvshard.models.mamba2 import Mamba2Mixer, causal_conv, scan_tokens, ssd_chunked, ssd_step
from kvshard.models.state_cache import (
    MambaState,
    StateSpec,
    copy_state_pages,
    kv_step,
    state_layout,
    token_rows,
)

TINY = {
    "model_type": "bamba",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "attn_layer_indices": [1],
    "mamba_n_heads": 4,
    "mamba_d_head": 16,
    "mamba_d_state": 8,
    "mamba_n_groups": 2,
    "mamba_chunk_size": 4,
    "dtype": "float32",
}


# ---------------------------------------------------------------- config


def test_bamba_configs_of_transformers_4_and_5_read_alike():
    v4, v5 = (models.read_architecture(hf_configs.config(v, "bamba")) for v in hf_configs.VERSIONS)
    assert v4 == v5
    arch = v5
    assert [layer.mixer for layer in arch.layers] == (["mamba"] * 2 + ["attention"]) * 2
    assert arch.attention_layers == (2, 5) and arch.mamba_layers == (0, 1, 3, 4)
    assert arch.layer_types == (("full",), ("full",))  # the KV cache's layers
    assert arch.cache_layer_types[:3] == (("mamba",), ("mamba",), ("full",))
    m = arch.mamba
    assert (m.num_heads, m.head_dim, m.num_groups, m.state_size, m.conv_kernel) == (8, 16, 2, 16, 4)
    assert (m.chunk_size, m.conv_bias, m.proj_bias) == (8, True, False)
    assert m.time_step_limit == (0.0, math.inf) and m.ssm_dtype == "float32"  # transformers'
    cached = {**hf_configs.config("5.25.0", "bamba"), "mamba_ssm_cache_dtype": "bfloat16"}
    assert models.read_architecture(cached).mamba.ssm_dtype == "bfloat16"  # vLLM's setting
    assert m.conv_dim == 8 * 16 + 2 * 2 * 16
    assert arch.layers[2].rope.get("partial_rotary_factor") == 0.5
    assert arch.rms_norm_eps == 1e-5 and not arch.tie_word_embeddings
    # vLLM's grouping of 2 attention + 4 Mamba layers: groups of 2, one attention group first.
    layout = state_layout(arch)
    assert (layout.num_kv_groups, layout.num_state_groups, layout.group_size) == (1, 2, 2)
    assert sorted(p for p in layout.mamba if p) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    state = StateSpec.from_arch(arch, num_pages=10)
    conv_bytes, ssm_bytes = 3 * (128 + 64) * 2, 8 * 16 * 16 * 4  # bfloat16 conv, float32 SSM
    assert state.bytes_per_layer == conv_bytes + ssm_bytes == 9344
    assert state.bytes_per_page == 2 * 9344


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attn_layer_indices": [3]}, "attn_layer_indices=[3]"),
        ({"attn_layer_indices": []}, "at least one attention and one Mamba-2 layer"),
        ({"attn_layer_indices": [0, 1, 2]}, "at least one attention and one Mamba-2 layer"),
        ({"mamba_d_head": 8}, "mamba_d_head=8 x mamba_n_heads=4 must equal"),
        ({"mamba_n_groups": 3}, "mamba_n_heads=4 is not a multiple of mamba_n_groups=3"),
        ({"time_step_limit": [0.0]}, "time_step_limit=[0.0] must be [low, high]"),
        ({"time_step_limit": [0.0, "x"]}, "time_step_limit entry 'x' is not a number"),
    ],
)
def test_bad_bamba_configs_are_refused_naming_the_field(change, message):
    with pytest.raises(kvshard.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        models.read_architecture({**TINY, **change})


# ---------------------------------------------------------------- the scan


def _recurrence(x, dt, A, B, C, state):
    """float64 NumPy: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t, y_t = h_t C_t."""
    x, dt, A, B, C, h = (np.asarray(a, np.float64) for a in (x, dt, A, B, C, state))
    ys = []
    for t in range(x.shape[1]):
        decay = np.exp(dt[:, t] * A)[..., None, None]  # [b, H, 1, 1]
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(np.einsum("bhpn,bhn->bhp", h, C[:, t]))
    return np.stack(ys, 1), h


_chunked = jax.jit(ssd_chunked, static_argnums=5)


@jax.jit
def _stepwise(state, x, dt, A, B, C):
    def body(h, token):
        y, h = ssd_step(h, *token[:2], A, *token[2:])
        return h, y

    state, ys = jax.lax.scan(body, state, (x, dt, B, C))
    return ys, state


def test_ssd_chunked_one_shot_carried_across_chunks_and_step_by_step_agree():
    rng = np.random.default_rng(0)
    b, T, H, P, N = 2, 11, 3, 4, 5
    x = rng.normal(size=(b, T, H, P)).astype(np.float32)
    dt = rng.uniform(0.05, 0.8, (b, T, H)).astype(np.float32)
    A = -rng.uniform(0.5, 2.0, H).astype(np.float32)
    B, C = (rng.normal(size=(b, T, H, N)).astype(np.float32) for _ in range(2))
    h0 = rng.normal(size=(b, H, P, N)).astype(np.float32)
    want_y, want_h = _recurrence(x, dt, A, B, C, h0)

    y, h = _chunked(x, dt, A, B, C, 4, h0)  # 3 chunks, the last one padded
    np.testing.assert_allclose(y, want_y, atol=1e-5)
    np.testing.assert_allclose(h, want_h, atol=1e-5)
    # Two calls (a prefill in two chunks of 6 and 5 tokens) carry the state exactly.
    y1, h1 = _chunked(x[:, :6], dt[:, :6], A, B[:, :6], C[:, :6], 4, h0)
    y2, h2 = _chunked(x[:, 6:], dt[:, 6:], A, B[:, 6:], C[:, 6:], 4, h1)
    np.testing.assert_allclose(np.concatenate([y1, y2], 1), want_y, atol=1e-5)
    np.testing.assert_allclose(h2, want_h, atol=1e-5)
    # Token by token.
    ys, state = _stepwise(h0[0], x[0], dt[0], A, B[0], C[0])
    np.testing.assert_allclose(ys, want_y[0], atol=1e-5)
    np.testing.assert_allclose(state, want_h[0], atol=1e-5)
    # From zeros.
    y0, _ = _chunked(x, dt, A, B, C, 4, np.zeros_like(h0))
    np.testing.assert_allclose(y0, _recurrence(x, dt, A, B, C, np.zeros_like(h0))[0], atol=1e-5)


def test_causal_conv_carries_its_window_across_chunks():
    rng = np.random.default_rng(1)
    xbc = rng.normal(size=(1, 9, 6)).astype(np.float32)
    weight, bias = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=6).astype(np.float32)
    padded = np.concatenate([np.zeros((1, 3, 6)), xbc], 1)
    want = sum(padded[:, k : k + 9] * weight[:, k] for k in range(4)) + bias
    whole, window = causal_conv(xbc, weight, bias)
    np.testing.assert_allclose(whole, want, atol=1e-5)
    np.testing.assert_array_equal(window, np.swapaxes(xbc[:, -3:], 1, 2))
    first, w1 = causal_conv(xbc[:, :2], weight, bias)  # shorter than the window
    second, w2 = causal_conv(xbc[:, 2:], weight, bias, w1)
    np.testing.assert_allclose(np.concatenate([first, second], 1), want, atol=1e-5)
    np.testing.assert_array_equal(w2, window)


# ---------------------------------------------------------------- state in place


def _step(cu: list[int], num_seqs: int, positions: list[int]):
    class Step:  # token_rows reads these three fields
        pass

    step = Step()
    step.cu_q_lens = jnp.asarray(cu, jnp.int32)
    step.num_seqs = jnp.asarray([num_seqs], jnp.int32)
    step.positions = jnp.asarray(positions, jnp.int32)
    return step


def test_token_rows_maps_tokens_to_request_rows():
    # Rows: 3 tokens of a request at 5.., 2 of a new one; 3 padding tokens; rows past 2 repeat.
    row, fresh, valid = token_rows(_step([0, 3, 5, 5, 5], 2, [5, 6, 7, 0, 1, 0, 0, 0]))
    assert row.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert valid.tolist() == [True] * 5 + [False] * 3
    assert fresh.tolist() == [False, False, False, True, False, False, False, False]


@pytest.fixture(scope="module")
def mixer():
    arch = models.read_architecture(TINY)
    return Mamba2Mixer(arch, nnx.Rngs(0))


@nnx.jit
def _dense(mixer, x):
    return mixer(x)[0]


@nnx.jit
def _paged(mixer, conv, ssm, xbc, dt, row, pages, fresh, valid):
    return scan_tokens(conv, ssm, xbc, dt, row, pages, fresh, valid, mixer)


@pytest.mark.extended
def test_state_pages_are_read_and_written_in_place_across_chunks(mixer):
    """Two requests in state pages 3 and 1 of 5, prefilled in chunks mixed with padding, give
    the dense mixer's outputs; pages they do not own keep their contents."""
    spec = mixer.spec
    rng = np.random.default_rng(2)
    d, H, P, N = 32, spec.num_heads, spec.head_dim, spec.state_size
    lengths = (9, 6)
    xs = [rng.normal(size=(1, n, d)).astype(np.float32) for n in lengths]
    dense = [np.asarray(_dense(mixer, x)[0]) for x in xs]
    # The mixer's projections by hand, so that scan_tokens is fed what the paged call feeds.
    projected = [np.asarray(mixer.in_proj(x)[0]) for x in xs]
    inner, conv_dim = spec.intermediate_size, spec.conv_dim
    junk = rng.normal(size=(5, conv_dim, spec.conv_kernel - 1)).astype(np.float32)
    conv, ssm = jnp.asarray(junk), jnp.asarray(rng.normal(size=(5, H, P, N)), jnp.float32)
    before_conv, before_ssm = np.asarray(conv), np.asarray(ssm)
    pages = jnp.asarray([3, 1, 0, 0], jnp.int32)
    ys = [[], []]
    done = [0, 0]
    for chunk in ((4, 2), (3, 4), (2, 0)):  # tokens of each request per step
        toks, rows, pos = [], [], []
        for r, n in enumerate(chunk):
            toks += [projected[r][done[r] + i] for i in range(n)]
            rows += [r] * n
            pos += list(range(done[r], done[r] + n))
        pad = 8 - len(toks)
        toks += [np.full_like(projected[0][0], 7.0)] * pad  # padding must write nothing
        rows += [2] * pad
        pos += [0] * pad
        toks = np.stack(toks)
        valid = np.arange(8) < 8 - pad
        y, conv, ssm = _paged(
            mixer,
            conv,
            ssm,
            jnp.asarray(toks[:, inner : inner + conv_dim]),
            jnp.asarray(toks[:, inner + conv_dim :]),
            jnp.asarray(rows, jnp.int32),
            pages,
            jnp.asarray((np.asarray(pos) == 0) & valid),
            jnp.asarray(valid),
        )
        offset = 0
        for r, n in enumerate(chunk):
            ys[r].append(np.asarray(y[offset : offset + n]))
            offset += n
            done[r] += n
    for r, n in enumerate(lengths):
        y = np.concatenate(ys[r]).reshape(n, 1, -1)
        gate = jnp.asarray(projected[r][None, :, :inner])
        out = np.asarray(mixer.out_proj(mixer.norm(jnp.asarray(y).reshape(1, n, -1), gate)))
        np.testing.assert_allclose(out[0], dense[r], atol=2e-5)
    untouched = [0, 2, 4]
    np.testing.assert_array_equal(np.asarray(conv)[untouched], before_conv[untouched])
    np.testing.assert_array_equal(np.asarray(ssm)[untouched], before_ssm[untouched])
    assert not np.allclose(np.asarray(ssm)[3], before_ssm[3])  # written


def test_copy_state_pages_reads_every_source_before_writing():
    conv = jnp.arange(2 * 1 * 4 * 2 * 1, dtype=jnp.float32).reshape(2, 1, 4, 2, 1)
    ssm = jnp.arange(2 * 1 * 4 * 3, dtype=jnp.float32).reshape(2, 1, 4, 3)
    pairs = jnp.asarray([[[1, 2], [2, 1], [0, 0]], [[3, 1], [0, 0], [0, 0]]], jnp.int32)
    out = copy_state_pages(MambaState(conv, ssm), pairs)
    want = np.asarray(ssm).copy()
    want[0, :, 2], want[0, :, 1] = np.asarray(ssm)[0, :, 1], np.asarray(ssm)[0, :, 2]  # a swap
    want[1, :, 1] = np.asarray(ssm)[1, :, 3]
    np.testing.assert_array_equal(out.ssm, want)
    assert np.asarray(out.conv)[0, 0, 2].tolist() == np.asarray(conv)[0, 0, 1].tolist()


def test_kv_step_keeps_the_attention_groups_of_an_allocator_with_state_groups():
    arch = models.read_architecture(TINY)
    alloc = kvshard.PageAllocator(
        16, 4, max_requests=2, max_pages_per_request=4, layer_types=arch.cache_layer_types
    )
    rows = alloc.allocate_batch(["a", "b"], [6, 3])
    step = kvshard.stack_steps(
        [kvshard.build_step(alloc, ["a", "b"], [6, 3], num_tokens_padded=16, max_num_seqs=2)]
    )
    layout = state_layout(arch)
    assert step.geometry.num_groups == layout.num_kv_groups + layout.num_state_groups == 3
    cut = kv_step(step, layout.num_kv_groups)
    assert cut.geometry.num_groups == 1
    np.testing.assert_array_equal(cut.page_indices, np.asarray(step.page_indices)[:, 0])
    np.testing.assert_array_equal(cut.slices, np.asarray(step.slices)[:, 0])
    # Each request's state pages: one per state group, pages no attention row holds.
    state_pages = alloc.state_pages(rows)
    assert state_pages.shape == (2, 2) and (state_pages > 0).all()
    assert not set(state_pages.ravel()) & set(np.asarray(cut.page_indices).ravel())


# ---------------------------------------------------------------- serving


@pytest.mark.extended
def test_bamba_serves_from_state_pages_in_place_and_matches_its_dense_run():
    """Continuous batching on a 2x2 mesh (two pools): chunked prefills and decodes of a hybrid
    whose state groups share the allocators' pools; the donated cache's state buffers are
    consumed (written in place) and every served logit matches the dense model."""
    mesh = jax.make_mesh(
        (2, 2),
        ("data", "model"),
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
        devices=jax.devices()[:4],
    )
    arch = models.read_architecture(TINY)
    model = models.shard_model(models.CausalLM(arch, nnx.Rngs(3)), mesh)
    rng = np.random.default_rng(3)
    requests = [
        models.Request(i, rng.integers(1, 64, n).tolist(), 3) for i, n in enumerate((13, 2, 7))
    ]
    spec = models.cache_spec(arch, page_size=4, longest=16, max_seqs=2, budget=8)
    steps, peak = models.serve(model, spec, mesh, requests, max_seqs=2, budget=8)
    assert steps > 4 and peak >= 1 + 2  # KV pages and the state pages of 2 state groups
    dense = models.dense_logits(model, requests)
    for r, d in zip(requests, dense, strict=True):
        np.testing.assert_allclose(np.stack(r.logits), d, atol=1e-4)
    # The serve step donates the hybrid cache: its state arrays are consumed, not copied.
    from kvshard.models.state_cache import HybridCache, init_state

    state = init_state(StateSpec.from_arch(arch, spec.num_pages), mesh)
    cache = HybridCache(kvshard.init_cache(spec, mesh, head_axis="model", page_axis="data"), state)
    alloc = kvshard.PageAllocator(
        spec.num_pages,
        4,
        max_requests=2,
        max_pages_per_request=4,
        layer_types=arch.cache_layer_types,
    )
    rows = alloc.allocate_batch([0], [3])
    step = kvshard.stack_steps(
        [kvshard.build_step(alloc, [0], [3], num_tokens_padded=8, max_num_seqs=2)] * 2
    )
    pages = np.zeros((2, 2, 2), np.int32)
    pages[:, :, 0] = alloc.state_pages(rows)[:, 0]
    tokens = np.ones((2, 8), np.int32)
    _, out = models.serve_step(model, cache, tokens, kv_step(step, 1), pages)
    assert state.ssm.is_deleted() and state.conv.is_deleted()
    written = np.asarray(out.state.ssm)[:, :, pages[0, :, 0]]
    assert np.abs(written).max() > 0 and not np.asarray(out.state.ssm)[:, :, 0].any()


def test_serving_refuses_a_hybrid_whose_pool_splits_its_attention_layers():
    """4 attention layers and 1 Mamba layer: vLLM's grouping of the pool makes 4 attention
    groups of 1 layer, the KV cache's own grouping 1 group of 4: refused before anything is
    allocated, naming both."""
    arch = models.read_architecture(
        {**TINY, "num_hidden_layers": 5, "attn_layer_indices": [0, 1, 2, 3]}
    )

    class Stub:  # serve reads the architecture before it builds anything
        pass

    stub = Stub()
    stub.arch = arch
    spec = models.cache_spec(arch, page_size=4, longest=16, max_seqs=2, budget=8)
    mesh = jax.make_mesh((1, 1), ("data", "model"), devices=jax.devices()[:1])
    requests = [models.Request(0, [1, 2, 3], 2)]
    with pytest.raises(NotImplementedError, match=r"attention groups .* differ from the KV"):
        models.serve(stub, spec, mesh, requests, max_seqs=2, budget=8)
    assert requests[0].computed == 0 and not requests[0].logits
