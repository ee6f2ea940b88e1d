"""The SparseGPT case study grid: ``--config=configs/sparsegpt_case_study.py:PRESET`` (default | smoke).

Dense, then magnitude / Wanda / SparseGPT at every unstructured sparsity in ``sparsities`` and every N:M
pattern in ``patterns``; each pruned model is evaluated on a text close to the calibration domain (standard
library docstrings; calibration is ``pydoc_data.topics``) and one far from it (Python's LICENSE.txt).
"""

from ml_collections import ConfigDict

from llmopt_jax.errors import ConfigError

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
    c.sparsegpt = ConfigDict(dict(blocksize=128, damp_fraction=0.01))

    c.calib = ConfigDict()
    c.calib.text_file = ""  # UTF-8 file(s), comma-separated; empty = the named sources below
    # One domain, as in the paper's protocol (its C4 is one distribution): the study is how methods rank under it.
    # configs/compress.py defaults to the mixed set that experiments/calibration_study.py found more robust.
    c.calib.sources = "topics"  # comma-separated names of llmopt_jax.data.text.CALIBRATION_SOURCES, equal shares
    c.calib.num_samples = p["num_samples"]
    c.calib.seq_len = p["seq_len"]
    c.calib.seed = 0
    c.calib.batch_size = 0  # windows per calibration step; 0 = auto (~1024 tokens on CPU)

    c.eval = ConfigDict()
    c.eval.close_text_file = ""  # empty = standard-library docstrings (same domain as the calibration text)
    c.eval.far_text_file = ""  # empty = Python's LICENSE.txt (legal English)
    c.eval.seq_len = 512
    c.eval.batch_size = 4
    c.eval.close_max_windows = p["close_windows"]  # 0 = all
    c.eval.far_max_windows = p["far_windows"]
    c.progress = True
    return c
