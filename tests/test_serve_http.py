"""The OpenAI-compatible server, in-process on a small random model (byte tokenizer) on 127.0.0.1: the ``openai``
client's chat completion plain and streamed, 200 concurrent requests with exact usage counts, malformed requests
answered 4xx while the server keeps serving, a disconnecting client's pages freed, /health and /metrics, draining.
Every client call has a timeout; the server thread is stopped in the fixture's finally."""

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from benchmarks.serve_load import wait_until_healthy
from llmopt_jax.serve.engine import Engine, EngineConfig
from llmopt_jax.serve.http import AsyncEngine, create_app, make_server
from llmopt_jax.serve.smoke import smoke_model

MODEL = "smoke"
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def server():
    model = smoke_model(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128, max_seq_len=256)
    # One page-table width and one decode batch: few executables to compile.
    engine = Engine(model, config=EngineConfig(page_size=8, num_pages=400, max_running=16, prefill_budget=64,
                                               max_decode_steps=4, min_batch_bucket=16, min_pages_bucket=32),
                    tokenizer=model.tokenizer)
    async_engine = AsyncEngine(engine)
    app = create_app(async_engine, model.tokenizer, MODEL, request_timeout=120)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv = make_server(app, async_engine)
    async_engine.start()
    thread = threading.Thread(target=srv.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    try:
        assert wait_until_healthy(url, TIMEOUT, interval=0.1), "the server did not come up"
        yield url, app, async_engine, srv
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        async_engine.stop()
        sock.close()


def openai_client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


def test_openai_client_chat_plain_and_streamed(server):
    url = server[0]
    client = openai_client(url)
    assert [m.id for m in client.models.list().data] == [MODEL]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    text = plain.choices[0].message.content
    assert plain.choices[0].finish_reason in ("length", "stop") and plain.usage.completion_tokens <= 6
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text  # greedy: the same answer, streamed
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    # n choices with a seed: reproducible; completions with a token-id prompt.
    a = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, n=2, seed=3, temperature=1.0)
    b = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, n=2, seed=3, temperature=1.0)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices] and len(a.choices) == 2
    done = client.completions.create(model=MODEL, prompt=[256, 72, 105], max_tokens=3, temperature=0)
    assert done.usage.prompt_tokens == 3 and done.object == "text_completion"


