"""SparseGPT solver speed: our JAX solver next to a PyTorch implementation of the same algorithm, same machine.

    python -m experiments.bench_prune --config=configs/bench_prune.py:default --workdir=runs/bench_prune

(a) Matrix rows, for each size n in ``sizes`` and each pattern in ``patterns``: a random ``W`` ``[n, n]`` and
``H = 2XᵀX/N`` from correlated random inputs ``X`` ``[N, n]`` (``N = tokens``, default 2n). Our
``sparsegpt_prune`` is timed after a warm-up call that compiles (``compile_seconds`` = first call minus the
median), the PyTorch reference (``experiments/sparsegpt_torch.py``) at each thread count of ``torch_threads``;
runs are interleaved (ours, torch at each thread count, repeated) so a shared CPU slows both alike. Both results
are scored by the relative layer reconstruction error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` and by the fraction of
equal keep-mask entries.

(e) End-to-end rows, run first so that compiles count as in a fresh ``experiments.compress`` run: ``model`` pruned
with SparseGPT by our engine at each ``e2e_dtypes`` (the calibration matmuls' dtype) and by the PyTorch port of the
reference code's sequential procedure (``experiments/sparsegpt_torch_model.py``, at ``e2e_torch_threads``), on the
same ``calib`` windows (drawn like ``experiments.compress``'s). Each reports its seconds split into statistics
(block forwards that record the linear inputs, plus ``XᵀX``), solve, propagate (forwards of the pruned blocks) and
other, and the perplexity of the pruned model on ``e2e_eval_windows`` windows of the held-out docstrings (our
evaluator for both; its seconds too), so speed is compared at equal perplexity.

(b) Model row: ``model`` pruned block by block (``compress_sequentially``, SparseGPT at ``sparsity`` /
``model_pattern``) on ``calib.num_samples`` x ``calib.seq_len`` calibration tokens. The transform records every
``(W, H)`` it is given, so both solvers are then timed on exactly the same matrix problems (warm, interleaved).

results.json: ``rows`` (one dict per row) and flat keys, with ``{n}`` the size and ``{p}`` ``unstructured`` or
``NofM`` (``2of4``):
``ours_{n}_{p}_seconds``, ``ours_{n}_{p}_compile_seconds``, ``torch_{n}_{p}_seconds``, ``torch_{n}_{p}_threads``,
``speedup_{n}_{p}`` (torch / ours), ``ours_{n}_{p}_relative_error``, ``torch_{n}_{p}_relative_error``,
``mask_agreement_{n}_{p}``; ``ours_model_seconds`` (the engine end to end: forward passes, statistics and solves,
compiles included), ``ours_model_solver_seconds`` (the solves inside the engine, first-call compiles included),
``ours_model_solver_warm_seconds`` and ``torch_model_solver_seconds`` (all recorded problems, one pass, median of
``model_repeats``), ``torch_model_threads``, ``speedup_model_solver`` (torch / ours warm),
``ours_model_relative_error`` / ``torch_model_relative_error`` (mean over matrices), ``mask_agreement_model``,
``model_num_matrices``, ``model_num_blocks``; ``cpus``; end to end, for ``{e}`` = ``ours_bfloat16``,
``ours_float32`` and ``torch``: ``e2e_{e}_seconds``, ``e2e_{e}_seconds_{statistics,solve,propagate,other}``,
``e2e_{e}_perplexity``, ``e2e_{e}_eval_seconds``, and ``speedup_e2e_{dtype}`` (torch / ours). Torch keys are null
when torch is not installed or ``torch=False``. Plots: prune.png (solver rows and end-to-end totals),
end_to_end.png (the time breakdown).

Threads: ``cpus`` pins the whole process (both solvers) to that many CPUs before JAX starts (0 = all). PyTorch is
timed at each count of ``torch_threads`` and the fastest median is reported with its count; a count whose first run
(for the model row: its pass over the first block's matrices) is ``slow_factor`` times slower is not repeated. On a
CPU shared with other processes, multi-threaded runs of either solver can be 5-50x slower than single-threaded ones
(each per-column step waits for a descheduled worker), so compare ``cpus=0`` with ``cpus=1`` there.
"""

