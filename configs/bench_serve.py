"""Serving benchmark presets: ``--config=configs/bench_serve.py:PRESET`` with PRESET in default, smoke.

``default`` serves SmolLM2-135M (float32) on CPU; ``smoke`` the random smoke-sized model (seconds). Both compare, on
the same trace, our server with continuous batching, the same engine with static batching, requests one at a time,
and llama.cpp's OpenAI-compatible server (llama-cpp-python, on an F32 GGUF of the same weights; skipped with null
results when it is not installed).
"""

from ml_collections import ConfigDict

from llmopt_jax.errors import ConfigError

PRESETS = {
    "default": dict(model="smollm2-135m", serve_preset="smollm2", num_requests=64, words=(8, 150),
                    max_tokens=(8, 192), warmup_requests=32, num_pages=512, max_model_len=512, prefill_budget=256),
    "smoke": dict(model="smoke", serve_preset="smoke", num_requests=48, words=(2, 30), max_tokens=(4, 192),
                  warmup_requests=16, num_pages=512, max_model_len=512, prefill_budget=256),
}


def get_config(preset: str = "default") -> ConfigDict:
    if preset not in PRESETS:
        raise ConfigError(f"unknown bench_serve preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    c = ConfigDict()
    c.preset = preset
    c.model = p["model"]  # what the servers serve (a name, GGUF, safetensors directory, or "smoke")
    c.serve_preset = p["serve_preset"]  # configs/serve.py preset the servers start from
    c.engines = "continuous,static,sequential,llamacpp"  # comma list, in run order
    c.concurrency = 16  # requests in flight at most (the batch of continuous/static batching)
    c.request_rate = 0.0  # Poisson arrivals per second; 0 = all queued at once (a closed loop at `concurrency`)
    c.num_requests = p["num_requests"]
    c.prompt_words_min, c.prompt_words_max = p["words"]  # prompt length in words of the Python docs (log-uniform)
    c.max_tokens_min, c.max_tokens_max = p["max_tokens"]  # each request's max_tokens (log-uniform)
    c.warmup_requests = p["warmup_requests"]  # of another trace with the same distribution, before measuring
    c.seed = 0
    c.request_timeout = 600.0  # seconds per request
    c.run_timeout = 1800.0  # seconds per engine's measured run
    c.startup_timeout = 900.0  # seconds for a server to load, compile its warm-up and answer /health
    c.threads = 2  # llama.cpp threads
    c.llamacpp_gguf = ""  # an F32 GGUF for llama.cpp; empty = written from `model` into the workdir
    c.engine = ConfigDict(dict(page_size=16, num_pages=p["num_pages"], prefill_budget=p["prefill_budget"],
                               max_decode_steps=8, max_model_len=p["max_model_len"], prefix_caching=True))
    return c