def test_logprobs_chat_and_completions_plain_and_streamed(server):
    url = server[0]
    client = openai_client(url)
    messages = [{"role": "user", "content": "Name a colour."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                           top_logprobs=2)
    content = plain.choices[0].logprobs.content
    assert len(content) == plain.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob  # greedy
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    no_logprobs = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    assert no_logprobs.choices[0].logprobs is None

    streamed = client.completions.create(model=MODEL, prompt="abc", max_tokens=7, temperature=0, logprobs=1,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    tokens, offsets, text = [], [], ""
    for c in chunks:
        if c.choices and c.choices[0].logprobs is not None:
            lp = c.choices[0].logprobs
            assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
            assert all(len(top) == 1 for top in lp.top_logprobs)
            tokens += lp.tokens
            offsets += lp.text_offset
        if c.choices:
            text += c.choices[0].text
    assert len(tokens) == chunks[-1].usage.completion_tokens
    assert offsets == sorted(offsets) and offsets[0] == 0
    whole = client.completions.create(model=MODEL, prompt="abc", max_tokens=7, temperature=0, logprobs=1)
    assert whole.choices[0].text == text and whole.choices[0].logprobs.tokens == tokens

    r = httpx.post(f"{url}/v1/chat/completions", timeout=TIMEOUT,
                   json={"model": MODEL, "messages": messages, "top_logprobs": 2})
    assert r.status_code == 400 and "top_logprobs needs logprobs=true" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", timeout=TIMEOUT, json={"model": MODEL, "prompt": "a", "logprobs": 21})
    assert r.status_code == 422


def test_200_concurrent_requests_complete_with_exact_usage(server):
    url, _, async_engine, _ = server

    async def run():
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits) as client:
            async def one(i):
                prompt = "abcdefghij"[: 1 + i % 10] * (1 + i % 3)
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 1 + i % 7, "temperature": 0}
                r = await client.post("/v1/completions", json=body)
                return i, prompt, body["max_tokens"], r.status_code, r.json()

            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), timeout=240)

    results = asyncio.run(run())
    assert len(results) == 200
    for i, prompt, max_tokens, status, body in results:
        assert status == 200, body
        usage, choice = body["usage"], body["choices"][0]
        assert usage["prompt_tokens"] == len(prompt) + 1  # bytes + BOS
        n = usage["completion_tokens"]
        assert n == max_tokens if choice["finish_reason"] == "length" else n < max_tokens
        assert usage["total_tokens"] == usage["prompt_tokens"] + n
    deadline = time.monotonic() + 10
    while async_engine.metrics["kv_pages_used"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert async_engine.metrics["kv_pages_used"] == 0 and async_engine.num_in_flight == 0


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400),
    (b"[1, 2]", 400),
    (json.dumps({"prompt": "hi"}).encode(), 422),  # model missing
    (json.dumps({"model": MODEL}).encode(), 422),  # prompt missing
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": "many"}).encode(), 422),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": -3}).encode(), 422),
    (json.dumps({"model": MODEL, "prompt": "hi", "temperature": 9}).encode(), 422),
    (json.dumps({"model": MODEL, "prompt": "hi", "n": 1000}).encode(), 422),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 10_000}).encode(), 400),  # beyond the context
    (json.dumps({"model": MODEL, "prompt": [1, 99999]}).encode(), 400),
    (json.dumps({"model": MODEL, "prompt": []}).encode(), 400),  # no tokens at all
    (json.dumps({"model": "gpt-4", "prompt": "hi"}).encode(), 404),
])
def test_malformed_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status):
    url = server[0]
    r = httpx.post(f"{url}/v1/completions", content=body, headers={"Content-Type": "application/json"},
                   timeout=TIMEOUT)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) >= {"message", "type"}
    ok = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=TIMEOUT)
    assert ok.status_code == 200


def test_chat_errors_and_unknown_routes(server):
    url = server[0]
    bad_role = {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}
    assert httpx.post(f"{url}/v1/chat/completions", json=bad_role, timeout=TIMEOUT).status_code == 422
    assert httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": []},
                      timeout=TIMEOUT).status_code == 422
    r = httpx.get(f"{url}/v1/nothing", timeout=TIMEOUT)
    assert r.status_code == 404 and "error" in r.json()


def test_disconnect_mid_stream_cancels_and_frees_pages(server):
    url, _, async_engine, _ = server
    before = async_engine.metrics["requests_aborted"]
    body = {"model": MODEL, "prompt": "a long answer please", "max_tokens": 200, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=TIMEOUT) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk received: hang up
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = async_engine.metrics
        if m["requests_aborted"] > before and m["kv_pages_used"] == 0 and async_engine.num_in_flight == 0:
            break
        time.sleep(0.1)
    m = async_engine.metrics
    assert m["requests_aborted"] > before and m["kv_pages_used"] == 0


def test_health_and_prometheus_metrics(server):
    url = server[0]
    assert httpx.get(f"{url}/health", timeout=TIMEOUT).json() == {"status": "ok"}
    text = httpx.get(f"{url}/metrics", timeout=TIMEOUT).text
    for name in ("llmopt_requests_running", "llmopt_requests_waiting", "llmopt_kv_pages_used", "llmopt_kv_pages_free",
                 "llmopt_prefix_cache_hits_total", "llmopt_prefix_cache_hit_rate", "llmopt_generation_tokens_per_s",
                 'llmopt_ttft_seconds_bucket{le="+Inf"}', "llmopt_ttft_seconds_count"):
        assert f"\n{name} " in "\n" + text, name
    hits = float(text.split("\nllmopt_prefix_cache_hits_total ")[1].split()[0])
    assert hits > 0  # the repeated chat prompts above share their template pages


def test_draining_refuses_new_requests(server):
    # Last test of the module: the server refuses new work once draining (SIGTERM's first half).
    url, app, _, _ = server
    app.state.draining = True
    try:
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi"}, timeout=TIMEOUT)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert httpx.get(f"{url}/health", timeout=TIMEOUT).status_code == 503
    finally:
        app.state.draining = False
