"""Meshes, sharding rules, sharded init, and sharded == single-device numerics on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from llmopt_jax.errors import MeshError, ShardingError
from llmopt_jax.models.config import ModelConfig
from llmopt_jax.parallel.mesh import create_mesh, resolve_axis_sizes
from llmopt_jax.parallel.rules import DEFAULT_RULES, logical_to_spec
from llmopt_jax.parallel.sharded_init import init_model
from llmopt_jax.train.optim import make_optimizer
from llmopt_jax.train.step import init_train_state, jit_train_step, loss_fn

CFG = ModelConfig(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=96)
MESH_222 = dict(data=2, fsdp=2, tensor=2)


def test_there_are_eight_fake_devices():
    assert jax.device_count() == 8


def test_resolve_axis_sizes_fills_minus_one():
    assert resolve_axis_sizes(dict(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2, 1, 1)
    assert resolve_axis_sizes(dict(fsdp=-1), 8) == (1, 8, 1, 1, 1)


@pytest.mark.parametrize(
    "sizes,match",
    [
        (dict(data=3, fsdp=-1), "3 does not divide 8"),
        (dict(data=2, fsdp=2), "use 4 devices but 8"),
        (dict(data=-1, fsdp=-1), "at most one"),
        (dict(data=0), "positive"),
        (dict(data=2, fsdp=-1, dcn_data=2), "multi-slice"),
        (dict(fsdp=-1, dcn_data=3), "do not split into 3 slices"),
    ],
)
def test_mesh_errors(sizes, match):
    with pytest.raises(MeshError, match=match):
        create_mesh(sizes)


def test_mesh_axes_and_shape():
    mesh = create_mesh(MESH_222)
    assert mesh.axis_names == ("data", "fsdp", "tensor", "expert", "stage")
    assert dict(mesh.shape) == dict(data=2, fsdp=2, tensor=2, expert=1, stage=1)


def test_logical_to_spec_follows_rules():
    mesh = create_mesh(MESH_222)
    assert logical_to_spec(("embed", "mlp"), DEFAULT_RULES, mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("act_batch", "act_length", "act_embed"), DEFAULT_RULES, mesh) == P(("data", "fsdp"), None, None)
    # A mesh axis is used once per array: the second 'mlp' falls through to replicated.
    assert logical_to_spec(("mlp", "mlp"), DEFAULT_RULES, mesh) == P("tensor", None)
    # Size-1 axes are dropped.
    assert logical_to_spec(("layers", "embed"), DEFAULT_RULES, mesh) == P(None, "fsdp")
    # Changing parallelism is a rules edit: put 'embed' on tensor instead.
    rules = [("embed", "tensor")] + list(DEFAULT_RULES)
    assert logical_to_spec(("embed", "mlp"), rules, mesh) == P("tensor", None)


def test_sharded_init_equals_unsharded_and_follows_rules():
    mesh = create_mesh(MESH_222)
    _, sharded = init_model(CFG, mesh, seed=3)
    _, single = init_model(CFG, None, seed=3)
    pure_sharded, pure_single = nnx.to_pure_dict(sharded), nnx.to_pure_dict(single)
    for a, b in zip(jax.tree.leaves(pure_sharded), jax.tree.leaves(pure_single)):
        np.testing.assert_array_equal(a, b)
    q = pure_sharded["layers"]["q_proj"]["kernel"]  # [layers, embed, heads, head_dim]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 32, 2, 16)  # really split 2x2
    emb = pure_sharded["embed"]["embedding"]
    assert emb.sharding.spec == P("tensor", "fsdp")
    assert emb.addressable_shards[0].data.shape == (64, 32)


def test_heads_not_divisible_by_tensor_axis_is_a_clear_error():
    cfg = ModelConfig(vocab_size=128, d_model=48, num_layers=1, num_heads=3, num_kv_heads=3, mlp_dim=64)
    with pytest.raises(ShardingError, match=r"heads=3.*tensor"):
        init_model(cfg, create_mesh(dict(data=4, tensor=2)))


def _batch(shape, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, shape).astype(np.int32)


def test_sharded_loss_and_gradients_equal_single_device():
    mesh = create_mesh(MESH_222)
    graphdef, params = init_model(CFG, mesh, seed=1)
    graphdef1, params1 = init_model(CFG, None, seed=1)
    windows = _batch((8, 17))
    grad = jax.value_and_grad(loss_fn)
    loss, grads = jax.jit(grad, static_argnums=1)(params, graphdef, jnp.asarray(windows))
    loss1, grads1 = jax.jit(grad, static_argnums=1)(params1, graphdef1, jnp.asarray(windows))
    np.testing.assert_allclose(loss, loss1, rtol=1e-6)
    for g, g1 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads1)):
        np.testing.assert_allclose(g, g1, rtol=1e-5, atol=1e-7)


def test_sharded_train_steps_equal_single_device():
    optimizer = make_optimizer(dict(learning_rate=1e-2, warmup_steps=1, total_steps=10))
    results = []
    for sizes in (MESH_222, dict(data=1, fsdp=1, tensor=1)):
        devices = jax.devices() if sizes is MESH_222 else jax.devices()[:1]
        mesh = create_mesh(sizes, devices)
        graphdef, state, shardings = init_train_state(CFG, optimizer, mesh, seed=2)
        step = jit_train_step(graphdef, optimizer, shardings, mesh)
        losses = []
        for i in range(3):
            state, metrics = step(state, _batch((1, 8, 17), seed=i))
            losses.append(float(metrics["loss"]))
        results.append((losses, nnx.to_pure_dict(state["params"])))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert results[0][1]["layers"]["up_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
