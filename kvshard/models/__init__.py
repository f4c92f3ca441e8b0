"""Hugging Face decoders in flax NNX, served from a kvshard cache (needs ``flax``).

* :mod:`~kvshard.models.config`: config.json -> :class:`Architecture` (every switch the model
  reads: per-layer windows and rotary embeddings, norms, biases, soft caps, ...);
* :mod:`~kvshard.models.rope`: RoPE and its default/linear/llama3/yarn frequencies;
* :mod:`~kvshard.models.safetensors`: a NumPy-only safetensors reader (single or sharded);
* :mod:`~kvshard.models.checkpoint`: Hugging Face names -> NNX parameters, sharded over the
  tensor-parallel mesh axis like the cache;
* :mod:`~kvshard.models.model`: :class:`CausalLM`, paged (kvshard.update + kvshard.attention
  per layer) or dense;
* :mod:`~kvshard.models.deepseek`: DeepSeek-V3's multi-head latent attention (absorbed, in
  latent space) and its routed mixture of experts;
* :mod:`~kvshard.models.serve`: the cache of a model (its layer groups, the pool sized per
  group), continuous batching over data-parallel page pools, and the dense check.

``examples/flax_llama.py`` is the command line; docs/models.md lists what each architecture
needs and how to add one.
"""

from kvshard.models.checkpoint import load_checkpoint, shard_model
from kvshard.models.config import (
    ARCHITECTURES,
    Architecture,
    LayerSpec,
    MLASpec,
    RopeSpec,
    RoutedMoESpec,
    read_architecture,
)
from kvshard.models.model import CausalLM
from kvshard.models.serve import (
    Request,
    cache_spec,
    dense_logits,
    pages_per_request,
    serve,
    serve_step,
)

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "CausalLM",
    "LayerSpec",
    "MLASpec",
    "Request",
    "RopeSpec",
    "RoutedMoESpec",
    "cache_spec",
    "dense_logits",
    "load_checkpoint",
    "pages_per_request",
    "read_architecture",
    "serve",
    "serve_step",
    "shard_model",
]
