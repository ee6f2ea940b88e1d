"""Speculative decoding benchmark presets: ``--config=configs/bench_speculative.py:PRESET`` with PRESET in default,
smoke.

``default`` times SmolLM2-135M (float32, batch 1, greedy, 64 new tokens, median of 5 interleaved runs) alone and
with two drafts: its own first ``self_draft_layers`` layers, and a Wanda 50 % + 4-bit RTN packed copy.
``smoke`` does the same with 8 new tokens, one run, scanned layers (fast compiles) and a small calibration set.
"""

import importlib.util
import os

from ml_collections import ConfigDict

from llmopt_jax.errors import ConfigError

_common = importlib.util.spec_from_file_location("configs_common", os.path.join(os.path.dirname(__file__), "common.py"))
common = importlib.util.module_from_spec(_common)
_common.loader.exec_module(common)

PRESETS = {
    "default": dict(max_new_tokens=64, repeats=5, scan_layers=False, num_samples=32, seq_len=256),
    "smoke": dict(max_new_tokens=8, repeats=1, scan_layers=True, num_samples=3, seq_len=64),
}


def get_config(preset: str = "default") -> ConfigDict:
    if preset not in PRESETS:
        raise ConfigError(f"unknown bench_speculative preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    c = ConfigDict()
    c.preset = preset
    c.model = "smollm2-135m"  # the target: a known name, a GGUF file, or a safetensors directory
    c.dtype = "float32"
    c.scan_layers = p["scan_layers"]  # the target's layers (unrolled decode faster on CPU; scanned compile faster)
    c.prompt = "Write a short story about a robot who learns to paint."
    c.chat = True  # wrap the prompt in the model's chat template
    c.max_new_tokens = p["max_new_tokens"]  # no stop ids: every run makes exactly this many tokens
    c.batch = 1  # sequences (copies of the prompt) per generate call
    c.repeats = p["repeats"]  # timed runs per engine after a compiling one, interleaved; medians reported
    c.drafts = "self,compressed"  # comma-separated: self (first layers of the target), compressed (lj.compress)
    c.num_draft = 4  # k: draft tokens proposed per verify pass
    c.self_draft_layers = 24  # layers of the target the self-speculative draft runs (then final norm + tied head)
    # The compressed draft: Wanda pruning (0 = none) then RTN quantization (32 = none), packed; group_size -1 = per
    # channel.
    c.draft_sparsity = 0.5
    c.draft_bits = 4
    c.draft_group_size = 32
    c.draft_layers = 0  # > 0: keep only the compressed draft's first layers too (0 = all)
    c.calib = common.calib_config(p["num_samples"], p["seq_len"])
    return c
