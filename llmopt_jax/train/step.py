"""The training state and a jitted, sharded train step with in-step gradient accumulation."""

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


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, windows: jax.Array) -> jax.Array:
    """Language-modelling loss of ``windows`` int ``[B, L+1]``: predict tokens ``1..L`` from ``0..L-1``."""
    model = nnx.merge(graphdef, params)
    logits, _ = model(windows[:, :-1])
    return cross_entropy(logits, windows[:, 1:])


def train_step(
    state: TrainState, batch: jax.Array, *, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on ``batch`` int ``[accum, micro_batch, L+1]``.

    Gradients of the ``accum`` micro-batches are averaged in float32 under ``lax.scan`` (memory of one
    micro-batch), which equals one step on the concatenated batch.
    """
    params = state["params"]
    grad_fn = jax.value_and_grad(loss_fn)
    accum = batch.shape[0]
    if accum == 1:
        loss, grads = grad_fn(params, graphdef, batch[0])
    else:

        def micro(carry, windows):
            loss, grads = grad_fn(params, graphdef, windows)
            return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), carry, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
        (loss, grads), _ = jax.lax.scan(micro, zeros, batch)
        loss = loss / accum
        grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grads, params)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_state = {
        "step": state["step"] + 1,
        "params": optax.apply_updates(params, updates),
        "opt_state": opt_state,
    }
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def train_state_shardings(params, optimizer: optax.GradientTransformation, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Shardings of the train state for ``params`` (concrete or abstract): step replicated, the rest by rules."""
    return {
        "step": NamedSharding(mesh, PartitionSpec()),
        "params": tree_shardings(params, mesh, rules),
        "opt_state": tree_shardings(jax.eval_shape(optimizer.init, params), mesh, rules),
    }


def init_train_state(
    cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    seed: int = 0,
    dot_general: Callable = jax.lax.dot_general,
    initial_params: dict | None = None,
) -> tuple[nnx.GraphDef, TrainState, Any]:
    """``(graphdef, state, state_shardings)`` with parameters and optimizer moments created sharded.

    Parameters start from ``initial_params`` (a pure dict, e.g. a pretrained model's) when given, else from
    the seeded initialiser; the model's linear layers multiply with ``dot_general`` (e.g. fake-quantized).
    """
    if initial_params is None:
        graphdef, params = init_model(cfg, mesh, rules, seed, dot_general)
    else:
        graphdef, params = load_params(cfg, initial_params, mesh, rules, dot_general)
    shardings = train_state_shardings(params, optimizer, mesh, rules)
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
    rules: Rules = DEFAULT_RULES,
) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """:func:`train_step` jitted with explicit in/out shardings; the old state is donated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def step(state, batch):
        return train_step(state, batch, graphdef=graphdef, optimizer=optimizer)

    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding(mesh, rules)),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
