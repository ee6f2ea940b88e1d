"""QMoE at the scale it was made for, on paper: SwitchTransformer models from abstract shapes.

The SwitchTransformer checkpoints (Fedus et al., 2021) are T5 encoder-decoders whose feed-forward layers are
routed ReLU MLPs (``wi [d, d_ff]``, ``wo [d_ff, d]`` per expert) in every ``sparse_step``-th layer. Nothing here
downloads or allocates them: :func:`abstract_switch_params` builds the parameter tree with ``jax.eval_shape``
(shapes and dtypes only), and :func:`scale_table` turns it into bytes in bfloat16 and with the bits per expert
parameter our codec measured on a real model, bytes per device on the machines QMoE names, and a compression-time
estimate from a measured per-expert GPTQ solve (:func:`time_expert_solve`).

The dimensions are the public Hugging Face configs (``google/switch-base-128``, ``switch-large-128``,
``switch-c-2048``); the totals they give are checked against the published parameter counts in the table
(``published_params``). Left out as negligible: T5's relative position biases and layer-norm biases (none).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# (devices, bytes of memory each) of the machines the QMoE paper runs on, and one H200
MACHINES = {"4x A6000 (48 GB)": (4, 48e9), "8x RTX 3090 (24 GB)": (8, 24e9), "1x H200 (141 GB)": (1, 141e9)}


@dataclasses.dataclass(frozen=True)
class SwitchSpec:
    """A SwitchTransformer's shape: every ``sparse_step``-th layer of encoder and decoder is a MoE layer."""

    d_model: int
    d_ff: int
    num_heads: int
    d_kv: int
    encoder_layers: int
    decoder_layers: int
    sparse_step: int
    num_experts: int
    vocab_size: int = 32128
    published_params: float = 0.0  # the total the paper / model card gives, as a check of the shapes


SWITCH_SPECS = {
    "switch-base-128": SwitchSpec(768, 3072, 12, 64, 12, 12, 2, 128, published_params=7.4e9),
    "switch-large-128": SwitchSpec(1024, 4096, 16, 64, 24, 24, 2, 128, published_params=26.3e9),
    "switch-c-2048": SwitchSpec(2080, 6144, 30, 64, 15, 15, 1, 2048, published_params=1.6e12),
}


def abstract_switch_params(spec: SwitchSpec, dtype=jnp.bfloat16) -> dict:
    """The parameter tree of ``spec`` as ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape``: nothing is
    allocated). Experts are stacked ``[E, ...]`` under ``layers/*/moe``; dense layers have ``mlp``."""
    d, inner = spec.d_model, spec.num_heads * spec.d_kv

    def attention():
        return {"q": jnp.zeros((d, inner), dtype), "k": jnp.zeros((d, inner), dtype),
                "v": jnp.zeros((d, inner), dtype), "o": jnp.zeros((inner, d), dtype)}

    def feed_forward(i: int):
        if (i + 1) % spec.sparse_step == 0:  # T5X/HF place the MoE in the last layer of each sparse_step group
            e = spec.num_experts
            return {"moe": {"router": jnp.zeros((d, e), dtype), "wi": jnp.zeros((e, d, spec.d_ff), dtype),
                            "wo": jnp.zeros((e, spec.d_ff, d), dtype)}}
        return {"mlp": {"wi": jnp.zeros((d, spec.d_ff), dtype), "wo": jnp.zeros((spec.d_ff, d), dtype)}}

    def build():
        norm = lambda: jnp.zeros((d,), dtype)  # noqa: E731
        encoder = [{"self_attention": attention(), "norm1": norm(), "norm2": norm(), **feed_forward(i)}
                   for i in range(spec.encoder_layers)]
        decoder = [{"self_attention": attention(), "cross_attention": attention(), "norm1": norm(),
                    "norm2": norm(), "norm3": norm(), **feed_forward(i)} for i in range(spec.decoder_layers)]
        return {"embedding": jnp.zeros((spec.vocab_size, d), dtype), "lm_head": jnp.zeros((d, spec.vocab_size), dtype),
                "encoder": encoder, "decoder": decoder, "final_norms": [norm(), norm()]}

    return jax.eval_shape(build)


def count_params(tree: Any) -> dict[str, int]:
    """``total``, ``expert`` (the ``wi``/``wo`` leaves under ``moe``) and ``other`` parameter counts of an abstract
    tree."""
    total = expert = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        n = int(np.prod(leaf.shape, dtype=np.int64))
        total += n
        keys = [getattr(p, "key", None) for p in path]
        if "moe" in keys and keys[-1] in ("wi", "wo"):
            expert += n
    return {"total": total, "expert": expert, "other": total - expert}


