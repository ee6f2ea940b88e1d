"""Mixture-of-experts layers: gating, the two dispatch paths, auxiliary losses, expert parallelism on 8 fake CPU
devices (expert=4, data=2) against one device, and a MoE training run through the unchanged loop (resume too)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from llmopt_jax.errors import ConfigError
from llmopt_jax.models.config import ModelConfig
from llmopt_jax.models.decoder import Decoder
from llmopt_jax.models.moe import MoeMLP, capacity, route
from llmopt_jax.parallel.mesh import create_mesh
from llmopt_jax.parallel.sharded_init import init_model
from llmopt_jax.train.step import loss_and_metrics, loss_fn

MOE_CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                      max_seq_len=64, num_experts=4, moe_top_k=2, moe_expert_dim=16)


def _tokens(shape, seed=0, vocab=64):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def test_gating_weights():
    cfg = MOE_CFG
    logits = jax.random.normal(jax.random.key(0), (5, 4))
    ids, w, probs = route(cfg, logits)
    np.testing.assert_allclose(jnp.sum(w, -1), 1.0, rtol=1e-6)  # Mixtral: renormalised over the top k
    np.testing.assert_array_equal(ids[:, 0], jnp.argmax(logits, -1))
    ids, w, _ = route(dataclasses.replace(cfg, moe_gating="switch", moe_top_k=1), logits)
    np.testing.assert_allclose(w[:, 0], jnp.max(probs, -1), rtol=1e-6)  # Switch: the full-softmax probability
    _, w, _ = route(dataclasses.replace(cfg, moe_gating="unit"), logits)
    np.testing.assert_array_equal(w, 1.0)


@pytest.mark.parametrize("bad,match", [
    (dict(moe_top_k=5), "moe_top_k"), (dict(moe_gating="switch"), "one expert"),
    (dict(moe_dispatch="x"), "moe_dispatch"), (dict(moe_layers="1"), "scan_layers"),
    (dict(moe_layers="7", scan_layers=False), "outside"),
])
def test_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(MOE_CFG, **bad)


def test_dropless_equals_capacity_when_nothing_is_dropped():
    """Both dispatch paths: same outputs and parameter gradients when the capacity holds every token."""
    tokens = _tokens((3, 12))
    results = []
    for dispatch in ("dropless", "capacity"):
        cfg = dataclasses.replace(MOE_CFG, moe_dispatch=dispatch, moe_capacity_factor=2.0)
        assert capacity(cfg, 11) == 11  # C = S: nothing can be dropped
        graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
        grad = jax.jit(jax.value_and_grad(loss_and_metrics, has_aux=True), static_argnums=1)
        (objective, metrics), grads = grad(params, graphdef, tokens)
        assert float(metrics["dropped_fraction"]) == 0.0
        results.append((objective, metrics, grads))
    (o1, m1, g1), (o2, m2, g2) = results
    np.testing.assert_allclose(o1, o2, rtol=1e-6)
    np.testing.assert_array_equal(m1["expert_counts"], m2["expert_counts"])
    assert m1["expert_counts"].shape == (2, 4) and float(jnp.sum(m1["expert_counts"][0])) == 3 * 11 * 2
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_capacity_drops_overflow_tokens():
    cfg = dataclasses.replace(MOE_CFG, moe_dispatch="capacity", moe_capacity_factor=0.25, moe_top_k=1)
    graphdef, state = nnx.split(MoeMLP(cfg, rngs=nnx.Rngs(1)))
    h = jax.random.normal(jax.random.key(2), (2, 16, 32))
    y, aux = jax.jit(lambda s, h: nnx.merge(graphdef, s)(h))(state, h)
    c = capacity(cfg, 16)  # 1 slot per expert and row
    assert c == 1 and float(aux.dropped_fraction) > 0
    # A dropped token's MLP output is exactly zero: at most E tokens per row have a nonzero output.
    nonzero = jnp.sum(jnp.any(y != 0, axis=-1), axis=-1)
    assert int(jnp.max(nonzero)) <= cfg.num_experts


def test_unit_gating_with_all_experts_is_the_sum_of_expert_slices():
    """top-k = E with unit gates: the MoE MLP equals a dense SwiGLU MLP whose hidden units are the experts'."""
    cfg = dataclasses.replace(MOE_CFG, moe_gating="unit", moe_top_k=4)
    moe = MoeMLP(cfg, rngs=nnx.Rngs(3))
    graphdef, state = nnx.split(moe)
    h = jax.random.normal(jax.random.key(4), (2, 8, 32))
    y, _ = jax.jit(lambda s, h: nnx.merge(graphdef, s)(h))(state, h)
    wg, wu, wd = (m.kernel.get_value() for m in (moe.gate_proj, moe.up_proj, moe.down_proj))
    gate = jnp.concatenate(list(wg), axis=1)  # [D, E*F]
    up = jnp.concatenate(list(wu), axis=1)
    down = jnp.concatenate(list(wd), axis=0)  # [E*F, D]
    dense = (jax.nn.silu(h @ gate) * (h @ up)) @ down
    np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-6)


def test_aux_losses_enter_the_objective():
    graphdef, params = nnx.split(Decoder(MOE_CFG, rngs=nnx.Rngs(0)))
    objective, m = jax.jit(loss_and_metrics, static_argnums=1)(params, graphdef, _tokens((2, 9)))
    expected = m["loss"] + 1e-3 * m["router_z_loss"] + 1e-2 * m["load_balance_loss"]
    np.testing.assert_allclose(objective, expected, rtol=1e-6)
    assert 0.9 < float(m["load_balance_loss"]) < 2.0  # ~1 when balanced, E at worst


