"""The decoder in flax NNX, one module tree for every :data:`~kvshard.models.ARCHITECTURES` entry.

Attribute names mirror Hugging Face's (``model.layers[i].self_attn.q_proj``, ...), so a
parameter's path is its checkpoint name (:mod:`kvshard.models.checkpoint`). What differs
between architectures is read from the :class:`~kvshard.models.Architecture`, never from the
model type.

Activations carry a leading pool axis ``G``: ``tokens`` int32[G, T]. Paged (``cache`` and
``step`` given), pool g's T tokens are its step's tokens (data-parallel page pools, ``G`` the
size of the cache's page axis, 1 without one); each layer writes its K/V with
:func:`kvshard.update` and attends with :func:`kvshard.attention` with its own window. Dense
(``cache=None``), row g is one whole sequence from position 0 (right-padded: causal attention
keeps the padding out of the real positions); that path is the check of the paged one.

The cache is passed explicitly and returned, never kept in ``nnx`` state: it is donated to
``jit`` every step so that :func:`kvshard.update` writes in place, it is sharded by KV head
independently of the weights, and one model can serve from several caches or none.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
from flax import nnx

import kvshard
from kvshard.models.config import Architecture, LayerSpec
from kvshard.models.deepseek import MLAttention, RoutedMoE
from kvshard.models.rope import apply_rope

__all__ = ["ATTENTION_TAKES_SINKS", "CausalLM", "check_servable", "dense_attention"]

# gpt-oss's attention sinks need kvshard.attention(..., sinks=); a kvshard without it refuses
# such a model rather than serving it without them.
ATTENTION_TAKES_SINKS = "sinks" in inspect.signature(kvshard.attention).parameters


def check_servable(arch: Architecture) -> None:
    """Raises NotImplementedError when serving ``arch`` from a cache needs what kvshard lacks."""
    if arch.sinks and not ATTENTION_TAKES_SINKS:
        raise NotImplementedError(
            f"{arch.model_type}: attention sinks need kvshard.attention(..., sinks=), which this "
            "kvshard does not have yet (issue 21 item 2); the dense path (no cache) runs"
        )


class RMSNorm(nnx.Module):
    """x / rms(x) * (offset + scale), normalised in float32: Llama casts to the input dtype
    before the scale, Gemma (offset 1) and gpt-oss scale in float32, as transformers does."""

    def __init__(self, dim: int, arch: Architecture, rngs: nnx.Rngs, eps: float | None = None):
        init = jnp.zeros if arch.norm_offset else jnp.ones
        noise = 0.1 * jax.random.normal(rngs.params(), (dim,), arch.dtype)
        self.scale = nnx.Param(init((dim,), arch.dtype) + noise)
        self.eps = arch.rms_norm_eps if eps is None else eps
        self.offset = arch.norm_offset
        self.in_float32 = arch.norm_in_float32

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.in_float32:
            return (normed * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        return (self.offset + self.scale[...]) * normed.astype(x.dtype)


def embedding(arch: Architecture, rngs: nnx.Rngs) -> nnx.Embed:
    """The token embedding of a decoder: float[vocab_size, hidden_size] in the model dtype."""
    return nnx.Embed(
        arch.vocab_size, arch.hidden_size, dtype=arch.dtype, param_dtype=arch.dtype, rngs=rngs
    )


def _linear(fan_in: int, fan_out: int, bias: bool, arch: Architecture, rngs: nnx.Rngs):
    return nnx.Linear(
        fan_in, fan_out, use_bias=bias, dtype=arch.dtype, param_dtype=arch.dtype, rngs=rngs
    )


def dense_attention(q, k, v, spec: LayerSpec, arch: Architecture, sinks=None):
    """Causal attention of whole sequences: q [G, T, Hq, D], k/v [G, T, Hkv, D] -> like q.

    Scores and softmax in float32; sliding window, soft cap and sinks as the paged kernel.
    """
    T, group = q.shape[1], q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    i, j = jnp.arange(T)[:, None], jnp.arange(T)[None]
    mask = (j <= i) & ((i - j < spec.window) if spec.window else True)
    scores = jnp.einsum("gthd,gshd->ghts", q, k, preferred_element_type=jnp.float32)
    scores = scores * arch.sm_scale
    if arch.attn_soft_cap:
        scores = arch.attn_soft_cap * jnp.tanh(scores / arch.attn_soft_cap)
    scores = jnp.where(mask, scores, -jnp.inf)
    if sinks is None:
        probs = jax.nn.softmax(scores, axis=-1)
    else:  # a sink is one more logit per head in the denominator, with no value
        sink = jnp.broadcast_to(
            sinks.astype(jnp.float32)[None, :, None, None], (*scores.shape[:3], 1)
        )
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
    return jnp.einsum("ghts,gshd->gthd", probs.astype(v.dtype), v)


class Attention(nnx.Module):
    def __init__(self, arch: Architecture, layer: int, rngs: nnx.Rngs):
        d, H, Hkv, D = arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.arch, self.layer, self.spec = arch, layer, arch.layers[layer]  # static
        self.cache_layer = arch.attention_layers.index(layer)  # a hybrid's Mamba layers: no K/V
        self.q_proj = _linear(d, H * D, arch.qkv_bias, arch, rngs)
        self.k_proj = _linear(d, Hkv * D, arch.qkv_bias, arch, rngs)
        self.v_proj = _linear(d, Hkv * D, arch.qkv_bias, arch, rngs)
        self.o_proj = _linear(H * D, d, arch.o_bias, arch, rngs)
        if arch.qk_norm:
            self.q_norm = RMSNorm(D, arch, rngs)
            self.k_norm = RMSNorm(D, arch, rngs)
        if arch.sinks:
            self.sinks = nnx.Param(jax.random.normal(rngs.params(), (H,), arch.dtype))

    def __call__(self, x, positions, cache, step):
        arch, (G, T) = self.arch, x.shape[:2]
        q = self.q_proj(x).reshape(G, T, arch.num_heads, arch.head_dim)
        k = self.k_proj(x).reshape(G, T, arch.num_kv_heads, arch.head_dim)
        v = self.v_proj(x).reshape(G, T, arch.num_kv_heads, arch.head_dim)
        if arch.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, positions, self.spec.rope), apply_rope(k, positions, self.spec.rope)
        sinks = self.sinks[...] if arch.sinks else None
        if cache is None:
            out = dense_attention(q, k, v, self.spec, arch, sinks)
        else:  # write this step's K/V first, so new tokens also attend to themselves
            check_servable(arch)
            cache = kvshard.update(cache, self.cache_layer, k, v, step)
            extra = {} if sinks is None else {"sinks": sinks.astype(jnp.float32)}
            out = kvshard.attention(
                cache,
                self.cache_layer,
                q,
                step,
                sm_scale=arch.sm_scale,
                sliding_window=self.spec.window,
                soft_cap=arch.attn_soft_cap,
                **extra,
            )
        return self.o_proj(out.reshape(G, T, -1)), cache


_ACT = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class MLP(nnx.Module):
    def __init__(self, arch: Architecture, rngs: nnx.Rngs, intermediate_size: int | None = None):
        d, f = arch.hidden_size, intermediate_size or arch.intermediate_size
        self.gate_proj = _linear(d, f, arch.mlp_bias, arch, rngs)
        self.up_proj = _linear(d, f, arch.mlp_bias, arch, rngs)
        self.down_proj = _linear(f, d, arch.mlp_bias, arch, rngs)
        self.activation = arch.activation

    def __call__(self, x):
        return self.down_proj(_ACT[self.activation](self.gate_proj(x)) * self.up_proj(x))


class Router(nnx.Module):
    def __init__(self, arch: Architecture, rngs: nnx.Rngs):
        E, d = arch.num_experts, arch.hidden_size
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (E, d), arch.dtype) * d**-0.5)
        self.bias = nnx.Param(jnp.zeros((E,), arch.dtype))


class Experts(nnx.Module):
    """gpt-oss's experts, stored as transformers keeps them: gate_up_proj [E, d, 2f] with gate
    and up interleaved (even / odd columns), down_proj [E, f, d], each with a bias."""

    def __init__(self, arch: Architecture, rngs: nnx.Rngs):
        E, d, f = arch.num_experts, arch.hidden_size, arch.intermediate_size
        normal = lambda *shape: jax.random.normal(rngs.params(), shape, arch.dtype)
        self.gate_up_proj = nnx.Param(normal(E, d, 2 * f) * d**-0.5)
        self.gate_up_proj_bias = nnx.Param(jnp.zeros((E, 2 * f), arch.dtype))
        self.down_proj = nnx.Param(normal(E, f, d) * f**-0.5)
        self.down_proj_bias = nnx.Param(jnp.zeros((E, d), arch.dtype))


class MoE(nnx.Module):
    """Top-k mixture of experts (gpt-oss). Every expert runs on every token and the router's
    weights (zero outside each token's top k) mix them: exact, and as simple as it gets; it
    costs num_experts / experts_per_token times the routed compute."""

    def __init__(self, arch: Architecture, rngs: nnx.Rngs):
        self.router, self.experts = Router(arch, rngs), Experts(arch, rngs)
        self.top_k, self.alpha = arch.experts_per_token, arch.swiglu_alpha
        self.limit = arch.swiglu_limit

    def __call__(self, x):
        logits = x @ self.router.weight[...].T + self.router.bias[...]  # [G, T, E]
        top, chosen = jax.lax.top_k(logits, self.top_k)
        scores = jax.nn.softmax(top.astype(jnp.float32), axis=-1).astype(x.dtype)
        onehot = jax.nn.one_hot(chosen, logits.shape[-1], dtype=x.dtype)  # [G, T, k, E]
        weights = jnp.einsum("gtk,gtke->gte", scores, onehot)
        e = self.experts
        gate_up = jnp.einsum("gtd,edf->gtef", x, e.gate_up_proj[...]) + e.gate_up_proj_bias[...]
        gate = jnp.minimum(gate_up[..., ::2], self.limit)
        up = jnp.clip(gate_up[..., 1::2], -self.limit, self.limit)
        hidden = (up + 1) * gate * jax.nn.sigmoid(gate * self.alpha)
        out = jnp.einsum("gtef,efd->gted", hidden, e.down_proj[...]) + e.down_proj_bias[...]
        return jnp.einsum("gted,gte->gtd", out, weights)


class DecoderLayer(nnx.Module):
    def __init__(self, arch: Architecture, layer: int, rngs: nnx.Rngs):
        norm = lambda: RMSNorm(arch.hidden_size, arch, rngs)
        self.input_layernorm = norm()
        self.self_attn: nnx.Module
        if arch.mla is not None:  # DeepSeek-V3's latent attention
            self.self_attn = MLAttention(arch, layer, rngs)
        else:
            self.self_attn = Attention(arch, layer, rngs)
        # Llama's post_attention_layernorm is the pre-MLP norm; Gemma 2/3's follows attention.
        self.post_attention_layernorm = norm()
        if arch.sandwich_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp: nnx.Module
        if arch.routed_moe is not None and arch.routed_moe.is_moe(layer):
            self.mlp = RoutedMoE(arch, rngs)
        else:
            self.mlp = MoE(arch, rngs) if arch.moe else MLP(arch, rngs)
        self.sandwich = arch.sandwich_norms

    def __call__(self, x, positions, cache, step):
        h, cache = self.self_attn(self.input_layernorm(x), positions, cache, step)
        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            h = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
            return x + h, cache
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class Decoder(nnx.Module):
    def __init__(self, arch: Architecture, rngs: nnx.Rngs):
        self.embed_tokens = embedding(arch, rngs)
        self.layers = nnx.List([DecoderLayer(arch, i, rngs) for i in range(arch.num_layers)])
        self.norm = RMSNorm(arch.hidden_size, arch, rngs)
        self.embed_scale = arch.embed_scale

    def __call__(self, tokens, positions, cache, step):
        x = self.embed_tokens(tokens)
        if self.embed_scale is not None:  # Gemma: sqrt(hidden), rounded to the model dtype
            x = x * jnp.asarray(self.embed_scale, x.dtype)
        for layer in self.layers:
            x, cache = layer(x, positions, cache, step)
        return self.norm(x), cache


class CausalLM(nnx.Module):
    """``model(tokens, positions, cache=None, step=None, pages=None) -> (logits, cache)``.

    tokens, positions: int32[G, T]; logits: arch.dtype[G, T, vocab]. A model with attention
    sinks (gpt-oss) runs densely; paged, it raises NotImplementedError until
    :func:`kvshard.attention` takes ``sinks`` (:func:`check_servable`). A Mamba-2 hybrid
    (``arch.mamba``) has a :class:`~kvshard.models.hybrid.HybridDecoder`; paged, its cache is
    a :class:`~kvshard.models.state_cache.HybridCache` and ``pages`` int32[G, S, R] gives each
    request row's state page in each of the S state groups.
    """

    def __init__(self, arch: Architecture, rngs: nnx.Rngs):
        self.arch = arch
        self.model: nnx.Module
        if arch.mamba is not None:
            from kvshard.models.hybrid import HybridDecoder  # imports this module

            self.model = HybridDecoder(arch, rngs)
        else:
            self.model = Decoder(arch, rngs)
        if not arch.tie_word_embeddings:
            self.lm_head = _linear(arch.hidden_size, arch.vocab_size, False, arch, rngs)

    def __call__(self, tokens, positions, cache=None, step=None, pages=None):
        if self.arch.mamba is not None:
            h, cache = self.model(tokens, positions, cache, step, pages)
        else:
            h, cache = self.model(tokens, positions, cache, step)
        if self.arch.tie_word_embeddings:
            logits = self.model.embed_tokens.attend(h)
        else:
            logits = self.lm_head(h)
        if self.arch.final_soft_cap:
            cap = self.arch.final_soft_cap
            logits = cap * jnp.tanh(logits / cap)
        return logits, cache
