"""kvshard/_geometry/int32.py: the int32 bounds and the two host checks every layer uses."""

from __future__ import annotations

import numpy as np
import pytest

from kvshard._geometry.int32 import INT32_MAX, INT32_MIN, check_int32_int, first_outside_int32


def test_bounds_are_int32s():
    assert (int(np.iinfo(np.int32).min), int(np.iinfo(np.int32).max)) == (INT32_MIN, INT32_MAX)


@pytest.mark.parametrize("value", [0, 5, np.int64(7), INT32_MAX])
def test_check_int32_int_accepts(value):
    assert check_int32_int("Where", "n", value, 0) == int(value)
    assert type(check_int32_int("Where", "n", value, 0)) is int


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "Where: n=-1 must be an int >= 0"),
        (1.0, "Where: n=1.0 must be an int >= 0"),
        (True, "Where: n=True must be an int >= 0"),
        ("3", "Where: n='3' must be an int >= 0"),
        (INT32_MAX + 1, r"Where: n=2147483648 must be <= 2\*\*31 - 1 \(int32 on the device\)"),
    ],
)
def test_check_int32_int_refuses(value, message):
    with pytest.raises(ValueError, match=message):
        check_int32_int("Where", "n", value, 0, "int32 on the device")


@pytest.mark.parametrize(
    ("values", "dtype", "where"),
    [
        ([0, INT32_MAX, INT32_MIN], np.int64, None),
        ([0, 1, INT32_MAX + 1, INT32_MIN - 1], np.int64, (2,)),
        ([[0, 1], [INT32_MIN - 1, 0]], np.int64, (1, 0)),
        ([2**32 - 1], np.uint32, (0,)),
        ([2**31 - 1], np.uint32, None),
        ([-5, 7], np.int16, None),
        ([], np.int64, None),
    ],
)
def test_first_outside_int32(values, dtype, where):
    assert first_outside_int32(np.asarray(values, dtype)) == where
