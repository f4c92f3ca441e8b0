"""Counting XLA compilations in a test, through JAX's own compile log (no private names)."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

import jax


class CompileLog(logging.Handler):
    """The messages JAX logs while ``jax.log_compiles`` is on."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def count(self, function: str) -> int:
        """Compilations of the jitted function named ``function``."""
        pattern = re.compile(rf"Compiling jit\({re.escape(function)}\)")
        return sum(bool(pattern.search(m)) for m in self.messages)


@contextlib.contextmanager
def compile_log() -> Iterator[CompileLog]:
    handler = CompileLog()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield handler
    finally:
        logger.removeHandler(handler)


def export_update_attention_scan(spec, mesh, q_shape, k_shape, *, latent=False):
    """jax.export for TPU of a step's lax.scan over every layer: the Pallas update kernel
    writes k (v = k, or None for a latent cache), then xla/auto attention reads; the cache is
    donated. Two requests of 20 and 3 tokens on a 64-page pool of 16-token pages. Returns
    (exported, the step's num_tokens_padded)."""
    import jax.numpy as jnp

    import kvshard

    cache = kvshard.abstract_cache(spec, mesh, platform="tpu")
    alloc = kvshard.PageAllocator(64, 16, max_requests=8, max_pages_per_request=8)
    alloc.allocate_batch([0, 1], [20, 3])
    step = jax.tree.map(jnp.asarray, kvshard.build_step(alloc, [0, 1], [20, 3]))
    tokens = step.num_tokens_padded
    options = kvshard.BackendOptions(interpret=False)

    def serve(cache, q, k, step):
        def layer(cache, i):
            v = None if latent else k
            cache = kvshard.update(cache, i, k, v, step, backend="pallas", options=options)
            return cache, kvshard.attention(cache, i, q, step, sm_scale=0.1)

        return jax.lax.scan(layer, cache, jnp.arange(spec.num_layers))

    q = jnp.zeros((tokens, *q_shape), jnp.bfloat16)
    k = jnp.zeros((tokens, *k_shape), jnp.bfloat16)
    exported = jax.export.export(jax.jit(serve, donate_argnums=0), platforms=["tpu"])(
        cache, q, k, step
    )
    return exported, tokens


def ops_writing(text: str, result_type: str) -> set[str]:
    """The ops of an MLIR module ``text`` whose result has type ``result_type``."""
    ops = set()
    for line in text.splitlines():
        result = line.split("->")[-1] if "->" in line else ""
        if result_type in result:
            match = re.search(r"=\s*\"?([\w.]+)", line)
            if match:
                ops.add(match.group(1))
    return ops
