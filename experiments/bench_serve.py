"""Serving benchmark: continuous batching vs static batching vs one request at a time vs llama.cpp's server.

    python -m experiments.bench_serve --config=configs/bench_serve.py:default --workdir=runs/bench_serve

Starts each server itself on 127.0.0.1 (``experiments.serve`` with ``engine.mode=continuous``, ``static``, or
``max_running=1``; ``llama_cpp.server`` on an F32 GGUF of the same weights), warms it up with a trace of the same
distribution, sends the measured trace (mixed prompt lengths from Python's docs, mixed max_tokens, greedy, streamed,
at most ``concurrency`` in flight) and stops it with SIGTERM. Writes results.json: ``{engine}_output_tokens_per_s``,
``{engine}_ttft_p99_s``, ``{engine}_failed`` (null for llamacpp when llama-cpp-python is absent) and the rest of
vLLM's ``bench serve`` metrics per engine (request throughput; TTFT, TPOT, ITL and end-to-end latency mean/p50/p99),
``concurrency``, ``num_requests``, speed-up ratios; and throughput_latency.png.
"""

from llmopt_jax import cli

ENGINES = ("continuous", "static", "sequential", "llamacpp")
REPORTED = ("output_tokens_per_s", "request_throughput", "completed", "failed", "seconds", "output_tokens",
            "prompt_tokens", "ttft_mean_s", "ttft_p50_s", "ttft_p99_s", "tpot_mean_s", "tpot_p50_s", "tpot_p99_s",
            "itl_mean_s", "itl_p50_s", "itl_p99_s", "e2e_mean_s", "e2e_p50_s", "e2e_p99_s",
            "tokens_counted_from")


