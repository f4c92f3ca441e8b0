"""kvshard.server.engine without HTTP: seeded sampling does not depend on the pool's pressure.

The same seeded requests (temperature 0.8, n = 2) served with plenty of pages, then on a pool
so small that requests are preempted to the host tier (swap) or recomputed, draw exactly the
same tokens, and every page comes back. Two page pools (mesh 2x1) at temperature 0 equal the
template's offline greedy loop.
"""

from __future__ import annotations

import pytest
from _hf_checkpoints import llama32_config, write_checkpoint

PROMPTS = [[5, 17, 42, 7, 99, 3], [200, 1, 1, 64], [9] * 11, [5, 17, 42, 7, 99, 3, 8], [3, 4]]


def _serve(model, mesh, params, **engine):
    from kvshard.server.engine import Engine

    eng = Engine(model, mesh, max_num_seqs=4, page_size=4, max_num_batched_tokens=16, **engine)
    for i, prompt in enumerate(PROMPTS):
        eng.add_request(i, prompt, params(i))
    out: dict = {}
    while eng.has_unfinished_requests():
        for event in eng.step():
            if event.finished is None:
                out.setdefault(event.req_id, {}).setdefault(event.index, []).append(event.token)
    eng.check_invariants()
    assert all(a.usage == 0 for a in eng.allocators)
    return out, eng.metrics()["num_preemptions"]


@pytest.mark.extended
def test_seeded_samples_are_the_same_under_swap_and_recompute_preemption(tmp_path):
    from kvshard import models
    from kvshard.server.engine import SamplingParams, make_mesh

    write_checkpoint(tmp_path, llama32_config(max_position_embeddings=64), dtype="float32")
    mesh = make_mesh(1, 2)
    model = models.load_checkpoint(tmp_path, mesh)

    def params(i):
        return SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=i, n=2)

    roomy, none = _serve(model, mesh, params, num_pages=64)
    swapped, by_swap = _serve(model, mesh, params, num_pages=16, host_memory=1 << 20)
    recomputed, by_recompute = _serve(model, mesh, params, num_pages=16)
    assert none == 0 and by_swap > 0 and by_recompute > 0
    assert swapped == roomy and recomputed == roomy
    assert all(len(samples) == 2 and samples[0] != samples[1] for samples in roomy.values())


@pytest.mark.extended
def test_two_page_pools_at_temperature_zero_equal_the_templates_greedy_loop(tmp_path):
    from kvshard import models
    from kvshard.server.engine import SamplingParams, make_mesh

    write_checkpoint(tmp_path, llama32_config(max_position_embeddings=64), dtype="float32")
    mesh = make_mesh(2, 2)
    model = models.load_checkpoint(tmp_path, mesh)
    out, _ = _serve(
        model, mesh, lambda i: SamplingParams(max_tokens=6, temperature=0), num_pages=32
    )
    requests = [models.Request(i, list(p), 6) for i, p in enumerate(PROMPTS)]
    spec = models.cache_spec(model.arch, page_size=8, longest=20, max_seqs=4, budget=16)
    models.serve(model, spec, mesh, requests, max_seqs=4, budget=16)
    assert [out[i][0] for i in range(len(PROMPTS))] == [r.tokens[r.prompt_len :] for r in requests]
