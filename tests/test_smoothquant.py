"""SmoothQuant W8A8: smoothing keeps the float function, the int8 matmul matches a NumPy simulation, and
smoothing lowers the error when a few input channels carry outliers."""

import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY_CFG
from llmopt_jax.compress.calibrate import compress_sequentially, kernel_to_matrix
from llmopt_jax.compress.packed import pack_matrix
from llmopt_jax.compress.quantize import QuantGrid, rtn_quantize
from llmopt_jax.compress.smoothquant import smooth_block, smoothing_factors, smoothquant_w8a8, w8a8_dot_general
from llmopt_jax.errors import ConfigError
from llmopt_jax.models.decoder import Block
from llmopt_jax.parallel.sharded_init import init_model, load_params

CFG = dataclasses.replace(TINY_CFG, scan_layers=False)


def np_w8a8(x, w):
    """Per-token int8 activations x per-channel int8 weights (symmetric, codes -128..127), in float64."""
    sx = np.abs(x).max(-1, keepdims=True) / 127
    xq = np.round(x / sx)
    m = np.take_along_axis(w, np.abs(w).argmax(0)[None], 0)  # signed max per output column
    sw = (m / -128).astype(np.float16).astype(np.float64)
    wq = np.clip(np.round(w / sw), -128, 127)
    return (xq @ wq) * sx * sw


def test_w8a8_matmul_matches_numpy_simulation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    kernel = rng.standard_normal((64, 24)).astype(np.float32)
    _, qm = rtn_quantize(kernel_to_matrix("q_proj", kernel), QuantGrid(8, symmetric=True))
    packed = pack_matrix(qm, (64, 24))
    got = w8a8_dot_general(jnp.asarray(x), packed, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np_w8a8(x.astype(np.float64), kernel.astype(np.float64)),
                               rtol=1e-5, atol=1e-5)


def test_w8a8_refuses_other_formats():
    _, qm = rtn_quantize(np.ones((8, 16), np.float32), QuantGrid(4, symmetric=True))
    with pytest.raises(ConfigError, match="8-bit symmetric per-channel"):
        w8a8_dot_general(jnp.ones((2, 16)), pack_matrix(qm, (16, 8)), (((1,), (0,)), ((), ())))


def test_smoothing_factors_formula_and_alpha_range():
    a, w = np.array([4.0, 1.0, 0.0]), np.array([1.0, 4.0, 2.0])
    np.testing.assert_allclose(np.asarray(smoothing_factors(a, w, 0.5)), [2.0, 0.5, 1.0])
    with pytest.raises(ConfigError, match="alpha must be in"):
        smoothing_factors(a, w, 1.5)


def test_smoothing_keeps_the_block_function():
    graphdef, params = init_model(CFG, seed=2)
    block = nnx.to_pure_dict(params)["layers"][0]
    rng = np.random.default_rng(1)
    act_max = {"attn_in": rng.uniform(0.1, 20, 32), "mlp_in": rng.uniform(0.1, 20, 32),
               "mlp_out": rng.uniform(0.1, 20, 64)}
    smoothed, factors = smooth_block(block, act_max, 0.5)
    assert not np.allclose(factors["attn_in"], 1.0)
    g, abstract = nnx.split(nnx.eval_shape(lambda: Block(CFG, rngs=nnx.Rngs(0))))
    x = jnp.asarray(rng.standard_normal((2, 8, 32)), jnp.float32)

    def run(pure):
        state = jax.tree.map(lambda a: a, abstract)
        nnx.replace_by_pure_dict(state, pure)
        return nnx.merge(g, state)(x, jnp.broadcast_to(jnp.arange(8), (2, 8)))[0]

    np.testing.assert_allclose(np.asarray(run(smoothed)), np.asarray(run(block)), rtol=1e-4, atol=1e-5)


def outlier_model():
    """The tiny model with a few hugely scaled embedding channels: outliers in every block's inputs."""
    graphdef, params = init_model(CFG, seed=4)
    pure = nnx.to_pure_dict(params)
    pure["embed"]["embedding"] = np.asarray(pure["embed"]["embedding"]) * np.where(np.arange(32) < 3, 40.0, 1.0)
    graphdef, params = load_params(CFG, pure)
    return SimpleNamespace(cfg=CFG, graphdef=graphdef, params=params)


def test_smoothing_lowers_w8a8_error_with_outlier_channels():
    model = outlier_model()
    windows = np.random.default_rng(0).integers(0, CFG.vocab_size, (8, 16))
    want, _ = nnx.merge(model.graphdef, model.params)(jnp.asarray(windows))
    errors = {}
    for smooth in (False, True):
        graphdef, params, pure, report = smoothquant_w8a8(model, windows, 0.5, batch_size=4, smooth=smooth)
        got, _ = nnx.merge(graphdef, params)(jnp.asarray(windows))
        errors[smooth] = float(jnp.mean((got - want) ** 2))
        assert len(report["smoothing"]) == (CFG.num_layers if smooth else 0)
    assert errors[True] < 0.7 * errors[False]


def test_abs_max_statistics_are_the_largest_input_magnitudes():
    model = outlier_model()
    windows = np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 8))
    _, report = compress_sequentially(CFG, model.params, windows, lambda w, s: (w, {}), batch_size=2,
                                      progress=False, keep_abs_max=True)
    assert len(report["abs_max"]) == CFG.num_layers
    first = report["abs_max"][0]
    assert first["attn_in"].shape == (32,) and first["mlp_out"].shape == (64,)
    assert np.all(first["attn_in"] > 0)
