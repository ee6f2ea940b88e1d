"""GPipe pipeline parallelism (parallel/pipeline.py) on 8 fake CPU devices: stage=4 x data=2 gives the loss and
gradients of the unpipelined model, the circular schedule too, training runs/checkpoints/resumes, and a config that
does not fit is a one-line ConfigError."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import run_cli
from llmopt_jax.config_checks import check_pipeline_settings
from llmopt_jax.errors import ConfigError
from llmopt_jax.parallel.mesh import create_mesh
from llmopt_jax.parallel.pipeline import (bubble_fraction, matmul_flops, merge_microbatches, pipeline_layers,
                                          split_microbatches)
from llmopt_jax.parallel.rules import DEFAULT_RULES, activation_constraint
from llmopt_jax.parallel.sharded_init import init_model
from llmopt_jax.train.step import loss_fn

PP_MESH = dict(stage=4, data=2)


def _windows(cfg, shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, shape).astype(np.int32))


def test_pipelined_loss_and_gradients_equal_unpipelined(tiny_cfg):
    """stage=4 x data=2, 4 microbatches, block remat: same loss and gradients as one device without a pipeline."""
    base = dataclasses.replace(tiny_cfg, num_layers=4, remat="full")
    piped = dataclasses.replace(base, pipeline_stages=4, pipeline_microbatches=4)
    mesh = create_mesh(PP_MESH)
    graphdef, params = init_model(piped, mesh, seed=1)
    graphdef1, params1 = init_model(base, None, seed=1)
    q = nnx.to_pure_dict(params)["layers"]["q_proj"]["kernel"]  # [layers, embed, heads, head_dim]
    assert q.sharding.spec == P("stage", None, None, None) and q.addressable_shards[0].data.shape[0] == 1
    windows = _windows(base, (8, 17))
    grad = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)
    loss, grads = grad(params, graphdef, windows)
    loss1, grads1 = grad(params1, graphdef1, windows)
    np.testing.assert_allclose(loss, loss1, rtol=1e-6)
    for g, g1 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads1)):
        np.testing.assert_allclose(g, g1, rtol=1e-5, atol=1e-7)
    # The stage outputs really move between stage devices (the shift s -> s+1).
    assert "collective-permute" in grad.lower(params, graphdef, windows).compile().as_text()


@pytest.mark.parametrize("repeats,microbatches", [(1, 2), (2, 4)])
def test_pipeline_layers_equal_sequential_layers(repeats, microbatches):
    """GPipe with fewer microbatches than stages, and the circular schedule (2 rounds over 4 stages)."""
    mesh = create_mesh(PP_MESH)
    layers, batch, d = 8, 8, 16
    w = jax.random.normal(jax.random.key(0), (layers, d, d)) / 4
    x = jax.random.normal(jax.random.key(1), (batch, 3, d))
    shift = jnp.arange(batch, dtype=jnp.float32)[:, None]  # a per-row side input that follows its row

    def stage_fn(ws, x, side):
        return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w + side), None), x, ws)[0]

    def piped(w, x):
        out = pipeline_layers(stage_fn, w, x, shift[:, None, :] * jnp.ones((1, 3, 1)), stages=4,
                              microbatches=microbatches, repeats=repeats,
                              constrain=activation_constraint(mesh, DEFAULT_RULES))
        return jnp.sum(out ** 2)

    def plain(w, x):
        return jnp.sum(stage_fn(w, x, shift[:, None, :] * jnp.ones((1, 3, 1))) ** 2)

    w_sharded = jax.device_put(w, NamedSharding(mesh, P("stage")))
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    v, g = jax.jit(jax.value_and_grad(piped, argnums=(0, 1)))(w_sharded, x_sharded)
    v1, g1 = jax.jit(jax.value_and_grad(plain, argnums=(0, 1)))(w, x)
    np.testing.assert_allclose(v, v1, rtol=1e-6)
    for a, b in zip(g, g1):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_microbatch_split_round_trips_and_keeps_data_shards():
    x = np.arange(8 * 2).reshape(8, 2)
    mb = split_microbatches(x, 4)
    assert mb.shape == (4, 2, 2) and mb[1, :, 0].tolist() == [2, 10]  # rows 1 and 5: one from each data half
    np.testing.assert_array_equal(merge_microbatches(mb), x)
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7) and bubble_fraction(4, 4, 2) == pytest.approx(3 / 11)


@pytest.mark.parametrize("overrides,match", [
    (dict(stage=3, data=1, fsdp=1, layers=4), r"model.num_layers=4 is not divisible by mesh.stage=3"),
    (dict(stage=4, data=2, fsdp=1, micro=8), r"data.batch_size=8 is not divisible by train.microbatches x batch "
                                             r"mesh axes = 8 x 2"),
    (dict(stage=2, data=1, fsdp=1, micro=1, repeats=2), r"needs train.microbatches=1 >= mesh.stage=2"),
    (dict(stage=2, data=1, fsdp=1, scan=False), r"needs model.scan_layers=True"),
])
def test_pipeline_config_errors_are_one_line(tiny_config, overrides, match):
    c = tiny_config
    c.mesh.update(dict(stage=overrides["stage"], data=overrides["data"], fsdp=overrides["fsdp"]))
    c.model.num_layers = overrides.get("layers", 4)
    c.model.scan_layers = overrides.get("scan", True)
    c.train.microbatches = overrides.get("micro", 2)
    c.train.pipeline_repeats = overrides.get("repeats", 1)
    with pytest.raises(ConfigError, match=match) as err:
        check_pipeline_settings(c)
    assert "\n" not in str(err.value)


def test_default_config_has_no_pipeline(tiny_config):
    check_pipeline_settings(tiny_config)
    assert tiny_config.train.microbatches == 1 and tiny_config.mesh.stage == 1


@pytest.mark.slow
def test_pipelined_training_runs_checkpoints_and_resumes(tmp_path, tiny_config):
    """The loop trains with stage=4 x data=2 x 4 microbatches; a resumed run equals an uninterrupted one."""
    from llmopt_jax.train.loop import train

    def config(steps):
        c = tiny_config
        c.model.num_layers = 4
        c.mesh.update(dict(stage=4, data=2, fsdp=1))
        c.train.microbatches = 4
        c.train.steps, c.train.checkpoint_every, c.train.progress = steps, 2, False
        c.train.async_checkpoint = False
        c.optim.total_steps, c.optim.warmup_steps = 3, 1  # the same schedule for the 2-step and 3-step runs
        c.train.peak_flops_per_s = 1e12
        c.data.seq_len = 32
        return c

    full = train(config(3), str(tmp_path / "full"))
    train(config(2), str(tmp_path / "resumed"))
    resumed = train(config(3), str(tmp_path / "resumed"))
    assert resumed["resumed_from_step"] == 2 and resumed["mesh"].endswith("stage=4")
    assert full["final_loss"] < full["initial_loss"]
    np.testing.assert_allclose(resumed["final_loss"], full["final_loss"], rtol=1e-5)


@pytest.mark.parametrize("microbatches,repeats", [(1, 1), (4, 1), (8, 1), (4, 2)])
def test_scheduled_work_has_the_gpipe_bubble(microbatches, repeats):
    """The matmul FLOPs the traced schedule issues exceed the plain layer stack's by exactly the bubble."""
    w, x = jnp.ones((8, 16, 16)), jnp.ones((16, 2, 16))

    def stage_fn(ws, x, side):
        return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, ws)[0]

    def piped(w, x):
        return jnp.sum(pipeline_layers(stage_fn, w, x, stages=4, microbatches=microbatches, repeats=repeats))

    plain = matmul_flops(jax.grad(lambda w, x: jnp.sum(stage_fn(w, x, None))), w, x)
    scheduled = matmul_flops(jax.grad(piped), w, x)
    assert 1 - plain / scheduled == pytest.approx(bubble_fraction(4, microbatches, repeats))


def test_cli_pipeline_error_is_one_line():
    proc = run_cli(["experiments.train", "--config=configs/train.py:smoke", "--config.mesh.stage=3",
                    "--config.mesh.fsdp=1", "--config.train.microbatches=2", "--workdir=/nonexistent/never"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: model.num_layers=4 is not divisible by mesh.stage=3"
