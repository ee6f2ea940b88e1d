"""Rows of the GPTQ solver benchmark: random matrix problems solved by our JAX GPTQ and by the PyTorch baseline on
the same grid."""

from __future__ import annotations

from typing import Callable

from benchmarks.harness import TorchTimer
from benchmarks.solver_rows import random_problem, timed_row


def load_gptq_torch() -> Callable:
    """The PyTorch GPTQ baseline (imports torch)."""
    from benchmarks.baselines.gptq_torch import gptq_torch

    return gptq_torch


def matrix_rows(config, timer: TorchTimer | None, sizes: list[int], modes: dict[str, tuple]) -> list[dict]:
    """One row per size and mode (``{mode: (QuantGrid, act_order)}``) on a :func:`random_problem`: both solvers
    timed (interleaved), scored by the relative reconstruction error and the fraction of weights on which they
    agree (to 1e-4 relative)."""
    import jax
    import numpy as np

    from llmopt_jax.compress.calibrate import relative_reconstruction_error
    from llmopt_jax.compress.quantize import gptq_quantize

    rows = []
    for n in sizes:
        w, h = random_problem(n, config.tokens or 2 * n, config.seed)
        w_np, h_np = np.array(w), np.array(h)  # writable copies for torch.from_numpy
        for mode, (grid, act_order) in modes.items():

            def ours():
                out, _ = gptq_quantize(w, h, grid, blocksize=config.blocksize, damp_fraction=config.damp_fraction,
                                       act_order=act_order)
                return jax.block_until_ready(out)

            print(f"{n}x{n} {grid.describe()}{' act-order' if act_order else ''}:", flush=True)
            wt, ht = (timer.torch.from_numpy(w_np), timer.torch.from_numpy(h_np)) if timer else (None, None)

            def theirs():
                return timer.solve(wt, ht, grid.bits, grid.group_size, grid.symmetric, act_order,
                                   blocksize=config.blocksize, percdamp=config.damp_fraction)

            # warm_theirs: an untimed reference call, like ours' first call, warms caches and allocator at this size
            timing, ours_out, torch_out = timed_row(ours, theirs, timer, config.repeats, warm_theirs=True)
            row = dict(kind="matrix", size=n, mode=mode, label=f"{n}² {mode}", **timing,
                       ours_relative_error=relative_reconstruction_error(w, ours_out, h), torch_relative_error=None,
                       weight_agreement=None)
            line = (f"  ours {row['ours_seconds']:.3f} s (+{row['ours_compile_seconds']:.1f} s compile), error "
                    f"{row['ours_relative_error']:.6f}")
            if timer:
                theirs_w = torch_out.numpy()
                row.update(torch_relative_error=relative_reconstruction_error(w, theirs_w, h),
                           weight_agreement=float(np.mean(np.isclose(np.asarray(ours_out), theirs_w, rtol=1e-4,
                                                                      atol=1e-6))))
                line += (f"; torch {row['torch_seconds']:.3f} s at {row['torch_threads']} thread(s) "
                         f"{row['torch_seconds_by_threads']}, error {row['torch_relative_error']:.6f}; speedup "
                         f"{row['speedup']:.2f}x; weights agree {row['weight_agreement']:.4f}")
            print(line, flush=True)
            rows.append(row)
    return rows
