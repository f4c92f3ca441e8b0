"""``kvshard serve`` over real HTTP: the server on 127.0.0.1 (a free port), a real client.

One tiny float32 Llama checkpoint (tests/_hf_checkpoints.py) served on a 1x2 mesh in this
process (uvicorn in a thread, the engine in its own). Temperature-0 output must equal the
template's offline greedy loop (:func:`kvshard.models.serve`) token for token, for concurrent
requests streamed and not; bad requests get a 400 naming the field and the server keeps
serving; a client that leaves mid-stream frees its pages.
"""

from __future__ import annotations

import json
import threading
import time

import httpx  # the test extra installs it with the serve extra's packages
import numpy as np
import pytest
from _hf_checkpoints import llama32_config, write_checkpoint

PROMPTS = [[5, 17, 42, 7, 99, 3], [200, 1, 1, 64], [9] * 11, [5, 17, 42, 7, 99, 3, 8, 8]]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from kvshard.server.main import build_server, parse_args, serve_in_thread

    ckpt = tmp_path_factory.mktemp("serve") / "ckpt"
    write_checkpoint(ckpt, llama32_config(max_position_embeddings=64), dtype="float32")
    _write_tokenizer(ckpt / "tokenizer.json")
    args = parse_args(
        [
            *("--checkpoint", str(ckpt), "--mesh", "1x2", "--max-num-seqs", "4"),
            *("--page-size", "8", "--max-num-batched-tokens", "16", "--num-pages", "24"),
        ]
    )
    app, loop = build_server(args)
    uv, port = serve_in_thread(app)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    yield client, loop, ckpt
    client.close()
    uv.should_exit = True
    loop.stop()


def _write_tokenizer(path):
    """A word-level tokenizer.json: word ``w{i}`` is token i (256 words, the model's vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))


def _complete(client, prompt, stream=False, **fields):
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **fields}
    if not stream:
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return [c["token_ids"] for c in response.json()["choices"]]
    chunks = []
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line:
                assert line.startswith("data: ")
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    out = [[] for _ in range(fields.get("n", 1))]
    for chunk in map(json.loads, chunks[:-1]):
        assert chunk["object"] == "text_completion"
        for choice in chunk["choices"]:
            out[choice["index"]] += choice["token_ids"]
    return out


def _offline_greedy(ckpt, prompts, max_new):
    """The template's own loop, greedy, on the same checkpoint and mesh."""
    import jax

    from kvshard import models

    mesh = jax.make_mesh((1, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    model = models.load_checkpoint(ckpt, mesh)
    requests = [models.Request(i, list(p), max_new) for i, p in enumerate(prompts)]
    longest = max(len(p) for p in prompts) + max_new
    spec = models.cache_spec(model.arch, page_size=8, longest=longest, max_seqs=4, budget=16)
    models.serve(model, spec, mesh, requests, max_seqs=4, budget=16)
    return [r.tokens[r.prompt_len :] for r in requests]


def test_greedy_equals_the_templates_offline_loop_for_concurrent_requests(server):
    client, loop, ckpt = server
    results: dict[int, list[list[int]]] = {}

    def run(i):
        results[i] = _complete(client, PROMPTS[i], stream=i % 2 == 1)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = _offline_greedy(ckpt, PROMPTS, MAX_TOKENS)
    assert [results[i][0] for i in range(len(PROMPTS))] == expected
    assert all(len(e) == MAX_TOKENS for e in expected)
    loop.call(lambda engine: engine.check_invariants())


def test_seeded_sampling_is_reproducible_and_n_forks(server):
    client, _, _ = server
    fields = {"temperature": 1.5, "top_p": 0.95, "top_k": 50, "seed": 1234, "n": 3}
    first = _complete(client, PROMPTS[0], **fields)
    again = _complete(client, PROMPTS[0], stream=True, **fields)
    assert first == again and len(first) == 3
    assert len({tuple(s) for s in first}) > 1  # three samples, not one copied
    other = _complete(client, PROMPTS[0], **{**fields, "seed": 99})
    assert other != first


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ("{not json", None),
        ([1, 2], None),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, 2], "stop": [""]}, "stop"),
        ({"prompt": [1, "2"]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, 2], "max_tokens": 0}, "max_tokens"),
        ({"prompt": [1, 2], "max_tokens": "8"}, "max_tokens"),
        ({"prompt": [1, 300]}, "prompt"),
        ({"prompt": [1] * 70}, "prompt"),
        ({"prompt": [1] * 40, "max_tokens": 30}, "max_tokens"),
        ({"prompt": [1, 2], "n": 99}, "n"),
        ({"prompt": [1, 2], "temperature": -1}, "temperature"),
        ({"prompt": [1, 2], "stream": "yes"}, "stream"),
        ({"prompt": [1, 2], "stop": [1.5]}, "stop"),
    ],
)
def test_bad_requests_get_a_400_naming_the_field_and_the_server_keeps_serving(server, body, param):
    client, _, _ = server
    content = body if isinstance(body, str) else json.dumps(body)
    response = client.post("/v1/completions", content=content)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert _complete(client, [1, 2, 3], max_tokens=2)[0]  # still serving


