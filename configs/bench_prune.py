"""Pruning benchmark presets: ``--config=configs/bench_prune.py:PRESET`` with PRESET in default, e2e, smoke."""

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
    # Matrix solves at LLaMA-7B-like sizes, and all 30 blocks of SmolLM2-135M with the default calibration.
    "default": dict(sizes="4096,8192", repeats=3, num_samples=128, seq_len=512, model_repeats=1,
                    model_layers=0, cpus=0, e2e_eval_windows=8, e2e_repeats=1),
    # The end-to-end comparison: 32 x 512 calibration tokens, no matrix rows.
    "e2e": dict(sizes="", repeats=1, num_samples=32, seq_len=512, model_repeats=1, model_layers=0, cpus=0,
                e2e_eval_windows=8, e2e_repeats=3),
    # Small enough for 2 CPU cores in well under 3 minutes (one core: immune to a busy neighbour); works without torch.
    "smoke": dict(sizes="512", repeats=1, num_samples=8, seq_len=128, model_repeats=1,
                  model_layers=2, cpus=1, e2e_eval_windows=1, e2e_repeats=2),
}


def get_config(preset: str = "default") -> ConfigDict:
    if preset not in PRESETS:
        raise ConfigError(f"unknown bench_prune preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    c = ConfigDict()
    c.preset = preset
    c.sparsity = 0.5  # unstructured sparsity (N:M patterns imply their own)
    c.patterns = "unstructured,2:4"  # comma-separated patterns of the matrix rows
    c.update(common.solver_config())  # blocksize, damp_fraction
    # (a) random square matrix problems: W [n, n], H = 2XᵀX/N from correlated inputs X [N, n].
    c.sizes = p["sizes"]  # comma-separated n; "" = no matrix rows
    c.tokens = 0  # N, rows of X; 0 = 2n (a full-rank Hessian)
    c.repeats = p["repeats"]  # timed runs per solver and row (after a warm-up run of ours); medians reported
    c.seed = 0
    # (b) the real model, pruned block by block with the sequential engine.
    c.model_row = True
    c.model = "smollm2-135m"
    c.model_pattern = ""  # "" = `sparsity` unstructured, or "N:M"
    c.model_layers = p["model_layers"]  # prune the first blocks only (0 = all)
    c.model_repeats = p["model_repeats"]  # timed passes over the recorded matrix problems per solver
    # The sources as experiments.compress draws them (end-to-end rows); the model row samples the default text.
    c.calib = common.calib_config(p["num_samples"], p["seq_len"],
                                  keys=("num_samples", "seq_len", "seed", "batch_size", "sources"))
    # (e) end to end, run first: the whole model pruned by our engine (each dtype) and by the PyTorch port.
    c.e2e_row = True
    c.e2e_dtypes = "bfloat16,float32"  # calibration matmul dtypes of our engine
    c.e2e_repeats = p["e2e_repeats"]  # interleaved runs of every engine; medians reported
    c.e2e_torch_threads = 0  # 0 = all cores (the port's per-column loops can prefer 1 on a shared CPU)
    c.e2e_torch_batch_size = 8  # windows per forward of the port (upstream forwards one at a time)
    c.e2e_eval_windows = p["e2e_eval_windows"]  # windows of held-out text scored per pruned model
    c.eval_seq_len = 512
    # The PyTorch reference (benchmarks/baselines/sparsegpt_torch.py; needs the `reference` extra).
    c.torch = True  # False: skip it even when torch is installed (its columns are then null)
    c.torch_threads = "1,0"  # thread counts to try (0 = all cores); the faster median is reported
    # A thread count whose first run is this many times slower than the fastest one is not repeated (PyTorch's
    # per-column OpenMP loops can be 10x slower on 2 threads than on 1 when the CPU is shared).
    c.slow_factor = 3.0
    # CPUs the whole process is pinned to, for both solvers (0 = all it may use). On a CPU shared with other
    # processes multi-threaded runs of either solver can be many times slower than single-threaded ones.
    c.cpus = p["cpus"]
    c.progress = True
    return c
