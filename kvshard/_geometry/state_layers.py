"""State-space and linear-attention layers of hybrid models, read from Hugging Face configs.

Pure Python (no JAX): which layers of a hybrid model keep a per-request state (Mamba-2:
``("mamba",)``, gated DeltaNet: ``("linear_attention",)``) and which per-token K/V, as each
family's config spells it, the shapes and bytes of one layer's state, and vLLM's rule that
makes every page of the shared pool the same size.

How each family declares its layers (the rules of the transformers config classes):

* Bamba (``bamba``): ``attn_layer_indices`` (attention layers; the rest Mamba-2), or a saved
  ``layers_block_type`` / ``layer_types`` list;
* Granite-4.0-H (``granitemoehybrid``): ``layer_types`` (or ``layers_block_type``) with
  ``"mamba"`` / ``"attention"`` (transformers 4.x) or ``"linear_attention"`` /
  ``"full_attention"`` (5.x); every layer Mamba-2 when absent;
* Nemotron-H (``nemotron_h``): ``hybrid_override_pattern``, one character per block: ``M``
  Mamba-2, ``*`` attention, ``-`` MLP and ``E`` MoE (no cache), or a ``layers_block_type``
  list of ``"mamba"``/``"linear_attention"``, ``"attention"``/``"full_attention"``, ``"mlp"``,
  ``"moe"``;
* Falcon-H1 (``falcon_h1``): every layer runs attention and Mamba-2 in parallel, so each model
  layer has two cache layers (attention first);
* Mamba-2 alone (``mamba2``): every layer Mamba-2;
* Qwen3-Next (``qwen3_next``): ``layer_types`` with ``"linear_attention"`` (gated DeltaNet) and
  ``"full_attention"``, or every ``full_attention_interval``-th layer (default 4) attention;
* Jamba, Mamba (``jamba``, ``mamba``, ``falcon_mamba``): Mamba-1 layers, refused (their state
  layout differs: no heads, no groups; kvshard does not implement it).

In a ``"linear_attention"`` entry of Bamba, Granite and Nemotron-H configs (transformers 5.x
spells their Mamba-2 layers so) the layer is Mamba-2; only Qwen3-Next's is gated DeltaNet.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from kvshard._geometry.layer_types import FULL, LayerType, check_positive_ints, is_positive_int

__all__ = [
    "GDN",
    "MAMBA",
    "HybridLayers",
    "StateShape",
    "hybrid_layers",
    "is_hybrid_config",
    "unified_group_page_sizes",
    "unified_page_size",
]

MAMBA: LayerType = ("mamba",)
GDN: LayerType = ("linear_attention",)

_MAMBA1_TYPES = ("jamba", "mamba", "falcon_mamba")
_HYBRID_TYPES = ("bamba", "granitemoehybrid", "nemotron_h", "falcon_h1", "mamba2", "qwen3_next")
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}
# Names of a block in a list (`layers_block_type` / `layer_types`) -> its cache type (None: no
# cache, an MLP or MoE block of Nemotron-H).
_BLOCK_NAMES: dict[str, LayerType | None] = {
    "mamba": MAMBA,
    "linear_attention": MAMBA,  # Mamba-2 in Bamba, Granite, Nemotron-H (Qwen3-Next: GDN)
    "attention": FULL,
    "full_attention": FULL,
    "mlp": None,
    "moe": None,
}
_PATTERN_CHARS: dict[str, LayerType | None] = {"M": MAMBA, "*": FULL, "-": None, "E": None}


class StateShape(NamedTuple):
    """One state layer's per-request state (before tensor parallelism).

    Attributes:
      kind: ``"mamba"`` (Mamba-2) or ``"linear_attention"`` (gated DeltaNet).
      conv: shape of the convolution state, ``(conv_kernel - 1, conv_dim)``.
      ssm: shape of the SSM state ``(heads, head_dim, state_size)`` (Mamba-2), or the recurrent
        state ``(value_heads, key_head_dim, value_head_dim)`` (gated DeltaNet).
      conv_dtype / ssm_dtype: their dtypes: the convolution state in the model's dtype; a
        Mamba-2 SSM state in float32 (transformers keeps its scan's float32 result, and
        kvshard.models caches that) unless the config sets ``mamba_ssm_cache_dtype`` (vLLM's
        setting); gated DeltaNet's recurrent state in the model's dtype.
      heads: the heads the state splits into (tensor parallelism shards them).
    """

    kind: str
    conv: tuple[int, int]
    ssm: tuple[int, int, int]
    conv_dtype: str
    ssm_dtype: str
    heads: int

    @property
    def nbytes(self) -> int:
        """Bytes of one layer's state of one request (conv + SSM), unsharded."""
        conv = self.conv[0] * self.conv[1] * _DTYPE_BYTES[self.conv_dtype]
        ssm = self.ssm[0] * self.ssm[1] * self.ssm[2] * _DTYPE_BYTES[self.ssm_dtype]
        return conv + ssm


