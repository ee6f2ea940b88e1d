"""Quantization grids, RTN and GPTQ against a plain NumPy re-derivation; error paths."""

import jax.numpy as jnp
import numpy as np
import pytest

from llmopt_jax.compress.quantize import QuantGrid, fit_grid, gptq_quantize, rtn_quantize
from llmopt_jax.errors import ConfigError


def f16(a):
    return np.asarray(a).astype(np.float16).astype(np.float32)


def np_fit(groups, grid):
    """Reference grid parameters of each row of ``groups`` [..., width]: ``(scale, offset)`` float16-rounded,
    or ``(scale, zero)`` for an integer zero-point (the GPTQ reference quantizer's ``find_params``)."""
    lo, hi = grid.levels
    if grid.symmetric:
        idx = np.argmax(np.abs(groups), axis=-1)
        return f16(np.take_along_axis(groups, idx[..., None], -1)[..., 0] / lo), np.zeros(groups.shape[:-1], np.float32)
    if grid.zero_point == "float":
        return f16((groups.max(-1) - groups.min(-1)) / hi), f16(groups.min(-1))
    xmin, xmax = np.minimum(groups.min(-1), 0), np.maximum(groups.max(-1), 0)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin, xmax = np.where(both_zero, -1, xmin), np.where(both_zero, 1, xmax)
    scale = f16((xmax - xmin) / hi)
    return scale, np.round(-xmin / scale)


def np_round(x, scale, param, grid):
    """``x`` rounded to the grid: ``scale·(clamp(round(x/scale) + zero) - zero)`` with an integer zero-point,
    ``scale·clamp(round((x - offset)/scale)) + offset`` otherwise."""
    lo, hi = grid.levels
    safe = np.where(scale == 0, 1.0, scale)
    if grid.integer_zero:
        return scale * (np.clip(np.round(x / safe) + param, lo, hi) - param)
    return scale * np.clip(np.round((x - param) / safe), lo, hi) + param


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
                                  QuantGrid(8, 32, symmetric=True), QuantGrid(4, per_tensor=True),
                                  QuantGrid(3, zero_point="float"), QuantGrid(4, 16, zero_point="float")])
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


def test_integer_zero_point_keeps_zeros_and_is_the_reference_quantizer():
    """0 is a level of the default asymmetric grid: zeros stay zero; a row of only positive weights gets zero-point
    0 (its range is widened to include 0); an all-zero row gets the reference's [-1, 1] range."""
    w, _ = problem()
    w[:, ::3] = 0.0
    w[0] = np.abs(w[0])
    w[1] = 0.0
    got, qm = rtn_quantize(w, QuantGrid(3))
    got = np.asarray(got)
    assert np.all(got[:, ::3] == 0) and np.all(got[1] == 0)
    zero = np.asarray(qm.zero)[:, 0]
    assert zero[0] == 0 and np.all((zero >= 0) & (zero <= 7))
    np.testing.assert_array_equal(np.asarray(qm.codes)[:, ::3], np.broadcast_to(zero[:, None], w[:, ::3].shape))
    assert np.asarray(qm.scale)[1, 0] == np.float32(np.float16(2 / 7))
    # offset = -zero·scale exactly, so scale·code + offset is scale·(code - zero) bit for bit
    np.testing.assert_array_equal(np.asarray(qm.offset), -zero[:, None] * np.asarray(qm.scale))


def test_zero_exact_grid_beats_float_offset_grid_on_the_output_at_equal_frobenius_error():
    """The quantization issue's table in miniature: on a row of many near-zero weights whose inputs have a non-zero
    mean (like the gated activations entering down_proj), a float offset moves every near-zero weight the same
    way and the shifts add up in the output; with an integer zero-point 0 is exact and the errors cancel."""
    rng = np.random.default_rng(3)
    rows, cols, tokens = 64, 512, 1024
    w = (rng.laplace(size=(rows, cols)) * 0.02).astype(np.float32)  # most weights near 0 ...
    w[np.arange(rows), rng.integers(0, cols, rows)] = rng.uniform(0.1, 0.4, rows)  # ... one outlier per row
    x = (0.5 + 0.3 * rng.standard_normal((tokens, cols))).astype(np.float32)  # inputs with mean 0.5
    frob, out = {}, {}
    for zp in ("int", "float"):
        q, _ = rtn_quantize(w, QuantGrid(3, zero_point=zp))
        d = w - np.asarray(q)
        frob[zp] = np.linalg.norm(d) / np.linalg.norm(w)
        out[zp] = np.linalg.norm(x @ d.T) / np.linalg.norm(x @ w.T)
    assert frob["int"] == pytest.approx(frob["float"], rel=0.15)  # about the same error per weight ...
    assert out["int"] < out["float"] / 2.5  # ... but far less of it reaches the output (0.56 vs 1.91 here)


