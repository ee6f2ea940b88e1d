"""GPipe pipeline parallelism over the mesh axis ``stage`` (optionally circular / interleaved).

The decoder's scanned layers ``[L, ...]`` are cut into ``S`` stages of consecutive layers and the batch into
``M`` microbatches. Every stage runs at every iteration of one ``lax.scan`` over ``M·R + S - 1`` iterations
(the praxis/MaxText "vmapped stages with a shifting buffer" form): iteration ``t`` runs stage ``s`` on item
``t - s``, all stages at once under ``jax.vmap(..., spmd_axis_name="stage")``, and then the stage outputs shift
one stage on (``s -> s+1``, a collective permute between neighbouring stage devices). The whole step stays
in ordinary ``jit`` + sharding-constraint land, so the data/FSDP/tensor axes and remat combine with it
unchanged; the backward pass is the scan's transpose, i.e. GPipe's backward schedule (last microbatch
first, the shift reversed), with every stage again working concurrently.

Bubble: a stage computes on padding during ``S - 1`` of the ``M·R + S - 1`` iterations, so the idle share of
the step is ``(S-1)/(M·R+S-1)`` (GPipe's ``(S-1)/(M+S-1)`` for ``R = 1``). In this form the idle stages do
compute (on zeros) and their results are discarded, which costs the same wall time as idling on real
hardware, and also costs CPU time on fake CPU devices (which is what lets a CPU run measure the bubble).

Circular schedule (``repeats = R > 1``, Megatron's interleaved / MaxText's ``num_pipeline_repeats``): the
layers form ``S·R`` virtual stages of ``L/(S·R)`` layers; virtual stage ``r·S + s`` runs on stage ``s``, so
each microbatch loops ``R`` times around the ring and the bubble shrinks ``R``-fold. It needs ``M >= S``
(a microbatch leaving the last stage waits in a circular buffer until stage 0 is free). The parameters stay
stored in layer order (contiguous blocks of ``L/S`` layers per stage, as the ``layers -> stage`` rule shards
them), so with ``R > 1`` XLA moves block weights between stage devices inside every step (a collective
permute in the forward; for the gradients' way back XLA:CPU chose an all-gather of the layer stack): a circular
schedule trades that traffic and memory for the smaller bubble. Storing the weights as ``[R, S, ...]`` (as
MaxText does) would remove it; not done here, so that checkpoints keep one layer order for every mesh.

Only the layer stack is pipelined: the embedding, the final norm, the LM head and the loss run on the whole
batch outside it, sharded over the batch axes and repeated on every stage (``S``-fold redundant work there).

Microbatch ``m`` holds batch rows ``m, m+M, m+2M, ...``: each data-parallel shard keeps its own rows, so
splitting the batch moves no data.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from llmopt_jax.config_checks import check_pipeline  # noqa: F401 - re-exported
from llmopt_jax.errors import ConfigError

STAGE_AXIS = "stage"


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """The idle share of a pipelined step, ``(S-1)/(M·R+S-1)``."""
    return (stages - 1) / (microbatches * repeats + stages - 1)


def num_iterations(stages: int, microbatches: int, repeats: int = 1) -> int:
    """Scan iterations of one pipelined forward pass, ``M·R + S - 1``."""
    return microbatches * repeats + stages - 1


def configure(model_cfg, config, mesh, rules):
    """``model_cfg`` with the pipeline settings of a train ``config`` (``mesh.stage`` from the resolved ``mesh``,
    ``train.microbatches``, ``train.pipeline_repeats``), checked against ``data.batch_size`` and the batch mesh
    axes; raises :class:`ConfigError` (one line) when they do not fit."""
    import dataclasses
    import math

    from llmopt_jax.parallel.rules import logical_to_spec

    stages = int(mesh.shape[STAGE_AXIS])
    micro = int(config.train.get("microbatches", 1))
    repeats = int(config.train.get("pipeline_repeats", 1))
    spec = logical_to_spec(("act_batch",), rules, mesh)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    check_pipeline(model_cfg.num_layers, stages, micro, repeats, scan_layers=model_cfg.scan_layers,
                   num_experts=model_cfg.num_experts, batch_size=int(config.data.batch_size),
                   batch_ways=math.prod(mesh.shape[a] for a in axes))
    return dataclasses.replace(model_cfg, pipeline_stages=stages, pipeline_microbatches=micro,
                               pipeline_repeats=repeats)


def split_microbatches(tree, microbatches: int):
    """Leaves ``[B, ...]`` -> ``[M, B/M, ...]``; microbatch ``m`` holds rows ``m, m+M, ...`` (see module doc)."""

    def one(a):
        b = a.shape[0]
        return jnp.swapaxes(a.reshape(b // microbatches, microbatches, *a.shape[1:]), 0, 1)

    return jax.tree.map(one, tree)


def merge_microbatches(tree):
    """Inverse of :func:`split_microbatches`: ``[M, B/M, ...]`` -> ``[B, ...]`` in the original row order."""

    def one(a):
        return jnp.swapaxes(a, 0, 1).reshape(a.shape[0] * a.shape[1], *a.shape[2:])

    return jax.tree.map(one, tree)


def pipeline_layers(
    stage_fn: Callable[[Any, jax.Array, Any], jax.Array],
    layer_params,
    x: jax.Array,
    side_inputs=None,
    *,
    stages: int,
    microbatches: int,
    repeats: int = 1,
    constrain: Callable[[jax.Array, tuple], jax.Array] | None = None,
    stage_logical_axis: str = "layers",
    layer_axes=None,
) -> jax.Array:
    """Runs ``L`` stacked layers over ``x`` as a pipeline; equals applying them in order to the whole batch.

    ``layer_params``: pytree whose leaves have a leading layers axis ``[L, ...]`` (sharded over ``stage`` in
    contiguous blocks by the ``layers`` rule). ``x``: float ``[B, ...]`` activations. ``side_inputs``: pytree of
    per-row arrays ``[B, ...]`` that every layer reads but none changes (positions, segment ids), or None.
    ``stage_fn(chunk_params, x_mb, side_mb)`` applies a chunk of ``L/(S·R)`` layers (leaves ``[L/(S·R), ...]``)
    to one microbatch ``x_mb`` ``[B/M, ...]`` and returns the same shape. ``constrain(array, logical_axes)``
    pins the stage buffers (the model's activation constraint); its ``stage_logical_axis`` maps to ``stage``.
    ``layer_axes``: the logical axes of each leaf of ``layer_params`` (``jax.tree.leaves`` order, first ``layers``),
    or None; with them the circular schedule's weight re-layout is pinned to the rules' sharding.
    Returns ``[B, ...]``.
    """
    s_, m_, r_ = stages, microbatches, repeats
    if x.shape[0] % m_:
        raise ConfigError(f"a pipelined forward of batch {x.shape[0]} does not split into train.microbatches={m_}")
    constrain = constrain or (lambda a, axes: a)
    num_layers = jax.tree.leaves(layer_params)[0].shape[0]
    chunk = num_layers // (s_ * r_)
    leaves, treedef = jax.tree.flatten(layer_params)
    leaf_axes = list(layer_axes) if layer_axes is not None else [None] * len(leaves)

    def chunked_axes(axes, lead):  # logical axes of a leaf after its layers axis became `lead`
        return None if axes is None else tuple(lead) + tuple(axes[1:])

    def relayout(a, axes):
        # [L, ...] -> [R, S, L/(S·R), ...]: virtual stage r·S + s holds layers (r·S + s)·chunk ... + chunk - 1.
        # Pinned (S on `stage`, the other dimensions as the rules shard them) so that XLA moves only the block
        # weights a circular schedule needs elsewhere instead of gathering the whole stack.
        a = a.reshape(r_, s_, chunk, *a.shape[1:])
        axes = chunked_axes(axes, (None, stage_logical_axis, None))
        return a if axes is None else constrain(a, axes)

    params = jax.tree.unflatten(treedef, [relayout(a, ax) for a, ax in zip(leaves, leaf_axes)])
    tail = (None,) * (x.ndim - 1)
    stage_axes = (stage_logical_axis, "act_batch") + tail[1:]  # buffer [S, B/M, ...]
    store_axes = (None, "act_batch") + tail[1:]  # microbatches [M, B/M, ...], every stage holds all

    xs = constrain(split_microbatches(x, m_), store_axes)  # [M, B/M, ...]
    side = split_microbatches(side_inputs, m_)
    stage_ids = jnp.arange(s_, dtype=jnp.int32)

    def run_stages(chunk_params, x_in, side_in):
        return stage_fn(chunk_params, x_in, side_in)

    # spmd_axis_name: constraints inside the stage function (the blocks' own) gain `stage` on the vmapped
    # dimension, so each stage's work stays on its own devices.
    vmapped = jax.vmap(run_stages, in_axes=(0, 0, 0), spmd_axis_name=STAGE_AXIS)

    def pick_params(params, repeat_idx):
        # Per stage s, the chunk of repeat repeat_idx[s]: leaves [R, S, chunk, ...] -> [S, chunk, ...].
        if r_ == 1:
            return jax.tree.map(lambda a: a[0], params)
        # A one-hot sum over the R repeats rather than a per-stage gather: elementwise, so it stays local to
        # each stage's devices (a gather's transpose, a scatter, made XLA all-gather the whole layer stack).
        hot = repeat_idx[None, :] == jnp.arange(r_, dtype=repeat_idx.dtype)[:, None]  # [R, S]

        def one(a):
            mask = hot.reshape(r_, s_, *(1,) * (a.ndim - 2)).astype(a.dtype)
            return jnp.sum(mask * a, axis=0)

        picked = [one(a) for a in jax.tree.leaves(params)]
        picked = [p if ax is None else constrain(p, chunked_axes(ax, (stage_logical_axis, None)))
                  for p, ax in zip(picked, leaf_axes)]
        return jax.tree.unflatten(treedef, picked)

    def shift(first, prev, axes):
        # Stage 0 takes `first`; stage s > 0 takes what stage s-1 produced in the previous iteration.
        return constrain(jnp.concatenate([first[None], prev[:-1]], axis=0), axes)

    def buffer_axes(a):
        return (stage_logical_axis, "act_batch") + (None,) * (a.ndim - 2)

    def step(carry, t):
        # prev_out [S, B/M, ...]: each stage's output of the last iteration; prev_side: the side inputs it used;
        # circ [M, B/M, ...]: the last stage's output of each microbatch (its next round's input, finally the result).
        prev_out, prev_side, circ = carry
        items = t - stage_ids  # the item stage s works on: microbatch item % M, repeat item // M
        repeat_idx = jnp.clip(items // m_, 0, r_ - 1)
        # Stage 0 starts item t: a fresh microbatch in the first round, else the one waiting in circ.
        first = xs[t % m_] if r_ == 1 else jnp.where(t < m_, xs[t % m_], circ[t % m_])
        x_in = shift(first, prev_out, stage_axes)
        # Side inputs travel with their microbatch (shifted, not gathered per stage: a gather over the
        # microbatch axis of a data-sharded array trips XLA's SPMD partitioner).
        side_in = jax.tree.map(lambda a, p: shift(a[t % m_], p, buffer_axes(p)), side, prev_side)
        out = vmapped(pick_params(params, repeat_idx), x_in, side_in)
        out = constrain(out, stage_axes)
        if r_ == 1:  # GPipe: nothing returns to stage 0; the last stage's outputs leave as the scan's outputs
            return (out, side_in, None), out[-1]
        # The last stage finished item t-(S-1): keep it for its next round, or as the final output.
        done = t - (s_ - 1)
        slot = jnp.mod(done, m_)
        kept = jnp.where(done >= 0, out[-1], circ[slot])
        circ = jax.lax.dynamic_update_index_in_dim(circ, kept, slot, 0)
        return (out, side_in, constrain(circ, store_axes)), None

    init = (constrain(jnp.zeros((s_,) + xs.shape[1:], x.dtype), stage_axes),
            jax.tree.map(lambda a: jnp.zeros((s_,) + a.shape[1:], a.dtype), side),
            None if r_ == 1 else jnp.zeros_like(xs))
    iterations = jnp.arange(num_iterations(s_, m_, r_), dtype=jnp.int32)
    (_, _, circ), last = jax.lax.scan(step, init, iterations)
    if r_ == 1:  # the last stage's output of iteration t is microbatch t-(S-1)
        return merge_microbatches(constrain(last[s_ - 1:], store_axes))
    # After the last round circ holds every microbatch's output of the last virtual stage.
    return merge_microbatches(circ)


def matmul_flops(fn: Callable, *args) -> float:
    """Matmul FLOPs (``2·M·N·K`` per ``dot_general``) that ``fn(*args)`` executes, summed over all devices.

    Counted on the traced program, with every ``scan`` body multiplied by its length (XLA's cost analysis counts
    a loop body once), so a pipelined step counts its bubble iterations: for the layer stack the ratio to the
    unpipelined count is ``(M·R+S-1)/(M·R)``, i.e. the bubble as work actually scheduled.
    """
    import math

    def count(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (lc, _), (lb, _) = eqn.params["dimension_numbers"]
                lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
                out = eqn.outvars[0].aval.shape
                total += 2.0 * math.prod(out) * math.prod(lhs[d] for d in lc)
                del rhs, lb
                continue
            times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        total += times * count(inner)
        return total

    return count(jax.make_jaxpr(fn)(*args).jaxpr)
