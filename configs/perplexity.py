"""Perplexity presets: ``--config=configs/perplexity.py:PRESET`` with PRESET in smollm2, smoke.

``smollm2`` scores the whole evaluation text (default: Python's ``pydoc_data.topics``, ~97k tokens);
``smoke`` only its first 8 windows (a few seconds on 2 CPU cores).
"""

import importlib.util
import os

from ml_collections import ConfigDict

from llmopt_jax.errors import ConfigError

# Config files are loaded by path (--config=configs/FILE.py:PRESET), not imported from a package: load the shared
# blocks by path too, so that no sys.path entry is needed.
_common = importlib.util.spec_from_file_location("configs_common", os.path.join(os.path.dirname(__file__), "common.py"))
common = importlib.util.module_from_spec(_common)
_common.loader.exec_module(common)

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

    c.mesh = common.mesh_config(data=-1)  # batch over every device
    c.sharding_rules = common.sharding_rules()
    c.progress = True
    return c
