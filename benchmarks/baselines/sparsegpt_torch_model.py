"""A PyTorch (CPU, float32) port of SparseGPT's end-to-end sequential procedure on our LLaMA-family decoder.

The baseline that our JAX engine (``llmopt_jax.compress.calibrate.compress_sequentially``) is timed against. It
follows the procedure of the SparseGPT authors' reference code (its ``llama_sequential``), written afresh here:

0. the calibration windows (token ids ``[N, L]``, no BOS handling) are embedded once: these are the first
   block's inputs (upstream catches them with a ``Catcher`` module in front of layer 0);
1. per block: forward it on all calibration inputs, capturing the input of every linear layer and accumulating
   its Hessian ``H = 2 XᵀX / n`` (upstream's forward hooks + ``add_batch``);
2. prune the block's 7 matrices (q, k, v, o, gate, up, down), each with its input's Hessian, with
   ``benchmarks/baselines/sparsegpt_torch.py``'s solver (upstream's ``fasterprune``);
3. forward the *pruned* block on the calibration inputs: its outputs are the next block's inputs
   (upstream's second pass over ``inps``, then ``inps, outs = outs, inps``).

Differences from upstream, all made so both engines do the same work:

- one Hessian per distinct input: q/k/v read the same activation, as do gate/up, so 4 Hessians per block instead
  of upstream's 7 (one per hooked linear), as our engine does;
- ``H`` is summed over the batches and divided by the token count at the end, instead of upstream's running
  mean over sequences (``add_batch``); the scale of ``H`` does not change SparseGPT's result;
- windows are forwarded ``batch_size`` at a time instead of one;
- each matrix's relative reconstruction error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` is computed after its solve
  (upstream prints the solver's summed losses), as our engine reports it.

The block (pre-norm RMSNorm, RoPE in either layout, grouped-query causal attention via
``scaled_dot_product_attention``, SwiGLU MLP, no biases) is written in plain torch from
``llmopt_jax/models/{decoder,layers,attention,rope}.py``. Parameters are our pure dicts of numpy arrays: kernels
``[*in_shape, *out_shape]``, layers stacked (a leading layer axis) or keyed by layer index.

Only ``torch`` and ``numpy`` are needed; nothing here imports JAX.
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.baselines.sparsegpt_torch import sparsegpt_torch

# The linear layers grouped by the activation they read (one Hessian per group), in our engine's order.
INPUT_GROUPS = {"attn_in": ("q_proj", "k_proj", "v_proj"), "attn_out": ("o_proj",), "mlp_in": ("gate_proj", "up_proj"),
                "mlp_out": ("down_proj",)}
LINEAR_NAMES = tuple(name for names in INPUT_GROUPS.values() for name in names)
KERNEL_INPUT_DIMS = {"o_proj": 2}  # o_proj's kernel is [heads, head_dim, d_model]; the others have one input dim


class BlockSpec(NamedTuple):
    """The hyperparameters the block forward needs (the rest follows from the weights' shapes)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_base: float
    rope_interleaved: bool
    rms_eps: float

    @classmethod
    def from_config(cls, cfg: Any) -> "BlockSpec":
        """From a ``ModelConfig`` or anything with its field names as attributes or mapping keys."""
        get = cfg.get if isinstance(cfg, Mapping) else lambda k, d=None: getattr(cfg, k, d)
        heads = int(get("num_heads"))
        head_dim = int(get("head_dim", 0) or int(get("d_model")) // heads)  # 0 means d_model // heads, as ours
        return cls(heads, int(get("num_kv_heads")), head_dim, float(get("rope_base", 10000.0)),
                   bool(get("rope_interleaved", False)), float(get("rms_eps", 1e-5)))


def kernel_to_matrix(name: str, kernel: np.ndarray) -> torch.Tensor:
    """Our kernel ``[*in_shape, *out_shape]`` -> ``W`` float32 ``[outputs, inputs]`` (``F.linear``'s layout)."""
    n_in = KERNEL_INPUT_DIMS.get(name, 1)
    k = np.asarray(kernel, np.float32)
    return torch.from_numpy(k.reshape(math.prod(k.shape[:n_in]), -1).T.copy())


def matrix_to_kernel(matrix: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`kernel_to_matrix`: float32 numpy in the kernel's ``shape``."""
    return np.ascontiguousarray(matrix.numpy().T).reshape(shape)


def block_weights(layer: Mapping) -> dict[str, torch.Tensor]:
    """One block's pure params -> the 7 matrices ``[outputs, inputs]`` and the two norm scales ``[D]``, float32."""
    weights = {name: kernel_to_matrix(name, layer[name]["kernel"]) for name in LINEAR_NAMES}
    for norm in ("attn_norm", "mlp_norm"):
        weights[norm] = torch.from_numpy(np.array(layer[norm]["scale"], np.float32))
    return weights


def rope_tables(length: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` float32 ``[length, head_dim/2]`` for positions ``0..length-1``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq
    return torch.cos(angles), torch.sin(angles)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotates ``x`` ``[B, H, L, hd]``; interleaved pairs ``(2i, 2i+1)``, otherwise ``(i, i + hd/2)`` (HF)."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * scale


def _accumulate(xtx: torch.Tensor, x: torch.Tensor) -> None:
    flat = x.reshape(-1, x.shape[-1])
    xtx.addmm_(flat.T, flat)


def forward_block(w: Mapping[str, torch.Tensor], x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                  spec: BlockSpec, xtx: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """One pre-norm block on ``x`` float32 ``[B, L, D]`` at positions ``0..L-1`` -> ``[B, L, D]``.

    With ``xtx`` (``{group: [d, d]}``), adds each linear input group's ``XᵀX`` to it in place: the explicit
    equivalent of upstream's forward hooks, once per distinct input.
    """
    b, l, _ = x.shape
    heads, kv_heads, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    cos, sin = rope[0][:l], rope[1][:l]
    h = _rms_norm(x, w["attn_norm"], spec.rms_eps)
    if xtx is not None:
        _accumulate(xtx["attn_in"], h)
    q = F.linear(h, w["q_proj"]).view(b, l, heads, hd).transpose(1, 2)
    k = F.linear(h, w["k_proj"]).view(b, l, kv_heads, hd).transpose(1, 2)
    v = F.linear(h, w["v_proj"]).view(b, l, kv_heads, hd).transpose(1, 2)
    q, k = _rope(q, cos, sin, spec.rope_interleaved), _rope(k, cos, sin, spec.rope_interleaved)
    # Query head j reads kv head j // (heads / kv_heads): SDPA's GQA grouping, and ours.
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads)
    attn = attn.transpose(1, 2).reshape(b, l, heads * hd)
    if xtx is not None:
        _accumulate(xtx["attn_out"], attn)
    x = x + F.linear(attn, w["o_proj"])
    h = _rms_norm(x, w["mlp_norm"], spec.rms_eps)
    if xtx is not None:
        _accumulate(xtx["mlp_in"], h)
    gated = F.silu(F.linear(h, w["gate_proj"])) * F.linear(h, w["up_proj"])
    if xtx is not None:
        _accumulate(xtx["mlp_out"], gated)
    return x + F.linear(gated, w["down_proj"])


def _layers(params: Mapping) -> tuple[list[Mapping], bool]:
    """The per-block param dicts and whether they were stacked (a leading layer axis on every leaf)."""
    layers = params["layers"]
    if isinstance(layers, Mapping) and "q_proj" in layers:
        arrays = {mod: {p: np.asarray(a) for p, a in leaves.items()} for mod, leaves in layers.items()}
        count = arrays["q_proj"]["kernel"].shape[0]
        return [{mod: {p: a[i] for p, a in leaves.items()} for mod, leaves in arrays.items()}
                for i in range(count)], True
    if isinstance(layers, Mapping):
        return [layers[i] for i in sorted(layers, key=int)], False  # "10" after "2" when the keys are strings
    return list(layers), False


def relative_error(w: torch.Tensor, new_w: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` = ``‖(W − Ŵ)X‖² / ‖WX‖²``, as our engine reports it."""
    delta = w - new_w
    return float(torch.sum((delta @ hessian) * delta) / torch.sum((w @ hessian) * w).clamp_min(1e-30))


def _stack(trees: list[Mapping]) -> dict:
    """Per-block nested dicts -> one nested dict with a leading layer axis on every leaf."""
    return {k: _stack([t[k] for t in trees]) if isinstance(trees[0][k], Mapping) else np.stack([t[k] for t in trees])
            for k in trees[0]}


def _as_float32(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _as_float32(v) for k, v in tree.items()}
    return np.array(tree, np.float32)


def prune_model_torch(
    cfg: Any,
    params: Mapping,
    windows: np.ndarray,
    *,
    sparsity: float = 0.5,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    batch_size: int = 8,
    threads: int | None = None,
) -> tuple[dict, dict]:
    """SparseGPT on every linear matrix of every block of the decoder, block by block (upstream's procedure).

    ``cfg``: a ``ModelConfig`` or a mapping with its fields (``num_heads``, ``num_kv_heads``, ``head_dim`` or
    ``d_model``, ``rope_base``, ``rope_interleaved``, ``rms_eps``); ``params``: the decoder's pure dict of numpy
    arrays (layers stacked or keyed by index); ``windows`` int ``[N, L]`` calibration tokens. ``n = m = 0``:
    unstructured at ``sparsity``, else N:M. ``threads`` sets ``torch.set_num_threads`` for the call.

    Returns ``(new params, report)``: the same nested structure as ``params``, float32 numpy; ``report`` has
    ``seconds`` (total, embedding to output), ``seconds_stats`` (step 1: forward + Hessians), ``seconds_solve``
    (step 2), ``seconds_forward`` (step 3: forward of the pruned blocks), ``layers`` (per matrix: ``block``,
    ``name``, ``shape`` ``[outputs, inputs]``, ``sparsity``, ``relative_error``, ``seconds``) and ``masks``
    (boolean keep-masks in kernel shape, nested like the params).
    """
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.size == 0:
        raise ValueError(f"calibration windows must be a non-empty [N, L] array, got shape {windows.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    spec = BlockSpec.from_config(cfg)
    blocks, stacked = _layers(params)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return _prune(spec, params, blocks, stacked, windows, sparsity, n, m, blocksize, percdamp, batch_size)
    finally:
        torch.set_num_threads(previous_threads)


def _prune(spec, params, blocks, stacked, windows, sparsity, n, m, blocksize, percdamp, batch_size):
    t_start = time.perf_counter()
    table = torch.from_numpy(np.array(params["embed"]["embedding"], np.float32))
    tokens = torch.from_numpy(windows.astype(np.int64))
    inps = [F.embedding(tokens[s : s + batch_size], table) for s in range(0, len(tokens), batch_size)]
    rope = rope_tables(windows.shape[1], spec.head_dim, spec.rope_base)
    n_tokens = windows.size
    t_stats = t_solve = t_forward = 0.0
    new_blocks, masks, reports = [], [], []
    for i, layer in enumerate(blocks):
        w = block_weights(layer)
        dims = {g: w[names[0]].shape[1] for g, names in INPUT_GROUPS.items()}

        t0 = time.perf_counter()  # step 1: forward with capture, Hessians
        xtx = {g: torch.zeros(d, d, dtype=torch.float32) for g, d in dims.items()}
        for x in inps:
            forward_block(w, x, rope, spec, xtx)
        hessians = {g: s.mul_(2.0 / n_tokens) for g, s in xtx.items()}
        t_stats += time.perf_counter() - t0

        new_layer = {k: dict(v) for k, v in layer.items()}  # norms carried over as they are
        block_masks = {}
        for group, names in INPUT_GROUPS.items():  # step 2: prune each matrix with its input's Hessian
            hess = hessians[group]
            for name in names:
                t0 = time.perf_counter()
                new_w, keep = sparsegpt_torch(w[name], hess, sparsity, n, m, blocksize, percdamp)
                seconds = time.perf_counter() - t0
                t_solve += seconds
                error = relative_error(w[name], new_w, hess)
                shape = np.shape(layer[name]["kernel"])
                new_layer[name] = {"kernel": matrix_to_kernel(new_w, shape)}
                block_masks[name] = {"kernel": matrix_to_kernel(keep, shape)}
                reports.append({"block": i, "name": name, "shape": tuple(new_w.shape),
                                "sparsity": float((new_w == 0).float().mean()), "relative_error": error,
                                "seconds": seconds})
                w[name] = new_w

        t0 = time.perf_counter()  # step 3: the next block's inputs come from the pruned block
        inps = [forward_block(w, x, rope, spec) for x in inps]
        t_forward += time.perf_counter() - t0
        new_blocks.append(_as_float32(new_layer))
        masks.append(block_masks)

    out = {k: _as_float32(v) for k, v in params.items() if k != "layers"}
    if stacked:
        out["layers"], mask_tree = _stack(new_blocks), _stack(masks)
    else:
        out["layers"], mask_tree = dict(enumerate(new_blocks)), dict(enumerate(masks))
    report = {"seconds": time.perf_counter() - t_start, "seconds_stats": t_stats, "seconds_solve": t_solve,
              "seconds_forward": t_forward, "layers": reports, "masks": {"layers": mask_tree}}
    return out, report