class HybridLayers(NamedTuple):
    """The cache layers of a hybrid model.

    Attributes:
      layer_types: one type per cache layer, for ``PageAllocator(layer_types=...)``:
        ``("full",)`` (attention K/V), ``("mamba",)`` or ``("linear_attention",)`` (state).
      model_layer: for each cache layer, the model layer (decoder block) it belongs to; blocks
        without a cache (Nemotron-H's MLP and MoE blocks) have none, and a Falcon-H1 block has
        two (attention, then Mamba-2).
      state: the shape of one state layer's state.
    """

    layer_types: tuple[LayerType, ...]
    model_layer: tuple[int, ...]
    state: StateShape


def _text(config: Mapping[str, Any]) -> Mapping[str, Any]:
    inner = config.get("text_config")
    hybrid = config.get("model_type") in _HYBRID_TYPES
    if "model_type" in config and not hybrid and isinstance(inner, Mapping):
        return inner
    return config


def is_hybrid_config(config: Mapping[str, Any]) -> bool:
    """Whether ``config`` is a hybrid family read here (Mamba-1 families included: reading
    them raises)."""
    model_type = _text(config).get("model_type")
    return model_type in _HYBRID_TYPES or model_type in _MAMBA1_TYPES


def _int(config: Mapping[str, Any], field: str, default: Any, where: str) -> int:
    value = config.get(field)
    value = default if value is None else value
    if not is_positive_int(value):
        raise ValueError(f"{where}: {field}={value!r} must be a positive integer")
    return int(value)


def _dtype(config: Mapping[str, Any], field: str, default: str, where: str) -> str:
    raw = config.get(field)
    if raw is None or raw == "auto":
        return default
    name = str(raw).removeprefix("torch.")
    if name not in _DTYPE_BYTES:
        raise ValueError(f"{where}: {field}={raw!r} is not one of {', '.join(_DTYPE_BYTES)}")
    return {"half": "float16", "float": "float32"}.get(name, name)


def _block_list(config: Mapping[str, Any], where: str) -> list[LayerType | None] | None:
    """The saved per-block list (``layers_block_type`` or ``layer_types``), or None."""
    for field in ("layers_block_type", "layer_types"):
        names = config.get(field)
        if names is None:
            continue
        if not isinstance(names, list) or not names:
            raise ValueError(f"{where}: {field} must be a non-empty list, got {names!r:.80}")
        out = []
        for i, name in enumerate(names):
            if name not in _BLOCK_NAMES:
                raise ValueError(
                    f"{where}: {field}[{i}]={name!r} must be one of {', '.join(_BLOCK_NAMES)}"
                )
            out.append(_BLOCK_NAMES[name])
        return out
    return None


def _blocks(config: Mapping[str, Any], model_type: str, where: str) -> list[list[LayerType]]:
    """Each model layer's cache types, as the family's config declares them."""
    layers = config.get("num_hidden_layers")
    if model_type == "nemotron_h":
        pattern = config.get("hybrid_override_pattern")
        if pattern is not None:
            if not isinstance(pattern, str) or not pattern or set(pattern) - set(_PATTERN_CHARS):
                raise ValueError(
                    f"{where}: hybrid_override_pattern={pattern!r:.80} must be a non-empty "
                    "string of 'M' (Mamba-2), '*' (attention), '-' (MLP), 'E' (MoE)"
                )
            listed: list[LayerType | None] | None = [_PATTERN_CHARS[c] for c in pattern]
        else:
            listed = _block_list(config, where)
        if listed is None:
            raise ValueError(f"{where}: nemotron_h needs hybrid_override_pattern or layer_types")
        return [[t] if t is not None else [] for t in listed]
    n = _int(config, "num_hidden_layers", None, where) if layers is not None else None
    if n is None:
        raise ValueError(f"{where}: num_hidden_layers is missing (the number of layers)")
    if model_type == "falcon_h1":
        return [[FULL, MAMBA] for _ in range(n)]
    if model_type == "mamba2":
        return [[MAMBA] for _ in range(n)]
    if model_type == "qwen3_next":
        names = config.get("layer_types")
        if names is None:
            every = _int(config, "full_attention_interval", 4, where)
            return [[FULL] if (i + 1) % every == 0 else [GDN] for i in range(n)]
        if not isinstance(names, list) or len(names) != n:
            raise ValueError(f"{where}: layer_types must list {n} layer types, got {names!r:.80}")
        kinds = {"linear_attention": GDN, "full_attention": FULL}
        for i, name in enumerate(names):
            if name not in kinds:
                raise ValueError(
                    f"{where}: layer_types[{i}]={name!r} must be 'linear_attention' or "
                    "'full_attention'"
                )
        return [[kinds[name]] for name in names]
    listed = _block_list(config, where)
    if listed is None and model_type == "bamba":
        indices = config.get("attn_layer_indices") or []
        if not isinstance(indices, list) or not all(
            isinstance(i, int) and 0 <= i < n for i in indices
        ):
            raise ValueError(
                f"{where}: attn_layer_indices={indices!r:.80} must list layers in [0, {n})"
            )
        return [[FULL] if i in indices else [MAMBA] for i in range(n)]
    if listed is None:  # granitemoehybrid: every layer Mamba-2 by default
        return [[MAMBA] for _ in range(n)]
    if len(listed) != n:
        raise ValueError(f"{where}: the layer list has {len(listed)} entries; need {n}")
    if None in listed:
        raise ValueError(f"{where}: {model_type} has no MLP-only layers ('mlp', 'moe')")
    return [[t] for t in listed if t is not None]


