"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the continuous-batching engine.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (the model's chat template;
``stream: true`` sends server-sent events ending with ``data: [DONE]``; ``usage`` with prompt, completion and total
tokens, also in the stream with ``stream_options.include_usage``; ``n``, ``stop``, ``max_tokens``,
``temperature``, ``top_p``, ``top_k``, ``seed``), ``GET /health`` and ``GET /metrics`` (Prometheus text).

Bad requests get OpenAI-style JSON errors (``{"error": {"message", "type", "param", "code"}}``): malformed JSON 400,
invalid fields 422, unknown model 404, prompt plus ``max_tokens`` beyond the context 400; a failure inside the
engine fails the requests it touched (500), never the server. A client that disconnects cancels its request and
frees its pages. SIGTERM (or SIGINT) drains: new requests get 503, in-flight ones finish, then :func:`serve`
returns (the process exits 0); a second signal stops at once.

The engine runs in one background thread (:class:`AsyncEngine`); JAX releases the GIL while a step computes, so the
event loop keeps accepting requests and streaming tokens meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import queue
import signal
import threading
import time
import uuid
from typing import Any, Literal

from fastapi import Request  # module level: FastAPI resolves the handlers' annotations by name

from llmopt_jax.errors import LlmoptError
from llmopt_jax.serve.engine import TTFT_BUCKETS, Engine, RequestOutput, TokenLogprob
from llmopt_jax.serve.scheduler import MAX_TOP_LOGPROBS, SamplingParams

MAX_N = 16


