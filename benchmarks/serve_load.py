"""A bounded load generator for OpenAI-compatible servers (asyncio + httpx, 127.0.0.1 only) and the server
lifecycle of ``experiments/bench_serve.py``.

A trace is a list of requests: prompts of mixed lengths cut from text that ships with Python, mixed ``max_tokens``,
arrival times from a Poisson process (``rate`` requests/s) or all at once (``rate`` 0); at most ``concurrency``
requests are in flight. Every request streams (``/v1/completions``, ``stream: true``) so time to first token (TTFT),
inter-token latencies (ITL: gaps between streamed chunks, per token) and time per output token (TPOT) are measured as
vLLM's ``bench serve`` reports them. Every request has a timeout and the whole run a deadline: the generator always
stops by itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable

import numpy as np

LOOPBACK = "127.0.0.1"


@dataclasses.dataclass
class TraceRequest:
    prompt: str
    max_tokens: int
    arrival: float  # seconds after the start


@dataclasses.dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = float("nan")
    e2e: float = float("nan")
    itls: list[float] = dataclasses.field(default_factory=list)
    error: str = ""
    usage_reported: bool = False  # False: the server sent no usage; output_tokens counts its streamed token chunks


def make_trace(text: str, num: int, words: tuple[int, int], max_tokens: tuple[int, int], rate: float, seed: int
               ) -> list[TraceRequest]:
    """``num`` requests: prompts of ``words`` (min, max) consecutive words from ``text`` at random offsets,
    ``max_tokens`` in (min, max), both log-uniform (many short, a few long: the long tail of real traces), Poisson
    arrivals at ``rate``/s (0 = all at time 0)."""
    rng = np.random.default_rng(seed)
    tokens = text.split()
    out = []
    t = 0.0
    for _ in range(num):
        n = int(np.exp(rng.uniform(np.log(words[0]), np.log(words[1] + 1))))
        start = int(rng.integers(0, len(tokens) - n))
        if rate > 0:
            t += float(rng.exponential(1.0 / rate))
        new = int(np.exp(rng.uniform(np.log(max_tokens[0]), np.log(max_tokens[1] + 1))))
        out.append(TraceRequest(" ".join(tokens[start:start + n]), new, t))
    return out


async def _one(client, url: str, model: str, req: TraceRequest, timeout: float) -> RequestResult:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    last = None
    done_seen = False
    token_chunks = 0
    res = RequestResult(ok=False)
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                    return res
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done_seen = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        res.error = str(chunk["error"])[:200]
                        return res
                    now = time.perf_counter()
                    if chunk.get("choices"):
                        # A chunk without finish_reason carries one generated token (our server and
                        # llama-cpp-python's stream token by token); the last one only says why it stopped.
                        token_chunks += chunk["choices"][0].get("finish_reason") is None
                        if last is None:
                            res.ttft = now - t0
                        else:
                            res.itls.append(now - last)
                        last = now
                    if chunk.get("usage"):
                        res.usage_reported = True
                        res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                        res.output_tokens = chunk["usage"]["completion_tokens"]
        res.e2e = time.perf_counter() - t0
        # A request may end at once (its first token is EOS): zero output tokens is a complete answer. A server that
        # ignores stream_options.include_usage (llama-cpp-python's) is measured by its token chunks instead.
        res.ok = done_seen
        if not res.usage_reported:
            res.output_tokens = token_chunks
        if not res.ok:
            res.error = "the stream ended without [DONE]"
    except Exception as e:  # noqa: BLE001 - a failed request is a measured outcome, not a crash
        res.error = f"{type(e).__name__}: {e}"[:200]
    return res


async def run_trace(url: str, model: str, trace: list[TraceRequest], concurrency: int, request_timeout: float,
                    deadline: float) -> tuple[list[RequestResult], float]:
    """Sends ``trace`` (at most ``concurrency`` in flight); returns the results and the wall time in seconds."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(request_timeout), limits=limits) as client:
        start = time.perf_counter()

        async def scheduled(req: TraceRequest) -> RequestResult:
            delay = req.arrival - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            async with sem:
                return await _one(client, url, model, req, request_timeout)

        tasks = [asyncio.ensure_future(scheduled(r)) for r in trace]
        done, pending = await asyncio.wait(tasks, timeout=deadline)
        for t in pending:
            t.cancel()
        results = [t.result() if t in done else RequestResult(ok=False, error="run deadline") for t in tasks]
        return results, time.perf_counter() - start


