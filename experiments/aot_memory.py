"""Compile a train step ahead of time for a mesh we do not have, and report per-device memory.

    python -m experiments.aot_memory --config=configs/train.py:llama2_7b --workdir=/tmp/aot7b

Creates ``aot.num_devices`` fake CPU devices, builds the mesh from ``mesh.*`` (FSDP over all of them by
default), lowers and compiles the sharded train step on abstract inputs (nothing is allocated), and writes
results.json: per-device bytes of parameters, optimizer state and XLA temporaries (activations and
workspace) from XLA's memory analysis, plus XLA's FLOP count for one step.
"""

import time

from llmopt_jax import cli
from llmopt_jax.jsonio import write_json


def main(config, workdir):
    import jax

    from llmopt_jax.config_checks import check_train_settings

    check_train_settings(config)

    # Must run before anything touches a JAX backend.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", int(config.aot.num_devices))

    from llmopt_jax.train.aot import compile_train_step_abstract

    workdir = cli.prepare_workdir(config, workdir)
    t0 = time.perf_counter()
    report = compile_train_step_abstract(config)
    report["seconds_compile"] = time.perf_counter() - t0
    write_json(f"{workdir}/results.json", report)
    gib = 2.0**30
    print(f"{config.preset}: {report['num_params']:,} params on mesh {report['mesh']} ({report['num_devices']} devices)")
    for key in ("param_bytes_per_device", "optimizer_bytes_per_device", "temp_bytes_per_device",
                "total_bytes_per_device"):
        print(f"  {key:32s} {report[key] / gib:8.2f} GiB")
    print(f"  XLA flops per step (per device)  {report['xla_flops_per_step_per_device']:.3e}")


if __name__ == "__main__":
    cli.run(main)
