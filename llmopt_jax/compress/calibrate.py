"""The sequential layer-wise engine of SparseGPT/GPTQ: compress a decoder one block at a time.

Calibration windows are embedded once; then for each block: run the block on the current activations while
recording every linear layer's input, accumulate each input's statistics (``2XᵀX/n``, column norms), apply a
matrix transform to each linear weight, write the block back, and run the *compressed* block to produce the
next block's inputs. Only one block's activations and statistics are alive at a time.

A matrix transform is ``(w [rows = outputs, cols = inputs] float32, InputStats) -> (new_w, info)`` where
``info`` may hold a boolean ``"keep"`` mask and a ``"quantized"`` record (integer codes + scales, see
``compress/quantize.py``); ``compress/prune.py``, ``compress/quantize.py`` and the recipes build them. A transform
with the attribute ``needs_calibration = False`` is data-free and receives ``None`` statistics.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from llmopt_jax.compress.hessian import InputStats
from llmopt_jax.errors import ConfigError
from llmopt_jax.models.config import ModelConfig
from llmopt_jax.models.decoder import Block

MatrixTransform = Callable[[jax.Array, InputStats], tuple[jax.Array, dict]]

# Linear layers of a block, grouped by the activation they read (one set of statistics per group), with the
# number of leading kernel dimensions that are inputs (o_proj's kernel is [heads, head_dim, d_model]).
INPUT_GROUPS = {"attn_in": ("q_proj", "k_proj", "v_proj"), "attn_out": ("o_proj",), "mlp_in": ("gate_proj", "up_proj"),
                "mlp_out": ("down_proj",)}
KERNEL_INPUT_DIMS = {"o_proj": 2}
LINEAR_NAMES = tuple(name for names in INPUT_GROUPS.values() for name in names)


def kernel_to_matrix(name: str, kernel: jax.Array) -> jax.Array:
    """Our kernel ``[*in_shape, *out_shape]`` -> the papers' ``W`` float32 ``[outputs, inputs]``."""
    n_in = KERNEL_INPUT_DIMS.get(name, 1)
    return jnp.asarray(kernel, jnp.float32).reshape(math.prod(kernel.shape[:n_in]), -1).T


def matrix_to_kernel(name: str, matrix: jax.Array, like: jax.Array) -> jax.Array:
    """Inverse of :func:`kernel_to_matrix`, in ``like``'s shape and dtype."""
    return matrix.T.reshape(like.shape).astype(like.dtype)


def block_kernels(params: Any) -> list:
    """Every linear kernel inside the decoder blocks (what the transforms compress), in a fixed order."""
    pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    flat = jax.tree_util.tree_flatten_with_path(pure["layers"])[0]
    return [leaf for path, leaf in flat if getattr(path[-1], "key", None) == "kernel"]


def measured_sparsity(params: Any) -> float:
    """Fraction of exact zeros over all block linear kernels."""
    kernels = block_kernels(params)
    return sum(int(np.sum(np.asarray(k) == 0)) for k in kernels) / sum(int(np.size(k)) for k in kernels)


def _layer(pure: dict, i: int, stacked: bool) -> dict:
    return jax.tree.map(lambda a: a[i], pure["layers"]) if stacked else pure["layers"][i]


class _BlockRunner:
    """Jitted forward passes of one decoder block given its parameters as a pure dict (compiled once)."""

    def __init__(self, cfg: ModelConfig):
        self.graphdef, self.abstract = nnx.split(nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0))))
        self.accumulate = jax.jit(self._accumulate)
        self.forward = jax.jit(lambda params, x: self._capturing_forward(params, x)[0])

    def _capturing_forward(self, block_params: dict, x: jax.Array) -> tuple[jax.Array, dict]:
        """Block output ``[B, L, D]`` and the input of each linear layer, keyed by name."""
        state = jax.tree.map(lambda a: a, self.abstract)
        nnx.replace_by_pure_dict(state, block_params)
        block = nnx.merge(self.graphdef, state)
        captured: dict[str, jax.Array] = {}
        for name in LINEAR_NAMES:
            linear = getattr(block, name)
            base = linear.dot_general

            def record(lhs, rhs, dims, precision=None, preferred_element_type=None, _name=name, _base=base):
                captured[_name] = lhs
                return _base(lhs, rhs, dims, precision=precision, preferred_element_type=preferred_element_type)

            linear.dot_general = record
        positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        y, _ = block(x, positions)
        return y, captured

    def _accumulate(self, block_params: dict, x: jax.Array, stats: dict[str, InputStats]) -> dict[str, InputStats]:
        _, captured = self._capturing_forward(block_params, x)
        return {group: stats[group].update(captured[names[0]].reshape(-1, stats[group].xtx.shape[0]))
                for group, names in INPUT_GROUPS.items()}


@dataclasses.dataclass
class LayerReport:
    """What happened to one weight matrix."""

    block: int
    name: str
    shape: tuple[int, int]  # [outputs, inputs]
    sparsity: float  # fraction of exact zeros after the transform
    relative_error: float | None  # ‖(W − Ŵ)X‖² / ‖WX‖² on the calibration inputs (None: no calibration)
    seconds: float  # the transform alone (statistics gathered beforehand)


@jax.jit
def _error_ratio(w: jax.Array, new_w: jax.Array, hessian: jax.Array) -> jax.Array:
    delta = w - new_w
    hp = jax.lax.Precision.HIGHEST
    num = jnp.sum(jnp.matmul(delta, hessian, precision=hp) * delta)
    den = jnp.sum(jnp.matmul(w, hessian, precision=hp) * w)
    return num / jnp.maximum(den, 1e-30)


