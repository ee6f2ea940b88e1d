"""Serve a model over an OpenAI-compatible HTTP API (continuous batching over a paged KV cache).

    python -m experiments.serve --config=configs/serve.py:smollm2 --config.port=8000
    curl -s 127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (stream, n, stop, max_tokens, temperature, top_p,
seed), /health, /metrics. SIGTERM drains (new requests 503, in-flight ones finish) and exits 0. Writes
WORKDIR/config.json, WORKDIR/server.json (url, pid, model) once listening, and WORKDIR/results.json (the engine's
counters) after the drain. The default workdir is runs/serve/PORT.
"""

from llmopt_jax import cli

DEFAULT_WORKDIR = "runs/serve/PORT"


def load_model(config):
    """The model named by ``config.model`` (``smoke`` = the random smoke-sized model)."""
    from llmopt_jax.io.load import load_pretrained
    from llmopt_jax.serve.smoke import SMOKE_NAME, smoke_model

    if config.model == SMOKE_NAME:
        return smoke_model(dtype=config.dtype, param_dtype=config.dtype, scan_layers=config.scan_layers)
    return load_pretrained(config.model, dtype=config.dtype, param_dtype=config.dtype, scan_layers=config.scan_layers)


def main(config, workdir):
    import os
    import socket
    import sys

    from llmopt_jax.errors import ConfigError
    from llmopt_jax.jsonio import write_json
    from llmopt_jax.serve.engine import Engine, EngineConfig, EngineStats
    from llmopt_jax.serve.http import AsyncEngine, create_app, serve
    from llmopt_jax.serve.scheduler import SamplingParams

    if not 0 < config.port < 65536:
        raise ConfigError(f"port must be in 1..65535, got {config.port}")
    engine_config = EngineConfig(**config.engine.to_dict())
    with socket.socket() as probe:  # a taken port is the user's mistake: one line, before the model loads
        try:
            probe.bind((config.host, config.port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {config.host}:{config.port}: {e.strerror}") from None
    workdir = cli.prepare_workdir(config, workdir.replace("PORT", str(config.port)))
    model = load_model(config)
    tokenizer = model.require_tokenizer() if hasattr(model, "require_tokenizer") else model.tokenizer
    strategy = None
    if int(config.speculative.draft_layers):
        from llmopt_jax.serve.speculative import SelfSpeculativeDecode

        if not int(config.speculative.draft_layers) < model.cfg.num_layers:
            raise ConfigError(f"speculative.draft_layers={config.speculative.draft_layers} must be below the model's "
                              f"{model.cfg.num_layers} layers")
        strategy = SelfSpeculativeDecode(int(config.speculative.draft_layers), int(config.speculative.num_draft))
    engine = Engine(model, config=engine_config, tokenizer=tokenizer, decode_strategy=strategy)
    if config.warmup:  # compiles the prefill and both decode executables before the first client waits on them
        engine.generate([tokenizer.encode("warm up")], SamplingParams(max_tokens=engine_config.max_decode_steps + 2))
        engine.stats = EngineStats()  # the warm-up's compile time is no client's TTFT
    name = config.served_name or os.path.basename(config.model)
    async_engine = AsyncEngine(engine)
    app = create_app(async_engine, tokenizer, name, request_timeout=config.request_timeout)
    url = f"http://{config.host}:{config.port}"

    def ready():
        write_json(os.path.join(workdir, "server.json"), {"url": url, "pid": os.getpid(), "model": name})
        print(f"serving {name} on {url} (SIGTERM drains and stops)", file=sys.stderr, flush=True)

    serve(app, async_engine, config.host, config.port, drain_timeout=config.drain_timeout,
          log_level=config.log_level, on_ready=ready)
    write_json(os.path.join(workdir, "results.json"), {k: v for k, v in engine.metrics().items()})
    print("drained; stopped", file=sys.stderr, flush=True)


if __name__ == "__main__":
    cli.run(main, default_workdir=DEFAULT_WORKDIR)
