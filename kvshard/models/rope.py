"""Rotary position embeddings: the frequency variants Hugging Face checkpoints use, and RoPE.

:func:`inv_freq` turns a :class:`~kvshard.models.config.RopeSpec` into the per-pair inverse
frequencies and the cos/sin scale (``attention_factor``; not 1 only for yarn), computed in
float64 NumPy once per layer kind, following transformers' ``modeling_rope_utils``:

* ``default``: ``theta ** (-2i / D)``;
* ``linear``: divided by ``factor`` (position interpolation);
* ``llama3``: Llama 3.1's band-wise scaling (low frequencies / factor, high ones kept, a smooth
  ramp between ``low_freq_factor`` and ``high_freq_factor``);
* ``yarn``: interpolation below / extrapolation above the ``beta_fast``..``beta_slow``
  correction range, plus the mscale attention factor.

:func:`apply_rope` rotates the two halves of the head dimension (the layout of every Hugging
Face checkpoint here), with cos/sin cast to the activations' dtype as transformers does; with
a ``partial_rotary_factor`` f (Bamba: 0.5) only the first ``int(f * head_dim)`` dimensions
rotate (the frequencies are those of that many dimensions) and the rest pass through.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

from kvshard.models.config import RopeSpec

__all__ = ["apply_rope", "inv_freq"]


def _llama3(freq: np.ndarray, rope: RopeSpec) -> np.ndarray:
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / freq
    scaled = np.where(wavelen > old_context / low, freq / factor, freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return np.where(medium, smoothed, scaled)


def _yarn(head_dim: int, rope: RopeSpec) -> tuple[np.ndarray, float]:
    original = rope.get("original_max_position_embeddings") or rope.max_position_embeddings
    factor = rope.get("factor")
    factor = float(factor if factor is not None else rope.max_position_embeddings / original)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention_factor = (
            mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        )
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (
            head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))
        )

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = np.clip((np.arange(head_dim // 2) - low) / (high - low), 0, 1)
    extrapolation = rope.theta ** (-np.arange(0, head_dim, 2) / head_dim)
    interpolation = extrapolation / factor
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


@functools.lru_cache(maxsize=32)
def inv_freq(rope: RopeSpec, head_dim: int) -> tuple[np.ndarray, float]:
    """(float32[head_dim / 2] inverse frequencies, cos/sin scale) of one rotary embedding."""
    if rope.kind == "yarn":
        freq, scale = _yarn(head_dim, rope)
    else:
        freq, scale = rope.theta ** (-np.arange(0, head_dim, 2) / head_dim), 1.0
        if rope.kind == "linear":
            freq = freq / float(rope.get("factor", 1.0))
        elif rope.kind == "llama3":
            freq = _llama3(freq, rope)
    freq = freq.astype(np.float32)
    freq.setflags(write=False)  # cached: shared by every caller
    return freq, scale


def apply_rope(x, positions, rope: RopeSpec):
    """x: [..., T, H, D] rotated at int32 positions [..., T] (rotate-half convention)."""
    factor = rope.get("partial_rotary_factor")
    if factor is not None and int(x.shape[-1] * float(factor)) < x.shape[-1]:
        rotary = int(x.shape[-1] * float(factor))
        rotated = apply_rope(x[..., :rotary], positions, _whole(rope))
        return jnp.concatenate([rotated, x[..., rotary:]], axis=-1)
    freq, scale = inv_freq(rope, x.shape[-1])
    angles = positions[..., None].astype(jnp.float32) * freq  # [..., T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]  # [..., T, 1, D]
    cos, sin = (jnp.cos(angles) * scale).astype(x.dtype), (jnp.sin(angles) * scale).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _whole(rope: RopeSpec) -> RopeSpec:
    """The same rope without its partial_rotary_factor (applied to the rotary dims alone)."""
    return dataclasses.replace(
        rope, params=tuple((k, v) for k, v in rope.params if k != "partial_rotary_factor")
    )
