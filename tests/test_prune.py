"""Pruning solvers against NumPy re-derivations; reconstruction error ordering; patterns; purity; errors."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from llmopt_jax.compress import prune
from llmopt_jax.compress.hessian import GRAM_BLOCK, InputStats, damped_inverse_cholesky, gram_upper, mirror_upper
from llmopt_jax.compress.prune import (
    magnitude_prune, parse_pattern, sparsegpt_prune, wanda_prune,
)
from llmopt_jax.errors import ConfigError


def correlated_inputs(n, d, seed=0):
    """Tokens ``[n, d]`` whose features are strongly correlated (a low-rank mix plus noise, uneven scales)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d // 4, d))
    x = rng.normal(size=(n, d // 4)) @ mix + 0.1 * rng.normal(size=(n, d))
    return (x * rng.uniform(0.2, 3.0, size=d)).astype(np.float32)


def problem(rows=24, cols=40, n=512, seed=0):
    x = correlated_inputs(n, cols, seed)
    w = np.random.default_rng(seed + 1).normal(size=(rows, cols)).astype(np.float32)
    stats = InputStats.zeros(cols).update(jnp.asarray(x))
    return w, x, stats


def numpy_obs(w, hessian, keep, damp=0.01):
    """Optimal Brain Surgeon, column by column with an explicit inverse Hessian (float64, no Cholesky).

    Column j is frozen at its masked value; the error is spread over columns > j with row j of the current
    inverse, and j is then eliminated from the inverse (Gaussian elimination)."""
    w = w.astype(np.float64).copy()
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    hinv = np.linalg.inv(h)
    for j in range(w.shape[1]):
        q = np.where(keep[:, j], w[:, j], 0.0)
        err = (w[:, j] - q) / hinv[j, j]
        w[:, j:] -= np.outer(err, hinv[j, j:])
        w[:, j] = q
        hinv -= np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return w


def test_hessian_and_inverse_cholesky():
    w, x, stats = problem()
    np.testing.assert_allclose(stats.hessian, 2 * x.T.astype(np.float64) @ x / len(x), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(stats.column_norms, np.linalg.norm(x, axis=0), rtol=1e-5)
    upper, dead = damped_inverse_cholesky(stats.hessian, 0.01)
    h = np.asarray(stats.hessian, np.float64)
    h += 0.01 * np.mean(np.diag(h)) * np.eye(len(h))
    np.testing.assert_allclose(np.asarray(upper).T @ np.asarray(upper), np.linalg.inv(h), rtol=1e-3, atol=1e-5)
    assert np.allclose(np.tril(upper, -1), 0) and not dead.any()


@pytest.mark.parametrize("pattern, blocksize", [("", 16), ("", 128), ("2:4", 8), ("4:8", 16), ("", 4), ("2:4", 4)])
def test_sparsegpt_equals_numpy_obs_with_the_same_mask(pattern, blocksize):
    w, x, stats = problem(cols=40)  # ragged last block for blocksize 16; blocksize 4: 10 blocks in 8 segments
    pat = parse_pattern(0.5, pattern)
    pruned, keep = sparsegpt_prune(jnp.asarray(w), stats.hessian, pat, blocksize=blocksize)
    expected = numpy_obs(w, np.asarray(stats.hessian), np.asarray(keep))
    np.testing.assert_allclose(pruned, expected, rtol=2e-3, atol=2e-4)
    assert (np.asarray(pruned)[~np.asarray(keep)] == 0).all()


@pytest.mark.parametrize("d", [40, 2 * GRAM_BLOCK + 1, 3 * GRAM_BLOCK, 3 * GRAM_BLOCK + 76])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gram_equals_xtx_including_the_mirrored_blocks(d, dtype):
    """Wide inputs are summed block-triangle by block-triangle and mirrored once: the result must be XᵀX, exactly
    symmetric and equal to the float64 product of the same (rounded) operands, uneven last block included."""
    x = jnp.asarray(np.random.default_rng(d).normal(size=(2, 64, d)), dtype)
    want = np.einsum("cnd,cne->de", *(2 * [np.asarray(x, np.float64)]))
    got = np.asarray(mirror_upper(gram_upper(x[:1]) + gram_upper(x[1:])))
    assert got.dtype == np.float32 and got.shape == (d, d)
    np.testing.assert_array_equal(got, got.T)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    stats = InputStats.zeros(d).update(x[0]).update(x[1])  # what the engine accumulates
    np.testing.assert_allclose(np.asarray(stats.hessian), 2 * np.asarray(want) / 128, rtol=1e-4, atol=1e-4)


def test_dead_inputs_are_zeroed():
    w, x, _ = problem()
    x[:, 3] = 0
    stats = InputStats.zeros(x.shape[1]).update(jnp.asarray(x))
    pruned, keep = sparsegpt_prune(jnp.asarray(w), stats.hessian, parse_pattern(0.3))
    assert (np.asarray(pruned)[:, 3] == 0).all() and not np.asarray(keep)[:, 3].any()


@pytest.mark.parametrize("pattern", ["", "2:4", "4:8"])
def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude(pattern):
    w, x, stats = problem(rows=64, cols=128, n=2048)
    pat = parse_pattern(0.5, pattern)
    errors = {}
    for name, (pruned, _) in {
        "magnitude": magnitude_prune(jnp.asarray(w), pat),
        "wanda": wanda_prune(jnp.asarray(w), stats.column_norms, pat),
        "sparsegpt": sparsegpt_prune(jnp.asarray(w), stats.hessian, pat, blocksize=32),
    }.items():
        errors[name] = float(np.linalg.norm(x @ w.T - x @ np.asarray(pruned).T))
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.8])
def test_unstructured_sparsity_is_exact(sparsity):
    w, x, stats = problem(rows=32, cols=198)  # 198 * 0.3 is not a whole number of weights per row
    pat = parse_pattern(sparsity)
    dropped = {}
    for name, (pruned, keep) in {
        "magnitude": magnitude_prune(jnp.asarray(w), pat),
        "wanda": wanda_prune(jnp.asarray(w), stats.column_norms, pat),
        "sparsegpt": sparsegpt_prune(jnp.asarray(w), stats.hessian, pat, blocksize=64),
    }.items():
        dropped[name] = int((~np.asarray(keep)).sum())
        assert ((np.asarray(pruned) == 0) | np.asarray(keep)).all()
    target = int(np.floor(sparsity * w.size))
    assert dropped["magnitude"] == dropped["wanda"] == target
    assert target - 4 <= dropped["sparsegpt"] <= target  # floor() in each of the 4 mask blocks
    # Wanda's comparison groups are rows: every row drops k or k + 1 weights.
    _, keep = wanda_prune(jnp.asarray(w), stats.column_norms, pat)
    assert np.ptp(np.asarray(keep).sum(1)) <= 1


@pytest.mark.parametrize("pattern, n, m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
def test_every_nm_group_is_exact(pattern, n, m):
    w, x, stats = problem(rows=16, cols=64)
    pat = parse_pattern(0.0, pattern)
    for pruned, keep in (
        magnitude_prune(jnp.asarray(w), pat),
        wanda_prune(jnp.asarray(w), stats.column_norms, pat),
        sparsegpt_prune(jnp.asarray(w), stats.hessian, pat, blocksize=32),
    ):
        groups = np.asarray(keep).reshape(16, 64 // m, m).sum(-1)
        assert (groups == n).all()
        nonzero = (np.asarray(pruned) != 0).reshape(16, 64 // m, m).sum(-1)
        assert (nonzero <= n).all()


def test_inputs_are_not_mutated_and_results_are_deterministic():
    w, x, stats = problem()
    w_copy, h_copy = w.copy(), np.asarray(stats.hessian).copy()
    pat = parse_pattern(0.5)
    a = sparsegpt_prune(jnp.asarray(w), stats.hessian, pat)
    b = sparsegpt_prune(jnp.asarray(w), stats.hessian, pat)
    np.testing.assert_array_equal(w, w_copy)
    np.testing.assert_array_equal(np.asarray(stats.hessian), h_copy)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_quantizer_sees_each_columns_own_index_across_blocks_and_segments(monkeypatch):
    monkeypatch.setattr(prune, "SEGMENT_MIN_COLS", 0)  # segment even this small matrix
    w, x, stats = problem(cols=40)  # blocksize 4: 10 blocks run as 8 segments, with column offsets in each
    steps = 0.05 * (1 + jnp.arange(48) % 7)  # a different grid step per column (48 >= padded width)
    pruned, keep = sparsegpt_prune(jnp.asarray(w), stats.hessian, parse_pattern(0.5), blocksize=4,
                                   quantize=lambda col, i, _: jnp.round(col / steps[i]) * steps[i])
    step = np.asarray(steps[:40])[None, :]
    pruned, keep = np.asarray(pruned), np.asarray(keep)
    np.testing.assert_allclose(np.where(keep, pruned, 0), np.where(keep, np.round(pruned / step) * step, 0), atol=1e-6)
    assert (pruned[~keep] == 0).all()


def test_segmented_loops_give_the_one_loop_result(monkeypatch):
    """Segments only skip lazy updates of columns that are already final: the same arithmetic."""
    w, x, stats = problem(cols=40)
    one = sparsegpt_prune(jnp.asarray(w), stats.hessian, parse_pattern(0.5), blocksize=4)
    monkeypatch.setattr(prune, "SEGMENT_MIN_COLS", 0)
    jax.clear_caches()
    segmented = sparsegpt_prune(jnp.asarray(w), stats.hessian, parse_pattern(0.5), blocksize=4)
    np.testing.assert_array_equal(np.asarray(one[1]), np.asarray(segmented[1]))
    np.testing.assert_allclose(np.asarray(one[0]), np.asarray(segmented[0]), rtol=1e-4, atol=1e-5)


def test_joint_quantizer_rounds_kept_weights_only():
    w, x, stats = problem()
    step = 0.25
    pruned, keep = sparsegpt_prune(jnp.asarray(w), stats.hessian, parse_pattern(0.5),
                                   quantize=lambda col, i, _: jnp.round(col / step) * step)
    values = np.asarray(pruned)[np.asarray(keep)]
    np.testing.assert_allclose(values, np.round(values / step) * step, atol=1e-6)
    assert (np.asarray(pruned)[~np.asarray(keep)] == 0).all()


@pytest.mark.parametrize(
    "sparsity, pattern, match",
    [(1.0, "", "sparsity must be in"), (-0.1, "", "sparsity must be in"), (0.5, "3:2", "0 < N < M"),
     (0.5, "4:4", "0 < N < M"), (0.5, "2-4", "pattern must be")],
)
def test_bad_patterns(sparsity, pattern, match):
    with pytest.raises(ConfigError, match=match):
        parse_pattern(sparsity, pattern)


def test_nm_needs_divisible_columns():
    w, x, stats = problem(cols=42)
    with pytest.raises(ConfigError, match="not divisible by M=4"):
        magnitude_prune(jnp.asarray(w), parse_pattern(0, "2:4"))


def test_drop_smallest_is_exact_with_ties():
    from llmopt_jax.compress.prune import _drop_smallest

    rng = np.random.default_rng(4)
    metric = rng.integers(0, 5, size=(13, 17)).astype(np.float32)  # heavy ties, zeros included
    metric[0, :3] = np.inf
    for k in (0, 1, 50, 100, 13 * 17 - 1, 13 * 17):
        keep = np.asarray(_drop_smallest(jnp.asarray(metric), k))
        assert (~keep).sum() == k
        if 0 < k < metric.size:
            assert metric[~keep].max() <= metric[keep].min()
