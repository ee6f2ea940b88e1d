"""GPTQ solver speed: our JAX solver next to a PyTorch implementation of the same algorithm, same machine.

    python -m experiments.bench_quantize --config=configs/bench_quantize.py:default --workdir=runs/bench_quantize

For each size n in ``sizes`` and each mode in ``modes`` (``BITS/GROUP`` or ``BITS/GROUP/act``; GROUP -1 = one
scale per output channel): a random ``W`` ``[n, n]`` and ``H = 2XᵀX/N`` from correlated random inputs (``N =
tokens``, default 2n; ``benchmarks.solver_rows.random_problem``, as in ``bench_prune``). Our ``gptq_quantize`` is
timed after a warm-up call that compiles (``compile_seconds`` = first call minus the median), the PyTorch reference
(``benchmarks/baselines/gptq_torch.py``, the same grid and group rule) at each thread count of ``torch_threads``;
runs are interleaved so a shared CPU slows both alike. Both results are scored by the relative layer reconstruction
error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` and by the fraction of weights on which they agree (to 1e-4 relative).

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
    from llmopt_jax.config_checks import parse_list

    sizes = parse_list(config.sizes, "sizes", int, positive=True, item="size", example="576,1536")
    modes = parse_list(config.modes, "modes", str, item="mode", example="4/-1,3/64/act")
    # The harness pins the CPUs before JAX starts its thread pools, so it is imported (and run) first.
    from benchmarks.harness import restrict_cpus, torch_timer

    cpu_count = restrict_cpus(config.cpus)
    import jax

    from benchmarks import quantize_rows
    from benchmarks.plots import plot_solver_rows
    from benchmarks.solver_rows import flatten_row
    from llmopt_jax.compress.quantize import QuantGrid
    from llmopt_jax.errors import ConfigError
    from llmopt_jax.jsonio import write_json

    grids = {m: (QuantGrid(*parse_mode(m)[:2], symmetric=config.symmetric), parse_mode(m)[2]) for m in modes}
    if config.repeats < 1 or not sizes or any(n < 8 for n in sizes) or config.tokens < 0 or config.cpus < 0:
        raise ConfigError("bench_quantize needs repeats >= 1, sizes >= 8, tokens >= 0 and cpus >= 0")
    for n in sizes:
        for grid, _ in grids.values():
            grid.group_width(n)  # a group size that does not divide n: a clear error before anything runs
    workdir = cli.prepare_workdir(config, workdir)
    print(f"{cpu_count} CPU(s) in use", flush=True)
    timer = torch_timer(config, cpu_count, quantize_rows.load_gptq_torch, warmup_args=(4,))

    rows, results = quantize_rows.matrix_rows(config, timer, sizes, grids), {}
    for row in rows:
        flatten_row(results, row, mode_key(row["mode"], row["size"]), "weight_agreement")
    results.update(rows=rows, device=str(jax.devices()[0]), cpus=cpu_count, repeats=config.repeats,
                   blocksize=config.blocksize, damp_fraction=config.damp_fraction, symmetric=config.symmetric,
                   torch_version=timer.torch.__version__ if timer else None, jax_version=jax.__version__)
    write_json(f"{workdir}/results.json", results)
    plot_solver_rows(rows, f"{workdir}/gptq.png", title="GPTQ solve time, same CPU")


if __name__ == "__main__":
    cli.run(main)
