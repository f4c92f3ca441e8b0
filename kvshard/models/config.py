"""A Hugging Face ``config.json`` -> :class:`Architecture`: everything the model code branches on.

The cache geometry (layers, heads, head_dim, dtype, each layer's attention type) is what
:func:`kvshard.read_model_config` reads, the planner's and :meth:`kvshard.CacheSpec.from_config`'s
reader, so the template serves exactly the cache the planner sizes; this module adds the keys only
the model code needs (and the defaults transformers' config classes apply when a key is absent or
``null``, :func:`kvshard._geometry.hf_config.config_value`), so the model code never looks at
``model_type``: it reads fields such as ``norm_offset`` or ``layers[i].window``. Both config
generations are read: ``rope_theta`` + ``rope_scaling`` (transformers 4) and ``rope_parameters``
(transformers 5, per layer type for Gemma 3); ``torch_dtype`` or ``dtype``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvshard._geometry.hf_config import (
    ConfigError,
    ModelGeometry,
    config_value,
    geometry_of,
    hf_layer_names,
    load_config,
    positive_int,
)
from kvshard._geometry.layer_types import FULL, LayerType
from kvshard._geometry.state_layers import MAMBA, hybrid_layers

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "LayerSpec",
    "MLASpec",
    "MambaSpec",
    "RopeSpec",
    "RoutedMoESpec",
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
    "deepseek_v3",
    "kimi_k2",
    "bamba",
)
# DeepSeek-V3's architecture (Kimi-K2 checkpoints reuse it under their own model_type):
# multi-head latent attention and a mixture of experts with shared experts.
DEEPSEEK = ("deepseek_v3", "kimi_k2")
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
class MLASpec:
    """DeepSeek's multi-head latent attention (``DeepseekV3Attention``).

    q: ``q_proj`` (``q_lora_rank`` None, DeepSeek-V2-Lite) or ``q_b_proj(q_a_layernorm(
    q_a_proj(x)))``, ``qk_nope_head_dim + qk_rope_head_dim`` per head. Per token one latent
    ``kv_a_proj_with_mqa(x)`` = [``kv_lora_rank`` values, normed by ``kv_a_layernorm``;
    ``qk_rope_head_dim`` values of a key rotated once for every head]; ``kv_b_proj`` maps the
    latent to each head's no-rope key (W_UK) and value (``v_head_dim``, W_UV).
    ``rope_interleave``: the rotary dims pair (x0, x1), (x2, x3), ... (DeepSeek's layout)
    instead of the two halves.
    """

    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool

    @property
    def latent_dim(self) -> int:
        """Values cached per token: ``kv_lora_rank + qk_rope_head_dim`` (576 for DeepSeek-V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclasses.dataclass(frozen=True)
class RoutedMoESpec:
    """DeepSeek-V3's feed-forward (``DeepseekV3MoE``) on layers ``>= first_dense_layers``.

    Router: ``sigmoid(gate.weight @ x)`` scores; choosing (not weighting) adds
    ``e_score_correction_bias``; experts split into ``num_groups`` groups, a group scored by the
    sum of its 2 best biased scores, only the best ``topk_groups`` groups eligible; the
    ``experts_per_token`` best eligible experts weighted by their unbiased scores (normalised to
    sum 1 if ``norm_topk_prob``) times ``routed_scaling_factor``. Each expert and the shared
    expert (``num_shared_experts * intermediate_size`` wide) is a SiLU-gated MLP.
    """

    num_experts: int
    experts_per_token: int
    intermediate_size: int
    num_shared_experts: int
    num_groups: int
    topk_groups: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    first_dense_layers: int

    def is_moe(self, layer: int) -> bool:
        return layer >= self.first_dense_layers


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
      mla: DeepSeek's multi-head latent attention (:class:`MLASpec`; then ``head_dim`` is the
        query/key head dim ``qk_nope_head_dim + qk_rope_head_dim`` and ``sm_scale`` includes
        YaRN's ``mscale_all_dim`` factor), else None.
      routed_moe: DeepSeek-V3's mixture of experts (:class:`RoutedMoESpec`), else None.
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
    mla: MLASpec | None = None
    routed_moe: RoutedMoESpec | None = None
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


def _common_fields(
    config: Mapping[str, Any], model_type: str, geometry: ModelGeometry, hidden: int, where: str
) -> dict[str, Any]:
    """The :class:`Architecture` fields every model type reads alike: its type, the vocabulary,
    hidden and MLP sizes, the layer count and the dtype (float32 if the config has none)."""
    return {
        "model_type": model_type,
        "vocab_size": positive_int(config, "vocab_size", where),
        "hidden_size": hidden,
        "intermediate_size": positive_int(config, "intermediate_size", where),
        "num_layers": geometry.num_layers,
        "dtype": geometry.dtype or "float32",
    }


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
    if model_type in DEEPSEEK:
        return _read_deepseek(config, model_type, where)
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
        **_common_fields(config, model_type, geometry, hidden, where),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(
            config_value(config, "rms_norm_eps", 1e-5 if model_type == "bamba" else 1e-6)
        ),
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


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's ``0.1 * mscale * ln(scale) + 1`` (1 for ``scale <= 1``)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def mla_sm_scale(qk_head_dim: int, rope: RopeSpec) -> float:
    """DeepSeek's softmax scale: ``qk_head_dim ** -0.5``, times ``yarn_mscale(factor,
    mscale_all_dim) ** 2`` for a scaled rope with ``mscale_all_dim`` (transformers'
    ``yarn_apply_mscale``)."""
    scale = qk_head_dim**-0.5
    m_all = rope.get("mscale_all_dim")
    if rope.kind != "default" and m_all:
        scale *= yarn_mscale(float(rope.get("factor")), float(m_all)) ** 2
    return scale


def _read_deepseek(config: Mapping[str, Any], model_type: str, where: str) -> Architecture:
    """DeepSeek-V3's architecture (``DeepseekV3Config``'s fields and defaults)."""
    # DeepseekV3Config's defaults of the latent's sizes, so that the cache geometry (the
    # planner's reading: one latent row of kv_lora_rank + qk_rope_head_dim) sees them too.
    config = {
        **config,
        "kv_lora_rank": config_value(config, "kv_lora_rank", 512),
        "qk_rope_head_dim": config_value(config, "qk_rope_head_dim", 64),
    }
    geometry = geometry_of(config, where)
    hidden = positive_int(config, "hidden_size", where)
    heads = positive_int(config, "num_attention_heads", where)
    q_lora = config.get("q_lora_rank")
    if q_lora is not None:
        q_lora = positive_int(config, "q_lora_rank", where)
    mla = MLASpec(
        kv_lora_rank=positive_int(config, "kv_lora_rank", where, 512),
        q_lora_rank=q_lora,
        qk_nope_head_dim=positive_int(config, "qk_nope_head_dim", where, 128),
        qk_rope_head_dim=positive_int(config, "qk_rope_head_dim", where, 64),
        v_head_dim=positive_int(config, "v_head_dim", where, 128),
        rope_interleave=bool(config_value(config, "rope_interleave", True)),
    )
    if mla.qk_rope_head_dim % 2:
        raise ConfigError(f"{where}: qk_rope_head_dim={mla.qk_rope_head_dim} must be even")
    # What DeepSeek's own configs spell out (transformers' DeepseekV3 implements only these):
    # sigmoid scores with the bias-corrected group-limited choice, every layer after the
    # dense ones a MoE layer.
    for field, served in (
        ("scoring_func", "sigmoid"),
        ("topk_method", "noaux_tc"),
        ("moe_layer_freq", 1),
    ):
        if config.get(field, served) != served:
            raise ConfigError(
                f"{where}: {field}={config[field]!r}: DeepSeek-V3's architecture is served with "
                f"{field}={served!r}"
            )
    experts = positive_int(config, "n_routed_experts", where, 256)
    groups = positive_int(config, "n_group", where, 8)
    if experts % groups:
        raise ConfigError(
            f"{where}: n_routed_experts={experts} is not a multiple of n_group={groups}"
        )
    topk_groups = positive_int(config, "topk_group", where, 4)
    if topk_groups > groups:
        raise ConfigError(f"{where}: topk_group={topk_groups} exceeds n_group={groups}")
    per_token = positive_int(config, "num_experts_per_tok", where, 8)
    eligible = topk_groups * (experts // groups)
    if per_token > eligible:
        raise ConfigError(
            f"{where}: num_experts_per_tok={per_token} exceeds the {eligible} experts of "
            f"topk_group={topk_groups} groups"
        )
    first_dense = config_value(config, "first_k_dense_replace", 3)
    if not isinstance(first_dense, int) or isinstance(first_dense, bool) or first_dense < 0:
        raise ConfigError(f"{where}: first_k_dense_replace={first_dense!r} must be an integer >= 0")
    routed = RoutedMoESpec(
        num_experts=experts,
        experts_per_token=per_token,
        intermediate_size=positive_int(config, "moe_intermediate_size", where, 2048),
        num_shared_experts=int(config_value(config, "n_shared_experts", 1)),
        num_groups=groups,
        topk_groups=topk_groups,
        routed_scaling_factor=float(config_value(config, "routed_scaling_factor", 2.5)),
        norm_topk_prob=bool(config_value(config, "norm_topk_prob", True)),
        first_dense_layers=first_dense,
    )
    act_name = config_value(config, "hidden_act", "silu")
    if _ACTIVATIONS.get(act_name) != "silu":
        raise ConfigError(f"{where}: hidden_act={act_name!r}: DeepSeek-V3 layers use silu")
    # The rotary embedding rotates only the qk_rope_head_dim dims (DeepseekV3Config sets
    # head_dim to it); DeepSeek-V3 spells its rope_scaling type "yarn" under "type".
    rope = _ropes(config, model_type, where)["full_attention"]
    qk_head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    bias = bool(config_value(config, "attention_bias", False))
    return Architecture(
        **_common_fields(config, model_type, geometry, hidden, where),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=qk_head_dim,
        rms_norm_eps=float(config_value(config, "rms_norm_eps", 1e-6)),
        activation="silu",
        norm_offset=0.0,
        embed_scale=None,
        tie_word_embeddings=bool(config_value(config, "tie_word_embeddings", False)),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=False,
        qk_norm=False,
        sandwich_norms=False,
        sm_scale=mla_sm_scale(qk_head_dim, rope),
        attn_soft_cap=None,
        final_soft_cap=None,
        norm_in_float32=False,
        sinks=False,
        num_experts=0,
        experts_per_token=0,
        swiglu_alpha=1.702,
        swiglu_limit=7.0,
        layers=tuple(LayerSpec(None, rope) for _ in range(geometry.num_layers)),
        mla=mla,
        routed_moe=routed,
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
    :func:`kvshard._geometry.state_layers.hybrid_layers` reads them (attention at
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
