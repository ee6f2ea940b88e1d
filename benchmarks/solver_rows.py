"""Matrix rows of the solver benchmarks: the random layer problem both solvers get, its interleaved timing, and
the row's flat result keys."""

from __future__ import annotations

import statistics
from typing import Any, Callable

from benchmarks.harness import TorchTimer, interleaved_runs


def random_problem(n: int, tokens: int, seed: int):
    """``W`` ``[n, n]`` and ``H = 2XᵀX/N`` for inputs with strongly correlated features of uneven scales."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def make(key):
        k_w, k_z, k_mix, k_noise, k_scale = jax.random.split(key, 5)
        hp = jax.lax.Precision.HIGHEST
        rank = max(n // 4, 1)
        x = jnp.matmul(jax.random.normal(k_z, (tokens, rank)), jax.random.normal(k_mix, (rank, n)) / rank**0.5,
                       precision=hp)
        x = (x + 0.1 * jax.random.normal(k_noise, (tokens, n))) * jax.random.uniform(k_scale, (n,), minval=0.2,
                                                                                      maxval=3.0)
        return jax.random.normal(k_w, (n, n)), 2.0 * jnp.matmul(x.T, x, precision=hp) / tokens

    return jax.block_until_ready(make(jax.random.key(seed)))


def flatten_row(results: dict, row: dict, key: str, agreement: str) -> None:
    """Copies a matrix row's numbers into ``results`` as flat keys ``{engine}_{key}_{what}``, ``speedup_{key}`` and
    ``{agreement}_{key}``."""
    for name in ("ours_seconds", "ours_compile_seconds", "torch_seconds", "torch_threads",
                 "ours_relative_error", "torch_relative_error"):
        engine, what = name.split("_", 1)
        results[f"{engine}_{key}_{what}"] = row[name]
    results[f"speedup_{key}"] = row["speedup"]
    results[f"{agreement}_{key}"] = row[agreement]


def timed_row(ours: Callable[[], Any], theirs: Callable[[], Any], timer: TorchTimer | None, repeats: int,
              warm_theirs: bool = False) -> tuple[dict, Any, Any]:
    """Times one matrix row with :func:`interleaved_runs`; returns its timing fields (``ours_seconds`` median,
    ``ours_compile_seconds`` = first call minus the median, ``ours_runs``, ``torch_seconds`` best median,
    ``torch_threads``, ``torch_seconds_by_threads``, ``speedup`` = torch / ours; torch fields None without a timer),
    ours' last output and torch's last output."""
    first, runs, out, torch_times, torch_out = interleaved_runs(ours, theirs, timer, repeats, warm_theirs)
    ours_s = statistics.median(runs)
    row = dict(ours_seconds=ours_s, ours_compile_seconds=max(first - ours_s, 0.0), ours_runs=runs,
               torch_seconds=None, torch_threads=None, torch_seconds_by_threads=None, speedup=None)
    if timer:
        torch_s, threads, by_threads = timer.summary(torch_times)
        row.update(torch_seconds=torch_s, torch_threads=threads, torch_seconds_by_threads=by_threads,
                   speedup=torch_s / ours_s)
    return row, out, torch_out
