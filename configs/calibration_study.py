"""The calibration study: ``--config=configs/calibration_study.py:PRESET`` (default | smoke).

Prunes at one sparsity with Wanda and SparseGPT for every calibration set in ``variants`` and evaluates each
pruned model on a text close to the calibration domain (standard-library docstrings) and one far from it
(Python's LICENSE.txt). A variant is ``SOURCES/NxL``: N seeded windows of L tokens, drawn in equal shares from
the ``+``-separated names of ``llmopt_jax.data.text.CALIBRATION_SOURCES`` (topics = pydoc_data.topics, code =
standard-library source, prose = IDLE's change logs and READMEs). ``damp_fractions`` adds SparseGPT rows with
other dampening at ``damp_variant``.
"""

from ml_collections import ConfigDict

from llmopt_jax.errors import ConfigError

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
    c.sparsegpt = ConfigDict(dict(blocksize=128, damp_fraction=0.01))
    c.calib = ConfigDict(dict(seed=0, batch_size=8))
    c.eval = ConfigDict()
    c.eval.close_text_file = ""  # empty = standard-library docstrings (close to the topics)
    c.eval.far_text_file = ""  # empty = Python's LICENSE.txt (legal English)
    c.eval.seq_len = 512 if preset == "default" else 128
    c.eval.batch_size = 4
    c.eval.close_max_windows = p["close_windows"]  # 0 = all
    c.eval.far_max_windows = p["far_windows"]
    c.progress = preset == "default"
    c.report_only = False  # True: table and plot from the rows finished so far, nothing is pruned
    return c
