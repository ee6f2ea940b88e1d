"""Optimizer, gradient accumulation, data iterator, checkpoints, metrics log."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from llmopt_jax.data.text import ByteTokenizer, WindowBatches, default_text, load_texts, sample_windows, token_windows
from llmopt_jax.errors import ConfigError, DataError
from llmopt_jax.models.config import ModelConfig
from llmopt_jax.parallel.mesh import create_mesh
from llmopt_jax.train.checkpoint import Checkpointer
from llmopt_jax.train.metrics import MetricsLog, model_flops_utilization
from llmopt_jax.train.optim import decay_mask, learning_rate_schedule, make_optimizer
from llmopt_jax.train.step import init_train_state, jit_train_step

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48)
OPTIM = dict(learning_rate=1e-2, warmup_steps=2, total_steps=10, final_lr_fraction=0.1)


def single_mesh():
    return create_mesh(dict(data=1), jax.devices()[:1])


def test_schedule_warms_up_then_decays_to_fraction():
    schedule = learning_rate_schedule(OPTIM)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(schedule(2), 1e-2, rtol=1e-6)
    np.testing.assert_allclose(schedule(10), 1e-3, rtol=1e-5)
    assert float(schedule(5)) < float(schedule(3))


def test_schedule_rejects_warmup_past_total():
    with pytest.raises(ConfigError, match="warmup_steps"):
        learning_rate_schedule(dict(OPTIM, warmup_steps=10))


def test_weight_decay_skips_norm_scales():
    mesh = single_mesh()
    _, state, _ = init_train_state(CFG, make_optimizer(OPTIM), mesh)
    mask = nnx.to_pure_dict(decay_mask(state["params"]))
    assert mask["final_norm"]["scale"] is False
    assert mask["layers"]["attn_norm"]["scale"] is False
    assert mask["layers"]["q_proj"]["kernel"] is True
    assert mask["embed"]["embedding"] is True


def test_gradient_accumulation_equals_one_big_batch():
    optimizer = make_optimizer(OPTIM)
    mesh = single_mesh()
    batch = np.random.default_rng(0).integers(0, 64, (4, 17)).astype(np.int32)
    finals = []
    for accum in (1, 2, 4):
        graphdef, state, shardings = init_train_state(CFG, optimizer, mesh, seed=0)
        step = jit_train_step(graphdef, optimizer, shardings, mesh)
        for _ in range(2):
            state, metrics = step(state, batch.reshape(accum, 4 // accum, 17))
        finals.append((float(metrics["loss"]), nnx.to_pure_dict(state["params"])))
    for loss, params in finals[1:]:
        np.testing.assert_allclose(loss, finals[0][0], rtol=1e-5)
        # Adam normalises each update by sqrt(v), which magnifies float32 summation-order noise in
        # near-zero gradients; 1e-5 is still 1000x below the learning rate's step size.
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(finals[0][1])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "naïve café – ünïcode ✓"
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < 256


def test_default_text_is_pydoc_topics():
    text = default_text()
    assert len(text) > 100_000 and "for" in text


def test_load_texts_errors(tmp_path):
    with pytest.raises(DataError, match="not found: .*missing.txt"):
        load_texts(str(tmp_path / "missing.txt"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9")
    with pytest.raises(DataError, match="not UTF-8"):
        load_texts(str(bad))
    good = tmp_path / "a.txt"
    good.write_text("hello")
    assert load_texts(f"{good},{good}") == "hello\n\nhello"


def test_windows_and_calibration_sampling():
    tokens = np.arange(103)
    w = token_windows(tokens, 10)
    assert w.shape == (10, 10) and w[3, 0] == 30
    with pytest.raises(DataError, match="fewer than one window"):
        token_windows(np.arange(5), 10)
    s1, s2 = sample_windows(tokens, 4, 10, seed=7), sample_windows(tokens, 4, 10, seed=7)
    np.testing.assert_array_equal(s1, s2)
    assert all(np.all(np.diff(row) == 1) for row in s1)


def test_window_batches_are_seeded_and_resumable():
    tokens = np.arange(1000, dtype=np.int32)
    a = WindowBatches(tokens, seq_len=9, batch_size=4, seed=5)
    taken = [a.next() for _ in range(7)]
    position = a.position()
    rest = [a.next() for _ in range(30)]  # 25 batches per epoch: crosses an epoch boundary
    b = WindowBatches(tokens, seq_len=9, batch_size=4, seed=5)
    b.restore(position)
    for x, y in zip(rest, [b.next() for _ in range(30)]):
        np.testing.assert_array_equal(x, y)
    c = WindowBatches(tokens, seq_len=9, batch_size=4, seed=5)
    np.testing.assert_array_equal(c.next(), taken[0])
    assert not np.array_equal(WindowBatches(tokens, 9, 4, seed=6).next(), taken[0])
    # every window once per epoch
    d = WindowBatches(tokens, seq_len=9, batch_size=4, seed=1)
    epoch = np.concatenate([d.next() for _ in range(d.batches_per_epoch)])
    assert len({row[0] for row in epoch}) == 100
    with pytest.raises(DataError, match="does not match"):
        WindowBatches(tokens[:500], 9, 4, seed=5).restore(position)


def test_checkpoint_round_trip_keeps_values_and_shardings(tmp_path):
    optimizer = make_optimizer(OPTIM)
    mesh = create_mesh(dict(data=2, fsdp=2, tensor=2))
    graphdef, state, shardings = init_train_state(CFG, optimizer, mesh, seed=0)
    step = jit_train_step(graphdef, optimizer, shardings, mesh)
    state, _ = step(state, np.ones((1, 8, 9), np.int32))
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1, keep=2)
    ckpt.maybe_save(1, state, {"epoch": 0, "index": 1})
    ckpt.wait()
    assert ckpt.latest_step() == 1
    _, fresh, _ = init_train_state(CFG, optimizer, mesh, seed=1)
    restored, position = ckpt.restore(1, fresh)
    assert position == {"epoch": 0, "index": 1}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
        assert a.sharding == b.sharding
    ckpt.close()


def test_checkpoint_keeps_last_n(tmp_path):
    state = {"x": np.zeros(3, np.float32)}
    ckpt = Checkpointer(str(tmp_path / "c"), save_every=2, keep=2, async_save=False)
    for step in range(1, 9):
        ckpt.maybe_save(step, state, {"epoch": 0, "index": step})
    ckpt.close()
    assert sorted(int(d) for d in os.listdir(tmp_path / "c") if d.isdigit()) == [6, 8]


def test_metrics_log_truncates_steps_after_resume_point(tmp_path):
    log = MetricsLog(str(tmp_path / "m.jsonl"))
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
    log.truncate_after(3)
    assert [r["step"] for r in log.read()] == [1, 2, 3]
    assert json.loads(open(tmp_path / "m.jsonl").readline())["step"] == 1


def test_mfu_and_flops_per_token():
    assert model_flops_utilization(100.0, 1e9, 1e12) == pytest.approx(0.1)
    assert model_flops_utilization(100.0, 1e9, 0.0) == 0.0
    seq = 16
    expected = 6 * CFG.matmul_params() + 12 * CFG.num_layers * CFG.num_heads * CFG.head_dim * seq
    assert CFG.train_flops_per_token(seq) == expected


def test_offloaded_optimizer_state_and_activations_train_identically(tmp_path):
    """Optimizer state in host memory (pinned_host) and offloaded remat give the same steps as plain training;
    the offloaded state checkpoints and restores into host memory."""
    import dataclasses

    optimizer = make_optimizer(OPTIM)
    mesh = create_mesh(dict(fsdp=2), jax.devices()[:2])
    batch = np.random.default_rng(0).integers(0, 64, (1, 8, 17)).astype(np.int32)
    runs = {}
    for name, cfg, offload in (("plain", CFG, False), ("optimizer", CFG, True),
                               ("activations", dataclasses.replace(CFG, remat="offload_dots_no_batch"), False)):
        graphdef, state, shardings = init_train_state(cfg, optimizer, mesh, seed=0, offload_optimizer=offload)
        kinds = {leaf.sharding.memory_kind for leaf in jax.tree.leaves(state["opt_state"])}
        assert kinds == ({"pinned_host"} if offload else {"device"})
        step = jit_train_step(graphdef, optimizer, shardings, mesh)
        losses = []
        for _ in range(3):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        assert {leaf.sharding.memory_kind for leaf in jax.tree.leaves(state["opt_state"])} == kinds
        runs[name] = (losses, state)
    for name in ("optimizer", "activations"):
        np.testing.assert_allclose(runs[name][0], runs["plain"][0], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(runs[name][1]["params"]), jax.tree.leaves(runs["plain"][1]["params"])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # Adam magnifies summation-order noise
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1, keep=1, async_save=False)
    ckpt.maybe_save(3, runs["optimizer"][1], {"epoch": 0, "index": 3})
    _, fresh, _ = init_train_state(CFG, optimizer, mesh, seed=1, offload_optimizer=True)
    restored, _ = ckpt.restore(3, fresh)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(runs["optimizer"][1])):
        np.testing.assert_array_equal(a, b)
        assert a.sharding.memory_kind == b.sharding.memory_kind
    ckpt.close()
