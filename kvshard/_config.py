"""Model configs: the KV-cache geometry of a Hugging Face ``config.json``, in pure Python.

:func:`read_model_config` reads the fields a paged KV cache depends on and nothing else, so
that :meth:`kvshard.CacheSpec.from_config` and ``kvshard plan --config`` can size a cache for any
decoder config without JAX, a checkpoint or the ``transformers`` package:

* ``num_hidden_layers`` -> layers;
* ``num_key_value_heads`` (grouped-query attention; falls back to ``num_attention_heads`` for
  multi-head attention) -> KV heads;
* ``head_dim``, or ``hidden_size / num_attention_heads`` when absent -> head dimension;
* ``num_attention_heads`` -> query heads (when present), which must split over the head axis;
* ``torch_dtype`` (``dtype`` in newer configs) -> the cache dtype unless the caller picks one;
* ``sliding_window`` (with ``use_sliding_window``, ``layer_types``, ...) -> the attention window
  when every layer uses it.

Multimodal configs that nest the language model under ``text_config`` are read there. A config
that cannot be read (a missing or non-integer field, multi-head latent attention) raises
:class:`ConfigError` with one line naming the field.

The presets of ``kvshard plan --model NAME`` are such configs, shipped in ``kvshard/configs/``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from importlib import resources
from os import PathLike
from pathlib import Path
from typing import Any

from kvshard._errors import KvshardError

__all__ = ["PRESETS", "ConfigError", "ModelGeometry", "preset_config", "read_model_config"]

# Shipped configs, by `kvshard plan --model` name (kvshard/configs/<name>.json).
PRESETS = ("llama-3-8b", "llama-3-70b", "mistral-7b", "qwen2.5-7b", "qwen2.5-72b")

# Hugging Face `torch_dtype` spellings -> NumPy names (CacheSpec's vocabulary).
_TORCH_DTYPES = {
    "bfloat16": "bfloat16",
    "float16": "float16",
    "half": "float16",
    "float32": "float32",
    "float": "float32",
}

# Fields that mark a model whose cache is not per-head K/V (DeepSeek-style multi-head latent
# attention caches one compressed latent per token).
_MLA_FIELDS = ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim")


class ConfigError(KvshardError, ValueError):
    """A model config that kvshard cannot size a cache for; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ModelGeometry:
    """What a KV cache needs to know about a model, read from its config.

    Attributes:
      num_layers: transformer layers (``num_hidden_layers``).
      num_kv_heads: KV heads (``num_key_value_heads``, else ``num_attention_heads``).
      head_dim: head dimension (``head_dim``, else ``hidden_size // num_attention_heads``).
      dtype: the weights' dtype (``torch_dtype``) as a NumPy name, or None if the config has none.
      sliding_window: the attention window W when every layer uses one (a query at position
        ``p`` attends keys ``p - W + 1 .. p``), else None.
      window_note: why a config's ``sliding_window`` does not apply to every layer (e.g.
        ``"sliding_window 4096 on 31 of 62 layers"``), else None.
      name: the config's ``_name_or_path`` or the file it came from, for messages.
      num_q_heads: query heads (``num_attention_heads``), or None if the config has none; the
        planner checks they split over the head axis as :func:`kvshard.attention` needs.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str | None = None
    sliding_window: int | None = None
    window_note: str | None = None
    name: str | None = None
    num_q_heads: int | None = None


def preset_config(name: str) -> dict[str, Any]:
    """Returns the shipped config.json of preset ``name`` (one of :data:`PRESETS`) as a dict.

    Raises:
      ConfigError: unknown name.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown model {name!r}; known presets: {', '.join(PRESETS)}")
    text = resources.files("kvshard").joinpath("configs", f"{name}.json").read_text("utf-8")
    config: dict[str, Any] = json.loads(text)
    return config


def _load(config: Mapping[str, Any] | str | PathLike[str]) -> tuple[Mapping[str, Any], str]:
    """Returns (the config's mapping, a label for messages)."""
    if isinstance(config, Mapping):
        return config, str(config.get("_name_or_path") or "config")
    path = Path(config)
    if path.is_dir():  # a model directory, as Hugging Face tools accept
        path = path / "config.json"
    try:
        text = path.read_text("utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config ({err.strerror or err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config.json holds a JSON object, got {type(data).__name__}")
    return data, str(path)


def _positive_int(config: Mapping[str, Any], field: str, where: str) -> int:
    value = config[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where}: {field}={value!r} must be a positive integer")
    return value


