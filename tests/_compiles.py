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