def test_asymmetric_grid_reproduces_values_already_on_it():
    """Values that lie on a Q4_1-style grid (d·q + m per group of 32) come back unchanged with the float-offset
    grid (``zero_point="float"``, llama.cpp's rule)."""
    rng = np.random.default_rng(1)
    d = rng.uniform(0.01, 0.1, (8, 4, 1)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-1, 0, (8, 4, 1)).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (8, 4, 32))
    q[..., 0], q[..., 1] = 0, 15  # each group spans the full range, as llama.cpp's quantizer makes it
    w = (d * q + m).reshape(8, 128).astype(np.float32)
    got, qm = rtn_quantize(w, QuantGrid(4, 32, zero_point="float"))
    np.testing.assert_array_equal(np.asarray(qm.codes).reshape(8, 4, 32), q)
    np.testing.assert_allclose(np.asarray(got), w, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "grid, act_order",
    [(QuantGrid(4), False), (QuantGrid(3), True), (QuantGrid(3, 16), False), (QuantGrid(2, 16, symmetric=True), True),
     (QuantGrid(4, 32, symmetric=True), False), (QuantGrid(3, 16, zero_point="float"), False),
     (QuantGrid(4, zero_point="float"), True)],
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


@pytest.mark.parametrize(
    "grid, act_order",
    # per channel; groups inside one sub-block (8), spanning sub-blocks (32), neither (24: one sub-block per block)
    [(QuantGrid(4), False), (QuantGrid(3), True), (QuantGrid(3, 8), False), (QuantGrid(4, 32), False),
     (QuantGrid(4, 24), False), (QuantGrid(3, 32), True)],
)
def test_gptq_sub_blocks_are_the_same_arithmetic(grid, act_order):
    """Solving 16 columns at a time inside each block (their errors reaching the rest of the block in one matmul)
    gives what one column at a time over the whole block gives, and what the NumPy re-derivation gives."""
    from llmopt_jax.compress.quantize import _gptq

    w, h = problem(cols=96)
    static = act_order or grid.group_size <= 0
    qm = {sub: _gptq(jnp.asarray(w), jnp.asarray(h), grid, 48, 0.01, act_order, static, sub)
          for sub in (16, 0)}  # 0: no sub-blocks
    a, b = np.asarray(qm[16].dequantize()), np.asarray(qm[0].dequantize())
    assert np.mean(np.isclose(a, b, rtol=1e-4, atol=1e-5)) > 0.99
    expected = np_gptq(w, h, grid, act_order=act_order)
    assert np.mean(np.isclose(a, expected, rtol=1e-4, atol=1e-5)) > 0.99
    assert rel_error(w, a, h) == pytest.approx(rel_error(w, expected, h), rel=1e-3)


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
    for grid in (QuantGrid(8, symmetric=True), QuantGrid(8)):  # 0 is on both grids
        got, _ = gptq_quantize(w, h, grid, act_order=True)
        got = np.asarray(got)
        assert np.all(got[:, 5] == 0)
        keep = np.arange(w.shape[1]) != 5
        np.testing.assert_allclose(got[:, keep], w[:, keep], atol=np.abs(w).max() / 25)  # 8 bits: a few steps


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
    assert QuantGrid(4, 16).storage_bits(6, 64) == 6 * 64 * 4 + 6 * 4 * (16 + 8)  # float16 scale, uint8 zero
    assert QuantGrid(4, 16, zero_point="float").storage_bits(6, 64) == 6 * 64 * 4 + 6 * 4 * 32
    assert QuantGrid(4, 16, symmetric=True).storage_bits(6, 64) == 6 * 64 * 4 + 6 * 4 * 16


def test_unknown_zero_point_is_refused():
    with pytest.raises(ConfigError, match="zero_point must be one of"):
        QuantGrid(4, zero_point="half")
