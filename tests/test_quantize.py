"""Quantization grids, RTN and GPTQ against a plain NumPy re-derivation; error paths."""

import numpy as np
import pytest

from llmopt_jax.compress.quantize import QuantGrid, fit_grid, gptq_quantize, rtn_quantize
from llmopt_jax.errors import ConfigError


def np_fit(groups, grid):
    """Reference grid parameters of each row of ``groups`` [..., width] (float16-rounded)."""
    lo, hi = grid.levels
    if grid.symmetric:
        idx = np.argmax(np.abs(groups), axis=-1)
        scale = np.take_along_axis(groups, idx[..., None], -1)[..., 0] / lo
        offset = np.zeros_like(scale)
    else:
        scale, offset = (groups.max(-1) - groups.min(-1)) / hi, groups.min(-1)
    return scale.astype(np.float16).astype(np.float32), offset.astype(np.float16).astype(np.float32)


def np_round(x, scale, offset, grid):
    lo, hi = grid.levels
    safe = np.where(scale == 0, 1.0, scale)
    return scale * np.clip(np.round((x - offset) / safe), lo, hi) + offset


def np_gptq(w, h, grid, damp=0.01, act_order=False):
    """Column-at-a-time GPTQ with the full inverse Hessian (no blocks, no lazy updates)."""
    w = w.astype(np.float64).copy()
    rows, cols = w.shape
    width = cols if grid.group_size <= 0 else grid.group_size
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(cols)
    static = act_order or grid.group_size <= 0
    if static:
        scale, offset = np_fit(w.reshape(rows, cols // width, width).astype(np.float32), grid)
    else:
        scale, offset = np.zeros((2, rows, cols // width), np.float32)
    w, hp = w[:, perm], h[np.ix_(perm, perm)].astype(np.float64)
    hp = hp + damp * np.mean(np.diag(hp)) * np.eye(cols)
    hinv = np.linalg.inv(hp)
    u = np.linalg.cholesky(hinv).T  # upper, uᵀu = H⁻¹
    q = np.zeros_like(w)
    for j in range(cols):
        g = perm[j] // width
        if not static and j % width == 0:
            s, o = np_fit(w[:, j : j + width].astype(np.float32), grid)
            scale[:, g], offset[:, g] = s, o
        q[:, j] = np_round(w[:, j], scale[:, g], offset[:, g], grid)
        err = (w[:, j] - q[:, j]) / u[j, j]
        w[:, j + 1 :] -= np.outer(err, u[j, j + 1 :])
    out = np.empty_like(q)
    out[:, perm] = q
    return out


def problem(rows=24, cols=64, tokens=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, cols)) * rng.uniform(0.2, 3.0, cols)  # uneven input scales
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    return w, (2 * x.T @ x / tokens).astype(np.float32)


def rel_error(w, q, h):
    d = w - q
    return np.sum((d @ h) * d) / np.sum((w @ h) * w)


@pytest.mark.parametrize("grid", [QuantGrid(4), QuantGrid(3, symmetric=True), QuantGrid(2, 16),
                                  QuantGrid(8, 32, symmetric=True), QuantGrid(4, per_tensor=True)])
def test_rtn_matches_numpy(grid):
    w, _ = problem()
    got, qm = rtn_quantize(w, grid)
    rows, cols = w.shape
    width = rows * cols if grid.per_tensor else (cols if grid.group_size <= 0 else grid.group_size)
    s, o = np_fit(w.reshape(-1, width), grid)
    expected = np_round(w.reshape(-1, width), s[:, None], o[:, None], grid).reshape(rows, cols)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)
    lo, hi = grid.levels
    codes = np.asarray(qm.codes).astype(int)
    assert codes.min() >= lo and codes.max() <= hi
    assert len(np.unique(codes)) > (hi - lo) // 2  # the grid's levels are used
    np.testing.assert_array_equal(np.asarray(qm.dequantize()), np.asarray(got))


def test_symmetric_grid_keeps_zeros_and_uses_every_level():
    w, _ = problem()
    w[:, ::3] = 0.0
    got, qm = rtn_quantize(w, QuantGrid(4, 32, symmetric=True))
    assert np.all(np.asarray(got)[:, ::3] == 0)
    assert set(np.unique(np.asarray(qm.codes))) == set(range(-8, 8))


def test_asymmetric_grid_reproduces_values_already_on_it():
    """Values that lie on a Q4_1-style grid (d·q + m per group of 32) come back unchanged."""
    rng = np.random.default_rng(1)
    d = rng.uniform(0.01, 0.1, (8, 4, 1)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-1, 0, (8, 4, 1)).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (8, 4, 32))
    q[..., 0], q[..., 1] = 0, 15  # each group spans the full range, as llama.cpp's quantizer makes it
    w = (d * q + m).reshape(8, 128).astype(np.float32)
    got, qm = rtn_quantize(w, QuantGrid(4, 32))
    np.testing.assert_array_equal(np.asarray(qm.codes).reshape(8, 4, 32), q)
    np.testing.assert_allclose(np.asarray(got), w, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "grid, act_order",
    [(QuantGrid(4), False), (QuantGrid(3), True), (QuantGrid(3, 16), False), (QuantGrid(2, 16, symmetric=True), True),
     (QuantGrid(4, 32, symmetric=True), False)],
)
def test_gptq_matches_numpy(grid, act_order):
    w, h = problem()
    got, qm = gptq_quantize(w, h, grid, blocksize=16, act_order=act_order)
    expected = np_gptq(w, h, grid, act_order=act_order)
    got = np.asarray(got)
    # Float32 vs float64 can flip a rounding that then propagates: compare the bulk and the objective.
    assert np.mean(np.isclose(got, expected, rtol=1e-4, atol=1e-5)) > 0.99
    assert rel_error(w, got, h) == pytest.approx(rel_error(w, expected, h), rel=1e-3)
    np.testing.assert_allclose(np.asarray(qm.dequantize()), got, rtol=0, atol=1e-6)


@pytest.mark.parametrize("grid", [QuantGrid(3), QuantGrid(4, 16), QuantGrid(2, symmetric=True)])
def test_gptq_beats_rtn_on_the_layer_objective(grid):
    w, h = problem(cols=96)
    rtn, _ = rtn_quantize(w, grid)
    gptq, _ = gptq_quantize(w, h, grid, blocksize=32)
    assert rel_error(w, np.asarray(gptq), h) < 0.9 * rel_error(w, np.asarray(rtn), h)


def test_gptq_blocksize_does_not_change_the_result():
    """Lazy batched updates are a reordering of the same arithmetic; the last block may be partial."""
    w, h = problem(cols=80)
    a, _ = gptq_quantize(w, h, QuantGrid(4, 16), blocksize=32)
    b, _ = gptq_quantize(w, h, QuantGrid(4, 16), blocksize=80)
    assert np.mean(np.isclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)) > 0.99


