"""Logical axis names -> mesh axes, from a rules table that lives in the config.

A rules table is a sequence of ``(logical_name, mesh_axes)`` pairs, ``mesh_axes`` being ``None``, one mesh
axis name or a tuple of them. For each dimension the first rule for its name whose mesh axes are not yet
used by another dimension of the same array applies (the Flax/MaxText convention), so one table serves
parameters and activations. Changing the parallelism is a config edit.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmopt_jax.errors import ConfigError, ShardingError

Rules = Sequence[tuple[str, Any]]

# Parameters shard over fsdp (ZeRO-3) and tensor (Megatron), experts' weights over expert; activations' batch
# over data+fsdp+expert (expert-parallel devices hold different tokens outside the MoE layers). Inside a MoE
# layer the expert inputs [E, G, C, D] put E on the expert axis, so their batch falls back to data+fsdp: the
# change of layout between the two is the all-to-all of expert parallelism.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", ("data", "fsdp", "expert")),
    ("act_batch", ("data", "fsdp")),
    ("act_expert", "expert"),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("layers", "stage"),
    ("norm", None),
)


def normalize_rules(rules: Iterable[Sequence[Any]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Rules as ``((name, (mesh_axis, ...)), ...)``; accepts lists from JSON/ConfigDict."""
    out = []
    for rule in rules:
        if len(rule) != 2:
            raise ConfigError(f"sharding rule {rule!r} is not a (logical_name, mesh_axes) pair")
        name, axes = rule
        if axes is None:
            axes = ()
        elif isinstance(axes, str):
            axes = (axes,)
        out.append((str(name), tuple(axes)))
    return tuple(out)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules, mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions have ``logical_axes`` (``None`` = replicated).

    Mesh axes of size 1 are dropped (they cannot shard anything) when ``mesh`` is given.
    """
    table = normalize_rules(rules)
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        chosen: tuple[str, ...] = ()
        if name is not None:
            for rule_name, axes in table:
                if rule_name == name and not (set(axes) & used):
                    chosen = axes
                    break
        if mesh is not None:
            unknown = [a for a in chosen if a not in mesh.shape]
            if unknown:
                raise ConfigError(f"sharding rule for {name!r} names unknown mesh axes {unknown}")
            chosen = tuple(a for a in chosen if mesh.shape[a] > 1)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return PartitionSpec(*spec)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def logical_axes_of(var: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names stored on a variable (``None`` if it has none)."""
    return var.get_metadata().get("out_sharding")


def tree_shardings(tree, mesh: Mesh, rules: Rules):
    """``NamedSharding`` for every array in ``tree``: Variables by their logical axes, the rest replicated.

    Works on parameters, optimizer states built from them (optax keeps the Variable wrappers) and abstract
    (``ShapeDtypeStruct``) trees alike.
    """

    def one(x):
        if _is_var(x):
            axes = logical_axes_of(x)
            spec = PartitionSpec() if axes is None else logical_to_spec(axes, rules, mesh)
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, tree, is_leaf=_is_var)


def check_divisible(tree, mesh: Mesh, rules: Rules) -> None:
    """Raises :class:`ShardingError` naming the first parameter whose dimension does not divide its mesh axes."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_var)[0]
    for path, leaf in flat:
        if not _is_var(leaf) or logical_axes_of(leaf) is None:
            continue
        axes = logical_axes_of(leaf)
        spec = logical_to_spec(axes, rules, mesh)
        shape = leaf.get_value().shape
        for dim, (name, mesh_axes) in enumerate(zip(axes, spec)):
            if mesh_axes is None:
                continue
            mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
            ways = math.prod(mesh.shape[a] for a in mesh_axes)
            if shape[dim] % ways:
                where = jax.tree_util.keystr(path, simple=True, separator="/")
                raise ShardingError(
                    f"parameter {where} shape {tuple(shape)}: dimension {dim} ({name}={shape[dim]}) is not divisible "
                    f"by mesh axes {mesh_axes} of size {ways}"
                )


def activation_constraint(mesh: Mesh, rules: Rules) -> Callable[[jax.Array, Sequence[str | None]], jax.Array]:
    """An ``ActivationConstraint`` that pins activations to ``mesh`` by their logical axes."""
    table = normalize_rules(rules)

    def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
        spec = logical_to_spec(logical_axes, table, mesh)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return constrain


def check_batch_fits_mesh(batch_size: int, mesh: Mesh, rules: Rules, what: str = "data.batch_size") -> None:
    """Raises ``ShardingError`` unless ``batch_size`` divides over the mesh axes ``act_batch`` maps to."""
    spec = logical_to_spec(("act_batch",), rules, mesh)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    ways = math.prod(mesh.shape[a] for a in axes)
    if batch_size % ways:
        raise ShardingError(f"{what}={batch_size} is not divisible by the batch mesh axes {axes} of size {ways}")
