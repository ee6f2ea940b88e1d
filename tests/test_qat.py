"""Quantization-aware training: fake quantization equals RTN forward, passes gradients straight through, and
plugs into the training loop by config."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_cli
from llmopt_jax.compress.qat import FakeQuantDotGeneral, fake_quantize
from llmopt_jax.compress.quantize import QuantGrid, rtn_quantize


@pytest.mark.parametrize("grid", [QuantGrid(3), QuantGrid(4, 16, symmetric=True)])
def test_fake_quantize_forward_is_rtn_and_backward_is_identity(grid):
    w = jnp.asarray(np.random.default_rng(0).standard_normal((8, 32)), jnp.float32)
    # w + (q - w) is q up to one float rounding
    np.testing.assert_allclose(np.asarray(fake_quantize(w, grid)), np.asarray(rtn_quantize(w, grid)[0]), atol=1e-6)
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal((8, 32)), jnp.float32)
    grad = jax.grad(lambda w: jnp.sum(fake_quantize(w, grid) * cotangent))(w)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(cotangent))


def test_fake_quant_dot_general_quantizes_the_kernel_along_its_inputs():
    rng = np.random.default_rng(2)
    kernel = jnp.asarray(rng.standard_normal((4, 8, 16)), jnp.float32)  # [heads, head_dim, out] like o_proj
    x = jnp.asarray(rng.standard_normal((3, 4, 8)), jnp.float32)
    dims = (((1, 2), (0, 1)), ((), ()))
    grid = QuantGrid(4, 16)
    got = FakeQuantDotGeneral(grid)(x, kernel, dims)
    w_hat, _ = rtn_quantize(kernel.reshape(32, 16).T, grid)
    want = jax.lax.dot_general(x, w_hat.T.reshape(kernel.shape), dims)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert hash(FakeQuantDotGeneral(grid)) == hash(FakeQuantDotGeneral(QuantGrid(4, 16)))


def test_train_loop_runs_quantization_aware(tmp_path):
    proc = run_cli(["experiments.train", "--config=configs/train.py:tiny", "--config.qat.bits=4",
                    "--config.qat.group_size=16", "--config.train.progress=False", f"--workdir={tmp_path}/qat"],
                   fast_compile=True)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "qat" / "results.json").read_text())
    assert results["steps"] == 20 and results["final_loss"] < results["initial_loss"]
