"""Plan a training run we cannot launch: which meshes and remat policies fit a device set, and how fast.

For a model shape and a virtual device set (:data:`DEVICE_SETS`), :func:`candidate_meshes` lists the ways to split
the devices over ``(data, fsdp, tensor, stage)``; :func:`plan` compiles the sharded train step of each candidate
on abstract inputs (``train/aot.py``: nothing is allocated; the process must hold as many fake CPU devices as the
set has) and ranks them: those whose per-device bytes (parameters + optimizer state + XLA's temporaries) fit the
device's memory first, then by an analytic step time (:func:`step_time_estimate`: compute with remat and the
pipeline bubble, plus the bytes of FSDP, tensor- and data-parallel collectives over the device links). A candidate
whose parameters and optimizer state alone exceed the memory is listed without compiling.

Memory comes from XLA:CPU's compiler, whose fusion and buffer assignment differ from GPU/TPU backends': temporaries
are indicative (they follow remat and sharding correctly, not to the byte). XLA's own FLOP and byte counts are
reported as they are, but they count the body of a loop once (a layer scan: one layer), so they do not rank
anything.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any

from llmopt_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DeviceSet:
    """``count`` devices of ``memory`` bytes, ``peak_flops`` bf16 FLOP/s, ``bandwidth`` memory bytes/s and
    ``link`` collective bytes/s (per device, one direction: NVLink / ICI; across hosts the slower network)."""

    count: int
    memory: float
    peak_flops: float
    bandwidth: float
    link: float


DEVICE_SETS = {
    "8xH100": DeviceSet(8, 80e9, 989e12, 3.35e12, 450e9),
    "64xH100": DeviceSet(64, 80e9, 989e12, 3.35e12, 50e9),  # 8 hosts: 400 Gb/s InfiniBand per GPU between them
    "8xA100-80G": DeviceSet(8, 80e9, 312e12, 2.04e12, 300e9),
    "32xA100-80G": DeviceSet(32, 80e9, 312e12, 2.04e12, 25e9),
    "1xH200": DeviceSet(1, 141e9, 989e12, 4.8e12, 450e9),
    "TPU v5e-256": DeviceSet(256, 16e9, 197e12, 0.82e12, 100e9),
    "TPU v5p-128": DeviceSet(64, 95e9, 459e12, 2.76e12, 200e9),  # 128 TensorCores = 64 chips
    "8xCPU (test)": DeviceSet(8, 1e9, 1e12, 1e11, 1e10),
}

# Forward passes per training step by remat policy (1 forward + 2 for the backward, plus what remat recomputes).
REMAT_COMPUTE = {"none": 3.0, "full": 4.0, "dots": 3.3, "dots_no_batch": 3.3, "offload_dots_no_batch": 3.3}


def step_time_estimate(model_cfg, mesh: dict[str, int], device_set: DeviceSet, *, batch: int, seq_len: int,
                       remat: str, microbatches: int = 1) -> dict[str, float]:
    """An analytic step time (seconds) for one device of ``mesh``: compute (PaLM FLOPs per token, scaled by the
    forward passes ``remat`` costs, split over all devices, stretched by the pipeline bubble (S-1)/(M+S-1)) plus the
    collectives that do not overlap, counted in bytes per device: FSDP all-gathers the bf16 weights twice
    (forward, backward) and reduce-scatters float32 gradients; tensor parallelism all-reduces each layer's bf16
    activations twice forward and twice backward; data parallelism all-reduces float32 gradients. A ring moves
    ``2(n-1)/n`` of the buffer for an all-reduce and ``(n-1)/n`` for a gather or scatter. Rough by design: it
    ranks meshes, it does not predict to the percent."""
    d, f, t, s = mesh["data"], mesh["fsdp"], mesh["tensor"], mesh["stage"]
    tokens = batch * seq_len
    flops = model_cfg.train_flops_per_token(seq_len) * tokens * REMAT_COMPUTE[remat] / 3.0
    bubble = (s - 1) / (microbatches + s - 1) if s > 1 else 0.0
    compute = flops / device_set.count / device_set.peak_flops / (1 - bubble)
    params = model_cfg.num_params() / (t * s)  # this device's share before FSDP
    ring = lambda n: (n - 1) / n  # noqa: E731
    comm = 0.0
    if f > 1:
        comm += (2 * 2 * params * ring(f) + 4 * params * ring(f)) / device_set.link
    if d > 1:
        comm += 4 * params / f * 2 * ring(d) / device_set.link
    if t > 1:
        local_tokens = tokens / (d * f)
        per_layer = 2 * local_tokens * model_cfg.d_model * 2 * ring(t)  # one bf16 all-reduce
        comm += 4 * per_layer * model_cfg.num_layers / s * REMAT_COMPUTE[remat] / 3.0 / device_set.link
    return {"step_seconds_compute": compute, "step_seconds_comm": comm, "step_seconds_estimate": compute + comm,
            "bubble": bubble}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_meshes(model_cfg, num_devices: int, batch_size: int, *, tensor_sizes=(1, 2, 4, 8),
                     stage_sizes=(1, 2, 4), data_parallel_row: bool = True) -> list[dict[str, int]]:
    """Meshes ``{data, fsdp, tensor, stage}`` over ``num_devices``: every ``tensor`` in ``tensor_sizes`` that
    divides the heads, KV heads and MLP width, every ``stage`` in ``stage_sizes`` that divides the layers, FSDP
    over the rest (ZeRO-3 style; batch rows split over ``data x fsdp``, so that product must divide
    ``batch_size``); plus pure data parallelism (``data = num_devices``) as the baseline when it fits the batch."""
    out = []
    for tensor in tensor_sizes:
        if num_devices % tensor or any(x % tensor for x in (model_cfg.num_heads, model_cfg.num_kv_heads,
                                                             model_cfg.mlp_dim)):
            continue
        for stage in stage_sizes:
            if (num_devices // tensor) % stage or model_cfg.num_layers % stage:
                continue
            fsdp = num_devices // (tensor * stage)
            if batch_size % fsdp:
                continue
            out.append({"data": 1, "fsdp": fsdp, "tensor": tensor, "stage": stage})
    if data_parallel_row and num_devices > 1 and batch_size % num_devices == 0:
        out.append({"data": num_devices, "fsdp": 1, "tensor": 1, "stage": 1})
    return out


def state_bytes_per_device(model_cfg, mesh: dict[str, int], optimizer_moments: int = 2) -> float:
    """Parameters plus ``optimizer_moments`` same-size optimizer tensors per device, when every weight is split
    over ``fsdp x tensor x stage`` (an upper bound for the small unsplittable leaves: norms)."""
    import jax.numpy as jnp

    params = model_cfg.num_params()
    width = jnp.dtype(model_cfg.weight_dtype).itemsize
    shards = mesh["fsdp"] * mesh["tensor"] * mesh["stage"]
    return params * width * (1 + optimizer_moments) / shards


def plan(base_config, device_set: DeviceSet, meshes: list[dict[str, int]], remats: list[str], *,
         max_compiles: int = 32, microbatches: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """Compiles the train step of ``base_config`` (a ``configs/train.py`` ConfigDict) for every mesh x remat
    policy (at most ``max_compiles`` compiles, in the order given) and returns one row each, best first (see the
    module docstring). ``microbatches`` for pipelined meshes (``stage > 1``; 0 = the most, up to 2 x stage, that
    divide each batch shard)."""
    from tqdm import tqdm

    from llmopt_jax.models.config import ModelConfig
    from llmopt_jax.train.aot import compile_train_step_abstract

    rows, compiled = [], 0
    jobs = [(m, r) for m in meshes for r in remats]
    for mesh, remat in tqdm(jobs, desc="plan", disable=not progress, leave=False):
        config = copy.deepcopy(base_config)
        config.model.remat = remat
        for axis in ("data", "fsdp", "tensor", "stage", "expert"):
            config.mesh[axis] = mesh.get(axis, 1)
        if mesh["stage"] > 1:  # default: the most microbatches up to 2 x stage that split each batch shard
            per_shard = int(config.data.batch_size) // (mesh["data"] * mesh["fsdp"])
            config.train.microbatches = microbatches or max(
                m for m in range(1, 2 * mesh["stage"] + 1) if per_shard % m == 0)
        model_cfg = ModelConfig.from_mapping(config.model)
        row: dict[str, Any] = {"mesh": dict(mesh), "remat": remat,
                               "microbatches": int(config.train.get("microbatches", 1)) if mesh["stage"] > 1 else 1}
        state = state_bytes_per_device(model_cfg, mesh)
        row["state_bytes_estimate"] = state
        if state > device_set.memory:
            row.update(status="state alone does not fit", fits=False)
        elif compiled >= max_compiles:
            row.update(status="not compiled (max_compiles)", fits=None)
        else:
            t0 = time.perf_counter()
            try:
                report = compile_train_step_abstract(config)
            except ConfigError as e:
                row.update(status=f"invalid: {e}", fits=False)
            else:
                compiled += 1
                total = report["total_bytes_per_device"]
                times = step_time_estimate(model_cfg, mesh, device_set, batch=int(config.data.batch_size),
                                           seq_len=int(config.data.seq_len), remat=remat,
                                           microbatches=row["microbatches"])
                step = times["step_seconds_estimate"]
                report["mesh_description"] = report.pop("mesh")
                row.update(report, **times, status="compiled", fits=total <= device_set.memory,
                           seconds_compile=time.perf_counter() - t0,
                           tokens_per_s_estimate=report["tokens_per_step"] / step,
                           mfu_estimate=report["model_flops_per_step"] / device_set.count / step / device_set.peak_flops)
        rows.append(row)
    return sorted(rows, key=_rank)


def _rank(row: dict) -> tuple:
    fits = {True: 0, None: 1, False: 2}[row["fits"]]
    return fits, row.get("step_seconds_estimate", math.inf), row["state_bytes_estimate"]


def mesh_name(mesh: dict[str, int]) -> str:
    """``fsdp=4 tensor=2`` (axes of size 1 left out; ``single`` for one device)."""
    return " ".join(f"{k}={v}" for k, v in mesh.items() if v > 1) or "single"


def markdown(rows: list[dict], device_set: DeviceSet) -> str:
    """The plan as a Markdown table, best first."""
    gb = 1e9
    lines = ["| mesh | remat | fits | params+opt GB/dev | temp GB/dev | total GB/dev | XLA TFLOP/dev (loop bodies once) | "
             "step s: compute + comm | MFU est. | status |", "|" + "---|" * 10]
    for r in rows:
        if r["status"] == "compiled":
            cells = [f"{(r['param_bytes_per_device'] + r['optimizer_bytes_per_device']) / gb:.1f}",
                     f"{r['temp_bytes_per_device'] / gb:.1f}", f"{r['total_bytes_per_device'] / gb:.1f}",
                     f"{r['xla_flops_per_step_per_device'] / 1e12:.1f}",
                     f"{r['step_seconds_compute']:.3f} + {r['step_seconds_comm']:.3f}",
                     f"{r['mfu_estimate']:.0%}"]
        else:
            cells = [f"~{r['state_bytes_estimate'] / gb:.1f}", "", "", "", "", ""]
        fits = {True: "yes", False: "no", None: "?"}[r["fits"]]
        lines.append(f"| {mesh_name(r['mesh'])} | {r['remat']} | {fits} | " + " | ".join(cells) + f" | {r['status']} |")
    return "\n".join(lines) + f"\n\nDevice memory {device_set.memory / gb:.0f} GB, peak {device_set.peak_flops / 1e12:.0f} " \
        f"TFLOP/s, {device_set.bandwidth / 1e12:.2f} TB/s memory and {device_set.link / 1e9:.0f} GB/s links per device; " \
        f"{device_set.count} devices.\n"
