"""Hypothesis strategies for fuzzing paged KV-cache kernels against ``kvshard.reference``.

Public so downstream projects can fuzz their own update kernels with the same batches kvshard
uses to test its own::

    from hypothesis import given
    from kvshard import reference
    from kvshard.testing import update_batches

    @given(update_batches(page_size=16, num_pages=8, combined_heads=4))
    def test_my_kernel(batch):
        out = my_kernel(batch.new_kv, batch.slices, batch.kv_cache, batch.num_slices)
        expected = reference.kv_cache_update(
            batch.new_kv, batch.slices, batch.kv_cache, batch.num_slices
        )
        assert (np.asarray(out) == expected).all()

Requires ``hypothesis`` (the ``test`` extra); importing ``kvshard`` itself does not.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from hypothesis import strategies as st

__all__ = ["UpdateBatch", "random_values", "update_batches", "update_slices"]


@dataclasses.dataclass(frozen=True)
class UpdateBatch:
    """One drawn kernel call; arrays are numpy, ready to pass to a kernel or the oracle.

    Attributes:
      new_kv: dtype[num_tokens, combined_heads, head_dim]; the live slices cover
        ``new_kv[:num_live_tokens]`` contiguously, trailing rows are padding tokens.
      slices: int32[3, num_slices] of (kv_cache_start, new_kv_start, slice_len); columns at or
        past ``num_slices[0]`` are padding (zeros or arbitrary, possibly invalid, values).
      kv_cache: dtype[num_pages * page_size, combined_heads, head_dim], random contents.
      num_slices: int32[1], the number of live slices.
      page_size: rows per page.
    """

    new_kv: np.ndarray
    slices: np.ndarray
    kv_cache: np.ndarray
    num_slices: np.ndarray
    page_size: int

    @property
    def num_live_tokens(self) -> int:
        """Tokens the live slices write: ``slices[2, :num_slices[0]].sum()``, an int >= 0.

        The live slices read ``new_kv[:num_live_tokens]``; rows after it are padding tokens.
        Never raises for a drawn batch.
        """
        return int(self.slices[2, : int(self.num_slices[0])].sum())


def random_values(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Random values of ``dtype`` that survive a round trip through it bit-exactly."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype)


@st.composite
def update_slices(
    draw,
    *,
    page_size: int,
    num_pages: int,
    max_slices: int = 8,
    max_padding: int = 4,
    max_extra_tokens: int = 3,
    garbage_padding: bool = True,
    fixed_shapes: bool = False,
):
    """Draws valid ``(slices int32[3, S], num_slices int32[1], num_tokens)`` metadata.

    Live slices target distinct, shuffled pages (a page may hold two disjoint slices), start at
    a random offset, have length ``1..page_size``, never cross a page, never overlap, and read
    ``new_kv`` packed contiguously from row 0 in column order. ``num_tokens`` may exceed the
    live tokens by up to ``max_extra_tokens`` (padding tokens). Up to ``max_padding`` padding
    columns follow; with ``garbage_padding`` they may hold arbitrary, even invalid, values.
    With ``fixed_shapes`` every draw has ``max_slices + max_padding`` columns and
    ``max_slices * page_size + max_extra_tokens`` tokens, so a jitted kernel compiles once.
    """
    num_intervals = draw(st.integers(0, min(max_slices, num_pages)))
    pages = draw(st.permutations(range(num_pages)))[:num_intervals]
    dst, length = [], []
    for page in pages:
        start = draw(st.integers(0, page_size - 1))
        stop = draw(st.integers(start + 1, page_size))
        # Split some intervals in two so one page can receive two non-overlapping slices.
        cut = draw(st.integers(start, stop - 1))
        pieces = [(start, stop)] if cut == start else [(start, cut), (cut, stop)]
        for a, b in pieces:
            dst.append(page * page_size + a)
            length.append(b - a)
    dst, length = dst[:max_slices], length[:max_slices]
    order = draw(st.permutations(range(len(dst))))
    dst = [dst[i] for i in order]
    length = [length[i] for i in order]
    src = np.concatenate([[0], np.cumsum(length, dtype=np.int64)[:-1]]).astype(np.int64)
    live = np.array([dst, src[: len(dst)], length], dtype=np.int64).reshape(3, len(dst))

    if fixed_shapes:
        num_padding = max_slices + max_padding - live.shape[1]
    else:
        num_padding = draw(st.integers(0 if live.shape[1] else 1, max_padding))
    if garbage_padding and draw(st.booleans()):
        bound = 2 * num_pages * page_size
        padding = np.array(
            draw(
                st.lists(
                    st.integers(-bound, bound), min_size=3 * num_padding, max_size=3 * num_padding
                )
            ),
            dtype=np.int64,
        ).reshape(3, num_padding)
    else:
        padding = np.zeros((3, num_padding), dtype=np.int64)
    slices = np.concatenate([live, padding], axis=1).astype(np.int32)
    if fixed_shapes:
        num_tokens = max_slices * page_size + max_extra_tokens
    else:
        num_tokens = int(sum(length)) + draw(st.integers(0, max_extra_tokens))
    return slices, np.array([live.shape[1]], dtype=np.int32), max(num_tokens, 1)


@st.composite
def update_batches(
    draw,
    *,
    combined_heads: int = 2,
    head_dim: int = 128,
    dtype=np.float32,
    **slice_options: Any,
):
    """Draws an :class:`UpdateBatch`: :func:`update_slices` plus random cache and K/V values.

    ``slice_options`` are :func:`update_slices`' keywords (``page_size`` and ``num_pages``
    required; ``max_slices``, ``max_padding``, ``fixed_shapes``, ...).
    """
    page_size, num_pages = slice_options["page_size"], slice_options["num_pages"]
    slices, num_slices, num_tokens = draw(update_slices(**slice_options))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    new_kv = random_values(rng, (num_tokens, combined_heads, head_dim), dtype)
    kv_cache = random_values(rng, (num_pages * page_size, combined_heads, head_dim), dtype)
    return UpdateBatch(new_kv, slices, kv_cache, num_slices, page_size)
