"""GPTQ solver benchmark presets: ``--config=configs/bench_quantize.py:PRESET`` with PRESET in default, smoke."""

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
    # SmolLM2's widths (576, 1536) and a LLaMA-7B attention matrix (4096).
    "default": dict(sizes="576,1536,4096", modes="4/-1,4/-1/act,4/64,3/64/act", repeats=3, cpus=0),
    # Seconds on 2 cores; works without torch.
    "smoke": dict(sizes="256", modes="4/-1,3/64/act", repeats=1, cpus=1),
}


def get_config(preset: str = "default") -> ConfigDict:
    if preset not in PRESETS:
        raise ConfigError(f"unknown bench_quantize preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    c = ConfigDict()
    c.preset = preset
    c.sizes = p["sizes"]  # comma-separated n: W [n, n], H = 2XᵀX/N from correlated inputs X [N, n]
    c.tokens = 0  # N; 0 = 2n (a full-rank Hessian)
    c.modes = p["modes"]  # comma-separated BITS/GROUP or BITS/GROUP/act (GROUP -1 = per output channel)
    c.symmetric = False  # asymmetric grids (d·q + min), as in the case study
    c.update(common.solver_config())  # blocksize, damp_fraction
    c.repeats = p["repeats"]  # timed runs per solver and row (after a warm-up run of ours); medians reported
    c.seed = 0
    # The PyTorch reference (benchmarks/baselines/gptq_torch.py; needs the `reference` extra).
    c.torch = True  # False: skip it even when torch is installed (its columns are then null)
    c.torch_threads = "1,0"  # thread counts to try (0 = all cores); the faster median is reported
    c.slow_factor = 3.0  # a thread count whose first run is this many times slower than the fastest is not repeated
    c.cpus = p["cpus"]  # CPUs the whole process is pinned to (0 = all it may use)
    return c
