"""kvshard.Scheduler: each policy on its own, then a hypothesis state machine that drives it
against a plain model of what every request must generate.

The device is simulated in numpy (:class:`FakeDevice`): a cache of token ids, one slot per
position, that applies the step's swaps and copies in the documented order and writes each
step's input ids through its page table; the "model" reads a sampled row's context back from
that cache and emits a hash of (sequence id, context). A page table that points at the wrong
page, a lost swap or copy, or a token packed at the wrong place changes the context and so
every later token; the expected tokens come from the prompt alone (:func:`expected`).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import kvshard
from kvshard import GenerationRequest, PageAllocator, Scheduler, SchedulerConfig

VOCAB = 6


def next_token(seq_id, context) -> int:
    """The fake model's greedy token after ``context`` for sample ``seq_id``."""
    digest = hashlib.blake2b(repr((seq_id, [int(t) for t in context])).encode(), digest_size=4)
    return int.from_bytes(digest.digest(), "little") % VOCAB


def expected(req: GenerationRequest) -> tuple[tuple[int, ...], ...]:
    """What each sample of ``req`` must generate, computed from its prompt alone."""
    out = []
    for i in range(req.n):
        context, generated = list(req.prompt_token_ids), []
        while len(generated) < req.max_new_tokens:
            token = next_token((req.req_id, i), context)
            context.append(token)
            generated.append(token)
            if token in req.stop_token_ids:
                break
        out.append(tuple(generated))
    return tuple(out)


class FakeDevice:
    """A cache of token ids in numpy: ``kv[page, slot]``, the host tier likewise."""

    def __init__(self, alloc: PageAllocator) -> None:
        self.page_size = alloc.page_size
        self.kv = np.full((alloc.num_pages, alloc.page_size), -1, np.int64)
        self.host = np.full((max(alloc.num_host_pages, 1), alloc.page_size), -1, np.int64)

    def run(self, out: kvshard.SchedulerOutput) -> list[int]:
        """Applies one step and returns the fake model's token for every sample entry."""
        for device_page, host_page in out.swap_out_pairs:
            self.host[host_page] = self.kv[device_page]
        for device_page, host_page in out.swap_in_pairs:
            self.kv[device_page] = self.host[host_page]
        if len(out.copy_pairs):
            src, dst = out.copy_pairs[:, 0], out.copy_pairs[:, 1]
            self.kv[dst] = self.kv[src].copy()
        step, ps = out.step, self.page_size
        cu, table = step.cu_q_lens, step.page_indices
        num_seqs = int(step.num_seqs[0])
        assert num_seqs == len(out.seq_ids)
        for i in range(num_seqs):
            pos = step.positions[cu[i] : cu[i + 1]]
            self.kv[table[i, pos // ps], pos % ps] = out.token_ids[cu[i] : cu[i + 1]]
        tokens = []
        for row, seq_id in zip(out.sample_rows, out.sample_seq_ids, strict=True):
            i = int(np.searchsorted(cu[: num_seqs + 1], row, side="right")) - 1
            ctx = np.arange(step.positions[row] + 1)
            context = self.kv[table[i, ctx // ps], ctx % ps]
            assert (context >= 0).all(), f"{seq_id} reads a slot never written: {context}"
            tokens.append(next_token(seq_id, context))
        return tokens


def drive(sched: Scheduler, device: FakeDevice, max_steps: int = 500) -> dict:
    """Steps until every request finishes; returns req_id -> FinishedRequest."""
    done = {}
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return done
        out = sched.schedule()
        for fin in sched.update(out, device.run(out)):
            done[fin.req_id] = fin
        sched.allocator.check_invariants()
    raise AssertionError(f"not finished within {max_steps} steps")


def make(
    num_pages=32, page_size=4, max_requests=8, max_pages=8, host=0, prefix=False, **config
) -> tuple[Scheduler, FakeDevice]:
    alloc = PageAllocator(
        num_pages,
        page_size,
        max_requests=max_requests,
        max_pages_per_request=max_pages,
        enable_prefix_caching=prefix,
        num_host_pages=host,
    )
    config.setdefault("max_num_seqs", max_requests)
    config.setdefault("vocab_size", VOCAB)
    return Scheduler(alloc, SchedulerConfig(**config)), FakeDevice(alloc)


def req(rid, prompt, new=4, **kw) -> GenerationRequest:
    return GenerationRequest(rid, list(prompt), max_new_tokens=new, **kw)


# ------------------------------------------------------------------ config and refusals


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_num_batched_tokens", 0),
        ("max_num_seqs", True),
        ("preemption_mode", "drop"),
        ("victim_order", "random"),
        ("max_spec_tokens", -1),
        ("token_buckets", (8,)),
    ],
)
def test_config_refuses_a_bad_field_naming_it(field, value):
    with pytest.raises(ValueError, match=f"{field}="):
        SchedulerConfig(**{"max_num_batched_tokens": 16, field: value})


def test_config_max_num_seqs_past_the_allocators_rows_is_refused():
    alloc = PageAllocator(8, 4, max_requests=2, max_pages_per_request=2)
    with pytest.raises(ValueError, match=r"max_num_seqs=3 exceeds .* max_requests=2"):
        Scheduler(alloc, SchedulerConfig(max_num_seqs=3))


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (req("r", [1, 9]), "prompt_token_ids holds 9: .* below vocab_size=6"),
        (req("r", [1, -1]), "prompt_token_ids holds -1"),
        (req("r", []), "prompt_token_ids must be a 1-D integer sequence of length >= 1"),
        (req("r", [1], stop_token_ids=(7,)), "stop_token_ids holds 7"),
        (req("r", [1], new=0), "max_new_tokens=0 must be an int >= 1"),
        (req("r", [1] * 30, new=3), "= 33 exceeds max_model_len=32"),
        (
            req("r", [1] * 9, new=4, n=3),
            "n=3 samples of 13 tokens need up to 8 pages, more than the pool's 7",
        ),
        (req("r", [1], n=5), "n=5 exceeds max_num_seqs=4"),
        (req("r", [1], namespace=3), "namespace=3 must be str, bytes or None"),
    ],
)
def test_add_request_refuses_naming_field_value_and_bound(request_, match):
    sched, _ = make(num_pages=8, max_requests=4)
    before = sched.allocator.checksum()
    with pytest.raises(ValueError, match=match):
        sched.add_request(request_)
    assert not sched.has_unfinished_requests() and sched.num_waiting == 0
    assert sched.allocator.checksum() == before


