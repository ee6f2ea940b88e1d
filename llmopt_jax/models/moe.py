"""Routed mixture-of-experts MLP: a router ``d -> E``, top-k gating, and two ways of dispatching tokens.

The layer replaces a block's dense SwiGLU MLP (``models/decoder.py`` swaps it in the layers the config names).
Each expert is a SwiGLU MLP of hidden size ``cfg.moe_expert_dim``; its weights are stacked along a leading
``expert`` axis (logical name ``expert``, mapped to the mesh axis ``expert`` by ``parallel/rules.py``).

Gating (``cfg.moe_gating``):

* ``softmax_topk`` (Mixtral): the top-k router logits, softmax over those k (the full softmax renormalised);
* ``switch`` (Switch Transformer, top-1): the chosen expert's full-softmax probability;
* ``unit``: every chosen expert's output counts with weight 1 (MoEfication: experts are slices of one dense
  MLP, so top-k = E reproduces it exactly).

Dispatch (``cfg.moe_dispatch``):

* ``capacity`` (Switch/GShard): each batch row is a group; expert ``e`` takes at most
  ``C = ceil(capacity_factor * L * k / E)`` of its tokens, first choices before second choices, the rest are
  dropped (they pass through the residual only). Dispatch and combine are one-hot einsums, so under an
  expert-sharded mesh the sharding constraints on the ``[E, G, C, D]`` expert inputs make XLA exchange tokens
  between devices (all-to-all) -- no hand-written collective.
* ``dropless`` (MegaBlocks): token copies sorted by expert and multiplied with ``jax.lax.ragged_dot`` (one
  grouped matmul over variable-size groups); nothing is dropped. Both agree exactly when nothing is dropped.

Auxiliary outputs per layer (``MoeAux``): the router z-loss (ST-MoE, ``mean(logsumexp(logits)^2)``), the Switch
load-balancing loss ``E * sum_e f_e * P_e`` (``f_e`` the fraction of routing assignments going to ``e``, ``P_e``
its mean router probability; 1.0 when perfectly balanced), the per-expert assignment counts and the fraction
of assignments dropped by the capacity limit.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from llmopt_jax.models.config import ModelConfig
from llmopt_jax.models.layers import ActivationConstraint, DotGeneral, logical_param, no_constraint


class MoeAux(NamedTuple):
    """One MoE layer's auxiliary outputs (float32): ``z_loss`` ``[]``, ``load_balance_loss`` ``[]``,
    ``expert_counts`` ``[E]`` (routing assignments per expert, dropped ones included) and ``dropped_fraction``
    ``[]`` (assignments over capacity, 0 for dropless)."""

    z_loss: jax.Array
    load_balance_loss: jax.Array
    expert_counts: jax.Array
    dropped_fraction: jax.Array


def capacity(cfg: ModelConfig, group_size: int) -> int:
    """Slots per expert and group for the capacity dispatch: ``ceil(cf * S * k / E)``, between 1 and ``S``."""
    c = math.ceil(cfg.moe_capacity_factor * group_size * cfg.moe_top_k / cfg.num_experts)
    return max(1, min(c, group_size))


def route(cfg: ModelConfig, logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Router logits float32 ``[..., E]`` -> ``(expert ids int32 [..., k], gate weights float32 [..., k],
    full softmax probabilities [..., E])``; ids are in descending logit order."""
    probs = jax.nn.softmax(logits, axis=-1)
    top_logits, ids = jax.lax.top_k(logits, cfg.moe_top_k)
    if cfg.moe_gating == "softmax_topk":
        weights = jax.nn.softmax(top_logits, axis=-1)
    elif cfg.moe_gating == "switch":
        weights = jnp.take_along_axis(probs, ids, axis=-1)
    else:  # unit
        weights = jnp.ones_like(top_logits)
    return ids.astype(jnp.int32), weights, probs


def aux_losses(cfg: ModelConfig, logits: jax.Array, ids: jax.Array, probs: jax.Array) -> tuple[jax.Array, ...]:
    """``(z_loss, load_balance_loss, expert_counts [E])`` over all tokens of ``logits`` ``[T, E]``."""
    e = cfg.num_experts
    z_loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
    counts = jnp.sum(jax.nn.one_hot(ids, e, dtype=jnp.float32), axis=tuple(range(ids.ndim)))
    fraction = counts / jnp.maximum(jnp.sum(counts), 1.0)
    mean_prob = jnp.mean(probs.reshape(-1, e), axis=0)
    return z_loss, e * jnp.sum(fraction * mean_prob), counts


