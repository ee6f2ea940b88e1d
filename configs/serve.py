"""Server presets: ``--config=configs/serve.py:PRESET`` with PRESET in smollm2, smoke.

``smollm2`` serves SmolLM2-135M-Instruct (float32, any model ``load_pretrained`` takes via ``model``); ``smoke``
serves a randomly initialised smoke-sized model with a byte tokenizer (starts in seconds). Both listen on
127.0.0.1:8000 unless ``host``/``port`` say otherwise.
"""

from ml_collections import ConfigDict

from llmopt_jax.errors import ConfigError

PRESETS = {
    "smollm2": dict(model="smollm2-135m", num_pages=512, max_model_len=2048, prefill_budget=256),
    "smoke": dict(model="smoke", num_pages=256, max_model_len=512, prefill_budget=128),
}


def get_config(preset: str = "smollm2") -> ConfigDict:
    if preset not in PRESETS:
        raise ConfigError(f"unknown serve preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    c = ConfigDict()
    c.preset = preset
    c.model = p["model"]  # a known name, a GGUF file, a safetensors directory, or "smoke" (random, byte tokenizer)
    c.served_name = ""  # the name clients pass as "model"; empty = the preset's model name
    c.dtype = "float32"  # compute and weight dtype (float32 | bfloat16)
    c.scan_layers = False  # unrolled layers decode faster on CPU (see configs/generate.py)
    c.host = "127.0.0.1"
    c.port = 8000
    c.drain_timeout = 600.0  # seconds SIGTERM waits for in-flight requests
    c.request_timeout = 600.0  # seconds one request may take before it is cancelled
    c.warmup = True  # compile the common executables before listening
    c.log_level = "warning"  # uvicorn's
    # Self-speculative decoding of greedy requests (llmopt_jax/serve/speculative.py): draft with the first N blocks
    # of the served model, num_draft tokens per round; 0 = off.
    c.speculative = ConfigDict(dict(draft_layers=0, num_draft=4))
    c.engine = ConfigDict(dict(
        page_size=16,
        num_pages=p["num_pages"],  # KV pool size in pages (page 0 reserved)
        max_running=16,  # sequences decoded together (1 = one request at a time)
        prefill_budget=p["prefill_budget"],  # prompt tokens per step (chunked prefill)
        max_decode_steps=8,  # decode steps per dispatch while nothing waits
        policy="fcfs",  # fcfs | spf (shortest prompt first)
        mode="continuous",  # continuous | static
        prefix_caching=True,
        max_model_len=p["max_model_len"],  # 0 = the model's context
        min_batch_bucket=4,  # decode batches are padded to powers of two from here (fewer executables)
        min_pages_bucket=8,
    ))
    return c
