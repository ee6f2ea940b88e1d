"""Ahead-of-time compilation of the sharded train step on abstract inputs (memory/FLOP estimates)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from llmopt_jax.models.config import ModelConfig
from llmopt_jax.parallel.mesh import create_mesh, describe
from llmopt_jax.parallel.rules import check_divisible, normalize_rules
from llmopt_jax.parallel.sharded_init import abstract_model
from llmopt_jax.train.optim import make_optimizer
from llmopt_jax.train.step import batch_sharding, jit_train_step, train_state_shardings


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def per_device_bytes(abstract_tree) -> int:
    """Bytes one device holds of an abstract, sharded tree (its shard shapes)."""
    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


def compile_train_step_abstract(config: ConfigDict) -> dict:
    """Lowers and compiles the train step of ``config`` on the current devices without allocating state.

    Returns per-device parameter/optimizer bytes (from the shardings) and XLA's memory analysis.
    """
    from llmopt_jax.train.loop import check_batch_fits_mesh, optimizer_config

    model_cfg = ModelConfig.from_mapping(config.model)
    mesh = create_mesh(config.mesh)
    rules = normalize_rules(config.sharding_rules)
    micro, accum, seq_len = int(config.data.batch_size), int(config.data.grad_accum), int(config.data.seq_len)
    check_batch_fits_mesh(micro, mesh, rules)
    from llmopt_jax.parallel import pipeline

    model_cfg = pipeline.configure(model_cfg, config, mesh, rules)  # mesh.stage / train.microbatches (GPipe)
    optimizer = make_optimizer(optimizer_config(config))

    graphdef, params = abstract_model(model_cfg, mesh, rules, seed=int(config.seed))
    check_divisible(params, mesh, rules)
    shardings = train_state_shardings(params, optimizer, mesh, rules)
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings["step"]),
             "params": _abstract(params, shardings["params"]),
             "opt_state": _abstract(jax.eval_shape(optimizer.init, params), shardings["opt_state"])}
    batch = jax.ShapeDtypeStruct((accum, micro, seq_len + 1), jnp.int32, sharding=batch_sharding(mesh, rules))

    compiled = jit_train_step(graphdef, optimizer, shardings, mesh, rules).lower(state, batch).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    param_bytes = per_device_bytes(state["params"])
    opt_bytes = per_device_bytes(state["opt_state"])
    temp = int(memory.temp_size_in_bytes)
    return {
        "preset": config.preset,
        "mesh": describe(mesh),
        "num_devices": mesh.size,
        "num_params": sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
        "param_bytes_per_device": param_bytes,
        "optimizer_bytes_per_device": opt_bytes,
        "temp_bytes_per_device": temp,
        "total_bytes_per_device": param_bytes + opt_bytes + temp,
        "xla_argument_bytes_per_device": int(memory.argument_size_in_bytes),
        "xla_output_bytes_per_device": int(memory.output_size_in_bytes),
        "xla_alias_bytes_per_device": int(memory.alias_size_in_bytes),
        "xla_flops_per_step_per_device": float(cost.get("flops", 0.0)) if cost else 0.0,
        "xla_bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)) if cost else 0.0,
        "model_flops_per_step": model_cfg.train_flops_per_token(seq_len) * micro * accum * seq_len,
        "tokens_per_step": micro * accum * seq_len,
    }
