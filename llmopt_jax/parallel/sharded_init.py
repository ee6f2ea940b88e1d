"""Create a model's parameters directly in their sharded layout (never whole on one device)."""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx
from jax.sharding import Mesh

from llmopt_jax.errors import LlmoptError
from llmopt_jax.models.config import ModelConfig
from llmopt_jax.models.decoder import Decoder
from llmopt_jax.models.layers import DotGeneral
from llmopt_jax.parallel.rules import DEFAULT_RULES, Rules, activation_constraint, check_divisible, tree_shardings


def model_factory(
    cfg: ModelConfig, seed: int, mesh: Mesh | None, rules: Rules, dot_general: DotGeneral = jax.lax.dot_general
) -> Callable[[], Decoder]:
    """A zero-argument constructor of the decoder, wired to ``mesh``'s activation constraints when given."""
    constrain = activation_constraint(mesh, rules) if mesh is not None else None

    def make() -> Decoder:
        extra = {} if constrain is None else {"constrain": constrain}
        return Decoder(cfg, rngs=nnx.Rngs(params=seed), dot_general=dot_general, **extra)

    return make


def abstract_model(
    cfg: ModelConfig, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, seed: int = 0,
    dot_general: DotGeneral = jax.lax.dot_general,
) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, abstract_params)``: shapes/dtypes only, nothing allocated (for AOT and restore targets)."""
    graphdef, state = nnx.split(nnx.eval_shape(model_factory(cfg, seed, mesh, rules, dot_general)))
    return graphdef, state


def init_model(
    cfg: ModelConfig,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    seed: int = 0,
    dot_general: DotGeneral = jax.lax.dot_general,
) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, params)`` with every parameter created in place with its rule-given sharding.

    The initialiser is jitted with ``out_shardings``, so each device computes only its own shard. Random
    values do not depend on the mesh (JAX's partitionable threefry), so sharded and single-device runs start
    from identical parameters. Raises ``ShardingError`` when a dimension does not divide its mesh axes.
    """
    make = model_factory(cfg, seed, mesh, rules, dot_general)
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    init = lambda: nnx.split(make())[1]  # noqa: E731
    if mesh is None:
        return graphdef, jax.jit(init)()
    check_divisible(abstract, mesh, rules)
    return graphdef, jax.jit(init, out_shardings=tree_shardings(abstract, mesh, rules))()


def load_params(
    cfg: ModelConfig, pure_params: dict, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
    dot_general: DotGeneral = jax.lax.dot_general,
) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, params)`` holding ``pure_params`` (a nested dict of arrays, e.g. from a GGUF file); the
    graph's linear layers multiply with ``dot_general``.

    Arrays are cast to ``cfg.param_dtype`` and, with a ``mesh``, placed directly in their rule-given shardings.
    Raises ``LlmoptError`` naming the first parameter whose shape differs from the model's.
    """
    import jax.numpy as jnp
    import numpy as np

    graphdef, abstract = abstract_model(cfg, mesh, rules, dot_general=dot_general)
    if mesh is not None:
        check_divisible(abstract, mesh, rules)
    flat_abstract = dict(nnx.to_flat_state(abstract))
    flat_given = {tuple(str(k) for k in path): v for path, v in nnx.to_flat_state(nnx.State(pure_params))}
    for path, var in flat_abstract.items():
        key = tuple(str(k) for k in path)
        if key not in flat_given:
            raise LlmoptError(f"parameter {'/'.join(key)} is missing")
        if tuple(np.shape(flat_given[key])) != tuple(var.shape):
            raise LlmoptError(f"parameter {'/'.join(key)} has shape {np.shape(flat_given[key])}, model expects {var.shape}")
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, pure_params)
    state = jax.tree.map(lambda x: jnp.asarray(x, cfg.weight_dtype), state)
    if mesh is not None:
        state = jax.device_put(state, tree_shardings(abstract, mesh, rules))
    return graphdef, state
