"""The serving CLIs as subprocesses on 127.0.0.1: ``experiments.serve`` (smoke preset) answers, drains on SIGTERM
(the in-flight stream finishes, the process exits 0 and writes results.json); ``experiments.bench_serve`` (smoke,
a few requests) writes the contract keys; config mistakes exit 2 with one line. Every server is killed in a
``finally``; every request has a timeout."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from benchmarks.serve_load import free_port, wait_until_healthy
from conftest import ROOT, run_cli

STARTUP = 240.0


@pytest.mark.slow
def test_serve_answers_then_drains_on_sigterm_and_exits_0(tmp_path):
    """Also with self-speculative decoding switched on (greedy requests)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.serve", "--config=configs/serve.py:smoke", f"--config.port={port}",
         "--config.engine.max_decode_steps=2", "--config.speculative.draft_layers=1",
         "--config.speculative.num_draft=1", f"--workdir={tmp_path}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def alive():
            assert proc.poll() is None, proc.stdout.read()

        assert wait_until_healthy(url, STARTUP, alive), "server did not start"
        assert json.load(open(tmp_path / "server.json"))["url"] == url
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "smoke", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4

        # A long stream is in flight when SIGTERM arrives: it still completes; the server then exits 0.
        lines: list[str] = []
        started = threading.Event()

        def stream():
            body = {"model": "smoke", "prompt": "drain me", "max_tokens": 150, "stream": True, "temperature": 0}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as resp:
                for line in resp.iter_lines():
                    lines.append(line)
                    started.set()

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        assert started.wait(60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:  # while draining: 503, or the listener is already closed
            refused = httpx.post(f"{url}/v1/completions", json={"model": "smoke", "prompt": "x"}, timeout=10)
            assert refused.status_code == 503
        except httpx.TransportError:
            pass
        t.join(120)
        assert lines and lines[-1] == "data: [DONE]" or "data: [DONE]" in lines
        assert proc.wait(timeout=120) == 0
        results = json.load(open(tmp_path / "results.json"))
        assert results["requests_finished"] >= 2 and results["kv_pages_used"] == 0
        assert results["speculative_proposed"] > 0  # greedy requests decoded with the self-draft
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stdout.close()


@pytest.mark.slow
def test_bench_serve_smoke_writes_the_contract_keys(tmp_path):
    r = run_cli(["experiments.bench_serve", "--config=configs/bench_serve.py:smoke", "--config.num_requests=6",
                 "--config.warmup_requests=2", "--config.max_tokens_max=8", "--config.prompt_words_max=20",
                 "--config.concurrency=4", f"--workdir={tmp_path}"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(tmp_path / "results.json"))
    assert res["concurrency"] == 4 and res["num_requests"] == 6
    for engine in ("continuous", "static", "sequential"):
        assert res[f"{engine}_failed"] == 0 and res[f"{engine}_output_tokens_per_s"] > 0
        assert res[f"{engine}_tokens_counted_from"] == "usage"  # our server reports usage in every stream
        assert res[f"{engine}_ttft_p99_s"] > 0 and res[f"{engine}_server_exit_code"] == 0
    for key in ("llamacpp_output_tokens_per_s", "llamacpp_ttft_p99_s", "llamacpp_failed"):
        assert key in res and res[key] is None  # no llama.cpp peer for the random smoke model
    assert res["llamacpp_skipped"]
    assert (tmp_path / "throughput_latency.png").exists()


@pytest.mark.parametrize("args, message", [
    (["experiments.serve", "--config=configs/serve.py:smoke", "--config.port=0"], "port"),
    (["experiments.serve", "--config=configs/serve.py:smoke", "--config.engine.policy=lifo"], "policy"),
    (["experiments.serve", "--config=configs/serve.py:nope"], "preset"),
    (["experiments.bench_serve", "--config=configs/bench_serve.py:smoke", "--config.engines=continuous,vllm"],
     "engines"),
    (["experiments.bench_serve", "--config=configs/bench_serve.py:smoke", "--config.concurrency=0"], "concurrency"),
])
def test_config_mistakes_exit_2_with_one_line(tmp_path, args, message):
    r = run_cli(args + [f"--workdir={tmp_path}/w"], timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().startswith("error:") and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "w" / "results.json")
