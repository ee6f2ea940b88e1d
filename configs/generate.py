"""Generation presets: ``--config=configs/generate.py:PRESET`` with PRESET in smollm2, smoke.

``smollm2`` answers ``prompt`` as a chat turn (the model's own chat template) with up to 256 new tokens;
``smoke`` stops after 16 tokens. Set ``chat=False`` to continue raw text instead.
"""

from ml_collections import ConfigDict

from llmopt_jax.errors import ConfigError

PRESETS = {"smollm2": dict(max_new_tokens=256), "smoke": dict(max_new_tokens=16)}


def get_config(preset: str = "smollm2") -> ConfigDict:
    if preset not in PRESETS:
        raise ConfigError(f"unknown generate preset {preset!r}; choose one of {sorted(PRESETS)}")
    c = ConfigDict()
    c.preset = preset
    c.model = "smollm2-135m"  # a known name, a GGUF file, or a directory with config.json + *.safetensors
    c.dtype = "float32"  # compute and weight dtype (float32 | bfloat16)
    # Unrolled layers decode faster than a layer scan here (XLA:CPU slices stacked bf16 weights slowly: 6 vs
    # 47 tokens/s at batch 1); compiling takes a few seconds longer.
    c.scan_layers = False
    c.prompt = "What is the capital of France?"
    c.chat = True  # wrap the prompt in the model's chat template (system prompt from the template unless set)
    c.system = ""  # optional system message
    c.num_samples = 1  # batch: the same prompt sampled this many times
    c.max_new_tokens = PRESETS[preset]["max_new_tokens"]
    c.greedy = True
    c.temperature = 0.7
    c.top_k = 0  # 0 = off
    c.top_p = 1.0  # 1 = off
    c.seed = 0
    c.stream = True  # print tokens as they are generated (first sample)
    # Speculative decoding (infer/speculative.py): draft_layers > 0 drafts with the model's own first layers,
    # draft_model (a name or path) with another model of the same vocabulary; num_draft tokens per verify pass.
    # Tokens are then printed when decoding ends (all rounds run on device).
    c.draft_layers = 0
    c.draft_model = ""
    c.num_draft = 4
    return c
