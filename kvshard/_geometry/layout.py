"""Cache geometry: the pure-Python arithmetic of a sharded, combined-head paged KV cache.

Nothing here touches a device or imports JAX, so a command-line planner can size a cache for a
TPU slice it is not running on. :mod:`kvshard.cache` builds the arrays from these numbers.

Vocabulary (the same as docs/layout.md):

* ``tp``: size of the mesh axis that shards heads (tensor parallelism); ``dp``: size of the mesh
  axis that shards pages (data-parallel attention, one page pool per group).
* replication ``r``: how many copies of each KV head the cache holds, so that every one of the
  ``tp`` devices holds whole heads (``r = 1`` when ``tp`` divides the number of KV heads).
* layout (``CacheSpec.kv_layout``): how a head's K and V sit on the last two axes.
  "interleaved": combined head ``2h`` is K of head ``h`` and ``2h + 1`` is V, each row
  ``head_dim`` padded to 128 lanes. "packed": one row per head, K in lanes ``[0, head_dim)``
  and V in ``[head_dim, 2·head_dim)``, the row padded to 128 lanes (head_dim 64: no padding).
  Either way a device's contiguous block of the head axis holds both K and V of its own heads.
  "latent": multi-head latent attention (DeepSeek-V2/V3, Kimi-K2): one K-only row per token,
  the compressed latent ``c_kv`` (``kv_lora_rank`` lanes) then the decoupled rope key
  (``head_dim - kv_lora_rank`` lanes), padded to 128 lanes once; ``num_kv_heads = 1``, so a
  ``tp``-way head axis replicates the row ``tp`` times (one copy per device).

CacheSpec and every rule it validates (sizes, dtypes, scale bounds, head splits) live
together: the planner and the cache read one definition of each.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

from kvshard._geometry.layer_types import FULL, CacheGroups, cache_groups, check_layer_types

__all__ = [
    "KV_LAYOUTS",
    "LANES",
    "QUANTIZED_DTYPES",
    "SUPPORTED_DTYPES",
    "CacheSpec",
    "check_query_heads",
    "check_tensor_parallel",
    "needs_scales",
    "padded_query_heads",
    "page_bytes",
    "round_up",
    "scale_bounds",
]

# Names as `numpy.dtype(x).name` spells them (ml_dtypes registers bfloat16 and float8 with NumPy).
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16", "int8", "float8_e4m3fn", "float8_e5m2")
# Storage dtypes too narrow for raw activations: a cache of one of these stores real / scale
# (per-tensor k_scale, v_scale), the convention of vLLM and JAX's ragged paged attention.
QUANTIZED_DTYPES = ("int8", "float8_e4m3fn", "float8_e5m2")
# Quantized dtypes whose missing scales default to 1.0 (see CacheSpec); int8 has no such
# default: a step of 1.0 would read every activation below 0.5 back as 0.
FLOAT8_DTYPES = ("float8_e4m3fn", "float8_e5m2")

# The Pallas kernel DMAs whole (8, 128) tiles: head_dim is padded to the lane width.
LANES = 128
# How a head's K and V sit on the cache's last two axes (see CacheSpec.kv_layout).
KV_LAYOUTS = ("interleaved", "packed", "latent")

# Bits in a 32-bit TPU sublane word: sub-32-bit dtypes pack 32 // bits rows into one.
SUBLANE_BITS = 32


def round_up(x: int, multiple: int) -> int:
    """Returns the smallest multiple of ``multiple`` that is >= ``x`` (both positive ints)."""
    return -(-x // multiple) * multiple


def page_bytes(page_size: int, combined_heads: int, head_dim: int, dtype: Any) -> int:
    """Bytes of one page of ``combined_heads`` heads in TPU HBM, with the tile padding.

    ``page_size * roundup(combined_heads, packing) * roundup(head_dim, 128) * bits / 8``:
    sub-32-bit dtypes pack ``packing = 32 // bits`` rows into a sublane word, so the
    combined-head axis is padded to the packing; head_dim is padded to 128 lanes (the formula
    vLLM and tpu-inference use to size kernel blocks).
    """
    import ml_dtypes  # noqa: F401  # registers "bfloat16"/"float8_*" with NumPy, as JAX does

    bits = np.dtype(dtype).itemsize * 8
    packing = max(1, SUBLANE_BITS // bits)
    heads = round_up(combined_heads, packing)
    return page_size * heads * round_up(head_dim, LANES) * bits // 8


def canonical_dtype(dtype: Any) -> str:
    """Returns the NumPy name of ``dtype`` (a str, NumPy or JAX dtype, or scalar type).

    Raises:
      ValueError: ``dtype`` is not one of :data:`SUPPORTED_DTYPES`.
    """
    try:
        # Importing ml_dtypes registers bfloat16 / float8 names with NumPy; JAX depends on it.
        import ml_dtypes  # noqa: F401

        name = np.dtype(dtype).name
    except TypeError as err:
        raise ValueError(f"dtype={dtype!r} is not a dtype; use one of {SUPPORTED_DTYPES}") from err
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype={name!r} is not supported; use one of {SUPPORTED_DTYPES}")
    return name


def needs_scales(dtype: Any) -> bool:
    """True when a cache of ``dtype`` stores quantized values and so needs k_scale/v_scale.

    Raises:
      ValueError: ``dtype`` is not one of :data:`SUPPORTED_DTYPES`.
    """
    return canonical_dtype(dtype) in QUANTIZED_DTYPES


# The smallest normal float32 (2**-126). Every read and write of a quantized cache runs in
# float32 (kvshard.quant), where TPUs and XLA's CPU backend flush subnormals to zero: a scale
# below this reads every value back as 0.
SMALLEST_NORMAL_FLOAT32 = float(np.finfo(np.float32).tiny)


def _largest_stored_magnitude(dtype: str) -> float:
    """|lowest| of a quantized dtype's finite range: 128 for int8, 448 / 57344 for float8."""
    import ml_dtypes

    return 128.0 if dtype == "int8" else float(ml_dtypes.finfo(dtype).max)


