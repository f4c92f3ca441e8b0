"""Per-layer cache types of a model: full, sliding window W, chunked local C, state layers.

State layers (``("mamba",)``: Mamba-2; ``("linear_attention",)``: gated DeltaNet) keep a
fixed-size state per request instead of per-token K/V; only the allocator and the planner take
them (``check_layer_types(..., allow_state=True)``), a cache of per-token pages refuses them.

Pure Python (no JAX, no config reading): :mod:`kvshard._geometry.hf_config` derives the types from a
Hugging Face config, the planner groups layers by them, and a cache that gives each group its
own page table can key its groups by them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = [
    "FULL",
    "STATE_KINDS",
    "CacheGroups",
    "LayerType",
    "cache_groups",
    "check_layer_types",
    "describe_groups",
    "group_layers",
    "is_positive_int",
    "is_state",
    "layer_size",
    "mix_note",
    "uniform_window",
]

# One layer's attention type: ("full",); ("sliding", W): a query at position p reads keys
# p - W + 1 .. p; ("chunked", C): a query at p reads keys C * (p // C) .. p (Llama 4's chunked
# local attention). Tuples, so a geometry stays hashable and a type can key a dict.
LayerType = tuple[str] | tuple[str, int]
FULL: LayerType = ("full",)
_SIZED_KINDS = ("sliding", "chunked")
# Layers whose cache is one fixed-size state per request (conv + SSM state of Mamba-2, conv +
# recurrent state of gated DeltaNet), not per-token K/V: vLLM's MambaSpec.
STATE_KINDS = ("mamba", "linear_attention")


def is_state(layer_type: LayerType) -> bool:
    """Whether ``layer_type`` keeps a per-request state (:data:`STATE_KINDS`), not K/V."""
    return layer_type[0] in STATE_KINDS


def is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_positive_ints(where: str, **values: Any) -> None:
    """Raises ValueError ``"{where}: name=value must be an int >= 1"`` for the first of
    ``values`` (name=value, in order) that is not an int >= 1 (:func:`is_positive_int`)."""
    for name, value in values.items():
        if not is_positive_int(value):
            raise ValueError(f"{where}: {name}={value!r} must be an int >= 1")


def layer_size(layer_type: LayerType) -> int | None:
    """W of ``("sliding", W)``, C of ``("chunked", C)``, None for ``("full",)``."""
    return int(layer_type[1]) if len(layer_type) == 2 else None


def check_layer_types(
    layer_types: Any, num_layers: int, *, allow_state: bool = False
) -> tuple[LayerType, ...]:
    """Returns ``layer_types`` as a tuple of :data:`LayerType` tuples (lists, as JSON gives
    them, are accepted); with ``allow_state`` also ``("mamba",)`` and
    ``("linear_attention",)`` (:data:`STATE_KINDS`).

    Raises:
      ValueError: not one type per layer, or an entry that is not ``("full",)``,
        ``("sliding", W)`` or ``("chunked", C)`` with W, C positive ints (or a state kind
        with ``allow_state``); the message names the entry.
    """
    if isinstance(layer_types, str) or not hasattr(layer_types, "__len__"):
        raise ValueError(f"layer_types={layer_types!r} must be a sequence of layer types")
    if len(layer_types) != num_layers:
        raise ValueError(
            f"layer_types has {len(layer_types)} entries; need one per layer ({num_layers})"
        )
    out: list[LayerType] = []
    for i, entry in enumerate(layer_types):
        t = tuple(entry) if isinstance(entry, list | tuple) else (entry,)
        if t == FULL:
            out.append(FULL)
        elif allow_state and len(t) == 1 and t[0] in STATE_KINDS:
            out.append((str(t[0]),))
        elif len(t) == 2 and t[0] in _SIZED_KINDS and is_positive_int(t[1]):
            out.append((str(t[0]), int(t[1])))
        else:
            state = ", ('mamba',), ('linear_attention',)" if allow_state else ""
            raise ValueError(
                f"layer_types[{i}]={entry!r} must be ('full',), ('sliding', W) or "
                f"('chunked', C) with W, C positive ints{state}"
            )
    return tuple(out)


def group_layers(layer_types: tuple[LayerType, ...]) -> dict[LayerType, tuple[int, ...]]:
    """Layer indices of each type, attention types in order of first appearance, then state
    types (:data:`STATE_KINDS`) in order of first appearance, so that a hybrid model's first
    group is an attention group.

    ``group_layers((FULL, ("sliding", 4), FULL))`` is
    ``{("full",): (0, 2), ("sliding", 4): (1,)}``.
    """
    groups: dict[LayerType, list[int]] = {}
    for i, t in enumerate(layer_types):
        groups.setdefault(t, []).append(i)
    ordered = sorted(groups.items(), key=lambda item: is_state(item[0]))  # stable
    return {t: tuple(layers) for t, layers in ordered}


# vLLM's rule: use the largest type's layer count as the group size when no type has this
# many times the layers of another (12 sliding + 13 full: groups of 13, not 12 and 24).
_BALANCED_RATIO = 1.25


class CacheGroups(NamedTuple):
    """How the layers of a model share one page pool: vLLM's KV-cache groups of equal size.

    The layers of each attention type are split into groups of at most ``group_size`` layers;
    each group has its own page table, and every group draws from one pool of page ids. A page
    id names token slots in each of ``group_size`` **cache layers** (the stacked cache's
    leading axis), so a page costs ``group_size`` layers' bytes, not ``num_layers``: layer
    ``l`` reads and writes cache layer ``layer_slot[l]`` through the page table of group
    ``layer_group[l]``. A group with fewer layers than ``group_size`` leaves its last cache
    layers unused (vLLM's padding).

    Attributes:
      group_size: cache layers (the stacked axis); ``num_layers`` when every layer has one type.
      group_types: the attention type of each group, groups in order.
      group_layers: the model layers of each group, in cache-layer order.
      layer_group: for each model layer, its group.
      layer_slot: for each model layer, its cache layer (position in its group).
    """

    group_size: int
    group_types: tuple[LayerType, ...]
    group_layers: tuple[tuple[int, ...], ...]
    layer_group: tuple[int, ...]
    layer_slot: tuple[int, ...]

    @property
    def num_groups(self) -> int:
        return len(self.group_types)


def cache_groups(layer_types: tuple[LayerType, ...]) -> CacheGroups:
    """THE grouping rule (vLLM's ``_get_kv_cache_groups_uniform_page_size``), shared by the
    cache, the allocator and the planner.

    ``group_size`` is the fewest layers of any type (the "1" of an n:1 pattern), or the most
    when no type has 1.25 times the layers of another; a type with ``n`` layers makes
    ``ceil(n / group_size)`` groups, group ``i`` of ``k`` taking ``layers[i::k]`` (so that
    the groups of a type stay balanced). One type: one group of every layer, cache layer =
    layer (kvshard's stacked cache).

    ``cache_groups((FULL, FULL, S, S, S))`` with ``S = ("sliding", 8)`` has group_size 2 and
    groups ``FULL: (0, 1)``, ``S: (2, 4)``, ``S: (3,)`` (the last one leaves a slot unused).
    """
    by_type = group_layers(layer_types)
    counts = [len(layers) for layers in by_type.values()]
    group_size = min(counts)
    if max(counts) < min(counts) * _BALANCED_RATIO:
        group_size = max(counts)
    types: list[LayerType] = []
    members: list[tuple[int, ...]] = []
    for t, layers in by_type.items():
        n = -(-len(layers) // group_size)
        for i in range(n):
            types.append(t)
            members.append(layers[i::n])
    layer_group = [0] * len(layer_types)
    layer_slot = [0] * len(layer_types)
    for g, layers in enumerate(members):
        for slot, layer in enumerate(layers):
            layer_group[layer], layer_slot[layer] = g, slot
    return CacheGroups(
        group_size, tuple(types), tuple(members), tuple(layer_group), tuple(layer_slot)
    )


def uniform_window(layer_types: tuple[LayerType, ...]) -> int | None:
    """W when every layer is ``("sliding", W)`` with one W, else None."""
    kinds = set(layer_types)
    if len(kinds) == 1:
        (only,) = kinds
        if only[0] == "sliding":
            return layer_size(only)
    return None


def describe_groups(groups: Mapping[LayerType, tuple[int, ...]], num_layers: int) -> str:
    """'sliding_window 1024 on 52 of 62 layers, full attention on 10' (windowed types first)."""
    parts = []
    for t, layers in sorted(groups.items(), key=lambda item: (is_state(item[0]), item[0] == FULL)):
        if t[0] == "sliding":
            parts.append(f"sliding_window {layer_size(t)} on {len(layers)}")
        elif t[0] == "chunked":
            parts.append(f"attention_chunk_size {layer_size(t)} on {len(layers)}")
        elif t[0] == "mamba":
            parts.append(f"Mamba-2 state on {len(layers)}")
        elif t[0] == "linear_attention":
            parts.append(f"gated DeltaNet state on {len(layers)}")
        else:
            parts.append(f"full attention on {len(layers)}")
    parts[0] += f" of {num_layers} layers"
    return ", ".join(parts)


def mix_note(layer_types: tuple[LayerType, ...]) -> str | None:
    """How the layers mix attention types, or None when they all share one."""
    groups = group_layers(layer_types)
    if len(groups) == 1:
        return None
    return (
        f"{describe_groups(groups, len(layer_types))}: no one window serves every layer; "
        "layer_types has each layer's type"
    )