def test_string_prompts_and_stop_strings_with_the_checkpoints_tokenizer(server):
    client, _, _ = server
    ids = _complete(client, PROMPTS[0])[0]
    text = " ".join(f"w{t}" for t in PROMPTS[0])
    response = client.post(
        "/v1/completions", json={"prompt": text, "max_tokens": MAX_TOKENS, "temperature": 0}
    ).json()
    (choice,) = response["choices"]
    assert choice["token_ids"] == ids  # the string tokenized to the same ids
    assert choice["text"] == " ".join(f"w{t}" for t in ids)
    assert response["usage"]["prompt_tokens"] == len(PROMPTS[0])
    stop = f"w{ids[2]}"  # ends the text before the third generated word
    cut = client.post(
        "/v1/completions",
        json={"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "stop": stop},
    ).json()["choices"][0]
    first = choice["text"].find(stop)
    assert cut["finish_reason"] == "stop" and cut["text"] == choice["text"][:first]
    by_id = client.post(
        "/v1/completions",
        json={"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "stop": [ids[1]]},
    ).json()["choices"][0]
    expected = ids[: ids.index(ids[1]) + 1]  # up to its first occurrence, kept
    assert by_id["token_ids"] == expected and by_id["finish_reason"] == "stop"


def test_n_too_large_for_the_pool_is_refused_by_the_engine(server):
    client, _, _ = server  # 4 samples of 60 tokens need more than the pool's 23 pages
    response = client.post("/v1/completions", json={"prompt": [1] * 4, "max_tokens": 56, "n": 4})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "n"


def test_a_client_leaving_mid_stream_frees_its_pages(server):
    client, loop, _ = server
    body = {"prompt": PROMPTS[2], "max_tokens": 50, "temperature": 0, "stream": True}
    aborted = loop.call(lambda e: e.stats["aborted"])
    with client.stream("POST", "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if loop.call(lambda e: not e.has_unfinished_requests()):
            break
        time.sleep(0.05)
    assert loop.call(lambda e: (e.has_unfinished_requests(), [a.usage for a in e.allocators])) == (
        False,
        [0.0],
    )
    assert loop.call(lambda e: e.stats["aborted"]) == aborted + 1  # cut short, not finished
    loop.call(lambda engine: engine.check_invariants())
    assert _complete(client, [4, 5], max_tokens=2)[0]


def test_health_models_and_metrics(server):
    client, _, ckpt = server
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == ckpt.name and models["data"][0]["max_model_len"] == 64
    text = client.get("/metrics").text
    for name in (
        "kvshard_num_requests_running",
        "kvshard_num_requests_waiting",
        "kvshard_kv_cache_usage_perc",
        "kvshard_prefix_cache_hit_rate",
        "kvshard_num_preemptions_total",
        "kvshard_generation_tokens_total",
    ):
        assert f"\n{name} " in text or text.startswith(name)
    generated = float(text.split("\nkvshard_generation_tokens_total ")[1].split()[0])
    assert generated > 0 and np.isfinite(generated)


def test_an_engine_error_fails_the_live_requests_with_a_500_and_the_server_goes_on(server):
    client, loop, _ = server
    real = loop.engine.step

    def broken():
        loop.engine.step = real  # once
        raise RuntimeError("device lost")

    loop.call(lambda e: setattr(e, "step", broken))
    response = client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
    assert response.status_code == 500 and "device lost" in response.json()["error"]["message"]
    assert loop.call(lambda e: e.has_unfinished_requests()) is False  # aborted, pages freed
    assert _complete(client, [1, 2, 3], max_tokens=2)[0]