# The keys of the Mamba-2 shape (heads, head_dim, groups, state size, conv kernel) in the
# configs that name it without the mamba_ prefix of the hybrids, and their shared defaults.
_MAMBA2_KEYS = {
    "nemotron_h": (
        "mamba_num_heads",
        "mamba_head_dim",
        "n_groups",
        "ssm_state_size",
        "conv_kernel",
    ),
    "mamba2": ("num_heads", "head_dim", "n_groups", "state_size", "conv_kernel"),
}
_MAMBA2_DEFAULTS = (128, 64, 8, 128, 4)


def _mamba2_state(config: Mapping[str, Any], model_type: str, where: str) -> StateShape:
    dtype = _dtype(config, "torch_dtype", _dtype(config, "dtype", "bfloat16", where), where)
    # The SSM state stays float32, as transformers keeps the float32 result of its scan and
    # kvshard.models caches it; a config's mamba_ssm_cache_dtype (vLLM's setting) overrides.
    ssm_dtype = _dtype(config, "mamba_ssm_cache_dtype", "float32", where)
    if model_type in _MAMBA2_KEYS:
        heads, head_dim, groups, state, kernel = (
            _int(config, key, default, where)
            for key, default in zip(_MAMBA2_KEYS[model_type], _MAMBA2_DEFAULTS, strict=True)
        )
    else:  # bamba, granitemoehybrid, falcon_h1: mamba_* fields
        hidden = _int(config, "hidden_size", None, where)
        expand = _int(config, "mamba_expand", 2, where)
        inner = expand * hidden
        if model_type == "falcon_h1" and config.get("mamba_d_ssm") is not None:
            inner = _int(config, "mamba_d_ssm", None, where)
        heads = _int(config, "mamba_n_heads", 128, where)
        raw = config.get("mamba_d_head")
        if raw in (None, "auto"):
            if inner % heads:
                raise ValueError(
                    f"{where}: mamba_n_heads={heads} must divide the Mamba intermediate size "
                    f"{inner}"
                )
            head_dim = inner // heads
        else:
            head_dim = _int(config, "mamba_d_head", None, where)
        groups = _int(config, "mamba_n_groups", 1, where)
        state = _int(config, "mamba_d_state", 256, where)
        kernel = _int(config, "mamba_d_conv", 4, where)
    conv_dim = heads * head_dim + 2 * groups * state
    return StateShape(
        "mamba", (kernel - 1, conv_dim), (heads, head_dim, state), dtype, ssm_dtype, heads
    )


def _gdn_state(config: Mapping[str, Any], where: str) -> StateShape:
    dtype = _dtype(config, "torch_dtype", _dtype(config, "dtype", "bfloat16", where), where)
    k_heads = _int(config, "linear_num_key_heads", 16, where)
    v_heads = _int(config, "linear_num_value_heads", 32, where)
    k_dim = _int(config, "linear_key_head_dim", 128, where)
    v_dim = _int(config, "linear_value_head_dim", 128, where)
    kernel = _int(config, "linear_conv_kernel_dim", 4, where)
    conv_dim = 2 * k_heads * k_dim + v_heads * v_dim
    return StateShape(
        "linear_attention", (kernel - 1, conv_dim), (v_heads, k_dim, v_dim), dtype, dtype, v_heads
    )