# ----------------------------------------------------------------------------------------------- engine thread
class AsyncEngine:
    """Runs :class:`Engine` steps in a background thread; coroutines submit requests and read their outputs from
    an ``asyncio.Queue`` (one :class:`RequestOutput` per step that produced something)."""

    def __init__(self, engine: Engine, idle_wait: float = 0.05):
        self.engine = engine
        self.idle_wait = idle_wait
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.metrics: dict = engine.metrics()
        self._throughput: collections.deque = collections.deque(maxlen=64)  # (time, generated tokens)
        self.step_errors = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    def submit(self, prompt: list[int], params: SamplingParams, n: int = 1) -> tuple[str, asyncio.Queue]:
        """Queues a request (call from the event loop); returns its id and the queue its outputs arrive on."""
        request_id = uuid.uuid4().hex
        out: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = (asyncio.get_running_loop(), out, n)
        self._inbox.put(("add", request_id, prompt, params, n, time.monotonic()))
        self._wake.set()
        return request_id, out

    def abort(self, request_id: str) -> None:
        if self._queues.pop(request_id, None) is not None:
            self._inbox.put(("abort", request_id))
            self._wake.set()

    def _deliver(self, output: RequestOutput) -> None:
        entry = self._queues.get(output.request_id)
        if entry is not None:
            loop, out, _ = entry
            loop.call_soon_threadsafe(out.put_nowait, output)

    def _fail(self, request_id: str, message: str, n: int) -> None:
        entry = self._queues.pop(request_id, None)
        if entry is not None:
            for stream in range(n):
                entry[0].call_soon_threadsafe(entry[1].put_nowait, RequestOutput(
                    request_id, stream, [], "", True, "error", 0, 0, error=message))

    def _run(self) -> None:
        engine = self.engine
        finished: dict[str, int] = collections.defaultdict(int)
        while not self._stop:
            while True:
                try:
                    cmd = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if cmd[0] == "add":
                    _, rid, prompt, params, n, arrival = cmd
                    if rid not in self._queues:  # aborted before it was added
                        continue
                    try:
                        engine.add_request(prompt, params, request_id=rid, n=n, arrival=arrival)
                    except LlmoptError as e:
                        self._fail(rid, str(e), n)
                else:
                    engine.abort(cmd[1])
                    finished.pop(cmd[1], None)
            if not engine.has_unfinished():
                self._wake.wait(self.idle_wait)
                self._wake.clear()
                self.metrics = engine.metrics()
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
                self.step_errors += 1
                message = f"engine step failed: {type(e).__name__}: {e}"
                for rid in {seq_id for seq_id, _ in engine.requests}:
                    n = self._queues.get(rid, (None, None, 1))[2]
                    engine.abort(rid)
                    self._fail(rid, message, n)
                continue
            for o in outputs:
                self._deliver(o)
                if o.finished:
                    finished[o.request_id] += 1
                    entry = self._queues.get(o.request_id)
                    if entry is None or finished[o.request_id] >= entry[2]:
                        self._queues.pop(o.request_id, None)
                        finished.pop(o.request_id, None)
            self.metrics = engine.metrics()
            self._throughput.append((time.monotonic(), self.metrics["generated_tokens"]))

    def tokens_per_s(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last ``window`` seconds of steps."""
        points = list(self._throughput)
        now = time.monotonic()
        recent = [p for p in points if now - p[0] <= window]
        if len(recent) < 2 or recent[-1][0] <= recent[0][0]:
            return 0.0
        return (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])


# ----------------------------------------------------------------------------------------------- request bodies
def _models():
    from pydantic import BaseModel, ConfigDict, Field

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class Common(BaseModel):
        model_config = ConfigDict(extra="allow")
        model: str
        max_tokens: int | None = Field(None, ge=1, le=1_000_000)
        temperature: float = Field(1.0, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        top_k: int = Field(0, ge=0, le=1_000_000)
        n: int = Field(1, ge=1, le=MAX_N)
        stream: bool = False
        stream_options: StreamOptions | None = None
        stop: str | list[str] | None = None
        seed: int | None = Field(None, ge=0, le=2**63 - 1)

    class Completion(Common):
        prompt: str | list[int] | list[str]
        max_tokens: int | None = Field(16, ge=1, le=1_000_000)
        logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # alternatives per token (legacy API)

    class Message(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: Literal["system", "user", "assistant", "developer", "tool"]
        content: str | list[dict[str, Any]] | None = None

    class Chat(Common):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
        logprobs: bool = False
        top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    return Completion, Chat


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _text_of(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, "only text content parts are supported", param="messages")
        parts.append(part["text"])
    return "".join(parts)


# ----------------------------------------------------------------------------------------------- the app
def create_app(async_engine: AsyncEngine, tokenizer, model_name: str, *, request_timeout: float = 600.0):
    """The FastAPI app serving ``async_engine`` as ``model_name`` (``tokenizer``: encode/decode, chat template,
    ``stop_ids``, ``bos_id``/``add_bos``)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    Completion, Chat = _models()
    engine = async_engine.engine
    app = FastAPI(title="llmopt_jax", docs_url=None, redoc_url=None)
    app.state.draining = False
    created = int(time.time())
    eos = () if getattr(tokenizer, "eos_id", None) is None else (tokenizer.eos_id,)

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error",
                                       code="not_found" if e.status_code == 404 else None), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        return JSONResponse(error_body(str(e), "invalid_request_error"), status_code=422)

    @app.exception_handler(Exception)
    async def _internal_error(_, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    @app.middleware("http")
    async def _refuse_while_draining(request: Request, call_next):
        if app.state.draining and request.url.path.startswith("/v1/") and request.method == "POST":
            return JSONResponse(error_body("the server is shutting down", "service_unavailable"), status_code=503)
        return await call_next(request)

    async def parse(request: Request, model_cls):
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the JSON body must be an object")
        try:
            body = model_cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise APIError(422, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None
        if body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return body

    def sampling(body, prompt_len: int, max_tokens: int | None, stop_ids, logprobs: int | None) -> SamplingParams:
        if max_tokens is None:  # OpenAI's chat default: until the context is full
            max_tokens = max(1, engine.max_model_len - prompt_len)
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if any(not s for s in stop) or len(stop) > 4:
            raise APIError(422, "stop: up to 4 non-empty strings", param="stop")
        if prompt_len + max_tokens > engine.max_model_len:
            raise APIError(400, f"this model's maximum context length is {engine.max_model_len} tokens; the prompt "
                                f"has {prompt_len} and max_tokens is {max_tokens}", param="max_tokens",
                           code="context_length_exceeded")
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
                                    top_p=body.top_p, seed=None if body.seed is None else body.seed % 2**31,
                                    stop_ids=tuple(stop_ids), stop=stop, logprobs=logprobs)
            engine.scheduler.check_fits(prompt_len, max_tokens)
        except LlmoptError as e:
            raise APIError(400, str(e)) from None
        if logprobs is not None and not engine.supports_logprobs:
            raise APIError(400, "logprobs are not available from this server: it decodes speculatively",
                           param="logprobs")
        return params

    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id])

    def completion_logprobs(lps: list[TokenLogprob], offset: int) -> dict:
        """The legacy completions ``logprobs`` object; ``offset``: characters of the answer before these tokens."""
        tokens = [token_text(lp.token_id) for lp in lps]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{token_text(t): v for t, v in lp.top} for lp in lps], "text_offset": offsets}

    def chat_logprobs(lps: list[TokenLogprob]) -> dict:
        """The chat ``logprobs`` object; ``bytes`` are the UTF-8 bytes of each token's text (a token that ends inside
        a multi-byte character decodes to U+FFFD)."""
        def entry(token_id: int, logprob: float) -> dict:
            text = token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in lps], "refusal": None}

    def encode_prompt(text: str) -> list[int]:
        ids = tokenizer.encode(text)
        return [tokenizer.bos_id] + ids if getattr(tokenizer, "add_bos", False) else ids

    async def events(request: Request, rid: str, out: asyncio.Queue, n: int):
        """Yields the request's outputs until all ``n`` choices finished; aborts it on disconnect or timeout."""
        done = 0
        deadline = time.monotonic() + request_timeout
        try:
            while done < n:
                try:
                    o = await asyncio.wait_for(out.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected() or time.monotonic() > deadline:
                        return
                    continue
                if o.error is not None:
                    raise APIError(500, o.error, "server_error")
                done += o.finished
                yield o
        finally:
            if done < n:
                async_engine.abort(rid)

    def usage(prompt_tokens: int, completion: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    async def respond(request: Request, body, prompt: list[int], params: SamplingParams, chat: bool):
        prefix = "chatcmpl" if chat else "cmpl"
        obj = "chat.completion" if chat else "text_completion"
        rid, out = async_engine.submit(prompt, params, body.n)
        response_id = f"{prefix}-{rid}"

        want_logprobs = params.logprobs is not None

        def logprobs_of(lps: list[TokenLogprob], offset: int) -> dict | None:
            if not want_logprobs:
                return None
            return chat_logprobs(lps) if chat else completion_logprobs(lps, offset)

        if not body.stream:
            texts = [""] * body.n
            reasons: list[str | None] = [None] * body.n
            counts = [0] * body.n
            token_lps: list[list[TokenLogprob]] = [[] for _ in range(body.n)]
            async for o in events(request, rid, out, body.n):
                texts[o.stream] += o.text
                counts[o.stream] = o.completion_tokens
                token_lps[o.stream] += o.logprobs or []
                if o.finished:
                    reasons[o.stream] = o.finish_reason
            if any(r is None for r in reasons):
                raise APIError(408, "the request was cancelled or timed out", "timeout")
            choices = [
                {"index": i, "message": {"role": "assistant", "content": texts[i]},
                 "logprobs": logprobs_of(token_lps[i], 0), "finish_reason": reasons[i]} if chat else
                {"index": i, "text": texts[i], "logprobs": logprobs_of(token_lps[i], 0), "finish_reason": reasons[i]}
                for i in range(body.n)
            ]
            return JSONResponse({"id": response_id, "object": obj, "created": int(time.time()), "model": model_name,
                                 "choices": choices, "usage": usage(len(prompt), sum(counts))})

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices, extra=None) -> str:
            data = {"id": response_id, "object": chunk_obj, "created": int(time.time()), "model": model_name,
                    "choices": choices}
            if extra:
                data.update(extra)
            return f"data: {json.dumps(data)}\n\n"

        async def stream():
            counts = [0] * body.n
            # Tokens whose text is held back (an unfinished UTF-8 character or stop string) wait for the chunk that
            # carries it, so each chunk's logprobs describe the tokens behind its text.
            held: list[list[TokenLogprob]] = [[] for _ in range(body.n)]
            offsets = [0] * body.n
            try:
                if chat:
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None} for i in range(body.n)])
                async for o in events(request, rid, out, body.n):
                    counts[o.stream] = o.completion_tokens
                    held[o.stream] += o.logprobs or []
                    if o.text or o.finished:
                        delta = {"content": o.text} if o.text else {}
                        lps, held[o.stream] = held[o.stream], []
                        choice = {"index": o.stream, "logprobs": logprobs_of(lps, offsets[o.stream]),
                                  "finish_reason": o.finish_reason}
                        offsets[o.stream] += len(o.text)
                        choice.update({"delta": delta} if chat else {"text": o.text})
                        yield chunk([choice])
                if include_usage:
                    yield chunk([], {"usage": usage(len(prompt), sum(counts))})
            except APIError as e:
                yield f"data: {json.dumps(error_body(e.message, e.kind))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, Completion)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "a list of several prompts is not supported; send one request each",
                               param="prompt")
            prompt = prompt[0]
        ids = encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if any(not 0 <= t < engine.cfg.vocab_size for t in ids):
            raise APIError(400, f"prompt token ids must lie in [0, {engine.cfg.vocab_size})", param="prompt")
        params = sampling(body, len(ids), body.max_tokens, eos, body.logprobs)
        return await respond(request, body, ids, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse(request, Chat)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text_of(m.content)}
                    for m in body.messages]
        ids = encode_prompt(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        max_tokens = body.max_completion_tokens or body.max_tokens
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        params = sampling(body, len(ids), max_tokens, tokenizer.stop_ids,
                          (body.top_logprobs or 0) if body.logprobs else None)
        return await respond(request, body, ids, params, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "llmopt_jax", "max_model_len": engine.max_model_len}]}

    @app.get("/health")
    async def health():
        if app.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(async_engine), media_type="text/plain; version=0.0.4")

    return app


