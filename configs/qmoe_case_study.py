"""The QMoE case study: ``--config=configs/qmoe_case_study.py:PRESET`` (default | smoke).

SmolLM2-135M is made a mixture-of-experts model by MoEfication (``experiments/moefy.py``; ``num_experts`` experts
per layer, ``top_k`` of them run per token), then its experts are compressed as QMoE does (Frantar & Alistarh,
2023): ternary per output row with the zero threshold at half (``{lo, 0, hi}``), by round-to-nearest and by
expert-batched GPTQ with per-expert Hessians from the routed calibration tokens (dampening 0.1), stored by the
sub-1-bit codec of ``compress/codec.py``; 2-bit rows for comparison. Attention, norms, embeddings and routers keep
their precision. Rows (``rows``, in this order; a killed run resumes row by row):

- ``dense``: the model before MoEfication; ``moe``: the float MoE model;
- ``rtn_ternary``, ``gptq_ternary``: ternary experts, coded by ``qmoe.codec`` (``ans``: per-stream rANS, or
  ``dictionary``: QMoE's 16-bit codewords), the model running from those bytes;
- ``rtn_2bit``, ``gptq_2bit``: 2-bit experts per output row (integer zero-point), packed.

Each row: perplexity on a text close to the calibration domain and one far from it, bits per expert parameter
measured from the bytes held, model bytes, zero fraction, compression seconds and decode tokens/s from the
compressed model. ``scale`` adds the SwitchTransformer table (abstract shapes; ``compress/moe_scale.py``).
``smoke`` keeps 2 blocks of the real model and a few short windows (under 3 minutes on 2 CPU cores).
"""

import importlib.util
import os

from ml_collections import ConfigDict

from llmopt_jax.errors import ConfigError

_common = importlib.util.spec_from_file_location("configs_common", os.path.join(os.path.dirname(__file__), "common.py"))
common = importlib.util.module_from_spec(_common)
_common.loader.exec_module(common)

ROWS = ("dense", "moe", "rtn_ternary", "gptq_ternary", "rtn_2bit", "gptq_2bit")
PRESETS = {
    "default": dict(num_layers=0, num_samples=32, seq_len=512, close_windows=16, far_windows=16, eval_seq_len=512,
                    decode_tokens=8, measure_solve=True),
    "smoke": dict(num_layers=2, num_samples=8, seq_len=128, close_windows=2, far_windows=2, eval_seq_len=128,
                  decode_tokens=2, measure_solve=False),
}


def get_config(preset: str = "default") -> ConfigDict:
    if preset not in PRESETS:
        raise ConfigError(f"unknown QMoE case-study preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    c = ConfigDict()
    c.preset = preset
    c.model = "smollm2-135m"  # a dense model: a known name, a GGUF file, or a safetensors directory
    c.num_layers = p["num_layers"]  # keep only the first blocks (0 = all)
    c.rows = ",".join(ROWS)  # comma-separated subset of ROWS, run in this order

    c.moe = ConfigDict()
    c.moe.model = ""  # a MoE safetensors directory (experiments.moefy's WORKDIR/model); empty = MoEfy here
    c.moe.num_experts = 8  # experts per layer; must divide the MLP width (1536 for SmolLM2)
    c.moe.top_k = 6  # experts per token when evaluating (the compression sees the same routing)
    c.moe.cluster_iterations = 20
    c.moe.router_ridge = 1e-2

    c.qmoe = ConfigDict()
    c.qmoe.damp_fraction = 0.1  # QMoE's dampening (of the mean Hessian diagonal)
    c.qmoe.blocksize = 128
    c.qmoe.max_tokens_per_expert = 0  # cap on each expert's calibration tokens (0 = all)
    c.qmoe.codec = "ans"  # ternary storage: "ans" (per-stream rANS) or "dictionary" (QMoE's 16-bit codewords)
    c.qmoe.block_rows = 0  # rows per coded stream (1 = per row as QMoE; 0 = the fewest holding stream_symbols)
    # Longer streams spend fewer bits on per-stream state (offset, rANS state, model byte): on SmolLM2's MoE
    # experts RTN ternary takes 0.903 / 0.875 / 0.861 / 0.854 bits at 1024 / 2048 / 4096 / 8192 symbols, and
    # decoding an expert stack takes as long up to 4096 on CPU (one scan step per symbol, streams in lockstep).
    c.qmoe.stream_symbols = 4096

    # One calibration domain, as in the other case studies, so that the far text shows overfitting.
    c.calib = common.calib_config(p["num_samples"], p["seq_len"], sources="topics",
                                  keys=("text_file", "sources", "num_samples", "seq_len", "seed", "batch_size"))
    c.calib.batch_size = 4  # windows per jitted block call
    c.eval = common.two_text_eval_config(p["close_windows"], p["far_windows"], p["eval_seq_len"])
    c.decode_tokens = p["decode_tokens"]  # new tokens per timed greedy decode at batch 1; 0 = skip
    c.decode_repeats = 3
    c.scale = ConfigDict()
    c.scale.measure_solve = p["measure_solve"]  # time one expert's GPTQ solve at each Switch shape here
    c.report_only = False  # True: table and plot from the rows finished so far, nothing is computed
    c.progress = True
    return c
