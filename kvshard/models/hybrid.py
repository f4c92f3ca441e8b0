"""The decoder of a Mamba-2 / attention hybrid (Bamba), served from a :class:`HybridCache`.

Layer i is attention (``arch.layers[i].mixer == "attention"``, the same :class:`Attention` as
the other families, its K/V in KV-cache layer ``arch.attention_layers.index(i)``) or a
:class:`~kvshard.models.mamba2.Mamba2Mixer` whose per-request state is in
:mod:`kvshard.models.state_cache` (its state group and cache layer from
:func:`~kvshard.models.state_cache.state_layout`). Names are
transformers' Bamba names: ``layers[i].mamba`` / ``layers[i].self_attn``,
``input_layernorm``, ``pre_ff_layernorm``, ``feed_forward``, ``final_layernorm``.
"""

from __future__ import annotations

from flax import nnx

from kvshard.models.config import Architecture
from kvshard.models.mamba2 import Mamba2Mixer
from kvshard.models.model import MLP, Attention, RMSNorm, embedding
from kvshard.models.state_cache import HybridCache, state_layout, token_rows

__all__ = ["HybridDecoder", "HybridDecoderLayer"]


class HybridDecoderLayer(nnx.Module):
    def __init__(self, arch: Architecture, layer: int, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(arch.hidden_size, arch, rngs)
        self.pre_ff_layernorm = RMSNorm(arch.hidden_size, arch, rngs)
        self.feed_forward = MLP(arch, rngs)
        self.is_mamba = arch.layers[layer].mixer == "mamba"
        if self.is_mamba:
            self.mamba = Mamba2Mixer(arch, rngs)
            place = state_layout(arch).mamba[layer]
            assert place is not None
            self.state_group, self.cache_layer = place  # static
        else:
            self.self_attn = Attention(arch, layer, rngs)

    def __call__(self, x, positions, cache, step, token_info):
        h = self.input_layernorm(x)
        if not self.is_mamba:
            kv = None if cache is None else cache.kv
            h, kv = self.self_attn(h, positions, kv, step)
            cache = None if cache is None else cache._replace(kv=kv)
        elif cache is None:
            h = self.mamba(h)[0]
        else:
            j, state = self.cache_layer, cache.state
            row, pages, fresh, valid = token_info
            info = (row, pages[:, self.state_group], fresh, valid)
            h, conv, ssm = self.mamba(h, state.conv[:, j], state.ssm[:, j], info)
            state = state.replace(state.conv.at[:, j].set(conv), state.ssm.at[:, j].set(ssm))
            cache = cache._replace(state=state)
        x = x + h
        return x + self.feed_forward(self.pre_ff_layernorm(x)), cache


class HybridDecoder(nnx.Module):
    def __init__(self, arch: Architecture, rngs: nnx.Rngs):
        self.embed_tokens = embedding(arch, rngs)
        self.layers = nnx.List([HybridDecoderLayer(arch, i, rngs) for i in range(arch.num_layers)])
        self.final_layernorm = RMSNorm(arch.hidden_size, arch, rngs)

    def __call__(self, tokens, positions, cache: HybridCache | None, step, pages=None):
        """cache None: dense; else ``pages`` int32[G, num_state_groups, R] each request row's
        state page in each state group (``allocator.state_pages(rows)`` per pool)."""
        x, token_info = self.embed_tokens(tokens), None
        if cache is not None:
            if pages is None:
                raise ValueError("a hybrid model served from a cache needs its state pages")
            row, fresh, valid = token_rows(step)
            token_info = (row, pages, fresh, valid)
        for layer in self.layers:
            x, cache = layer(x, positions, cache, step, token_info)
        return self.final_layernorm(x), cache
