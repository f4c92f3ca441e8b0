"""KV-cache geometry of a few well-known models, for ``kvshard plan --model NAME``.

Only the three numbers the cache depends on: transformer layers, KV heads (grouped-query
attention: fewer than the query heads) and head dimension, as published in each model's
``config.json`` (``num_hidden_layers``, ``num_key_value_heads``, ``hidden_size //
num_attention_heads``).
"""

from __future__ import annotations

import dataclasses

__all__ = ["PRESETS", "ModelPreset"]


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    """Cache-relevant shape of one model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


PRESETS: dict[str, ModelPreset] = {
    "llama-3-8b": ModelPreset(num_layers=32, num_kv_heads=8, head_dim=128),
    "llama-3-70b": ModelPreset(num_layers=80, num_kv_heads=8, head_dim=128),
    "mistral-7b": ModelPreset(num_layers=32, num_kv_heads=8, head_dim=128),
    "qwen2.5-7b": ModelPreset(num_layers=28, num_kv_heads=4, head_dim=128),
    "qwen2.5-72b": ModelPreset(num_layers=80, num_kv_heads=8, head_dim=128),
}