from llmopt_jax import cli

RELATIVE_ERROR_TOLERANCE = 1e-3  # ours and torch should reach the same reconstruction error within this (relative)


def restrict_cpus(count: int) -> int:
    """Pins every thread of this process to the first ``count`` CPUs it may use (0 = all); returns the CPUs in use.

    Called before JAX creates its thread pools, which are then sized to the pinned CPUs (XLA counts the CPUs of the
    affinity mask): ``cpus=1`` runs both solvers single-threaded, immune to the thread hand-offs that a CPU shared
    with other processes makes slow.
    """
    import os

    allowed = sorted(os.sched_getaffinity(0))
    if count <= 0 or count >= len(allowed):
        return len(allowed)
    chosen = set(allowed[:count])
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), chosen)
        except OSError:  # a thread that has just ended
            pass
    return count


def pattern_key(pattern) -> str:
    return f"{pattern.n}of{pattern.m}" if pattern.is_nm else "unstructured"


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


class TorchTimer:
    """Times a PyTorch reference solver ``solve(W, H, *args, **kwargs)`` (default: SparseGPT) at several thread
    counts; stops repeating counts that are clearly slower. ``warmup_args`` complete a warm-up call ``solve(W, H,
    *warmup_args)``."""

    def __init__(self, thread_counts, slow_factor, solve=None, warmup_args=(0.5,)):
        import torch

        if solve is None:
            from experiments.sparsegpt_torch import sparsegpt_torch as solve

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

    def run(self, row: dict, fn):
        """Calls ``fn()`` once at each thread count still in ``row``, recording the seconds; returns the output."""
        import time

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
    def summary(row: dict):
        """(best median seconds, its thread count, ``{threads: median seconds}``)."""
        import statistics

        by_threads = {str(t): statistics.median(runs) for t, runs in row["runs"].items() if runs}
        best = min(by_threads, key=by_threads.get)
        return by_threads[best], int(best), by_threads


def interleaved_runs(ours, theirs, timer, repeats: int, warm_theirs: bool = False):
    """Times ``ours()`` after a first (compiling) call and, with a ``timer``, ``theirs()`` at each of its thread
    counts, alternating ``repeats`` times so a shared CPU slows both alike. ``warm_theirs``: one untimed
    ``theirs()`` after ours' first call.

    Returns ``(ours' first-call seconds, ours' run seconds, ours' last output, torch timing row or None, torch's
    last output or None)``.
    """
    import time

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


def flatten_row(results: dict, row: dict, key: str, agreement: str) -> None:
    """Copies a matrix row's numbers into ``results`` as flat keys ``{engine}_{key}_{what}``, ``speedup_{key}`` and
    ``{agreement}_{key}``."""
    for name in ("ours_seconds", "ours_compile_seconds", "torch_seconds", "torch_threads",
                 "ours_relative_error", "torch_relative_error"):
        engine, what = name.split("_", 1)
        results[f"{engine}_{key}_{what}"] = row[name]
    results[f"speedup_{key}"] = row["speedup"]
    results[f"{agreement}_{key}"] = row[agreement]


