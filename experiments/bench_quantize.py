"""GPTQ solver speed: our JAX solver next to a PyTorch implementation of the same algorithm, same machine.

    python -m experiments.bench_quantize --config=configs/bench_quantize.py:default --workdir=runs/bench_quantize

For each size n in ``sizes`` and each mode in ``modes`` (``BITS/GROUP`` or ``BITS/GROUP/act``; GROUP -1 = one
scale per output channel): a random ``W`` ``[n, n]`` and ``H = 2XᵀX/N`` from correlated random inputs (``N =
tokens``, default 2n; the problem generator of ``bench_prune``). Our ``gptq_quantize`` is timed after a warm-up call
that compiles (``compile_seconds`` = first call minus the median), the PyTorch reference
(``experiments/gptq_torch.py``, the same grid and group rule) at each thread count of ``torch_threads``; runs are
interleaved so a shared CPU slows both alike. Both results are scored by the relative layer reconstruction error
``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` and by the fraction of weights on which they agree (to 1e-4 relative).

results.json: ``rows`` (one dict per row: size, mode, ours_seconds, ours_compile_seconds, torch_seconds,
torch_threads, torch_seconds_by_threads, speedup = torch / ours, ours_relative_error, torch_relative_error,
weight_agreement) and flat keys ``ours_{k}_seconds``, ``ours_{k}_compile_seconds``, ``ours_{k}_relative_error``,
``torch_{k}_seconds``, ``torch_{k}_threads``, ``torch_{k}_relative_error``, ``speedup_{k}``, ``weight_agreement_{k}``
with ``k`` = ``{n}_{bits}bit_{pc|gG}[_act]`` (e.g. ``4096_4bit_pc``, ``576_3bit_g64_act``); torch values are null
when torch is not installed or ``torch=False``. Both solvers get one untimed call per row first. Ours is timed as a
user calls it (``gptq_quantize``: the jitted solve plus the dequantized weights it returns); the reference returns
its float weights directly. Plot: gptq.png. Threads: see ``bench_prune`` (``cpus`` pins the whole
process; on a shared CPU one thread is often faster for both solvers).
"""

from llmopt_jax import cli


def parse_mode(mode: str) -> tuple[int, int, bool]:
    """``"4/64/act"`` -> ``(bits, group_size, act_order)``."""
    from llmopt_jax.errors import ConfigError

    parts = mode.strip().split("/")
    try:
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "act"):
            raise ValueError
        return int(parts[0]), int(parts[1]), len(parts) == 3
    except ValueError:
        raise ConfigError(f"mode {mode!r} is not BITS/GROUP or BITS/GROUP/act (e.g. 4/-1, 3/64/act)") from None


def mode_key(mode: str, n: int) -> str:
    """Flat results.json key part of a row: ``"4/-1", 576`` -> ``"576_4bit_pc"``, ``"3/64/act"`` ->
    ``"576_3bit_g64_act"``."""
    bits, group, act_order = parse_mode(mode)
    return f"{n}_{bits}bit_{'pc' if group <= 0 else f'g{group}'}{'_act' if act_order else ''}"


def main(config, workdir):
    import importlib.util
    import statistics

    from experiments.bench_prune import TorchTimer, flatten_row, interleaved_runs, plot, random_problem, restrict_cpus

    cpu_count = restrict_cpus(config.cpus)  # before JAX starts its thread pools
    import jax
    import numpy as np

    from llmopt_jax.compress.calibrate import relative_reconstruction_error
    from llmopt_jax.compress.quantize import QuantGrid, gptq_quantize
    from llmopt_jax.errors import ConfigError
    from llmopt_jax.jsonio import write_json

    workdir = cli.prepare_workdir(config, workdir)
    sizes = [int(s) for s in config.sizes.split(",") if s.strip()]
    modes = [m.strip() for m in config.modes.split(",") if m.strip()]
    grids = {m: (QuantGrid(*parse_mode(m)[:2], symmetric=config.symmetric), parse_mode(m)[2]) for m in modes}
    if config.repeats < 1 or not sizes or any(n < 8 for n in sizes) or config.tokens < 0 or config.cpus < 0:
        raise ConfigError("bench_quantize needs repeats >= 1, sizes >= 8, tokens >= 0 and cpus >= 0")
    for n in sizes:
        for grid, _ in grids.values():
            grid.group_width(n)  # a group size that does not divide n: a clear error before anything runs
    print(f"{cpu_count} CPU(s) in use", flush=True)
    thread_counts = sorted({int(t) or cpu_count for t in str(config.torch_threads).split(",") if t.strip()})
    if not thread_counts or min(thread_counts) < 1:
        raise ConfigError(f"torch_threads must list positive thread counts (0 = all cores), got {config.torch_threads!r}")

    timer = None
    if not config.torch:
        print("torch=False: no PyTorch timings, torch columns are null")
    elif importlib.util.find_spec("torch") is None:
        print("torch not installed (pip install -e '.[reference]'): no PyTorch timings, torch columns are null")
    else:
        from experiments.gptq_torch import gptq_torch  # imports torch

        timer = TorchTimer(thread_counts, config.slow_factor, solve=gptq_torch, warmup_args=(4,))

    rows, results = [], {}
    for n in sizes:
        w, h = random_problem(n, config.tokens or 2 * n, config.seed)
        w_np, h_np = np.array(w), np.array(h)  # writable copies for torch.from_numpy
        for mode, (grid, act_order) in grids.items():

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
            first, ours_runs, ours_out, torch_times, torch_out = interleaved_runs(ours, theirs, timer, config.repeats,
                                                                                  warm_theirs=True)
            ours_s = statistics.median(ours_runs)
            row = dict(kind="matrix", size=n, mode=mode, label=f"{n}² {mode}", ours_seconds=ours_s,
                       ours_compile_seconds=max(first - ours_s, 0.0), ours_runs=ours_runs,
                       ours_relative_error=relative_reconstruction_error(w, ours_out, h), torch_seconds=None,
                       torch_threads=None, torch_seconds_by_threads=None, torch_relative_error=None,
                       weight_agreement=None, speedup=None)
            line = f"  ours {ours_s:.3f} s (+{row['ours_compile_seconds']:.1f} s compile), error {row['ours_relative_error']:.6f}"
            if timer:
                torch_s, threads, by_threads = timer.summary(torch_times)
                theirs = torch_out.numpy()
                row.update(torch_seconds=torch_s, torch_threads=threads, torch_seconds_by_threads=by_threads,
                           torch_relative_error=relative_reconstruction_error(w, theirs, h),
                           weight_agreement=float(np.mean(np.isclose(np.asarray(ours_out), theirs, rtol=1e-4,
                                                                      atol=1e-6))),
                           speedup=torch_s / ours_s)
                line += (f"; torch {torch_s:.3f} s at {threads} thread(s) {by_threads}, error "
                         f"{row['torch_relative_error']:.6f}; speedup {row['speedup']:.2f}x; weights agree "
                         f"{row['weight_agreement']:.4f}")
            print(line, flush=True)
            rows.append(row)
            flatten_row(results, row, mode_key(mode, n), "weight_agreement")

    results.update(rows=rows, device=str(jax.devices()[0]), cpus=cpu_count, repeats=config.repeats,
                   blocksize=config.blocksize, damp_fraction=config.damp_fraction, symmetric=config.symmetric,
                   torch_version=timer.torch.__version__ if timer else None, jax_version=jax.__version__)
    write_json(f"{workdir}/results.json", results)
    plot(rows, f"{workdir}/gptq.png", title="GPTQ solve time, same CPU")


if __name__ == "__main__":
    cli.run(main)
