"""The training state and a jitted, sharded train step with in-step gradient accumulation.

A token batch is an int ``[..., L+1]`` array of windows, or a dict ``{"tokens", "segment_ids"}`` of packed
documents (``data/packing.py``): then positions restart per document, attention and the loss stay inside each
document. Fine-tuning (``peft/lora.py``) trains only the ``params`` of the state while a frozen base rides along as
a separate argument: ``combine(frozen, params, rng_step)`` builds the model's parameters from both.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmopt_jax.models.config import ModelConfig
from llmopt_jax.parallel.rules import DEFAULT_RULES, Rules, logical_to_spec, tree_shardings
from llmopt_jax.parallel.sharded_init import init_model, load_params

TrainState = dict  # {"step": int32 [], "params": nnx.State, "opt_state": optax state}


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token negative log-likelihood: ``logits`` float ``[B, L, V]``, ``targets`` int ``[B, L]``."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(nll)


def token_nll(params: nnx.State, graphdef: nnx.GraphDef, batch) -> tuple[jax.Array, jax.Array]:
    """``(nll, weights)`` float32 ``[B, L]`` of a batch's windows ``[B, L+1]`` (array or packed dict): the NLL of
    each target ``1..L`` and whether it counts (always, unless packed: then only inside its own document)."""
    from llmopt_jax.data.packing import segment_positions, target_weights

    model = nnx.merge(graphdef, params)
    if isinstance(batch, dict):
        tokens, segments = batch["tokens"], batch["segment_ids"]
        inputs = segments[:, :-1]
        logits, _ = model(tokens[:, :-1], positions=segment_positions(inputs), segment_ids=inputs)
        weights = target_weights(segments)
    else:
        tokens = batch
        logits, _ = model(tokens[:, :-1])
        weights = jnp.ones(tokens[:, 1:].shape, jnp.float32)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
    return nll, weights


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, windows, frozen=None, combine: Callable | None = None,
            rng_step: jax.Array | None = None) -> jax.Array:
    """Language-modelling loss of ``windows`` int ``[B, L+1]``: predict tokens ``1..L`` from ``0..L-1``.

    Packed windows (a dict, see the module docstring) average over the targets inside documents only. With
    ``combine`` the model runs on ``combine(frozen, params, rng_step)`` (e.g. a frozen base with LoRA adapters).
    """
    return loss_and_metrics(params, graphdef, windows, frozen, combine, rng_step)[0]


def loss_and_metrics(params: nnx.State, graphdef: nnx.GraphDef, windows, frozen=None,
                     combine: Callable | None = None, rng_step: jax.Array | None = None):
    """``(objective, metrics)``: :func:`loss_fn`'s objective, and ``metrics["loss"]`` the language-modelling loss.

    A mixture-of-experts model (``cfg.num_experts > 0``) on plain windows adds its router z-loss and
    load-balancing loss, weighted by ``cfg.moe_z_loss_weight`` / ``cfg.moe_load_balance_weight``, to the
    objective; ``metrics`` then also hold them, ``expert_counts`` ``[num_moe_layers, E]`` and ``dropped_fraction``.
    """
    if combine is not None:
        params = combine(frozen, params, rng_step)
    if isinstance(windows, dict):
        nll, weights = token_nll(params, graphdef, windows)
        loss = jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)
        return loss, {"loss": loss}
    model = nnx.merge(graphdef, params)
    if not model.cfg.num_experts:
        logits, _ = model(windows[:, :-1])
        loss = cross_entropy(logits, windows[:, 1:])
        return loss, {"loss": loss}
    logits, aux = model.forward_with_aux(windows[:, :-1])
    loss = cross_entropy(logits, windows[:, 1:])
    objective = (loss + model.cfg.moe_z_loss_weight * aux["router_z_loss"]
                 + model.cfg.moe_load_balance_weight * aux["load_balance_loss"])
    return objective, {"loss": loss, **aux}


def train_step(
    state: TrainState, batch, frozen=None, *, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
    combine: Callable | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on ``batch`` int ``[accum, micro_batch, L+1]`` (or a packed dict of such arrays).

    Gradients of the ``accum`` micro-batches are averaged in float32 under ``lax.scan`` (memory of one
    micro-batch), which equals one step on the concatenated batch. With ``combine`` only ``state["params"]`` are
    trained, on the model ``combine(frozen, params, rng_step)``; ``rng_step`` (``step·accum + micro-batch``)
    seeds anything random in it, such as LoRA dropout.
    """
    params = state["params"]
    grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)  # metrics: see loss_and_metrics
    accum = jax.tree.leaves(batch)[0].shape[0]
    first_rng = state["step"] * accum
    if accum == 1:
        (_, loss), grads = grad_fn(params, graphdef, jax.tree.map(lambda x: x[0], batch), frozen, combine, first_rng)
    else:

        def micro(carry, xs):
            windows, i = xs
            (_, loss), grads = grad_fn(params, graphdef, windows, frozen, combine, first_rng + i)
            return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), carry, (loss, grads)), None

        first = jax.tree.map(lambda x: x[0], batch)
        shapes = jax.eval_shape(lambda: loss_and_metrics(params, graphdef, first, frozen, combine, first_rng)[1])
        zeros = (jax.tree.map(lambda m: jnp.zeros(m.shape, jnp.float32), shapes),
                 jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
        (loss, grads), _ = jax.lax.scan(micro, zeros, (batch, jnp.arange(accum, dtype=jnp.int32)))
        loss = jax.tree.map(lambda m: m / accum, loss)  # metrics averaged over micro-batches (counts too)
        grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grads, params)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_state = {
        "step": state["step"] + 1,
        "params": optax.apply_updates(params, updates),
        "opt_state": opt_state,
    }
    return new_state, {**loss, "grad_norm": optax.tree.norm(grads)}


