"""Shared helpers of the cache tests (test_cache_*.py and the files that reuse their oracle).

Two kinds of fixtures:

* a dense numpy oracle of shape [L, G, slots, H, D] (G page pools) updated with
  :mod:`kvshard.reference`, compared with what :func:`kvshard.cache.gather` reads back
  (:class:`Oracle`, :func:`assert_matches`) and with the raw sharded array;
* a page-marked cache (:func:`page_marked_cache`) whose page ``p`` holds ``p + 1`` in K (layer
  ``l`` adds ``100·l``) and the negation in V, so an expected result can be written out by
  hand: :func:`page_values` reads each page's marker back.

Everything runs on the 8 simulated CPU devices of conftest.py.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import AxisType

from kvshard import reference
from kvshard.cache import CacheSpec, KVCache, gather, init_cache, update

MESH_SHAPES = [(1, 8), (2, 4), (4, 2), (8, 1)]
HEADS = [1, 2, 4, 8, 16]
INT32_MAX = 2**31 - 1


def make_mesh(shape, *, auto=False):
    """A (data, model) mesh over the first data·model devices."""
    types = (AxisType.Auto if auto else AxisType.Explicit,) * 2
    devices = jax.devices()[: shape[0] * shape[1]]
    return jax.make_mesh(shape, ("data", "model"), axis_types=types, devices=devices)


def small_spec(num_kv_heads=2, *, head_dim=64, dtype="float32", num_layers=3, **kw):
    kw = {"page_size": 4, "num_pages": 8, **kw}
    return CacheSpec(
        num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, **kw
    )


class Oracle:
    """Dense numpy model: k, v of shape [L, G, slots, H, D]."""

    def __init__(self, spec: CacheSpec, groups: int):
        shape = (spec.num_layers, groups, spec.slots_per_pool, spec.num_kv_heads, spec.head_dim)
        self.spec = spec
        self.k = np.zeros(shape, spec.np_dtype)
        self.v = np.zeros(shape, spec.np_dtype)

    def update(self, layer, k, v, slices, num, pooled):
        """k, v [(G,) T, H, D]; slices [(G,) 3, S]; num [(G,) 1]."""
        if not pooled:
            k, v, slices, num = k[None], v[None], slices[None], num[None]
        dtype = self.spec.np_dtype
        for g in range(self.k.shape[1]):
            for dense, new in ((self.k, k), (self.v, v)):
                dense[layer, g] = reference.kv_cache_update(
                    np.asarray(new[g]).astype(dtype), slices[g], dense[layer, g], num[g]
                )

    def raw(self, replication):
        """The expected stacked array [L, G·slots, C, D_pad], written out from the layout's
        definition (docs/layout.md): interleaved rows K_j, V_j each padded to 128 lanes, or
        packed rows K_j|V_j padded to 128 lanes."""
        spec = self.spec
        k, v = (np.repeat(x, replication, axis=-2) for x in (self.k, self.v))
        if spec.kv_layout == "packed":
            rows = np.concatenate([k, v], axis=-1)  # [L, G, S, H·r, 2·D]: K lanes, then V
        else:
            both = np.stack([k, v], axis=-2)  # [L, G, S, H·r, 2, D]
            rows = both.reshape(*both.shape[:-3], -1, spec.head_dim)  # K_j, V_j alternate
        rows = rows.reshape(spec.num_layers, -1, *rows.shape[-2:])
        pad = -rows.shape[-1] % 128
        return np.pad(rows, [(0, 0), (0, 0), (0, 0), (0, pad)])


def read_all(cache: KVCache, layer):
    """Everything layer `layer` holds, via gather: k, v as numpy [G, slots, H, D]."""
    slots = np.arange(cache.spec.slots_per_pool, dtype=np.int32)
    if cache.page_axis is not None:
        k, v = gather(cache, layer, np.tile(slots, (cache.dp, 1)))
        return np.asarray(k), np.asarray(v)
    k, v = gather(cache, layer, slots)
    return np.asarray(k)[None], np.asarray(v)[None]


def assert_matches(cache: KVCache, oracle: Oracle):
    for layer in range(cache.spec.num_layers):
        k, v = read_all(cache, layer)
        np.testing.assert_array_equal(k, oracle.k[layer])
        np.testing.assert_array_equal(v, oracle.v[layer])
    # cache.kv holds the storage dtype (bf16/fp8 bits on CPU): viewed as the cache dtype, the
    # raw stored values.
    raw = np.asarray(cache.kv).view(cache.dtype)
    np.testing.assert_array_equal(raw, oracle.raw(cache.replication))


def random_kv(rng, spec, num_tokens, groups=None):
    lead = () if groups is None else (groups,)
    shape = (*lead, num_tokens, spec.num_kv_heads, spec.head_dim)
    return (rng.standard_normal(shape).astype(np.float32) for _ in range(2))


def fixed_slices(groups=None):
    """Two live slices (page 1 offset 1, page 3 offset 0) and one padding column."""
    slices = np.array([[5, 0, 3], [12, 3, 4], [999, 0, 0]], np.int32).T.copy()
    num = np.array([2], np.int32)
    if groups is None:
        return slices, num
    # Each group writes different slots of its own pool.
    shift = np.array([[1], [0], [0]], np.int32)
    return np.stack([slices + 4 * (g % 4) * shift for g in range(groups)]), np.tile(
        num, (groups, 1)
    )


# --------------------------------------------------------------------------------------------
# The page-marked cache: page p holds p + 1 in K (layer l adds 100·l), -(p + 1) in V
# --------------------------------------------------------------------------------------------

MARKED_SPEC = small_spec(2, head_dim=8, num_layers=2, page_size=2, num_pages=8)
MARKED_SLOTS = MARKED_SPEC.slots_per_pool  # 16
UNCHANGED_PAGES = np.arange(1, 9, dtype=np.float32)  # page_values of a fresh marked cache
MARKED_BAD_LAYERS = [
    -1,
    -2,
    MARKED_SPEC.num_layers,
    MARKED_SPEC.num_layers + 1,
    INT32_MAX,
    -(2**31),
]


def page_marked_cache(mesh, *, page_axis=None, groups=1, kv_layout=None):
    """MARKED_SPEC's cache (its default layout, packed at head_dim 8, or ``kv_layout``)."""
    spec = (
        MARKED_SPEC if kv_layout is None else dataclasses.replace(MARKED_SPEC, kv_layout=kv_layout)
    )
    cache = init_cache(spec, mesh, head_axis="model", page_axis=page_axis)
    slots = np.arange(MARKED_SLOTS)
    slices = np.stack([slots, slots, np.ones_like(slots)]).astype(np.int32)
    for layer in range(MARKED_SPEC.num_layers):
        value = (slots // MARKED_SPEC.page_size + 1 + 100 * layer).astype(np.float32)
        k = np.broadcast_to(value[:, None, None], (MARKED_SLOTS, 2, 8)).copy()
        num = np.array([MARKED_SLOTS], np.int32)
        if page_axis is not None:
            cache = update(
                cache, layer, np.stack([k] * groups), np.stack([-k] * groups),
                np.stack([slices] * groups), np.stack([num] * groups),
            )  # fmt: skip
        else:
            cache = update(cache, layer, k, -k, slices, num)
    return cache


def page_values(cache, layer=0):
    """The K value of each page's first slot, per group: float[G, num_pages]."""
    slots = np.arange(0, MARKED_SLOTS, MARKED_SPEC.page_size, dtype=np.int32)
    if cache.page_axis is None:
        return np.asarray(gather(cache, layer, slots)[0])[None, :, 0, 0]
    k, _ = gather(cache, layer, np.tile(slots, (cache.dp, 1)))
    return np.asarray(k)[:, :, 0, 0]


def run_checked(fn, *args):
    """jit(fn)(*args) -> (the error message a ``checks=True`` report raised or None, the
    outputs or None)."""
    try:
        out = jax.block_until_ready(jax.jit(fn)(*args))
    except jax.errors.JaxRuntimeError as err:
        # JAX keeps the failed callback's runtime token and would re-raise it at the next
        # effects barrier (or at exit): drop it, as a fresh process would not have it.
        jax._src.dispatch.runtime_tokens.clear()
        return str(err), None
    return None, out
