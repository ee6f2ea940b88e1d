"""Perplexity presets: ``--config=configs/perplexity.py:PRESET`` with PRESET in smollm2, smoke.

``smollm2`` scores the whole evaluation text (default: Python's ``pydoc_data.topics``, ~97k tokens);
``smoke`` only its first 8 windows (a few seconds on 2 CPU cores).
"""

from ml_collections import ConfigDict

from llmopt_jax.errors import ConfigError
from llmopt_jax.parallel.rules import DEFAULT_RULES

PRESETS = {"smollm2": dict(max_windows=0), "smoke": dict(max_windows=8)}


def get_config(preset: str = "smollm2") -> ConfigDict:
    if preset not in PRESETS:
        raise ConfigError(f"unknown perplexity preset {preset!r}; choose one of {sorted(PRESETS)}")
    c = ConfigDict()
    c.preset = preset
    c.model = "smollm2-135m"  # a known name, a GGUF file, or a directory with config.json + *.safetensors
    c.dtype = "float32"  # compute and weight dtype (float32 | bfloat16)

    c.eval = ConfigDict()
    c.eval.text_file = ""  # UTF-8 text file(s), comma-separated; empty = pydoc_data.topics
    c.eval.seq_len = 512
    c.eval.batch_size = 4  # windows per jitted call
    c.eval.max_windows = PRESETS[preset]["max_windows"]  # 0 = every full window of the text

    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1, stage=1))  # batch over every device
    c.mesh.update({f"dcn_{a}": 1 for a in ("data", "fsdp", "tensor", "expert", "stage")})
    c.sharding_rules = tuple((name, axes) for name, axes in DEFAULT_RULES)
    c.progress = True
    return c
