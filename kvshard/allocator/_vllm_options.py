"""Two of vLLM's hybrid-manager switches as allocator arguments: which KV-cache groups take
the EAGLE drop (``eagle_layers``, vLLM's ``KVCacheGroupSpec.is_eagle_group``) and every layer
as full attention in one group (``disable_hybrid``, vLLM's
``disable_hybrid_kv_cache_manager``). Both are checked here, before any part is built.
"""

from __future__ import annotations

from typing import Any

from kvshard._geometry.layer_types import FULL, LayerType, cache_groups, is_state
from kvshard.allocator._common import is_int
from kvshard.allocator._config import _layer_types


def hybrid_disabled(layer_types: Any, disable_hybrid: Any) -> Any:
    """``layer_types`` as vLLM's ``unify_hybrid_kv_cache_specs`` leaves them with the hybrid
    manager disabled: one type stays as it is; full attention mixed with sliding or chunked
    layers makes every layer ``("full",)`` (one group; every page kept, the model still
    attends over its windows); any other mix is refused. Without ``disable_hybrid`` the
    argument is returned untouched (checked later with the rest).

    Raises:
        ValueError: ``disable_hybrid`` is not a bool, is given without ``layer_types``, a
            ``layer_types`` entry is malformed (its own message), or the layer types mix state
            layers with attention, or windows without full attention.
    """
    if not isinstance(disable_hybrid, bool):
        raise ValueError(f"PageAllocator: disable_hybrid={disable_hybrid!r} must be a bool")
    if not disable_hybrid:
        return layer_types
    if layer_types is None:
        raise ValueError(
            "PageAllocator: disable_hybrid=True needs layer_types (without them there is one "
            "group already)"
        )
    types = _layer_types(layer_types, None)  # a malformed entry is refused by its own name
    assert types is not None
    kinds = set(types)
    if len(kinds) == 1:
        return layer_types
    if FULL in kinds and all(t == FULL or t[0] in ("sliding", "chunked") for t in kinds):
        return [FULL] * len(types)
    raise ValueError(
        f"PageAllocator: disable_hybrid=True cannot make layer_types={sorted(kinds)!r} one "
        "type: only full attention mixed with sliding or chunked layers becomes all full "
        "(vLLM refuses the same)"
    )


def eagle_groups(
    eagle_layers: Any, layer_types: tuple[LayerType, ...] | None
) -> tuple[int, ...] | None:
    """The KV-cache groups that take the EAGLE drop: those holding a layer of
    ``eagle_layers`` and every other group of the same layer type (vLLM looks groups of one
    spec up together, so one flag decides for all of them). None: every group (vLLM's
    fallback when no group is flagged).

    Raises:
        ValueError: given without ``layer_types``; empty; an entry not an int in
            ``[0, len(layer_types))``, or a state layer's (drafters have attention layers).
    """
    if eagle_layers is None:
        return None
    if layer_types is None:
        raise ValueError(
            f"PageAllocator: eagle_layers={eagle_layers!r} needs layer_types (the layers it names)"
        )
    if isinstance(eagle_layers, str) or not hasattr(eagle_layers, "__len__") or not eagle_layers:
        raise ValueError(
            f"PageAllocator: eagle_layers={eagle_layers!r} must be None (every group) or a "
            "non-empty sequence of layer indices"
        )
    n = len(layer_types)
    for i, layer in enumerate(eagle_layers):
        if not is_int(layer) or not 0 <= layer < n:
            raise ValueError(
                f"PageAllocator: eagle_layers[{i}]={layer!r} must be an int in [0, {n}) "
                "(a layer of layer_types)"
            )
        if is_state(layer_types[layer]):
            raise ValueError(
                f"PageAllocator: eagle_layers[{i}]={layer!r} is a state layer "
                f"{layer_types[layer]!r}; an EAGLE drafter's layers are attention layers"
            )
    groups = cache_groups(layer_types)
    flagged = {groups.group_types[groups.layer_group[int(layer)]] for layer in eagle_layers}
    return tuple(g for g, t in enumerate(groups.group_types) if t in flagged)
