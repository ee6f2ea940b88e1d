"""The load generator's stream accounting: usage when the server reports it, streamed token chunks when it does not
(llama-cpp-python's server ignores ``stream_options.include_usage``), and a stream without ``[DONE]`` is a failure."""

import asyncio
import json

import httpx
import pytest

from benchmarks.serve_load import TraceRequest, _one, summarize


def _sse(chunks, done=True) -> bytes:
    lines = [f"data: {json.dumps(c)}\n\n" for c in chunks] + (["data: [DONE]\n\n"] if done else [])
    return "".join(lines).encode()


def _request(body: bytes):
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body,
                                                                   headers={"content-type": "text/event-stream"}))

    async def go():
        async with httpx.AsyncClient(transport=transport) as client:
            return await _one(client, "http://127.0.0.1:1", "m", TraceRequest("hi", 8, 0.0), timeout=10)

    return asyncio.run(go())


def _token(text, finish=None):
    return {"choices": [{"text": text, "index": 0, "finish_reason": finish}]}


@pytest.mark.parametrize("with_usage", [True, False])
def test_output_tokens_from_usage_or_from_token_chunks(with_usage):
    chunks = [_token("A"), _token(" list"), _token(" is"), _token("", "length")]
    if with_usage:
        chunks.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}})
    r = _request(_sse(chunks))
    assert r.ok and r.output_tokens == 3 and r.usage_reported is with_usage
    assert r.prompt_tokens == (5 if with_usage else 0) and len(r.itls) == 3  # the finishing chunk is timed too
    summary = summarize([r], 1.0)
    assert summary["tokens_counted_from"] == ("usage" if with_usage else "stream chunks")
    assert summary["output_tokens_per_s"] == 3.0


def test_a_stream_without_done_fails():
    r = _request(_sse([_token("A")], done=False))
    assert not r.ok and r.error == "the stream ended without [DONE]"
    assert summarize([r], 1.0)["failed"] == 1
