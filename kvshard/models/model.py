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
from kvshard.models.rope import apply_rope

__all__ = ["ATTENTION_TAKES_SINKS", "CausalLM", "dense_attention"]

# gpt-oss's attention sinks need kvshard.attention(..., sinks=) (issue 21 item 2). Until it
# lands, a model with sinks is refused at construction rather than served without them.
ATTENTION_TAKES_SINKS = "sinks" in inspect.signature(kvshard.attention).parameters


class RMSNorm(nnx.Module):
    """x / rms(x) * (offset + scale): Llama casts to the input dtype before the scale, Gemma
    (offset 1) scales in float32, as transformers' two RMSNorms do."""

    def __init__(self, dim: int, eps: float, offset: float, dtype: str, rngs: nnx.Rngs):
        init = jnp.zeros if offset else jnp.ones
        self.scale = nnx.Param(
            init((dim,), dtype) + 0.1 * jax.random.normal(rngs.params(), (dim,), dtype)
        )
        self.eps, self.offset = eps, offset

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        return self.scale[...] * normed.astype(x.dtype)


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
        self.q_proj = _linear(d, H * D, arch.qkv_bias, arch, rngs)
        self.k_proj = _linear(d, Hkv * D, arch.qkv_bias, arch, rngs)
        self.v_proj = _linear(d, Hkv * D, arch.qkv_bias, arch, rngs)
        self.o_proj = _linear(H * D, d, arch.o_bias, arch, rngs)
        if arch.qk_norm:
            self.q_norm = RMSNorm(D, arch.rms_norm_eps, arch.norm_offset, arch.dtype, rngs)
            self.k_norm = RMSNorm(D, arch.rms_norm_eps, arch.norm_offset, arch.dtype, rngs)
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
            cache = kvshard.update(cache, self.layer, k, v, step)
            extra = {} if sinks is None else {"sinks": sinks.astype(jnp.float32)}
            out = kvshard.attention(
                q,
                cache,
                self.layer,
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
    def __init__(self, arch: Architecture, rngs: nnx.Rngs):
        d, f = arch.hidden_size, arch.intermediate_size
        self.gate_proj = _linear(d, f, arch.mlp_bias, arch, rngs)
        self.up_proj = _linear(d, f, arch.mlp_bias, arch, rngs)
        self.down_proj = _linear(f, d, arch.mlp_bias, arch, rngs)
        self.activation = arch.activation

    def __call__(self, x):
        return self.down_proj(_ACT[self.activation](self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, arch: Architecture, layer: int, rngs: nnx.Rngs):
        norm = lambda: RMSNorm(
            arch.hidden_size, arch.rms_norm_eps, arch.norm_offset, arch.dtype, rngs
        )
        self.input_layernorm = norm()
        self.self_attn = Attention(arch, layer, rngs)
        # Llama's post_attention_layernorm is the pre-MLP norm; Gemma 2/3's follows attention.
        self.post_attention_layernorm = norm()
        if arch.sandwich_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(arch, rngs)
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
        self.embed_tokens = nnx.Embed(
            arch.vocab_size, arch.hidden_size, dtype=arch.dtype, param_dtype=arch.dtype, rngs=rngs
        )
        self.layers = nnx.List([DecoderLayer(arch, i, rngs) for i in range(arch.num_layers)])
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, arch.norm_offset, arch.dtype, rngs)
        self.embed_scale = arch.embed_scale

    def __call__(self, tokens, positions, cache, step):
        x = self.embed_tokens(tokens)
        if self.embed_scale is not None:  # Gemma: sqrt(hidden), rounded to the model dtype
            x = x * jnp.asarray(self.embed_scale, x.dtype)
        for layer in self.layers:
            x, cache = layer(x, positions, cache, step)
        return self.norm(x), cache


class CausalLM(nnx.Module):
    """``model(tokens, positions, cache=None, step=None) -> (logits, cache)``.

    tokens, positions: int32[G, T]; logits: arch.dtype[G, T, vocab]. Raises NotImplementedError
    at construction for what is not implemented (a mixture-of-experts feed-forward; attention
    sinks while :func:`kvshard.attention` has no ``sinks`` argument).
    """

    def __init__(self, arch: Architecture, rngs: nnx.Rngs):
        if arch.moe:
            raise NotImplementedError(
                f"{arch.model_type}: the mixture-of-experts feed-forward is not implemented "
                "(kvshard.models serves dense MLPs only)"
            )
        if arch.sinks and not ATTENTION_TAKES_SINKS:
            raise NotImplementedError(
                f"{arch.model_type}: attention sinks need kvshard.attention(..., sinks=), which "
                "this kvshard does not have yet (issue 21 item 2)"
            )
        self.arch = arch
        self.model = Decoder(arch, rngs)
        if not arch.tie_word_embeddings:
            self.lm_head = _linear(arch.hidden_size, arch.vocab_size, False, arch, rngs)

    def __call__(self, tokens, positions, cache=None, step=None):
        h, cache = self.model(tokens, positions, cache, step)
        if self.arch.tie_word_embeddings:
            logits = self.model.embed_tokens.attend(h)
        else:
            logits = self.lm_head(h)
        if self.arch.final_soft_cap:
            cap = self.arch.final_soft_cap
            logits = cap * jnp.tanh(logits / cap)
        return logits, cache
