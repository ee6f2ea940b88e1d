"""SparseGPT solver speed: our JAX solver next to a PyTorch implementation of the same algorithm, same machine.

    python -m experiments.bench_prune --config=configs/bench_prune.py:default --workdir=runs/bench_prune

(a) Matrix rows, for each size n in ``sizes`` and each pattern in ``patterns``: a random ``W`` ``[n, n]`` and
``H = 2XᵀX/N`` from correlated random inputs ``X`` ``[N, n]`` (``N = tokens``, default 2n). Our
``sparsegpt_prune`` is timed after a warm-up call that compiles (``compile_seconds`` = first call minus the
median), the PyTorch reference (``benchmarks/baselines/sparsegpt_torch.py``) at each thread count of
``torch_threads``; runs are interleaved (ours, torch at each thread count, repeated) so a shared CPU slows both
alike. Both results are scored by the relative layer reconstruction error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` and by the
fraction of equal keep-mask entries.

(e) End-to-end rows, run first so that compiles count as in a fresh ``experiments.compress`` run: ``model`` pruned
with SparseGPT by our engine at each ``e2e_dtypes`` (the calibration matmuls' dtype) and by the PyTorch port of the
reference code's sequential procedure (``benchmarks/baselines/sparsegpt_torch_model.py``, at
``e2e_torch_threads``), on the same ``calib`` windows (drawn like ``experiments.compress``'s). Each reports its
seconds split into statistics (block forwards that record the linear inputs, plus ``XᵀX``), solve, propagate
(forwards of the pruned blocks) and other, and the perplexity of the pruned model on ``e2e_eval_windows`` windows
of the held-out docstrings (our evaluator for both; its seconds too), so speed is compared at equal perplexity.
Every engine runs ``e2e_repeats`` times, interleaved; the median run is reported (each of ours after
``jax.clear_caches()``, so it compiles as a fresh process would: from the persistent compilation cache when that
is on, as in every ``experiments.*`` run).

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
``e2e_{e}_seconds_runs``, ``e2e_{e}_perplexity``, ``e2e_{e}_eval_seconds``, and ``speedup_e2e_{dtype}`` (torch /
ours, medians). Torch keys are null
when torch is not installed or ``torch=False``. Plots: prune.png (solver rows and end-to-end totals),
end_to_end.png (the time breakdown).

Threads: ``cpus`` pins the whole process (both solvers) to that many CPUs before JAX starts (0 = all). PyTorch is
timed at each count of ``torch_threads`` and the fastest median is reported with its count; a count whose first run
(for the model row: its pass over the first block's matrices) is ``slow_factor`` times slower is not repeated. On a
CPU shared with other processes, multi-threaded runs of either solver can be 5-50x slower than single-threaded ones
(each per-column step waits for a descheduled worker), so compare ``cpus=0`` with ``cpus=1`` there.
"""

from llmopt_jax import cli


def main(config, workdir):
    from llmopt_jax.config_checks import parse_list

    sizes = parse_list(config.sizes, "sizes", int, positive=True, item="size", example="512,4096")
    # The harness pins the CPUs before JAX starts its thread pools, so it is imported (and run) first.
    from benchmarks.harness import restrict_cpus, torch_timer

    cpu_count = restrict_cpus(config.cpus)
    import jax

    from benchmarks import plots, prune_e2e, prune_rows
    from llmopt_jax.compress.prune import parse_pattern
    from llmopt_jax.errors import ConfigError
    from llmopt_jax.jsonio import write_json

    patterns = [parse_pattern(config.sparsity, p)
                for p in parse_list(config.patterns, "patterns", str, item="pattern", example="unstructured,2:4")]
    if (config.repeats < 1 or config.model_repeats < 1 or config.e2e_repeats < 1 or any(n < 8 for n in sizes)
            or config.tokens < 0):
        raise ConfigError("bench_prune needs repeats >= 1, model_repeats >= 1, e2e_repeats >= 1, sizes >= 8 and "
                          "tokens >= 0")
    if config.cpus < 0 or config.model_layers < 0:
        raise ConfigError("bench_prune needs cpus >= 0 and model_layers >= 0 (0 = all)")
    workdir = cli.prepare_workdir(config, workdir)
    print(f"{cpu_count} CPU(s) in use", flush=True)
    timer = torch_timer(config, cpu_count, prune_rows.load_sparsegpt_torch, warmup_args=(0.5,))

    rows, results = [], {}
    if config.e2e_row:  # first, so that its compiles count as in a fresh experiments.compress run
        e2e = prune_e2e.end_to_end_rows(config, timer is not None)
        results.update(e2e)
        plots.plot_phase_breakdown(e2e, prune_e2e.PHASES, f"{workdir}/end_to_end.png")
        rows += prune_e2e.summary_rows(e2e, prune_e2e.e2e_dtypes(config))
    matrix_rows, matrix_results = prune_rows.matrix_rows(config, timer, sizes, patterns)
    rows += matrix_rows
    results.update(matrix_results)
    if config.model_row:
        row = prune_rows.model_row(config, timer)
        rows.append(row)
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
    plots.plot_solver_rows(rows, f"{workdir}/prune.png")


if __name__ == "__main__":
    cli.run(main)
