"""kvshard.server.sampling: greedy, temperature, top-k, top-p, seeds, against NumPy."""

from __future__ import annotations

import jax
import numpy as np

from kvshard.server.sampling import sample_rows, sample_tokens

V = 8


def _draw(logits, temperature=1.0, top_k=0, top_p=1.0, seed=0, rows=None):
    S = len(logits)
    full = lambda v, dtype: np.full(S, v, dtype)
    counters = np.stack([np.zeros(S, np.int32), np.arange(S, dtype=np.int32)], -1)
    fn = jax.jit(sample_tokens)
    return np.asarray(
        fn(
            np.asarray(logits, np.float32),
            full(temperature, np.float32),
            full(top_k, np.int32),
            full(top_p, np.float32),
            full(seed, np.uint32),
            counters,
        )
    )


def _logits(rows=4000):
    base = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005]))
    perm = np.random.default_rng(0).permutation(V)  # the order must not matter
    # token t has probability base[ranked[t]]: ranked[j] is the j-th most likely token
    return np.broadcast_to(base[perm], (rows, V)), np.argsort(perm)


def test_temperature_zero_is_argmax():
    logits = np.random.default_rng(1).standard_normal((64, V))
    assert (_draw(logits, temperature=0.0) == logits.argmax(-1)).all()
    assert (_draw(logits, temperature=0.7, top_k=1) == logits.argmax(-1)).all()
    assert (_draw(logits, temperature=0.7, top_p=1e-6) == logits.argmax(-1)).all()


def test_sampled_frequencies_follow_softmax_top_k_and_top_p():
    logits, ranked = _logits()
    probs = np.exp(logits[0]) / np.exp(logits[0]).sum()
    freq = lambda ids: np.bincount(ids, minlength=V) / len(ids)
    # plain: within 4 standard errors of the softmax (4000 draws)
    tol = 4 * np.sqrt(probs * (1 - probs) / len(logits)) + 1e-3
    assert (np.abs(freq(_draw(logits)) - probs) <= tol).all()
    # top-k 2: only the two most likely, renormalised
    ids = _draw(logits, top_k=2)
    top2 = ranked[:2]
    assert set(np.unique(ids)) <= set(top2.tolist())
    assert abs(freq(ids)[ranked[0]] - 0.4 / 0.65) < 0.04
    # top-p 0.7: the smallest set reaching 0.7 is {0.4, 0.25, 0.15} (0.65 < 0.7)
    assert set(np.unique(_draw(logits, top_p=0.7))) == set(ranked[:3].tolist())
    # temperature 0.25 sharpens: the most likely token dominates
    assert freq(_draw(logits, temperature=0.25))[ranked[0]] > 0.8


def test_seeds_reproduce_and_differ():
    logits, _ = _logits(256)
    a, b = _draw(logits, seed=7), _draw(logits, seed=7)
    assert (a == b).all()
    assert (a != _draw(logits, seed=8)).any()


def test_sample_rows_gathers_per_pool_rows():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((2, 5, V)).astype(np.float32)
    rows = np.array([[4, 0, 2], [1, 1, 3]], np.int32)
    z = np.zeros((2, 3))
    out = sample_rows(
        logits,
        rows,
        z.astype(np.float32),
        z.astype(np.int32),
        np.ones((2, 3), np.float32),
        z.astype(np.uint32),
        np.zeros((2, 3, 2), np.int32),
    )
    expected = np.take_along_axis(logits, rows[..., None], 1).argmax(-1)
    assert (np.asarray(out) == expected).all()
