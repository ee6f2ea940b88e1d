"""Weight-activation int8 (W8A8) with SmoothQuant smoothing (Xiao et al., 2023).

Per-token int8 activations lose precision when a few input channels carry outliers. SmoothQuant divides input
channel ``j`` of a linear layer by ``s_j = max|X_j|^α / max|W_j|^(1-α)`` and multiplies row ``j`` of the weights
by ``s_j``: the float product is unchanged, the activation range flattens and the weights absorb the outliers.
The division is folded into the op that produces the input, so it costs nothing at run time:

- q/k/v read the attention RMSNorm: its scale is divided by ``s``;
- gate/up read the MLP RMSNorm: likewise;
- down reads ``silu(gate)·up``: ``up``'s output column ``j`` is divided by ``s_j``.

``o_proj``'s input is not smoothed: it is the attention output, whose channels come from value heads shared by
several query heads (GQA), so one factor per channel cannot be folded into ``v_proj`` for all of them.

:func:`w8a8_dot_general` is the matmul: each token's activations (the contracted axes of the left operand) are
rounded to int8 with their own scale at run time, multiplied with the int8 weight codes accumulating in int32,
and rescaled by the token scale times the weight's per-output-channel scale.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llmopt_jax.compress.packed import PackedTensor, unpack_codes
from llmopt_jax.errors import ConfigError

# input group -> (RMSNorm producing it or None, layers reading it, layer whose output columns produce it or None)
SMOOTHED = {"attn_in": ("attn_norm", ("q_proj", "k_proj", "v_proj"), None),
            "mlp_in": ("mlp_norm", ("gate_proj", "up_proj"), None),
            "mlp_out": (None, ("down_proj",), "up_proj")}


def smoothing_factors(act_max: jax.Array, weight_max: jax.Array, alpha: float) -> jax.Array:
    """``s_j = max|X_j|^α / max|W_j|^(1-α)`` float32 ``[d]`` (1 where a channel never fired or has no weight)."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"smoothquant alpha must be in [0, 1], got {alpha}")
    act_max, weight_max = jnp.asarray(act_max, jnp.float32), jnp.asarray(weight_max, jnp.float32)
    s = act_max**alpha / jnp.maximum(weight_max, 1e-8) ** (1.0 - alpha)
    return jnp.where((act_max > 0) & (weight_max > 0), jnp.maximum(s, 1e-5), 1.0)


def smooth_block(block: dict, act_max: dict[str, Any], alpha: float) -> tuple[dict, dict[str, jax.Array]]:
    """One decoder block's pure params (float) with every :data:`SMOOTHED` input migrated; returns the new block
    and the factors used per input group. The block computes the same function (up to float rounding)."""
    block = dict(block)
    factors = {}
    for group, (norm, readers, producer) in SMOOTHED.items():
        rows = lambda name: jnp.asarray(block[name]["kernel"], jnp.float32).reshape(act_max[group].shape[0], -1)  # noqa
        weight_max = jnp.max(jnp.concatenate([jnp.abs(rows(n)) for n in readers], axis=1), axis=1)
        s = smoothing_factors(act_max[group], weight_max, alpha)
        for name in readers:
            kernel = block[name]["kernel"]
            block[name] = {"kernel": (rows(name) * s[:, None]).reshape(kernel.shape).astype(kernel.dtype)}
        if norm is not None:
            scale = block[norm]["scale"]
            block[norm] = {"scale": (jnp.asarray(scale, jnp.float32) / s).astype(scale.dtype)}
        else:
            kernel = block[producer]["kernel"]
            block[producer] = {"kernel": (jnp.asarray(kernel, jnp.float32) / s).astype(kernel.dtype)}
        factors[group] = s
    return block, factors


def w8a8_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``dot_general`` with dynamic per-token int8 activations and int8 per-channel weights (a packed 8-bit
    symmetric per-channel ``PackedTensor``); float operands fall through to ``jax.lax.dot_general``."""
    if not isinstance(rhs, PackedTensor):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    if rhs.bits != 8 or rhs.offset is not None or rhs.zero is not None or rhs.scale.shape[-2] != 1:
        raise ConfigError("W8A8 needs 8-bit symmetric per-channel weights")
    (contract_x, contract_w), batch = dimension_numbers
    if batch != ((), ()) or contract_w != tuple(range(rhs.n_in)):
        raise ConfigError("W8A8 supports a plain linear layer (no batch dims, kernel inputs leading)")
    x = lhs.astype(jnp.float32)
    x_scale = jnp.max(jnp.abs(x), axis=contract_x, keepdims=True) / 127.0
    xq = jnp.round(x / jnp.where(x_scale == 0, 1.0, x_scale)).astype(jnp.int8)
    wq = unpack_codes(rhs.data, 8, rhs.lo).astype(jnp.int8).reshape(rhs.shape)
    acc = jax.lax.dot_general(xq, wq, dimension_numbers, preferred_element_type=jnp.int32)
    out_shape = rhs.shape[rhs.n_in:]
    token_scale = jnp.squeeze(x_scale, axis=contract_x).reshape(x_scale.shape[: x.ndim - len(contract_x)]
                                                                 + (1,) * len(out_shape))
    y = acc.astype(jnp.float32) * token_scale * rhs.scale.astype(jnp.float32).reshape(out_shape)
    return y.astype(preferred_element_type or lhs.dtype)


def smoothquant_w8a8(model, calib: np.ndarray, alpha: float = 0.5, batch_size: int = 0, progress: bool = False,
                     smooth: bool = True) -> tuple[Any, Any, dict, dict]:
    """Smooths (unless ``smooth=False``) and quantizes every block linear layer of ``model`` (a
    ``PretrainedModel``) to int8 per channel; the returned model multiplies with :func:`w8a8_dot_general`.

    Returns ``(graphdef, params, float pure params (smoothed, weights dequantized), report)``, which
    ``compress.api.compress`` wraps in a ``CompressedModel``; ``report["smoothing"]`` holds the factors per block
    and input group.
    """
    from flax import nnx

    from llmopt_jax.compress.calibrate import KERNEL_INPUT_DIMS, compress_sequentially
    from llmopt_jax.compress.packed import pack_params, packed_model
    from llmopt_jax.compress.recipe import rtn
    from llmopt_jax.models.layout import layer_params, stack_layers

    cfg = model.cfg
    pure = nnx.to_pure_dict(model.params)
    factors: list = []
    if smooth:  # activation ranges of the float model, one pass
        _, stats = compress_sequentially(cfg, pure, calib, lambda w, s: (w, {}), batch_size=batch_size,
                                         progress=progress, keep_abs_max=True)
        layers = []
        for i in range(cfg.num_layers):
            block, f = smooth_block(layer_params(pure["layers"], i, cfg.scan_layers), stats["abs_max"][i], alpha)
            layers.append(jax.tree.map(np.asarray, block))
            factors.append({g: np.asarray(v) for g, v in f.items()})
        pure = {**pure, "layers": stack_layers(layers, cfg.scan_layers)}
    new, report = compress_sequentially(cfg, pure, calib, rtn(bits=8, symmetric=True), batch_size=batch_size,
                                        progress=progress)
    graphdef, params = packed_model(cfg, pack_params(new, report["quantized"], KERNEL_INPUT_DIMS),
                                    dot_general=w8a8_dot_general)
    report = {**report, "smoothing": factors, "seconds": report["seconds"] + (stats["seconds"] if smooth else 0.0)}
    return graphdef, params, new, report

