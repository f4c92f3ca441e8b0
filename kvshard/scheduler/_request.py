"""A client's request (:class:`GenerationRequest`), a finished one (:class:`FinishedRequest`)
and the scheduler's record of one sample of a request (:class:`Sequence`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """What a client asks for; :meth:`kvshard.Scheduler.add_request` validates it.

    Attributes:
        req_id: any hashable not in use by a live request of the scheduler.
        prompt_token_ids: int[P] the prompt, P >= 1, ids >= 0 (below the config's
            ``vocab_size`` when it has one).
        max_new_tokens: tokens to generate per sample at most; int >= 1.
        stop_token_ids: ids that end a sample (the stop token is part of its output).
        namespace: the prefix-cache namespace (str, bytes or None) of the allocator's
            :meth:`~kvshard.PageAllocator.lookup_prefix`: only pages committed under the same
            namespace are shared.
        n: parallel samples; the prompt is computed once and forked (copy-on-write) into ``n``
            sequences when its first tokens are sampled; int >= 1.
    """

    req_id: Hashable
    prompt_token_ids: Any
    max_new_tokens: int
    stop_token_ids: tuple[int, ...] = ()
    namespace: str | bytes | None = None
    n: int = 1


@dataclasses.dataclass(frozen=True)
class FinishedRequest:
    """A request all of whose samples finished.

    Attributes:
        req_id: the request's id.
        token_ids: one tuple of generated ids per sample, sample ``i`` at index ``i``.
        finish_reasons: per sample, ``"stop"`` (a stop token, included in its ids) or
            ``"length"`` (``max_new_tokens`` reached).
    """

    req_id: Hashable
    token_ids: tuple[tuple[int, ...], ...]
    finish_reasons: tuple[str, ...]


class Sequence:
    """One sample of a request as the scheduler tracks it (``seq_id = (req_id, index)``).

    ``tokens`` is the prompt and every token generated so far; ``computed`` of them have their
    KV in the allocator's pages (the allocator holds exactly ``computed`` tokens for it while
    it runs). Before its fork a request's first sequence has ``width = n`` (it reserves the
    rows of its siblings); after it, 1.
    """

    __slots__ = (
        "arrival",
        "computed",
        "draft",
        "finish_reason",
        "num_prompt",
        "request",
        "seq_id",
        "state",
        "tokens",
        "width",
    )

    def __init__(self, request: GenerationRequest, index: int, tokens: list[int], arrival: int):
        self.request = request
        self.seq_id: tuple[Hashable, int] = (request.req_id, index)
        self.tokens = tokens
        self.num_prompt = len(np.asarray(request.prompt_token_ids))
        self.computed = 0
        self.arrival = arrival
        self.width = request.n if index == 0 else 1
        self.draft: list[int] = []
        self.state = "waiting"  # waiting | running | swapped | finished
        self.finish_reason: str | None = None

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt

    def sort_key(self) -> tuple[int, int]:
        return (self.arrival, self.seq_id[1])
