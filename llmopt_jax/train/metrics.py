"""Training metrics: a JSON-lines log that survives resumes, peak-FLOP/s measurement, and MFU."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from llmopt_jax.timing import best_seconds


class MetricsLog:
    """Appends one JSON object per step to ``path``.

    On resume, :meth:`truncate_after` drops lines logged after the restored checkpoint (a killed run may
    have logged steps it never saved), so the file always describes the run that produced the parameters.
    """

    def __init__(self, path: str):
        self.path = path

    def read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, step: int) -> None:
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def measure_peak_flops(dtype=jnp.float32, size: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of a square matmul on the default device, best of ``repeats`` (a practical peak for MFU).

    On CPU the fake devices of a multi-device test share the same cores, so this is the whole machine's
    peak; on accelerators it is one device's.
    """
    device = jax.devices()[0]
    if size is None:
        size = 1024 if device.platform == "cpu" else 8192
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    matmul = jax.jit(lambda x: x @ x)
    return 2.0 * size**3 / best_seconds(lambda: matmul(a), repeats)


def total_peak_flops(per_device: float) -> float:
    """Peak FLOP/s of the whole mesh: per-device peak times devices, except fake CPU devices (shared cores)."""
    devices = jax.devices()
    if devices[0].platform == "cpu":
        return per_device
    return per_device * len(devices)


def model_flops_utilization(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """MFU: model FLOP/s achieved divided by the hardware's peak FLOP/s."""
    return tokens_per_s * flops_per_token / peak_flops if peak_flops > 0 else 0.0
