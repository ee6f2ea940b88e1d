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
import functools
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm  # text bars: tqdm.auto needs ipywidgets in notebooks and warns without it

from llmopt_jax.compress.hessian import InputStats
from llmopt_jax.errors import ConfigError
from llmopt_jax.models.config import ModelConfig
from llmopt_jax.models.decoder import Block
from llmopt_jax.models.layout import layer_params, stack_layers

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


COMPUTE_DTYPES = ("auto", "bfloat16", "float32", "mixed")
_NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bfloat16() -> bool:
    """Whether this host's CPU multiplies bfloat16 in hardware (x86 AVX512-BF16 or AMX, from ``/proc/cpuinfo``).
    Without it XLA:CPU converts bfloat16 operands to float32 around every matmul, which is slower than float32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return False
    return any(flag in flags for flag in _NATIVE_BF16_CPU_FLAGS)


def resolve_compute_dtype(compute_dtype: str, quantizes: bool = False) -> str:
    """The calibration passes' matmul dtype: ``"bfloat16"`` (both passes), ``"float32"`` (both) or ``"mixed"``
    (bfloat16 statistics passes, float32 propagation of the compressed blocks' outputs).

    ``"auto"``: float32 for quantizing transforms, and for pruning on CPUs without native bfloat16 (an AVX2 CPU:
    SmolLM2 SparseGPT end to end took 203 s in bfloat16 vs 142 s in float32 on 2 Zen 3 cores); bfloat16 for pruning
    on accelerators and :func:`cpu_has_native_bfloat16` CPUs. Why quantizing stays float32: on SmolLM2 GPTQ 3-bit,
    far-text perplexity over the GPTQ reference code's (float32) was 0.93 / 1.10 / 1.12 with float32 passes
    (per channel at two calibration seeds, groups of 64), 1.92 / 1.42 / 1.10 with bfloat16 passes and 0.94 / 1.12 /
    1.57 mixed; SparseGPT 50 % is unmoved by bfloat16 (20.67 vs 20.69). The others are returned as given."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"calibration compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
    if compute_dtype != "auto":
        return compute_dtype
    if quantizes or (jax.default_backend() == "cpu" and not cpu_has_native_bfloat16()):
        return "float32"
    return "bfloat16"


def bfloat16_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``jax.lax.dot_general`` on bfloat16 operands with float32 accumulation and a float32 result."""
    del precision, preferred_element_type  # always bf16 x bf16 -> f32
    return jax.lax.dot_general(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), dimension_numbers,
                               preferred_element_type=jnp.float32)


def capturing_block_forward(graphdef, abstract, block_params: dict, x: jax.Array,
                            linears: Callable[[nnx.Module], dict[str, nnx.Module]]) -> tuple[jax.Array, dict]:
    """Runs one block (``graphdef`` + ``abstract`` state filled with ``block_params``) on ``x`` ``[B, L, D]`` at
    positions 0..L-1; returns its output ``[B, L, D]`` and the input of each linear ``linears(block)`` names."""
    state = jax.tree.map(lambda a: a, abstract)
    nnx.replace_by_pure_dict(state, block_params)
    block = nnx.merge(graphdef, state)
    captured: dict[str, jax.Array] = {}
    for name, linear in linears(block).items():
        base = linear.dot_general

        def record(lhs, rhs, dims, precision=None, preferred_element_type=None, _name=name, _base=base):
            captured[_name] = lhs
            return _base(lhs, rhs, dims, precision=precision, preferred_element_type=preferred_element_type)

        linear.dot_general = record
    positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    y, _ = block(x, positions)
    return y, captured


class _BlockRunner:
    """Jitted passes of one decoder block, its parameters given as a pure dict (compiled once for all blocks).

    ``compute_dtype="bfloat16"`` runs the linear layers' matmuls and the ``XᵀX`` products on bfloat16 operands
    with float32 accumulation (residual stream, norms, attention and the statistics stay float32). On CPUs with
    AMX/AVX512-BF16 and on GPUs/TPUs that is several times faster than float32 matmuls, and it is what the
    reference code does on GPUs (its block forwards run in float16). ``"float32"`` gives exact float32 passes;
    ``"mixed"`` bfloat16 statistics passes and float32 propagation; ``"auto"`` picks one for this host and
    transform (:func:`resolve_compute_dtype`).
    Attention skips the score blocks that causality masks (``xla_causal``) where the model uses plain ``xla``.
    """

    def __init__(self, cfg: ModelConfig, compute_dtype: str = "auto", quantizes: bool = False):
        self.compute_dtype = resolve_compute_dtype(compute_dtype, quantizes)
        self.low_precision = self.compute_dtype in ("bfloat16", "mixed")  # the statistics passes
        if cfg.attention == "xla":  # calibration windows are whole sequences at positions 0..L-1
            cfg = dataclasses.replace(cfg, attention="xla_causal")

        def split(dot):
            return nnx.split(nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0), dot_general=dot)))

        self.statistics_block = split(bfloat16_dot_general if self.low_precision else jax.lax.dot_general)
        # Only "mixed" propagates at another precision than its statistics passes run.
        self.propagate_block = split(jax.lax.dot_general) if self.compute_dtype == "mixed" else self.statistics_block
        self.statistics = jax.jit(self._statistics)
        self.forward = jax.jit(self._forward)

    @staticmethod
    def _capturing_forward(split_block: tuple, block_params: dict, x: jax.Array) -> tuple[jax.Array, dict]:
        """Block output ``[B, L, D]`` and the input of each linear layer, keyed by name."""
        return capturing_block_forward(*split_block, block_params, x,
                                       lambda block: {name: getattr(block, name) for name in LINEAR_NAMES})

    def _statistics(self, block_params: dict, xs: jax.Array, real: jax.Array,
                    stats: dict[str, InputStats]) -> dict[str, InputStats]:
        """``stats`` updated with every linear input of the block run on each batch of ``xs`` ``[nb, B, L, D]``;
        windows whose ``real`` ``[nb, B]`` is False (padding) are not counted.

        One compiled loop over the batches; the block's output is not needed here, so XLA drops the last matmul
        (``down_proj``) and the residual add.
        """
        def one(stats, batch):
            x, keep = batch
            _, captured = self._capturing_forward(self.statistics_block, block_params, x)
            out = {}
            for group, names in INPUT_GROUPS.items():
                inputs = captured[names[0]]
                inputs = jnp.where(keep.reshape((-1,) + (1,) * (inputs.ndim - 1)), inputs, 0)
                rows = inputs.reshape(-1, stats[group].xtx.shape[0])
                out[group] = stats[group].update(rows, low_precision=self.low_precision,
                                                 count=jnp.sum(keep) * x.shape[1])
            return out, None

        return jax.lax.scan(one, stats, (xs, real))[0]

    def _forward(self, block_params: dict, xs: jax.Array) -> jax.Array:
        """The block's output ``[nb, B, L, D]`` for each batch of ``xs`` ``[nb, B, L, D]``."""
        return jax.lax.map(lambda x: self._capturing_forward(self.propagate_block, block_params, x)[0], xs)


def auto_batch_size(seq_len: int) -> int:
    """Windows per calibration step: ~1024 tokens on CPU, where XLA's bf16 matmuls run fastest on operands that
    stay in cache (SmolLM2 block forward, 32 x 512 tokens: 0.29 s in steps of 2 windows, 0.39-0.45 s in steps of
    8), and 8192 tokens on accelerators."""
    tokens = 1024 if jax.default_backend() == "cpu" else 8192
    return max(1, tokens // seq_len)


@dataclasses.dataclass
class LayerReport:
    """What happened to one weight matrix."""

    block: int
    name: str
    shape: tuple[int, int]  # [outputs, inputs]
    sparsity: float  # fraction of exact zeros after the transform
    relative_error: float | None  # ‖(W − Ŵ)X‖² / ‖WX‖² on the calibration inputs (None: no calibration)
    seconds: float  # the transform alone (statistics gathered beforehand)


@functools.partial(jax.jit, static_argnames="low_precision")
def _error_ratio(w: jax.Array, new_w: jax.Array, hessian: jax.Array, low_precision: bool = False) -> jax.Array:
    delta = w - new_w
    if low_precision:  # bfloat16 operands, float32 sums: ~2x faster on CPU, 3 significant digits of the ratio
        dot = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)
        h = hessian.astype(jnp.bfloat16)
        num = jnp.sum(dot(delta.astype(jnp.bfloat16), h) * delta)
        den = jnp.sum(dot(w.astype(jnp.bfloat16), h) * w)
    else:
        hp = jax.lax.Precision.HIGHEST
        num = jnp.sum(jnp.matmul(delta, hessian, precision=hp) * delta)
        den = jnp.sum(jnp.matmul(w, hessian, precision=hp) * w)
    return num / jnp.maximum(den, 1e-30)


def relative_reconstruction_error(w: jax.Array, new_w: jax.Array, hessian: jax.Array, *,
                                  low_precision: bool = False) -> float:
    """``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` = ``‖(W − Ŵ)X‖² / ‖WX‖²`` for ``W``, ``Ŵ`` ``[rows, cols]``, ``H`` ``[cols, cols]``.
    ``low_precision``: the two matmuls on bfloat16 operands (float32 accumulation), as the calibration passes with
    ``compute_dtype="bfloat16"`` run theirs."""
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return float(_error_ratio(f32(w), f32(new_w), f32(hessian), low_precision))


def compress_sequentially(
    cfg: ModelConfig,
    params: Any,
    windows: np.ndarray | None,
    transform: MatrixTransform,
    *,
    batch_size: int = 0,
    progress: bool = True,
    keep_abs_max: bool = False,
    compute_dtype: str = "auto",
) -> tuple[dict, dict]:
    """Applies ``transform`` to every linear weight of every block, block by block (SparseGPT's procedure).

    ``params``: an ``nnx.State`` or pure dict of the decoder (layers stacked or listed); ``windows`` int
    ``[N, L]`` calibration tokens; ``batch_size`` windows per step of the passes (0 = :func:`auto_batch_size`).
    Returns ``(new pure params dict, report)``; the input is not modified.
    ``report`` has ``layers`` (a :class:`LayerReport` per matrix), ``masks`` (keep-masks in kernel shape,
    nested like the params), ``quantized`` (each quantized matrix's ``QuantizedMatrix`` in the ``[outputs,
    inputs]`` layout, nested like the params and stacked like them; empty when nothing was quantized),
    ``seconds`` (all of it) with its parts ``seconds_statistics`` (block forwards that record the linear inputs
    and accumulate their statistics), ``seconds_solve`` (the transforms), ``seconds_propagate`` (forwards of the
    compressed blocks) and ``seconds_other`` (error report, copies), ``compute_dtype`` (the matmul dtype the
    passes ran in, ``"auto"`` resolved) and, with ``keep_abs_max``, ``abs_max``: per block, each input group's
    largest ``|x_j|`` ``[d]``. ``compute_dtype``: see :class:`_BlockRunner`. The
    last batch is padded with window 0 to ``batch_size`` so every batch has one compiled shape; padding is not
    counted in the statistics.
    """
    pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    # Data-free transforms (magnitude, RTN) get stats=None, the calibration passes are skipped and ``windows``
    # may be None.
    calibrated = getattr(transform, "needs_calibration", True)
    windows = np.asarray(windows if windows is not None or calibrated else np.zeros((1, 1)), np.int32)
    if windows.ndim != 2 or len(windows) == 0:
        raise ConfigError(f"calibration windows must be a non-empty [N, L] array, got shape {windows.shape}")
    if batch_size < 0:
        raise ConfigError(f"calib.batch_size must be positive (or 0 = auto), got {batch_size}")
    batch_size = batch_size or auto_batch_size(windows.shape[1])
    stacked = cfg.scan_layers
    runner = _BlockRunner(cfg, compute_dtype, quantizes=getattr(transform, "quantizes", False))
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731 - calibration runs in float32
    table = f32(pure["embed"]["embedding"])
    batch_size = min(batch_size, len(windows))
    num_batches = -(-len(windows) // batch_size)
    extra = num_batches * batch_size - len(windows)
    padded = np.concatenate([windows, np.broadcast_to(windows[:1], (extra, windows.shape[1]))]) if extra else windows
    # Activations [nb, B, L, D], one compiled shape for every batch; `real` [nb, B] marks the windows not padding.
    xs = jnp.take(table, jnp.asarray(padded.reshape(num_batches, batch_size, -1)), axis=0)
    real = jnp.asarray(np.arange(len(padded)) < len(windows)).reshape(num_batches, batch_size)
    dims = {"attn_in": cfg.d_model, "attn_out": cfg.num_heads * cfg.head_dim, "mlp_in": cfg.d_model,
            "mlp_out": cfg.mlp_dim}

    t_start = time.perf_counter()
    seconds = dict.fromkeys(("statistics", "solve", "propagate", "other"), 0.0)
    new_layers, layer_masks, layer_quantized, reports, abs_max = [], [], [], [], []
    for i in tqdm(range(cfg.num_layers), desc="blocks", disable=not progress, leave=False):
        t0 = time.perf_counter()
        block = jax.tree.map(f32, layer_params(pure["layers"], i, stacked))
        stats = runner.statistics(block, xs, real, {g: InputStats.zeros(d) for g, d in dims.items()}) \
            if calibrated else dict.fromkeys(dims)
        stats = jax.block_until_ready(stats)  # so the per-matrix seconds below time the transform alone
        seconds["statistics"] += time.perf_counter() - t0
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
                solve_seconds = time.perf_counter() - t0
                seconds["solve"] += solve_seconds
                t0 = time.perf_counter()
                new_block[name] = {"kernel": matrix_to_kernel(name, new_w, block[name]["kernel"])}
                if "keep" in info:
                    masks[name] = {"kernel": np.asarray(info["keep"]).T.reshape(block[name]["kernel"].shape)}
                if "quantized" in info:
                    quantized[name] = {"kernel": jax.tree.map(np.asarray, info["quantized"])}
                reports.append(LayerReport(
                    block=i, name=name, shape=tuple(w.shape), sparsity=float(jnp.mean(new_w == 0)),
                    relative_error=relative_reconstruction_error(w, new_w, stats[group].hessian,
                                                                low_precision=runner.low_precision)
                    if calibrated else None,
                    seconds=solve_seconds,
                ))
                seconds["other"] += time.perf_counter() - t0
        # The next block sees what the compressed block produces (the last block's output feeds nothing).
        t0 = time.perf_counter()
        if calibrated and i < cfg.num_layers - 1:
            xs = jax.block_until_ready(runner.forward(new_block, xs))
        seconds["propagate"] += time.perf_counter() - t0
        original = layer_params(pure["layers"], i, stacked)
        new_layers.append(jax.tree.map(lambda new, old: np.asarray(new, np.asarray(old).dtype), new_block, original))
        layer_masks.append(masks)
        layer_quantized.append(quantized)

    out = {k: v for k, v in pure.items() if k != "layers"}
    out["layers"] = stack_layers(new_layers, stacked)
    masks_out = stack_layers(layer_masks, stacked)  # stacked and mask-free: {}
    quantized_out = stack_layers(layer_quantized, stacked) if layer_quantized[0] else {}
    return out, {"layers": reports, "masks": {"layers": masks_out},
                 "quantized": {"layers": quantized_out} if quantized_out else {},
                 "seconds": time.perf_counter() - t_start, **{f"seconds_{k}": v for k, v in seconds.items()},
                 "compute_dtype": runner.compute_dtype,
                 **({"abs_max": abs_max} if keep_abs_max else {})}
