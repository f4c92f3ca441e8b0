"""The HTTP server of ``kvshard serve``: an OpenAI-compatible completions API (Starlette).

Routes: ``POST /v1/completions`` (OpenAI's request and response shape, server-sent events
with ``stream``), ``GET /health``, ``GET /v1/models``, ``GET /metrics`` (Prometheus text).
Handlers never touch the device: they validate the request (:func:`parse_completion`), submit
it to the :class:`~kvshard.server.loop.EngineLoop` and await its events on an
``asyncio.Queue`` the engine thread feeds with ``call_soon_threadsafe``. A request whose client
goes away (a stream cut, a cancelled response) is aborted: its pages are freed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from kvshard.server.engine import SamplingParams, TokenEvent
from kvshard.server.loop import EngineLoop, Failed

__all__ = ["BadRequest", "Completion", "ServerInfo", "create_app", "parse_completion"]


class BadRequest(ValueError):
    """A request the server refuses: ``param`` is the field (None for the body itself)."""

    def __init__(self, message: str, param: str | None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status


def error_response(err: BadRequest) -> JSONResponse:
    body = {
        "error": {
            "message": str(err),
            "type": "invalid_request_error" if err.status < 500 else "server_error",
            "param": err.param,
            "code": None,
        }
    }
    return JSONResponse(body, status_code=err.status)


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """What the handlers know of the model: its name, vocabulary and context, its tokenizer
    (a ``tokenizers.Tokenizer`` or None) and the most samples one request may ask for."""

    model_name: str
    vocab_size: int
    max_model_len: int
    max_n: int
    tokenizer: Any = None


@dataclasses.dataclass(frozen=True)
class Completion:
    """A validated completion request."""

    prompt_token_ids: list[int]
    params: SamplingParams
    stop_strings: tuple[str, ...]
    stream: bool
    model: str


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f"{name} must be a number, got {value!r}", name)
    if not low <= value <= high:
        raise BadRequest(f"{name}={value!r} must be in [{low}, {high}]", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise BadRequest(f"{name} must be an integer, got {value!r}", name)
    if not low <= value <= high:
        raise BadRequest(f"{name}={value} must be in [{low}, {high}]", name)
    return int(value)


def parse_completion(body: Any, info: ServerInfo) -> Completion:
    """Validates an OpenAI completions request body.

    Raises:
        BadRequest: naming the field, the value and the bound.
    """
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", None)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list | str):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if info.tokenizer is None:
            raise BadRequest(
                "prompt: a string prompt needs a tokenizer.json in the checkpoint folder; "
                "send a list of token ids",
                "prompt",
            )
        ids = list(info.tokenizer.encode(prompt).ids)
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        ids = list(prompt)
    else:
        raise BadRequest(
            "prompt must be a non-empty list of token ids or a string, got "
            f"{json.dumps(prompt)[:80]}",
            "prompt",
        )
    if not ids:
        raise BadRequest("prompt is empty after tokenization", "prompt")
    bad = [t for t in ids if not 0 <= t < info.vocab_size]
    if bad:
        raise BadRequest(
            f"prompt holds token id {bad[0]} outside the vocabulary [0, {info.vocab_size})",
            "prompt",
        )
    max_tokens = _integer(body, "max_tokens", 16, 1, 2**31 - 1)
    assert max_tokens is not None
    if len(ids) >= info.max_model_len:
        raise BadRequest(
            f"prompt has {len(ids)} tokens; this model's maximum context length is "
            f"{info.max_model_len} tokens",
            "prompt",
        )
    if len(ids) + max_tokens > info.max_model_len:
        raise BadRequest(
            f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) = {len(ids) + max_tokens} "
            f"exceeds this model's maximum context length of {info.max_model_len} tokens",
            "max_tokens",
        )
    n = _integer(body, "n", 1, 1, info.max_n)
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str | int) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) or _is_int(s) for s in stops):
        raise BadRequest("stop must be a string, a token id or a list of them", "stop")
    stop_ids = [s for s in stops if _is_int(s)]
    extra_ids = body.get("stop_token_ids") or []
    if not isinstance(extra_ids, list) or not all(_is_int(s) for s in extra_ids):
        raise BadRequest("stop_token_ids must be a list of token ids", "stop_token_ids")
    stop_ids += extra_ids
    if any(not 0 <= s < info.vocab_size for s in stop_ids):
        raise BadRequest(f"stop holds a token id outside [0, {info.vocab_size})", "stop")
    stop_strings = tuple(s for s in stops if isinstance(s, str))
    if any(not s for s in stop_strings):
        raise BadRequest("stop strings must not be empty", "stop")
    if stop_strings and info.tokenizer is None:
        raise BadRequest("stop strings need a tokenizer.json; give token ids", "stop")
    for flag in ("stream", "ignore_eos"):
        if not isinstance(body.get(flag, False), bool):
            raise BadRequest(f"{flag} must be a boolean, got {body[flag]!r}", flag)
    top_k = _integer(body, "top_k", 0, -1, 2**31 - 1)
    seed = _integer(body, "seed", None, -(2**63), 2**64 - 1)
    model = body.get("model", info.model_name)
    if not isinstance(model, str):
        raise BadRequest(f"model must be a string, got {model!r}", "model")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 100.0),
        top_k=top_k or 0,
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        seed=seed,
        n=n or 1,
        stop_token_ids=tuple(stop_ids),
        ignore_eos=bool(body.get("ignore_eos", False)),
    )
    return Completion(ids, params, stop_strings, bool(body.get("stream", False)), model)


class _Choice:
    """One sample's output as the client sees it: ids, text (with a tokenizer), stop strings."""

    def __init__(self, index: int, info: ServerInfo, stops: tuple[str, ...]) -> None:
        self.index, self.info, self.stops = index, info, stops
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None

    def add(self, token: int) -> tuple[list[int], str]:
        """Appends a token; returns (new ids, new text) to send."""
        if self.finish_reason is not None:
            return [], ""
        self.token_ids.append(token)
        tok = self.info.tokenizer
        if tok is None:
            return [token], ""
        full = tok.decode(self.token_ids, skip_special_tokens=True)
        for stop in self.stops:
            at = full.find(stop, max(0, len(self.text) - len(stop)))
            if at >= 0:
                full, self.finish_reason = full[:at], "stop"
        delta, self.text = full[len(self.text) :], full
        return [token], delta