def scale_bounds(dtype: Any) -> tuple[float, float]:
    """(smallest, largest) scale a cache of quantized ``dtype`` accepts, as Python floats.

    A scale must be a normal float32 (reads and writes run in float32, and subnormals flush to
    zero) no larger than ``float32_max / largest_stored_magnitude``, so that reading back any
    value the dtype can store (``stored * scale``, in float32) stays finite; the same bound
    keeps ``1 / scale`` (the quantizer's multiplier) a normal float32. The one definition
    shared by :class:`CacheSpec` and :func:`kvshard.calibrate_scales`.

    Raises:
      ValueError: ``dtype`` is not one of :data:`QUANTIZED_DTYPES`.
    """
    name = canonical_dtype(dtype)
    if name not in QUANTIZED_DTYPES:
        raise ValueError(f"dtype={name!r} is not quantized; use one of {QUANTIZED_DTYPES}")
    f32 = np.finfo(np.float32)
    # Largest float32 s with float32(magnitude) * s finite in float32 arithmetic.
    largest = np.float32(float(f32.max) / _largest_stored_magnitude(name))
    with np.errstate(over="ignore"):
        while not np.isfinite(np.float32(_largest_stored_magnitude(name)) * largest):
            largest = np.nextafter(largest, np.float32(0))
    return SMALLEST_NORMAL_FLOAT32, float(largest)