def test_only_chosen_layers_are_routed():
    cfg = dataclasses.replace(MOE_CFG, scan_layers=False, moe_layers="1", num_layers=3)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    assert [b.is_moe for b in model.layers] == [False, True, False]
    assert hasattr(model.layers[0], "gate_proj") and hasattr(model.layers[1], "moe")
    graphdef, state = nnx.split(model)
    _, aux = jax.jit(lambda s, t: nnx.merge(graphdef, s).forward_with_aux(t))(state, _tokens((1, 5)))
    assert aux["expert_counts"].shape == (1, 4)
    assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


EP_MESH = dict(data=2, expert=4)


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_expert_parallel_loss_and_gradients_equal_single_device(dispatch):
    cfg = dataclasses.replace(MOE_CFG, moe_dispatch=dispatch, moe_capacity_factor=1.0)
    mesh = create_mesh(EP_MESH)
    graphdef, params = init_model(cfg, mesh, seed=1)
    graphdef1, params1 = init_model(cfg, None, seed=1)
    gate = nnx.to_pure_dict(params)["layers"]["moe"]["gate_proj"]["kernel"]  # [layers, E, D, F]
    assert gate.sharding.spec == P(None, "expert", None, None)
    assert gate.addressable_shards[0].data.shape == (2, 1, 32, 16)  # one expert per device
    windows = _tokens((8, 17), seed=5)
    grad = jax.jit(jax.value_and_grad(loss_and_metrics, has_aux=True), static_argnums=1)
    (loss, m), grads = grad(params, graphdef, windows)
    (loss1, m1), grads1 = grad(params1, graphdef1, windows)
    np.testing.assert_allclose(loss, loss1, rtol=1e-6)
    np.testing.assert_array_equal(m["expert_counts"], m1["expert_counts"])
    np.testing.assert_allclose(m["dropped_fraction"], m1["dropped_fraction"])
    for g, g1 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads1)):
        np.testing.assert_allclose(g, g1, rtol=1e-5, atol=1e-7)
    if dispatch == "capacity":  # the sharding constraints make XLA exchange tokens between expert devices
        hlo = grad.lower(params, graphdef, windows).compile().as_text()
        assert "all-to-all" in hlo


def test_loss_fn_is_the_objective():
    graphdef, params = nnx.split(Decoder(MOE_CFG, rngs=nnx.Rngs(0)))
    windows = _tokens((2, 9))
    np.testing.assert_allclose(jax.jit(loss_fn, static_argnums=1)(params, graphdef, windows),
                               jax.jit(loss_and_metrics, static_argnums=1)(params, graphdef, windows)[0], rtol=1e-6)


@pytest.mark.slow
def test_moe_training_run_checkpoints_and_resumes(tmp_path, tiny_config):
    """The unchanged loop trains a MoE config, writes routing metrics, and a resumed run equals an uninterrupted one."""
    from llmopt_jax.train.loop import train

    def config(steps):
        c = tiny_config
        c.model.update(dict(num_experts=4, moe_top_k=2, moe_expert_dim=32))
        c.mesh.update(dict(fsdp=1, expert=4, data=2))
        c.train.steps, c.train.checkpoint_every, c.train.progress = steps, 2, False
        c.optim.total_steps, c.optim.warmup_steps = 4, 1  # the same schedule for the 2-step and 4-step runs
        c.train.peak_flops_per_s = 1e12
        return c

    full = train(config(4), str(tmp_path / "full"))
    train(config(2), str(tmp_path / "resumed"))
    resumed = train(config(4), str(tmp_path / "resumed"))
    assert resumed["resumed_from_step"] == 2
    np.testing.assert_allclose(resumed["final_loss"], full["final_loss"], rtol=1e-5)
    records = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert len(records[-1]["expert_counts"]) == 2 and len(records[-1]["expert_counts"][0]) == 4
    assert "load_balance_loss" in records[-1]
    assert full["num_params"] == ModelConfig.from_mapping(tiny_config.model).num_params()


def test_aot_memory_of_the_moe_preset_on_an_expert_mesh():
    """aot_memory handles MoE presets: moe_smoke's train step compiled for 8 fake devices, experts split 8 ways."""
    from conftest import load_config
    from llmopt_jax.train.aot import compile_train_step_abstract

    config = load_config("train", "moe_smoke")
    report = compile_train_step_abstract(config)
    cfg = ModelConfig.from_mapping(config.model)
    assert report["mesh"] == "data=1 fsdp=1 tensor=1 expert=8 stage=1"
    assert report["num_params"] == cfg.num_params()
    experts = 3 * cfg.num_layers * cfg.num_experts * cfg.d_model * cfg.expert_dim
    assert report["param_bytes_per_device"] == 4 * (cfg.num_params() - experts + experts // 8)
    # FLOPs per token count the 2 active experts of 8 (and the router), not all of them.
    assert cfg.matmul_params() < cfg.num_params() - experts // 2


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_kv_cache_decoding_of_a_moe_model_matches_full_forward(dispatch):
    """Serving runs MoE models unchanged: prefill + one-token steps equal the full forward (no token dropped:
    capacity factor E/k gives C = S)."""
    cfg = dataclasses.replace(MOE_CFG, moe_dispatch=dispatch, moe_capacity_factor=2.0)
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    t = _tokens((2, 9), seed=3)
    run = jax.jit(lambda s, t, c: nnx.merge(graphdef, s)(t, cache=c))
    full = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])(state, t)
    cache = nnx.merge(graphdef, state).init_cache(batch=2, max_len=16)
    prefill, cache = run(state, t[:, :5], cache)
    steps = [prefill]
    for i in range(5, 9):
        logits, cache = run(state, t[:, i:i + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)