def hybrid_layers(config: Mapping[str, Any], *, where: str | None = None) -> HybridLayers:
    """Returns the cache layers of a hybrid model's config (see the module docstring).

    Raises:
      ValueError: not a hybrid family read here; a Mamba-1 family (Jamba, Mamba), which kvshard
        does not support; a malformed layer list or pattern, or a state dimension that is not
        a positive integer; the message names the field.
    """
    config = _text(config)
    where = where or str(config.get("_name_or_path") or "config")
    model_type = str(config.get("model_type"))
    if model_type in _MAMBA1_TYPES:
        raise ValueError(
            f"{where}: model_type={model_type!r} has Mamba-1 layers (no heads or groups in its "
            "state); kvshard supports Mamba-2 (Bamba, Granite-4.0-H, Nemotron-H, Falcon-H1) "
            "and gated DeltaNet (Qwen3-Next) state layers only"
        )
    if model_type not in _HYBRID_TYPES:
        raise ValueError(
            f"{where}: model_type={model_type!r} is not a hybrid family kvshard reads "
            f"({', '.join(_HYBRID_TYPES)})"
        )
    types: list[LayerType] = []
    owner: list[int] = []
    for i, block in enumerate(_blocks(config, model_type, where)):
        types.extend(block)
        owner.extend([i] * len(block))
    state = _gdn_state(config, where) if model_type == "qwen3_next" else None
    if state is None:
        state = _mamba2_state(config, model_type, where)
    return HybridLayers(tuple(types), tuple(owner), state)


def unified_page_size(state_bytes: int, token_bytes: int, alignment: int = 16) -> int:
    """Tokens per attention page so that one attention page holds at least one state page:
    vLLM's rule (``HybridAttentionMambaModelConfig``): the attention block size is the least
    multiple of ``alignment`` whose page (``tokens * token_bytes``) is >= ``state_bytes``; the
    state page is then padded to the attention page's bytes, so every page in the pool has the
    same bytes.

    Args:
      state_bytes: bytes of one state group's page (its layers' states of one request), >= 1.
      token_bytes: bytes one token takes in one attention group's page (its layers' K and V),
        >= 1.
      alignment: the attention kernel's block alignment in tokens (vLLM: 16 for its
        FlashAttention backend), >= 1.

    Raises:
      ValueError: an argument is not an int >= 1.
    """
    check_positive_ints(
        "unified_page_size", state_bytes=state_bytes, token_bytes=token_bytes, alignment=alignment
    )
    blocks = -(-state_bytes // (alignment * token_bytes))
    return alignment * blocks


def unified_group_page_sizes(token_bytes: Any, page_size: Any) -> tuple[int, ...]:
    """Tokens per page of each attention group so that every page has the same bytes:
    vLLM's ``unify_kv_cache_spec_page_size`` for layers of different head sizes (or KV heads,
    or dtypes). The group with the largest page at ``page_size`` tokens keeps ``page_size``;
    a group whose page is ``r`` times smaller takes ``r * page_size`` tokens per page. The
    result is ``PageAllocator(group_page_sizes=...)`` (``page_size`` is the hash block).

    Args:
      token_bytes: one int >= 1 per attention group (in ``group_types`` order): the bytes one
        token takes in one layer of the group (K and V, every KV head).
      page_size: tokens per page of the largest page, int >= 1.

    Raises:
      ValueError: an argument is not as above, or a group's page does not divide the largest
        page (vLLM raises NotImplementedError there: block sizes alone cannot unify them).
    """
    where = "unified_group_page_sizes"
    if not is_positive_int(page_size):
        raise ValueError(f"{where}: page_size={page_size!r} must be an int >= 1")
    if isinstance(token_bytes, str) or not hasattr(token_bytes, "__len__") or not token_bytes:
        raise ValueError(f"{where}: token_bytes={token_bytes!r} must be a non-empty sequence")
    for g, value in enumerate(token_bytes):
        if not is_positive_int(value):
            raise ValueError(f"{where}: token_bytes[{g}]={value!r} must be an int >= 1")
    largest = max(token_bytes)
    for g, value in enumerate(token_bytes):
        if largest % value:
            raise ValueError(
                f"{where}: token_bytes[{g}]={value} does not divide the largest, {largest}: "
                "no page size gives its page the same bytes (vLLM refuses the same)"
            )
    return tuple(page_size * (largest // value) for value in token_bytes)
