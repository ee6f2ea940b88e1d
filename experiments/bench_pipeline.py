"""The measured pipeline bubble against GPipe's ``(S-1)/(M·R+S-1)``, on the decoder's layer stack.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m experiments.bench_pipeline --config=configs/bench_pipeline.py:default --workdir=runs/bench_pipeline

For each number of microbatches ``M`` (and circular repeats ``R``) one forward+backward of the scanned decoder
layers on a fixed global batch runs as a pipeline over ``stages`` x (devices / stages) data parallelism
(``llmopt_jax/parallel/pipeline.py``), and once without a pipeline, pure data parallelism over all devices (the
bubble-free baseline doing the same useful work). Two measures of the bubble per row:

- ``flops_bubble = 1 - baseline_matmul_flops / matmul_flops``: matmul FLOPs of the traced step, scan bodies
  times their lengths (``pipeline.matmul_flops``; the work the schedule really issues, bubble iterations included,
  free of timing noise), and
- ``time_bubble = 1 - baseline_seconds / pipelined_seconds`` (medians of ``timing_repeats`` runs), and
  ``cpu_bubble`` the same with the process's CPU time (all threads), which other programs on a shared host
  disturb less than wall time.

On fake CPU devices all devices share the host's cores, so wall time measures the *total* work of all devices,
not the overlap of stages: the bubble shows up because idle stages compute on padding in this implementation (as
they would sit idle on real accelerators). What fake devices cannot show: real concurrency, the cost of the
stage-to-stage transfers on a real interconnect, or smaller microbatches running less efficiently on an
accelerator. Writes results.json (``rows``; flat ``m{M}_r{R}_{predicted,flops,time,cpu}_bubble``) and
bubble.png.
"""

from llmopt_jax import cli