def main(config, workdir):
    import functools
    import importlib.util
    import statistics

    cpu_count = restrict_cpus(config.cpus)  # before JAX starts its thread pools
    import jax
    import numpy as np

    from llmopt_jax.compress.calibrate import relative_reconstruction_error
    from llmopt_jax.compress.prune import parse_pattern, sparsegpt_prune
    from llmopt_jax.errors import ConfigError
    from llmopt_jax.jsonio import write_json

    workdir = cli.prepare_workdir(config, workdir)
    sizes = [int(s) for s in config.sizes.split(",") if s.strip()]
    patterns = [parse_pattern(config.sparsity, p.strip()) for p in config.patterns.split(",") if p.strip()]
    if config.repeats < 1 or config.model_repeats < 1 or any(n < 8 for n in sizes) or config.tokens < 0:
        raise ConfigError("bench_prune needs repeats >= 1, model_repeats >= 1, sizes >= 8 and tokens >= 0")
    if config.cpus < 0 or config.model_layers < 0:
        raise ConfigError("bench_prune needs cpus >= 0 and model_layers >= 0 (0 = all)")
    print(f"{cpu_count} CPU(s) in use", flush=True)
    thread_counts = sorted({int(t) or cpu_count for t in str(config.torch_threads).split(",") if t.strip()})
    if not thread_counts or min(thread_counts) < 1:
        raise ConfigError(f"torch_threads must list positive thread counts (0 = all cores), got {config.torch_threads!r}")

    timer = None
    if config.torch:
        if importlib.util.find_spec("torch") is None:
            print("torch not installed (pip install -e '.[reference]'): no PyTorch timings, torch columns are null")
        else:
            timer = TorchTimer(thread_counts, config.slow_factor)
    else:
        print("torch=False: no PyTorch timings, torch columns are null")

    rows, results = [], {}
    if config.e2e_row:
        e2e = end_to_end_rows(config, timer is not None)
        results.update(e2e)
        plot_breakdown(e2e, f"{workdir}/end_to_end.png")
        for dtype in [d for d in config.e2e_dtypes.split(",") if d]:
            rows.append(dict(kind="e2e", label=f"end to end\nours {dtype}", key=f"e2e_{dtype}",
                             ours_seconds=e2e[f"e2e_ours_{dtype}_seconds"], torch_seconds=e2e.get("e2e_torch_seconds"),
                             speedup=e2e.get(f"speedup_e2e_{dtype}")))

    def solve_ours(w, h, pat):
        return jax.block_until_ready(sparsegpt_prune(w, h, pat, config.blocksize, config.damp_fraction))

    # (a) matrix rows.
    for n in sizes:
        w, h = random_problem(n, config.tokens or 2 * n, config.seed)
        w_np, h_np = np.array(w), np.array(h)  # writable copies for torch.from_numpy
        for pat in patterns:
            key = f"{n}_{pattern_key(pat)}"
            print(f"{n}x{n} {pat}:", flush=True)
            wt, ht = (timer.torch.from_numpy(w_np), timer.torch.from_numpy(h_np)) if timer else (None, None)
            first, ours_runs, ours_out, torch_times, torch_out = interleaved_runs(
                functools.partial(solve_ours, w, h, pat),
                lambda: timer.solve(wt, ht, pat.sparsity, pat.n, pat.m, blocksize=config.blocksize,
                                    percdamp=config.damp_fraction),
                timer, config.repeats)
            ours_s = statistics.median(ours_runs)
            row = dict(kind="matrix", size=n, pattern=str(pat), key=key, ours_seconds=ours_s,
                       ours_compile_seconds=max(first - ours_s, 0.0), ours_runs=ours_runs,
                       ours_relative_error=relative_reconstruction_error(w, ours_out[0], h), torch_seconds=None,
                       torch_threads=None,
                       torch_seconds_by_threads=None, torch_relative_error=None, mask_agreement=None, speedup=None)
            if timer:
                torch_s, threads, by_threads = timer.summary(torch_times)
                keep_t = torch_out[1].numpy()
                row.update(torch_seconds=torch_s, torch_threads=threads, torch_seconds_by_threads=by_threads,
                           torch_relative_error=relative_reconstruction_error(w, torch_out[0].numpy(), h),
                           mask_agreement=float(np.mean(np.asarray(ours_out[1]) == keep_t)), speedup=torch_s / ours_s)
            rows.append(row)
            report_row(row)
            flatten_row(results, row, key, "mask_agreement")
        del w, h, w_np, h_np

    # (b) the model row.
    if config.model_row:
        row = model_row(config, timer, solve_ours)
        rows.append(row)
        report_row(row)
        for name in ("ours_model_seconds", "ours_model_solver_seconds", "ours_model_solver_warm_seconds",
                     "ours_model_layer_seconds", "torch_model_solver_seconds", "torch_model_threads",
                     "speedup_model_solver", "ours_model_relative_error", "torch_model_relative_error",
                     "mask_agreement_model", "model_num_matrices", "model_num_blocks"):
            results[name] = row[name]
        results["calib_windows"] = int(config.calib.num_samples)
        results["calib_seq_len"] = int(config.calib.seq_len)

    results.update(rows=rows, device=str(jax.devices()[0]), cpus=cpu_count, repeats=config.repeats,
                   blocksize=config.blocksize, damp_fraction=config.damp_fraction,
                   torch_version=timer.torch.__version__ if timer else None, jax_version=jax.__version__)
    write_json(f"{workdir}/results.json", results)
    plot(rows, f"{workdir}/prune.png")


