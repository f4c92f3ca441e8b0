"""Hugging Face checkpoint -> a :class:`~kvshard.models.CausalLM` whose weights are sharded like
the cache.

Names: a parameter's NNX path is its Hugging Face name (the modules are named alike), with
``kernel`` stored as ``weight`` transposed (PyTorch's ``nn.Linear`` keeps ``[out, in]``, flax's
kernel is ``[in, out]``), and ``embedding`` / ``scale`` stored as ``weight``.

Sharding (Megatron-style, over the tensor-parallel mesh axis, replicated over the others):
q/k/v and gate/up by output columns (heads, hidden units), o/down by input rows, so each
device computes the heads whose KV pages it holds and the projections end in one all-reduce.
K/V projections are split only when every device gets whole KV heads (with fewer KV heads
than devices kvshard replicates them in the cache, and here too). The untied output
projection is split by vocabulary; embeddings and norms are replicated. DeepSeek's latent
attention splits ``q_b_proj`` (or ``q_proj``) and ``kv_b_proj`` by head and replicates the
latent's ``q_a_proj`` and ``kv_a_proj_with_mqa``; its experts are split by hidden unit like
the dense MLP, its router replicated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kvshard.models.config import Architecture, read_architecture
from kvshard.models.model import CausalLM
from kvshard.models.safetensors import open_checkpoint

__all__ = ["hf_name", "load_checkpoint", "partition", "shard_model"]

# Checkpoint tensors that are not parameters (rotary tables some exports save).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _next_token_layer(name: str, arch: Architecture) -> bool:
    """A tensor of DeepSeek's multi-token-prediction layers (``model.layers.{i}`` for i past
    ``num_hidden_layers``: DeepSeek-V3's layer 61), which transformers' DeepseekV3 skips too."""
    parts = name.split(".")
    return (
        arch.mla is not None
        and parts[:2] == ["model", "layers"]
        and len(parts) > 2
        and parts[2].isdigit()
        and int(parts[2]) >= arch.num_layers
    )


def hf_name(path: tuple[Any, ...]) -> tuple[str, bool]:
    """(Hugging Face tensor name, stored transposed) of an NNX parameter path."""
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, "weight" if leaf in ("kernel", "embedding", "scale") else leaf]), (
        leaf == "kernel"
    )


def partition(
    path: tuple[Any, ...], shape: tuple[int, ...], arch: Architecture, tp: int, axis: str
) -> P:
    """The PartitionSpec of one parameter (see the module docstring)."""
    names = [str(p) for p in path]
    owner, leaf = names[-2], names[-1]

    def split_if(ok: bool, dim: int) -> P:
        if not ok or tp == 1:
            return P()
        return P(*[axis if i == dim else None for i in range(len(shape))])

    heads_ok = arch.num_heads % tp == 0
    kv_ok = arch.num_kv_heads % tp == 0
    ffn_ok = arch.intermediate_size % tp == 0
    if leaf == "sinks":  # one per query head
        return split_if(heads_ok, 0)
    if owner in ("q_proj", "q_b_proj", "kv_b_proj"):  # MLA: q_b / kv_b map to every head
        return split_if(heads_ok, len(shape) - 1)
    if owner in ("k_proj", "v_proj"):
        return split_if(kv_ok and heads_ok, len(shape) - 1)
    if owner == "o_proj":
        return split_if(heads_ok and leaf == "kernel", 0)
    # A dense MLP's or an expert's hidden units (DeepSeek's experts are narrower than
    # intermediate_size: the split is checked on the tensor's own width).
    if owner in ("gate_proj", "up_proj"):
        return split_if(shape[-1] % tp == 0, len(shape) - 1)
    if owner == "down_proj":
        return split_if(shape[0] % tp == 0 and leaf == "kernel", 0)
    if leaf in ("gate_up_proj", "gate_up_proj_bias"):  # experts' hidden units (pairs stay whole)
        return split_if(ffn_ok, len(shape) - 1)
    if leaf == "down_proj":
        return split_if(ffn_ok, 1)
    if owner == "lm_head":
        return split_if(arch.vocab_size % tp == 0, len(shape) - 1)
    return P()


def _put(path: tuple[Any, ...], value: Any, arch: Architecture, mesh: Mesh, axis: str) -> jax.Array:
    spec = partition(path, tuple(value.shape), arch, int(mesh.shape[axis]), axis)
    return jax.device_put(value, NamedSharding(mesh, spec))


def shard_model(model: CausalLM, mesh: Mesh, axis: str = "model") -> CausalLM:
    """The same model with every parameter placed by :func:`partition` over ``mesh``."""
    graphdef, state = nnx.split(model)
    flat = [
        (path, var.replace(_put(path, var.get_value(), model.arch, mesh, axis)))
        for path, var in nnx.to_flat_state(state)
    ]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_checkpoint(directory: str | Path, mesh: Mesh, axis: str = "model") -> CausalLM:
    """Builds the model of ``directory/config.json`` and loads its safetensors weights.

    Each tensor is read from its memory-mapped file, transposed where needed, cast to the
    config's dtype (float32 for DeepSeek's router, as transformers keeps it) and put on
    ``mesh`` in its shard (:func:`partition`); nothing is initialised randomly.

    Raises:
      kvshard.ConfigError: the config cannot be read (:func:`read_architecture`).
      NotImplementedError: the architecture needs something not implemented (see CausalLM).
      KeyError: a parameter the checkpoint lacks (all of them named).
      ValueError: a tensor of the wrong shape, or checkpoint tensors no parameter reads (they
        would be silently ignored otherwise: e.g. biases of an unsupported variant); DeepSeek's
        multi-token-prediction layers past ``num_hidden_layers`` are skipped, as transformers
        does.
    """
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text("utf-8"))
    tensors = open_checkpoint(directory)
    if isinstance(config, dict) and "tie_word_embeddings" not in config:
        # Absent key: tied iff there is no output projection to load (transformers would
        # initialise a missing one randomly; one that is there is what it uses).
        config = {**config, "tie_word_embeddings": "lm_head.weight" not in tensors}
    arch = read_architecture(config)
    abstract = nnx.eval_shape(lambda: CausalLM(arch, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat, used, missing = [], set(), []
    for path, var in nnx.to_flat_state(state):
        name, transposed = hf_name(path)
        if name not in tensors:
            missing.append(name)
            continue
        array = tensors[name]
        array = array.T if transposed else array
        expected = tuple(var.get_value().shape)
        if array.shape != expected:
            raise ValueError(
                f"{name}: shape {list(tensors.shape(name))} in the checkpoint, expected "
                f"{list(expected[::-1] if transposed else expected)}"
            )
        # One tensor at a time: host memory holds one converted tensor, never the model.
        # The parameter's own dtype: the model's, but float32 where transformers keeps a
        # module in float32 (DeepSeek's router).
        dtype = var.get_value().dtype
        flat.append((path, var.replace(_put(path, np.asarray(array, dtype), arch, mesh, axis))))
        used.add(name)
    if missing:
        raise KeyError(f"{directory}: the checkpoint lacks {', '.join(missing)}")
    unused = sorted(
        n
        for n in tensors
        if n not in used
        and not n.endswith(IGNORED_SUFFIXES)
        and not (arch.tie_word_embeddings and n == "lm_head.weight")
        and not _next_token_layer(n, arch)
    )
    if unused:
        raise ValueError(
            f"{directory}: tensors no parameter of {arch.model_type} reads: {', '.join(unused[:8])}"
            + (f" (and {len(unused) - 8} more)" if len(unused) > 8 else "")
        )
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