def main(config, workdir):
    import os

    from llmopt_jax.config_checks import check_pipeline, parse_list
    from llmopt_jax.errors import ConfigError

    micro = parse_list(config.microbatches, "microbatches", int, positive=True, item="microbatch count")
    repeats = parse_list(config.pipeline_repeats, "pipeline_repeats", int, positive=True, item="repeat count")
    stages, devices = int(config.stages), int(config.num_devices)
    if stages < 2 or devices % stages or config.timing_repeats < 1 or not micro or not repeats:
        raise ConfigError(f"bench_pipeline needs stages >= 2 dividing num_devices={devices}, timing_repeats >= 1, "
                          "microbatches and pipeline_repeats")
    data = devices // stages
    rows_wanted = [(m, r) for r in repeats for m in micro if r == 1 or m >= stages]
    for m, r in rows_wanted:  # every row is checked before JAX starts
        check_pipeline(int(config.model.num_layers), stages, m, r, batch_size=int(config.batch_size), batch_ways=data)
    if int(config.batch_size) % devices:
        raise ConfigError(f"batch_size={config.batch_size} must divide over the {devices} devices of the baseline")
    flag = f"--xla_force_host_platform_device_count={devices}"
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    workdir = cli.prepare_workdir(config, workdir)

    import dataclasses
    import statistics
    import time

    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding

    from llmopt_jax.jsonio import write_json
    from llmopt_jax.models.config import ModelConfig
    from llmopt_jax.parallel.mesh import create_mesh
    from llmopt_jax.parallel.pipeline import bubble_fraction, matmul_flops, num_iterations
    from llmopt_jax.parallel.rules import DEFAULT_RULES, logical_to_spec
    from llmopt_jax.parallel.sharded_init import init_model

    if jax.device_count() < devices:
        raise ConfigError(f"num_devices={devices} but JAX sees {jax.device_count()} devices")
    base_cfg = ModelConfig.from_mapping(config.model)
    b, length = int(config.batch_size), int(config.seq_len)

    def layer_stack_loss(params, graphdef, x):
        model = nnx.merge(graphdef, params)
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), x.shape[:2])
        return jnp.mean(model._run_layers(x, positions, None)[0] ** 2)

    def measure(cfg, mesh_sizes):
        mesh = create_mesh(mesh_sizes, jax.devices()[:devices])
        graphdef, params = init_model(cfg, mesh, seed=0)
        x_sharding = NamedSharding(mesh, logical_to_spec(("act_batch", None, None), DEFAULT_RULES, mesh))
        x = jax.device_put(jax.random.normal(jax.random.key(1), (b, length, cfg.d_model)), x_sharding)
        fn = jax.jit(jax.grad(layer_stack_loss, argnums=(0, 2)), static_argnums=1)
        compiled = fn.lower(params, graphdef, x).compile()
        flops = matmul_flops(lambda p, x: jax.grad(layer_stack_loss, argnums=(0, 2))(p, graphdef, x), params, x)
        jax.block_until_ready(compiled(params, x))  # warm-up
        times, cpu = [], []
        for _ in range(int(config.timing_repeats)):
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(compiled(params, x))
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        return statistics.median(times), statistics.median(cpu), flops

    base_seconds, base_cpu, base_flops = measure(base_cfg, dict(data=devices, fsdp=1))
    print(f"baseline (data={devices}, no pipeline): {base_seconds * 1e3:.1f} ms, {base_cpu * 1e3:.1f} ms CPU, "
          f"{base_flops:.3g} matmul FLOPs")
    rows = []
    for m, r in rows_wanted:
        cfg = dataclasses.replace(base_cfg, pipeline_stages=stages, pipeline_microbatches=m, pipeline_repeats=r)
        seconds, cpu, flops = measure(cfg, dict(stage=stages, data=data, fsdp=1))
        row = {
            "stages": stages, "microbatches": m, "pipeline_repeats": r, "iterations": num_iterations(stages, m, r),
            "predicted_bubble": bubble_fraction(stages, m, r), "seconds": seconds, "baseline_seconds": base_seconds,
            "time_bubble": 1.0 - base_seconds / seconds, "cpu_seconds": cpu, "baseline_cpu_seconds": base_cpu,
            "cpu_bubble": 1.0 - base_cpu / cpu, "matmul_flops": flops,
            "baseline_matmul_flops": base_flops, "flops_bubble": 1.0 - base_flops / flops if flops else None,
        }
        rows.append(row)
        print(f"M={m} R={r}: predicted {row['predicted_bubble']:.3f}  flops {row['flops_bubble']:.3f}  "
              f"time {row['time_bubble']:.3f} ({seconds * 1e3:.1f} ms)  "
              f"cpu {row['cpu_bubble']:.3f} ({cpu * 1e3:.1f} ms)", flush=True)
    results = {"rows": rows, "baseline_seconds": base_seconds, "baseline_matmul_flops": base_flops,
               "backend": jax.default_backend(), "num_devices": devices, "stages": stages}
    for row in rows:
        key = f"m{row['microbatches']}_r{row['pipeline_repeats']}"
        for what in ("predicted", "flops", "time", "cpu"):
            results[f"{key}_{what}_bubble"] = row[f"{what}_bubble"]
    write_json(os.path.join(workdir, "results.json"), results)
    plot(rows, stages, os.path.join(workdir, "bubble.png"))


def plot(rows, stages, path):
    """Bubble fraction vs microbatches: GPipe's formula as lines, the measured rows as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for r in sorted({row["pipeline_repeats"] for row in rows}):
        sel = [row for row in rows if row["pipeline_repeats"] == r]
        ms = np.array([row["microbatches"] for row in sel])
        grid = np.linspace(ms.min(), ms.max(), 100)
        ax.plot(grid, (stages - 1) / (grid * r + stages - 1), label=f"(S-1)/(M·{r}+S-1)")
        ax.plot(ms, [row["flops_bubble"] for row in sel], "o", label=f"matmul FLOPs, R={r}")
        ax.plot(ms, [row["time_bubble"] for row in sel], "x", label=f"wall time, R={r}")
        ax.plot(ms, [row["cpu_bubble"] for row in sel], "+", label=f"process CPU time, R={r}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("microbatches M")
    ax.set_ylabel("bubble fraction")
    ax.set_title(f"pipeline bubble, S={stages} stages (fake CPU devices)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    cli.run(main)
