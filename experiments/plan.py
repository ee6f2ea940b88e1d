"""Plan a training run for a device set we do not have: compile every candidate mesh and remat policy abstractly.

    python -m experiments.plan --config=configs/plan.py:default --workdir=runs/plan_7b
    python -m experiments.plan --config=configs/plan.py:llama2_70b --config.plan.devices="TPU v5e-256" --workdir=W

Creates as many fake CPU devices as the device set has, compiles the sharded train step of each candidate on
abstract inputs (``llmopt_jax/train/plan.py``; nothing is allocated), and writes WORKDIR/results.json (``rows``,
best first: mesh, remat, per-device bytes of parameters, optimizer state and XLA temporaries, whether they fit,
XLA's FLOPs and bytes per device, a roofline step time and MFU estimate) and WORKDIR/plan.md.
"""

from llmopt_jax import cli


def parse_meshes(spec: str) -> list[dict[str, int]]:
    """``"fsdp=8;fsdp=4,tensor=2"`` -> ``[{data: 1, fsdp: 8, tensor: 1, stage: 1}, ...]``."""
    from llmopt_jax.errors import ConfigError

    meshes = []
    for item in filter(None, (m.strip() for m in spec.split(";"))):
        mesh = {"data": 1, "fsdp": 1, "tensor": 1, "stage": 1}
        for part in item.split(","):
            axis, _, size = part.partition("=")
            if axis.strip() not in mesh or not size.strip().isdigit() or int(size) < 1:
                raise ConfigError(f"plan.meshes: cannot read {part!r} in {item!r} (axes data, fsdp, tensor, stage)")
            mesh[axis.strip()] = int(size)
        meshes.append(mesh)
    if not meshes:
        raise ConfigError("plan.meshes is empty; use 'auto' or e.g. 'fsdp=8;fsdp=4,tensor=2'")
    return meshes


def main(config, workdir):
    import math
    import os

    import jax

    from llmopt_jax.config_checks import parse_list
    from llmopt_jax.errors import ConfigError
    from llmopt_jax.models.config import REMAT_POLICIES
    from llmopt_jax.train.plan import DEVICE_SETS

    p = config.plan
    if p.devices not in DEVICE_SETS:
        raise ConfigError(f"plan.devices={p.devices!r}; choose one of {sorted(DEVICE_SETS)}")
    device_set = DEVICE_SETS[p.devices]
    remats = parse_list(p.remat, "plan.remat", str)
    bad = [r for r in remats if r not in REMAT_POLICIES]
    if bad or not remats:
        raise ConfigError(f"plan.remat: unknown {bad or 'empty list'}; choose from {list(REMAT_POLICIES)}")
    explicit = None if p.meshes == "auto" else parse_meshes(p.meshes)
    for mesh in explicit or []:
        if math.prod(mesh.values()) != device_set.count:
            raise ConfigError(f"plan.meshes: {mesh} uses {math.prod(mesh.values())} devices; {p.devices} has "
                              f"{device_set.count}")
    # Must run before anything touches a JAX backend.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", device_set.count)
    from llmopt_jax.jsonio import write_json
    from llmopt_jax.models.config import ModelConfig
    from llmopt_jax.train.plan import candidate_meshes, markdown, mesh_name, plan

    workdir = cli.prepare_workdir(config, workdir)
    model_cfg = ModelConfig.from_mapping(config.model)
    meshes = explicit or candidate_meshes(
        model_cfg, device_set.count, int(config.data.batch_size),
        tensor_sizes=parse_list(p.tensor_sizes, "plan.tensor_sizes", int, positive=True),
        stage_sizes=parse_list(p.stage_sizes, "plan.stage_sizes", int, positive=True))
    if not meshes:
        raise ConfigError(f"no candidate mesh splits {device_set.count} devices for this model and a batch of "
                          f"{config.data.batch_size}; give plan.meshes")
    rows = plan(config, device_set, meshes, remats, max_compiles=int(p.max_compiles),
                microbatches=int(p.microbatches), progress=config.progress if "progress" in config else True)
    table = markdown(rows, device_set)
    write_json(os.path.join(workdir, "results.json"), {
        "model": p.model, "num_params": model_cfg.num_params(), "devices": p.devices,
        "device_set": {"count": device_set.count, "memory": device_set.memory, "peak_flops": device_set.peak_flops,
                       "bandwidth": device_set.bandwidth},
        "seq_len": int(config.data.seq_len), "batch_size": int(config.data.batch_size), "rows": rows,
        "best": mesh_name(rows[0]["mesh"]) + f" remat={rows[0]['remat']}" if rows[0]["fits"] else None})
    with open(os.path.join(workdir, "plan.md"), "w") as f:
        f.write(table)
    print(f"{p.model} ({model_cfg.num_params() / 1e9:.2f} B params) on {p.devices}, {config.data.batch_size} x "
          f"{config.data.seq_len} tokens per step:\n")
    print(table)


if __name__ == "__main__":
    cli.run(main)
