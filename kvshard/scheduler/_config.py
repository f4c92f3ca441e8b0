"""The scheduler's policies: :class:`SchedulerConfig`, one validated, frozen object."""

from __future__ import annotations

import dataclasses
from typing import Literal

PreemptionMode = Literal["swap", "recompute"]
VictimOrder = Literal["latest_arrival", "fewest_tokens"]


def _int_at_least(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"SchedulerConfig: {name}={value!r} must be an int >= {minimum}")
    return value


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Every scheduling policy of :class:`~kvshard.Scheduler`, as vLLM's v1 scheduler has them.

    Attributes:
        max_num_batched_tokens: the token budget of one step (vLLM's
            ``max_num_batched_tokens``): prompt chunks, decodes and draft tokens together;
            int >= 1.
        max_num_seqs: the sequence budget: sequences running at once (each of a request's
            ``n`` samples counts), and so at most the rows of one step; int >= 1, at most the
            allocator's ``max_requests``.
        enable_chunked_prefill: a prompt (or a recompute) longer than what is left of the
            token budget is computed in chunks over several steps; without it a sequence is
            scheduled only whole, so every request's ``prompt + max_new_tokens - 1`` must fit
            the token budget (checked when it is added).
        long_prefill_token_threshold: None, or the most tokens one sequence's prefill chunk
            may take in a step (vLLM's option of that name; needs chunked prefill): a long
            prompt then leaves budget for others to be admitted and decode beside it.
        decode_first: spend the budget on decoding sequences before prefills (vLLM's v1
            scheduler serves running requests in arrival order; decode first keeps
            inter-token latency flat under long prompts). Either way, newly admitted requests
            come after every running one.
        preemption_mode: ``"swap"``: preempt to the allocator's host tier when it has one,
            :meth:`~kvshard.PageAllocator.swap_out_frees` says the swap frees pages, and the
            host has room; otherwise (and always with ``"recompute"``) free the sequence and
            compute its tokens again when it is re-admitted (the prefix cache may serve them).
        victim_order: which running sequence is preempted first when the pool runs out:
            ``"latest_arrival"`` (vLLM's order) or ``"fewest_tokens"`` (the one cheapest to
            recompute). Only sequences that arrived after the one needing pages are victims
            (it preempts itself otherwise), so the oldest sequence always progresses.
        max_model_len: None, or the model's context in tokens; a request's ``prompt +
            max_new_tokens`` must fit it and the allocator's ``max_pages_per_request *
            page_size``.
        vocab_size: None, or the vocabulary size: prompt, stop and draft token ids must be in
            ``[0, vocab_size)`` (else only >= 0).
        max_spec_tokens: most draft tokens a sequence may propose for one step; int >= 0.
        token_buckets: None, or increasing token counts (``kvshard.token_buckets``) to pad
            each step's token axis to (:func:`kvshard.padded_token_count`); None pads to the
            next power of two >= 16. A step's ``max_num_seqs`` is always this config's.
    """

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int | None = None
    decode_first: bool = True
    preemption_mode: PreemptionMode = "swap"
    victim_order: VictimOrder = "latest_arrival"
    max_model_len: int | None = None
    vocab_size: int | None = None
    max_spec_tokens: int = 0
    token_buckets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _int_at_least("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _int_at_least("max_num_seqs", self.max_num_seqs, 1)
        _int_at_least("max_spec_tokens", self.max_spec_tokens, 0)
        for name in ("max_model_len", "vocab_size", "long_prefill_token_threshold"):
            if getattr(self, name) is not None:
                _int_at_least(name, getattr(self, name), 1)
        for name in ("enable_chunked_prefill", "decode_first"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SchedulerConfig: {name}={getattr(self, name)!r} must be a bool")
        if self.preemption_mode not in ("swap", "recompute"):
            raise ValueError(
                f"SchedulerConfig: preemption_mode={self.preemption_mode!r} must be 'swap' or "
                "'recompute'"
            )
        if self.victim_order not in ("latest_arrival", "fewest_tokens"):
            raise ValueError(
                f"SchedulerConfig: victim_order={self.victim_order!r} must be 'latest_arrival' "
                "or 'fewest_tokens'"
            )
        if self.token_buckets is not None:
            buckets = tuple(self.token_buckets)
            if not buckets or any(
                isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets
            ):
                raise ValueError(
                    f"SchedulerConfig: token_buckets={self.token_buckets!r} must be None or "
                    "ints >= 1"
                )
            if buckets[-1] < self.max_num_batched_tokens:
                raise ValueError(
                    f"SchedulerConfig: token_buckets={buckets} ends below "
                    f"max_num_batched_tokens={self.max_num_batched_tokens}"
                )
            object.__setattr__(self, "token_buckets", buckets)
