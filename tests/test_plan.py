"""experiments.plan: candidate meshes, the ranking, and a smoke plan compiled on 8 fake CPU devices."""

import json

from conftest import run_cli
from llmopt_jax.models.config import ModelConfig
from llmopt_jax.models.presets import MODEL_PRESETS
from llmopt_jax.train.plan import DEVICE_SETS, candidate_meshes, state_bytes_per_device


def test_candidate_meshes_respect_heads_layers_and_batch():
    cfg = ModelConfig.from_mapping(MODEL_PRESETS["llama2_70b"])  # 64 heads, 8 KV heads, 80 layers
    meshes = candidate_meshes(cfg, 64, 64, tensor_sizes=(1, 2, 4, 8, 16), stage_sizes=(1, 2, 4, 3))
    assert all(m["data"] * m["fsdp"] * m["tensor"] * m["stage"] == 64 for m in meshes)
    assert not any(m["tensor"] == 16 for m in meshes)  # 8 KV heads do not split 16 ways
    assert not any(m["stage"] == 3 for m in meshes)
    assert {"data": 64, "fsdp": 1, "tensor": 1, "stage": 1} in meshes
    assert candidate_meshes(cfg, 64, 8, stage_sizes=(1,), tensor_sizes=(1,)) == []  # FSDP=64 needs 64 rows
    # 70B float32 params + 2 Adam moments over 64 devices: ~13 GB each
    assert 12e9 < state_bytes_per_device(cfg, {"data": 1, "fsdp": 64, "tensor": 1, "stage": 1}) < 14e9


def test_smoke_plan_ranks_fitting_meshes_by_estimated_step_time(tmp_path):
    proc = run_cli(["experiments.plan", "--config=configs/plan.py:smoke",
                    "--config.plan.meshes=fsdp=8;fsdp=4,tensor=2;fsdp=4,stage=2;data=8", f"--workdir={tmp_path}"],
                   fast_compile=True)  # compiles only: 50 s -> 25 s
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    assert len(rows) == 4 and all(r["status"] == "compiled" and r["fits"] for r in rows)
    steps = [r["step_seconds_estimate"] for r in rows]
    assert steps == sorted(steps) and all(s > 0 for s in steps)
    by_mesh = {tuple(sorted(r["mesh"].items())): r for r in rows}
    fsdp = by_mesh[(("data", 1), ("fsdp", 8), ("stage", 1), ("tensor", 1))]
    dp = by_mesh[(("data", 8), ("fsdp", 1), ("stage", 1), ("tensor", 1))]
    assert fsdp["param_bytes_per_device"] * 7 < dp["param_bytes_per_device"]  # FSDP shards what DP replicates
    piped = by_mesh[(("data", 1), ("fsdp", 4), ("stage", 2), ("tensor", 1))]
    assert piped["microbatches"] == 2
    assert (tmp_path / "plan.md").read_text().count("| compiled |") == 4


def test_bad_plan_settings_one_line(tmp_path):
    for override, fragment in (("--config.plan.devices=9xTPU", "plan.devices='9xTPU'"),
                               ("--config.plan.meshes=fsdp=4", "uses 4 devices"),
                               ("--config.plan.remat=sometimes", "plan.remat: unknown ['sometimes']")):
        proc = run_cli(["experiments.plan", "--config=configs/plan.py:smoke", override, f"--workdir={tmp_path}/w"])
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and fragment in last, proc.stderr
    assert "8xH100" in DEVICE_SETS
