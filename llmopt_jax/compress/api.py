"""The one entry point of compression: ``compress(model, recipe, calib) -> CompressedModel``.

A recipe is config data, a list of steps, each a mapping with a ``method`` and that method's options::

    [{"method": "sparsegpt", "sparsity": 0.5}, {"method": "gptq", "bits": 4, "group_size": 64}]

Methods:

- per-matrix transforms, chained in order on every block linear layer by the sequential layer-wise engine
  (``compress/calibrate.py``): ``magnitude``, ``wanda``, ``sparsegpt`` (with ``bits`` it also quantizes in the same
  pass), ``rtn``, ``gptq`` (options: ``compress/recipe.py``);
- ``embedding``: round the token embedding (the tied LM head) to a symmetric ``bits``-bit grid with groups of
  ``group_size`` (default 32, llama.cpp's Q8_0/Q4_0 layout) and keep it packed;
- ``cast``: store the float weights in ``dtype`` (``bfloat16`` / ``float16`` / ``float32``);
- ``smoothquant``: W8A8, int8 per-channel weights after SmoothQuant smoothing (``alpha``; ``smooth=False`` is
  plain W8A8) with dynamic per-token int8 activations; it replaces the matmul, so it is the recipe's only step.

Quantized weights stay packed (``compress/packed.py``): the returned model holds real bits and runs from them.
:func:`method_recipe` turns the flat options of ``configs/compress.py`` (``method``, ``bits``, ``sparsity``, ...)
into a recipe, so that every command-line entry point means the same thing by a method name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from llmopt_jax.compress.calibrate import MatrixTransform
from llmopt_jax.errors import ConfigError
from llmopt_jax.io.load import PretrainedModel

MODEL_METHODS = ("embedding", "cast", "smoothquant")
CAST_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class CompressedModel(PretrainedModel):
    """A compressed model with the interface of a loaded one (``cfg``, ``graphdef``, ``params``, ``tokenizer``,
    ``path``, ``bytes_held``), plus how it was made.

    ``params`` hold packed kernels where a step quantized; ``float_params`` is the pure dict of every weight as a
    float (quantized ones dequantized), what a float export writes. ``report`` is the engine's
    (``compress_sequentially``): per-matrix ``layers``, keep-``masks``, ``quantized`` records and ``seconds*``;
    SmoothQuant adds ``smoothing``.
    """

    recipe: list = dataclasses.field(default_factory=list)
    float_params: dict = dataclasses.field(default_factory=dict)
    report: dict = dataclasses.field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Measured fraction of zeros over all block linear kernels."""
        from llmopt_jax.compress.calibrate import measured_sparsity

        return measured_sparsity(self.float_params)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight of the block linear layers, scales and zero-points included (32 for float32)."""
        from flax import nnx

        from llmopt_jax.compress.packed import block_bits_per_weight

        return block_bits_per_weight(nnx.to_pure_dict(self.params))

    @property
    def seconds(self) -> float:
        """Seconds the compression took (0 for a recipe with nothing to compute)."""
        return float(self.report.get("seconds", 0.0))

    def summary(self) -> dict[str, Any]:
        """Flat numbers for ``results.json``: ``sparsity``, ``bits_per_weight``, ``model_bytes``,
        ``seconds_compress`` and, when measured, its parts ``seconds_statistics/solve/propagate/other``."""
        phases = ("seconds_statistics", "seconds_solve", "seconds_propagate", "seconds_other")
        return {"sparsity": self.sparsity, "bits_per_weight": self.bits_per_weight, "model_bytes": self.bytes_held,
                "seconds_compress": self.seconds, **{k: float(self.report[k]) for k in phases if k in self.report}}


@dataclasses.dataclass(frozen=True)
class RecipePlan:
    """A validated recipe: the chained per-matrix transform (or None) and the model-level steps."""

    matrix: MatrixTransform | None
    embedding: Any  # QuantGrid or None
    dtype: str | None
    smoothquant: dict | None

    @property
    def needs_calibration(self) -> bool:
        """Whether calibration windows are needed (a data-aware transform, or SmoothQuant's activation ranges)."""
        if self.smoothquant is not None:
            return True
        return self.matrix is not None and getattr(self.matrix, "needs_calibration", True)


def _options(step: Mapping[str, Any], allowed: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(step) - set(allowed) - {"method"})
    if unknown:
        raise ConfigError(f"recipe step {step['method']!r} has no option(s) {unknown}; it takes {sorted(allowed)}")
    return {**allowed, **{k: v for k, v in step.items() if k != "method"}}


def plan_recipe(recipe: Sequence[Mapping[str, Any]]) -> RecipePlan:
    """Checks ``recipe`` (see the module docstring) without touching a model; raises ``ConfigError`` naming the
    step and option at fault."""
    from llmopt_jax.compress.quantize import QuantGrid
    from llmopt_jax.compress.recipe import TRANSFORMS, from_recipe

    if isinstance(recipe, Mapping) or isinstance(recipe, str):
        raise ConfigError("a recipe is a list of steps, e.g. [{'method': 'gptq', 'bits': 4}]")
    matrix_steps, embedding, dtype, smoothquant = [], None, None, None
    known = sorted(TRANSFORMS) + list(MODEL_METHODS)
    for step in recipe:
        if not isinstance(step, Mapping) or "method" not in step:
            raise ConfigError(f"recipe step {step!r} is not a mapping with a 'method' (one of {known})")
        method = step["method"]
        if method in TRANSFORMS:
            if embedding is not None or dtype is not None:
                raise ConfigError(f"recipe step {method!r} comes after a model-level step; put 'embedding' and "
                                  "'cast' last")
            matrix_steps.append(step)
        elif method == "embedding":
            if embedding is not None:
                raise ConfigError("the recipe has two 'embedding' steps")
            opts = _options(step, {"bits": 8, "group_size": 32})
            embedding = QuantGrid(opts["bits"], opts["group_size"], symmetric=True)
        elif method == "cast":
            opts = _options(step, {"dtype": "bfloat16"})
            if dtype is not None or opts["dtype"] not in CAST_DTYPES:
                raise ConfigError(f"'cast' takes one dtype of {CAST_DTYPES} once, got {opts['dtype']!r}")
            dtype = opts["dtype"]
        elif method == "smoothquant":
            if len(recipe) != 1:
                raise ConfigError("'smoothquant' (W8A8) replaces the matmul and must be the recipe's only step")
            smoothquant = _options(step, {"alpha": 0.5, "smooth": True})
            if not 0.0 <= smoothquant["alpha"] <= 1.0:
                raise ConfigError(f"smoothquant alpha must be in [0, 1], got {smoothquant['alpha']}")
        else:
            raise ConfigError(f"unknown compression method {method!r}; known: {known}")
    matrix = from_recipe(matrix_steps) if matrix_steps else None
    return RecipePlan(matrix, embedding, dtype, smoothquant)


def _has_packed(params: Any) -> bool:
    from flax import nnx

    from llmopt_jax.compress.packed import PackedTensor

    leaves = jax.tree.leaves(nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params,
                             is_leaf=lambda x: isinstance(x, PackedTensor))
    return any(isinstance(x, PackedTensor) for x in leaves)


def compress(
    model: PretrainedModel,
    recipe: Sequence[Mapping[str, Any]],
    calib: np.ndarray | None = None,
    *,
    batch_size: int = 0,
    compute_dtype: str = "auto",
    progress: bool = True,
    mesh=None,
    rules=None,
) -> CompressedModel:
    """Compresses ``model`` (from ``load_pretrained``, or an earlier ``compress`` that did not quantize) with
    ``recipe``, calibrated on ``calib`` int ``[N, L]`` token windows (``calibration_windows``; not needed by
    data-free recipes such as RTN or magnitude pruning).

    ``batch_size``: windows per step of the calibration passes (0 = auto); ``compute_dtype``: their matmul
    operands (``bfloat16``, ``float32``, ``mixed``: bfloat16 statistics and float32 propagation, or ``auto``: see
    ``compress.calibrate.resolve_compute_dtype``). With
    ``mesh`` the result is placed on it under ``rules``. The input model is not modified.
    """
    from flax import nnx

    from llmopt_jax.compress.calibrate import KERNEL_INPUT_DIMS, compress_sequentially
    from llmopt_jax.compress.packed import embedding_record, pack_matrix, pack_params, packed_model
    from llmopt_jax.compress.smoothquant import smoothquant_w8a8
    from llmopt_jax.parallel.sharded_init import load_params

    plan = plan_recipe(recipe)
    if plan.needs_calibration and calib is None:
        raise ConfigError("this recipe needs calibration windows: pass calib=calibration_windows(tokenizer, ...)")
    if _has_packed(model.params) and (plan.matrix is not None or plan.smoothquant or plan.embedding):
        raise ConfigError(f"{model.path}: this model already holds quantized (packed) weights; compress the float "
                          "model with the whole recipe instead")
    recipe = [dict(step) for step in recipe]
    parts = dict(cfg=model.cfg, tokenizer=model.tokenizer, path=model.path, recipe=recipe)
    if plan.smoothquant is not None:
        graphdef, params, pure, report = smoothquant_w8a8(model, calib, plan.smoothquant["alpha"], batch_size,
                                                          progress, smooth=plan.smoothquant["smooth"])
        return CompressedModel(graphdef=graphdef, params=params, float_params=pure, report=report, **parts)

    pure, report = nnx.to_pure_dict(model.params), {}
    if plan.matrix is not None:
        pure, report = compress_sequentially(model.cfg, model.params, calib, plan.matrix, batch_size=batch_size,
                                             progress=progress, compute_dtype=compute_dtype)
    cfg = dataclasses.replace(model.cfg, param_dtype=plan.dtype) if plan.dtype else model.cfg
    parts["cfg"] = cfg
    if not report.get("quantized") and plan.embedding is None:
        if plan.matrix is None and plan.dtype is None:
            graphdef, params = model.graphdef, model.params
        else:
            graphdef, params = load_params(cfg, pure, mesh, rules) if mesh is not None else load_params(cfg, pure)
        return CompressedModel(graphdef=graphdef, params=params, float_params=nnx.to_pure_dict(params),
                               report=report, **parts)
    packed = pack_params(pure, report.get("quantized"), KERNEL_INPUT_DIMS)
    if plan.embedding is not None:
        table = pure["embed"]["embedding"]
        record = embedding_record(table, plan.embedding)
        packed = {**packed, "embed": {"embedding": pack_matrix(record, (table.shape[1], table.shape[0]))}}
        pure = {**pure, "embed": {"embedding": np.asarray(packed["embed"]["embedding"].dequantize().T)}}
        # The record lets a GGUF export store the embedding's own codes (exact when its grid is the file's).
        quantized = dict(report.get("quantized") or {})
        quantized["embed"] = {"embedding": jax.tree.map(np.asarray, record)}
        report = {**report, "quantized": quantized}
    graphdef, params = packed_model(cfg, packed, mesh=mesh, rules=rules)
    return CompressedModel(graphdef=graphdef, params=params, float_params=pure, report=report, **parts)


METHODS = ("dense", "bfloat16", "magnitude", "wanda", "sparsegpt", "rtn", "gptq", "sparsegpt_gptq", "smoothquant",
           "w8a8")
QUANTIZING = ("rtn", "gptq", "sparsegpt_gptq", "smoothquant", "w8a8")


def method_recipe(
    method: str, *, sparsity: float = 0.5, pattern: str = "", bits: int = 32, group_size: int = -1,
    symmetric: bool = False, zero_point: str = "int", act_order: bool = False, static_groups: bool = False,
    blocksize: int = 128, damp_fraction: float = 0.01, embedding_bits: int = 0, smoothquant_alpha: float = 0.5,
) -> list[dict]:
    """The recipe a named method means with flat options (the keys of ``configs/compress.py``):

    ``dense`` (nothing), ``bfloat16`` (store the weights in bfloat16), ``magnitude`` / ``wanda`` / ``sparsegpt``
    (prune to ``sparsity`` or the N:M ``pattern``), ``rtn`` / ``gptq`` (``bits`` 2..8, ``group_size``, grid
    options), ``sparsegpt_gptq`` (both in one SparseGPT pass), ``smoothquant`` / ``w8a8`` (W8A8 with / without
    smoothing; ``bits`` must be 8). ``embedding_bits`` > 0 adds an ``embedding`` step. Raises ``ConfigError`` on
    a bad combination.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method not in QUANTIZING and bits != 32:
        raise ConfigError(f"bits={bits} needs a quantizing method ({', '.join(QUANTIZING)}); {method} keeps "
                          "float weights")
    if method in QUANTIZING and bits == 32:
        raise ConfigError(f"method {method} quantizes: set bits to 2..8")
    if method in ("smoothquant", "w8a8"):
        if bits != 8:
            raise ConfigError(f"{method} is W8A8: bits must be 8, got {bits}")
        if embedding_bits:
            raise ConfigError(f"embedding_bits={embedding_bits} cannot be combined with {method}")
        return [{"method": "smoothquant", "alpha": smoothquant_alpha, "smooth": method == "smoothquant"}]
    prune = {"sparsity": sparsity, "pattern": pattern}
    grid = {"bits": bits, "group_size": group_size, "symmetric": symmetric}
    solver = {"blocksize": blocksize, "damp_fraction": damp_fraction}
    steps = {
        "dense": [], "bfloat16": [{"method": "cast", "dtype": "bfloat16"}],
        "magnitude": [{"method": "magnitude", **prune}], "wanda": [{"method": "wanda", **prune}],
        "sparsegpt": [{"method": "sparsegpt", **prune, **solver}],
        "rtn": [{"method": "rtn", **grid, "zero_point": zero_point}],
        "gptq": [{"method": "gptq", **grid, "zero_point": zero_point, "act_order": act_order,
                  "static_groups": static_groups, **solver}],
        # One pass; a pruned weight keeps its group's zero-point code, so 0 must be a level of the grid.
        "sparsegpt_gptq": [{"method": "sparsegpt", **prune, **solver, **grid}],
    }[method]
    if method == "sparsegpt_gptq" and zero_point != "int":
        raise ConfigError("sparsegpt_gptq needs zero_point='int' (0 must be a level of the grid)")
    if embedding_bits:
        steps.append({"method": "embedding", "bits": embedding_bits})
    plan_recipe(steps)
    return steps
