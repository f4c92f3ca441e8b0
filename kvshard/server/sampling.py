"""Token sampling on the device: greedy, temperature, top-k and top-p, seeded per request.

:func:`sample_tokens` is plain ``jnp`` (traceable inside any jitted step); :func:`sample_rows`
is the small jitted sampler the engine calls on a step's logits, gathering the rows to sample
on the device so that only the sampled ids come back to the host.

Reproducibility: the random key of one sampled token is ``fold_in(fold_in(key(seed), sample
index), tokens generated so far)``, a function of the request alone, so a seeded request
draws the same tokens whatever it is batched with, preempted or recomputed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["sample_rows", "sample_tokens"]


def sample_tokens(logits, temperature, top_k, top_p, seeds, counters):
    """One token id per row of ``logits``.

    Args:
        logits: float[S, V].
        temperature: float32[S]; 0 samples greedily (argmax of ``logits``), else the logits
            are divided by it.
        top_k: int32[S]; keep the k most likely tokens; <= 0 keeps all.
        top_p: float32[S] in (0, 1]; keep the smallest set of most likely tokens (after
            top-k) whose probability reaches it (the most likely one always kept).
        seeds: uint32[S] the request's seed.
        counters: int32[S, 2] (sample index, tokens generated so far) folded into the key.

    Returns:
        int32[S] the sampled ids.
    """
    x = logits.astype(jnp.float32)
    vocab = x.shape[-1]
    greedy = jnp.argmax(x, axis=-1).astype(jnp.int32)
    x = x / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    ordered = -jnp.sort(-x, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    ordered = jnp.where(jnp.arange(vocab)[None] < k[:, None], ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
    kept = jnp.maximum(jnp.sum((before < top_p[:, None]) & (probs > 0), axis=-1), 1)
    threshold = jnp.take_along_axis(ordered, (kept - 1)[:, None], axis=-1)
    x = jnp.where(x >= threshold, x, -jnp.inf)

    def draw(seed, counter, row):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), counter[0]), counter[1])
        return jax.random.categorical(key, row)

    drawn = jax.vmap(draw)(seeds, counters, x).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


@jax.jit
def sample_rows(logits, rows, temperature, top_k, top_p, seeds, counters):
    """:func:`sample_tokens` at ``rows`` of a step's logits, on the device.

    Args:
        logits: float[G, T, V] a step's logits (G page pools).
        rows: int32[G, S] token indices to sample at (padding rows sample anything).
        temperature, top_k, top_p, seeds: [G, S] as in :func:`sample_tokens`.
        counters: int32[G, S, 2].

    Returns:
        int32[G, S].
    """
    G, S = rows.shape
    picked = jnp.take_along_axis(logits, rows[:, :, None], axis=1)  # [G, S, V]
    flat = lambda a: a.reshape(G * S, *a.shape[2:])
    out = sample_tokens(
        flat(picked), flat(temperature), flat(top_k), flat(top_p), flat(seeds), flat(counters)
    )
    return out.reshape(G, S)
