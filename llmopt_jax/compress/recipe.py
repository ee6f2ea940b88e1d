"""Per-matrix transforms built from config data and chained like ``optax.chain``.

The matrix steps of a recipe (``compress/api.py`` owns the whole recipe) are mappings with a ``method`` and that
transform's options, e.g. ``[{"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"}]`` or
``[{"method": "gptq", "bits": 4, "group_size": 128, "act_order": True}]``. :func:`chain` applies steps in order with the same calibration
statistics and keeps every zero an earlier step made (a later quantizer cannot revive a pruned weight), so
masks stay valid for sparse fine-tuning. Quantizing steps report their integer codes and scales under
``info["quantized"]`` (a :class:`QuantizedMatrix`, what ``compress/packed.py`` stores); a quantizing step must
be the last one, since a later step would change the weights behind those codes. Joint pruning + quantization
in one pass is ``sparsegpt`` with ``bits``. Quantizing pruned weights needs a grid on which 0 is a level
(symmetric, or asymmetric with an integer zero-point, the default), so a pruned weight stays exactly zero.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from llmopt_jax.compress.calibrate import MatrixTransform
from llmopt_jax.compress.hessian import InputStats
from llmopt_jax.compress.prune import magnitude_prune, parse_pattern, sparsegpt_prune, wanda_prune
from llmopt_jax.compress.quantize import (
    GridColumnQuantizer, QuantGrid, QuantizedMatrix, encode, fit_grid, gptq_quantize, rtn_quantize,
)
from llmopt_jax.errors import ConfigError


def magnitude(sparsity: float = 0.5, pattern: str = "") -> MatrixTransform:
    """Drops the smallest ``|W|`` (no calibration statistics needed)."""
    pat = parse_pattern(sparsity, pattern)

    def apply(w: jax.Array, stats: InputStats | None) -> tuple[jax.Array, dict]:
        new_w, keep = magnitude_prune(w, pat)
        return new_w, {"keep": keep}

    apply.needs_calibration = False  # the engine then skips the forward passes
    return apply


def wanda(sparsity: float = 0.5, pattern: str = "") -> MatrixTransform:
    """Drops the smallest ``|W_ij|·‖X_j‖`` per output row."""
    pat = parse_pattern(sparsity, pattern)

    def apply(w: jax.Array, stats: InputStats) -> tuple[jax.Array, dict]:
        new_w, keep = wanda_prune(w, stats.column_norms, pat)
        return new_w, {"keep": keep}

    return apply


def sparsegpt(
    sparsity: float = 0.5, pattern: str = "", blocksize: int = 128, damp_fraction: float = 0.01,
    bits: int = 0, group_size: int = -1, symmetric: bool = False,
) -> MatrixTransform:
    """SparseGPT with the layer's input Hessian; with ``bits`` > 0 it also rounds the kept weights to a
    ``bits``-bit grid (per channel, or groups of ``group_size`` inputs; asymmetric with an integer zero-point
    as in the reference code, or symmetric) in the same pass. Both grids have 0 as a level."""
    pat = parse_pattern(sparsity, pattern)
    if blocksize < 1 or not 0 <= damp_fraction:
        raise ConfigError(f"sparsegpt needs blocksize >= 1 and damp_fraction >= 0, got {blocksize}, {damp_fraction}")
    grid = QuantGrid(bits, group_size, symmetric=symmetric) if bits else None

    def apply(w: jax.Array, stats: InputStats) -> tuple[jax.Array, dict]:
        if grid is None:
            new_w, keep = sparsegpt_prune(w, stats.hessian, pat, blocksize, damp_fraction)
            return new_w, {"keep": keep}
        # The grid is fitted to the dense weights up front (static groups), as in the paper's joint mode.
        scale, offset = fit_grid(w, grid)
        quantizer = GridColumnQuantizer(grid, grid.group_width(w.shape[1]))
        new_w, keep = sparsegpt_prune(w, stats.hessian, pat, blocksize, damp_fraction, quantizer, (scale, offset))
        codes = encode(new_w, scale, offset, grid).astype(grid.code_dtype)
        return new_w, {"keep": keep, "quantized": QuantizedMatrix(codes, scale, offset, grid)}

    apply.quantizes, apply.grid = grid is not None, grid
    return apply


def rtn(bits: int = 4, group_size: int = -1, symmetric: bool = False, per_tensor: bool = False,
        zero_point: str = "int", ternary: bool = False) -> MatrixTransform:
    """Round-to-nearest on a ``bits``-bit grid, or QMoE's ternary grid with ``ternary`` (``bits`` is then 2; no
    calibration statistics needed)."""
    grid = QuantGrid(2 if ternary else bits, group_size, symmetric, per_tensor, zero_point, ternary=ternary)

    def apply(w: jax.Array, stats: InputStats | None) -> tuple[jax.Array, dict]:
        new_w, qm = rtn_quantize(w, grid)
        return new_w, {"quantized": qm}

    apply.needs_calibration = False
    apply.quantizes, apply.grid = True, grid
    return apply


def gptq(
    bits: int = 4, group_size: int = -1, symmetric: bool = False, act_order: bool = False,
    static_groups: bool = False, blocksize: int = 128, damp_fraction: float = 0.01, zero_point: str = "int",
    ternary: bool = False,
) -> MatrixTransform:
    """GPTQ on a ``bits``-bit grid with the layer's input Hessian (``ternary``: QMoE's ternary grid, ``bits`` 2;
    QMoE dampens with ``damp_fraction=0.1``)."""
    grid = QuantGrid(2 if ternary else bits, group_size, symmetric, zero_point=zero_point, ternary=ternary)
    if blocksize < 1 or not 0 <= damp_fraction:
        raise ConfigError(f"gptq needs blocksize >= 1 and damp_fraction >= 0, got {blocksize}, {damp_fraction}")

    def apply(w: jax.Array, stats: InputStats) -> tuple[jax.Array, dict]:
        new_w, qm = gptq_quantize(w, stats.hessian, grid, blocksize=blocksize, damp_fraction=damp_fraction,
                                  act_order=act_order, static_groups=static_groups)
        return new_w, {"quantized": qm}

    apply.quantizes, apply.grid = True, grid
    return apply


TRANSFORMS: dict[str, Callable[..., MatrixTransform]] = {
    "magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt, "rtn": rtn, "gptq": gptq,
}


def chain(*transforms: MatrixTransform) -> MatrixTransform:
    """Applies ``transforms`` in order; the result keeps the intersection of their keep-masks and the last
    step's quantization record (only the last step may quantize)."""
    if any(getattr(t, "quantizes", False) for t in transforms[:-1]):
        raise ConfigError("a quantizing step must be the last step of a recipe (later steps would change the "
                          "weights behind its integer codes)")
    last_grid = getattr(transforms[-1], "grid", None) if transforms else None
    if len(transforms) > 1 and last_grid is not None and not last_grid.zero_exact:
        raise ConfigError("quantizing pruned weights needs a grid with 0 as a level (symmetric, or "
                          "zero_point='int'): 0 is not a level of a float-offset grid")

    def apply(w: jax.Array, stats: InputStats) -> tuple[jax.Array, dict]:
        keep = jnp.ones(w.shape, bool)
        out: dict = {}
        for transform in transforms:
            w, info = transform(w, stats)
            keep = keep & info.get("keep", True)
            w = jnp.where(keep, w, 0.0).astype(w.dtype)
            out = {k: v for k, v in info.items() if k == "quantized"}
        if "quantized" in out and len(transforms) > 1:  # a pruned weight is 0: its group's zero-point code
            qm = out["quantized"]
            zero = jnp.repeat(qm.zero, w.shape[1] // qm.zero.shape[1], axis=1)
            out["quantized"] = qm.replace(codes=jnp.where(keep, qm.codes, zero).astype(qm.codes.dtype))
        return w, {"keep": keep, **out}

    apply.needs_calibration = any(getattr(t, "needs_calibration", True) for t in transforms)
    apply.quantizes = bool(transforms) and getattr(transforms[-1], "quantizes", False)
    apply.grid = last_grid
    return apply


def from_recipe(steps: Sequence[Mapping[str, Any]]) -> MatrixTransform:
    """The chained transform described by ``steps`` (see module docstring); unknown methods or options raise."""
    built = []
    for step in steps:
        options = dict(step)
        name = options.pop("method", None)
        if name not in TRANSFORMS:
            raise ConfigError(f"unknown compression method {name!r}; known: {sorted(TRANSFORMS)}")
        try:
            built.append(TRANSFORMS[name](**options))
        except TypeError as e:
            raise ConfigError(f"compression step {name!r}: {e}") from e
    return chain(*built)
