"""The quantization case study grid: ``--config=configs/quantization_case_study.py:PRESET`` (default | smoke).

Rows, in the order they run (a killed run resumes; every row is independent):
- ``float32`` and ``bfloat16`` storage of the unquantized model;
- ``rtn`` and ``gptq`` at every ``bits`` x ``group_sizes`` (-1 = one scale per output channel), asymmetric grid with
  an integer zero-point (the GPTQ reference quantizer; 0 is a level);
- ``gptq`` with act-order at the ``act_order`` settings (``BITS/GROUP``, comma-separated);
- ``extras``: ``sparsegpt_gptq`` (50 % SparseGPT + 4-bit per channel in one pass, same grid), ``smoothquant``
  (W8A8: int8 weights, dynamic per-token int8 activations), ``w8a8`` (the same without smoothing), ``qat`` (evaluates the model saved by the QAT preset
  of ``experiments/train.py`` at ``qat_model``, quantized with RTN at the bits it was trained for),
  ``gptq_int8_embedding`` (GPTQ 4-bit g64 act-order with the token embedding / tied LM head also packed at 8 bits).
Each row reports perplexity on a text close to the calibration domain (standard-library docstrings;
calibration: ``pydoc_data.topics``) and one far from it (Python's LICENSE.txt), bits per weight, the bytes the
packed model holds and its decode speed (measured once per storage format).
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
    # SmolLM2's inputs are 576 (d_model) and 1536 (mlp) wide: groups of 128 do not divide 576, so the grid uses
    # 192 (= gcd, 3 groups per 576 inputs) next to 32 and 64.
    "default": dict(bits="3,4,2,8", group_sizes="-1,64,192,32", act_order="4/-1,3/-1,3/64,2/64",
                    extras="sparsegpt_gptq,smoothquant,gptq_int8_embedding,qat,w8a8", num_samples=128, seq_len=512, close_windows=32,
                    far_windows=0, decode_tokens=32),
    "smoke": dict(bits="4", group_sizes="-1,64", act_order="4/-1", extras="sparsegpt_gptq,smoothquant",
                  num_samples=8, seq_len=128, close_windows=2, far_windows=2, decode_tokens=4),
}


def get_config(preset: str = "default") -> ConfigDict:
    if preset not in PRESETS:
        raise ConfigError(f"unknown quantization case-study preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    c = ConfigDict()
    c.preset = preset
    c.model = "smollm2-135m"
    c.methods = "rtn,gptq"
    c.bits = p["bits"]  # comma-separated, each in 2..8
    c.group_sizes = p["group_sizes"]  # comma-separated; -1 = per output channel
    c.act_order = p["act_order"]  # extra gptq rows with act-order: BITS/GROUP, comma-separated
    c.extras = p["extras"]  # any of sparsegpt_gptq, smoothquant, w8a8, gptq_int8_embedding, qat
    c.qat_model = "runs/qat/model"  # a safetensors directory written by configs/train.py:qat (for the qat row)
    c.qat_bits = 3
    c.sparsegpt = common.solver_config()  # solver settings of GPTQ and SparseGPT
    c.smoothquant_alpha = 0.5  # migration strength: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

    # One calibration domain, as in the SparseGPT case study, so the far text shows overfitting.
    c.calib = common.calib_config(p["num_samples"], p["seq_len"], sources="topics")
    c.eval = common.two_text_eval_config(p["close_windows"], p["far_windows"])
    c.decode_tokens = p["decode_tokens"]  # new tokens per timed greedy decode (batch 1); 0 = skip decode timing
    c.decode_repeats = 3
    c.report_only = False  # True: table and plot from the rows finished so far, nothing is computed
    c.progress = True
    return c
