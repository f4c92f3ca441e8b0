"""Which attention type one ``attention`` call reads with: the window rule of layer groups.

A cache whose spec has ``layer_types`` gives each layer's group its own page table, and a
sliding-window or chunked group's table points its out-of-window pages at the null page once
no query can see them again. A read with another type than the layer's (a full read of a
sliding layer, say) would then attend whatever the null page holds: silently wrong. So the
type comes from the spec, and a call that says otherwise is refused:

* a concrete layer: its own type; ``sliding_window`` / ``layer_type``, when given, must be
  that type;
* a traced layer over layers of one type: that type;
* a traced layer over layers of several types (``lax.scan`` over one group's layers): the call
  must say the type (``layer_type=``, or ``sliding_window=W``), and inside ``jit`` a layer of
  another type reads nothing (the drop rule, :func:`kvshard._device.drop.route_layer`), which
  ``checks=True`` reports.

Without ``layer_types`` on the spec the call's own ``sliding_window`` / ``layer_type`` is the
type (None: full attention).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from kvshard._device.arg_checks import concrete
from kvshard._geometry.layer_types import (
    FULL,
    LayerType,
    check_layer_types,
    describe_groups,
    group_layers,
    layer_size,
)
from kvshard._geometry.layout import CacheSpec

__all__ = ["ReadType", "read_type"]


class ReadType(NamedTuple):
    """The attention type of one call and the layers it may read.

    Attributes:
      sliding_window: W of a ``("sliding", W)`` read, else None.
      chunk_size: C of a ``("chunked", C)`` read, else None.
      readable: a bool per layer, False for layers of another type (a traced layer over
        layers of several types); None when every layer the call can name may be read.
      layer_type: the type itself.
    """

    sliding_window: int | None
    chunk_size: int | None
    readable: tuple[bool, ...] | None
    layer_type: LayerType


def _claimed(sliding_window: int | None, layer_type: Any) -> LayerType | None:
    """The type the caller states, from ``layer_type=`` and/or ``sliding_window=``."""
    claimed = None
    if layer_type is not None:
        try:
            (claimed,) = check_layer_types([layer_type], 1)
        except ValueError as err:
            raise ValueError(f"layer_type={layer_type!r}: {err}") from None
    if sliding_window is not None:
        window_type: LayerType = ("sliding", sliding_window)
        if claimed is not None and claimed != window_type:
            raise ValueError(
                f"sliding_window={sliding_window} and layer_type={claimed!r} disagree: pass one"
            )
        claimed = window_type
    return claimed


def read_type(
    spec: CacheSpec,
    layer: Any,
    sliding_window: int | None,
    layer_type: Any,
    backend: str,
    options: Any = None,
) -> ReadType:
    """The attention type of ``attention(cache, layer, ...)`` (see the module docstring).

    Raises:
      ValueError: a stated type that is not the concrete layer's own, a traced layer over
        layers of several types with no type stated, a stated type no layer has, or a bad
        ``layer_type``.
      NotImplementedError: a chunked read on the pallas backend with JAX's kernel
        (``options.jax_attention_kernel``).
    """
    claimed = _claimed(sliding_window, layer_type)
    types = spec.layer_types
    readable = None
    value = concrete(layer)
    if types is None:
        chosen = claimed or FULL
    elif value is not None:
        own = types[int(value)]
        if claimed is not None and claimed != own:
            raise ValueError(
                f"layer {int(value)} is a {own!r} layer (CacheSpec.layer_types) but this call "
                f"reads it as {claimed!r}: its group's page table holds only the pages its own "
                "type can see (the others are the null page), so another window reads wrong "
                "keys; leave sliding_window and layer_type out to read with the layer's type"
            )
        chosen = own
    elif len(set(types)) == 1 or claimed is not None:
        chosen = claimed or types[0]
        if chosen not in types:
            raise ValueError(
                f"this call reads {chosen!r} layers but no layer of the cache has that type "
                f"(CacheSpec.layer_types: {describe_groups(group_layers(types), len(types))})"
            )
        if len(set(types)) > 1:
            readable = tuple(t == chosen for t in types)
    else:
        raise ValueError(
            "layer is traced and the cache's layers mix attention types "
            f"({describe_groups(group_layers(types), len(types))}), so its window is unknown: "
            "pass a Python int layer, or lax.scan one group's layers and say their type with "
            "layer_type=('sliding', W) / ('chunked', C) / ('full',) (or sliding_window=W)"
        )
    jax_kernel = options is not None and options.jax_attention_kernel
    if chosen[0] == "chunked" and backend == "pallas" and jax_kernel:
        raise NotImplementedError(
            f"chunked local attention (layer type {chosen!r}) is not supported with "
            "backend='pallas' and JAX's kernel: JAX's ragged_paged_attention has no chunk "
            "mask; use kvshard's kernel (BackendOptions(pallas_kernel='kvshard')) or "
            "backend='xla'"
        )
    size = layer_size(chosen)
    return ReadType(
        sliding_window=size if chosen[0] == "sliding" else None,
        chunk_size=size if chosen[0] == "chunked" else None,
        readable=readable,
        layer_type=chosen,
    )
