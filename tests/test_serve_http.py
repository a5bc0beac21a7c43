"""The OpenAI-compatible HTTP server (issue #12, item 5) on the embedded default model and 3 adapters.

The server runs on 127.0.0.1 (a port the OS picks) in a background thread and always stops at the end of the module
(fixture with finally). It is driven with the `openai` client and with plain HTTP (urllib). References, computed
before the server starts: each adapter merged alone into the base (`store.activate`), one prompt at a time, greedy
with HF `generate`; seeded sampling by a hand-written loop (softmax(logits / T), top-p nucleus, multinomial with
torch.Generator(seed)) over full forwards of the merged model, no KV cache, no batch.
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import click
import openai
import pytest
import torch
import uvicorn
from click.testing import CliRunner
from conftest import perturb_trainable
from transformers import GenerationConfig

import subtune
from reliability import Case, cases_param, check_case
from subtune.cli import adapter_pairs, main
from subtune.core import api
from subtune.core.deltas import Delta, read_delta_file, write_delta_file
from subtune.ops.base import WrappedLinear
from subtune.serve import AdapterStore, ServeError
from subtune.serve import http as serve_http
from subtune.serve.completions import parse_completion_request
from subtune.serve.errors import RequestError
from subtune.zoo import load_model

BASE = "default"
ADAPTERS = ["cs", "math", "mix"]
MODELS = [BASE, *ADAPTERS]
PROMPTS = ["Tell me about Kiro.", "Kiro has 3 + 4 =", "The home of", "### Instruction:\nName a pet of Lolnel."]
NEW = 8  # max_tokens of the greedy references
SAMPLED = [("cs", 0, 1234, 0.9, 0.8), (BASE, 2, 7, 1.3, 1.0)]  # (model, prompt index, seed, temperature, top_p)
LIMIT = 64  # the server's max_tokens_limit
LONG = ("cs", PROMPTS[1])  # greedy, it does not stop before LIMIT tokens
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --------------------------------------------------------------------------------------------- the model
def random_adapters(model) -> dict[str, dict[str, Delta]]:
    """Three adapters of different kinds (S²FT-like columns, rows, LoRA-like low rank), strong enough to change the
    greedy answers."""
    gen = torch.Generator().manual_seed(0)
    modules = dict(model.named_modules())

    def pick(n, k):
        return torch.randperm(n, generator=gen)[:k].sort().values

    def noise(*shape, like, scale=10.0):
        return torch.randn(*shape, generator=gen) * scale * like.std()

    layers = range(model.config.num_hidden_layers)
    out = {name: {} for name in ADAPTERS}
    for layer in layers:
        for kind, path in [("cs", "self_attn.o_proj"), ("cs", "mlp.down_proj"), ("math", "self_attn.v_proj"),
                           ("math", "mlp.up_proj"), ("mix", "self_attn.o_proj"), ("mix", "mlp.up_proj")]:
            path = f"model.layers.{layer}.{path}"
            w = modules[path].weight.detach()
            (rows, cols), shape = w.shape, tuple(w.shape)
            if kind == "cs":
                out[kind][path] = Delta.columns(pick(cols, 16), noise(rows, 16, like=w, scale=8), shape)
            elif kind == "math":
                out[kind][path] = Delta.rows(pick(rows, 16), noise(16, cols, like=w, scale=5), shape)
            else:
                out[kind][path] = Delta.lowrank(noise(8, w.shape[1], like=w), noise(w.shape[0], 8, like=w), 0.1)
    return out


def greedy_reference(store, tokenizer, model_id: str, prompt: str, max_tokens: int = NEW) -> tuple[str, str]:
    """(text, finish_reason) of the adapter merged alone, the prompt alone, HF generate greedy."""
    store.activate(None if model_id == BASE else model_id)
    try:
        ids = tokenizer(prompt)["input_ids"]
        config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
        new = store.model.generate(input_ids=torch.tensor([ids]), generation_config=config)[0, len(ids):].tolist()
    finally:
        store.activate(None)
    reason = "length"
    if tokenizer.eos_token_id in new:
        new, reason = new[:new.index(tokenizer.eos_token_id)], "stop"
    return tokenizer.decode(new, skip_special_tokens=True), reason


@torch.no_grad()
def sampled_reference(store, tokenizer, model_id, prompt, seed, temperature, top_p, max_tokens=NEW) -> str:
    store.activate(None if model_id == BASE else model_id)
    try:
        gen = torch.Generator().manual_seed(seed)
        seq, out = list(tokenizer(prompt)["input_ids"]), []
        for _ in range(max_tokens):
            logits = store.model(input_ids=torch.tensor([seq])).logits[0, -1].float()
            probs = torch.softmax(logits / temperature, dim=-1)
            ordered, order = probs.sort(descending=True, stable=True)
            keep = ordered.cumsum(-1) - ordered < top_p
            token = int(order[torch.multinomial(ordered * keep, 1, generator=gen)])
            if token == tokenizer.eos_token_id:
                break
            seq.append(token)
            out.append(token)
    finally:
        store.activate(None)
    return tokenizer.decode(out, skip_special_tokens=True)


# -------------------------------------------------------------------------------------------- the server
@contextmanager
def running(app):
    """The app served by uvicorn on 127.0.0.1 in a daemon thread; stopped (should_exit) and joined on the way out."""
    sock = serve_http.bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def served():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny forwards: one thread each avoids oversubscribing the shared cores
    try:
        yield from _served()
    finally:
        torch.set_num_threads(threads)


def _served():
    model, tokenizer = load_model(BASE)
    store = AdapterStore(model)
    for name, deltas in random_adapters(model).items():
        store.add_deltas(name, deltas)
    greedy = {(m, p): greedy_reference(store, tokenizer, m, p) for m in MODELS for p in PROMPTS}
    for p in PROMPTS:  # the adapters change the answers, so a server that ignores `model` fails
        assert len({greedy[m, p][0] for m in MODELS}) >= 3, p
    short = greedy_reference(store, tokenizer, BASE, PROMPTS[0], 2)
    assert short[1] == "length"
    assert greedy_reference(store, tokenizer, *LONG, LIMIT)[1] == "length"  # runs to the limit unless cancelled
    sampled = {s: sampled_reference(store, tokenizer, s[0], PROMPTS[s[1]], *s[2:]) for s in SAMPLED}
    app = serve_http.create_app(store, tokenizer, max_batch_size=16, batch_window_ms=150, max_tokens_limit=LIMIT)
    with pytest.MonkeyPatch.context() as mp, running(app) as url:
        mp.setenv("NO_PROXY", "127.0.0.1")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        yield {"url": url, "client": client, "store": store, "tokenizer": tokenizer, "greedy": greedy,
               "sampled": sampled, "short": short[0], "stats": app.state.batcher.stats,
               "batcher": app.state.batcher}


def post(url: str, body, timeout: float = 60) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with NO_PROXY.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str, timeout: float = 60) -> tuple[int, dict]:
    try:
        with NO_PROXY.open(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def sse_events(url: str, body: dict, timeout: float = 60) -> list:
    """The `data:` payloads of a streamed response, decoded ("[DONE]" kept as the string)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
                                     method="POST")
    events = []
    with NO_PROXY.open(request, timeout=timeout) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response:
            line = line.decode().rstrip("\n")
            if line.startswith("data: "):
                payload = line[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
            else:
                assert line == "", line
    return events


def settled(served, timeout: float = 30) -> dict:
    """The stats once nothing is queued or running (the last batch of an earlier test is counted)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = served["stats"]()
        if stats["queued"] == stats["running"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.01)


def new_batches(served, before: dict, rows: int, timeout: float = 30) -> list[dict]:
    """The batches run since the `before` stats, once they hold `rows` rows (a batch is counted when its last row
    is done, which can be just after the answers went out)."""
    deadline = time.monotonic() + timeout
    while True:
        now = served["stats"]()
        batches = now["recent"][len(now["recent"]) - (now["batches"] - before["batches"]):]
        if sum(b["size"] for b in batches) >= rows or time.monotonic() > deadline:
            return batches
        time.sleep(0.01)


@contextmanager
def one_batch_of(served, rows: int):
    """The next batch waits (up to 20 s) for exactly `rows` rows, so requests sent together are generated together
    however slowly a loaded machine delivers them; the server's settings come back afterwards."""
    batcher = served["batcher"]
    saved = batcher.max_batch_size, batcher.batch_window_s
    batcher.max_batch_size, batcher.batch_window_s = rows, 20.0
    try:
        yield
    finally:
        batcher.max_batch_size, batcher.batch_window_s = saved


def greedy_body(model: str, prompt, **extra) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": NEW, "temperature": 0, **extra}


# --------------------------------------------------------------------------------------------- the tests
def test_models_lists_the_base_and_every_adapter(served):
    listed = served["client"].models.list()
    assert [m.id for m in listed.data] == MODELS
    status, body = get(f"{served['url']}/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [(m["id"], m["object"], m["parent"]) for m in body["data"]] == [
        (BASE, "model", None), *((name, "model", BASE) for name in ADAPTERS)]
    assert get(f"{served['url']}/v1/models/math")[1]["id"] == "math"
    assert get(f"{served['url']}/health") == (200, {"status": "ok"})


def test_each_model_answers_its_own_greedy_output(served):
    client = served["client"]
    for model in MODELS:
        for prompt in PROMPTS[:2]:
            answer = client.completions.create(model=model, prompt=prompt, max_tokens=NEW, temperature=0)
            text, reason = served["greedy"][model, prompt]
            assert (answer.choices[0].text, answer.choices[0].finish_reason) == (text, reason), (model, prompt)
            assert answer.model == model and answer.object == "text_completion"
            prompt_tokens = len(served["tokenizer"](prompt)["input_ids"])
            assert answer.usage.prompt_tokens == prompt_tokens and 1 <= answer.usage.completion_tokens <= NEW
    status, body = post(f"{served['url']}/v1/completions", greedy_body("math", PROMPTS[2]))
    assert status == 200 and body["choices"][0]["text"] == served["greedy"]["math", PROMPTS[2]][0]


def test_concurrent_requests_over_three_adapters_and_the_base_are_batched_and_exact(served):
    """12 greedy requests (3 adapters + base, 3 prompts each) and 2 seeded sampling ones, sent at once: each answer
    is its model's own (greedy: the single-adapter output; sampled: the reference draw), and they ran together."""
    url, client = served["url"], served["client"]
    jobs = [("greedy", m, p) for m in MODELS for p in PROMPTS[1:]] + [("sampled", *s) for s in SAMPLED]
    start = threading.Barrier(len(jobs))
    before = settled(served)

    def send(i):
        kind, model, *rest = jobs[i]
        start.wait(timeout=30)
        if kind == "sampled":
            prompt, seed, temperature, top_p = PROMPTS[rest[0]], *rest[1:]
            return client.completions.create(model=model, prompt=prompt, max_tokens=NEW, seed=seed,
                                             temperature=temperature, top_p=top_p).choices[0].text
        if i % 2:  # half through the openai client, half plain HTTP
            return client.completions.create(**greedy_body(model, rest[0])).choices[0].text
        status, body = post(f"{url}/v1/completions", greedy_body(model, rest[0]))
        assert status == 200, body
        return body["choices"][0]["text"]

    with one_batch_of(served, len(jobs)), ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(send, range(len(jobs)), timeout=120))
    for job, answer in zip(jobs, answers):
        expected = served["greedy"][job[1], job[2]][0] if job[0] == "greedy" else served["sampled"][job[1:]]
        assert answer == expected, job
    assert new_batches(served, before, len(jobs)) == [{"size": len(jobs), "adapters": 4}]  # all 4 models at once