PHASES = ("statistics", "solve", "propagate", "other")


def end_to_end_rows(config, with_torch: bool) -> dict:
    """Prunes the whole model with our engine (each ``e2e_dtypes``) and with the PyTorch port; flat result keys."""
    import dataclasses

    import jax
    import numpy as np
    from flax import nnx

    from llmopt_jax.compress.calibrate import compress_sequentially
    from llmopt_jax.compress.recipe import sparsegpt
    from llmopt_jax.data.text import calibration_windows, stdlib_docstrings_text
    from llmopt_jax.eval.perplexity import evaluate_perplexity
    from llmopt_jax.io.load import load_pretrained
    from llmopt_jax.parallel.sharded_init import load_params

    model = load_pretrained(config.model)
    tok = model.require_tokenizer()
    cfg, pure = model.cfg, jax.tree.map(np.asarray, nnx.to_pure_dict(model.params))
    if 0 < config.model_layers < cfg.num_layers:
        keep = config.model_layers
        pure = {**pure, "layers": jax.tree.map(lambda a: a[:keep], pure["layers"]) if cfg.scan_layers
                else {i: pure["layers"][i] for i in range(keep)}}
        cfg = dataclasses.replace(cfg, num_layers=keep)
    windows = calibration_windows(tok, "", config.calib.sources, config.calib.num_samples, config.calib.seq_len,
                                  config.calib.seed)
    eval_tokens = np.asarray(tok.encode(stdlib_docstrings_text()))
    pattern = config.model_pattern
    n, m = (int(v) for v in pattern.split(":")) if pattern else (0, 0)
    del model
    out: dict = {}

    def evaluate(engine, new_pure):
        result = evaluate_perplexity(*load_params(cfg, new_pure), eval_tokens, config.eval_seq_len,
                                     max_windows=config.e2e_eval_windows, progress=False)
        out[f"e2e_{engine}_perplexity"] = result.perplexity
        out[f"e2e_{engine}_eval_seconds"] = result.seconds
        print(f"end to end {engine}: {out[f'e2e_{engine}_seconds']:.1f} s ("
              + ", ".join(f"{p} {out[f'e2e_{engine}_seconds_{p}']:.1f}" for p in PHASES)
              + f"), perplexity {result.perplexity:.3f}", flush=True)

    for dtype in [d for d in config.e2e_dtypes.split(",") if d]:
        transform = sparsegpt(config.sparsity, pattern, config.blocksize, config.damp_fraction)
        new_pure, report = compress_sequentially(cfg, pure, windows, transform, batch_size=config.calib.batch_size,
                                                 progress=config.progress, compute_dtype=dtype)
        out[f"e2e_ours_{dtype}_seconds"] = report["seconds"]
        out.update({f"e2e_ours_{dtype}_seconds_{p}": report[f"seconds_{p}"] for p in PHASES})
        evaluate(f"ours_{dtype}", new_pure)
    if with_torch:
        import torch

        from experiments.sparsegpt_torch_model import prune_model_torch

        threads = config.e2e_torch_threads or torch.get_num_threads()
        new_pure, report = prune_model_torch(cfg, pure, windows, sparsity=config.sparsity, n=n, m=m,
                                             blocksize=config.blocksize, percdamp=config.damp_fraction,
                                             batch_size=config.e2e_torch_batch_size, threads=threads)
        out.update(e2e_torch_seconds=report["seconds"], e2e_torch_threads=threads,
                   e2e_torch_seconds_statistics=report["seconds_stats"], e2e_torch_seconds_solve=report["seconds_solve"],
                   e2e_torch_seconds_propagate=report["seconds_forward"])
        out["e2e_torch_seconds_other"] = report["seconds"] - sum(out[f"e2e_torch_seconds_{p}"] for p in PHASES[:3])
        evaluate("torch", new_pure)
        for dtype in [d for d in config.e2e_dtypes.split(",") if d]:
            out[f"speedup_e2e_{dtype}"] = out["e2e_torch_seconds"] / out[f"e2e_ours_{dtype}_seconds"]
    return out


