"""Timing harness of the solver benchmarks: CPU pinning, PyTorch timing at several thread counts, and one loop that
interleaves our runs with the baseline's so that a shared CPU slows both alike."""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from typing import Any, Callable

from llmopt_jax.errors import ConfigError


def restrict_cpus(count: int) -> int:
    """Pins every thread of this process to the first ``count`` CPUs it may use (0 = all); returns the CPUs in use.

    Called before JAX creates its thread pools, which are then sized to the pinned CPUs (XLA counts the CPUs of the
    affinity mask): ``cpus=1`` runs both solvers single-threaded, immune to the thread hand-offs that a CPU shared
    with other processes makes slow.
    """
    allowed = sorted(os.sched_getaffinity(0))
    if count <= 0 or count >= len(allowed):
        return len(allowed)
    pin_threads(set(allowed[:count]))
    return count


def pin_threads(cpus: set[int]) -> None:
    """Restricts every thread of this process (and the threads and processes it starts later) to ``cpus``."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # a thread that has just ended
            pass


def parse_thread_counts(spec: str, cpu_count: int) -> list[int]:
    """``"1,0"`` -> the sorted distinct thread counts to time PyTorch at, 0 meaning ``cpu_count``."""
    try:
        counts = sorted({int(t) or cpu_count for t in str(spec).split(",") if t.strip()})
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError(f"torch_threads must list positive thread counts (0 = all cores), got {spec!r}")
    return counts


class TorchTimer:
    """Times a PyTorch baseline ``solve(W, H, ...)`` at several thread counts; stops repeating counts that are
    clearly slower. ``warmup_args`` complete a warm-up call ``solve(W, H, *warmup_args)``."""

    def __init__(self, thread_counts: list[int], slow_factor: float, solve: Callable, warmup_args: tuple = ()):
        import torch

        self.torch, self.solve = torch, solve
        self.default_threads = torch.get_num_threads()
        self.thread_counts = thread_counts
        self.slow_factor = slow_factor
        for threads in thread_counts:  # load the BLAS/LAPACK kernels and start the thread pools
            torch.set_num_threads(threads)
            self.solve(torch.randn(64, 64), torch.eye(64), *warmup_args)
        torch.set_num_threads(self.default_threads)

    def new_row(self) -> dict:
        """Run times of one row: ``{threads: [seconds, ...]}`` and the thread counts no longer repeated."""
        return {"runs": {t: [] for t in self.thread_counts}, "dropped": set()}

    def run(self, row: dict, fn: Callable[[], Any]) -> Any:
        """Calls ``fn()`` once at each thread count still in ``row``, recording the seconds; returns the output."""
        out = None
        for threads, runs in row["runs"].items():
            if threads in row["dropped"]:
                continue
            self.torch.set_num_threads(threads)
            t0 = time.perf_counter()
            out = fn()
            runs.append(time.perf_counter() - t0)
        self.torch.set_num_threads(self.default_threads)
        fastest = min(runs[0] for runs in row["runs"].values())
        for threads, runs in row["runs"].items():
            if threads not in row["dropped"] and len(runs) == 1 and runs[0] > self.slow_factor * fastest:
                row["dropped"].add(threads)
                print(f"  torch at {threads} thread(s) took {runs[0]:.2f} s, over {self.slow_factor:g}x the "
                      f"fastest ({fastest:.2f} s): not repeated", flush=True)
        return out

    @staticmethod
    def summary(row: dict) -> tuple[float, int, dict[str, float]]:
        """(best median seconds, its thread count, ``{threads: median seconds}``)."""
        by_threads = {str(t): statistics.median(runs) for t, runs in row["runs"].items() if runs}
        best = min(by_threads, key=by_threads.get)
        return by_threads[best], int(best), by_threads


def torch_timer(config, cpu_count: int, load_solve: Callable[[], Callable],
                warmup_args: tuple = ()) -> TorchTimer | None:
    """A :class:`TorchTimer` for the baseline ``load_solve()`` returns, at ``config.torch_threads``; None (and a
    printed reason) when ``config.torch`` is False or torch is not installed. Bad thread counts raise first."""
    thread_counts = parse_thread_counts(config.torch_threads, cpu_count)
    if not config.torch:
        print("torch=False: no PyTorch timings, torch columns are null")
        return None
    if importlib.util.find_spec("torch") is None:
        print("torch not installed (pip install -e '.[reference]'): no PyTorch timings, torch columns are null")
        return None
    return TorchTimer(thread_counts, config.slow_factor, load_solve(), warmup_args)


def interleaved_runs(ours: Callable[[], Any], theirs: Callable[[], Any], timer: TorchTimer | None, repeats: int,
                     warm_theirs: bool = False) -> tuple[float, list[float], Any, dict | None, Any]:
    """Times ``ours()`` after a first (compiling) call and, with a ``timer``, ``theirs()`` at each of its thread
    counts, alternating ``repeats`` times so a shared CPU slows both alike. ``warm_theirs``: one untimed
    ``theirs()`` after ours' first call.

    Returns ``(ours' first-call seconds, ours' run seconds, ours' last output, torch timing row or None, torch's
    last output or None)``.
    """
    t0 = time.perf_counter()
    ours()
    first = time.perf_counter() - t0
    if timer and warm_theirs:
        theirs()
    runs, torch_times, out, torch_out = [], timer.new_row() if timer else None, None, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = ours()
        runs.append(time.perf_counter() - t0)
        if timer:
            torch_out = timer.run(torch_times, theirs)
    return first, runs, out, torch_times, torch_out