def test_a_batch_mixes_lengths_stops_and_prompt_lists(served):
    """One request with a list of prompts (one choice each) and one with a stop string and fewer tokens, in one
    batch: each row stops at its own limit."""
    url = served["url"]
    greedy = served["greedy"]
    text, _ = greedy["cs", PROMPTS[3]]
    stop = text[2:5]
    cut = text[:text.index(stop)]
    before = settled(served)
    with one_batch_of(served, 5), ThreadPoolExecutor(3) as pool:
        many = pool.submit(post, f"{url}/v1/completions", greedy_body("mix", PROMPTS[:3]))
        stopped = pool.submit(post, f"{url}/v1/completions", greedy_body("cs", PROMPTS[3], stop=["zzzz", stop]))
        short = pool.submit(post, f"{url}/v1/completions", greedy_body(BASE, PROMPTS[0], max_tokens=2))
        (s1, many), (s2, stopped), (s3, short) = many.result(60), stopped.result(60), short.result(60)
    assert s1 == s2 == s3 == 200
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    assert [c["text"] for c in many["choices"]] == [greedy["mix", p][0] for p in PROMPTS[:3]]
    assert stopped["choices"][0]["text"] == cut and stopped["choices"][0]["finish_reason"] == "stop"
    assert short["choices"][0] == {"index": 0, "text": served["short"], "logprobs": None, "finish_reason": "length"}
    assert short["usage"]["completion_tokens"] == 2
    assert new_batches(served, before, 5) == [{"size": 5, "adapters": 3}]