def plot_breakdown(e2e: dict, path: str) -> None:
    """Stacked bars: each end-to-end engine's seconds by phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = [k[len("e2e_"):-len("_seconds")] for k in e2e if k.startswith("e2e_") and k.endswith("_seconds")
               and not k.endswith("eval_seconds")]
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(engines)
    for phase in PHASES:
        values = [e2e[f"e2e_{e}_seconds_{phase}"] for e in engines]
        ax.bar(engines, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, e in enumerate(engines):
        ax.annotate(f"{bottom[i]:.0f} s\nppl {e2e[f'e2e_{e}_perplexity']:.2f}", (i, bottom[i]), ha="center",
                    va="bottom", fontsize=8)
    ax.set_ylim(0, 1.15 * max(bottom))
    ax.set_ylabel("seconds")
    ax.set_title("SparseGPT, whole model end to end, same CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def model_row(config, timer, solve_ours):
    """Prunes the model with the sequential engine, recording each matrix problem; times both solvers on them."""
    import dataclasses
    import statistics
    import time

    import jax
    import numpy as np

    from llmopt_jax.compress.calibrate import compress_sequentially, relative_reconstruction_error
    from llmopt_jax.compress.prune import parse_pattern
    from llmopt_jax.compress.recipe import sparsegpt
    from llmopt_jax.data.text import default_text, sample_windows
    from llmopt_jax.io.load import load_pretrained

    pat = parse_pattern(config.sparsity, config.model_pattern)
    model = load_pretrained(config.model)
    cfg, params = model.cfg, model.params
    if 0 < config.model_layers < cfg.num_layers:  # the first blocks only (a quick run)
        from flax import nnx

        pure = nnx.to_pure_dict(params)
        keep = config.model_layers
        layers = (jax.tree.map(lambda a: a[:keep], pure["layers"]) if cfg.scan_layers
                  else {i: pure["layers"][i] for i in range(keep)})
        cfg, params = dataclasses.replace(cfg, num_layers=keep), {**pure, "layers": layers}
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
    return row


def report_row(row):
    """One printed line per row, with a warning when the two solvers' reconstruction errors differ."""
    label = f"{row['size']}x{row['size']} {row['pattern']}" if row["kind"] == "matrix" else f"model {row['pattern']}"
    if row["kind"] == "model":
        print(f"{label}: engine {row['ours_model_seconds']:.1f} s; ours solver {row['ours_model_solver_seconds']:.2f} s "
              f"in the engine, {row['ours_model_solver_warm_seconds']:.2f} s warm over "
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


def plot(rows, path, title="SparseGPT solve time, same CPU"):
    """Bar chart of ours vs the PyTorch reference, one pair per row (``row["label"]`` names it when present)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [r.get("label") or (f"{r['size']}² {r['pattern']}" if r["kind"] == "matrix" else
                                 f"model solves\n{r['pattern']}") for r in rows]
    x = np.arange(len(rows))
    ours = [r["ours_seconds"] for r in rows]
    theirs = [r["torch_seconds"] if r["torch_seconds"] is not None else np.nan for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    ax.bar(x - 0.2, ours, 0.4, label="ours (JAX)", color="tab:blue")
    ax.bar(x + 0.2, theirs, 0.4, label="PyTorch reference", color="tab:orange")
    for i, r in enumerate(rows):
        if r["speedup"]:
            ax.annotate(f"{r['speedup']:.1f}x", (x[i], max(ours[i], theirs[i])), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("seconds (median)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    cli.run(main)
