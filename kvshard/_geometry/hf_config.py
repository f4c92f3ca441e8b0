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
* each layer's attention type (:data:`LayerType`): full, sliding window W (``sliding_window``)
  or chunked local C (``attention_chunk_size``), from whichever convention the config uses
  (:func:`layer_types_of`); ``sliding_window`` of the geometry is W when every layer uses it;
* multi-head latent attention (DeepSeek-V2/V3/R1, Kimi-K2: ``kv_lora_rank`` set): one latent
  row per token, so 1 KV "head" of ``kv_lora_rank + qk_rope_head_dim`` values (the config's
  ``num_key_value_heads`` and ``head_dim``, which transformers writes for the rope, do not
  size that cache); ``kv_lora_rank`` of the geometry says so (a ``kv_layout="latent"`` cache).

Multimodal configs that nest the language model under ``text_config`` are read there. A config
that cannot be read (a missing or non-integer field) raises
:class:`ConfigError` with one line naming the field.

This is kvshard's one reader of config.json: the planner, :meth:`kvshard.CacheSpec.from_config`
and the flax template (:func:`kvshard.models.read_architecture`, which adds the fields only the
model code needs) all take the geometry from :func:`read_model_config`, so they cannot disagree.
A field written as JSON ``null`` means what transformers' config class makes of ``None``, as
``save_pretrained`` writes every attribute, unset ones as ``null`` (:func:`config_value`):

* a derived size or a switch falls back to its default: ``"head_dim": null`` (every
  MistralConfig) is ``hidden_size / num_attention_heads``, ``"num_key_value_heads": null`` is
  ``num_attention_heads``, a null ``max_window_layers``, ``sliding_window_pattern``,
  ``rms_norm_eps``, ``tie_word_embeddings``, ... their defaults;
* an optional feature is off: ``"sliding_window": null`` (Mistral v0.3, Qwen2 without
  ``use_sliding_window``) is full attention, a null ``rope_scaling`` plain RoPE, a null soft
  cap no cap.

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
from kvshard._geometry.layer_types import (
    FULL,
    LayerType,
    check_layer_types,
    describe_groups,
    group_layers,
    is_positive_int,
    mix_note,
    uniform_window,
)

__all__ = [
    "FULL",
    "PRESETS",
    "ConfigError",
    "LayerType",
    "ModelGeometry",
    "config_value",
    "geometry_of",
    "group_layers",
    "hf_layer_names",
    "layer_types_of",
    "load_config",
    "positive_int",
    "preset_config",
    "read_model_config",
]

# Shipped configs, by `kvshard plan --model` name (kvshard/configs/<name>.json).
PRESETS = (
    "llama-3-8b",
    "llama-3-70b",
    "mistral-7b",
    "qwen2.5-0.5b",
    "qwen2.5-7b",
    "qwen2.5-72b",
    "gemma-2-9b",
    "gemma-3-27b",
    "gpt-oss-20b",
    "gpt-oss-120b",
    "llama-4-scout",
    "deepseek-v3",
    "kimi-k2",
)

# Hugging Face `layer_types` entries -> kinds of LayerType.
_HF_LAYER_KINDS = {
    "full_attention": "full",
    "sliding_attention": "sliding",
    "chunked_attention": "chunked",
}
# The defaults below are those of the transformers config classes
# (src/transformers/models/<model>/configuration_<model>.py), which derive `layer_types` when a
# config.json has none.
# Gemma2Config, GptOssConfig, Gemma3TextConfig, Cohere2Config: layer i slides unless
# (i + 1) % pattern == 0 (`sliding_window_pattern` overrides the default): Gemma 2 and gpt-oss
# alternate (even layers local), Gemma 3 has 5 local per global, Cohere 2 3 per global.
_SLIDING_PATTERNS = {"gemma2": 2, "gpt_oss": 2, "gemma3_text": 6, "cohere2": 4}
# Qwen2Config (and Qwen3's): sliding_window is voided unless use_sliding_window (default false),
# and then layer i slides when i >= max_window_layers (default 28).
_QWEN_MODEL_TYPES = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe")
_QWEN_MAX_WINDOW_LAYERS = 28
# Llama4TextConfig: no_rope_layers[i] = int((i + 1) % no_rope_layer_interval != 0) by default,
# interval 4; RoPE layers attend chunked, NoPE layers in full.
_NO_ROPE_LAYER_INTERVAL = 4