def main(config, workdir):
    from llmopt_jax.config_checks import parse_list
    from llmopt_jax.errors import ConfigError

    engines = parse_list(config.engines, "engines", str, example="continuous,static,sequential,llamacpp")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise ConfigError(f"engines: unknown {unknown}; choose from {list(ENGINES)}")
    if config.concurrency < 1 or config.num_requests < 1 or config.request_rate < 0 or config.warmup_requests < 0:
        raise ConfigError("bench_serve needs concurrency >= 1, num_requests >= 1, request_rate >= 0, warmup_requests >= 0")
    if not 1 <= config.prompt_words_min <= config.prompt_words_max:
        raise ConfigError("need 1 <= prompt_words_min <= prompt_words_max")
    if not 1 <= config.max_tokens_min <= config.max_tokens_max:
        raise ConfigError("need 1 <= max_tokens_min <= max_tokens_max")

    import asyncio
    import importlib.util
    import os
    import sys

    from benchmarks.serve_load import (ServerProcess, free_port, llamacpp_argv, make_trace, run_trace, serve_argv,
                                       summarize)
    from llmopt_jax.cli import ROOT
    from llmopt_jax.data.text import default_text
    from llmopt_jax.jsonio import write_json

    workdir = cli.prepare_workdir(config, workdir)
    text = default_text()
    words = (config.prompt_words_min, config.prompt_words_max)
    max_tokens = (config.max_tokens_min, config.max_tokens_max)
    trace = make_trace(text, config.num_requests, words, max_tokens, config.request_rate, config.seed)
    warmup = make_trace(text, config.warmup_requests, words, max_tokens, 0.0, config.seed + 1)
    results: dict = {"concurrency": config.concurrency, "num_requests": config.num_requests,
                     "request_rate": config.request_rate, "model": config.model, "engines": engines}
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    base = dict(config.engine.to_dict())

    def overrides(engine: str) -> dict:
        o = {f"engine.{k}": v for k, v in base.items()}
        o["engine.mode"] = "static" if engine == "static" else "continuous"
        running = 1 if engine == "sequential" else config.concurrency
        o["engine.max_running"] = running
        o["engine.min_batch_bucket"] = running  # one decode batch shape: fewer executables to compile
        return o

    def measure(engine: str, server: ServerProcess, model_name: str) -> dict:
        if warmup:
            asyncio.run(run_trace(server.url, model_name, warmup, config.concurrency, config.request_timeout,
                                  config.run_timeout))
        res, seconds = asyncio.run(run_trace(server.url, model_name, trace, config.concurrency,
                                             config.request_timeout, config.run_timeout))
        return summarize(res, seconds)

    for engine in engines:
        port = free_port()
        log = os.path.join(workdir, f"server_{engine}.log")
        if engine == "llamacpp":
            why = ("llama-cpp-python not installed" if importlib.util.find_spec("llama_cpp") is None else
                   "the smoke model is random and has no GGUF" if config.model == "smoke" and not config.llamacpp_gguf
                   else "")
            if why:
                print(f"llamacpp: skipped ({why}; pip install '.[reference]' for llama.cpp); null results",
                      file=sys.stderr)
                results.update({f"llamacpp_{k}": None for k in REPORTED})
                results["llamacpp_skipped"] = why
                continue
            gguf = config.llamacpp_gguf or _write_f32_gguf(config.model, os.path.join(workdir, "model_f32.gguf"))
            argv = llamacpp_argv(gguf, port, base["max_model_len"], config.threads)
            model_name = "model"
        else:
            argv = serve_argv(config.serve_preset, config.model, port, os.path.join(workdir, f"server_{engine}"),
                              overrides(engine))
            model_name = os.path.basename(config.model)
        print(f"{engine}: starting the server on port {port}", file=sys.stderr, flush=True)
        health = "/v1/models" if engine == "llamacpp" else "/health"
        # llama.cpp's OpenMP threads spin while idle unless told not to; on a 2-core machine the load generator
        # then waits behind them.
        server_env = {**env, "OMP_WAIT_POLICY": env.get("OMP_WAIT_POLICY", "PASSIVE")} if engine == "llamacpp" else env
        with ServerProcess(argv, port, log, config.startup_timeout, cwd=ROOT, env=server_env,
                           health_path=health) as server:
            summary = measure(engine, server, model_name)
        results.update({f"{engine}_{k}": summary[k] for k in REPORTED})
        results[f"{engine}_errors"] = summary["errors"]
        results[f"{engine}_server_exit_code"] = server.returncode
        print(f"{engine}: {summary['output_tokens_per_s']:.1f} output tokens/s, TTFT p99 "
              f"{summary['ttft_p99_s']} s, {summary['failed']} failed", file=sys.stderr, flush=True)
        write_json(os.path.join(workdir, "results.json"), results)

    def ratio(a: str, b: str):
        x, y = results.get(f"{a}_output_tokens_per_s"), results.get(f"{b}_output_tokens_per_s")
        return x / y if x and y else None

    for other in ("static", "sequential", "llamacpp"):
        if "continuous" in engines and other in engines:
            results[f"continuous_vs_{other}_throughput"] = ratio("continuous", other)
    write_json(os.path.join(workdir, "results.json"), results)
    _plot(results, engines, os.path.join(workdir, "throughput_latency.png"))
    for engine in engines:
        tps = results.get(f"{engine}_output_tokens_per_s")
        if tps is not None:  # latencies are None when every request of an engine failed
            show = lambda key, spec: "n/a" if results[key] is None else format(results[key], spec)  # noqa: E731
            print(f"{engine:>11}: {tps:8.1f} output tok/s  TTFT p99 {show(f'{engine}_ttft_p99_s', '.3f')} s  "
                  f"e2e p50 {show(f'{engine}_e2e_p50_s', '.2f')} s  failed {results[f'{engine}_failed']}")


def _write_f32_gguf(model: str, path: str) -> str:
    from llmopt_jax.io.load import load_pretrained
    from llmopt_jax.io.save import save_model

    if not __import__("os").path.exists(path):
        save_model(load_pretrained(model), path, tensor_type="F32")
    return path


def _plot(results: dict, engines, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for engine in engines:
        x, y = results.get(f"{engine}_ttft_p99_s"), results.get(f"{engine}_output_tokens_per_s")
        if x is not None and y is not None:
            ax.scatter([x], [y], label=engine)
    ax.set_xlabel("p99 time to first token (s)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{results['model']}, concurrency {results['concurrency']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    cli.run(main)
