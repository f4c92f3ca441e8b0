"""Plain numpy oracle for every write and read kvshard makes on a paged KV cache.

Nothing here is fast or clever on purpose: each function is the obvious loop or fancy-index
over host arrays, so the kernels and the sharded cache can be checked against it exactly.

Shapes use the seed kernel's names:

* ``new_kv``: [num_tokens, combined_heads, head_dim]
* ``kv_cache``: [num_pages * page_size, combined_heads, head_dim] (a row is one token slot)
* ``slices``: int32[3, S], rows (kv_cache_start, new_kv_start, slice_len)

Quantized caches (int8, float8_e4m3fn, float8_e5m2) store ``real / scale``:
:func:`quantize`, :func:`dequantize` and :func:`saturated` model kvshard's arithmetic exactly
(float32 multiply by the float32 reciprocal, NaN to 0, int8 rounds half to even, clip to the
finite range, cast), so a test can compare stored bits with ``==``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

# Finite range of each quantized storage dtype, spelled out here so the oracle shares no code
# with the implementation it checks.
_RANGES = {
    "int8": (-128.0, 127.0),
    "float8_e4m3fn": (-448.0, 448.0),
    "float8_e5m2": (-57344.0, 57344.0),
}
_STORAGE = {
    "int8": np.dtype(np.int8),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}


def _scaled(x: np.ndarray, scale: float, name: str) -> np.ndarray:
    """float32 x * float32(1 / scale), rounded half to even for int8 (NaN kept)."""
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN inputs are modelled
        y = np.asarray(x).astype(np.float32) * np.float32(1.0 / float(scale))
    return np.rint(y) if name == "int8" else y


def quantize(x: np.ndarray, scale: float, dtype: str) -> np.ndarray:
    """Stored values of real values ``x`` in a quantized cache.

    Args:
        x: float[...] real values (cast to float32 first).
        scale: positive per-tensor scale (stored = real / scale).
        dtype: "int8", "float8_e4m3fn" or "float8_e5m2".

    Returns:
        dtype[...]: ``x * float32(1/scale)`` in float32, NaN -> 0, rounded half to even for
        int8, clipped to the finite range, cast (float8: round to nearest even).

    Raises:
        KeyError: ``dtype`` is not a quantized dtype name.
    """
    lo, hi = _RANGES[dtype]
    y = _scaled(x, scale, dtype)
    y = np.where(np.isnan(y), np.float32(0), y)
    return np.clip(y, lo, hi).astype(np.float32).astype(_STORAGE[dtype])


def saturated(x: np.ndarray, scale: float, dtype: str) -> np.ndarray:
    """bool[...]: where :func:`quantize` clips (±inf included) or replaces NaN by 0."""
    lo, hi = _RANGES[dtype]
    y = _scaled(x, scale, dtype)
    return np.isnan(y) | (y < lo) | (y > hi)


def dequantize(q: np.ndarray, scale: float | None, dtype) -> np.ndarray:
    """Real values of stored ``q``: ``float32(q) * float32(scale)`` cast to ``dtype``.

    ``scale=None`` (an unscaled float cache) only casts.
    """
    q = np.asarray(q)
    if scale is None:
        return q.astype(dtype)
    return (q.astype(np.float32) * np.float32(scale)).astype(dtype)


def kv_cache_update(
    new_kv: np.ndarray,
    slices: np.ndarray,
    kv_cache: np.ndarray,
    num_kv_update_slices: np.ndarray | int,
) -> np.ndarray:
    """Returns a copy of ``kv_cache`` with every live slice of ``new_kv`` written into it.

    Slice ``i < num_kv_update_slices`` copies ``new_kv[new_kv_start : new_kv_start + slice_len]``
    to ``kv_cache[kv_cache_start : kv_cache_start + slice_len]``; later slices (padding) and
    zero-length slices write nothing. The input arrays are not modified.

    Args:
        new_kv: dtype[num_tokens, combined_heads, head_dim], the new tokens.
        slices: int[3, S], rows (kv_cache_start, new_kv_start, slice_len). Precondition
            (not checked): live slices lie inside ``new_kv`` and ``kv_cache``.
        kv_cache: dtype[num_pages * page_size, combined_heads, head_dim].
        num_kv_update_slices: int[1] array (or an int): the number of live slices; columns
            from it on are padding and are not read, so they may hold any values.

    Returns:
        dtype[num_pages * page_size, combined_heads, head_dim]: the updated copy, in
        ``kv_cache``'s dtype.

    Raises:
        ValueError: a live slice runs past the end of ``new_kv`` or ``kv_cache`` so that the
            rows it reads cannot be broadcast to the rows it writes (other out-of-contract
            slices are not detected).
    """
    new_kv = np.asarray(new_kv)
    slices = np.asarray(slices)
    out = np.array(kv_cache, copy=True)
    num = int(np.asarray(num_kv_update_slices).reshape(-1)[0])
    for i in range(min(num, slices.shape[1])):
        dst, src, length = (int(x) for x in slices[:, i])
        if length > 0:
            out[dst : dst + length] = new_kv[src : src + length]
    return out


def scatter_tokens(cache: np.ndarray, slots: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Returns a copy of ``cache`` with ``values[i]`` written to row ``slots[i]``.

    Args:
        cache: dtype[num_slots, ...].
        slots: int[N] slot ids (later duplicates win, as in a loop).
        values: dtype[N, ...], cast to ``cache``'s dtype.

    Returns:
        dtype[num_slots, ...]: the updated copy.

    Raises:
        ValueError: ``slots`` and ``values`` differ in length.
        IndexError: a slot is out of range.
    """
    out = np.array(cache, copy=True)
    for slot, value in zip(np.asarray(slots).tolist(), np.asarray(values), strict=True):
        out[slot] = value
    return out


