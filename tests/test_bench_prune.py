"""The pruning benchmark: the PyTorch SparseGPT reference agrees with our JAX solver; the smoke preset runs."""

import json

import numpy as np
import pytest

import jax.numpy as jnp

from conftest import run_cli
from llmopt_jax.compress.prune import parse_pattern, sparsegpt_prune


def problem(rows, cols, seed, dead=()):
    """``W`` ``[rows, cols]`` and ``H = 2XᵀX/n`` of correlated inputs with uneven scales; ``dead`` inputs are zero."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4 * cols, cols // 4)) @ rng.normal(size=(cols // 4, cols)) + 0.1 * rng.normal(size=(4 * cols, cols))
    x *= rng.uniform(0.2, 3.0, size=cols)
    x[:, list(dead)] = 0
    h = (2 * x.T @ x / len(x)).astype(np.float32)
    return rng.normal(size=(rows, cols)).astype(np.float32), h


def relative_error(w, new_w, h):
    delta = (w - new_w).astype(np.float64)
    return np.sum(delta @ h * delta) / np.sum(w.astype(np.float64) @ h * w)


@pytest.mark.parametrize(
    "rows, cols, blocksize, pattern",
    [(24, 40, 16, ""), (24, 40, 16, "2:4"), (64, 256, 128, ""), (64, 256, 128, "4:8"), (96, 200, 64, "")],
)
def test_torch_reference_agrees_with_our_solver(rows, cols, blocksize, pattern):
    torch = pytest.importorskip("torch")
    from benchmarks.baselines.sparsegpt_torch import sparsegpt_torch
    w, h = problem(rows, cols, seed=cols + len(pattern), dead=(3,))  # 40 = 16 + 16 + 8, 200 = 3x64 + 8: ragged
    pat = parse_pattern(0.5, pattern)
    ours, keep = (np.asarray(a) for a in sparsegpt_prune(jnp.asarray(w), jnp.asarray(h), pat, blocksize=blocksize))
    w_t, h_t = torch.from_numpy(w.copy()), torch.from_numpy(h.copy())
    theirs, keep_t = (a.numpy() for a in sparsegpt_torch(w_t, h_t, 0.5, pat.n, pat.m, blocksize=blocksize))
    np.testing.assert_array_equal(w_t.numpy(), w)  # the reference does not modify its inputs
    # The same number of weights pruned (exactly floor(0.5 * numel) per block, or N per M-group), the dead input
    # pruned, and the same choice nearly everywhere: the masks are chosen from float32 saliencies computed in a
    # different order, so a near-tie may fall either way.
    assert keep_t.sum() == keep.sum() and not keep_t[:, 3].any()
    assert (theirs[~keep_t] == 0).all()
    assert np.mean(keep == keep_t) > 0.995
    # Where a row's mask is identical the arithmetic is the same up to float32 rounding, in a different order
    # (our solver updates in sub-blocks of 16 columns, the reference one rank-1 update per column): each weight
    # goes through at most `cols` updates, each rounding at ~6e-8 relative, so with |W| up to ~4 a 1e-3 bound
    # holds with a wide margin (observed: ~3e-5 at 40 columns, ~1e-4 at 256).
    same_rows = (keep == keep_t).all(axis=1)
    assert same_rows.mean() > 0.9
    np.testing.assert_allclose(theirs[same_rows], ours[same_rows], rtol=1e-3, atol=1e-3)
    # The objective both minimise: the same layer reconstruction error.
    err, err_t = relative_error(w, ours, h), relative_error(w, theirs, h)
    assert abs(err - err_t) <= 1e-3 * err_t, (err, err_t)


@pytest.mark.slow
def test_bench_prune_smoke_without_torch(tmp_path):
    proc = run_cli(["experiments.bench_prune", "--config=configs/bench_prune.py:smoke", "--config.torch=False",
                    "--config.sizes=256", "--config.model_layers=2", "--config.progress=False",
                    f"--workdir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr
    assert "torch=False" in proc.stdout
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    for p in ("unstructured", "2of4"):
        assert results[f"ours_256_{p}_seconds"] > 0 and results[f"ours_256_{p}_compile_seconds"] >= 0
        assert 0 < results[f"ours_256_{p}_relative_error"] < 0.1
        for key in (f"torch_256_{p}_seconds", f"torch_256_{p}_threads", f"speedup_256_{p}", f"mask_agreement_256_{p}"):
            assert key in results and results[key] is None
    assert results["model_num_blocks"] == 2 and results["model_num_matrices"] == 14  # 7 linear layers a block
    assert results["ours_model_seconds"] > results["ours_model_solver_seconds"] > 0
    assert results["ours_model_solver_warm_seconds"] > 0 and 0 < results["ours_model_relative_error"] < 0.1
    assert results["torch_model_solver_seconds"] is None and results["speedup_model_solver"] is None
    assert [r["kind"] for r in results["rows"]] == ["e2e", "e2e", "matrix", "matrix", "model"] and results["cpus"] == 1
    for dtype in ("bfloat16", "float32"):  # end to end: the phases add up to the total, the pruned model is scored
        total = results[f"e2e_ours_{dtype}_seconds"]
        phases = sum(results[f"e2e_ours_{dtype}_seconds_{p}"] for p in ("statistics", "solve", "propagate", "other"))
        assert 0 < phases <= total and results[f"e2e_ours_{dtype}_perplexity"] > 1
        runs = results[f"e2e_ours_{dtype}_seconds_runs"]
        assert len(runs) == 2 and total == min(runs)  # the median of two is the faster run
    assert "e2e_torch_seconds" not in results
    for plot in ("prune.png", "end_to_end.png"):
        assert (tmp_path / plot).stat().st_size > 0
    assert (tmp_path / "config.json").exists()


def test_bench_prune_bad_config_is_one_line(tmp_path):
    proc = run_cli(["experiments.bench_prune", "--config=configs/bench_prune.py:smoke", "--config.torch_threads=-1",
                    f"--workdir={tmp_path}"])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: torch_threads"), proc.stderr