def test_add_request_without_chunked_prefill_refuses_past_the_budget():
    sched, _ = make(max_num_batched_tokens=8, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="= 9 exceeds max_num_batched_tokens=8"):
        sched.add_request(req("r", [1] * 6, new=4))
    with pytest.raises(ValueError, match="already a live request"):
        sched.add_request(req("s", [1]))
        sched.add_request(req("s", [2]))


def test_update_refuses_a_wrong_count_and_changes_nothing():
    sched, device = make()
    sched.add_request(req("a", [1, 2, 3]))
    out = sched.schedule()
    with pytest.raises(ValueError, match="sampled_token_ids has 2 ids for 1"):
        sched.update(out, [1, 2])
    with pytest.raises(RuntimeError, match="update"):
        sched.schedule()
    sched.update(out, device.run(out))
    assert drive(sched, device)["a"].token_ids == expected(req("a", [1, 2, 3]))


# ------------------------------------------------------------------------- policies


def test_chunked_prefill_splits_a_prompt_over_the_token_budget():
    sched, device = make(max_num_batched_tokens=4)
    sched.add_request(req("a", [1, 2, 3, 4, 5, 0, 1, 2, 3, 4]))
    counts = []
    for _ in range(3):
        out = sched.schedule()
        counts.append(out.num_scheduled_tokens.tolist())
        assert len(out.sample_rows) == (counts[-1] == [2])
        sched.update(out, device.run(out))
    assert counts == [[4], [4], [2]]


