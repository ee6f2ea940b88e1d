"""The SparseGPT case study grid: ``--config=configs/sparsegpt_case_study.py:PRESET`` (default | smoke).

Dense, then magnitude / Wanda / SparseGPT at every unstructured sparsity in ``sparsities`` and every N:M
pattern in ``patterns``; each pruned model is evaluated on a text close to the calibration domain (standard
library docstrings; calibration is ``pydoc_data.topics``) and one far from it (Python's LICENSE.txt).
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

PRESETS = {
    "default": dict(sparsities="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8", patterns="2:4,4:8", num_samples=128, seq_len=512,
                    close_windows=32, far_windows=0),
    "smoke": dict(sparsities="0.5", patterns="", num_samples=8, seq_len=128, close_windows=2, far_windows=2),
}


def get_config(preset: str = "default") -> ConfigDict:
    if preset not in PRESETS:
        raise ConfigError(f"unknown case-study preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    c = ConfigDict()
    c.preset = preset
    c.model = "smollm2-135m"
    c.methods = "magnitude,wanda,sparsegpt"
    c.sparsities = p["sparsities"]  # unstructured levels, comma-separated
    c.patterns = p["patterns"]  # N:M patterns, comma-separated ("" for none)
    c.sparsegpt = common.solver_config()

    # One domain, as in the paper's protocol (its C4 is one distribution): the study is how methods rank under it.
    # configs/compress.py defaults to the mixed set that experiments/calibration_study.py found more robust. No
    # compute_dtype key: the study's calibration passes run at the engine's default ("auto", see
    # configs/common.py).
    c.calib = common.calib_config(p["num_samples"], p["seq_len"], sources="topics",
                                  keys=("text_file", "sources", "num_samples", "seq_len", "seed", "batch_size"))
    c.eval = common.two_text_eval_config(p["close_windows"], p["far_windows"])
    c.progress = True
    return c