def gather_tokens(cache: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Returns ``cache[slots]``: the rows read at the given token slots.

    Args:
        cache: dtype[num_slots, ...], e.g. dtype[num_pages * page_size, combined_heads,
            head_dim].
        slots: int[N] slot ids in ``[-num_slots, num_slots)`` (numpy indexing: negative ids
            count from the end).

    Returns:
        dtype[N, ...]: a new array (fancy indexing copies).

    Raises:
        IndexError: a slot is out of range.
    """
    return np.asarray(cache)[np.asarray(slots)]


def slices_to_slots(slices: np.ndarray, num_kv_update_slices: np.ndarray | int) -> np.ndarray:
    """Expands live slices into one destination slot per token of ``new_kv``.

    Returns int64[T] where ``T`` is the number of tokens the live slices cover, in ``new_kv``
    order, so ``scatter_tokens(cache, slots, new_kv[:T])`` equals :func:`kv_cache_update` for
    slices that pack ``new_kv`` contiguously from 0.

    Args:
        slices: int[3, S], rows (kv_cache_start, new_kv_start, slice_len).
        num_kv_update_slices: int[1] array (or an int): the number of live slices.

    Returns:
        int64[T]: destination slot of each covered ``new_kv`` row, in row order. Never raises
        for int[3, S] ``slices``.
    """
    slices = np.asarray(slices)
    num = int(np.asarray(num_kv_update_slices).reshape(-1)[0])
    pairs: list[tuple[int, int]] = []
    for i in range(min(num, slices.shape[1])):
        dst, src, length = (int(x) for x in slices[:, i])
        pairs.extend((src + j, dst + j) for j in range(length))
    pairs.sort()
    return np.array([dst for _, dst in pairs], dtype=np.int64)


def paged_attention(
    q: np.ndarray,
    keys: list[np.ndarray],
    values: list[np.ndarray],
    q_lens: np.ndarray | list[int],
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    sinks: np.ndarray | None = None,
    chunk_size: int | None = None,
    q_scale: float | None = None,
    q_dtype: str | None = None,
) -> np.ndarray:
    """Ragged causal attention in float64 from each request's dense K/V history.

    The semantics of JAX's ``ref_ragged_paged_attention``, written from the dense history
    rather than from pages: request ``i`` holds ``n_i = len(keys[i])`` tokens, of which the
    last ``q_lens[i]`` are this step's queries, packed request by request in ``q``. Query
    ``j`` of request ``i`` sits at position ``p = n_i - q_lens[i] + j`` and attends keys at
    positions ``k`` with ``k <= p`` and, with a window ``W``, ``k > p - W``; with chunked
    local attention of chunk ``C`` (Llama 4), ``k >= C * (p // C)``. Scores are
    ``sm_scale · q·k``, soft-capped as ``soft_cap · tanh(s / soft_cap)``. Query head ``h``
    attends KV head ``h // (Hq // H)``. With attention sinks (gpt-oss), query head ``h`` adds
    ``exp(sinks[h])`` to its softmax denominator: weights ``exp(s_j) / (exp(sinks[h]) +
    Σ_k exp(s_k))``, computed with every exponent shifted by ``max(max_k s_k, sinks[h])``.
    With a q scale (tpu-inference's RPA v3 ``q_scale``), q is first stored as a quantized
    cache stores a value, ``quantize(q, q_scale, q_dtype)``, and read back as ``stored ·
    q_scale`` (in float64), so the scores are ``sm_scale · q_scale · stored·k``.

    Args:
        q: float[T, Hq, D]; rows past ``sum(q_lens)`` are padding.
        keys: per request, float[n_i, H, D].
        values: per request, float[n_i, H, Dv] (Dv = D but for MLA's latent values).
        q_lens: int[B], with ``q_lens[i] <= n_i``.
        sm_scale: softmax scale.
        sliding_window: W >= 1, or None for full causal attention.
        soft_cap: logit soft cap (non-zero), or None.
        sinks: float[Hq] attention-sink logits (-inf: none for that head), or None.
        chunk_size: C >= 1 for chunked local attention, or None.
        q_scale: per-tensor q scale, or None (q used as is); needs ``q_dtype``.
        q_dtype: the quantized dtype q is stored in with ``q_scale`` (the cache's dtype).

    Returns:
        float64[T, Hq, Dv]; padding rows are zero.

    Raises:
        ValueError: ``Hq`` is not a multiple of ``H``, a request has more queries than
            tokens, ``q`` has fewer rows than ``sum(q_lens)``, or ``sinks`` is not [Hq].
    """
    if q_scale is not None:
        q = quantize(q, q_scale, q_dtype).astype(np.float64) * q_scale  # type: ignore[arg-type]
    q = np.asarray(q, np.float64)
    value_dim = np.shape(values[0])[-1] if len(values) else q.shape[-1]
    out = np.zeros((*q.shape[:-1], value_dim))
    if sinks is not None:
        sinks = np.asarray(sinks, np.float64)
        if sinks.shape != (q.shape[1],):
            raise ValueError(f"sinks has shape {sinks.shape}, not [{q.shape[1]}] (query heads)")
    start = 0
    for key, value, q_len in zip(keys, values, np.asarray(q_lens).tolist(), strict=True):
        key, value = np.asarray(key, np.float64), np.asarray(value, np.float64)
        n, heads = key.shape[0], key.shape[1]
        if q.shape[1] % heads:
            raise ValueError(f"{q.shape[1]} query heads are not a multiple of {heads} KV heads")
        if q_len > n:
            raise ValueError(f"a request has {q_len} queries but only {n} tokens")
        if start + q_len > q.shape[0]:
            raise ValueError(f"q has {q.shape[0]} rows, fewer than the queries' {start + q_len}")
        group = q.shape[1] // heads
        k = np.repeat(key, group, axis=1)  # [n, Hq, D]
        v = np.repeat(value, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", q[start : start + q_len], k) * sm_scale
        if soft_cap is not None:
            scores = soft_cap * np.tanh(scores / soft_cap)
        q_pos = n - q_len + np.arange(q_len)[:, None]
        k_pos = np.arange(n)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        if chunk_size is not None:
            allowed &= k_pos >= q_pos // chunk_size * chunk_size
        scores = np.where(allowed[None], scores, -np.inf)
        top = scores.max(axis=-1, keepdims=True)  # [Hq, q, 1]
        if sinks is not None:
            top = np.maximum(top, sinks[:, None, None])
        weights = np.exp(scores - top)
        denom = weights.sum(axis=-1, keepdims=True)
        if sinks is not None:
            denom = denom + np.exp(sinks[:, None, None] - top)
        weights /= denom
        out[start : start + q_len] = np.einsum("hqk,khd->qhd", weights, v)
        start += q_len
    return out


def mla_attention(
    q_latent: np.ndarray,
    q_rope: np.ndarray,
    c_kv: list[np.ndarray],
    k_pe: list[np.ndarray],
    q_lens: np.ndarray | list[int],
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    sinks: np.ndarray | None = None,
) -> np.ndarray:
    """Multi-head latent attention (DeepSeek-V2/V3) in its absorbed form, float64.

    Every query head attends the same per-token latent: score of query head ``h`` against
    token ``k`` is ``sm_scale · (q_latent[h]·c_kv[k] + q_rope[h]·k_pe[k])`` and the output is
    ``Σ_k w_hk c_kv[k]``, in latent space (the model applies W_UV). Masking, windows, soft
    cap and sinks are :func:`paged_attention`'s.

    Args:
        q_latent: float[T, Hq, R] queries already multiplied by W_UK (R = kv_lora_rank).
        q_rope: float[T, Hq, Dr] rope parts of the queries (Dr = qk_rope_head_dim).
        c_kv: per request, float[n_i, R] compressed latents.
        k_pe: per request, float[n_i, Dr] rope keys.
        q_lens, sm_scale, sliding_window, soft_cap, sinks: as :func:`paged_attention`.

    Returns:
        float64[T, Hq, R]; padding rows are zero.
    """
    q = np.concatenate([np.asarray(q_latent, np.float64), np.asarray(q_rope, np.float64)], -1)
    keys = [
        np.concatenate([np.asarray(c, np.float64), np.asarray(p, np.float64)], -1)[:, None]
        for c, p in zip(c_kv, k_pe, strict=True)
    ]
    values = [np.asarray(c, np.float64)[:, None] for c in c_kv]
    return paged_attention(
        q,
        keys,
        values,
        q_lens,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        sinks=sinks,
    )