# Hugging Face `torch_dtype` spellings -> NumPy names (CacheSpec's vocabulary).
_TORCH_DTYPES = {
    "bfloat16": "bfloat16",
    "float16": "float16",
    "half": "float16",
    "float32": "float32",
    "float": "float32",
}


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
        ``p`` attends keys ``p - W + 1 .. p``), else None (also for a model whose layers mix
        attention types: see ``layer_types``).
      window_note: how the layers mix attention types when they do (e.g.
        ``"sliding_window 1024 on 52 of 62 layers, full attention on 10: ..."``), else None.
      name: the config's ``_name_or_path`` or the file it came from, for messages.
      num_q_heads: query heads (``num_attention_heads``), or None if the config has none; the
        planner checks they split over the head axis as :func:`kvshard.attention` needs.
      layer_types: each layer's attention type (:data:`LayerType`): ``("full",)``,
        ``("sliding", W)`` or ``("chunked", C)``. Left empty, every layer gets
        ``("sliding", sliding_window)`` or, without a window, ``("full",)``.
      kv_lora_rank: multi-head latent attention (``kv_lora_rank`` of the config): the lanes
        of the latent row that hold ``c_kv``; ``num_kv_heads`` is then 1 and ``head_dim``
        ``kv_lora_rank + qk_rope_head_dim`` (a ``kv_layout="latent"`` cache). None otherwise.

    Raises:
      ValueError: ``layer_types`` not one valid type per layer, or disagreeing with
        ``sliding_window`` (which must be W exactly when every layer is ``("sliding", W)``).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str | None = None
    sliding_window: int | None = None
    window_note: str | None = None
    name: str | None = None
    num_q_heads: int | None = None
    layer_types: tuple[LayerType, ...] = ()
    kv_lora_rank: int | None = None

    def __post_init__(self) -> None:
        if not self.layer_types:
            kind: LayerType = FULL
            if self.sliding_window is not None:
                kind = ("sliding", self.sliding_window)
            object.__setattr__(self, "layer_types", (kind,) * self.num_layers)
        types = check_layer_types(self.layer_types, self.num_layers)
        object.__setattr__(self, "layer_types", types)
        if self.sliding_window != uniform_window(types):
            raise ValueError(
                f"sliding_window={self.sliding_window!r} disagrees with layer_types "
                f"({describe_groups(group_layers(types), self.num_layers)}): it is W exactly when "
                "every layer is ('sliding', W)"
            )

    @property
    def kv_layout(self) -> str | None:
        """ "latent" for multi-head latent attention, else None (:class:`kvshard.CacheSpec`'s
        automatic choice)."""
        return None if self.kv_lora_rank is None else "latent"

    @property
    def layer_groups(self) -> dict[LayerType, tuple[int, ...]]:
        """Layer indices of each attention type (:func:`group_layers`): Gemma 3 27B gives
        ``{("sliding", 1024): (0, 1, 2, 3, 4, 6, ...), ("full",): (5, 11, ..., 59)}``."""
        return group_layers(self.layer_types)


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


def load_config(
    config: Mapping[str, Any] | str | PathLike[str],
) -> tuple[Mapping[str, Any], str]:
    """Returns (the config's mapping, a label for messages) of a config.json path, a model
    directory holding one, or the parsed dict.

    Raises:
      ConfigError: the file cannot be read, is not JSON, or holds no JSON object.
    """
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


def config_value(config: Mapping[str, Any], field: str, default: Any = None) -> Any:
    """``config[field]``, or ``default`` when the field is absent or JSON ``null``: what
    transformers' config classes do with a ``None`` argument that has a default."""
    value = config.get(field)
    return default if value is None else value


def positive_int(config: Mapping[str, Any], field: str, where: str, default: Any = None) -> int:
    """``config_value(config, field, default)``, checked to be an integer >= 1.

    Raises:
      ConfigError: it is not (also when absent or null without a default), naming the field.
    """
    value = config_value(config, field, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where}: {field}={value!r} must be a positive integer")
    return value


def _optional_size(config: Mapping[str, Any], field: str, where: str) -> int | None:
    value = config.get(field)
    if value is not None and not is_positive_int(value):
        raise ConfigError(f"{where}: {field}={value!r} must be a positive integer or null")
    return value