def test_long_prefill_threshold_and_decode_first():
    for decode_first, order in ((True, [("b", 0), ("a", 0)]), (False, [("a", 0), ("b", 0)])):
        sched, device = make(
            max_num_batched_tokens=3, long_prefill_token_threshold=2, decode_first=decode_first
        )
        sched.add_request(req("a", [1] * 5))
        sched.add_request(req("b", [2]))
        out = sched.schedule()  # a's chunk is capped at 2, which leaves b its 1 token
        assert out.seq_ids == (("a", 0), ("b", 0))
        assert out.num_scheduled_tokens.tolist() == [2, 1]
        sched.update(out, device.run(out))
        out = sched.schedule()  # b decodes, a prefills its next chunk: who is served first
        assert list(out.seq_ids) == order
        sched.update(out, device.run(out))
        assert set(drive(sched, device)) == {"a", "b"}


def test_sequence_budget_caps_running_sequences():
    sched, device = make(max_num_seqs=2)
    for rid in "abc":
        sched.add_request(req(rid, [1, 2]))
    out = sched.schedule()
    assert out.seq_ids == (("a", 0), ("b", 0)) and sched.num_waiting == 1
    sched.update(out, device.run(out))
    assert set(drive(sched, device)) == set("abc")


def test_prefix_cache_aware_admission_computes_only_the_rest():
    sched, device = make(prefix=True, page_size=4)
    prompt = [1, 2, 3, 4, 5, 0, 1, 2, 3]
    sched.add_request(req("a", prompt, namespace="t1"))
    drive(sched, device)
    sched.add_request(req("b", prompt, namespace="t1"))
    sched.add_request(req("c", prompt, namespace="t2"))  # another namespace: no hit
    out = sched.schedule()
    assert dict(zip(out.seq_ids, out.num_scheduled_tokens.tolist(), strict=True)) == {
        ("b", 0): 1,
        ("c", 0): 9,
    }
    sched.update(out, device.run(out))
    done = drive(sched, device)
    assert done["b"].token_ids == expected(req("b", prompt))
    assert sched.allocator.usage == 0


def test_recompute_preemption_of_the_latest_arrival_keeps_outputs():
    sched, device = make(num_pages=7, page_size=2, max_pages=6, max_num_batched_tokens=16)
    requests = [req(r, [1, 2, 3], new=8) for r in "abc"]
    for r in requests:
        sched.add_request(r)
    preempted = 0
    done = {}
    while sched.has_unfinished_requests():
        out = sched.schedule()
        preempted += out.num_preempted
        done.update({f.req_id: f for f in sched.update(out, device.run(out))})
    assert preempted and sched.stats["preempted_recompute"] == preempted
    assert sched.stats["preempted_swap"] == 0
    for r in requests:
        assert done[r.req_id].token_ids == expected(r)
    assert sched.allocator.usage == 0 and len(sched.allocator) == 0


def test_swap_preemption_moves_pages_to_the_host_and_back():
    sched, device = make(num_pages=7, page_size=2, max_pages=6, host=16)
    requests = [req(r, [1, 2, 3], new=8) for r in "abc"]
    for r in requests:
        sched.add_request(r)
    swapped_out = swapped_in = 0
    done = {}
    while sched.has_unfinished_requests():
        out = sched.schedule()
        swapped_out += len(out.swap_out_pairs)
        swapped_in += len(out.swap_in_pairs)
        done.update({f.req_id: f for f in sched.update(out, device.run(out))})
    assert sched.stats["preempted_swap"] > 0 and swapped_out >= swapped_in > 0
    for r in requests:
        assert done[r.req_id].token_ids == expected(r)


def test_recompute_mode_never_swaps_even_with_a_host_tier():
    sched, device = make(
        num_pages=7, page_size=2, max_pages=6, host=16, preemption_mode="recompute"
    )
    for r in "abc":
        sched.add_request(req(r, [1, 2, 3], new=8))
    drive(sched, device)
    assert sched.stats["preempted_swap"] == 0 and sched.stats["preempted_recompute"] > 0
    assert sched.allocator.tier_stats["swapped_out_pages"] == 0