def _window(
    config: Mapping[str, Any], num_layers: int, where: str
) -> tuple[int | None, str | None]:
    """Returns (window of every layer or None, a note when only some layers use it)."""
    window = config.get("sliding_window")
    if window is None or config.get("use_sliding_window") is False:
        return None, None  # Qwen2 configs carry a sliding_window they do not use
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ConfigError(f"{where}: sliding_window={window!r} must be a positive integer or null")
    windowed = num_layers
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list):
        windowed = sum(1 for t in layer_types if t == "sliding_attention")
    elif (
        isinstance(config.get("sliding_window_pattern"), int)
        and config["sliding_window_pattern"] > 1
    ):  # Gemma 3: every pattern-th layer is global
        windowed = num_layers - num_layers // config["sliding_window_pattern"]
    elif config.get("use_sliding_window") is True and isinstance(
        config.get("max_window_layers"), int
    ):  # Qwen2: the first max_window_layers layers attend in full
        windowed = max(0, num_layers - config["max_window_layers"])
    elif config.get("model_type") in ("gemma2", "cohere2"):  # alternate local and global layers
        windowed = num_layers // 2
    if windowed == num_layers:
        return window, None
    if windowed == 0:
        return None, None
    return None, (
        f"sliding_window {window} on {windowed} of {num_layers} layers: the other layers read "
        "every page, so no page can be released"
    )


def read_model_config(config: Mapping[str, Any] | str | PathLike[str]) -> ModelGeometry:
    """Returns the KV-cache geometry of a Hugging Face model config.

    Args:
      config: a ``config.json`` path, a model directory holding one, or the parsed dict.

    Raises:
      ConfigError: unreadable, a required field missing or not a positive integer, head_dim not
        given and ``hidden_size`` not divisible by ``num_attention_heads``, an unknown
        ``torch_dtype``, or multi-head latent attention (``kv_lora_rank``); one line naming the
        field.
    """
    data, where = _load(config)
    if "num_hidden_layers" not in data and isinstance(data.get("text_config"), Mapping):
        data = data["text_config"]  # multimodal wrappers (Llama 4, Gemma 3, Qwen2-VL, ...)
        where += " (text_config)"
    for field in _MLA_FIELDS:
        if data.get(field) is not None:
            raise ConfigError(
                f"{where}: {field}={data[field]!r}: multi-head latent attention (DeepSeek-style "
                "MLA) caches a compressed latent, not per-head K and V; kvshard does not "
                "support it"
            )
    if "num_hidden_layers" not in data:
        raise ConfigError(f"{where}: num_hidden_layers is missing (the number of layers)")
    num_layers = _positive_int(data, "num_hidden_layers", where)

    kv_field = "num_key_value_heads" if data.get("num_key_value_heads") is not None else None
    if kv_field is None and data.get("num_attention_heads") is not None:
        kv_field = "num_attention_heads"  # multi-head attention: one KV head per query head
    if kv_field is None:
        raise ConfigError(
            f"{where}: num_key_value_heads is missing (and no num_attention_heads to fall back on)"
        )
    num_kv_heads = _positive_int(data, kv_field, where)

    if data.get("head_dim") is not None:
        head_dim = _positive_int(data, "head_dim", where)
    else:
        for field in ("hidden_size", "num_attention_heads"):
            if data.get(field) is None:
                raise ConfigError(
                    f"{where}: head_dim is missing and so is {field} (head_dim defaults to "
                    "hidden_size / num_attention_heads)"
                )
        hidden = _positive_int(data, "hidden_size", where)
        heads = _positive_int(data, "num_attention_heads", where)
        if hidden % heads:
            raise ConfigError(
                f"{where}: head_dim is missing and hidden_size={hidden} is not a multiple of "
                f"num_attention_heads={heads}; add head_dim"
            )
        head_dim = hidden // heads

    dtype_field = "torch_dtype" if "torch_dtype" in data else "dtype"
    raw_dtype = data.get(dtype_field)
    dtype = None
    if raw_dtype is not None and raw_dtype != "auto":
        name = str(raw_dtype).removeprefix("torch.")
        if name not in _TORCH_DTYPES:
            raise ConfigError(
                f"{where}: {dtype_field}={raw_dtype!r} is not one of {', '.join(_TORCH_DTYPES)}"
            )
        dtype = _TORCH_DTYPES[name]

    num_q_heads = None
    if data.get("num_attention_heads") is not None:
        num_q_heads = _positive_int(data, "num_attention_heads", where)
    window, note = _window(data, num_layers, where)
    return ModelGeometry(
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        sliding_window=window,
        window_note=note,
        name=str(data.get("_name_or_path") or where),
        num_q_heads=num_q_heads,
    )
