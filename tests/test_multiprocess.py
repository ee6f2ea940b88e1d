"""Multi-process training on one machine, and elastic restore.

Two processes with 4 fake CPU devices each meet through ``jax.distributed`` on 127.0.0.1 and train the smoke
model with FSDP over all 8 devices: their losses equal one process with 8 devices. The checkpoint those two
processes wrote then restores in one process with 4 devices on a data x tensor mesh, and the next step's loss
equals the 8-device runs'.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from benchmarks.serve_load import free_port
from conftest import FAST_COMPILE, ROOT, run_cli

STEPS = ["--config.train.steps=3", "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=5",
         "--config.train.async_checkpoint=False", "--config.train.log_every=1", "--config.train.progress=False"]
TRAIN = ["experiments.train", "--config=configs/train.py:smoke", *STEPS]


def devices(n: int) -> dict:
    """``n`` CPU devices; XLA without LLVM optimisation (3 steps of the smoke model: compilation is the time)."""
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n} {FAST_COMPILE}", "JAX_PLATFORMS": "cpu"}


def losses(workdir) -> list[float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def run_two_processes(workdir, timeout: float = 300.0) -> list[subprocess.CompletedProcess]:
    """Both processes of a 2-host run, each with 4 CPU devices; killed together if one fails or time runs out."""
    port = free_port()
    env = {**os.environ, **devices(4), "TF_CPP_MIN_LOG_LEVEL": "2"}
    procs = []
    for rank in range(2):
        args = [sys.executable, "-m", *TRAIN, "--config.distributed=True",
                f"--config.cluster.coordinator_address=127.0.0.1:{port}", "--config.cluster.num_processes=2",
                f"--config.cluster.process_id={rank}", f"--workdir={workdir}"]
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one failed: the other would wait for it at the next collective
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [subprocess.CompletedProcess(p.args, p.wait(), *p.communicate()) for p in procs]


@pytest.mark.slow
def test_two_processes_equal_one_and_their_checkpoint_restores_on_another_mesh(tmp_path):
    one = tmp_path / "one_process"
    proc = run_cli([*TRAIN, f"--workdir={one}"], env_extra=devices(8))
    assert proc.returncode == 0, proc.stderr
    reference = losses(one)
    assert len(reference) == 3

    two = tmp_path / "two_processes"
    results = run_two_processes(two)
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"process {rank}:\n{r.stderr[-3000:]}"
    np.testing.assert_allclose(losses(two), reference, rtol=2e-5)
    summary = json.loads((two / "results.json").read_text())
    assert summary["num_processes"] == 2 and summary["num_devices"] == 8 and "fsdp=8" in summary["mesh"]

    # Elastic restore: the step-2 checkpoint of the 2-process FSDP run, resumed by one process on 4 devices
    # (data=2 x tensor=2); its step 3 must match the 8-device runs' step 3.
    elastic = tmp_path / "elastic"
    shutil.copytree(two, elastic, ignore=shutil.ignore_patterns("*.lock*"))
    shutil.rmtree(elastic / "checkpoints" / "3")
    proc = run_cli([*TRAIN, "--config.mesh.fsdp=1", "--config.mesh.data=2", "--config.mesh.tensor=2",
                    f"--workdir={elastic}"], env_extra=devices(4))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((elastic / "results.json").read_text())
    assert summary["resumed_from_step"] == 2 and summary["num_devices"] == 4
    assert "data=2" in summary["mesh"] and "tensor=2" in summary["mesh"]
    resumed = losses(elastic)
    assert len(resumed) == 3
    np.testing.assert_allclose(resumed[2], reference[2], rtol=2e-5)


def test_cluster_settings_are_all_or_nothing(tmp_path):
    proc = run_cli([*TRAIN, "--config.distributed=True", "--config.cluster.num_processes=2",
                    f"--workdir={tmp_path}/run"])
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "set coordinator_address, num_processes and process_id together" in last