def train_state_shardings(params, optimizer: optax.GradientTransformation, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                          offload_optimizer: bool = False):
    """Shardings of the train state for ``params`` (concrete or abstract): step replicated, the rest by rules.
    ``offload_optimizer``: the optimizer state lives in host memory (memory kind ``pinned_host``; ZeRO-Offload's
    placement, the update itself still runs on the device)."""
    opt = tree_shardings(jax.eval_shape(optimizer.init, params), mesh, rules)
    if offload_optimizer:
        opt = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), opt)
    return {"step": NamedSharding(mesh, PartitionSpec()), "params": tree_shardings(params, mesh, rules),
            "opt_state": opt}


def init_train_state(
    cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    seed: int = 0,
    dot_general: Callable = jax.lax.dot_general,
    initial_params: dict | None = None,
    offload_optimizer: bool = False,
) -> tuple[nnx.GraphDef, TrainState, Any]:
    """``(graphdef, state, state_shardings)`` with parameters and optimizer moments created sharded.

    Parameters start from ``initial_params`` (a pure dict, e.g. a pretrained model's) when given, else from
    the seeded initialiser; the model's linear layers multiply with ``dot_general`` (e.g. fake-quantized).
    """
    if initial_params is None:
        graphdef, params = init_model(cfg, mesh, rules, seed, dot_general)
    else:
        graphdef, params = load_params(cfg, initial_params, mesh, rules, dot_general)
    shardings = train_state_shardings(params, optimizer, mesh, rules, offload_optimizer)
    state = {
        "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]),
        "params": params,
        "opt_state": jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(params),
    }
    return graphdef, state, shardings


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a ``[accum, micro_batch, L+1]`` token batch: micro-batch over the batch mesh axes."""
    return NamedSharding(mesh, logical_to_spec((None, "act_batch", None), rules, mesh))


def jit_train_step(
    graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, state_shardings, mesh: Mesh,
    rules: Rules = DEFAULT_RULES, *, combine: Callable | None = None, frozen_shardings=None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """:func:`train_step` jitted with explicit in/out shardings; the old state is donated.

    Without ``combine`` the step is ``step(state, batch)``; with it, ``step(state, batch, frozen)`` where
    ``frozen`` (placed as ``frozen_shardings``) is read, never donated or updated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    on_device = jax.tree.map(lambda s: s.with_memory_kind("device"), state_shardings["opt_state"])
    offloaded = any(s.memory_kind == "pinned_host" for s in jax.tree.leaves(state_shardings["opt_state"]))

    def fetch(state):  # an offloaded optimizer state comes to the device for the update, and goes back after it
        return {**state, "opt_state": jax.device_put(state["opt_state"], on_device)} if offloaded else state

    if combine is None:

        def step(state, batch):
            return train_step(fetch(state), batch, graphdef=graphdef, optimizer=optimizer)

        in_shardings = (state_shardings, batch_sharding(mesh, rules))
    else:

        def step(state, batch, frozen):
            return train_step(fetch(state), batch, frozen, graphdef=graphdef, optimizer=optimizer, combine=combine)

        in_shardings = (state_shardings, batch_sharding(mesh, rules), frozen_shardings)
    return jax.jit(step, in_shardings=in_shardings, out_shardings=(state_shardings, replicated), donate_argnums=(0,))
