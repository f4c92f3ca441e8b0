"""A Hugging Face ``config.json`` -> :class:`Architecture`: everything the model code branches on.

The cache geometry (layers, heads, head_dim, dtype, each layer's attention type) is what
:func:`kvshard.read_model_config` reads, the planner's and :meth:`kvshard.CacheSpec.from_config`'s
reader, so the template serves exactly the cache the planner sizes; this module adds the keys
only the model code needs (and the defaults transformers' config classes apply when a key is
absent or ``null``, :func:`kvshard._config.config_value`), so the model code never looks at
``model_type``: it reads fields such as ``norm_offset`` or ``layers[i].window``. Both config
generations are read: ``rope_theta`` + ``rope_scaling`` (transformers 4) and
``rope_parameters`` (transformers 5, per layer type for Gemma 3); ``torch_dtype`` or ``dtype``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvshard._config import (
    ConfigError,
    config_value,
    geometry_of,
    hf_layer_names,
    load_config,
    positive_int,
)
from kvshard._layer_types import FULL, LayerType
from kvshard._state_layers import MAMBA, hybrid_layers

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "LayerSpec",
    "MambaSpec",
    "RopeSpec",
    "read_architecture",
]

# model_type values read here (Gemma 3 checkpoints of the text model say "gemma3_text").
ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gpt_oss",
    "bamba",
)
_GEMMA = ("gemma", "gemma2", "gemma3_text")
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu": "gelu",
}
_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
GPT_OSS_ROPE = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """One rotary embedding: ``kind`` in default/linear/llama3/yarn and its parameters.

    ``params`` are the rope_scaling entries as sorted (key, value) pairs (hashable: the spec
    is a static attribute of a layer). ``max_position_embeddings`` is the config's, which yarn
    falls back on when ``original_max_position_embeddings`` is absent.
    """

    theta: float
    kind: str = "default"
    params: tuple[tuple[str, Any], ...] = ()
    max_position_embeddings: int = 0

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)


@dataclasses.dataclass(frozen=True)
class MambaSpec:
    """A Mamba-2 mixer's shapes (Bamba's ``mamba_*`` config keys).

    ``num_heads`` heads of ``head_dim`` channels, ``num_groups`` groups of B/C of
    ``state_size`` each, a depthwise causal conv of ``conv_kernel`` taps over
    ``conv_dim = num_heads * head_dim + 2 * num_groups * state_size`` channels, the SSD scan in
    chunks of ``chunk_size`` (dense path), dt clamped to ``time_step_limit`` after softplus.
    ``ssm_dtype``: the stored SSM state's dtype: float32 (what transformers keeps: its scan
    runs in float32), or the config's ``mamba_ssm_cache_dtype``.
    """

    num_heads: int
    head_dim: int
    num_groups: int
    state_size: int
    conv_kernel: int
    chunk_size: int
    conv_bias: bool
    proj_bias: bool
    time_step_limit: tuple[float, float]
    ssm_dtype: str = "float32"

    @property
    def intermediate_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.intermediate_size + 2 * self.num_groups * self.state_size


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Per-layer mixer: attention with its sliding window (None: full attention) and rotary
    embedding, or (``mixer="mamba"``) a Mamba-2 layer, which keeps per-request state instead
    of K/V (the window and rope are then unused)."""

    window: int | None
    rope: RopeSpec
    mixer: str = "attention"

    @property
    def layer_type(self) -> tuple[str] | tuple[str, int]:
        """The layer's attention type as :class:`kvshard.CacheSpec` ``layer_types`` and
        :class:`kvshard.PageAllocator` take it: ``("full",)`` or ``("sliding", window)``."""
        return ("full",) if self.window is None else ("sliding", self.window)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A decoder's shapes and every behaviour switch the model code reads.

    Attributes (beyond the shapes):
      dtype: compute and weight dtype (the checkpoint's ``torch_dtype``; float32 if absent).
      activation: MLP gate activation: "silu", "gelu_tanh" or "gelu".
      norm_offset: RMSNorm multiplies by ``offset + weight`` (Gemma: 1, weights stored as
        zeros-centred) and, for Gemma, scales in float32 before the cast back.
      embed_scale: multiplier of the embeddings (Gemma: sqrt(hidden_size)), else None.
      tie_word_embeddings: the output projection is the embedding matrix. An absent key
        means what transformers' config class defaults to (tied for Gemma, else untied);
        :func:`~kvshard.models.load_checkpoint` decides it from the checkpoint instead (tied
        iff it has no ``lm_head.weight``).
      qkv_bias, o_bias, mlp_bias: bias terms of those projections.
      qk_norm: RMSNorm over head_dim of q and k before RoPE (Qwen3, Gemma 3).
      sandwich_norms: Gemma 2/3 layers: post-attention, pre- and post-feed-forward norms.
      sm_scale: attention scale (``query_pre_attn_scalar ** -0.5`` for Gemma, else
        ``head_dim ** -0.5``).
      attn_soft_cap, final_soft_cap: ``cap * tanh(x / cap)`` of attention scores / logits.
      norm_in_float32: RMSNorm multiplies by its weight in float32, then casts (Gemma,
        gpt-oss); else it casts first (Llama).
      sinks: one learned logit per query head in the softmax denominator (gpt-oss).
      num_experts, experts_per_token: a mixture-of-experts feed-forward (gpt-oss: top-k
        router with bias, softmax over the chosen logits, clamped SwiGLU experts with biases);
        0 experts: a dense gated MLP.
      swiglu_alpha, swiglu_limit: gpt-oss's expert activation.
      layers: one :class:`LayerSpec` per layer.
      mamba: the Mamba-2 mixers' shapes of a hybrid (Bamba), else None.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    dtype: str
    activation: str
    norm_offset: float
    embed_scale: float | None
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sandwich_norms: bool
    sm_scale: float
    attn_soft_cap: float | None
    final_soft_cap: float | None
    norm_in_float32: bool
    sinks: bool
    num_experts: int
    experts_per_token: int
    swiglu_alpha: float
    swiglu_limit: float
    layers: tuple[LayerSpec, ...]
    mamba: MambaSpec | None = None

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """Indices of the attention layers (every layer but a hybrid's Mamba layers)."""
        return tuple(i for i, layer in enumerate(self.layers) if layer.mixer == "attention")

    @property
    def mamba_layers(self) -> tuple[int, ...]:
        """Indices of the Mamba-2 layers (none but in a hybrid)."""
        return tuple(i for i, layer in enumerate(self.layers) if layer.mixer == "mamba")

    @property
    def cache_layer_types(self) -> tuple[LayerType, ...]:
        """Every layer's cache type, for :class:`kvshard.PageAllocator` ``layer_types``:
        ``("mamba",)`` for a Mamba-2 layer (one state page per request, a state group),
        else the attention type. Equal to :attr:`layer_types` without Mamba layers."""
        return tuple(MAMBA if layer.mixer == "mamba" else layer.layer_type for layer in self.layers)

    @property
    def moe(self) -> bool:
        """The feed-forward is a mixture of experts."""
        return self.num_experts > 0

    @property
    def layer_types(self) -> tuple[tuple[str] | tuple[str, int], ...]:
        """One attention type per attention layer (:attr:`LayerSpec.layer_type`), in order:
        what the KV cache's layer groups are built from, so a mixed model's local layers hold
        only their window. A hybrid's Mamba layers hold no K/V (their state is in
        :mod:`kvshard.models.state_cache`), so KV-cache layer j is attention layer j."""
        return tuple(self.layers[i].layer_type for i in self.attention_layers)

    @property
    def uniform_window(self) -> int | None:
        """The window when every attention layer has the same one (a page allocator can then
        release out-of-window pages), else None."""
        windows = {self.layers[i].window for i in self.attention_layers}
        return windows.pop() if len(windows) == 1 else None

    def with_window(self, window: int | None) -> Architecture:
        """The same model with ``window`` on every layer (the demo's ``--sliding-window``)."""
        layers = tuple(dataclasses.replace(layer, window=window) for layer in self.layers)
        return dataclasses.replace(self, layers=layers)


def _rope(params: Mapping[str, Any] | None, theta: float, max_pos: int, where: str) -> RopeSpec:
    """A RopeSpec from a rope_scaling / rope_parameters dict (None: plain RoPE at ``theta``)."""
    params = dict(params or {})
    theta = float(params.pop("rope_theta", theta))
    kind = str(params.pop("rope_type", params.pop("type", "default")))
    if kind not in _ROPE_TYPES:
        raise ConfigError(f"{where}: rope type {kind!r} is not one of {', '.join(_ROPE_TYPES)}")
    if kind != "default" and not isinstance(params.get("factor", 1.0), int | float):
        raise ConfigError(f"{where}: rope factor={params.get('factor')!r} must be a number")
    return RopeSpec(theta, kind, tuple(sorted(params.items())), max_pos)


def _ropes(cfg: Mapping[str, Any], model_type: str, where: str) -> dict[str, RopeSpec]:
    """Rotary embedding per layer type ("full_attention", "sliding_attention")."""
    max_pos = int(cfg.get("max_position_embeddings") or 0)
    default_theta = {"gemma3_text": 1_000_000.0, "gpt_oss": 150_000.0}.get(model_type, 10_000.0)
    theta = float(cfg.get("rope_theta") or default_theta)
    parameters = cfg.get("rope_parameters")
    if isinstance(parameters, Mapping) and all(
        isinstance(v, Mapping) for v in parameters.values()
    ):  # transformers 5, one entry per layer type (Gemma 3)
        ropes = {k: _rope(v, theta, max_pos, f"{where} rope {k}") for k, v in parameters.items()}
    else:
        scaling = parameters if isinstance(parameters, Mapping) else cfg.get("rope_scaling")
        if scaling is None and model_type == "gpt_oss":
            scaling = GPT_OSS_ROPE  # what GptOssConfig sets when a config names no rope
        full = _rope(scaling, theta, max_pos, where)
        ropes = {"full_attention": full, "sliding_attention": full}
        if model_type == "gemma3_text" and not isinstance(parameters, Mapping):
            # transformers 4's Gemma 3: local layers use plain RoPE at rope_local_base_freq.
            local = float(cfg.get("rope_local_base_freq") or 10_000.0)
            ropes["sliding_attention"] = RopeSpec(local, "default", (), max_pos)
    ropes.setdefault("sliding_attention", ropes.get("full_attention", RopeSpec(theta)))
    ropes.setdefault("full_attention", ropes["sliding_attention"])
    return ropes


def _soft_cap(cfg: Mapping[str, Any], key: str, default: float | None) -> float | None:
    """The cap, or None: an absent key is the config class's default, an explicit null no cap
    (transformers' models test ``cap is not None``)."""
    value = cfg.get(key, default)
    return float(value) if value else None


def read_architecture(config: Mapping[str, Any] | str | Path) -> Architecture:
    """Reads a Hugging Face config (a dict, a config.json path or its directory).

    Raises:
      kvshard.ConfigError: an unknown ``model_type``, a missing or malformed field, an unknown
        rope type, activation or dtype, a chunked-attention layer; one line naming the field
        and the value.
    """
    config, where = load_config(config)
    model_type = config.get("model_type")
    if model_type == "gemma3" and isinstance(config.get("text_config"), Mapping):
        raise ConfigError(
            f"{where}: model_type='gemma3' is the multimodal model; serve its language model "
            "(a Gemma3ForCausalLM checkpoint, model_type 'gemma3_text')"
        )
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"{where}: model_type={model_type!r} is not one of {', '.join(ARCHITECTURES)}"
        )
    geometry = geometry_of(config, where)
    hidden = positive_int(config, "hidden_size", where)
    heads = positive_int(config, "num_attention_heads", where)
    kv_heads, head_dim = geometry.num_kv_heads, geometry.head_dim
    if heads % kv_heads:
        raise ConfigError(
            f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads="
            f"{kv_heads}"
        )
    gemma, moe = model_type in _GEMMA, model_type == "gpt_oss"
    default_act = "gelu_pytorch_tanh" if gemma else "silu"
    act_name = config.get("hidden_activation") or config.get("hidden_act") or default_act
    if model_type == "gemma" and act_name == "gelu":
        act_name = "gelu_pytorch_tanh"  # transformers runs Gemma 1's "gelu" as the tanh form
    if act_name not in _ACTIVATIONS:
        raise ConfigError(
            f"{where}: activation {act_name!r} is not one of {', '.join(_ACTIVATIONS)}"
        )
    attention_bias = bool(config_value(config, "attention_bias", model_type == "gpt_oss"))
    query_scalar = config_value(
        config, "query_pre_attn_scalar", 256 if model_type != "gemma" else None
    )
    sm_scale = float(query_scalar) ** -0.5 if gemma and query_scalar else head_dim**-0.5
    ropes = _ropes(config, model_type, where)
    mamba, mixers = None, ["attention"] * geometry.num_layers
    if model_type == "bamba":
        mamba, mixers = _bamba(config, hidden, geometry.num_layers, where)
        ropes = {k: _partial_rope(config, v) for k, v in ropes.items()}
    # Each layer's window from the geometry; its rotary embedding by its Hugging Face layer
    # type, which picks the rope even where no window applies (a Gemma config without one).
    names = hf_layer_names(config, geometry.num_layers, where)
    layers = []
    for i, ((kind, *size), name) in enumerate(zip(geometry.layer_types, names, strict=True)):
        if kind == "chunked":
            raise ConfigError(
                f"{where}: layer {i} has layer type 'chunked_attention' (chunk {size[0]}); "
                "kvshard.models serves full_attention and sliding_attention layers"
            )
        window = size[0] if kind == "sliding" else None
        layers.append(LayerSpec(window, ropes[name], mixers[i]))
    return Architecture(
        model_type=model_type,
        vocab_size=positive_int(config, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=positive_int(config, "intermediate_size", where),
        num_layers=geometry.num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(
            config_value(config, "rms_norm_eps", 1e-5 if model_type == "bamba" else 1e-6)
        ),
        dtype=geometry.dtype or "float32",
        activation=_ACTIVATIONS[act_name],
        norm_offset=1.0 if gemma else 0.0,
        embed_scale=math.sqrt(hidden) if gemma else None,
        tie_word_embeddings=bool(config_value(config, "tie_word_embeddings", gemma)),
        qkv_bias=attention_bias or model_type == "qwen2",
        o_bias=attention_bias and model_type != "qwen2",
        mlp_bias=bool(config_value(config, "mlp_bias", False)),
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        sandwich_norms=model_type in ("gemma2", "gemma3_text"),
        sm_scale=sm_scale,
        attn_soft_cap=_soft_cap(
            config, "attn_logit_softcapping", 50.0 if model_type == "gemma2" else None
        ),
        final_soft_cap=_soft_cap(
            config, "final_logit_softcapping", 30.0 if model_type == "gemma2" else None
        ),
        norm_in_float32=gemma or model_type == "gpt_oss",
        sinks=model_type == "gpt_oss",
        num_experts=positive_int(config, "num_local_experts", where, 128) if moe else 0,
        experts_per_token=positive_int(config, "num_experts_per_tok", where, 4) if moe else 0,
        swiglu_alpha=float(config_value(config, "swiglu_alpha", 1.702)),
        swiglu_limit=float(config_value(config, "swiglu_limit", 7.0)),
        layers=tuple(layers),
        mamba=mamba,
    )


def _partial_rope(config: Mapping[str, Any], rope: RopeSpec) -> RopeSpec:
    """Bamba rotates the first half of each head (``partial_rotary_factor`` 0.5: transformers'
    BambaConfig sets it whatever the config says; a config that names it is read)."""
    if rope.get("partial_rotary_factor") is not None:
        return rope
    factor = float(config_value(config, "partial_rotary_factor", 0.5))
    params = tuple(sorted({**dict(rope.params), "partial_rotary_factor": factor}.items()))
    return dataclasses.replace(rope, params=params)


def _float(value: Any, field: str, where: str) -> float:
    """A JSON number, or transformers 5's ``{"__float__": "Infinity"}`` spelling of one."""
    if isinstance(value, Mapping) and set(value) == {"__float__"}:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {field} entry {value!r} is not a number") from None


def _bamba(
    config: Mapping[str, Any], hidden: int, num_layers: int, where: str
) -> tuple[MambaSpec, list[str]]:
    """Bamba's Mamba-2 shapes and each layer's mixer, its layers and state shape as
    :func:`kvshard._state_layers.hybrid_layers` reads them (attention at
    ``attn_layer_indices``, or a saved ``layers_block_type``); the keys only the model reads
    (chunk size, biases, dt limits) here."""
    try:
        hybrid = hybrid_layers(config, where=where)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if len(hybrid.layer_types) != num_layers:
        raise ConfigError(f"{where}: {len(hybrid.layer_types)} cache layers for {num_layers}")
    if MAMBA not in hybrid.layer_types or FULL not in hybrid.layer_types:
        raise ConfigError(
            f"{where}: attn_layer_indices={config.get('attn_layer_indices')!r}: kvshard.models "
            "serves hybrids with at least one attention and one Mamba-2 layer"
        )
    state = hybrid.state
    heads, head_dim, state_size = state.ssm
    kernel, conv_dim = state.conv[0] + 1, state.conv[1]
    groups = (conv_dim - heads * head_dim) // (2 * state_size)
    expand = positive_int(config, "mamba_expand", where, 2)
    if heads * head_dim != expand * hidden:
        raise ConfigError(
            f"{where}: mamba_d_head={head_dim} x mamba_n_heads={heads} must equal "
            f"mamba_expand x hidden_size = {expand * hidden}"
        )
    if heads % groups:
        raise ConfigError(
            f"{where}: mamba_n_heads={heads} is not a multiple of mamba_n_groups={groups}"
        )
    limit = config_value(config, "time_step_limit", [0.0, math.inf])
    if not isinstance(limit, list | tuple) or len(limit) != 2:
        raise ConfigError(f"{where}: time_step_limit={limit!r} must be [low, high]")
    spec = MambaSpec(
        num_heads=heads,
        head_dim=head_dim,
        num_groups=groups,
        state_size=state_size,
        conv_kernel=kernel,
        chunk_size=positive_int(config, "mamba_chunk_size", where, 256),
        conv_bias=bool(config_value(config, "mamba_conv_bias", True)),
        proj_bias=bool(config_value(config, "mamba_proj_bias", False)),
        time_step_limit=(
            _float(limit[0], "time_step_limit", where),
            _float(limit[1], "time_step_limit", where),
        ),
        ssm_dtype=state.ssm_dtype,  # float32 unless mamba_ssm_cache_dtype (hybrid_layers)
    )
    return spec, ["mamba" if t == MAMBA else "attention" for t in hybrid.layer_types]