def hf_layer_names(config: Mapping[str, Any], num_layers: int, where: str) -> list[str]:
    """Each layer's attention as a Hugging Face ``layer_types`` name, by the convention the
    config uses; the rules are those of the transformers config classes (see the tables
    above): an explicit ``layer_types``; Llama 4's ``no_rope_layers`` (1: RoPE and chunked
    attention, 0: NoPE and global attention); a sliding pattern; Qwen's
    ``max_window_layers``; else every layer slides (Mistral, Mixtral, Phi-3, ...)."""
    model_type = config.get("model_type")
    explicit = config.get("layer_types")
    if explicit is not None:
        if not isinstance(explicit, list) or len(explicit) != num_layers:
            raise ConfigError(
                f"{where}: layer_types must be a list of {num_layers} entries (one per layer), "
                f"got {explicit!r:.80}"
            )
        for i, name in enumerate(explicit):
            if name not in _HF_LAYER_KINDS:
                raise ConfigError(
                    f"{where}: layer_types[{i}]={name!r}: kvshard caches "
                    f"{', '.join(_HF_LAYER_KINDS)} layers only"
                )
        return list(explicit)
    if config.get("attention_chunk_size") is not None:
        interval = config_value(config, "no_rope_layer_interval", _NO_ROPE_LAYER_INTERVAL)
        if not is_positive_int(interval):
            raise ConfigError(f"{where}: no_rope_layer_interval={interval!r} must be >= 1")
        rope = config.get("no_rope_layers") or [
            int((i + 1) % interval != 0) for i in range(num_layers)
        ]
        if not isinstance(rope, list) or len(rope) < num_layers or set(rope) - {0, 1}:
            raise ConfigError(
                f"{where}: no_rope_layers must list 0 or 1 for each of the {num_layers} layers, "
                f"got {rope!r:.80}"
            )
        return ["chunked_attention" if r else "full_attention" for r in rope[:num_layers]]
    pattern = config_value(
        config,
        "sliding_window_pattern",
        # transformers 4.5x's Gemma3TextConfig saves the pattern as _sliding_window_pattern.
        config_value(config, "_sliding_window_pattern", _SLIDING_PATTERNS.get(str(model_type))),
    )
    if pattern is not None:
        if not is_positive_int(pattern):
            raise ConfigError(f"{where}: sliding_window_pattern={pattern!r} must be >= 1")
        return [
            "sliding_attention" if (i + 1) % pattern else "full_attention"
            for i in range(num_layers)
        ]
    qwen = model_type in _QWEN_MODEL_TYPES
    first_windowed = config_value(
        config, "max_window_layers", _QWEN_MAX_WINDOW_LAYERS if qwen else 0
    )
    if not isinstance(first_windowed, int) or isinstance(first_windowed, bool):
        raise ConfigError(f"{where}: max_window_layers={first_windowed!r} must be an integer")
    return [
        "sliding_attention" if i >= first_windowed else "full_attention" for i in range(num_layers)
    ]


def layer_types_of(
    config: Mapping[str, Any], num_layers: int, *, where: str | None = None
) -> tuple[LayerType, ...]:
    """Each layer's attention type in a (text) config, from every convention in use:

    * ``layer_types``: ``"full_attention"``, ``"sliding_attention"`` (window
      ``sliding_window``), ``"chunked_attention"`` (chunk ``attention_chunk_size``); gpt-oss,
      and configs that newer transformers versions save;
    * Gemma 2 and gpt-oss without it: even layers slide, odd ones are global;
    * ``sliding_window_pattern`` N (Gemma 3: default 6; Cohere 2: 4): layer i is global when
      ``(i + 1) % N == 0``, so Gemma 3 has 5 local per global layer;
    * Qwen2/Qwen3 (transformers' ``Qwen2Config``): only with ``use_sliding_window`` (default
      false), layers ``i >= max_window_layers`` (default 28) slide and the first ones attend in
      full;
    * Llama 4: with ``attention_chunk_size`` C, layers whose ``no_rope_layers`` entry is 1
      (RoPE; default all but every 4th) attend chunked, the NoPE layers in full;
    * otherwise ``sliding_window`` applies to every layer (Mistral).

    A ``sliding_attention`` layer without a window (Qwen2's ``use_sliding_window: false``
    voids it) attends in full, as transformers does. ``where`` labels messages (default the
    config's ``_name_or_path``).

    Raises:
      ConfigError: a malformed ``layer_types``, ``no_rope_layers``, ``sliding_window``,
        ``attention_chunk_size`` or ``sliding_window_pattern``, an attention type kvshard does
        not cache (``linear_attention``, ...), or chunked layers without a chunk size.
    """
    where = where or str(config.get("_name_or_path") or "config")
    window = _optional_size(config, "sliding_window", where)
    chunk = _optional_size(config, "attention_chunk_size", where)
    if not config_value(
        config, "use_sliding_window", config.get("model_type") not in _QWEN_MODEL_TYPES
    ):
        window = None  # Qwen configs carry a sliding_window they do not use
    types: list[LayerType] = []
    for i, name in enumerate(hf_layer_names(config, num_layers, where)):
        kind = _HF_LAYER_KINDS[name]
        if kind == "chunked" and chunk is None:
            raise ConfigError(
                f"{where}: layer_types[{i}]='chunked_attention' needs attention_chunk_size"
            )
        if kind == "sliding" and window is not None:
            types.append(("sliding", window))
        elif kind == "chunked" and chunk is not None:
            types.append(("chunked", chunk))
        else:
            types.append(FULL)
    return tuple(types)