def test_fork_shares_the_prompt_and_copies_its_partial_page_on_write():
    sched, device = make(page_size=4)
    r = req("a", [1, 2, 3, 4, 5, 0], new=3, n=3)
    sched.add_request(r)
    out = sched.schedule()
    assert out.sample_seq_ids == (("a", 0), ("a", 1), ("a", 2))
    assert len(set(out.sample_rows.tolist())) == 1  # one prompt, three samples of it
    sched.update(out, device.run(out))
    alloc = sched.allocator
    assert alloc.pages(("a", 1))[0] == alloc.pages(("a", 0))[0]  # shared full page
    out = sched.schedule()
    assert len(out.copy_pairs) == 2  # two of three sharers of the partial page copy it
    sched.update(out, device.run(out))
    assert drive(sched, device)["a"].token_ids == expected(r)


def test_rejected_draft_tokens_are_rolled_back():
    sched, device = make(max_spec_tokens=3)
    r = req("a", [1, 2, 3], new=8)
    want = expected(r)[0]
    sched.add_request(r)
    out = sched.schedule()
    sched.update(out, device.run(out))  # the first token
    sched.propose(("a", 0), [want[1], (want[2] + 1) % VOCAB, want[3]])  # 1 right, then wrong
    out = sched.schedule()
    assert out.num_scheduled_tokens.tolist() == [4] and len(out.sample_rows) == 4
    sched.update(out, device.run(out))
    assert sched.allocator.num_tokens(("a", 0)) == 3 + 3 - 1  # prompt, 3 generated, last pending
    sched.propose(("a", 0), list(want[3:6]))  # all right: three drafts and a bonus token
    out = sched.schedule()
    sched.update(out, device.run(out))
    assert sched.allocator.num_tokens(("a", 0)) == 3 + 7 - 1
    assert drive(sched, device)["a"].token_ids == (want,)
    with pytest.raises(ValueError, match="more than max_spec_tokens=3"):
        sched.add_request(req("b", [1]))
        sched.propose(("b", 0), [1, 1, 1, 1])


def test_drafts_wait_for_the_fork_of_an_n_sample_request():
    sched, device = make(max_num_batched_tokens=4, max_spec_tokens=2)
    r = req("a", [1, 2, 3, 4, 5], new=3, n=2)
    sched.add_request(r)
    out = sched.schedule()  # 4 of 5 prompt tokens: the last one is left, as for a decode
    sched.update(out, device.run(out))
    sched.propose(("a", 0), [1, 1])
    out = sched.schedule()
    assert out.num_scheduled_tokens.tolist() == [1]  # the prompt's last token, no drafts
    assert out.sample_seq_ids == (("a", 0), ("a", 1))
    sched.update(out, device.run(out))
    assert drive(sched, device)["a"].token_ids == expected(r)


def test_stop_token_ends_a_sample_and_abort_frees_pages():
    r = req("a", [1, 2, 3], new=8)
    stop = expected(r)[0][2]
    sched, device = make()
    sched.add_request(req("a", [1, 2, 3], new=8, stop_token_ids=(stop,)))
    sched.add_request(req("b", [4, 4, 4, 4, 4]))
    out = sched.schedule()
    sched.update(out, device.run(out))
    assert sched.abort("b") and not sched.abort("b")
    done = drive(sched, device)
    assert done["a"].token_ids[0][-1] == stop and done["a"].finish_reasons == ("stop",)
    assert "b" not in done and sched.allocator.usage == 0


# -------------------------------------------------------------------- state machine