def time_expert_solve(spec: SwitchSpec, *, experts: int = 1, repeats: int = 2, bits: int = 2,
                      ternary: bool = True, seed: int = 0) -> float:
    """Median seconds of one expert's GPTQ solves (``wi`` and ``wo``) at ``spec``'s shapes on this machine's
    default backend: ``gptq_experts`` over ``experts`` random experts (each with a random positive-definite
    Hessian), divided by ``experts``; the compile is not counted."""
    from llmopt_jax.compress.qmoe import gptq_experts
    from llmopt_jax.compress.quantize import QuantGrid

    grid = QuantGrid(bits, ternary=ternary)
    rng = np.random.default_rng(seed)
    total = 0.0
    for rows, cols in ((spec.d_ff, spec.d_model), (spec.d_model, spec.d_ff)):  # wi and wo as [outputs, inputs]
        w = jnp.asarray(rng.standard_normal((experts, rows, cols), np.float32))
        x = jnp.asarray(rng.standard_normal((experts, 2 * cols, cols), np.float32))
        h = 2.0 * jnp.einsum("eni,enj->eij", x, x) / (2 * cols)
        counts = jnp.full((experts,), 2.0 * cols)
        run = lambda: jax.block_until_ready(gptq_experts(w, h, counts, grid).codes)  # noqa: E731
        run()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        total += statistics.median(times) / experts
    return total


def scale_table(bits_per_expert_param: float, *, seconds_per_expert: dict[str, float] | None = None,
                specs: dict[str, SwitchSpec] | None = None) -> list[dict]:
    """One row per model: parameter counts from the abstract shapes, bytes in bfloat16 and compressed (experts
    at ``bits_per_expert_param``, everything else kept in bfloat16 as in QMoE), the ratio, GB per device on
    :data:`MACHINES` (an even split) and whether it fits, and, when ``seconds_per_expert[name]`` is given, the
    hours the expert solves take (experts x seconds per expert; calibration forwards not included)."""
    rows = []
    for name, spec in (specs or SWITCH_SPECS).items():
        counts = count_params(abstract_switch_params(spec))
        bf16 = 2 * counts["total"]
        compressed = counts["expert"] * bits_per_expert_param / 8 + 2 * counts["other"]
        num_experts = spec.num_experts * sum(
            (i + 1) % spec.sparse_step == 0 for n in (spec.encoder_layers, spec.decoder_layers) for i in range(n))
        row = {"model": name, "params": counts["total"], "expert_params": counts["expert"],
               "published_params": spec.published_params, "num_experts_total": num_experts,
               "bytes_bf16": bf16, "bytes_compressed": compressed, "compression_ratio": bf16 / compressed,
               "bits_per_expert_param": bits_per_expert_param, "per_device": {}}
        for machine, (n, capacity) in MACHINES.items():
            row["per_device"][machine] = {"gb_bf16": bf16 / n / 1e9, "fits_bf16": bf16 / n < capacity,
                                          "gb_compressed": compressed / n / 1e9, "fits_compressed": compressed / n < capacity}
        if seconds_per_expert and name in seconds_per_expert:
            row["seconds_per_expert_solve"] = seconds_per_expert[name]
            row["hours_solve_estimate"] = seconds_per_expert[name] * num_experts / 3600
        rows.append(row)
    return rows


def scale_markdown(rows: list[dict], device: str = "") -> str:
    """The table of :func:`scale_table` as Markdown."""
    machines = list(MACHINES)
    head = ["model", "params (published)", "bf16 GB", "compressed GB", "ratio"]
    head += [f"{m}: GB/device bf16 -> compressed" for m in machines]
    head += [f"expert solves, hours ({device})" if device else "expert solves, hours"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['params'] / 1e9:.1f} B ({r['published_params'] / 1e9:.1f} B)",
                 f"{r['bytes_bf16'] / 1e9:.1f}", f"{r['bytes_compressed'] / 1e9:.1f}", f"{r['compression_ratio']:.1f}x"]
        for m in machines:
            d = r["per_device"][m]
            mark = lambda ok: "" if ok else " (no)"  # noqa: E731
            cells.append(f"{d['gb_bf16']:.1f}{mark(d['fits_bf16'])} -> {d['gb_compressed']:.1f}{mark(d['fits_compressed'])}")
        cells.append(f"{r['hours_solve_estimate']:.1f}" if "hours_solve_estimate" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
