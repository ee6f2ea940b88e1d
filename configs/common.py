"""Config blocks shared by several config files: calibration, two-text evaluation, solver settings and the mesh.

Each function returns a fresh ``ConfigDict`` with the keys, defaults and meanings every experiment reading that
block expects; a config file assigns it (``c.calib = common.calib_config(...)``) and overrides what its study
changes. Config files load this module by its path next to theirs (as ``ml_collections`` loads them), so they work
from any working directory without the repository root on ``sys.path``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ml_collections import ConfigDict

from llmopt_jax.errors import ConfigError

# The calibration block's keys in their usual order; ``calib_config(keys=...)`` picks (and orders) a subset.
CALIB_KEYS = ("text_file", "sources", "num_samples", "seq_len", "seed", "batch_size", "compute_dtype")


def calib_config(num_samples: int = 128, seq_len: int = 512, sources: str = "topics,code,prose", *,
                 batch_size: int = 0, keys: Sequence[str] = CALIB_KEYS) -> ConfigDict:
    """The ``calib`` block: ``num_samples`` seeded windows of ``seq_len`` tokens drawn from ``sources``.

    ``keys``: the block's keys to include, in this order (a study that sets some of them elsewhere omits them).
    """
    unknown = [k for k in keys if k not in CALIB_KEYS]
    if unknown:
        raise ConfigError(f"calib_config: unknown keys {unknown}; choose from {list(CALIB_KEYS)}")
    values = dict(
        text_file="",  # UTF-8 file(s), comma-separated; empty = the named sources below
        sources=sources,  # comma-separated names of llmopt_jax.data.text.CALIBRATION_SOURCES, equal shares
        num_samples=num_samples,  # windows drawn with a seeded RNG
        seq_len=seq_len,  # tokens per window
        seed=0,
        batch_size=batch_size,  # windows per step of the calibration passes; 0 = auto (~1024 tokens on CPU)
        # Matmul operands of the calibration forwards and XᵀX: bfloat16 (float32 accumulation; several times
        # faster on CPUs with AMX/AVX512-BF16 and on accelerators), float32, mixed (bfloat16 statistics passes,
        # float32 propagation of the compressed blocks' outputs), or auto: bfloat16 for pruning where the hardware
        # multiplies it natively, float32 for quantizing recipes (bfloat16 passes put GPTQ 3-bit up to 1.9x off
        # the reference code on SmolLM2's far text) and everywhere else (1.4x faster on an AVX2 CPU).
        compute_dtype="auto",
    )
    return ConfigDict({k: values[k] for k in keys})


def two_text_eval_config(close_windows: int, far_windows: int, seq_len: int = 512) -> ConfigDict:
    """The ``eval`` block of the studies that score each model on a text close to the calibration domain and one
    far from it; ``*_windows`` caps the windows scored (0 = all)."""
    c = ConfigDict()
    c.close_text_file = ""  # empty = standard-library docstrings (close to the calibration topics)
    c.far_text_file = ""  # empty = Python's LICENSE.txt (legal English)
    c.seq_len = seq_len
    c.batch_size = 4  # windows per jitted call
    c.close_max_windows = close_windows  # 0 = all
    c.far_max_windows = far_windows
    return c


def solver_config() -> ConfigDict:
    """Solver settings shared by SparseGPT and GPTQ: columns per lazy block update, and the Hessian dampening
    ``λ = damp_fraction · mean(diag H)``."""
    return ConfigDict(dict(blocksize=128, damp_fraction=0.01))


def mesh_config(**sizes: int) -> ConfigDict:
    """The ``mesh`` block: in-slice (ICI) size of each mesh axis, 1 unless given in ``sizes`` (-1 = the devices
    left over), and ``dcn_<axis>`` = 1 (one slice; multi-slice runs override them)."""
    from llmopt_jax.parallel.mesh import MESH_AXES  # imports JAX: only the configs with a mesh pay for it

    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"mesh_config: unknown mesh axes {unknown}; choose from {list(MESH_AXES)}")
    c = ConfigDict({axis: sizes.get(axis, 1) for axis in MESH_AXES})
    c.update({f"dcn_{axis}": 1 for axis in MESH_AXES})
    return c


def sharding_rules() -> tuple:
    """The default logical-axis -> mesh-axis rules, as config data (a tuple of ``(name, axes)`` pairs)."""
    from llmopt_jax.parallel.rules import DEFAULT_RULES

    return tuple((name, axes) for name, axes in DEFAULT_RULES)
