"""One-shot compression presets: ``--config=configs/compress.py:METHOD``.

METHOD: ``dense`` (no change, the baseline), ``magnitude``, ``wanda``, ``sparsegpt`` (pruning), ``rtn``, ``gptq``
(4-bit per-channel quantization unless ``--config.bits`` / ``--config.group_size`` say otherwise),
``sparsegpt_gptq`` (50 % SparseGPT and 4-bit symmetric quantization in one pass), ``smoothquant`` (W8A8: int8
per-channel weights after SmoothQuant smoothing, dynamic per-token int8 activations), or ``smoke`` (SparseGPT with
a tiny calibration set and a short evaluation, for tests; ``--config.method=gptq --config.bits=4`` makes it a
quantization smoke run). Calibration defaults to 128 seeded windows of 512
tokens drawn in equal shares from three domains that ship with Python: ``pydoc_data.topics``, standard-library
source code and IDLE's change logs (the calibration study, ``experiments/calibration_study.py``, found that this
mix keeps SparseGPT ahead of Wanda on far-domain text, where topics alone lets Wanda win); evaluation defaults to
a held-out text close to the topics: the docstrings of standard-library modules.
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

METHODS = ("dense", "magnitude", "wanda", "sparsegpt", "rtn", "gptq", "sparsegpt_gptq", "smoothquant")
QUANTIZING = ("rtn", "gptq", "sparsegpt_gptq", "smoothquant")


def get_config(preset: str = "sparsegpt") -> ConfigDict:
    if preset not in METHODS + ("smoke",):
        raise ConfigError(f"unknown compress preset {preset!r}; choose one of {sorted(METHODS + ('smoke',))}")
    c = ConfigDict()
    c.preset = preset
    c.method = "sparsegpt" if preset == "smoke" else preset
    c.model = "smollm2-135m"  # a known name, a GGUF file, or a directory with config.json + *.safetensors
    c.sparsity = 0.5  # fraction of zeros per matrix for unstructured pruning, in [0, 1)
    c.pattern = ""  # "" = unstructured; "N:M" keeps N of every M consecutive inputs (sparsity is then 1 - N/M)
    c.bits = {"smoothquant": 8}.get(preset, 4 if preset in QUANTIZING else 32)  # 2..8 quantized; 32 = float
    c.smoothquant_alpha = 0.5  # migration strength: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)
    c.group_size = -1  # inputs per quantization group; 0 or -1 = one scale per output channel
    c.symmetric = False  # rtn/gptq/sparsegpt_gptq grid: False = scale + zero-point per group; True = scale only
    # Asymmetric grids: "int" = integer zero-point, 0 is a level (the GPTQ/SparseGPT reference quantizer; right for
    # compressing a model); "float" = float16 offset d·q + min (llama.cpp's Q4_1 rule; right for reproducing or
    # exporting Q4_1 blocks code for code, but near-zero weights all shift the same way).
    c.zero_point = "int"
    c.act_order = False  # gptq: visit columns by decreasing Hessian diagonal (implies static groups)
    c.static_groups = False
    # Also round the token embedding (= the tied LM head, the largest matrix of a small model) to this many bits
    # (symmetric, groups of 32, like llama.cpp's Q8_0/Q4_0) and keep it packed; 0 = keep it in float32.
    c.embedding_bits = 0  # gptq: fit group scales from the original weights up front

    # Solver settings shared by SparseGPT and GPTQ (block of columns per lazy update, Hessian dampening).
    c.sparsegpt = common.solver_config()

    # The mixed calibration set (topics, code, prose) that the calibration study found the most robust.
    c.calib = common.calib_config(16, 128) if preset == "smoke" else common.calib_config(128, 512)

    c.eval = ConfigDict()
    c.eval.text_file = ""  # empty = standard-library docstrings (held out, same domain as the calibration text)
    c.eval.seq_len = 512
    c.eval.batch_size = 4
    c.eval.max_windows = 4 if preset == "smoke" else 0  # 0 = every full window

    c.save = ""  # write the compressed model: a path ending in .gguf or a directory (float32 safetensors)
    # GGUF tensor type: F32, F16, BF16, Q8_0, Q4_0 or Q4_1. Weights quantized with group_size=32 on the type's own
    # grid (symmetric 8 bits: Q8_0, symmetric 4 bits: Q4_0, asymmetric 4 bits: Q4_1) are stored with their own
    # codes; others are re-rounded.
    c.save_type = "F32"
    c.progress = True
    return c
