"""The PyTorch port of SparseGPT's sequential procedure: its block is our block; it prunes as our engine does."""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from llmopt_jax.compress.calibrate import compress_sequentially, kernel_to_matrix  # noqa: E402
from llmopt_jax.compress.recipe import sparsegpt  # noqa: E402
from llmopt_jax.models.config import ModelConfig  # noqa: E402
from llmopt_jax.models.decoder import Block  # noqa: E402
from llmopt_jax.parallel.sharded_init import init_model  # noqa: E402

CFG = ModelConfig(vocab_size=96, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_seq_len=64,
                  rope_base=100.0)  # a small base so the short windows see many rotations
NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


from benchmarks.baselines import sparsegpt_torch_model as port  # noqa: E402


@pytest.fixture(scope="module")
def model():
    _, params = init_model(CFG, seed=3)
    pure = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
    # Non-trivial norm scales, so a wrong norm would show.
    rng = np.random.default_rng(1)
    for norm in ("attn_norm", "mlp_norm"):
        pure["layers"][norm]["scale"] = rng.uniform(0.5, 1.5, pure["layers"][norm]["scale"].shape).astype(np.float32)
    windows = rng.integers(0, CFG.vocab_size, (8, 32))
    return pure, windows


@pytest.mark.parametrize("interleaved", [False, True])
def test_torch_block_matches_our_block(interleaved):
    cfg = dataclasses.replace(CFG, rope_interleaved=interleaved)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0))))
    # Weights 10x the init's, so attention is far from uniform and the MLP far from linear; norm scales not 1,
    # so a wrong norm would show.
    rng = np.random.default_rng(2)
    params = {name: {"kernel": rng.normal(0, 0.2, state[name]["kernel"].shape).astype(np.float32)} for name in NAMES}
    for norm in ("attn_norm", "mlp_norm"):
        params[norm] = {"scale": rng.uniform(0.5, 1.5, CFG.d_model).astype(np.float32)}
    nnx.replace_by_pure_dict(state, params)
    x = rng.normal(size=(3, 24, CFG.d_model)).astype(np.float32)
    positions = jnp.broadcast_to(jnp.arange(24), (3, 24))
    ours = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, positions)[0])(state, jnp.asarray(x)))

    spec = port.BlockSpec.from_config(cfg)
    rope = port.rope_tables(24, spec.head_dim, spec.rope_base)
    with torch.inference_mode():
        theirs = port.forward_block(port.block_weights(params), torch.from_numpy(x), rope, spec).numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
    # The layouts differ, so the test can tell them apart.
    other = port.BlockSpec.from_config(dataclasses.replace(cfg, rope_interleaved=not interleaved))
    with torch.inference_mode():
        wrong = port.forward_block(port.block_weights(params), torch.from_numpy(x), rope, other).numpy()
    assert np.abs(wrong - ours).max() > 1e-2


def test_stacked_and_listed_layers_give_the_same_result(model):
    pure, windows = model
    stacked, report = port.prune_model_torch(CFG, pure, windows[:4, :16], batch_size=3)
    listed_in = {**pure, "layers": {i: jax.tree.map(lambda a: a[i], pure["layers"]) for i in range(CFG.num_layers)}}
    listed, _ = port.prune_model_torch(dataclasses.asdict(CFG), listed_in, windows[:4, :16], batch_size=3)
    assert set(listed["layers"]) == {0, 1}
    for i in range(CFG.num_layers):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6),
                     stacked["layers"], listed["layers"][i])
    assert set(report) >= {"seconds", "seconds_forward", "seconds_stats", "seconds_solve"}
    assert len(report["layers"]) == 7 * CFG.num_layers
    np.testing.assert_array_equal(stacked["embed"]["embedding"], pure["embed"]["embedding"])


def test_torch_port_prunes_as_our_engine(model):
    pure, windows = model
    theirs, report_t = port.prune_model_torch(CFG, pure, windows, sparsity=0.5, batch_size=3, threads=1)
    ours, report = compress_sequentially(CFG, pure, windows, sparsegpt(sparsity=0.5), batch_size=3, progress=False)
    agree = total = 0
    for i in range(CFG.num_layers):
        for name in NAMES:
            a = np.asarray(ours["layers"][name]["kernel"][i])
            b = theirs["layers"][name]["kernel"][i]
            assert b.dtype == np.float32 and b.shape == a.shape
            assert np.mean(a == 0) == 0.5 and np.mean(b == 0) == 0.5, (i, name)
            keep, keep_t = report["masks"]["layers"][name]["kernel"][i], report_t["masks"]["layers"][name]["kernel"][i]
            assert (b[~keep_t] == 0).all()
            agree += int(np.sum(keep == keep_t))
            total += keep.size
    assert agree / total > 0.95, agree / total
    for r, r_t in zip(report["layers"], report_t["layers"]):
        assert (r.block, r.name) == (r_t["block"], r_t["name"])
        assert abs(r.relative_error - r_t["relative_error"]) <= 0.03 * r.relative_error, (r, r_t)
    # Both prune the same [outputs, inputs] matrices (o_proj's kernel has two input dims).
    np.testing.assert_array_equal(
        port.kernel_to_matrix("o_proj", pure["layers"]["o_proj"]["kernel"][0]).numpy(),
        np.asarray(kernel_to_matrix("o_proj", pure["layers"]["o_proj"]["kernel"][0])))
