"""Rows of the SparseGPT solver benchmark: random matrix problems, and every matrix problem of a real model's
sequential pruning, each solved by our JAX solver and by the PyTorch baseline on the same inputs."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

from benchmarks.harness import TorchTimer
from benchmarks.solver_rows import flatten_row, random_problem, timed_row

RELATIVE_ERROR_TOLERANCE = 1e-3  # ours and torch should reach the same reconstruction error within this (relative)


def load_sparsegpt_torch() -> Callable:
    """The PyTorch SparseGPT baseline (imports torch)."""
    from benchmarks.baselines.sparsegpt_torch import sparsegpt_torch

    return sparsegpt_torch


def pattern_key(pattern) -> str:
    """The results.json key part of a pattern: ``unstructured`` or ``NofM`` (``2of4``)."""
    return f"{pattern.n}of{pattern.m}" if pattern.is_nm else "unstructured"


def our_solver(blocksize: int, damp_fraction: float) -> Callable:
    """``solve(W, H, pattern)``: our ``sparsegpt_prune``, waited for (so that a timer sees the whole solve)."""
    import jax

    from llmopt_jax.compress.prune import sparsegpt_prune

    def solve(w, h, pattern):
        return jax.block_until_ready(sparsegpt_prune(w, h, pattern, blocksize, damp_fraction))

    return solve


def first_layers(cfg, pure: dict, keep: int) -> tuple[Any, dict]:
    """The model config and pure parameter dict cut to the first ``keep`` blocks; 0 or at least ``num_layers``
    returns them unchanged (no copy of the stacked leaves)."""
    from llmopt_jax.models.layout import truncate_layers

    return truncate_layers(cfg, pure, keep) if 0 < keep < cfg.num_layers else (cfg, pure)


def matrix_rows(config, timer: TorchTimer | None, sizes: list[int], patterns: list) -> tuple[list[dict], dict]:
    """One row per size and pattern on a :func:`random_problem`: both solvers timed (interleaved), scored by the
    relative reconstruction error and the fraction of equal keep-mask entries. Returns the rows and their flat
    result keys."""
    import numpy as np

    from llmopt_jax.compress.calibrate import relative_reconstruction_error

    solve = our_solver(config.blocksize, config.damp_fraction)
    rows, results = [], {}
    for n in sizes:
        w, h = random_problem(n, config.tokens or 2 * n, config.seed)
        w_np, h_np = np.array(w), np.array(h)  # writable copies for torch.from_numpy
        for pat in patterns:
            key = f"{n}_{pattern_key(pat)}"
            print(f"{n}x{n} {pat}:", flush=True)
            wt, ht = (timer.torch.from_numpy(w_np), timer.torch.from_numpy(h_np)) if timer else (None, None)
            timing, ours_out, torch_out = timed_row(
                lambda: solve(w, h, pat),
                lambda: timer.solve(wt, ht, pat.sparsity, pat.n, pat.m, blocksize=config.blocksize,
                                    percdamp=config.damp_fraction),
                timer, config.repeats)
            row = dict(kind="matrix", size=n, pattern=str(pat), key=key, **timing,
                       ours_relative_error=relative_reconstruction_error(w, ours_out[0], h),
                       torch_relative_error=None, mask_agreement=None)
            if timer:
                row.update(torch_relative_error=relative_reconstruction_error(w, torch_out[0].numpy(), h),
                           mask_agreement=float(np.mean(np.asarray(ours_out[1]) == torch_out[1].numpy())))
            rows.append(row)
            report_row(row)
            flatten_row(results, row, key, "mask_agreement")
        del w, h, w_np, h_np
    return rows, results


def model_row(config, timer: TorchTimer | None) -> dict:
    """Prunes the model with the sequential engine, recording each matrix problem; times both solvers on them."""
    import jax
    import numpy as np
    from flax import nnx

    from llmopt_jax.compress.calibrate import compress_sequentially, relative_reconstruction_error
    from llmopt_jax.compress.prune import parse_pattern
    from llmopt_jax.compress.recipe import sparsegpt
    from llmopt_jax.data.text import default_text, sample_windows
    from llmopt_jax.io.load import load_pretrained

    pat = parse_pattern(config.sparsity, config.model_pattern)
    solve_ours = our_solver(config.blocksize, config.damp_fraction)
    model = load_pretrained(config.model)
    cfg, params = first_layers(model.cfg, nnx.to_pure_dict(model.params), config.model_layers)
    windows = sample_windows(np.asarray(model.tokenizer.encode(default_text())), config.calib.num_samples,
                             config.calib.seq_len, config.calib.seed)
    inner = sparsegpt(config.sparsity, config.model_pattern, config.blocksize, config.damp_fraction)
    problems, last = [], {}

    def recording(w, stats):
        # The engine dispatches the statistics pass asynchronously: wait for it, so that only the solve is timed.
        jax.block_until_ready((w, stats))
        t0 = time.perf_counter()
        new_w, info = inner(w, stats)
        jax.block_until_ready((new_w, info))
        seconds = time.perf_counter() - t0
        if last.get("stats") is not stats:  # q/k/v (and gate/up) share one input and so one Hessian
            last.update(stats=stats, hessian=np.array(stats.hessian))
        problems.append(dict(w=np.array(w), h=last["hessian"], seconds=seconds))
        return new_w, info

    print(f"model {config.model}: {config.calib.num_samples} x {config.calib.seq_len} calibration tokens, {pat}",
          flush=True)
    _, report = compress_sequentially(cfg, params, windows, recording,
                                      batch_size=config.calib.batch_size, progress=config.progress)
    del model, params
    last.clear()

    ours_passes, torch_times, ours_out, torch_out = [], timer.new_row() if timer else None, None, None
    probe_seconds = None
    if timer:
        tensors = [(timer.torch.from_numpy(p["w"]), timer.torch.from_numpy(p["h"])) for p in problems]

        def torch_pass(subset):
            return [timer.solve(w, h, pat.sparsity, pat.n, pat.m, blocksize=config.blocksize,
                                percdamp=config.damp_fraction) for w, h in subset]

        if len(timer.thread_counts) > 1:  # thread counts that are clearly slower on the first block are not run
            probe = timer.new_row()
            timer.run(probe, lambda: torch_pass(tensors[: len(problems) // cfg.num_layers]))
            torch_times["dropped"] = set(probe["dropped"])
            probe_seconds = {str(t): runs[0] for t, runs in probe["runs"].items()}
    # The engine's calls compiled the solver with its own argument signature, a separate jit cache entry: compile
    # ours for each shape here, untimed, so that the passes below are warm.
    for shapes in {(p["w"].shape, p["h"].shape): p for p in problems}.values():
        solve_ours(shapes["w"], shapes["h"], pat)
    for _ in range(config.model_repeats):
        t0 = time.perf_counter()
        ours_out = [solve_ours(p["w"], p["h"], pat) for p in problems]
        ours_passes.append(time.perf_counter() - t0)
        if timer:
            torch_out = timer.run(torch_times, lambda: torch_pass(tensors))
    ours_warm = statistics.median(ours_passes)
    ours_errors = [relative_reconstruction_error(p["w"], o[0], p["h"]) for p, o in zip(problems, ours_out)]
    row = dict(kind="model", size=None, pattern=str(pat), key="model", model=config.model,
               model_num_matrices=len(problems), model_num_blocks=cfg.num_layers, ours_model_seconds=report["seconds"],
               ours_model_solver_seconds=sum(p["seconds"] for p in problems),
               ours_model_layer_seconds=sum(r.seconds for r in report["layers"]),
               ours_model_solver_warm_seconds=ours_warm, ours_model_relative_error=float(np.mean(ours_errors)),
               torch_model_solver_seconds=None, torch_model_threads=None, torch_seconds_by_threads=None,
               torch_model_relative_error=None, mask_agreement_model=None, speedup_model_solver=None,
               ours_seconds=ours_warm, torch_seconds=None, speedup=None)
    if timer:
        torch_s, threads, by_threads = timer.summary(torch_times)
        torch_errors = [relative_reconstruction_error(p["w"], t[0].numpy(), p["h"])
                        for p, t in zip(problems, torch_out)]
        agree = sum(int(np.sum(np.asarray(o[1]) == t[1].numpy())) for o, t in zip(ours_out, torch_out))
        row.update(torch_model_solver_seconds=torch_s, torch_model_threads=threads, torch_seconds_by_threads=by_threads,
                   torch_first_block_seconds_by_threads=probe_seconds,
                   torch_model_relative_error=float(np.mean(torch_errors)),
                   mask_agreement_model=agree / sum(p["w"].size for p in problems),
                   speedup_model_solver=torch_s / ours_warm, torch_seconds=torch_s, speedup=torch_s / ours_warm)
    report_row(row)
    return row


def report_row(row: dict) -> None:
    """One printed line per row, with a warning when the two solvers' reconstruction errors differ."""
    label = f"{row['size']}x{row['size']} {row['pattern']}" if row["kind"] == "matrix" else f"model {row['pattern']}"
    if row["kind"] == "model":
        print(f"{label}: engine {row['ours_model_seconds']:.1f} s; ours solver "
              f"{row['ours_model_solver_seconds']:.2f} s in the engine, "
              f"{row['ours_model_solver_warm_seconds']:.2f} s warm over "
              f"{row['model_num_matrices']} matrices")
        err_ours, err_torch = row["ours_model_relative_error"], row["torch_model_relative_error"]
    else:
        print(f"{label}: ours {row['ours_seconds']:.3f} s (+{row['ours_compile_seconds']:.1f} s compile)")
        err_ours, err_torch = row["ours_relative_error"], row["torch_relative_error"]
    if row["torch_seconds"] is None:
        print(f"  relative error ours {err_ours:.6f}; torch: not run")
        return
    print(f"  torch {row['torch_seconds']:.3f} s at {row.get('torch_threads') or row.get('torch_model_threads')} "
          f"thread(s) {row['torch_seconds_by_threads']}; speedup {row['speedup']:.2f}x; relative error ours "
          f"{err_ours:.6f} torch {err_torch:.6f}; mask agreement "
          f"{row.get('mask_agreement') or row.get('mask_agreement_model'):.5f}")
    if abs(err_ours - err_torch) > RELATIVE_ERROR_TOLERANCE * max(err_torch, 1e-30):
        print(f"  WARNING: reconstruction errors differ by more than {RELATIVE_ERROR_TOLERANCE:g} relative")