def read_model_config(config: Mapping[str, Any] | str | PathLike[str]) -> ModelGeometry:
    """Returns the KV-cache geometry of a Hugging Face model config.

    Args:
      config: a ``config.json`` path, a model directory holding one, or the parsed dict.

    Raises:
      ConfigError: unreadable, a required field missing or not a positive integer, head_dim not
        given and ``hidden_size`` not divisible by ``num_attention_heads``, an unknown
        ``torch_dtype``, or a multi-head latent attention config (``kv_lora_rank`` set) without
        a positive ``qk_rope_head_dim``; one line naming the field.
    """
    return geometry_of(*load_config(config))


def geometry_of(data: Mapping[str, Any], where: str) -> ModelGeometry:
    """:func:`read_model_config` of a parsed config; ``where`` labels messages."""
    outer = data
    label = str(data.get("_name_or_path") or where)
    if "num_hidden_layers" not in data and isinstance(data.get("text_config"), Mapping):
        data = data["text_config"]  # multimodal wrappers (Llama 4, Gemma 3, Qwen2-VL, ...)
        where += " (text_config)"
    if "num_hidden_layers" not in data:
        raise ConfigError(f"{where}: num_hidden_layers is missing (the number of layers)")
    num_layers = positive_int(data, "num_hidden_layers", where)

    kv_lora_rank = None
    if data.get("kv_lora_rank") is not None:  # MLA: one latent row per token, no head axis
        kv_lora_rank = positive_int(data, "kv_lora_rank", where)
        if data.get("qk_rope_head_dim") is None:
            raise ConfigError(
                f"{where}: qk_rope_head_dim is missing (multi-head latent attention, "
                f"kv_lora_rank={kv_lora_rank}: the latent row is kv_lora_rank + qk_rope_head_dim)"
            )
        num_kv_heads = 1
        head_dim = kv_lora_rank + positive_int(data, "qk_rope_head_dim", where)
    else:
        kv_field = "num_key_value_heads" if data.get("num_key_value_heads") is not None else None
        if kv_field is None and data.get("num_attention_heads") is not None:
            kv_field = "num_attention_heads"  # multi-head attention: one KV head per query head
        if kv_field is None:
            raise ConfigError(
                f"{where}: num_key_value_heads is missing (and no num_attention_heads to fall "
                "back on)"
            )
        num_kv_heads = positive_int(data, kv_field, where)

        if data.get("head_dim") is not None:
            head_dim = positive_int(data, "head_dim", where)
        else:
            for field in ("hidden_size", "num_attention_heads"):
                if data.get(field) is None:
                    raise ConfigError(
                        f"{where}: head_dim is missing and so is {field} (head_dim defaults to "
                        "hidden_size / num_attention_heads)"
                    )
            hidden = positive_int(data, "hidden_size", where)
            heads = positive_int(data, "num_attention_heads", where)
            if hidden % heads:
                raise ConfigError(
                    f"{where}: head_dim is missing and hidden_size={hidden} is not a multiple of "
                    f"num_attention_heads={heads}; add head_dim"
                )
            head_dim = hidden // heads

    # `dtype` (transformers >= 4.56) or `torch_dtype` (before); a wrapper's text_config often
    # leaves the dtype to the wrapper (Gemma 3, Llama 4).
    dtype_field, raw_dtype = next(
        (
            (field, source[field])
            for source in (data, outer)
            for field in ("dtype", "torch_dtype")
            if source.get(field) is not None
        ),
        ("torch_dtype", None),
    )
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
        num_q_heads = positive_int(data, "num_attention_heads", where)
    layer_types = layer_types_of(data, num_layers, where=where)
    return ModelGeometry(
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        sliding_window=uniform_window(layer_types),
        window_note=mix_note(layer_types),
        name=str(data.get("_name_or_path") or label),
        num_q_heads=num_q_heads,
        layer_types=layer_types,
        kv_lora_rank=kv_lora_rank,
    )
