"""Recipes: matrix transforms built from config data and chained like ``optax.chain``.

A recipe is a list of steps, each a mapping with a ``name`` and that transform's options, e.g.
``[{"name": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"}]``. :func:`chain` applies steps in order with
the same calibration statistics and keeps every zero an earlier step made (a later quantizer cannot revive a
pruned weight), so masks stay valid for sparse fine-tuning.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from llmopt_jax.compress.calibrate import MatrixTransform
from llmopt_jax.compress.hessian import InputStats
from llmopt_jax.compress.prune import magnitude_prune, parse_pattern, sparsegpt_prune, wanda_prune
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
    quantize: Callable | None = None,
) -> MatrixTransform:
    """SparseGPT with the layer's input Hessian (optionally quantizing the kept weights in the same pass)."""
    pat = parse_pattern(sparsity, pattern)
    if blocksize < 1 or not 0 <= damp_fraction:
        raise ConfigError(f"sparsegpt needs blocksize >= 1 and damp_fraction >= 0, got {blocksize}, {damp_fraction}")

    def apply(w: jax.Array, stats: InputStats) -> tuple[jax.Array, dict]:
        new_w, keep = sparsegpt_prune(w, stats.hessian, pat, blocksize, damp_fraction, quantize)
        return new_w, {"keep": keep}

    return apply


TRANSFORMS: dict[str, Callable[..., MatrixTransform]] = {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt}


def chain(*transforms: MatrixTransform) -> MatrixTransform:
    """Applies ``transforms`` in order; the result keeps the intersection of their keep-masks."""

    def apply(w: jax.Array, stats: InputStats) -> tuple[jax.Array, dict]:
        keep = jnp.ones(w.shape, bool)
        for transform in transforms:
            w, info = transform(w, stats)
            keep = keep & info.get("keep", True)
            w = jnp.where(keep, w, 0.0).astype(w.dtype)
        return w, {"keep": keep}

    apply.needs_calibration = any(getattr(t, "needs_calibration", True) for t in transforms)
    return apply


def from_recipe(steps: Sequence[Mapping[str, Any]]) -> MatrixTransform:
    """The chained transform described by ``steps`` (see module docstring); unknown names or options raise."""
    built = []
    for step in steps:
        options = dict(step)
        name = options.pop("name", None)
        if name not in TRANSFORMS:
            raise ConfigError(f"unknown compression step {name!r}; known: {sorted(TRANSFORMS)}")
        try:
            built.append(TRANSFORMS[name](**options))
        except TypeError as e:
            raise ConfigError(f"compression step {name!r}: {e}") from e
    return chain(*built)