class _Server:
    def __init__(self, loop: EngineLoop, info: ServerInfo) -> None:
        self.loop, self.info = loop, info
        self.ids = itertools.count()

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        card = {
            "id": self.info.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "kvshard",
            "max_model_len": self.info.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def metrics(self, request: Request) -> Response:
        m = self.loop.metrics
        lines = []
        for name, kind, help_text, value in (
            ("num_requests_running", "gauge", "Sequences running", m["num_requests_running"]),
            ("num_requests_waiting", "gauge", "Sequences waiting", m["num_requests_waiting"]),
            ("num_requests_swapped", "gauge", "Waiting, swapped out", m["num_requests_swapped"]),
            ("kv_cache_usage_perc", "gauge", "Fraction of pages owned", m["kv_cache_usage"]),
            (
                "prefix_cache_queries_total",
                "counter",
                "Tokens looked up",
                m["prefix_cache_queries"],
            ),
            ("prefix_cache_hits_total", "counter", "Tokens found cached", m["prefix_cache_hits"]),
            ("prefix_cache_hit_rate", "gauge", "hits / queries", m["prefix_cache_hit_rate"]),
            ("num_preemptions_total", "counter", "Preemptions", m["num_preemptions"]),
            ("generation_tokens_total", "counter", "Tokens generated", m["generation_tokens"]),
            ("prompt_tokens_total", "counter", "Prompt tokens received", m["prompt_tokens"]),
            ("request_success_total", "counter", "Requests accepted", m["requests"]),
        ):
            lines += [
                f"# HELP kvshard_{name} {help_text}.",
                f"# TYPE kvshard_{name} {kind}",
                f"kvshard_{name} {float(value)!r}",
            ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def completions(self, request: Request) -> Response:
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise BadRequest(f"the request body is not valid JSON: {err}", None) from None
            completion = parse_completion(body, self.info)
        except BadRequest as err:
            return error_response(err)
        req_id = f"cmpl-{next(self.ids)}"
        aio = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()

        def sink(event: Any) -> None:  # called on the engine thread
            aio.call_soon_threadsafe(events.put_nowait, event)

        self.loop.submit(req_id, completion.prompt_token_ids, completion.params, sink)
        first = await events.get()
        if isinstance(first, Failed):
            return error_response(_refusal(first.error))
        choices = [
            _Choice(i, self.info, completion.stop_strings) for i in range(completion.params.n)
        ]
        head = {
            "id": req_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": completion.model,
        }
        if completion.stream:
            return StreamingResponse(
                self._stream(req_id, events, choices, head), media_type="text/event-stream"
            )
        try:
            async for _ in self._events(req_id, events, choices):
                pass
        except RuntimeError as err:  # the engine failed: a server error, the server goes on
            return error_response(BadRequest(str(err), None, status=500))
        finally:
            if any(c.finish_reason is None for c in choices):
                self.loop.abort(req_id)
        prompt_tokens = len(completion.prompt_token_ids)
        generated = sum(len(c.token_ids) for c in choices)
        body = {
            **head,
            "choices": [
                {
                    "index": c.index,
                    "text": c.text,
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                    "token_ids": c.token_ids,
                }
                for c in choices
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": generated,
                "total_tokens": prompt_tokens + generated,
            },
        }
        return JSONResponse(body)

    async def _events(
        self, req_id: str, events: asyncio.Queue, choices: list[_Choice]
    ) -> AsyncIterator[tuple[_Choice, list[int], str]]:
        """(choice, new ids, new text) until every choice finished (or the request failed)."""
        while any(c.finish_reason is None for c in choices):
            event = await events.get()
            if isinstance(event, Failed):
                raise RuntimeError(f"the engine failed: {event.error}")
            assert isinstance(event, TokenEvent)
            if event.finished is not None:
                for c, reason in zip(choices, event.finished, strict=True):
                    if c.finish_reason is None:
                        c.finish_reason = reason
                        yield c, [], ""
                return
            choice = choices[event.index]
            ids, text = choice.add(event.token)
            if ids:
                yield choice, ids, text
            if all(c.finish_reason is not None for c in choices):  # stop strings
                self.loop.abort(req_id)

    async def _stream(
        self, req_id: str, events: asyncio.Queue, choices: list[_Choice], head: dict
    ) -> AsyncIterator[str]:
        try:
            async for choice, ids, text in self._events(req_id, events, choices):
                chunk = {
                    **head,
                    "choices": [
                        {
                            "index": choice.index,
                            "text": text,
                            "logprobs": None,
                            "finish_reason": choice.finish_reason,
                            "token_ids": ids,
                        }
                    ],
                }
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or the engine failed): free the pages
            if any(c.finish_reason is None for c in choices):
                self.loop.abort(req_id)


def _refusal(error: Exception) -> BadRequest:
    """The engine's ValueError as a 400 naming the request field it is about."""
    text = str(error)
    for prefix, param in (
        ("prompt_token_ids", "prompt"),
        ("max_new_tokens", "max_tokens"),
        ("stop_token_ids", "stop"),
        ("n=", "n"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
    ):
        if text.startswith(prefix):
            return BadRequest(text.replace("max_new_tokens", "max_tokens"), param)
    return BadRequest(text, None)


def create_app(loop: EngineLoop, info: ServerInfo) -> Starlette:
    """The Starlette application serving ``loop``'s engine."""
    server = _Server(loop, info)
    return Starlette(
        routes=[
            Route("/health", server.health, methods=["GET"]),
            Route("/v1/models", server.models, methods=["GET"]),
            Route("/metrics", server.metrics, methods=["GET"]),
            Route("/v1/completions", server.completions, methods=["POST"]),
        ]
    )
