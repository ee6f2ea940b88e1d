"""MoEfication presets: ``--config=configs/moefy.py:PRESET`` with PRESET in smollm2, smoke.

``smollm2`` splits every SwiGLU MLP of SmolLM2-135M (1536 hidden units) into ``num_experts`` experts of co-activating
units and fits a linear router per layer on 32 calibration windows of 512 tokens (the mixed topics/code/prose
set), then scores the MoE model at ``top_k`` and the dense model on the same windows of ``eval.text_file``
(default: standard-library docstrings). ``smoke`` keeps only the first 2 blocks of the real model, 8 calibration
windows of 128 tokens and 2 evaluation windows of 128 (well under a minute on 2 CPU cores).
"""

import importlib.util
import os

from ml_collections import ConfigDict

from llmopt_jax.errors import ConfigError

_common = importlib.util.spec_from_file_location("configs_common", os.path.join(os.path.dirname(__file__), "common.py"))
common = importlib.util.module_from_spec(_common)
_common.loader.exec_module(common)

PRESETS = ("smollm2", "smoke")


def get_config(preset: str = "smollm2") -> ConfigDict:
    if preset not in PRESETS:
        raise ConfigError(f"unknown moefy preset {preset!r}; choose one of {sorted(PRESETS)}")
    smoke = preset == "smoke"
    c = ConfigDict()
    c.preset = preset
    c.model = "smollm2-135m"  # a dense model: a known name, a GGUF file, or a safetensors directory
    c.num_layers = 2 if smoke else 0  # keep only the first blocks (0 = all): quick runs of the real model
    c.num_experts = 8  # experts per layer; must divide the MLP width (1536 for SmolLM2)
    c.top_k = 2  # experts each token runs (1..num_experts); top_k = num_experts reproduces the dense model
    c.cluster_iterations = 20  # balanced k-means iterations (stops early when the assignment is stable)
    c.router_ridge = 1e-2  # ridge term of the least-squares router fit, relative to mean(diag hᵀh)
    c.save_gguf = False  # also write WORKDIR/model.gguf (F32; llama.cpp's ffn_*_exps names, expert_count metadata)

    c.calib = common.calib_config(8, 128) if smoke else common.calib_config(32, 512)
    c.calib.batch_size = 4 if smoke else 8  # windows per jitted block call

    c.eval = ConfigDict()
    c.eval.text_file = ""  # UTF-8 file(s), comma-separated; empty = standard-library docstrings
    c.eval.seq_len = 128 if smoke else 512
    c.eval.batch_size = 2 if smoke else 4
    c.eval.max_windows = 2 if smoke else 0  # 0 = every full window
    c.eval.sweep_top_k = ""  # comma-separated extra top-k values also scored (results["sweep"]), e.g. "1,2,4,8"

    c.mesh = common.mesh_config(data=-1)
    c.sharding_rules = common.sharding_rules()
    c.progress = True
    return c
