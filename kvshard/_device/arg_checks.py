"""Host-side argument checks shared by every device operation (run before anything is donated).

Every public operation checks its arguments here first, so a bad call raises an exception that
names the argument, the value and the bound, and leaves the cache intact and readable.
Metadata reaches the device as int32 through :func:`as_int32` (the bounds are
:mod:`kvshard._geometry.int32`'s).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvshard._device.options import BACKENDS, BackendOptions
from kvshard._geometry.int32 import INT32_MAX, INT32_MIN, first_outside_int32

__all__ = [
    "as_int32",
    "check_backend",
    "check_layer",
    "check_options",
    "check_page_pairs",
    "check_shape",
    "concrete",
    "dtype_of",
    "is_traced",
    "shape_str",
]


def is_traced(x: Any) -> bool:
    """Whether ``x`` is a tracer (its values are unknown on the host)."""
    return isinstance(x, jax.core.Tracer)


def concrete(x: Any) -> np.ndarray | None:
    """``x`` as a host array, or None while its values are unknown on this host: while traced,
    or for an array spanning processes (other hosts hold some of its shards), which is then
    treated like a traced value (kvshard.distributed)."""
    if is_traced(x):
        return None
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    return np.asarray(x)


def dtype_of(x: Any) -> np.dtype:
    """The dtype of an array as given (jnp.result_type would map NumPy int64 to int32)."""
    if isinstance(x, np.ndarray | jax.Array):
        return x.dtype  # already a np.dtype: the eager path asks this several times a call
    return np.dtype(x.dtype) if hasattr(x, "dtype") else jnp.result_type(x)


def as_int32(name: str, x: Any) -> Any:
    """Returns metadata ``x`` as int32: as given when int32 (traced or not), else a host array.

    Concrete ``x`` may have any integer dtype; its values are checked against int32 first, so
    a cast can never wrap a huge id into a valid-looking one. Traced ``x`` must already be
    int32: its values cannot be checked, and a cast inside jit would wrap silently.

    Raises:
      TypeError: ``x`` is not an integer array, or is traced with a dtype other than int32.
      ValueError: a concrete value lies outside int32 (names ``name``, the value, the bound).
    """
    if type(x) is np.ndarray and x.dtype == np.int32:
        return x  # the common case (a step from build_step), answered first
    if not is_traced(x) and not hasattr(x, "dtype"):
        # A Python int or list: numpy gives it a dtype wide enough to hold it (jnp would say
        # int32 for any Python int, and the cast below would wrap 2**40 to 0).
        try:
            x = np.asarray(x)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be an integer array, got {type(x).__name__}") from err
    dtype = dtype_of(x)
    if is_traced(x):
        if dtype != np.int32:
            raise TypeError(
                f"{name} is traced with dtype {dtype}; traced {name} must be int32 (its values "
                "cannot be range-checked inside jit; cast on the host, before jit)"
            )
        return x
    if not np.issubdtype(dtype, np.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {dtype}")
    if dtype == np.int32:
        return x  # nothing to check or cast; a device array stays where it is
    host = np.asarray(x)
    where = first_outside_int32(host)
    if where is not None:
        raise ValueError(
            f"{name} contains {int(host[where])}, outside int32 [{INT32_MIN}, {INT32_MAX}]"
        )
    return host.astype(np.int32, copy=False)


def shape_str(shape: tuple[Any, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def check_shape(name: str, x: Any, expected: tuple[int | None, ...], what: str) -> None:
    """Raises ValueError unless ``x.shape`` matches ``expected`` (None matches any size)."""
    shape = x.shape if isinstance(x, np.ndarray | jax.Array) else np.shape(x)
    if len(shape) != len(expected) or not all(
        e is None or e == s for e, s in zip(expected, shape, strict=False)
    ):
        want = shape_str(tuple("*" if e is None else e for e in expected))
        raise ValueError(f"{name} must have shape {what} = {want}, got {shape_str(shape)}")


def check_backend(backend: Any) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")


_DEFAULT_OPTIONS = BackendOptions()  # frozen: one instance serves every call


def check_options(options: Any) -> BackendOptions:
    """``options`` as a :class:`~kvshard.BackendOptions` (None: the defaults)."""
    if options is None:
        return _DEFAULT_OPTIONS
    if not isinstance(options, BackendOptions):
        raise TypeError(f"options must be a kvshard.BackendOptions, got {type(options).__name__}")
    return options


def check_layer(num_layers: int, layer: Any) -> jax.Array | np.integer:
    """Returns ``layer`` as an int32 scalar; range-checked against ``num_layers`` when concrete.

    Normalising to int32 keeps one jit signature for Python ints, NumPy ints and traced ints.
    """
    if type(layer) is int:  # the common eager case, answered without NumPy's dtype machinery
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer={layer} is out of range [0, {num_layers})")
        return np.int32(layer)
    dtype = dtype_of(layer)
    if np.shape(layer) != () or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"layer must be an integer scalar, got {dtype}{list(np.shape(layer))}")
    value = concrete(layer)
    if value is None:
        return jnp.asarray(layer, jnp.int32)
    if not 0 <= int(value) < num_layers:
        raise ValueError(f"layer={int(value)} is out of range [0, {num_layers})")
    return np.int32(value)


def check_page_pairs(pairs: Any, pooled: bool, dp: int) -> tuple[Any, np.ndarray | None]:
    """Page-pair metadata (``copy_pages``, ``swap_out``/``swap_in``): int[K, 2], or int[dp, K,
    2] with a page axis. Returns (pairs as int32, its concrete values as [G, K, 2] or None)."""
    lead = (dp,) if pooled else ()
    check_shape("pairs", pairs, (*lead, None, 2), "[dp, K, 2]" if pooled else "[K, 2]")
    pairs = as_int32("pairs", pairs)
    values = concrete(pairs)
    if values is not None and not pooled:
        values = values[None]  # one group (a reshape cannot infer -1 when K = 0)
    return pairs, values
