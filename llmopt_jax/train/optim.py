"""optax optimizer from config: AdamW, linear warmup + cosine decay, global-norm clipping."""

from __future__ import annotations

from typing import Mapping

import jax
import optax
from flax import nnx

from llmopt_jax.errors import ConfigError


def fit_warmup(warmup_steps: int, total_steps: int) -> int:
    """The warmup a schedule of ``total_steps`` uses: ``warmup_steps`` when it is shorter than the run, else half
    the run (a short run of a preset, e.g. the smoke preset at ``train.steps=5``, still warms up, then decays)."""
    warmup_steps, total_steps = int(warmup_steps), int(total_steps)
    return warmup_steps if warmup_steps < total_steps else total_steps // 2


def learning_rate_schedule(cfg: Mapping) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then cosine decay to
    ``learning_rate * final_lr_fraction`` at ``total_steps``."""
    total, warmup = int(cfg["total_steps"]), int(cfg["warmup_steps"])
    if total <= 0 or warmup < 0 or warmup >= total:
        raise ConfigError(f"need 0 <= warmup_steps < total_steps, got warmup_steps={warmup}, total_steps={total}")
    peak = float(cfg["learning_rate"])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=total,
        end_value=peak * float(cfg.get("final_lr_fraction", 0.1)),
    )


def decay_mask(params):
    """True for parameters that get weight decay: matrices, not norm scales (by logical axis ``norm``)."""

    def one(x):
        if isinstance(x, nnx.Variable):
            axes = x.get_metadata().get("out_sharding") or ()
            return "norm" not in axes
        return x.ndim >= 2

    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(cfg: Mapping) -> optax.GradientTransformation:
    """The optimizer named by ``cfg`` (keys: learning_rate, warmup_steps, total_steps, weight_decay, b1, b2,
    eps, grad_clip_norm, final_lr_fraction). Only ``adamw`` exists today."""
    name = cfg.get("name", "adamw")
    if name != "adamw":
        raise ConfigError(f"optim.name={name!r}; only 'adamw' is implemented")
    transforms = []
    if float(cfg.get("grad_clip_norm", 0.0)) > 0:
        transforms.append(optax.clip_by_global_norm(float(cfg["grad_clip_norm"])))
    transforms.append(
        optax.adamw(
            learning_rate=learning_rate_schedule(cfg), b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.95)),
            eps=float(cfg.get("eps", 1e-8)), weight_decay=float(cfg.get("weight_decay", 0.1)), mask=decay_mask,
        )
    )
    return optax.chain(*transforms)