class SchedulerMachine(RuleBasedStateMachine):
    """Arrivals, aborts, drafts and steps; every finished request checked against
    :func:`expected`, and a drain at the end that must finish everything in bounded steps."""

    @initialize(
        num_pages=st.integers(4, 12),
        page_size=st.sampled_from([2, 3]),
        max_requests=st.integers(2, 5),
        host=st.sampled_from([0, 6, 16]),
        prefix=st.booleans(),
        budget=st.integers(3, 12),
        chunked=st.booleans(),
        decode_first=st.booleans(),
        mode=st.sampled_from(["swap", "recompute"]),
        victims=st.sampled_from(["latest_arrival", "fewest_tokens"]),
        spec=st.integers(0, 2),
        cap=st.sampled_from([None, None, 2]),
    )
    def setup(
        self,
        num_pages,
        page_size,
        max_requests,
        host,
        prefix,
        budget,
        chunked,
        decode_first,
        mode,
        victims,
        spec,
        cap,
    ):
        self.sched, self.device = make(
            num_pages=num_pages,
            page_size=page_size,
            max_requests=max_requests,
            max_pages=6,
            host=host,
            prefix=prefix,
            max_num_batched_tokens=budget,
            enable_chunked_prefill=chunked,
            decode_first=decode_first,
            preemption_mode=mode,
            victim_order=victims,
            max_spec_tokens=spec,
            long_prefill_token_threshold=cap,
        )
        self.live: dict[int, GenerationRequest] = {}
        self.next_id = 0
        self.steps = 0

    @rule(
        prompt=st.lists(st.integers(0, 2), min_size=1, max_size=7),
        new=st.integers(1, 6),
        n=st.sampled_from([1, 1, 2, 3]),
        stops=st.sampled_from([(), (), (5,)]),
        namespace=st.sampled_from([None, "x"]),
    )
    def arrive(self, prompt, new, n, stops, namespace):
        r = GenerationRequest(self.next_id, prompt, new, stops, namespace, n)
        self.next_id += 1
        before = self.sched.allocator.checksum()
        try:
            self.sched.add_request(r)
        except ValueError as e:
            note(f"refused {r}: {e}")
            event("refused")
            assert r.req_id not in self.sched and self.sched.allocator.checksum() == before
            return
        self.live[r.req_id] = r

    @rule(data=st.data())
    def abort(self, data):
        if self.live:
            rid = data.draw(st.sampled_from(sorted(self.live)))
            assert self.sched.abort(rid)
            del self.live[rid]

    @rule(data=st.data(), good=st.integers(0, 2), bad=st.integers(0, 1))
    def propose(self, data, good, bad):
        if not self.live or not self.sched.config.max_spec_tokens:
            return
        rid = data.draw(st.sampled_from(sorted(self.live)))
        index = data.draw(st.integers(0, self.live[rid].n - 1))
        try:
            seq = self.sched._sequence((rid, index))
        except ValueError:  # not forked yet
            return
        want = expected(self.live[rid])[index]
        done = len(seq.tokens) - seq.num_prompt
        draft = (
            list(want[done : done + good]) + [(t + 1) % VOCAB for t in want[done + good :]][:bad]
        )
        self.sched.propose((rid, index), draft[: self.sched.config.max_spec_tokens])

    @rule()
    def step(self):
        out = self.sched.schedule()
        self.steps += 1
        for name, happened in (
            ("preempted", out.num_preempted),
            ("swap out", len(out.swap_out_pairs)),
            ("swap in", len(out.swap_in_pairs)),
            ("copy on write", len(out.copy_pairs)),
            ("drafts", len(set(out.sample_rows.tolist())) > len(set(out.sample_seq_ids))),
            ("fork", len(set(out.sample_rows.tolist())) < len(out.sample_rows)),
        ):
            if happened:
                event(name)
        for fin in self.sched.update(out, self.device.run(out)):
            r = self.live.pop(fin.req_id)
            assert fin.token_ids == expected(r), (fin, r)

    @invariant()
    def pages_balance(self):
        if hasattr(self, "sched"):
            self.sched.allocator.check_invariants()
            assert len(self.sched.allocator) <= self.sched.allocator.max_requests

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        # Arrivals stop: every live request must finish within a bound of steps.
        bound = 40 * (
            1 + sum(len(r.prompt_token_ids) + r.n * r.max_new_tokens for r in self.live.values())
        )
        for _ in range(bound):
            if not self.live:
                break
            self.step()
            self.pages_balance()
        sched = self.sched
        held = [
            (q.seq_id, q.state, q.computed, len(q.tokens)) for q in sched._running + sched._waiting
        ]
        assert not self.live, f"starved: {sorted(self.live)} after {bound} steps: {held}"
        assert not self.sched.has_unfinished_requests()
        self.step()  # an empty step: host pages an abort released come back once it is taken
        alloc = self.sched.allocator
        assert (
            alloc.usage == 0
            and len(alloc) == 0
            and alloc.num_free_host_pages == max(alloc.num_host_pages - 1, 0)
        )


SchedulerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None
)
TestSchedulerMachine = SchedulerMachine.TestCase
