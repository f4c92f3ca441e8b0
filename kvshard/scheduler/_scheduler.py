"""The public :class:`Scheduler`: continuous batching over one :class:`~kvshard.PageAllocator`.

It owns its policies (:class:`~kvshard.SchedulerConfig`) and the sequences of every live
request; the allocator is the caller's (one per page pool) and the scheduler is its only
writer while it runs. Each :meth:`Scheduler.schedule` grows the allocator for one step and
returns a :class:`~kvshard.SchedulerOutput`; :meth:`Scheduler.update` takes the sampled
tokens back.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Iterable
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np

from kvshard.allocator import OutOfPages, PageAllocator
from kvshard.metadata import padded_token_count
from kvshard.scheduler._config import SchedulerConfig
from kvshard.scheduler._output import SchedulerOutput
from kvshard.scheduler._request import FinishedRequest, GenerationRequest, Sequence
from kvshard.step import build_step

SeqId = tuple[Hashable, int]


class _Planned:
    """One scheduled sequence of the pending step: its tokens and its sample entries."""

    __slots__ = ("count", "draft", "seq", "start", "stop")

    def __init__(self, seq: Sequence, count: int, draft: list[int]) -> None:
        self.seq, self.count, self.draft = seq, count, draft
        self.start = self.stop = 0  # [start, stop) of the step's sample entries


class Scheduler:
    """Continuous batching over a :class:`~kvshard.PageAllocator`, independent of any model.

    One step of a serving loop::

        out = scheduler.schedule()
        # device: swap_out, swap_in, copy_pages, then the forward with out.token_ids, out.step
        tokens = sample(logits[out.sample_rows])  # one id per out.sample_seq_ids entry
        for done in scheduler.update(out, tokens):
            ...  # done.token_ids, done.finish_reasons

    :meth:`schedule` serves running sequences first (decodes first with ``decode_first``),
    within the token budget (chunking prompts with ``enable_chunked_prefill``); grows them
    with one ``allocate_batch`` and, when the pool runs out, grows them one by one in arrival
    order, preempting (swap or recompute, see :class:`~kvshard.SchedulerConfig`) sequences that
    arrived later. Unless it preempted, it then admits waiting sequences in arrival order:
    swapped ones are swapped in, new or recomputed ones first attach their cached prefix
    (``lookup_prefix``, with prefix caching) and allocate the rest. Admission is first come,
    first served: the first that does not fit stops it. A request of ``n > 1`` samples is
    computed once and forked when its prompt is done; each fork then grows with copy-on-write.
    Draft tokens (:meth:`propose`) are verified greedily in :meth:`update` (a draft is accepted
    while it equals the token sampled before it) and the rejected ones rolled back
    (``truncate``). With prefix caching every computed full page is committed under the
    request's namespace.

    Args:
        allocator: the pool's :class:`~kvshard.PageAllocator`; the scheduler names its
            sequences ``(req_id, sample index)`` in it.
        config: the policies; default ``SchedulerConfig()``.

    Raises:
        ValueError: ``config.max_num_seqs`` exceeds the allocator's ``max_requests``.
    """

    def __init__(self, allocator: PageAllocator, config: SchedulerConfig | None = None) -> None:
        config = SchedulerConfig() if config is None else config
        if not isinstance(config, SchedulerConfig):
            raise TypeError(f"config must be a SchedulerConfig, got {type(config).__name__}")
        if config.max_num_seqs > allocator.max_requests:
            raise ValueError(
                f"Scheduler: config.max_num_seqs={config.max_num_seqs} exceeds the allocator's "
                f"max_requests={allocator.max_requests} (one page-table row per sequence)"
            )
        self.allocator = allocator
        self.config = config
        limit = allocator.max_pages_per_request * allocator.page_size
        self.max_model_len = min(limit, config.max_model_len or limit)
        """Longest request, ``prompt + max_new_tokens``: the config's bound and the pool's."""
        self._requests: dict[Hashable, list[Sequence]] = {}
        self._running: list[Sequence] = []
        self._waiting: list[Sequence] = []  # waiting and swapped, in arrival order
        self._clock = 0
        self._pending: tuple[SchedulerOutput, list[_Planned]] | None = None
        self.stats = {"preempted_swap": 0, "preempted_recompute": 0, "tokens_generated": 0}
        """Cumulative counters: preemptions by swap and by recompute, tokens generated."""

    # ------------------------------------------------------------------ queries

    @property
    def num_running(self) -> int:
        """Sequences holding device pages and schedulable now."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for admission: new, preempted for recompute, or swapped out."""
        return len(self._waiting)

    @property
    def num_swapped(self) -> int:
        """Waiting sequences that are swapped out to the host tier."""
        return sum(s.state == "swapped" for s in self._waiting)

    def has_unfinished_requests(self) -> bool:
        """Whether any request is live (not finished and not aborted)."""
        return bool(self._requests)

    def __contains__(self, req_id: object) -> bool:
        try:
            return req_id in self._requests
        except TypeError:
            return False

    # ------------------------------------------------------------- requests

    def _check_ids(self, name: str, ids: np.ndarray) -> None:
        if ids.size and ids.min() < 0:
            raise ValueError(f"{name} holds {int(ids.min())}: token ids must be >= 0")
        vocab = self.config.vocab_size
        if vocab is not None and ids.size and ids.max() >= vocab:
            raise ValueError(
                f"{name} holds {int(ids.max())}: token ids must be below vocab_size={vocab}"
            )

    def _int_ids(self, name: str, value: Any, *, min_size: int) -> np.ndarray:
        ids = np.asarray(value)
        if ids.ndim != 1 or ids.size < min_size or (ids.size and ids.dtype.kind not in "iu"):
            raise ValueError(
                f"{name} must be a 1-D integer sequence of length >= {min_size}, got "
                f"{ids.dtype}{list(ids.shape)}"
            )
        self._check_ids(name, ids)
        return ids.astype(np.int64)

    def _pages(self, num_tokens: int) -> int:
        return -(-num_tokens // self.allocator.page_size)

    def add_request(self, request: GenerationRequest) -> None:
        """Queues a request for admission; check-then-commit.

        Raises:
            ValueError: naming the field, its value and the bound: ``req_id`` live already;
                ``prompt_token_ids`` not a non-empty 1-D integer sequence or an id out of
                range (``stop_token_ids`` likewise); ``max_new_tokens`` or ``n`` not an
                int >= 1; ``prompt + max_new_tokens`` past :attr:`max_model_len`; without
                chunked prefill, ``prompt + max_new_tokens - 1`` past the token budget; ``n``
                past ``max_num_seqs``, or ``n`` samples that could not all fit the pool at
                their longest (the prompt's full pages shared, the rest each its own).
                Nothing changes then.
            TypeError: ``request`` is not a GenerationRequest, or its id is not hashable.
        """
        if not isinstance(request, GenerationRequest):
            raise TypeError(f"request must be a GenerationRequest, got {type(request).__name__}")
        req_id = request.req_id
        hash(req_id)
        if req_id in self._requests:
            raise ValueError(f"req_id={req_id!r} is already a live request")
        prompt = self._int_ids("prompt_token_ids", request.prompt_token_ids, min_size=1)
        stops = self._int_ids("stop_token_ids", list(request.stop_token_ids), min_size=0)
        for name in ("max_new_tokens", "n"):
            value = getattr(request, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        if request.namespace is not None and not isinstance(request.namespace, str | bytes):
            raise ValueError(f"namespace={request.namespace!r} must be str, bytes or None")
        total = len(prompt) + int(request.max_new_tokens)
        if total > self.max_model_len:
            raise ValueError(
                f"prompt_token_ids ({len(prompt)} tokens) + max_new_tokens="
                f"{request.max_new_tokens} = {total} exceeds max_model_len={self.max_model_len}"
            )
        budget = self.config.max_num_batched_tokens
        if not self.config.enable_chunked_prefill and total - 1 > budget:
            raise ValueError(
                f"prompt_token_ids ({len(prompt)} tokens) + max_new_tokens - 1 = {total - 1} "
                f"exceeds max_num_batched_tokens={budget} without chunked prefill"
            )
        n = int(request.n)
        if n > self.config.max_num_seqs:
            raise ValueError(f"n={n} exceeds max_num_seqs={self.config.max_num_seqs}")
        shared = len(prompt) // self.allocator.page_size
        worst = shared + n * (self._pages(total) - shared)
        if worst > self.allocator.num_pages - 1:
            raise ValueError(
                f"n={n} samples of {total} tokens need up to {worst} pages, more than the "
                f"pool's {self.allocator.num_pages - 1}"
            )
        request = GenerationRequest(
            req_id,
            prompt,
            int(request.max_new_tokens),
            tuple(int(t) for t in stops),
            request.namespace,
            n,
        )
        seq = Sequence(request, 0, prompt.tolist(), self._clock)
        self._clock += 1
        self._requests[req_id] = [seq]
        self._waiting.append(seq)  # the latest arrival: the end of the arrival order

    def abort(self, req_id: Hashable) -> bool:
        """Drops a live request and frees its pages; returns whether it was live.

        Between :meth:`schedule` and :meth:`update` too: the step's tokens for it are then
        ignored (its pages, freed, are reused only by the next :meth:`schedule`).
        """
        seqs = self._requests.pop(req_id, None)
        if seqs is None:
            return False
        for seq in seqs:
            if seq.state in ("running", "swapped") or (
                seq.state == "waiting" and seq.seq_id in self.allocator
            ):
                self.allocator.free(seq.seq_id)
            seq.state = "aborted"
        self._running = [s for s in self._running if s.state == "running"]
        self._waiting = [s for s in self._waiting if s.state in ("waiting", "swapped")]
        return True

    def propose(self, seq_id: SeqId, draft_token_ids: Seq[int] | np.ndarray) -> None:
        """Sets draft tokens (speculative decoding) for a sequence's next decode step.

        They are computed after its last token in the next step that decodes it (fewer if
        the budget or ``max_new_tokens`` leave less room) and verified by :meth:`update`.

        Raises:
            ValueError: the sequence is not live; the drafts are more than
                ``max_spec_tokens`` or an id is out of range. Nothing changes then.
        """
        seq = self._sequence(seq_id)
        draft = self._int_ids("draft_token_ids", draft_token_ids, min_size=0)
        if len(draft) > self.config.max_spec_tokens:
            raise ValueError(
                f"draft_token_ids has {len(draft)} tokens, more than max_spec_tokens="
                f"{self.config.max_spec_tokens}"
            )
        seq.draft = draft.tolist()

    def _sequence(self, seq_id: SeqId) -> Sequence:
        try:
            req_id, index = seq_id
            seqs = self._requests[req_id]
        except (TypeError, ValueError, KeyError):
            raise ValueError(f"seq_id={seq_id!r} is not a live sequence") from None
        found = [s for s in seqs if s.seq_id[1] == index and s.state != "finished"]
        if not found:
            raise ValueError(f"seq_id={seq_id!r} is not a live sequence")
        return found[0]

    # ------------------------------------------------------------- scheduling

    def schedule(self) -> SchedulerOutput:
        """Plans and allocates one step; see the class docstring for the policies.

        Returns:
            The step's :class:`~kvshard.SchedulerOutput` (possibly empty: no sequences).

        Raises:
            RuntimeError: the previous step was not passed to :meth:`update` yet.
        """
        if self._pending is not None:
            raise RuntimeError("schedule: update() the previous step's tokens first")
        preempted = [0]
        self._running.sort(key=Sequence.sort_key)
        plan = self._plan_running()
        plan = self._allocate_running(plan, preempted)
        budget = self.config.max_num_batched_tokens - sum(p.count for p in plan)
        if not preempted[0]:
            plan += self._admit(budget)
        return self._emit(plan, preempted[0])

    def _plan_running(self) -> list[_Planned]:
        """Token counts of the running sequences within the budget, vectorized over them."""
        running, cfg = self._running, self.config
        if not running:
            return []
        lens = np.fromiter((len(s.tokens) for s in running), np.int64, len(running))
        computed = np.fromiter((s.computed for s in running), np.int64, len(running))
        left = np.fromiter(
            (s.request.max_new_tokens - s.num_generated for s in running), np.int64, len(running)
        )
        drafts = np.fromiter((len(s.draft) for s in running), np.int64, len(running))
        decoding = lens - computed == 1
        single = np.fromiter((s.width == 1 for s in running), bool, len(running))
        drafts = np.where(decoding & single, np.minimum(drafts, left - 1), 0)  # not pre-fork
        wants = lens - computed + drafts
        cap = cfg.long_prefill_token_threshold
        if cap is not None and cfg.enable_chunked_prefill:
            wants = np.where(decoding, wants, np.minimum(wants, cap))
        order = np.argsort(~decoding, kind="stable") if cfg.decode_first else np.arange(len(lens))
        wants_ordered = wants[order]
        before = np.cumsum(wants_ordered) - wants_ordered
        budget = cfg.max_num_batched_tokens
        if cfg.enable_chunked_prefill:
            counts = np.clip(budget - before, 0, wants_ordered)
        else:  # whole sequences only, up to the first that does not fit
            fits = np.cumsum(wants_ordered) <= budget
            counts = np.where(np.cumsum(~fits) == 0, wants_ordered, 0)
        plan = []
        for i in np.flatnonzero(counts):
            seq, count = running[order[i]], int(counts[i])
            extra = count - (lens[order[i]] - computed[order[i]])  # draft tokens that fit
            plan.append(_Planned(seq, count, seq.draft[: max(int(extra), 0)]))
        for seq in running:
            seq.draft = []
        return plan

    def _allocate_running(self, plan: list[_Planned], preempted: list[int]) -> list[_Planned]:
        """Grows the planned sequences; when the pool runs out, one by one in arrival order,
        preempting later arrivals (or the sequence itself when none is left)."""
        if not plan:
            return plan
        try:
            self.allocator.allocate_batch([p.seq.seq_id for p in plan], [p.count for p in plan])
            return plan
        except OutOfPages:
            pass
        done: list[_Planned] = []
        for item in sorted(plan, key=lambda p: p.seq.sort_key()):
            seq = item.seq
            while seq.state == "running":
                try:
                    self.allocator.allocate(seq.seq_id, item.count)
                except OutOfPages:
                    victim = self._victim(seq, {p.seq.seq_id for p in done})
                    self._preempt(victim if victim is not None else seq)
                    preempted[0] += 1
                else:
                    done.append(item)
                    break
        return done

    def _victim(self, seq: Sequence, grown: set[SeqId]) -> Sequence | None:
        """The sequence to preempt for ``seq``: one that arrived later, not grown this step,
        running or swapped out (a swapped one keeps its shared and cached device pages)."""
        key = seq.sort_key()
        candidates = [
            s
            for s in (*self._running, *self._waiting)
            if s.state in ("running", "swapped") and s.sort_key() > key and s.seq_id not in grown
        ]
        if not candidates:
            return None
        if self.config.victim_order == "fewest_tokens":
            return min(candidates, key=lambda s: (s.computed, -s.arrival, -s.seq_id[1]))
        return max(candidates, key=Sequence.sort_key)

    def _preempt(self, seq: Sequence) -> None:
        """Swaps ``seq`` out when the policy, the host tier and the gain allow; else frees it
        for recompute. Either way it waits for re-admission in arrival order."""
        alloc = self.allocator
        if (
            seq.state == "running"
            and self.config.preemption_mode == "swap"
            and alloc.num_host_pages
        ):
            frees = alloc.swap_out_frees(seq.seq_id)
            if 0 < frees <= alloc.num_free_host_pages:
                try:
                    alloc.swap_out_request(seq.seq_id)
                except (ValueError, OutOfPages):  # a page this step's copies read: recompute
                    pass
                else:
                    self._requeue(seq, "swapped")
                    self.stats["preempted_swap"] += 1
                    return
        alloc.free(seq.seq_id)
        seq.computed = 0
        self._requeue(seq, "waiting")
        self.stats["preempted_recompute"] += 1

    def _requeue(self, seq: Sequence, state: str) -> None:
        if seq.state == "running":
            self._running.remove(seq)
        else:
            self._waiting.remove(seq)
        seq.state, seq.draft = state, []
        keys = [s.sort_key() for s in self._waiting]
        self._waiting.insert(bisect.bisect(keys, seq.sort_key()), seq)

    def _admit(self, budget: int) -> list[_Planned]:
        """Admits waiting sequences in arrival order while seats, rows, pages and budget
        allow; returns the scheduled ones."""
        alloc, cfg = self.allocator, self.config
        seats = sum(s.width for s in self._running)
        rows = seats + sum(s.width for s in self._waiting if s.state == "swapped")
        plan: list[_Planned] = []
        admitted = 0
        for seq in self._waiting:
            if seats + seq.width > cfg.max_num_seqs:
                break
            if seq.state == "swapped":
                try:
                    alloc.swap_in_request(seq.seq_id)
                except (OutOfPages, ValueError):
                    break
            else:
                if rows + seq.width > alloc.max_requests or budget <= 0:
                    break
                if alloc.enable_prefix_caching:
                    seq.computed = alloc.lookup_prefix(
                        seq.seq_id, seq.tokens, seq.request.namespace
                    )
                count = self._chunk(len(seq.tokens) - seq.computed, budget)
                if not count or not self._grow(seq, count):
                    if seq.seq_id in alloc:
                        alloc.free(seq.seq_id)  # undoes the lookup
                    seq.computed = 0
                    break
                rows += seq.width
                plan.append(_Planned(seq, count, []))
                budget -= count
            admitted += 1
            seats += seq.width
            seq.state = "running"
            self._running.append(seq)
            if plan and plan[-1].seq is seq:
                continue
            count = self._chunk(len(seq.tokens) - seq.computed, budget)  # a swapped-in one
            if count and self._grow(seq, count):  # else it runs from the next step
                plan.append(_Planned(seq, count, []))
                budget -= count
        del self._waiting[:admitted]
        return plan

    def _grow(self, seq: Sequence, count: int) -> bool:
        try:
            self.allocator.allocate(seq.seq_id, count)
        except OutOfPages:
            return False
        return True

    def _chunk(self, remaining: int, budget: int) -> int:
        if self.config.enable_chunked_prefill:
            cap = self.config.long_prefill_token_threshold
            if cap is not None and remaining > 1:
                budget = min(budget, cap)
            return max(0, min(remaining, budget))
        return remaining if remaining <= budget else 0

    def _emit(self, plan: list[_Planned], num_preempted: int) -> SchedulerOutput:
        alloc = self.allocator
        ids = tuple(p.seq.seq_id for p in plan)
        counts = np.array([p.count for p in plan], np.int32)
        swap_out, swap_in = alloc.take_pending_swaps()
        copies = alloc.take_pending_copies()
        buckets = self.config.token_buckets
        padded = None if buckets is None else padded_token_count(int(counts.sum()), buckets)
        step = build_step(
            alloc, ids, counts, num_tokens_padded=padded, max_num_seqs=self.config.max_num_seqs
        )
        token_ids = np.zeros(step.num_tokens_padded, np.int32)
        rows: list[np.ndarray] = []
        sample_ids: list[SeqId] = []
        cu = step.cu_q_lens
        for i, item in enumerate(plan):
            seq = item.seq
            inputs = seq.tokens[seq.computed : seq.computed + item.count] + item.draft
            token_ids[cu[i] : cu[i] + item.count] = inputs[: item.count]
            item.start = len(sample_ids)
            last = seq.computed + item.count - len(item.draft)  # tokens known after the step
            if last == len(seq.tokens):  # the last known token and every draft are sampled
                first = cu[i + 1] - 1 - len(item.draft)
                if seq.width > 1:
                    rows.append(np.full(seq.width, first, np.int32))
                    sample_ids += [(seq.request.req_id, j) for j in range(seq.width)]
                else:
                    rows.append(np.arange(first, cu[i + 1], dtype=np.int32))
                    sample_ids += [seq.seq_id] * (len(item.draft) + 1)
            item.stop = len(sample_ids)
        output = SchedulerOutput(
            step=step,
            token_ids=token_ids,
            seq_ids=ids,
            num_scheduled_tokens=counts,
            swap_out_pairs=swap_out,
            swap_in_pairs=swap_in,
            copy_pairs=copies,
            sample_rows=np.concatenate(rows) if rows else np.zeros(0, np.int32),
            sample_seq_ids=tuple(sample_ids),
            num_preempted=num_preempted,
        )
        self._pending = (output, plan)
        return output

    # ----------------------------------------------------------------- update

    def update(
        self, output: SchedulerOutput, sampled_token_ids: Iterable[int] | np.ndarray
    ) -> list[FinishedRequest]:
        """Takes the step's sampled tokens back; returns the requests that finished.

        Each sequence gets its sampled token; a sequence with drafts gets the token sampled
        after its last known token, then, while the draft before it was accepted (equal to
        the token sampled at its row), the next one: the rejected drafts' pages are truncated.
        A sample ends at a stop token (kept) or at ``max_new_tokens``; a finished sequence's
        pages are freed. With prefix caching, each sequence's computed full pages are
        committed.

        Args:
            output: the :class:`~kvshard.SchedulerOutput` of the last :meth:`schedule`.
            sampled_token_ids: int[S], one id per ``output.sample_seq_ids`` entry.

        Returns:
            The :class:`~kvshard.FinishedRequest` of each request whose last sample finished.

        Raises:
            ValueError: ``output`` is not the pending step's, or the ids are not int[S] in
                range. Nothing changes then.
        """
        if self._pending is None or self._pending[0] is not output:
            raise ValueError("update: output is not the last schedule()'s pending step")
        sampled = self._int_ids("sampled_token_ids", list(sampled_token_ids), min_size=0)
        if len(sampled) != len(output.sample_seq_ids):
            raise ValueError(
                f"sampled_token_ids has {len(sampled)} ids for "
                f"{len(output.sample_seq_ids)} sample_seq_ids"
            )
        plan = self._pending[1]
        self._pending = None
        done: list[Sequence] = []
        for item in plan:
            seq = item.seq
            if seq.state != "running":  # aborted after schedule()
                continue
            seq.computed += item.count
            tokens = sampled[item.start : item.stop].tolist()
            if tokens and seq.width > 1:
                done += self._fork(seq, tokens)
            elif tokens:
                for j, token in enumerate(tokens):
                    if self._append(seq, token):
                        done.append(seq)
                        break
                    if j == len(item.draft) or token != item.draft[j]:
                        break
            if seq.state == "running":
                if seq.computed > len(seq.tokens) - 1:  # rejected drafts
                    seq.computed = len(seq.tokens) - 1
                    self.allocator.truncate(seq.seq_id, seq.computed)
                self._commit(seq)
        return self._finish(done)

    def _append(self, seq: Sequence, token: int) -> bool:
        """Appends a generated token; returns whether the sequence finished with it."""
        seq.tokens.append(token)
        self.stats["tokens_generated"] += 1
        if token in seq.request.stop_token_ids:
            seq.finish_reason = "stop"
        elif seq.num_generated >= seq.request.max_new_tokens:
            seq.finish_reason = "length"
        return seq.finish_reason is not None

    def _fork(self, parent: Sequence, tokens: list[int]) -> list[Sequence]:
        """The prompt of an ``n > 1`` request is done: fork it into its ``n`` samples."""
        request, prompt = parent.request, parent.tokens
        parent.width = 1
        children = [
            Sequence(request, i, list(prompt), parent.arrival) for i in range(1, len(tokens))
        ]
        done = []
        for child, token in zip(children, tokens[1:], strict=True):
            child.width, child.computed = 1, parent.computed
            self._requests[request.req_id].append(child)
            if self._append(child, token):
                child.state = "finishing"
                done.append(child)
            else:
                self.allocator.fork(parent.seq_id, child.seq_id)
                child.state = "running"
                self._running.append(child)
        if self._append(parent, tokens[0]):
            done.append(parent)
        return done

    def _commit(self, seq: Sequence) -> None:
        if self.allocator.enable_prefix_caching:
            self.allocator.commit_prefix(
                seq.seq_id, seq.tokens[: seq.computed], seq.request.namespace
            )

    def _finish(self, done: list[Sequence]) -> list[FinishedRequest]:
        finished_ids = []
        for seq in done:
            if seq.state == "running":
                self.allocator.free(seq.seq_id)
            seq.state = "finished"
            finished_ids.append(seq.request.req_id)
        if done:
            self._running = [s for s in self._running if s.state == "running"]
        out = []
        for req_id in dict.fromkeys(finished_ids):
            seqs = self._requests[req_id]
            if all(s.state == "finished" for s in seqs) and len(seqs) == seqs[0].request.n:
                del self._requests[req_id]
                seqs.sort(key=lambda s: s.seq_id[1])
                out.append(
                    FinishedRequest(
                        req_id,
                        tuple(tuple(s.tokens[s.num_prompt :]) for s in seqs),
                        tuple(str(s.finish_reason) for s in seqs),
                    )
                )
        return out
