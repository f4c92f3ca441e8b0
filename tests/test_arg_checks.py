"""Tests of kvshard._device.arg_checks: the host-side argument checks that every device
operation runs first.

kvshard._device.arg_checks is package-internal; importing its public (non-underscore) functions here
is the documented internal test hook for this file, so the int32 bounds and the shape, layer
and options checks are tested once, directly, on hand-made values. That each operation calls
them, and leaves the cache untouched when they raise, is tested through the public API in
test_cache_update.py, test_cache_gather.py, test_cache_copy.py and test_step.py.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvshard import BackendOptions
from kvshard._device.arg_checks import (
    INT32_MAX,
    INT32_MIN,
    as_int32,
    check_backend,
    check_layer,
    check_options,
    check_shape,
    concrete,
    dtype_of,
    is_traced,
)

BOUND = re.escape("outside int32 [-2147483648, 2147483647]")


def test_int32_bounds():
    assert (INT32_MIN, INT32_MAX) == (-(2**31), 2**31 - 1)


# --------------------------------------------------------------------------------------------
# as_int32: any integer dtype on the host (range-checked), int32 only when traced
# --------------------------------------------------------------------------------------------


def test_as_int32_returns_int32_arrays_as_given():
    host = np.array([1, -2], np.int32)
    assert as_int32("x", host) is host
    device = jnp.array([3, 4], jnp.int32)
    assert as_int32("x", device) is device  # not copied to the host


@pytest.mark.parametrize(
    ("dtype", "values"),
    [
        (np.int64, [INT32_MIN, -1, 0, INT32_MAX]),  # both bounds are inside
        (np.uint32, [0, INT32_MAX]),
        (np.uint64, [0, INT32_MAX]),
        (np.int16, [-(2**15), 2**15 - 1]),
        (np.uint16, [0, 2**16 - 1]),
        (np.int8, [-128, 127]),
        (np.uint8, [0, 255]),
    ],
)
def test_as_int32_casts_other_integer_dtypes_after_checking(dtype, values):
    out = as_int32("x", np.array(values, dtype))
    assert isinstance(out, np.ndarray) and out.dtype == np.int32
    np.testing.assert_array_equal(out, values)


@pytest.mark.parametrize(
    ("dtype", "values", "bad"),
    [
        (np.int64, [0, 2**31], 2**31),
        (np.int64, [-(2**31) - 1, 5], -(2**31) - 1),
        (np.int64, [2**32 + 1], 2**32 + 1),  # would wrap to 1, a valid-looking id
        (np.int64, [-(2**63), 2**63 - 1], -(2**63)),  # the smaller offender first
        (np.uint32, [2**31], 2**31),
        (np.uint32, [2**32 - 1], 2**32 - 1),  # would wrap to -1
        (np.uint64, [2**63 + 3], 2**63 + 3),
    ],
)
def test_as_int32_refuses_values_outside_int32_naming_them(dtype, values, bad):
    with pytest.raises(ValueError, match=rf"^slots contains {bad}, {BOUND}$"):
        as_int32("slots", np.array(values, dtype))


def test_as_int32_of_an_empty_array():
    out = as_int32("x", np.zeros((3, 0), np.int64))
    assert out.shape == (3, 0) and out.dtype == np.int32


@pytest.mark.parametrize(
    ("value", "dtype"),
    [(np.array([1.0]), "float64"), (np.array([True]), "bool"), (jnp.array([1.5]), "float32")],
)
def test_as_int32_refuses_non_integer_dtypes(value, dtype):
    with pytest.raises(TypeError, match=rf"^pairs must be an integer array, got dtype {dtype}$"):
        as_int32("pairs", value)


def test_as_int32_passes_traced_int32_through():
    def f(x):
        out = as_int32("x", x)
        assert out is x
        return out + 1

    np.testing.assert_array_equal(jax.jit(f)(jnp.array([1, 2], jnp.int32)), [2, 3])


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int16, jnp.uint8, jnp.uint32, jnp.float32])
def test_as_int32_refuses_traced_dtypes_other_than_int32(dtype):
    name = jnp.dtype(dtype).name
    message = f"num_slices is traced with dtype {name}; traced num_slices must be int32"
    with pytest.raises(TypeError, match=re.escape(message)):
        jax.jit(lambda x: as_int32("num_slices", x))(jnp.array([1], dtype))


def test_as_int32_refuses_a_python_int_past_int32():
    with pytest.raises(ValueError, match=rf"^x contains {2**40}, {BOUND}$"):
        as_int32("x", 2**40)


# --------------------------------------------------------------------------------------------
# Tracing helpers
# --------------------------------------------------------------------------------------------


def test_is_traced_and_concrete():
    host = np.array([1, 2], np.int64)
    assert not is_traced(host) and not is_traced(jnp.ones(2)) and not is_traced(3)
    np.testing.assert_array_equal(concrete(host), [1, 2])
    np.testing.assert_array_equal(concrete(jnp.array([5])), [5])

    def f(x):
        assert is_traced(x) and concrete(x) is None
        return x

    jax.jit(f)(jnp.ones(2))


def test_dtype_of_keeps_the_given_dtype():
    # jnp.result_type maps int64 to int32 without x64; the checks need the dtype as given.
    assert dtype_of(np.zeros(1, np.int64)) == np.int64
    assert dtype_of(np.zeros(1, np.uint8)) == np.uint8
    assert dtype_of(jnp.zeros(1, jnp.bfloat16)) == jnp.bfloat16
    assert dtype_of(3) == np.int32 and dtype_of(1.0) == np.float32
    assert dtype_of(True) == np.dtype(bool)


# --------------------------------------------------------------------------------------------
# check_shape
# --------------------------------------------------------------------------------------------


def test_check_shape_accepts_matching_shapes():
    check_shape("k", np.zeros((8, 2, 64)), (None, 2, 64), "[T, H, D]")
    check_shape("k", np.zeros((0, 2, 64)), (None, 2, 64), "[T, H, D]")
    check_shape("num", np.zeros(1), (1,), "[1]")


@pytest.mark.parametrize(
    ("shape", "got"),
    [
        ((8, 3, 64), "[8, 3, 64]"),
        ((2, 64), "[2, 64]"),
        ((), "[]"),
        ((1, 8, 2, 64), "[1, 8, 2, 64]"),
    ],
)
def test_check_shape_refuses_naming_argument_expected_and_actual(shape, got):
    message = f"k must have shape [T, H, D] = [*, 2, 64], got {got}"
    with pytest.raises(ValueError, match=rf"^{re.escape(message)}$"):
        check_shape("k", np.zeros(shape), (None, 2, 64), "[T, H, D]")


# --------------------------------------------------------------------------------------------
# check_layer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 2, np.int64(1), np.uint8(2), jnp.int32(1), np.array(2)])
def test_check_layer_returns_a_host_int32(layer):
    out = check_layer(3, layer)
    assert type(out) is np.int32 and out == int(layer)


@pytest.mark.parametrize("layer", [3, -1, np.int64(2**40), INT32_MIN, jnp.int32(7)])
def test_check_layer_refuses_a_concrete_layer_out_of_range(layer):
    with pytest.raises(ValueError, match=rf"^layer={int(layer)} is out of range \[0, 3\)$"):
        check_layer(3, layer)


@pytest.mark.parametrize(
    ("layer", "got"),
    [
        (1.0, "float32[]"),
        (np.array([1]), "int64[1]"),
        (True, "bool[]"),
        (np.zeros((1, 1)), "float64[1, 1]"),
    ],
)
def test_check_layer_refuses_what_is_not_an_integer_scalar(layer, got):
    with pytest.raises(
        TypeError, match=rf"^layer must be an integer scalar, got {re.escape(got)}$"
    ):
        check_layer(3, layer)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int16, jnp.uint8])
def test_check_layer_casts_a_traced_layer_without_a_range_check(dtype):
    def f(layer):
        out = check_layer(3, layer)  # 7 is out of range, but traced values are not known
        assert is_traced(out) and out.dtype == jnp.int32 and out.shape == ()
        return out

    assert int(jax.jit(f)(jnp.asarray(7, dtype))) == 7


def test_check_layer_refuses_a_traced_float():
    with pytest.raises(TypeError, match=r"layer must be an integer scalar, got float32\[\]"):
        jax.jit(lambda x: check_layer(3, x))(jnp.float32(1))


# --------------------------------------------------------------------------------------------
# check_options, check_backend
# --------------------------------------------------------------------------------------------


def test_check_options():
    assert check_options(None) == BackendOptions()
    options = BackendOptions(interpret=True, schedule="vmem")
    assert check_options(options) is options


@pytest.mark.parametrize(
    ("options", "name"), [({"interpret": True}, "dict"), ("vmem", "str"), (True, "bool")]
)
def test_check_options_refuses_other_types(options, name):
    with pytest.raises(TypeError, match=rf"^options must be a kvshard.BackendOptions, got {name}$"):
        check_options(options)


def test_check_backend():
    for backend in ("auto", "pallas", "xla"):
        check_backend(backend)
    for bad in ("cuda", "XLA", None):
        with pytest.raises(ValueError, match=rf"^backend={re.escape(repr(bad))} must be one of"):
            check_backend(bad)


def test_as_int32_names_the_argument_of_a_list():
    np.testing.assert_array_equal(as_int32("slots", [0, 1]), [0, 1])
    with pytest.raises(TypeError, match=r"slots must be an integer array, got dtype float64"):
        as_int32("slots", [0.5])