def relative_reconstruction_error(w: jax.Array, new_w: jax.Array, hessian: jax.Array) -> float:
    """``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` = ``‖(W − Ŵ)X‖² / ‖WX‖²`` for ``W``, ``Ŵ`` ``[rows, cols]``, ``H`` ``[cols, cols]``."""
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return float(_error_ratio(f32(w), f32(new_w), f32(hessian)))


def compress_sequentially(
    cfg: ModelConfig,
    params: Any,
    windows: np.ndarray | None,
    transform: MatrixTransform,
    *,
    batch_size: int = 8,
    progress: bool = True,
    keep_abs_max: bool = False,
) -> tuple[dict, dict]:
    """Applies ``transform`` to every linear weight of every block, block by block (SparseGPT's procedure).

    ``params``: an ``nnx.State`` or pure dict of the decoder (layers stacked or listed); ``windows`` int
    ``[N, L]`` calibration tokens. Returns ``(new pure params dict, report)``; the input is not modified.
    ``report`` has ``layers`` (a :class:`LayerReport` per matrix), ``masks`` (keep-masks in kernel shape,
    nested like the params), ``quantized`` (each quantized matrix's ``QuantizedMatrix`` in the ``[outputs,
    inputs]`` layout, nested like the params and stacked like them; empty when nothing was quantized),
    ``seconds`` and, with ``keep_abs_max``, ``abs_max``: per block, each input group's largest ``|x_j|`` ``[d]``.
    """
    pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    # Data-free transforms (magnitude, RTN) get stats=None, the calibration passes are skipped and ``windows``
    # may be None.
    calibrated = getattr(transform, "needs_calibration", True)
    windows = np.asarray(windows if windows is not None or calibrated else np.zeros((1, 1)), np.int32)
    if windows.ndim != 2 or len(windows) == 0:
        raise ConfigError(f"calibration windows must be a non-empty [N, L] array, got shape {windows.shape}")
    if batch_size < 1:
        raise ConfigError(f"calib.batch_size must be positive, got {batch_size}")
    stacked = cfg.scan_layers
    runner = _BlockRunner(cfg)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731 - calibration runs in float32
    table = f32(pure["embed"]["embedding"])
    batches = [windows[s : s + batch_size] for s in range(0, len(windows), batch_size)]
    xs = [jnp.take(table, jnp.asarray(b), axis=0) for b in batches]
    dims = {"attn_in": cfg.d_model, "attn_out": cfg.num_heads * cfg.head_dim, "mlp_in": cfg.d_model,
            "mlp_out": cfg.mlp_dim}

    t_start = time.perf_counter()
    new_layers, layer_masks, layer_quantized, reports, abs_max = [], [], [], [], []
    for i in tqdm(range(cfg.num_layers), desc="blocks", disable=not progress, leave=False):
        block = jax.tree.map(f32, _layer(pure, i, stacked))
        stats = {g: InputStats.zeros(d) for g, d in dims.items()} if calibrated else dict.fromkeys(dims)
        for x in xs if calibrated else ():
            stats = runner.accumulate(block, x, stats)
        stats = jax.block_until_ready(stats)  # so the per-matrix seconds below time the transform alone
        if keep_abs_max:
            abs_max.append({group: np.asarray(s.abs_max) for group, s in stats.items()})
        new_block = jax.tree.map(lambda a: a, block)  # a new tree; leaves are immutable arrays
        masks: dict = {}
        quantized: dict = {}
        for group, names in INPUT_GROUPS.items():
            for name in names:
                t0 = time.perf_counter()
                w = kernel_to_matrix(name, block[name]["kernel"])
                new_w, info = transform(w, stats[group])
                new_w = jax.block_until_ready(new_w)
                seconds = time.perf_counter() - t0
                new_block[name] = {"kernel": matrix_to_kernel(name, new_w, block[name]["kernel"])}
                if "keep" in info:
                    masks[name] = {"kernel": np.asarray(info["keep"]).T.reshape(block[name]["kernel"].shape)}
                if "quantized" in info:
                    quantized[name] = {"kernel": jax.tree.map(np.asarray, info["quantized"])}
                reports.append(LayerReport(
                    block=i, name=name, shape=tuple(w.shape), sparsity=float(jnp.mean(new_w == 0)),
                    relative_error=relative_reconstruction_error(w, new_w, stats[group].hessian)
                    if calibrated else None,
                    seconds=seconds,
                ))
        # The next block sees what the compressed block produces.
        xs = [runner.forward(new_block, x) for x in xs] if calibrated else xs
        original = _layer(pure, i, stacked)
        new_layers.append(jax.tree.map(lambda new, old: np.asarray(new, np.asarray(old).dtype), new_block, original))
        layer_masks.append(masks)
        layer_quantized.append(quantized)

    out = {k: v for k, v in pure.items() if k != "layers"}
    if stacked:
        out["layers"] = jax.tree.map(lambda *a: np.stack(a), *new_layers)
        masks_out = jax.tree.map(lambda *a: np.stack(a), *layer_masks) if layer_masks[0] else {}
        quantized_out = jax.tree.map(lambda *a: np.stack(a), *layer_quantized) if layer_quantized[0] else {}
    else:
        out["layers"] = dict(enumerate(new_layers))
        masks_out = dict(enumerate(layer_masks))
        quantized_out = dict(enumerate(layer_quantized)) if layer_quantized[0] else {}
    return out, {"layers": reports, "masks": {"layers": masks_out},
                 "quantized": {"layers": quantized_out} if quantized_out else {},
                 "seconds": time.perf_counter() - t_start, **({"abs_max": abs_max} if keep_abs_max else {})}
