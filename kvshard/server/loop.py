"""The engine's background thread: :class:`EngineLoop`.

All device work runs in one thread that owns the :class:`~kvshard.server.engine.Engine`;
other threads (the HTTP server's event loop) talk to it only through a thread-safe command
queue (:meth:`EngineLoop.submit`, :meth:`EngineLoop.abort`) and get their events back through
the callback each submission gives (called from the engine thread: the server's callback
hands the event to its event loop with ``call_soon_threadsafe``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from kvshard.server.engine import Engine, SamplingParams, TokenEvent

__all__ = ["Accepted", "EngineLoop", "Failed"]

log = logging.getLogger("kvshard.server")


class Accepted:
    """First event of a submission the engine queued."""


class Failed:
    """First (and last) event of a submission the engine refused, or of one cut short by an
    engine error: ``error`` is the exception."""

    def __init__(self, error: Exception) -> None:
        self.error = error


Sink = Callable[[Any], None]


class EngineLoop:
    """Runs ``engine`` in a daemon thread until :meth:`stop`.

    ``sink(event)`` of a submission receives :class:`Accepted` or :class:`Failed` first, then
    the request's :class:`~kvshard.server.engine.TokenEvent` in order, the last one with
    ``finished`` set (none after an abort).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.Queue[tuple] = queue.Queue()
        self._sinks: dict[Hashable, Sink] = {}
        self._stopped = threading.Event()
        self.metrics: dict[str, float] = engine.metrics()
        """The engine's metrics after its last step (a new dict each time: safe to read)."""
        self._thread = threading.Thread(target=self._run, name="kvshard-engine", daemon=True)

    def start(self) -> EngineLoop:
        """Starts the engine thread; returns self."""
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the engine thread after its current step (live requests get no more events)."""
        self._stopped.set()
        self._commands.put(("wake",))
        self._thread.join(timeout)

    def submit(
        self, req_id: Hashable, prompt: Sequence[int], params: SamplingParams, sink: Sink
    ) -> None:
        """Queues a request; ``sink`` gets :class:`Accepted` or :class:`Failed` (the engine's
        ValueError naming the field) first, then its events."""
        self._commands.put(("add", req_id, list(prompt), params, sink))

    def abort(self, req_id: Hashable) -> None:
        """Queues an abort: the request's pages are freed before the next step; no more
        events reach its sink."""
        self._commands.put(("abort", req_id))

    def call(self, fn: Callable[[Engine], Any], timeout: float = 60.0) -> Any:
        """Runs ``fn(engine)`` on the engine thread between steps; returns its result."""
        done: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self._commands.put(("call", fn, done))
        ok, value = done.get(timeout=timeout)
        if not ok:
            raise value
        return value

    # ------------------------------------------------------------------ engine thread

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, req_id, prompt, params, sink = command
            try:
                self.engine.add_request(req_id, prompt, params)
            except (ValueError, TypeError) as err:
                sink(Failed(err))
                return
            self._sinks[req_id] = sink
            sink(Accepted())
        elif kind == "abort":
            self._sinks.pop(command[1], None)
            self.engine.abort(command[1])
        elif kind == "call":
            _, fn, done = command
            try:
                done.put((True, fn(self.engine)))
            except Exception as err:  # handed to the caller
                done.put((False, err))

    def _dispatch(self, events: list[TokenEvent]) -> None:
        for event in events:
            sink = self._sinks.get(event.req_id)
            if sink is None:
                continue
            if event.finished is not None:
                del self._sinks[event.req_id]
            sink(event)

    def _run(self) -> None:
        while not self._stopped.is_set():
            busy = self.engine.has_unfinished_requests()
            try:
                command = self._commands.get(timeout=None if not busy else 0)
            except queue.Empty:
                command = None
            while command is not None:
                self._handle(command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if self._stopped.is_set() or not self.engine.has_unfinished_requests():
                self.metrics = self.engine.metrics()
                continue
            try:
                events = self.engine.step()
            except Exception as err:  # fail every live request, keep serving new ones
                log.exception("engine step failed")
                for req_id, sink in list(self._sinks.items()):
                    self.engine.abort(req_id)
                    sink(Failed(err))
                self._sinks.clear()
                events = []
            self._dispatch(events)
            self.metrics = self.engine.metrics()