def prometheus_text(async_engine: AsyncEngine) -> str:
    """The engine's gauges, counters and TTFT histogram in the Prometheus text format."""
    m = dict(async_engine.metrics)
    lines = []

    def metric(name: str, kind: str, text: str, value) -> None:
        lines.extend([f"# HELP llmopt_{name} {text}", f"# TYPE llmopt_{name} {kind}", f"llmopt_{name} {value}"])

    metric("requests_running", "gauge", "Sequences in the running batch.", m["running"])
    metric("requests_waiting", "gauge", "Sequences waiting to be admitted.", m["waiting"])
    metric("kv_pages_used", "gauge", "KV cache pages referenced by sequences.", m["kv_pages_used"])
    metric("kv_pages_free", "gauge", "KV cache pages free or evictable.", m["kv_pages_free"])
    metric("kv_pages_total", "gauge", "KV cache pages in the pool.", m["kv_pages_total"])
    metric("prefix_cache_queries_total", "counter", "Full prompt pages looked up in the prefix cache.",
           m["prefix_cache_queries"])
    metric("prefix_cache_hits_total", "counter", "Full prompt pages found in the prefix cache.",
           m["prefix_cache_hits"])
    rate = m["prefix_cache_hits"] / m["prefix_cache_queries"] if m["prefix_cache_queries"] else 0.0
    metric("prefix_cache_hit_rate", "gauge", "Prefix cache hits per query.", f"{rate:.6g}")
    metric("preemptions_total", "counter", "Sequences preempted by recomputation.", m["preemptions"])
    metric("requests_received_total", "counter", "Requests accepted by the engine.", m["requests_received"])
    metric("requests_finished_total", "counter", "Request choices finished.", m["requests_finished"])
    metric("requests_aborted_total", "counter", "Request choices cancelled (client gone).", m["requests_aborted"])
    metric("prompt_tokens_total", "counter", "Prompt tokens prefilled (prefix-cache hits excluded).",
           m["prompt_tokens_computed"])
    metric("generation_tokens_total", "counter", "Tokens generated.", m["generated_tokens"])
    metric("generation_tokens_per_s", "gauge", "Tokens generated per second over the last 10 s.",
           f"{async_engine.tokens_per_s():.6g}")
    metric("engine_steps_total", "counter", "Engine steps run.", m["steps"])
    if "speculative_proposed" in m:
        metric("speculative_draft_tokens_total", "counter", "Draft tokens proposed.", m["speculative_proposed"])
        metric("speculative_accepted_tokens_total", "counter", "Draft tokens the target kept.",
               m["speculative_accepted"])
    metric("engine_step_errors_total", "counter", "Engine steps that raised.", async_engine.step_errors)
    lines += ["# HELP llmopt_ttft_seconds Time from arrival to the first generated token.",
              "# TYPE llmopt_ttft_seconds histogram"]
    for edge, count in zip(TTFT_BUCKETS, m["ttft_buckets"]):
        lines.append(f'llmopt_ttft_seconds_bucket{{le="{edge}"}} {count}')
    lines += [f'llmopt_ttft_seconds_bucket{{le="+Inf"}} {m["ttft_count"]}',
              f"llmopt_ttft_seconds_sum {m['ttft_sum']:.6g}", f"llmopt_ttft_seconds_count {m['ttft_count']}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- serving
def make_server(app, async_engine: AsyncEngine, host: str = "127.0.0.1", port: int = 8000, *,
                drain_timeout: float = 600.0, log_level: str = "warning", on_ready=None):
    """A uvicorn server for ``app`` that drains on SIGTERM/SIGINT (or :meth:`begin_drain`): new requests get 503,
    in-flight ones finish (at most ``drain_timeout`` seconds), then it stops; a second signal stops at once.
    ``run()`` it in the main thread (signals), or in another thread with ``should_exit`` to stop it."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        draining_since: float | None = None

        @contextlib.contextmanager
        def capture_signals(self):  # uvicorn re-raises the signal after shutdown (exit 143); we return instead
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        def _on_signal(self, sig, frame):
            if self.draining_since is not None:
                self.should_exit = self.force_exit = True
                return
            self.begin_drain()

        def begin_drain(self) -> None:
            self.draining_since = time.monotonic()
            app.state.draining = True

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            # Called before the event loop serves the first request on the new sockets: whoever sees the server
            # answer (/health) also finds what on_ready wrote (server.json), with no window in between.
            if self.started and on_ready is not None:
                on_ready()

        async def on_tick(self, counter: int) -> bool:
            if self.draining_since is not None and (
                    async_engine.num_in_flight == 0 or time.monotonic() - self.draining_since > drain_timeout):
                self.should_exit = True
            return await super().on_tick(counter)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30,
                            access_log=False, lifespan="off")
    return DrainingServer(config)


def serve(app, async_engine: AsyncEngine, host: str = "127.0.0.1", port: int = 8000, *, drain_timeout: float = 600.0,
          log_level: str = "warning", on_ready=None) -> None:
    """Starts the engine thread and serves ``app`` until a signal has drained it (see :func:`make_server`)."""
    server = make_server(app, async_engine, host, port, drain_timeout=drain_timeout, log_level=log_level,
                         on_ready=on_ready)
    async_engine.start()
    try:
        server.run()
    finally:
        async_engine.stop()
