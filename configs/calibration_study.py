"""The calibration study: ``--config=configs/calibration_study.py:PRESET`` (default | smoke).

Prunes at one sparsity with Wanda and SparseGPT for every calibration set in ``variants`` and evaluates each
pruned model on a text close to the calibration domain (standard-library docstrings) and one far from it
(Python's LICENSE.txt). A variant is ``SOURCES/NxL``: N seeded windows of L tokens, drawn in equal shares from
the ``+``-separated names of ``llmopt_jax.data.text.CALIBRATION_SOURCES`` (topics = pydoc_data.topics, code =
standard-library source, prose = IDLE's change logs and READMEs). ``damp_fractions`` adds SparseGPT rows with
other dampening at ``damp_variant``.
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
    # The case study's set and its mixed-domain twin first; then windows 16..512 of 512 tokens and 65,536 tokens
    # cut as 512x128 / 128x512 / 32x2048; the most expensive sets last.
    "default": dict(variants="topics/128x512,topics+code+prose/128x512,topics/16x512,topics/64x512,topics/512x128,"
                             "topics/32x2048,topics/512x512,topics+code+prose/512x512",
                    damp_fractions="0.1", damp_variant="topics/128x512", close_windows=32, far_windows=0),
    "smoke": dict(variants="topics/4x64,topics+prose/4x64", damp_fractions="", damp_variant="topics/4x64",
                  close_windows=2, far_windows=2),
}


def get_config(preset: str = "default") -> ConfigDict:
    if preset not in PRESETS:
        raise ConfigError(f"unknown calibration-study preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    c = ConfigDict()
    c.preset = preset
    c.model = "smollm2-135m"
    c.methods = "sparsegpt,wanda"
    c.sparsity = 0.5
    c.pattern = ""  # "" = unstructured, or N:M
    c.variants = p["variants"]
    c.damp_fractions = p["damp_fractions"]  # extra SparseGPT dampening levels (comma-separated), at damp_variant
    c.damp_variant = p["damp_variant"]
    c.sparsegpt = common.solver_config()
    c.calib = common.calib_config(batch_size=8, keys=("seed", "batch_size"))  # each variant names sources and windows
    c.eval = common.two_text_eval_config(p["close_windows"], p["far_windows"],
                                         seq_len=512 if preset == "default" else 128)
    c.progress = preset == "default"
    c.report_only = False  # True: table and plot from the rows finished so far, nothing is pruned
    return c
