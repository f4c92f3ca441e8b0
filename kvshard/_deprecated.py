"""The deprecated call forms of the device operations, turned into the current ones.

Each function takes a call as the caller spelled it, warns (``DeprecationWarning``) when a
deprecated form is used, and returns the current form; the public entries
(:mod:`kvshard._eager`, :func:`kvshard.pad_slices`) call them before anything else, so the
operations see one form only. Importing this module imports no JAX (the host-side
:mod:`kvshard.metadata` uses it); the device-side helpers import what they need when called.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["attention_arguments", "max_num_seqs", "update_options"]


def max_num_seqs(max_num_seqs: Any, max_num_reqs: Any) -> Any:
    """``pad_slices``'s ``max_num_seqs``, given as itself or by its deprecated spelling
    ``max_num_reqs`` (warns as called from ``pad_slices``'s caller)."""
    if max_num_reqs is None:
        return max_num_seqs
    if max_num_seqs is not None:
        raise TypeError("pass max_num_seqs only (max_num_reqs is its deprecated spelling)")
    warnings.warn(
        "pad_slices(max_num_reqs=) is deprecated: pass max_num_seqs", DeprecationWarning, 3
    )
    return max_num_reqs


def update_options(options: Any, interpret: Any, schedule: Any, *, stacklevel: int) -> Any:
    """``options``, with ``update``'s deprecated ``interpret=``/``schedule=`` keywords folded
    in (unchanged when neither is given). ``stacklevel``: the caller's frame, counted from
    here."""
    legacy = {k: v for k, v in (("interpret", interpret), ("schedule", schedule)) if v is not None}
    if not legacy:
        return options
    from kvshard._device.arg_checks import check_options
    from kvshard._device.options import BackendOptions

    options = check_options(options)
    warnings.warn(
        f"update({', '.join(f'{k}=' for k in legacy)}...) is deprecated: pass "
        "options=kvshard.BackendOptions(...)",
        DeprecationWarning,
        stacklevel=stacklevel + 1,
    )
    return BackendOptions(**{**options.__dict__, **legacy})


def attention_arguments(cache: Any, layer: Any, q: Any, step: Any, metadata: Any) -> tuple:
    """``(cache, layer, q, step)`` of an ``attention`` call: the earlier argument order
    ``attention(q, cache, layer, metadata)`` and the ``metadata=`` keyword turned into the
    current ``attention(cache, layer, q, step)``. Warns as called from ``attention``'s caller."""
    from kvshard.cache._pytree import KVCache

    if not isinstance(cache, KVCache) and isinstance(layer, KVCache):
        warnings.warn(
            "attention(q, cache, layer, metadata) is deprecated: call attention(cache, layer, "
            "q, step), cache and layer first like every kvshard operation",
            DeprecationWarning,
            stacklevel=3,
        )
        cache, layer, q = layer, q, cache
    if metadata is not None:
        if step is not None:
            raise TypeError("pass the step once: step or metadata=, not both")
        warnings.warn(
            "attention(metadata=) is deprecated: pass step", DeprecationWarning, stacklevel=3
        )
        step = metadata
    return cache, layer, q, step
