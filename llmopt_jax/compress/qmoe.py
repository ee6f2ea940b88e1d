"""QMoE's expert-batched GPTQ (Frantar & Alistarh, 2023): quantize every expert of a MoE model, layer by layer.

Only the experts are compressed; attention, norms, embeddings and routers keep their precision, as in the paper.
The pass follows the sequential engine of ``compress/calibrate.py`` (statistics of block ``i`` come from the
already-compressed blocks ``0..i-1``) with two MoE-specific parts:

* **per-expert statistics**: each expert's Hessian ``2XᵀX/n`` is accumulated only from the calibration tokens
  routed to it. The block runs with the capacity dispatch at ``C = S`` (nothing dropped, whatever the model's own
  dispatch), and the expert inputs ``[E, G, C, in]`` captured from its matmuls hold exactly each expert's routed
  tokens, zeros in the empty slots (which add nothing to ``XᵀX``; they are not counted in ``n``).
  ``max_tokens_per_expert`` caps ``n`` per expert like QMoE (tokens past the cap, in calibration order, are
  skipped).
* **one batched solve per matrix kind**: the GPTQ solver of ``compress/quantize.py`` ``vmap``-ed over the ``E``
  experts (one compiled solve per layer shape, not ``E``). An expert that received no token has no Hessian and
  falls back to round-to-nearest. Dampening defaults to QMoE's 0.1 of the mean Hessian diagonal.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from tqdm import tqdm

from llmopt_jax.compress.calibrate import capturing_block_forward
from llmopt_jax.compress.codec import MIN_STREAM_SYMBOLS
from llmopt_jax.compress.quantize import QuantGrid, QuantizedMatrix, _gptq, _rtn
from llmopt_jax.errors import ConfigError
from llmopt_jax.models.config import ModelConfig
from llmopt_jax.models.decoder import Block
from llmopt_jax.models.layout import layer_params, layers_are_stacked, stack_layers

EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")
QMOE_DAMP = 0.1


@dataclasses.dataclass
class ExpertStats:
    """Per-expert input statistics: ``xtx`` float32 ``[E, d, d]`` and ``count`` float32 ``[E]`` (tokens)."""

    xtx: jax.Array
    count: jax.Array

    @property
    def hessians(self) -> jax.Array:
        """``2 XᵀX / n`` per expert, ``[E, d, d]`` (zeros for an expert without tokens)."""
        return 2.0 * self.xtx / jnp.maximum(self.count, 1.0)[:, None, None]


def _accumulate(xtx: jax.Array, count: jax.Array, x: jax.Array, cap: float) -> tuple[jax.Array, jax.Array]:
    """Adds expert inputs ``x`` ``[E, G, C, d]`` (zero rows = empty slots) to ``xtx`` ``[E, d, d]`` / ``count``
    ``[E]``, keeping at most ``cap`` tokens per expert (``inf``: all)."""
    e, d = x.shape[0], x.shape[-1]
    rows = x.reshape(e, -1, d).astype(jnp.float32)
    used = jnp.any(rows != 0, axis=-1)  # [E, N]
    rank = count[:, None] + jnp.cumsum(used, axis=1) - 1  # this token's index among the expert's tokens
    keep = used & (rank < cap)
    rows = jnp.where(keep[..., None], rows, 0.0)
    xtx = xtx + jnp.einsum("eni,enj->eij", rows, rows, precision=jax.lax.Precision.HIGHEST)
    return xtx, count + jnp.sum(keep, axis=1).astype(jnp.float32)


class _MoeBlockRunner:
    """Jitted passes of one MoE block (params as a pure dict): the block's output, and the inputs of its experts'
    matmuls accumulated per expert."""

    def __init__(self, cfg: ModelConfig):
        # Capacity dispatch with C = S: each expert's slots hold exactly its routed tokens, none dropped.
        run_cfg = dataclasses.replace(cfg, moe_dispatch="capacity",
                                      moe_capacity_factor=float(cfg.num_experts) / cfg.moe_top_k, scan_layers=False)
        if run_cfg.attention == "xla":
            run_cfg = dataclasses.replace(run_cfg, attention="xla_causal")
        self.graphdef, self.abstract = nnx.split(nnx.eval_shape(lambda: Block(run_cfg, rngs=nnx.Rngs(0), moe=True)))
        self.statistics = jax.jit(self._statistics)
        self.forward = jax.jit(self._forward)

    def _run(self, block_params: dict, x: jax.Array) -> tuple[jax.Array, dict]:
        # up_proj reads gate_proj's input
        return capturing_block_forward(self.graphdef, self.abstract, block_params, x,
                                       lambda block: {name: getattr(block.moe, name) for name in ("gate_proj", "down_proj")})

    def _statistics(self, block_params: dict, xs: jax.Array, real: jax.Array, stats: dict, cap: float) -> dict:
        def one(stats, batch):
            x, keep = batch
            _, captured = self._run(block_params, x)
            out = {}
            for group, name in (("expert_in", "gate_proj"), ("expert_mid", "down_proj")):
                inputs = captured[name]  # [E, G, C, d]; padding windows (G = batch rows) zeroed
                inputs = jnp.where(keep[None, :, None, None], inputs, 0)
                out[group] = _accumulate(*stats[group], inputs, cap)
            return out, None

        return jax.lax.scan(one, stats, (xs, real))[0]

    def _forward(self, block_params: dict, xs: jax.Array) -> jax.Array:
        return jax.lax.map(lambda x: self._run(block_params, x)[0], xs)


@functools.partial(jax.jit, static_argnames=("grid", "blocksize", "damp_fraction"))
def gptq_experts(w: jax.Array, hessians: jax.Array, counts: jax.Array, grid: QuantGrid, *, blocksize: int = 128,
                 damp_fraction: float = QMOE_DAMP) -> QuantizedMatrix:
    """GPTQ over all experts at once: ``w`` float32 ``[E, rows, cols]`` (each expert's ``[outputs, inputs]``),
    ``hessians`` ``[E, cols, cols]``, ``counts`` ``[E]`` tokens each -> a :class:`QuantizedMatrix` whose arrays
    have a leading ``E`` axis. Experts with ``count == 0`` are rounded to nearest instead."""
    static = grid.group_size <= 0 or grid.per_tensor
    solved = jax.vmap(lambda a, h: _gptq(a, h, grid, blocksize, damp_fraction, False, static))(w, hessians)
    nearest = jax.vmap(lambda a: _rtn(a, grid))(w)
    use = counts > 0
    pick = lambda s, r: jnp.where(use.reshape((-1,) + (1,) * (s.ndim - 1)), s, r)  # noqa: E731
    return QuantizedMatrix(pick(solved.codes, nearest.codes), pick(solved.scale, nearest.scale),
                           pick(solved.offset, nearest.offset), grid)


@functools.partial(jax.jit, static_argnames=("grid",))
def rtn_experts(w: jax.Array, grid: QuantGrid) -> QuantizedMatrix:
    """Round-to-nearest of every expert ``w`` ``[E, rows, cols]`` (the data-free baseline)."""
    return jax.vmap(lambda a: _rtn(a, grid))(w)


def dequantize_experts(q: QuantizedMatrix) -> jax.Array:
    """Float32 ``[E, rows, cols]`` weights of an expert-batched :class:`QuantizedMatrix`."""
    return jax.vmap(lambda c, s, o: QuantizedMatrix(c, s, o, q.grid).dequantize())(q.codes, q.scale, q.offset)


def _kernel_to_matrices(kernel: jax.Array) -> jax.Array:
    """Expert kernel ``[E, in, out]`` -> the papers' ``W`` per expert, float32 ``[E, out, in]``."""
    return jnp.swapaxes(jnp.asarray(kernel, jnp.float32), 1, 2)


def quantize_experts(cfg: ModelConfig, params: Any, windows: np.ndarray | None, grid: QuantGrid, *,
                     method: str = "gptq", batch_size: int = 4, blocksize: int = 128,
                     damp_fraction: float = QMOE_DAMP, max_tokens_per_expert: int = 0,
                     progress: bool = True) -> tuple[dict, dict]:
    """Quantizes every expert kernel of a MoE model on ``grid`` (``method``: ``gptq`` sequential, or ``rtn``).

    ``params``: ``nnx.State`` or pure dict (layers stacked or listed); ``windows`` int ``[N, L]`` calibration
    tokens (unused by ``rtn``). Returns ``(new pure params with the dequantized experts, report)``; ``report``
    holds ``quantized`` (per layer and expert kernel, the expert-batched :class:`QuantizedMatrix` as NumPy, in
    ``[E, outputs, inputs]``), ``tokens_per_expert`` (per layer, ``[E]`` counts of ``gate/up`` inputs),
    ``rtn_fallback_experts`` (how many experts had no token) and ``seconds``/``seconds_solve``.
    """
    if not cfg.num_experts:
        raise ConfigError("quantize_experts needs a MoE model (num_experts > 0)")
    if method not in ("gptq", "rtn"):
        raise ConfigError(f"qmoe method must be 'gptq' or 'rtn', got {method!r}")
    pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    stacked, moe_layers = cfg.scan_layers, cfg.moe_layer_indices()
    t_start = time.perf_counter()
    solve_seconds = 0.0
    cap = float(max_tokens_per_expert) if max_tokens_per_expert > 0 else float("inf")
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    calibrated = method == "gptq"
    if calibrated:
        windows = np.asarray(windows, np.int32)
        if windows.ndim != 2 or not len(windows):
            raise ConfigError(f"calibration windows must be a non-empty [N, L] array, got shape {windows.shape}")
        batch_size = min(batch_size, len(windows))
        nb = -(-len(windows) // batch_size)
        extra = nb * batch_size - len(windows)
        padded = np.concatenate([windows, np.repeat(windows[:1], extra, 0)]) if extra else windows
        xs = jnp.take(f32(pure["embed"]["embedding"]), jnp.asarray(padded.reshape(nb, batch_size, -1)), axis=0)
        real = jnp.asarray(np.arange(len(padded)) < len(windows)).reshape(nb, batch_size)
        runner = _MoeBlockRunner(cfg)
        dense_forward = None
        if len(moe_layers) != cfg.num_layers:
            from llmopt_jax.compress.calibrate import _BlockRunner

            dense_forward = _BlockRunner(dataclasses.replace(cfg, num_experts=0), "float32").forward
    new_layers, quantized, tokens, fallbacks = [], [], [], 0
    e, d, fe = cfg.num_experts, cfg.d_model, cfg.expert_dim
    for i in tqdm(range(cfg.num_layers), desc="qmoe", disable=not progress, leave=False):
        block = jax.tree.map(f32, layer_params(pure["layers"], i, stacked))
        if i not in moe_layers:
            if calibrated:
                xs = dense_forward(block, xs)
            new_layers.append(layer_params(pure["layers"], i, stacked))
            quantized.append({})
            continue
        if calibrated:
            zeros = lambda n: (jnp.zeros((e, n, n), jnp.float32), jnp.zeros((e,), jnp.float32))  # noqa: E731
            stats = runner.statistics(block, xs, real, {"expert_in": zeros(d), "expert_mid": zeros(fe)}, cap)
            stats = {k: ExpertStats(*v) for k, v in stats.items()}
            tokens.append(np.asarray(stats["expert_in"].count))
        new_moe = dict(block["moe"])
        q_layer = {}
        for name in EXPERT_LINEARS:
            t0 = time.perf_counter()
            w = _kernel_to_matrices(block["moe"][name]["kernel"])
            if calibrated:
                s = stats["expert_mid" if name == "down_proj" else "expert_in"]
                q = gptq_experts(w, s.hessians, s.count, grid, blocksize=blocksize, damp_fraction=damp_fraction)
                fallbacks += int(np.sum(np.asarray(s.count) == 0))
            else:
                q = rtn_experts(w, grid)
            new_w = jax.block_until_ready(dequantize_experts(q))
            solve_seconds += time.perf_counter() - t0
            new_moe[name] = {"kernel": jnp.swapaxes(new_w, 1, 2)}
            q_layer[name] = {"kernel": jax.tree.map(np.asarray, q)}
        new_block = {**block, "moe": new_moe}
        if calibrated:  # the next block sees what the compressed block produces
            xs = runner.forward(new_block, xs)
        original = layer_params(pure["layers"], i, stacked)
        new_layers.append(jax.tree.map(lambda new, old: np.asarray(new, np.asarray(old).dtype), new_block, original))
        quantized.append({"moe": q_layer})
    out = {k: v for k, v in pure.items() if k != "layers"}
    out["layers"] = stack_layers(new_layers, stacked)
    report = {"quantized": quantized, "tokens_per_expert": tokens, "rtn_fallback_experts": fallbacks,
              "seconds": time.perf_counter() - t_start, "seconds_solve": solve_seconds, "method": method,
              "grid": grid.describe()}
    return out, report


@struct.dataclass
class ExpertStack:
    """A MoE layer's ``E`` expert kernels ``[E, in, out]`` held as one coded ternary matrix ``[E·out, in]``
    (``inner``: a ``compress/codec.py`` :class:`~llmopt_jax.compress.codec.TernaryANS` or ``TernaryCodec``; a
    leading layer axis when stacked): one table of streams per layer, so a stack pads the layer's code stream to
    the longest layer, not every expert's to the longest expert (7 % of the bytes on SmolLM2's RTN-ternary
    experts). The model decodes it in the matmul like any packed kernel."""

    inner: Any
    num_experts: int = struct.field(pytree_node=False)

    is_packed = True

    @property
    def dtype(self):
        return self.inner.dtype

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The float expert kernels ``[..., E, in, out]`` in ``dtype``."""
        w = self.inner.matrix(dtype)  # [..., E·out, in]
        w = w.reshape(w.shape[:-2] + (self.num_experts, w.shape[-2] // self.num_experts, w.shape[-1]))
        return jnp.swapaxes(w, -1, -2)


def _stack_records(records: list[QuantizedMatrix]) -> QuantizedMatrix:
    """Expert-batched records of several layers -> one record with a leading layer axis ``[L, E, ...]``."""
    stack = lambda *a: np.stack([np.asarray(x) for x in a])  # noqa: E731
    return QuantizedMatrix(stack(*[r.codes for r in records]), stack(*[r.scale for r in records]),
                           stack(*[r.offset for r in records]), records[0].grid)


def pack_experts(cfg: ModelConfig, pure: dict, report: dict, *, codec: str = "ans", block_rows: int = 0,
                 stream_symbols: int = MIN_STREAM_SYMBOLS, dictionary=None) -> dict:
    """``pure`` params (from :func:`quantize_experts`) with every expert kernel ``[E, in, out]`` replaced by the
    real bits of ``report["quantized"]``: a ternary grid coded by ``compress/codec.py`` (``codec``: ``"ans"`` or
    ``"dictionary"``, QMoE's; ``block_rows`` rows per stream, 0 = the fewest rows that hold ``stream_symbols``:
    longer streams spend fewer bits on per-stream state and decode in a longer sequential scan; the dictionary
    codec's kernels share
    ``dictionary``, default one fitted to all of them), any other grid as a :class:`PackedTensor` (codes packed
    at ``bits`` per weight, float16 scales and uint8 zero-points per row). Stacked layers get one leaf per kernel
    name with leading ``[L, E]`` axes. The model runs from these leaves (the expert matmuls decode, then
    multiply; ``compress/packed.py``'s ``packed_model``)."""
    from llmopt_jax.compress.codec import encode_matrix, records_dictionary
    from llmopt_jax.compress.packed import pack_matrix

    quantized = report["quantized"]
    moe_layers = [i for i, q in enumerate(quantized) if q]
    if not moe_layers:
        raise ConfigError("the report holds no quantized experts")
    grid = quantized[moe_layers[0]]["moe"][EXPERT_LINEARS[0]]["kernel"].grid
    if grid.ternary and codec == "dictionary" and dictionary is None:
        dictionary = records_dictionary(quantized)
    shape = {"gate_proj": (cfg.d_model, cfg.expert_dim), "up_proj": (cfg.d_model, cfg.expert_dim),
             "down_proj": (cfg.expert_dim, cfg.d_model)}

    def pack(record: QuantizedMatrix, name: str):
        if record.grid.ternary:  # the layer's experts as one matrix [E·out, in]: one stream table per layer
            *lead, e, rows, cols = record.codes.shape
            flat = QuantizedMatrix(*(np.asarray(x).reshape(*lead, e * rows, -1)
                                     for x in (record.codes, record.scale, record.offset)), record.grid)
            return ExpertStack(encode_matrix(flat, (cols, e * rows), 1, dictionary, codec=codec,
                                             block_rows=block_rows, stream_symbols=stream_symbols), e)
        if record.codes.ndim == 4:  # [L, E, ...]: PackedTensor packs one expert stack at a time
            per_layer = [pack_matrix(QuantizedMatrix(c, s, o, record.grid), shape[name])
                         for c, s, o in zip(record.codes, record.scale, record.offset)]
            return jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
        return pack_matrix(record, shape[name])

    layers = pure["layers"]
    if cfg.scan_layers:
        if len(moe_layers) != cfg.num_layers:
            raise ConfigError("stacked layers hold experts in every layer; this report quantized only "
                              f"{len(moe_layers)} of {cfg.num_layers}")
        moe = dict(layers["moe"])
        for name in EXPERT_LINEARS:
            record = _stack_records([q["moe"][name]["kernel"] for q in quantized])
            moe[name] = {"kernel": pack(record, name)}
        return {**pure, "layers": {**layers, "moe": moe}}
    new_layers = {}
    for i in range(cfg.num_layers):
        block = layer_params(layers, i, False)
        if quantized[i]:
            block = {**block, "moe": {**block["moe"], **{name: {"kernel": pack(quantized[i]["moe"][name]["kernel"], name)}
                                                          for name in EXPERT_LINEARS}}}
        new_layers[i] = block
    return {**pure, "layers": new_layers}


def expert_storage(packed: dict) -> dict[str, float]:
    """Bytes and bits per parameter of the expert kernels of ``packed`` params (:func:`pack_experts`), measured
    from the arrays held: ``expert_bytes`` (codes, offsets, levels/scales, zero-points, per-stream model bytes,
    and each distinct codec dictionary once), ``expert_params`` and ``bits_per_expert_param``; float kernels count
    their own bytes. ``expert_padding_bytes``: the part of a layer stack's code arrays that only pads shorter
    layers (``bits_per_expert_param_unpadded`` leaves it out: what unrolled layers would hold)."""
    from llmopt_jax.compress.codec import TernaryANS, TernaryCodec, bits_per_param
    from llmopt_jax.compress.packed import PackedTensor
    from llmopt_jax.infer.roofline import tree_bytes

    layers = packed["layers"]
    blocks = [layers] if layers_are_stacked(layers) else [layers[k] for k in sorted(layers, key=int)]
    kernels = [b["moe"][name]["kernel"] for b in blocks if "moe" in b for name in EXPERT_LINEARS]
    if not kernels:
        raise ConfigError("these params hold no expert kernels")
    kernels = [k.inner if isinstance(k, ExpertStack) else k for k in kernels]
    coded = [k for k in kernels if isinstance(k, (TernaryANS, TernaryCodec))]
    nbytes, params, padding = 0, 0, 0
    if coded:
        stats = bits_per_param(coded)
        nbytes, params = stats["bytes_total"], stats["num_params"]
        # A stack of layers pads each layer's code stream to the longest layer's; unrolled layers would not.
        padding = sum(int(np.prod(k.codes.shape)) - int(np.sum(np.asarray(k.offsets)[..., -1])) for k in coded) * 2
    for k in kernels:
        if isinstance(k, (TernaryANS, TernaryCodec)):
            continue
        if isinstance(k, PackedTensor):
            nbytes += tree_bytes(k)
            params += int(np.prod(k.data.shape[:-2], dtype=np.int64)) * math.prod(k.shape)
        else:
            nbytes += tree_bytes(k)
            params += int(np.prod(np.shape(k), dtype=np.int64))
    return {"expert_bytes": int(nbytes), "expert_params": int(params),
            "bits_per_expert_param": 8.0 * nbytes / params, "expert_padding_bytes": int(padding),
            "bits_per_expert_param_unpadded": 8.0 * (nbytes - padding) / params}