def summarize(results: list[RequestResult], seconds: float) -> dict:
    """vLLM-style metrics: throughput, TTFT, TPOT, ITL, end-to-end latency (mean, p50, p99), failures."""
    ok = [r for r in results if r.ok]
    out = {"completed": len(ok), "failed": len(results) - len(ok), "seconds": seconds,
           "output_tokens": sum(r.output_tokens for r in ok), "prompt_tokens": sum(r.prompt_tokens for r in ok)}
    out["request_throughput"] = len(ok) / seconds if seconds else 0.0
    out["output_tokens_per_s"] = out["output_tokens"] / seconds if seconds else 0.0
    out["tokens_counted_from"] = "usage" if all(r.usage_reported for r in ok) else "stream chunks"

    def stats(name: str, values: list[float]) -> None:
        arr = np.asarray(values, np.float64)
        for key, fn in (("mean", np.mean), ("p50", lambda a: np.percentile(a, 50)),
                        ("p99", lambda a: np.percentile(a, 99))):
            out[f"{name}_{key}_s"] = float(fn(arr)) if arr.size else None

    stats("ttft", [r.ttft for r in ok])
    stats("tpot", [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1])
    stats("itl", [x for r in ok for x in r.itls])
    stats("e2e", [r.e2e for r in ok])
    errors = sorted({r.error for r in results if not r.ok})
    out["errors"] = errors[:5]
    return out


# ----------------------------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, timeout: float, check: Callable[[], None] = lambda: None,
                       interval: float = 0.25, path: str = "/health") -> bool:
    """Polls ``url + path`` until it answers 200 (True) or ``timeout`` seconds pass (False); ``check`` runs before
    each poll and may raise (e.g. when the server process has exited)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        check()
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


class ServerProcess:
    """A server subprocess on 127.0.0.1: started, waited for (``health_path`` answering 200 within
    ``startup_timeout``; llama-cpp-python's server has no ``/health``, it passes ``/v1/models``), stopped with
    SIGTERM (then SIGKILL after ``stop_timeout``) on exit, also when the benchmark fails."""

    def __init__(self, argv: list[str], port: int, log_path: str, startup_timeout: float, stop_timeout: float = 60.0,
                 cwd: str | None = None, env: dict | None = None, health_path: str = "/health"):
        self.health_path = health_path
        self.argv, self.port, self.log_path = argv, port, log_path
        self.startup_timeout, self.stop_timeout = startup_timeout, stop_timeout
        self.cwd, self.env = cwd, env
        self.proc: subprocess.Popen | None = None
        self.url = f"http://{LOOPBACK}:{port}"
        self.returncode: int | None = None

    def __enter__(self) -> "ServerProcess":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.cwd,
                                     env=self.env, start_new_session=True)

        def alive() -> None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during startup; see {self.log_path}")

        if not wait_until_healthy(self.url, self.startup_timeout, alive, path=self.health_path):
            self.__exit__(None, None, None)
            raise RuntimeError(f"server not healthy after {self.startup_timeout:.0f} s; see {self.log_path}")
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        if self.proc is not None:
            self.returncode = self.proc.returncode
        self._log.close()


def serve_argv(preset: str, model: str, port: int, workdir: str, overrides: dict) -> list[str]:
    """``python -m experiments.serve`` for our engine with ``--config.KEY=VALUE`` overrides."""
    argv = [sys.executable, "-m", "experiments.serve", f"--config=configs/serve.py:{preset}", f"--config.model={model}",
            f"--config.port={port}", f"--config.host={LOOPBACK}", f"--workdir={workdir}"]
    return argv + [f"--config.{k}={v}" for k, v in overrides.items()]


def llamacpp_argv(gguf: str, port: int, n_ctx: int, threads: int) -> list[str]:
    """llama-cpp-python's OpenAI-compatible server on ``gguf``.

    It runs one request at a time. ``--interrupt_requests False``: by default a request that arrives while another
    is streaming ends that stream early (``[DONE]`` after a few tokens, then "ASGI callable returned without
    completing response"), so under concurrent load every stream but the last was cut; queued instead, each request
    gets its whole answer and its wait shows in its TTFT."""
    return [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", LOOPBACK, "--port", str(port),
            "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--model_alias", "model",
            "--interrupt_requests", "False"]
