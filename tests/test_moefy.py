"""MoEfication: balanced clustering, dense == MoE at top-k = E, routers, MoE export (safetensors in Mixtral's
layout, GGUF with llama.cpp's MoE names) and the experiments.moefy contract on the real model (slow)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY_CFG, run_cli
from llmopt_jax.compress.moefy import balanced_clusters, mlp_flops_fraction, moefy, with_top_k
from llmopt_jax.parallel.sharded_init import init_model, load_params


def test_balanced_clusters_recover_planted_groups():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((4, 50))
    truth = np.repeat(np.arange(4), 6)
    feats = base[truth] + 0.3 * rng.standard_normal((24, 50))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    assign = balanced_clusters(feats[rng.permutation(24)], 4)
    assert np.bincount(assign).tolist() == [6, 6, 6, 6]
    assign = balanced_clusters(feats, 4)
    for c in range(4):  # each planted group lands in one cluster
        assert len(set(assign[truth == c])) == 1


def _logits(cfg, pure, tokens):
    graphdef, params = load_params(cfg, pure)
    return jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])(params, tokens)


@pytest.fixture(scope="module")
def moefied():
    cfg = TINY_CFG
    _, params = init_model(cfg, seed=0)
    pure = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
    windows = np.random.default_rng(1).integers(0, cfg.vocab_size, (8, 32)).astype(np.int32)
    moe_cfg, moe_pure, report = moefy(cfg, pure, windows, 4, 4, batch_size=4, progress=False)
    return cfg, pure, moe_cfg, moe_pure, report


def test_top_k_equal_to_num_experts_is_the_dense_model(moefied):
    cfg, pure, moe_cfg, moe_pure, report = moefied
    assert moe_cfg.num_experts == 4 and moe_cfg.expert_dim == cfg.mlp_dim // 4 and moe_cfg.moe_gating == "unit"
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 16)), jnp.int32)
    dense = _logits(cfg, pure, tokens)
    np.testing.assert_allclose(_logits(moe_cfg, moe_pure, tokens), dense, rtol=1e-5, atol=1e-5)
    fewer = _logits(with_top_k(moe_cfg, 2), moe_pure, tokens)
    assert float(jnp.max(jnp.abs(fewer - dense))) > 1e-4  # half the experts: an approximation
    assert moe_pure["layers"]["moe"]["router"].shape == (cfg.num_layers, cfg.d_model, 4)
    assert len(report.router_top1_accuracy) == cfg.num_layers and all(0 <= a <= 1 for a in report.router_top1_accuracy)
    assert mlp_flops_fraction(with_top_k(moe_cfg, 1)) == pytest.approx(0.25 + 1 / (3 * 16))


def test_moe_saves_and_reloads_as_safetensors_and_gguf(moefied, tmp_path):
    from llmopt_jax.io.gguf import config_from_gguf, params_from_gguf, read_gguf
    from llmopt_jax.io.gguf_write import write_gguf
    from llmopt_jax.io.safetensors import read_hf_checkpoint, write_hf_checkpoint

    _, _, moe_cfg, moe_pure, _ = moefied
    write_hf_checkpoint(str(tmp_path / "st"), moe_cfg, moe_pure)
    config = json.load(open(tmp_path / "st" / "config.json"))
    assert config["num_local_experts"] == 4 and config["num_experts_per_tok"] == 4 and config["moe_gating"] == "unit"
    assert config["intermediate_size"] == moe_cfg.expert_dim
    cfg2, pure2 = read_hf_checkpoint(str(tmp_path / "st"))
    assert cfg2 == moe_cfg
    write_gguf(str(tmp_path / "m.gguf"), moe_cfg, moe_pure)
    f = read_gguf(str(tmp_path / "m.gguf"))
    assert f.metadata["llama.expert_count"] == 4 and f.metadata["llama.expert_used_count"] == 4
    assert f.tensor("blk.0.ffn_gate_exps.weight").shape == (4, moe_cfg.expert_dim, moe_cfg.d_model)
    cfg3 = config_from_gguf(f)
    pure3 = params_from_gguf(f, cfg3)
    assert (cfg3.num_experts, cfg3.moe_top_k, cfg3.moe_gating, cfg3.expert_dim) == (4, 4, "unit", moe_cfg.expert_dim)
    flat = dict(jax.tree_util.tree_flatten_with_path(moe_pure)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(pure2)[0]:
        np.testing.assert_array_equal(leaf, flat[path])
    for path, leaf in jax.tree_util.tree_flatten_with_path(pure3)[0]:
        if "q_proj" in str(path) or "k_proj" in str(path):
            continue  # GGUF stores q/k in the interleaved rotary layout (a permutation, tested in test_gguf_write)
        np.testing.assert_array_equal(leaf, flat[path])


def test_unrolled_layers_keep_their_layout(moefied):
    cfg, pure, _, _, _ = moefied
    unrolled_cfg = dataclasses.replace(cfg, scan_layers=False)
    unrolled = {**pure, "layers": {i: jax.tree.map(lambda a: a[i], pure["layers"]) for i in range(cfg.num_layers)}}
    windows = np.random.default_rng(1).integers(0, cfg.vocab_size, (4, 16)).astype(np.int32)
    moe_cfg, moe_pure, _ = moefy(unrolled_cfg, unrolled, windows, 2, 1, batch_size=4, iterations=2, progress=False)
    assert set(moe_pure["layers"]) == {0, 1} and moe_pure["layers"][0]["moe"]["gate_proj"]["kernel"].shape == (
        2, cfg.d_model, cfg.mlp_dim // 2)
    _logits(moe_cfg, moe_pure, jnp.asarray(windows))  # runs


@pytest.mark.slow
def test_moefy_cli_top_k_equal_num_experts_matches_dense_and_model_reloads(tmp_path):
    """The contract on the real SmolLM2 (first 2 blocks): top-k = E gives the dense perplexity, WORKDIR/model
    loads in experiments.perplexity with the same perplexity."""
    text = tmp_path / "t.txt"
    from llmopt_jax.data.text import python_license_text

    text.write_text(python_license_text())
    work = tmp_path / "w"
    r = run_cli(["experiments.moefy", "--config=configs/moefy.py:smoke", "--config.num_experts=8", "--config.top_k=8",
                 f"--config.eval.text_file={text}", "--config.progress=False", "--config.save_gguf=True",
                 f"--workdir={work}"])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(work / "results.json"))
    assert abs(res["perplexity"] / res["dense_perplexity"] - 1) < 1e-4
    assert res["num_eval_tokens"] == 2 * 127 and res["mlp_flops_fraction"] > 1.0  # all experts + the router
    assert os.path.isfile(work / "model.gguf")
    ppl = tmp_path / "p"
    r = run_cli(["experiments.perplexity", "--config=configs/perplexity.py:smoke", f"--config.model={work}/model",
                 f"--config.eval.text_file={text}", "--config.eval.seq_len=128", "--config.eval.max_windows=2",
                 "--config.progress=False", f"--workdir={ppl}"])
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.load(open(ppl / "results.json"))
    assert abs(again["perplexity"] / res["perplexity"] - 1) < 1e-4
    r = run_cli(["experiments.moefy", "--config=configs/moefy.py:smoke", "--config.top_k=9", f"--workdir={tmp_path / 'x'}"])
    assert r.returncode == 2 and "top_k=9" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in r.stderr