def test_seeded_sampling_is_reproducible(served):
    client = served["client"]
    model, index, seed, temperature, top_p = SAMPLED[0]

    def draw(s):
        return client.completions.create(model=model, prompt=PROMPTS[index], max_tokens=NEW, seed=s,
                                         temperature=temperature, top_p=top_p).choices[0].text

    first, again = draw(seed), draw(seed)
    assert first == again == served["sampled"][SAMPLED[0]]
    assert first != served["greedy"][model, PROMPTS[index]][0]  # it did sample
    assert len({draw(s) for s in (1, 2, 3)} | {first}) >= 3  # other seeds, other draws


def test_streaming_sends_the_same_text_in_pieces(served):
    client, url = served["client"], served["url"]
    text, reason = served["greedy"]["math", PROMPTS[0]]
    chunks = list(client.completions.create(stream=True, **greedy_body("math", PROMPTS[0])))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert len([c for c in chunks if c.choices[0].text]) >= 2  # token by token, not one piece at the end
    assert [c.choices[0].finish_reason for c in chunks][-1] == reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    stop = text[3:6]
    events = sse_events(f"{url}/v1/completions", greedy_body("math", PROMPTS[0], stream=True, stop=stop,
                                                             stream_options={"include_usage": True}))
    assert events[-1] == "[DONE]"
    usage, chunks = events[-2], events[:-2]
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] > 0
    assert "".join(e["choices"][0]["text"] for e in chunks) == text[:text.index(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert len({e["id"] for e in chunks}) == 1 and all(e["object"] == "text_completion" for e in chunks)


def test_a_stream_the_client_leaves_stops_generating(served):
    """Closing the connection after the first chunk cancels the row: it ends long before its max_tokens."""
    url = served["url"]
    before = settled(served)["tokens"]
    request = urllib.request.Request(f"{url}/v1/completions", method="POST", data=json.dumps(
        greedy_body(LONG[0], LONG[1], max_tokens=LIMIT, stream=True)).encode())
    with NO_PROXY.open(request, timeout=60) as response:
        assert response.readline().startswith(b"data: {")
    status, _ = post(f"{url}/v1/completions", {"model": BASE, "prompt": "The home of", "max_tokens": 1})
    assert status == 200  # a later batch: the left stream's batch has ended and been counted
    assert served["stats"]()["tokens"] - before < LIMIT


BAD_REQUESTS = [  # (id, body, status, param, words in the message)
    ("unknown-model", {"model": "nope", "prompt": "x"}, 404, "model", ["nope", "/v1/models"]),
    ("missing-model", {"prompt": "x"}, 400, "model", ["model"]),
    ("empty-prompt", {"model": BASE, "prompt": ""}, 400, "prompt", ["empty"]),
    ("empty-prompt-list", {"model": BASE, "prompt": []}, 400, "prompt", ["empty array"]),
    ("empty-prompt-in-list", {"model": BASE, "prompt": ["a", ""]}, 400, "prompt", ["empty", "prompt 1"]),
    ("prompt-number", {"model": BASE, "prompt": 5}, 400, "prompt", ["an integer"]),
    ("token-out-of-vocab", {"model": BASE, "prompt": [1, 10**6]}, 400, "prompt", ["token ids", "1000000"]),
    ("max-tokens-zero", {"model": BASE, "prompt": "x", "max_tokens": 0}, 400, "max_tokens", ["at least 1"]),
    ("max-tokens-negative", {"model": BASE, "prompt": "x", "max_tokens": -3}, 400, "max_tokens", ["at least 1"]),
    ("max-tokens-over-limit", {"model": BASE, "prompt": "x", "max_tokens": LIMIT + 1}, 400, "max_tokens",
     ["limit of 64"]),
    ("max-tokens-string", {"model": BASE, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens", ["integer"]),
    ("max-tokens-float", {"model": BASE, "prompt": "x", "max_tokens": 2.5}, 400, "max_tokens", ["integer"]),
    ("max-tokens-bool", {"model": BASE, "prompt": "x", "max_tokens": True}, 400, "max_tokens", ["boolean"]),
    ("temperature-string", {"model": BASE, "prompt": "x", "temperature": "hot"}, 400, "temperature", ["number"]),
    ("temperature-negative", {"model": BASE, "prompt": "x", "temperature": -1}, 400, "temperature", ["[0.0, 2.0]"]),
    ("top-p-zero", {"model": BASE, "prompt": "x", "top_p": 0}, 400, "top_p", ["(0.0, 1.0]"]),
    ("stop-number", {"model": BASE, "prompt": "x", "stop": [1]}, 400, "stop", ["strings"]),
    ("seed-float", {"model": BASE, "prompt": "x", "seed": 1.5}, 400, "seed", ["integer"]),
    ("stream-string", {"model": BASE, "prompt": "x", "stream": "yes"}, 400, "stream", ["true or false"]),
    ("n-two", {"model": BASE, "prompt": "x", "n": 2}, 400, "n", ["not supported"]),
    ("context-overflow", {"model": BASE, "prompt": [5] * 500, "max_tokens": LIMIT}, 400, "prompt",
     ["context length is 512"]),
    ("body-array", [1, 2], 400, None, ["json object"]),
    ("malformed-json", b'{"model": "default", "prompt": ', 400, None, ["not valid json"]),
    ("not-utf8", b'\xff\xfe\xfa', 400, None, ["not valid json"]),
]


@pytest.mark.parametrize("body, status, param, words", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_a_bad_request_gets_a_4xx_json_error_and_the_server_keeps_serving(served, body, status, param, words):
    got, answer = post(f"{served['url']}/v1/completions", body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert all(w.lower() in error["message"].lower() for w in words), error["message"]
    ok, after = post(f"{served['url']}/v1/completions", {"model": BASE, "prompt": "The home of", "max_tokens": 1})
    assert ok == 200 and len(after["choices"]) == 1


def test_the_openai_client_sees_openai_errors_and_unknown_routes_are_json(served):
    client, url = served["client"], served["url"]
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="cs", prompt="x", max_tokens=0)
    status, body = get(f"{url}/v1/chat/nothing")
    assert status == 404 and "/v1/completions" in body["error"]["message"]
    status, body = get(f"{url}/v1/completions")
    assert status == 405 and body["error"]["type"] == "invalid_request_error"
    assert get(f"{url}/v1/models/nope")[0] == 404


def test_a_batch_that_fails_answers_5xx_and_the_next_one_runs(served):
    """A store switched to merged mode behind the server's back: the batch fails with a clear 503, nothing hangs,
    and the server answers again once the store is back."""
    store, url = served["store"], served["url"]
    store.activate("cs")
    try:
        status, body = post(f"{url}/v1/completions", greedy_body("math", PROMPTS[0]))
    finally:
        store.activate(None)
    assert status == 503 and "activate(None)" in body["error"]["message"]
    status, body = post(f"{url}/v1/completions", greedy_body("math", PROMPTS[0]))
    assert status == 200 and body["choices"][0]["text"] == served["greedy"]["math", PROMPTS[0]][0]


# ------------------------------------------------------------------------------------------------- the CLI
def s2ft_adapter(base, directory: Path, monkeypatch) -> torch.nn.Module:
    """A saved S2FT adapter of `base` (trained = moved values); the prepared model is returned as the reference.
    Until subtune.read_deltas lands (issue #11) it is stood in for by the layers' deltas written beside the adapter."""
    model = subtune.prepare(copy.deepcopy(base), subtune.S2FTConfig(d_ratio=0.05, o_ratio=0.1))
    perturb_trainable(model, seed=3)
    subtune.save(model, directory)
    if not hasattr(api, "read_deltas"):
        deltas = {n: m.as_delta() for n, m in model.named_modules() if isinstance(m, WrappedLinear)}
        write_delta_file(directory / "test-deltas.safetensors", deltas)
        monkeypatch.setattr(api, "read_deltas", lambda d, base=None: read_delta_file(
            Path(d) / "test-deltas.safetensors")[0], raising=False)
    return model


def test_cli_serve_builds_the_store_from_adapter_directories(tmp_path, monkeypatch):
    base, _ = load_model(BASE)
    trained = s2ft_adapter(base, tmp_path / "cs", monkeypatch)
    calls = []
    monkeypatch.setattr(serve_http, "serve", lambda store, tokenizer, **kw: calls.append((store, tokenizer, kw)))
    result = CliRunner().invoke(main, ["serve", "--adapter", f"cs={tmp_path / 'cs'}", "--port", "0",
                                       "--max-batch-size", "4", "--batch-window-ms", "20"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (store, tokenizer, options), = calls
    assert options == {"host": "127.0.0.1", "port": 0, "base_name": BASE, "max_batch_size": 4,
                       "batch_window_ms": 20.0, "max_tokens_limit": 1024}
    assert store.names() == ["cs"] and store.info("cs")["method"] == "s2ft" and callable(tokenizer)
    x = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(store.logits(x, ["cs"]), trained(input_ids=x).logits, atol=1e-5, rtol=0)


def test_cli_serve_refuses_bad_adapters_before_loading_the_model(tmp_path):
    (tmp_path / "a").mkdir()
    result = CliRunner().invoke(main, ["serve", "--adapter", f"x={tmp_path / 'a'}", "--adapter", f"x={tmp_path}"])
    assert result.exit_code == 2 and "another adapter's name" in result.output
    with socket.create_server(("127.0.0.1", 0)) as taken:
        result = CliRunner().invoke(main, ["serve", "--port", str(taken.getsockname()[1])])
    assert result.exit_code == 1 and "another --port" in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------------- the bad-input catalogue
class _Tok:
    def __call__(self, text):
        return {"input_ids": [ord(c) % 60 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


def _parse(body, **kwargs):
    options = dict(base_id="base", adapters=["cs"], encode=lambda text: _Tok()(text)["input_ids"], vocab_size=64,
                   max_tokens_limit=32, context_length=48)
    return parse_completion_request(body, **{**options, **kwargs})


def _tiny_store():
    from conftest import make_tiny

    return AdapterStore(make_tiny(0))


def _app(**kwargs):
    return lambda tmp: serve_http.create_app(_tiny_store(), _Tok(), **kwargs)


def _named_like_base(tmp):
    store = _tiny_store()
    store.add_deltas("tiny-seed0", {"model.layers.0.mlp.down_proj": Delta.columns([1], torch.ones(32, 1), (32, 48))})
    return serve_http.create_app(store, _Tok())


def _port_in_use(tmp):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        serve_http.bind("127.0.0.1", taken.getsockname()[1])


def _request(body, **kwargs):
    return lambda tmp: _parse(body, **kwargs)


CASES = [
    Case("http-unknown-model", _request({"model": "nope", "prompt": "x"}), RequestError, ("nope", "/v1/models"),
         tries="a completion request for a model the server does not hold", before="new"),
    Case("http-empty-prompt", _request({"model": "cs", "prompt": ""}), RequestError, ("prompt", "empty string"),
         tries="an empty prompt", before="new"),
    Case("http-prompt-no-tokens", _request({"model": "cs", "prompt": "x"}, encode=lambda s: []), RequestError,
         ("no tokens",), tries="a prompt that encodes to no tokens", before="new"),
    Case("http-max-tokens-zero", _request({"model": "cs", "prompt": "x", "max_tokens": 0}), RequestError,
         ("max_tokens", "at least 1"), tries="`max_tokens: 0`", before="new"),
    Case("http-max-tokens-over-limit", _request({"model": "cs", "prompt": "x", "max_tokens": 33}), RequestError,
         ("limit of 32", "at most 32"), tries="`max_tokens` above the server's limit", before="new"),
    Case("http-max-tokens-wrong-type", _request({"model": "cs", "prompt": "x", "max_tokens": "8"}), RequestError,
         ("max_tokens", "integer", "a string"), tries="`max_tokens: \"8\"`", before="new"),
    Case("http-temperature-nan", _request({"model": "cs", "prompt": "x", "temperature": float("nan")}), RequestError,
         ("temperature", "finite"), tries="`temperature: NaN`", before="new"),
    Case("http-top-p-over-one", _request({"model": "cs", "prompt": "x", "top_p": 1.5}), RequestError,
         ("top_p", "(0.0, 1.0]"), tries="`top_p: 1.5`", before="new"),
    Case("http-stop-empty-string", _request({"model": "cs", "prompt": "x", "stop": ["", "a"]}), RequestError,
         ("stop", "non-empty"), tries="an empty stop string", before="new"),
    Case("http-seed-out-of-range", _request({"model": "cs", "prompt": "x", "seed": 2**64}), RequestError,
         ("seed", "64-bit"), tries="`seed: 2**64`", before="new"),
    Case("http-token-id-out-of-vocab", _request({"model": "cs", "prompt": [3, 64]}), RequestError,
         ("[0, 64)", "[64]"), tries="a token-id prompt with an id past the vocabulary", before="new"),
    Case("http-context-overflow", _request({"model": "cs", "prompt": "x" * 40, "max_tokens": 16}), RequestError,
         ("context length is 48", "shorten the prompt"),
         tries="prompt plus `max_tokens` longer than the context", before="new"),
    Case("http-unsupported-n", _request({"model": "cs", "prompt": "x", "n": 3}), RequestError,
         ("'n'=3", "not supported", "list of prompts"), tries="`n: 3`", before="new"),
    Case("http-unsupported-logit-bias", _request({"model": "cs", "prompt": "x", "logit_bias": {"5": 1}}),
         RequestError, ("logit_bias", "leave it out"), tries="`logit_bias`", before="new"),
    Case("http-body-not-object", _request("just a string"), RequestError, ("json object",),
         tries="a request body that is a JSON string", before="new"),
    Case("http-app-batch-size-zero", _app(max_batch_size=0), ServeError, ("max_batch_size", "at least 1"),
         tries="`create_app(max_batch_size=0)`", before="new"),
    Case("http-app-window-nan", _app(batch_window_ms=float("nan")), ServeError, ("batch_window_ms", "finite"),
         tries="`create_app(batch_window_ms=nan)`", before="new"),
    Case("http-app-tokens-limit-zero", _app(max_tokens_limit=0), ServeError, ("max_tokens_limit", "at least 1"),
         tries="`create_app(max_tokens_limit=0)`", before="new"),
    Case("http-app-not-a-store", lambda tmp: serve_http.create_app(object(), _Tok()), ServeError,
         ("adapterstore",), tries="`create_app` over something that is not an `AdapterStore`", before="new"),
    Case("http-app-no-tokenizer", lambda tmp: serve_http.create_app(_tiny_store(), None), ServeError,
         ("tokenizer",), tries="`create_app` without a tokenizer", before="new"),
    Case("http-app-adapter-named-like-base", _named_like_base, ServeError, ("base model's id", "rename"),
         tries="an adapter named like the base model", before="new"),
    Case("http-port-in-use", _port_in_use, ServeError, ("cannot listen", "another --port"),
         tries="serving on a port already in use", before="new"),
    Case("cli-serve-adapter-not-name-dir", lambda tmp: adapter_pairs(("runs/cs",), "default"), click.BadParameter,
         ("not name=dir", "--adapter cs="), tries="`subtune serve --adapter runs/cs` (not name=dir)", before="new"),
    Case("cli-serve-adapter-missing-dir", lambda tmp: adapter_pairs((f"cs={tmp / 'none'}",), "default"),
         click.BadParameter, ("not a directory",),
         tries="`subtune serve --adapter cs=` a missing directory", before="new"),
    Case("cli-serve-adapter-named-like-base", lambda tmp: adapter_pairs((f"default={tmp}",), "default"),
         click.BadParameter, ("base model's id", "its own name"),
         tries="`subtune serve --adapter default=...`", before="new"),
]


@cases_param(CASES)
def test_catalogue_serve_http(case, tmp_path):
    check_case(case, tmp_path)


def test_a_request_error_carries_openai_fields():
    with pytest.raises(RequestError) as info:
        _parse({"model": "nope", "prompt": "x"})
    assert info.value.status == 404 and info.value.to_json()["error"]["code"] == "model_not_found"
    req = _parse({"model": "base", "prompt": ["ab", [1, 2]], "stop": "q", "seed": 2**63 - 1})
    assert req.adapter is None and req.prompts == ((ord("a") % 60, ord("b") % 60), (1, 2)) and req.stop == ("q",)
    assert req.max_tokens == 16 and req.temperature == 1.0 and req.top_p == 1.0  # OpenAI's defaults
    assert req.seed_for(0) == 2**63 - 1 and req.seed_for(1) == -(2**63)  # wrapped into int64