def test_gptq_act_order_undoes_the_permutation_and_zeroes_dead_inputs():
    w, h = problem()
    h[5, :] = h[:, 5] = 0.0
    got, _ = gptq_quantize(w, h, QuantGrid(8, symmetric=True), act_order=True)  # symmetric: 0 is on the grid
    got = np.asarray(got)
    assert np.all(got[:, 5] == 0)
    keep = np.arange(w.shape[1]) != 5
    np.testing.assert_allclose(got[:, keep], w[:, keep], atol=np.abs(w).max() / 25)  # 8 bits: within a few steps


def test_gptq_is_deterministic():
    w, h = problem()
    a, _ = gptq_quantize(w, h, QuantGrid(3, 16), act_order=True)
    b, _ = gptq_quantize(w, h, QuantGrid(3, 16), act_order=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("bits", [1, 9, 0, 16])
def test_bits_outside_2_to_8_are_refused(bits):
    with pytest.raises(ConfigError, match="bits must be an integer in 2..8"):
        QuantGrid(bits)


def test_group_size_must_divide_the_input_dimension():
    w, h = problem(cols=64)
    with pytest.raises(ConfigError, match="group_size 48 does not divide the input dimension 64"):
        rtn_quantize(w, QuantGrid(4, 48))
    with pytest.raises(ConfigError, match="does not divide"):
        gptq_quantize(w, h, QuantGrid(4, 48))


def test_integer_tensors_are_refused():
    _, qm = rtn_quantize(problem()[0], QuantGrid(4))
    with pytest.raises(ConfigError, match="already quantized"):
        rtn_quantize(qm.codes, QuantGrid(4))


def test_fit_grid_shapes():
    w, _ = problem(rows=6, cols=64)
    assert fit_grid(w, QuantGrid(4, 16))[0].shape == (6, 4)
    assert fit_grid(w, QuantGrid(4))[0].shape == (6, 1)
    assert fit_grid(w, QuantGrid(4, per_tensor=True))[0].shape == (1, 1)
    assert QuantGrid(4, 16).storage_bits(6, 64) == 6 * 64 * 4 + 6 * 4 * 32