class ExpertLinear(nnx.Module):
    """``E`` linear maps stacked: ``kernel`` ``[E, in, out]`` with logical axes ``(expert, in_axis, out_axis)``.

    The batched form multiplies ``[E, ..., in]`` expert inputs with the injectable ``dot_general`` (a batch
    dimension over experts); the grouped form uses ``jax.lax.ragged_dot`` on rows sorted by expert.
    """

    def __init__(self, num_experts: int, d_in: int, d_out: int, in_axis: str, out_axis: str, *, dtype,
                 param_dtype, init_std: float, rngs: nnx.Rngs, dot_general: DotGeneral = jax.lax.dot_general):
        self.dtype = dtype
        self.dot_general = dot_general
        init = jax.nn.initializers.normal(stddev=init_std)
        self.kernel = logical_param(rngs.params(), (num_experts, d_in, d_out), ("expert", in_axis, out_axis),
                                    param_dtype, init)

    def _weights(self) -> jax.Array:
        kernel = self.kernel.get_value()
        return kernel if getattr(kernel, "is_packed", False) else kernel.astype(self.dtype)

    def batched(self, x: jax.Array) -> jax.Array:
        """``x`` ``[E, G, C, in]`` -> ``[E, G, C, out]`` (float32 accumulation, compute dtype result)."""
        dims = (((3,), (1,)), ((0,), (0,)))
        y = self.dot_general(x.astype(self.dtype), self._weights(), dims, preferred_element_type=jnp.float32)
        return y.astype(self.dtype)

    def grouped(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """``x`` ``[N, in]`` sorted by expert with ``group_sizes`` int32 ``[E]`` rows each -> ``[N, out]``."""
        kernel = self._weights()
        if getattr(kernel, "is_packed", False):
            kernel = kernel.dequantize(self.dtype)
        y = jax.lax.ragged_dot(x.astype(self.dtype), kernel, group_sizes, preferred_element_type=jnp.float32)
        return y.astype(self.dtype)


class MoeMLP(nnx.Module):
    """Router + ``E`` SwiGLU experts: ``h`` ``[B, L, D]`` -> ``(y [B, L, D], MoeAux)``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dot_general: DotGeneral = jax.lax.dot_general,
                 constrain: ActivationConstraint = no_constraint):
        self.cfg = cfg
        self.constrain = constrain
        d, e, f = cfg.d_model, cfg.num_experts, cfg.expert_dim
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        init = jax.nn.initializers.normal(stddev=cfg.init_std)
        # The router stays float32 and outside the injected matmul (Switch's selective precision; QMoE keeps
        # routers uncompressed): small, and its argmax decides which weights run at all.
        self.router = logical_param(rngs.params(), (d, e), ("embed", None), cfg.weight_dtype, init)
        common = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs, dot_general=dot_general)
        self.gate_proj = ExpertLinear(e, d, f, "embed", "mlp", init_std=cfg.init_std, **common)
        self.up_proj = ExpertLinear(e, d, f, "embed", "mlp", init_std=cfg.init_std, **common)
        self.down_proj = ExpertLinear(e, f, d, "mlp", "embed", init_std=out_std, **common)

    def router_logits(self, h: jax.Array) -> jax.Array:
        """``h`` ``[..., D]`` -> float32 router logits ``[..., E]``."""
        return jnp.einsum("...d,de->...e", h.astype(jnp.float32), self.router.get_value().astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)

    def __call__(self, h: jax.Array) -> tuple[jax.Array, MoeAux]:
        cfg = self.cfg
        logits = self.router_logits(h)  # [B, L, E]
        ids, weights, probs = route(cfg, logits)
        z_loss, lb_loss, counts = aux_losses(cfg, logits, ids, probs)
        if cfg.moe_dispatch == "capacity":
            y, dropped = self._capacity(h, ids, weights)
        else:
            y, dropped = self._dropless(h, ids, weights), jnp.zeros((), jnp.float32)
        return y, MoeAux(z_loss, lb_loss, counts, dropped)

    def _experts_batched(self, x: jax.Array) -> jax.Array:
        gated = jax.nn.silu(self.gate_proj.batched(x)) * self.up_proj.batched(x)
        gated = self.constrain(gated, ("act_expert", "act_batch", None, "act_mlp"))
        return self.down_proj.batched(gated)

    def _capacity(self, h: jax.Array, ids: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Switch/GShard dispatch: groups = batch rows, ``C`` slots per expert, overflow dropped."""
        cfg = self.cfg
        g, s, _ = h.shape
        e, k = cfg.num_experts, cfg.moe_top_k
        c = capacity(cfg, s)
        # Slot of each assignment in its expert's queue: all first choices of the group, then all second
        # choices, ... (GShard's priority), by a cumulative count over [k * S] assignments per group.
        onehot = jax.nn.one_hot(jnp.swapaxes(ids, 1, 2), e, dtype=jnp.int32)  # [G, k, S, E]
        flat = onehot.reshape(g, k * s, e)
        slot = (jnp.cumsum(flat, axis=1) - 1) * flat  # [G, k*S, E], slot where assigned
        slot = jnp.sum(slot, axis=-1).reshape(g, k, s)  # [G, k, S]
        kept = slot < c
        dropped = jnp.mean((~kept).astype(jnp.float32))
        # dispatch[g, s, e, c] = 1 if token s of group g occupies slot c of expert e.
        slot_1h = jax.nn.one_hot(jnp.where(kept, slot, c), c, dtype=jnp.float32)  # [G, k, S, C]; dropped -> 0
        dispatch = jnp.einsum("gkse,gksc->gsec", onehot.astype(jnp.float32), slot_1h)
        combine = jnp.einsum("gkse,gksc,gsk->gsec", onehot.astype(jnp.float32), slot_1h, weights)
        x = jnp.einsum("gsec,gsd->egcd", dispatch.astype(h.dtype), h)  # exact: one 1 per (e, c)
        x = self.constrain(x, ("act_expert", "act_batch", None, "act_embed"))
        y = self._experts_batched(x)
        y = self.constrain(y, ("act_expert", "act_batch", None, "act_embed"))
        out = jnp.einsum("gsec,egcd->gsd", combine, y.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        return out.astype(h.dtype), dropped

    def _dropless(self, h: jax.Array, ids: jax.Array, weights: jax.Array) -> jax.Array:
        """MegaBlocks-style dispatch: every (token, choice) row sorted by expert, one ``ragged_dot`` per matmul."""
        cfg = self.cfg
        b, l, d = h.shape
        k = cfg.moe_top_k
        x = h.reshape(b * l, d)
        flat_ids = ids.reshape(-1)  # [T*k], row t*k + j = token t's j-th choice
        order = jnp.argsort(flat_ids, stable=True)
        group_sizes = jnp.bincount(flat_ids, length=cfg.num_experts).astype(jnp.int32)
        xs = jnp.take(x, order // k, axis=0)  # [T*k, D] sorted by expert
        gated = jax.nn.silu(self.gate_proj.grouped(xs, group_sizes)) * self.up_proj.grouped(xs, group_sizes)
        ys = self.down_proj.grouped(gated, group_sizes)  # [T*k, D]
        unsorted = jnp.zeros_like(ys).at[order].set(ys).reshape(b * l, k, d)
        out = jnp.einsum("tkd,tk->td", unsorted.astype(jnp.float32), weights.reshape(b * l, k),
                         precision=jax.lax.Precision.HIGHEST)
        return out.reshape(b, l, d).astype(h.dtype)


def moe_layer_indices(cfg: ModelConfig) -> tuple[int, ...]:
    """Indices of the layers whose MLP is routed (empty for a dense model)."""
    return cfg.moe_layer_indices()


def combine_aux(auxes: list[MoeAux] | MoeAux) -> dict[str, jax.Array]:
    """Per-layer aux (a list, or one ``MoeAux`` with a leading layer axis) -> model-level metrics: the losses
    averaged over MoE layers, ``expert_counts`` ``[num_moe_layers, E]``, ``dropped_fraction`` averaged."""
    if isinstance(auxes, list):
        auxes = MoeAux(*[jnp.stack(v) for v in zip(*auxes)])
    return {
        "router_z_loss": jnp.mean(auxes.z_loss),
        "load_balance_loss": jnp.mean(auxes.load_balance_loss),
        "expert_counts": auxes.expert_counts,
        "dropped_fraction": jnp.mean(auxes.dropped_fraction),
    }