def check_scale(name: str, value: Any, dtype: Any) -> float | None:
    """Returns scale ``value`` of a ``dtype`` cache as a float; None stays None.

    For a float (unscaled) ``dtype`` only positivity is checked here (the caller refuses any
    scale there); for a quantized one the value must lie in :func:`scale_bounds`.

    Raises:
      ValueError: not a real number, not positive and finite, or outside ``scale_bounds``
        (naming ``name``, the value and the bounds).
    """
    if value is None:
        return None
    ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"{name}={value!r} must be a positive finite float")
    if canonical_dtype(dtype) in QUANTIZED_DTYPES:
        lo, hi = scale_bounds(dtype)
        if not lo <= float(value) <= hi:
            raise ValueError(
                f"{name}={value!r} is outside [{lo:.8g}, {hi:.8g}], the scales a "
                f"dtype={canonical_dtype(dtype)!r} cache can use: reads and writes run in "
                "float32, so a scale must be a normal float32 (below, every read flushes to 0) "
                "whose reads of the largest stored value stay finite (above, they are inf)"
            )
    return float(value)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_tensor_parallel(num_kv_heads: int, tp: int) -> int:
    """Returns how many copies of each KV head a ``tp``-way head-sharded cache must hold.

    * ``tp`` divides ``num_kv_heads``: heads are split, each device holds
      ``num_kv_heads // tp`` whole heads; returns 1.
    * ``tp`` is a multiple of ``num_kv_heads``: each KV head is replicated
      ``tp // num_kv_heads`` times so that each device holds one whole head; returns that.

    Raises:
      ValueError: a non-positive argument, or neither case holds; the message names both numbers
        and lists the tensor-parallel sizes that would work.
    """
    for name, value in (("num_kv_heads", num_kv_heads), ("tp", tp)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    num_kv_heads, tp = int(num_kv_heads), int(tp)
    if num_kv_heads % tp == 0:
        return 1
    if tp % num_kv_heads == 0:
        return tp // num_kv_heads
    multiples = ", ".join(str(num_kv_heads * k) for k in (2, 3, 4))
    raise ValueError(
        f"tensor-parallel size {tp} does not fit num_kv_heads={num_kv_heads}: the head axis size "
        f"must divide {num_kv_heads} ({', '.join(map(str, _divisors(num_kv_heads)))}) or be a "
        f"multiple of it ({multiples}, ...)"
    )


def padded_query_heads(num_q_heads: int, num_kv_heads: int, tp: int) -> int:
    """The fewest query heads >= ``num_q_heads``, the same count per KV head, that split
    evenly over a head axis of size ``tp`` (``num_q_heads`` itself when it already does).

    Query head ``i`` attends KV head ``i // g`` with ``g = num_q_heads / num_kv_heads`` heads
    per KV group, and each of the ``tp`` devices takes ``num_q_heads / tp`` consecutive query
    heads, so ``g' * num_kv_heads`` must be a multiple of ``tp``: ``g'`` a multiple of
    ``tp / gcd(num_kv_heads, tp)``. Assumes ``num_q_heads`` is a multiple of ``num_kv_heads``.
    """
    per_group = num_q_heads // num_kv_heads
    step = tp // math.gcd(num_kv_heads, tp)
    return round_up(per_group, step) * num_kv_heads


def check_query_heads(num_q_heads: int, num_kv_heads: int, tp: int) -> None:
    """Refuses query heads that :func:`kvshard.attention` cannot split over the head axis.

    Attention needs ``num_q_heads`` to be a multiple of ``num_kv_heads`` (whole KV groups) and
    of ``tp`` (whole heads per device).

    Raises:
      ValueError: a non-positive argument, or either rule broken; when only the head axis is,
        the message gives the per-group padding that works (:func:`padded_query_heads`).
    """
    for name, value in (("num_q_heads", num_q_heads), ("num_kv_heads", num_kv_heads), ("tp", tp)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}: "
            "each KV head must serve the same number of query heads"
        )
    if num_q_heads % tp == 0:
        return
    per_group = num_q_heads // num_kv_heads
    padded = padded_query_heads(num_q_heads, num_kv_heads, tp)
    # Unpadded, a head axis fits when it divides num_kv_heads, or is num_kv_heads times a
    # divisor of the group (check_tensor_parallel's replication, whole groups per copy).
    sizes = sorted(set(_divisors(num_kv_heads)) | {num_kv_heads * d for d in _divisors(per_group)})
    raise ValueError(
        f"num_q_heads={num_q_heads} ({per_group} per KV head) does not split over the head axis "
        f"of size {tp}: kvshard.attention needs a multiple of {tp}. Pad each KV head's group "
        f"from {per_group} to {padded // num_kv_heads} query heads ({padded} in all; zero "
        "weights for the extra heads, their outputs dropped), or use a head axis size of "
        f"{', '.join(map(str, sizes))}"
    )


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Static description of a paged KV cache (hashable: usable as a jit static argument).

    Attributes:
      num_layers: transformer layers sharing the stacked cache (>= 1).
      num_kv_heads: KV heads of the model, before any replication (>= 1).
      head_dim: head dimension of K and V as the model produces them (>= 1); stored padded to
        :attr:`padded_head_dim`. For a "latent" cache the whole latent row,
        ``kv_lora_rank + qk_rope_head_dim`` (576 for DeepSeek-V3).
      page_size: token slots per page (>= 1).
      num_pages: pages per page pool; with data-parallel attention each data-parallel group owns
        a pool of this many pages (>= 1).
      dtype: storage dtype; any spelling NumPy/JAX accepts, stored as its canonical NumPy name.
        One of float32, bfloat16, float16, int8, float8_e4m3fn, float8_e5m2.
      k_scale, v_scale: per-tensor scales of K and V for a quantized dtype (int8, float8_e4m3fn,
        float8_e5m2): the cache stores ``real / scale`` (rounded, saturated to the dtype's
        finite range) and reads return ``stored * scale``; see :mod:`kvshard.quant` and
        docs/guides/quantization.md. Required (both) for int8; for float8 both may be left
        out and default to 1.0 (values stored as they are, vLLM's convention for an fp8
        cache without calibration), but not just one. Must be None for float32, bfloat16
        and float16, which store values unscaled (a scale there would be a second, silent
        convention). Each must lie in :func:`scale_bounds` (a normal float32 whose reads
        stay finite). :func:`kvshard.calibrate_scales` picks them from samples.
      layer_types: each layer's attention type, ``("full",)``, ``("sliding", W)`` or
        ``("chunked", C)`` (lists, as JSON gives them, are accepted), stored as a tuple of
        tuples; None (the default) when every layer is full attention, which an all-full
        list is also stored as (one spelling, one spec). Layers of one type share a page
        table per group (:attr:`groups`, vLLM's KV-cache groups), so the stacked cache holds
        :attr:`num_cache_layers` cache layers, not ``num_layers``: layer ``l`` lives in cache
        layer ``groups.layer_slot[l]`` of the pages of group ``groups.layer_group[l]``.
      kv_layout: how a head's K and V sit on the cache's last two axes (docs/layout.md):
        "interleaved": two rows per head (K, then V), each ``head_dim`` padded to 128 lanes;
        the layout JAX's ragged paged attention kernel reads (``backend="pallas"``).
        "packed": one row per head, K in lanes ``[0, head_dim)`` and V in
        ``[head_dim, 2·head_dim)``, the row padded to a multiple of 128 lanes (tpu-inference's
        layout for head_dim 64): half the bytes of "interleaved" at head_dim 64; attention
        reads it with the xla backend only. "latent": multi-head latent attention (MLA:
        DeepSeek-V2/V3/R1, Kimi-K2): one K-only row per token holding the compressed latent
        ``c_kv`` in lanes ``[0, kv_lora_rank)`` and the decoupled rope key ``k_pe`` in
        ``[kv_lora_rank, head_dim)``, the row padded to a multiple of 128 lanes (576 -> 640);
        needs ``num_kv_heads=1`` (the latent is shared by every query head),
        ``head_dim = kv_lora_rank + qk_rope_head_dim`` and ``kv_lora_rank``. Its "value" is
        ``c_kv`` itself: :func:`kvshard.update` takes the latent as ``k`` with ``v=None``
        and :func:`kvshard.attention` returns the output in latent space
        (docs/layout.md, "Latent caches"). None (the default): "packed" when
        ``2 * head_dim <= 128`` (so head_dim 64 spends no lane on padding), else
        "interleaved".
      kv_lora_rank: "latent" only (None otherwise): lanes of the row that hold ``c_kv`` (the
        config's ``kv_lora_rank``, 512 for DeepSeek-V3), ``1 <= kv_lora_rank <= head_dim``;
        attention returns that many values per query head. A quantized latent cache uses
        ``k_scale`` for the whole row (``v_scale`` left out, or equal: it is stored as
        ``k_scale``).

    Raises:
      ValueError: a non-positive size, an unsupported dtype, int8 without both scales, a
        float8 dtype with only one, a scale on a float dtype, a scale that is not a
        positive finite number inside :func:`scale_bounds`, ``layer_types`` not one valid
        type per layer, an unknown ``kv_layout``, or a "latent" cache with
        ``num_kv_heads != 1``, without ``kv_lora_rank``, with one outside
        ``[1, head_dim]``, or with a ``v_scale`` other than ``k_scale`` (and
        ``kv_lora_rank`` given for another layout).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    num_pages: int
    dtype: str = "bfloat16"
    k_scale: float | None = None
    v_scale: float | None = None
    # Any: the constructor takes lists too (and callers spread **scales dicts); stored as
    # tuple[LayerType, ...] | None.
    layer_types: Any = None
    kv_layout: str | None = None
    kv_lora_rank: int | None = None

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_kv_heads", "head_dim", "page_size", "num_pages"):
            value = getattr(self, field)
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CacheSpec.{field}={value!r} must be a positive int")
            object.__setattr__(self, field, int(value))
        if self.layer_types is not None:
            try:
                types = check_layer_types(self.layer_types, self.num_layers)
            except ValueError as err:
                raise ValueError(f"CacheSpec.{err}") from None
            object.__setattr__(self, "layer_types", None if set(types) == {FULL} else types)
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        if self.kv_layout is None:
            packed = 2 * self.head_dim <= LANES
            object.__setattr__(self, "kv_layout", "packed" if packed else "interleaved")
        elif self.kv_layout not in KV_LAYOUTS:
            raise ValueError(
                f"CacheSpec.kv_layout={self.kv_layout!r} must be None or one of {KV_LAYOUTS}"
            )
        if self.latent:
            self._check_latent()
        elif self.kv_lora_rank is not None:
            raise ValueError(
                f"CacheSpec.kv_lora_rank={self.kv_lora_rank!r} is for kv_layout='latent' only "
                f"(got kv_layout={self.kv_layout!r}); leave it None"
            )
        for field in ("k_scale", "v_scale"):
            scale = check_scale(f"CacheSpec.{field}", getattr(self, field), self.dtype)
            object.__setattr__(self, field, scale)
        scales = (self.k_scale, self.v_scale)
        if self.dtype in FLOAT8_DTYPES and scales == (None, None):
            # vLLM's fp8 KV cache convention when a checkpoint carries no scales: store the
            # values as they are (float8 has the exponent range to hold raw activations).
            # One scale without the other is refused below: it is a forgotten argument.
            object.__setattr__(self, "k_scale", 1.0)
            object.__setattr__(self, "v_scale", 1.0)
            scales = (1.0, 1.0)
        if self.quantized and None in scales:
            raise ValueError(
                f"dtype={self.dtype!r} stores quantized values and needs both k_scale and "
                f"v_scale (got k_scale={self.k_scale!r}, v_scale={self.v_scale!r}); the cache "
                "stores real / scale: pick them with kvshard.calibrate_scales"
                + (" (or give neither: both 1.0)" if self.dtype in FLOAT8_DTYPES else "")
            )
        if not self.quantized and scales != (None, None):
            raise ValueError(
                f"dtype={self.dtype!r} stores values unscaled: k_scale and v_scale must be None "
                f"(got k_scale={self.k_scale!r}, v_scale={self.v_scale!r}); scales apply to "
                f"{', '.join(QUANTIZED_DTYPES)}"
            )

    def _check_latent(self) -> None:
        """The rules of a "latent" spec (see the class docstring); a lone ``k_scale`` is
        also stored as ``v_scale`` (the row is K and V at once)."""
        rank = self.kv_lora_rank
        if self.num_kv_heads != 1:
            raise ValueError(
                f"CacheSpec.num_kv_heads={self.num_kv_heads} must be 1 for kv_layout='latent': "
                "the latent is one row per token shared by every query head"
            )
        if not isinstance(rank, int | np.integer) or isinstance(rank, bool):
            raise ValueError(
                f"CacheSpec.kv_lora_rank={rank!r} must be an int in [1, head_dim={self.head_dim}] "
                "for kv_layout='latent' (the config's kv_lora_rank; head_dim is kv_lora_rank + "
                "qk_rope_head_dim)"
            )
        if not 1 <= rank <= self.head_dim:
            raise ValueError(
                f"CacheSpec.kv_lora_rank={rank} is outside [1, head_dim={self.head_dim}]: "
                "head_dim is the whole latent row, kv_lora_rank + qk_rope_head_dim"
            )
        object.__setattr__(self, "kv_lora_rank", int(rank))
        if self.v_scale is not None and self.v_scale != self.k_scale:
            raise ValueError(
                f"CacheSpec.v_scale={self.v_scale!r} must be None or equal k_scale="
                f"{self.k_scale!r} for kv_layout='latent': the value is the latent itself, "
                "stored once with k_scale"
            )
        object.__setattr__(self, "v_scale", self.k_scale)

    # -- dtype ------------------------------------------------------------------------------

    @property
    def np_dtype(self) -> np.dtype:
        """The storage dtype as a NumPy dtype (JAX accepts it everywhere)."""
        return np.dtype(self.dtype)

    @property
    def quantized(self) -> bool:
        """True for a dtype that stores ``real / scale`` (one of :data:`QUANTIZED_DTYPES`)."""
        return self.dtype in QUANTIZED_DTYPES

    @property
    def bits(self) -> int:
        """Bits per stored element."""
        return self.np_dtype.itemsize * 8

    @property
    def packing(self) -> int:
        """Elements per 32-bit TPU sublane word: 1 (f32), 2 (16-bit), 4 (8-bit)."""
        return SUBLANE_BITS // self.bits

    # -- layer groups -----------------------------------------------------------------------

    @functools.cached_property  # once per spec: every eager operation asks for it
    def groups(self) -> CacheGroups:
        """The KV-cache groups of the layers (:func:`kvshard._geometry.layer_types.cache_groups` of
        :attr:`layer_types`; one group of every layer, cache layer = layer, when None)."""
        return cache_groups(self.layer_types or (FULL,) * self.num_layers)

    @property
    def num_cache_layers(self) -> int:
        """Cache layers of the stacked array (its leading axis): ``groups.group_size``;
        ``num_layers`` when every layer has one attention type."""
        return self.groups.group_size

    @property
    def num_groups(self) -> int:
        """Page tables per request (one per group): 1 when every layer has one type."""
        return self.groups.num_groups

    # -- shapes -----------------------------------------------------------------------------

    @property
    def packed(self) -> bool:
        """True for the "packed" layout: K and V of a head share one row."""
        return self.kv_layout == "packed"

    @property
    def latent(self) -> bool:
        """True for the "latent" layout (MLA): one K-only row per token, no V row."""
        return self.kv_layout == "latent"

    @property
    def rows_per_head(self) -> int:
        """Rows of the head axis one head takes: 2 (interleaved: K, V) or 1 (packed, latent)."""
        return 2 if self.kv_layout == "interleaved" else 1

    @property
    def row_dim(self) -> int:
        """Lanes of a row that hold values: ``head_dim`` (interleaved; latent: the whole
        latent, ``kv_lora_rank + qk_rope_head_dim``), ``2 * head_dim`` (packed: K then V)."""
        return self.head_dim * (2 if self.packed else 1)

    @property
    def value_dim(self) -> int:
        """Values per head that attention returns: ``head_dim``, or ``kv_lora_rank`` for a
        latent cache (the output in latent space; the caller applies W_UV)."""
        return self.kv_lora_rank if self.latent and self.kv_lora_rank else self.head_dim

    @property
    def stored_values_per_head(self) -> int:
        """Values one head stores per token, padding aside: ``2 * head_dim`` (K and V), or
        ``head_dim`` for a latent cache (the latent row is K and V at once)."""
        return self.head_dim if self.latent else 2 * self.head_dim

    @property
    def padded_head_dim(self) -> int:
        """The last axis of the cache: :attr:`row_dim` rounded up to a multiple of 128 (the
        kernels' lane width): ``round_up(head_dim, 128)`` interleaved,
        ``round_up(2 * head_dim, 128)`` packed."""
        return round_up(self.row_dim, LANES)

    @property
    def slots_per_pool(self) -> int:
        """Token slots of one page pool: ``num_pages * page_size``."""
        return self.num_pages * self.page_size

    def replication(self, tp: int) -> int:
        """Copies of each KV head on a ``tp``-way head axis (see :func:`check_tensor_parallel`)."""
        return check_tensor_parallel(self.num_kv_heads, tp)

    def combined_heads(self, tp: int = 1) -> int:
        """Rows of the head axis after replication: ``rows_per_head * H * r`` (interleaved:
        K and V rows of every replicated head; packed: one K|V row each)."""
        return self.rows_per_head * self.num_kv_heads * self.replication(tp)

    def heads_per_device(self, tp: int = 1) -> int:
        """Whole KV heads (each with its K and V) one device holds on a ``tp``-way head axis."""
        return self.num_kv_heads * self.replication(tp) // tp

    def combined_heads_per_device(self, tp: int = 1) -> int:
        """Rows of the head axis one device holds: ``rows_per_head * heads_per_device(tp)``."""
        return self.rows_per_head * self.heads_per_device(tp)

    def global_shape(self, tp: int = 1, dp: int = 1) -> tuple[int, int, int, int]:
        """Shape of the stacked cache array: [L_cache, dp * num_pages * page_size, C, D_pad]
        with L_cache = :attr:`num_cache_layers`, C = :meth:`combined_heads` and D_pad =
        :attr:`padded_head_dim`."""
        return (
            self.num_cache_layers,
            dp * self.slots_per_pool,
            self.combined_heads(tp),
            self.padded_head_dim,
        )

    def local_shape(self, tp: int = 1) -> tuple[int, int, int, int]:
        """Shape of one device's shard: [L_cache, num_pages * page_size, C / tp, D_pad]."""
        return (
            self.num_cache_layers,
            self.slots_per_pool,
            self.combined_heads_per_device(tp),
            self.padded_head_dim,
        )

    # -- bytes ------------------------------------------------------------------------------

    def page_bytes_per_device(self, tp: int = 1) -> int:
        """Bytes of one page of one layer on one device, as laid out in TPU HBM.

        :func:`page_bytes` of the device's rows: the head axis is padded to the dtype's
        sublane packing and each row to 128 lanes. The sum of :meth:`kv_bytes_per_page`,
        :meth:`lane_padding_bytes_per_page` and :meth:`packing_padding_bytes_per_page`.
        """
        return page_bytes(
            self.page_size, self.combined_heads_per_device(tp), self.row_dim, self.np_dtype
        )

    def kv_bytes_per_page(self, tp: int = 1) -> int:
        """Bytes of K and V values (every head the device holds, replicas included) in one
        page of one layer on one device: what is stored, without padding (a latent cache:
        the latent row, once per replica)."""
        values = self.stored_values_per_head
        return self.page_size * self.heads_per_device(tp) * values * self.bits // 8

    def lane_padding_bytes_per_page(self, tp: int = 1) -> int:
        """Bytes of one page (one layer, one device) in the lanes past :attr:`row_dim`
        (head_dim 64 interleaved: half the page; packed: none)."""
        rows = self.page_size * self.combined_heads_per_device(tp)
        return rows * (self.padded_head_dim - self.row_dim) * self.bits // 8

    def packing_padding_bytes_per_page(self, tp: int = 1) -> int:
        """Bytes of one page (one layer, one device) in the rows that pad the head axis to the
        dtype's sublane packing (e.g. one packed bfloat16 head per device: half the page)."""
        rows = self.page_size * self.combined_heads_per_device(tp)
        unpacked = rows * self.padded_head_dim * self.bits // 8
        return self.page_bytes_per_device(tp) - unpacked

    def bytes_per_device(self, tp: int = 1, dp: int = 1) -> int:
        """Bytes of the whole stacked cache (all cache layers, all pages of its pool) on one
        device: :attr:`num_cache_layers` layers, so layer groups cost ``group_size`` layers.

        ``num_pages`` counts the pages of one pool, and each device holds exactly one pool's
        slots, so the result does not grow with ``dp``; ``dp`` is validated and accepted so that
        planners can pass their mesh shape unchanged.
        """
        if not isinstance(dp, int | np.integer) or isinstance(dp, bool) or dp < 1:
            raise ValueError(f"dp={dp!r} must be a positive int")
        return self.num_cache_layers * self.num_pages * self.page_bytes_per_device(tp)

    # -- model configs ----------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        config: Any,
        *,
        page_size: int,
        num_pages: int,
        dtype: Any = None,
        **spec_fields: Any,
    ) -> CacheSpec:
        """Returns the spec of a cache for the model of a Hugging Face ``config.json``.

        Reads ``num_hidden_layers``, ``num_key_value_heads`` (else ``num_attention_heads``),
        ``head_dim`` (else ``hidden_size / num_attention_heads``), ``torch_dtype`` and each
        layer's attention type (``layer_types``, from whichever convention the config uses);
        see :func:`kvshard.read_model_config`. A multi-head latent attention config
        (DeepSeek-V2/V3, Kimi-K2: ``kv_lora_rank`` set) gives a ``kv_layout="latent"`` cache
        of 1 KV head and ``head_dim = kv_lora_rank + qk_rope_head_dim``.

        Args:
          config: a config.json path, a directory holding one, or the parsed dict.
          page_size: token slots per page.
          num_pages: pages per page pool (page 0 is the allocator's null page).
          dtype: cache dtype; default the config's ``torch_dtype``.
          **spec_fields: further :class:`CacheSpec` fields, passed through unchanged
            (``layer_types=`` overrides the config's).

        Raises:
          kvshard.ConfigError: (a ``ValueError``) the config cannot be read or lacks a field;
            also when ``dtype`` is None and the config has no ``torch_dtype``. One line naming
            the field.
          ValueError: a bad ``page_size``, ``num_pages`` or ``dtype`` (as :class:`CacheSpec`).
        """
        from kvshard._geometry.hf_config import ConfigError, read_model_config

        geometry = read_model_config(config)
        if dtype is None:
            if geometry.dtype is None:
                raise ConfigError(
                    f"{geometry.name}: torch_dtype is missing; pass dtype= to pick the cache dtype"
                )
            dtype = geometry.dtype
        spec_fields.setdefault("layer_types", geometry.layer_types)
        if geometry.kv_lora_rank is not None:  # MLA: the latent row (docs/layout.md)
            spec_fields.setdefault("kv_layout", "latent")
            spec_fields.setdefault("kv_lora_rank", geometry.kv_lora_rank)
        return cls(
            geometry.num_layers,
            geometry.num_kv_heads,
            geometry.head_dim,
            page_size,
            num_pages,
            dtype,
            **spec_fields,
        )
