"""DeepSeek-V3's layers in flax NNX: multi-head latent attention and the routed mixture of experts.

Names mirror transformers' ``DeepseekV3Attention`` / ``DeepseekV3MoE`` (``self_attn.q_a_proj``,
``kv_a_proj_with_mqa``, ``kv_b_proj``, ``mlp.gate.e_score_correction_bias``,
``mlp.experts.{e}.gate_proj``, ``mlp.shared_experts``), so a parameter's path is its checkpoint
name. The arithmetic is that of :class:`~kvshard.models.config.MLASpec` and
:class:`~kvshard.models.config.RoutedMoESpec`.

Attention runs in the absorbed form, in latent space, dense and paged alike: per token the
cache holds one latent row ``[c, k_rope]`` (``kv_lora_rank + qk_rope_head_dim`` values shared by
every head); each head's no-rope query is mapped into the latent by W_UK (``kv_b_proj``'s key
rows), scores are ``q_lat · c + q_rope · k_rope``, the probabilities average the latents ``c``,
and W_UV (``kv_b_proj``'s value rows) maps that average to the head's value. Per-head keys and
values are never materialised. Heads are sharded over the tensor axis (``q_b_proj``,
``kv_b_proj`` and ``o_proj`` split by head), the latent is replicated.

:func:`latent_attention` is the one place the cache is written and read: a latent cache
(``CacheSpec(kv_layout="latent")``, one K-only row ``[c, k_rope]`` per token, replicated over
the tensor axis) written by :func:`kvshard.update` and read in the absorbed form by
:func:`kvshard.attention` with the query ``[q_lat, q_rope]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import kvshard
from kvshard.models.config import Architecture, RoutedMoESpec
from kvshard.models.rope import apply_rope

__all__ = [
    "MLAttention",
    "RoutedMoE",
    "dense_latent_attention",
    "latent_attention",
    "route",
]

# DeepseekV3RMSNorm's default eps: q_a_layernorm and kv_a_layernorm are built without the
# config's rms_norm_eps.
_LATENT_NORM_EPS = 1e-6


def dense_latent_attention(
    q_lat, q_rope, latent, k_rope, sm_scale: float, window: int | None = None
):
    """Causal attention of whole sequences in latent space.

    q_lat float[G, T, H, r], q_rope float[G, T, H, dr], latent float[G, T, r], k_rope
    float[G, T, dr] -> float[G, T, H, r] (probabilities times latents). Scores and softmax in
    float32; ``window``: a query at position i sees keys i - window + 1 .. i.
    """
    T = q_lat.shape[1]
    scores = jnp.einsum("gthr,gsr->ghts", q_lat, latent, preferred_element_type=jnp.float32)
    scores += jnp.einsum("gthd,gsd->ghts", q_rope, k_rope, preferred_element_type=jnp.float32)
    i, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    visible = (j <= i) & ((i - j < window) if window else True)
    probs = jax.nn.softmax(jnp.where(visible, scores * sm_scale, -jnp.inf), axis=-1)
    return jnp.einsum("ghts,gsr->gthr", probs.astype(latent.dtype), latent)


def latent_attention(
    cache,
    layer: int,
    q_lat,
    q_rope,
    latent,
    k_rope,
    step,
    sm_scale: float,
    window: int | None = None,
):
    """Writes this step's latent rows into ``cache`` layer ``layer`` and attends in latent space.

    Shapes as :func:`dense_latent_attention` with T the step's tokens; returns
    ``(float[G, T, H, r], cache)``; ``window`` as :func:`dense_latent_attention`. ``cache`` is a
    latent cache (``CacheSpec(kv_layout="latent",
    kv_lora_rank=r)``, docs/layout.md): :func:`kvshard.update` writes the K-only row
    ``[c, k_rope]`` and :func:`kvshard.attention` takes the absorbed query ``[q_lat, q_rope]``.
    """
    row = jnp.concatenate([latent, k_rope], axis=-1)[:, :, None, :]  # [G, T, 1, r + dr]
    cache = kvshard.update(cache, layer, row, None, step)  # no v: the row is K-only
    q = jnp.concatenate([q_lat, q_rope.astype(q_lat.dtype)], axis=-1)
    out = kvshard.attention(cache, layer, q, step, sm_scale=sm_scale, sliding_window=window)
    return out, cache


class MLAttention(nnx.Module):
    """``DeepseekV3Attention``: x [G, T, d] -> [G, T, d] (see the module docstring)."""

    def __init__(self, arch: Architecture, layer: int, rngs: nnx.Rngs):
        from kvshard.models.model import RMSNorm
        from kvshard.models.model import _linear as linear

        mla = arch.mla
        assert mla is not None
        d, H = arch.hidden_size, arch.num_heads
        self.arch, self.mla, self.layer, self.spec = arch, mla, layer, arch.layers[layer]
        qk = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        if mla.q_lora_rank is None:
            self.q_proj = linear(d, H * qk, False, arch, rngs)
        else:
            self.q_a_proj = linear(d, mla.q_lora_rank, arch.qkv_bias, arch, rngs)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, arch, rngs, eps=_LATENT_NORM_EPS)
            self.q_b_proj = linear(mla.q_lora_rank, H * qk, False, arch, rngs)
        self.kv_a_proj_with_mqa = linear(d, mla.latent_dim, arch.qkv_bias, arch, rngs)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, arch, rngs, eps=_LATENT_NORM_EPS)
        self.kv_b_proj = linear(
            mla.kv_lora_rank, H * (mla.qk_nope_head_dim + mla.v_head_dim), False, arch, rngs
        )
        self.o_proj = linear(H * mla.v_head_dim, d, arch.o_bias, arch, rngs)

    def _rope(self, x, positions):
        if self.mla.rope_interleave:  # pairs (x0, x1), ... -> halves, as transformers does
            x = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
        return apply_rope(x, positions, self.spec.rope)

    def __call__(self, x, positions, cache, step):
        arch, mla, (G, T) = self.arch, self.mla, x.shape[:2]
        H, nope, r = arch.num_heads, mla.qk_nope_head_dim, mla.kv_lora_rank
        if mla.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(G, T, H, nope + mla.qk_rope_head_dim)
        q_nope, q_rope = q[..., :nope], self._rope(q[..., nope:], positions)
        compressed = self.kv_a_proj_with_mqa(x)  # [G, T, r + dr]
        latent = self.kv_a_layernorm(compressed[..., :r])
        k_rope = self._rope(compressed[..., None, r:], positions)[:, :, 0]  # one head
        # kv_b_proj's kernel [r, H * (nope + v)]: per head, W_UK [r, nope] then W_UV [r, v].
        w_b = self.kv_b_proj.kernel[...].reshape(r, H, nope + mla.v_head_dim)
        w_uk, w_uv = w_b[..., :nope], w_b[..., nope:]
        q_lat = jnp.einsum("gthn,rhn->gthr", q_nope, w_uk)
        window = self.spec.window  # None for DeepSeek; the demo's --sliding-window sets one
        if cache is None:
            out_lat = dense_latent_attention(q_lat, q_rope, latent, k_rope, arch.sm_scale, window)
        else:
            out_lat, cache = latent_attention(
                cache, self.layer, q_lat, q_rope, latent, k_rope, step, arch.sm_scale, window
            )
        out = jnp.einsum("gthr,rhv->gthv", out_lat.astype(w_uv.dtype), w_uv)
        return self.o_proj(out.reshape(G, T, H * mla.v_head_dim)), cache


def route(scores, bias, spec: RoutedMoESpec):
    """DeepSeek-V3's group-limited top-k choice (``DeepseekV3TopkRouter``).

    scores float32[..., E] (sigmoid of the router logits), bias float32[E]
    (``e_score_correction_bias``) -> float32[..., E] routing weights: zero outside each token's
    ``experts_per_token`` chosen experts.
    """
    E, n_groups = spec.num_experts, spec.num_groups
    biased = scores + bias
    grouped = biased.reshape(*biased.shape[:-1], n_groups, E // n_groups)
    group_scores = jax.lax.top_k(grouped, min(2, E // n_groups))[0].sum(-1)  # [..., n_groups]
    best_groups = jax.lax.top_k(group_scores, spec.topk_groups)[1]
    group_mask = jax.nn.one_hot(best_groups, n_groups, dtype=jnp.bool_).any(-2)
    eligible = jnp.repeat(group_mask, E // n_groups, axis=-1)
    chosen = jax.lax.top_k(jnp.where(eligible, biased, -jnp.inf), spec.experts_per_token)[1]
    picked = jax.nn.one_hot(chosen, E, dtype=scores.dtype).sum(-2)  # [..., E], 0/1
    weights = scores * picked
    if spec.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * spec.routed_scaling_factor


class Gate(nnx.Module):
    """The router's weight float32[E, d] and bias float32[E], float32 whatever the model's
    dtype, as transformers keeps them (``_keep_in_fp32_modules_strict``)."""

    def __init__(self, arch: Architecture, spec: RoutedMoESpec, rngs: nnx.Rngs):
        E, d = spec.num_experts, arch.hidden_size
        normal = lambda *shape: jax.random.normal(rngs.params(), shape, jnp.float32)
        self.weight = nnx.Param(normal(E, d) * d**-0.5)
        self.e_score_correction_bias = nnx.Param(0.1 * normal(E))


class RoutedMoE(nnx.Module):
    """``DeepseekV3MoE``: routed experts (:func:`route`) plus the shared expert.

    Every expert runs on every token and the routing weights (zero outside the chosen ones) mix
    them, as :class:`~kvshard.models.model.MoE`: exact and simple, at ``num_experts /
    experts_per_token`` times the routed compute.
    """

    def __init__(self, arch: Architecture, rngs: nnx.Rngs):
        from kvshard.models.model import MLP

        spec = arch.routed_moe
        assert spec is not None
        self.spec = spec
        self.gate = Gate(arch, spec, rngs)
        self.experts = nnx.List(
            [MLP(arch, rngs, spec.intermediate_size) for _ in range(spec.num_experts)]
        )
        self.shared_experts = MLP(arch, rngs, spec.intermediate_size * spec.num_shared_experts)

    def __call__(self, x):
        logits = jnp.einsum("gtd,ed->gte", x.astype(jnp.float32), self.gate.weight[...])
        bias = self.gate.e_score_correction_bias[...]
        weights = route(jax.nn.sigmoid(logits), bias, self.spec)  # [G, T, E]
        stack = lambda name: jnp.stack([getattr(e, name).kernel[...] for e in self.experts])
        gate = jnp.einsum("gtd,edf->gtef", x, stack("gate_proj"))
        up = jnp.einsum("gtd,edf->gtef", x, stack("up_proj"))
        out = jnp.einsum("gtef,efd->gted", jax.nn.silu(gate) * up, stack("down_proj"))
        routed = jnp.einsum("gted,gte->gtd", out, weights.astype(x.dtype))
        return routed + self.shared_experts(x)
