"""The int32 rule: every index, count and position kvshard hands a device is int32.

The Pallas kernels read int32 scalars, and ``build_step`` writes positions, lengths and page
ids as int32, so a value past int32 would wrap into a valid-looking one. This module is the one
definition of the bounds and of the two checks that enforce them on the host:

* :func:`check_int32_int`: one Python/NumPy integer argument (a pool size, a window) in
  ``[low, INT32_MAX]``;
* :func:`first_outside_int32`: where a concrete integer array first leaves int32, the test
  behind every metadata cast (:func:`kvshard._device.arg_checks.as_int32`, the update kernel's
  ``to_int32_metadata``).

Pure NumPy: the planner and the allocator use it without JAX.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["INT32_MAX", "INT32_MIN", "check_int32_int", "first_outside_int32"]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def check_int32_int(where: str, name: str, value: Any, low: int, why: str = "") -> int:
    """Returns ``value`` as an int when it is an integer in ``[low, INT32_MAX]``.

    Raises:
      ValueError: naming ``where``, ``name``, the value and the bound; ``why`` (optional) says
        what the value becomes on the device.
    """
    if not _is_int(value) or value < low:
        raise ValueError(f"{where}: {name}={value!r} must be an int >= {low}")
    if value > INT32_MAX:
        reason = f" ({why})" if why else ""
        raise ValueError(f"{where}: {name}={int(value)} must be <= 2**31 - 1{reason}")
    return int(value)


def first_outside_int32(host: np.ndarray) -> tuple[int, ...] | None:
    """The index of the first value of integer array ``host`` outside int32, or None.

    Arrays of int32 or narrower dtypes are never outside (nothing to scan)."""
    if not host.size or host.dtype.itemsize < 4 or host.dtype == np.int32:
        return None
    bad = (host < INT32_MIN) | (host > INT32_MAX)
    if not bad.any():
        return None
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), host.shape))
