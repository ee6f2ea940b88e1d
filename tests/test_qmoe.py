"""QMoE's expert-batched GPTQ: the vmapped solve equals one GPTQ per expert, experts without tokens fall back to
RTN, per-expert Hessians come from the routed tokens only, and the sequential pass beats RTN on a tiny MoE."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmopt_jax.compress.qmoe import _accumulate, gptq_experts, quantize_experts, rtn_experts
from llmopt_jax.compress.quantize import QuantGrid, gptq_quantize, rtn_quantize
from llmopt_jax.models.config import ModelConfig
from llmopt_jax.parallel.sharded_init import init_model, load_params

GRID = QuantGrid(2, group_size=-1)
CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_seq_len=64,
                  num_experts=4, moe_top_k=2, moe_expert_dim=16)


def test_batched_solve_equals_one_gptq_per_expert_and_empty_experts_use_rtn():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 8, 16)).astype(np.float32)
    x = rng.standard_normal((3, 40, 16)).astype(np.float32)
    h = 2 * np.einsum("eni,enj->eij", x, x) / 40
    counts = jnp.asarray([40.0, 0.0, 40.0])
    q = gptq_experts(jnp.asarray(w), jnp.asarray(h), counts, GRID, blocksize=8, damp_fraction=0.1)
    for e in (0, 2):
        _, single = gptq_quantize(w[e], h[e], GRID, blocksize=8, damp_fraction=0.1)
        np.testing.assert_array_equal(q.codes[e], single.codes)
        np.testing.assert_array_equal(q.scale[e], single.scale)
    _, nearest = rtn_quantize(w[1], GRID)
    np.testing.assert_array_equal(q.codes[1], nearest.codes)
    np.testing.assert_array_equal(rtn_experts(jnp.asarray(w), GRID).codes[1], nearest.codes)


def test_statistics_count_routed_tokens_and_respect_the_cap():
    x = jnp.zeros((2, 1, 4, 3)).at[0, 0, :3].set(1.0).at[1, 0, 0].set(2.0)  # expert 0: 3 tokens, expert 1: 1
    xtx, count = _accumulate(jnp.zeros((2, 3, 3)), jnp.zeros(2), x, float("inf"))
    np.testing.assert_array_equal(count, [3, 1])
    np.testing.assert_allclose(xtx[1], 4.0 * np.ones((3, 3)))
    _, capped = _accumulate(jnp.zeros((2, 3, 3)), jnp.zeros(2), x, 2.0)
    np.testing.assert_array_equal(capped, [2, 1])


def _outputs(cfg, pure, tokens):
    graphdef, params = load_params(cfg, pure)
    return jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])(params, tokens)


def test_sequential_gptq_beats_rtn_and_touches_only_experts():
    cfg = dataclasses.replace(CFG, moe_dispatch="dropless")
    _, params = init_model(cfg, seed=0)
    pure = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
    windows = np.random.default_rng(1).integers(0, 64, (8, 24)).astype(np.int32)
    gptq, report = quantize_experts(cfg, pure, windows, GRID, batch_size=4, progress=False)
    rtn, _ = quantize_experts(cfg, pure, None, GRID, method="rtn", progress=False)
    assert len(report["tokens_per_expert"]) == 2 and float(report["tokens_per_expert"][0].sum()) == 8 * 24 * 2
    for key in ("q_proj", "attn_norm"):
        np.testing.assert_array_equal(gptq["layers"][key]["kernel" if key == "q_proj" else "scale"],
                                      pure["layers"][key]["kernel" if key == "q_proj" else "scale"])
    np.testing.assert_array_equal(gptq["layers"]["moe"]["router"], pure["layers"]["moe"]["router"])
    levels = np.unique(gptq["layers"]["moe"]["gate_proj"]["kernel"][0, 0, :, 0])
    assert len(levels) <= 4  # 2 bits per output row
    tokens = jnp.asarray(windows[:4])
    ref = _outputs(cfg, pure, tokens)
    err_gptq = float(jnp.mean((_outputs(cfg, gptq, tokens) - ref) ** 2))
    err_rtn = float(jnp.mean((_outputs(cfg, rtn, tokens) - ref) ** 2))
    assert err_gptq < err_rtn


@pytest.mark.parametrize("grid,codec,scan_layers", [(QuantGrid(2, ternary=True), "ans", True),
                                                    (QuantGrid(2, ternary=True), "dictionary", False),
                                                    (GRID, "", True)])
def test_model_runs_from_packed_experts_and_equals_the_dequantized_model(grid, codec, scan_layers):
    from llmopt_jax.compress.packed import packed_model
    from llmopt_jax.compress.qmoe import expert_storage, pack_experts

    cfg = dataclasses.replace(CFG, scan_layers=scan_layers, moe_dispatch="dropless")
    _, params = init_model(cfg, seed=0)
    pure = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
    windows = np.random.default_rng(1).integers(0, 64, (4, 24)).astype(np.int32)
    deq, report = quantize_experts(cfg, pure, windows, grid, batch_size=4, progress=False)
    packed = pack_experts(cfg, deq, report, codec=codec or "ans")
    storage = expert_storage(packed)
    assert storage["expert_params"] == 2 * 3 * 4 * 32 * 16
    if codec == "ans":
        assert storage["bits_per_expert_param"] < 8  # codes, offsets and levels of tiny 16- and 32-wide rows
    elif not grid.ternary:  # 2-bit codes plus a float16 scale and a uint8 zero-point per row
        rows = 2 * 4 * (16 + 16 + 32)
        assert storage["expert_bytes"] == 2 * 3 * 4 * 32 * 16 // 4 + 3 * rows
    graphdef, state = packed_model(cfg, packed)
    tokens = jnp.asarray(windows)
    got = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])(state, tokens)
    np.testing.assert_allclose(got, _outputs(cfg, deq, tokens), rtol=2e-5, atol=2e-5)
    for dispatch in ("capacity",):  # the einsum path multiplies through the injected dot_general
        c = dataclasses.replace(cfg, moe_dispatch=dispatch, moe_capacity_factor=2.0)
        g, s = packed_model(c, packed)
        np.testing.assert_allclose(jax.jit(lambda p, t: nnx.merge(g, p)(t)[0])(s, tokens), _outputs(c, deq, tokens),
                                   rtol=2e-5, atol=2e-5)
