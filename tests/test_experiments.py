"""The public commands end to end: smoke training, exact resume after SIGKILL, clear CLI errors, AOT memory."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, load_config, run_cli

QUIET = ["--config.train.progress=False"]


@pytest.mark.slow
def test_smoke_preset_trains_and_writes_results(tmp_path):
    t0 = time.time()
    proc = run_cli(["experiments.train", "--config=configs/train.py:smoke", f"--workdir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.time() - t0 < 180
    results = json.loads((tmp_path / "results.json").read_text())
    for key in ("initial_loss", "final_loss", "steps", "tokens_per_s", "mfu", "num_params"):
        assert key in results
    assert results["steps"] == 60
    assert results["final_loss"] < results["initial_loss"] - 1.5
    assert results["tokens_per_s"] > 0 and 0 < results["mfu"] < 1
    assert 1_000_000 < results["num_params"] < 10_000_000
    assert json.loads((tmp_path / "config.json").read_text())["model"]["d_model"] == 256
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 60


def _final_state(workdir, step):
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def _checkpoint_steps(workdir):
    path = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    steps = 300
    args = ["experiments.train", "--config=configs/train.py:tiny", f"--config.train.steps={steps}",
            "--config.train.checkpoint_every=10", "--config.train.peak_flops_per_s=1e12", *QUIET]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = run_cli(args + [f"--workdir={straight}"])
    assert proc.returncode == 0, proc.stderr[-3000:]

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)
    victim = subprocess.Popen([sys.executable, "-m", *args, f"--workdir={killed}"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(s >= 30 for s in _checkpoint_steps(killed)):
        assert victim.poll() is None, "run finished before it could be killed"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    killed_at = max(_checkpoint_steps(killed))
    assert killed_at < steps

    proc = run_cli(args + [f"--workdir={killed}"])  # the very same command resumes
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((straight / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    assert b["resumed_from_step"] >= killed_at and b["resumed_from_step"] < steps
    assert a["final_loss"] == b["final_loss"] and a["initial_loss"] == b["initial_loss"]
    losses = lambda d: [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]  # noqa
    assert losses(straight) == losses(killed)
    sa, sb = _final_state(straight, steps), _final_state(killed, steps)
    leaves_a, leaves_b = _leaves(sa), _leaves(sb)
    assert len(leaves_a) == len(leaves_b) > 10
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("--config.model.hidden=3", "unknown config key 'model.hidden'"),
        ("--config.model.d_modle=3", 'did you mean "d_model"'),
        ("--config.nonsense.depth=3", "unknown config key"),
        ("--config.mesh.data=3", "does not divide 8"),
        ("--config.mesh.tensor=8", "not divisible by mesh axes ('tensor',) of size 8"),
        ("--config.data.text_files=/no/such/file.txt", "text file not found: /no/such/file.txt"),
        ("--config.model.num_layers=abc", "invalid literal"),
        ("--config.data.batch_size=3", "not divisible by the batch mesh axes"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(tmp_path, override, fragment):
    proc = run_cli(
        ["experiments.train", "--config=configs/train.py:tiny", override, *QUIET, f"--workdir={tmp_path}"],
        env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("error: ") and fragment in lines[-1], proc.stderr[-2000:]


def test_missing_config_file_and_unknown_preset(tmp_path):
    for config in ("configs/nope.py:smoke", "configs/train.py:huge"):
        proc = run_cli(["experiments.train", f"--config={config}", f"--workdir={tmp_path}"])
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_aot_memory_of_llama2_7b_on_fake_fsdp_mesh():
    """Abstract compilation of the 7B train step over 8 fake devices (this process has 8)."""
    from llmopt_jax.train.aot import compile_train_step_abstract

    report = compile_train_step_abstract(load_config("train", "llama2_7b"))
    assert report["num_params"] == 6_738_415_616
    assert report["mesh"].startswith("data=1 fsdp=8")
    # fp32 params split 8 ways; AdamW keeps two moments of the same size.
    assert report["param_bytes_per_device"] == pytest.approx(4 * report["num_params"] / 8, rel=1e-3)
    assert report["optimizer_bytes_per_device"] == pytest.approx(2 * report["param_bytes_per_device"], rel=1e-3)
    assert 0 < report["temp_bytes_per_device"] < 64 * 2**30


def test_aot_memory_cli(tmp_path):
    proc = run_cli(["experiments.aot_memory", "--config=configs/train.py:tiny", f"--workdir={tmp_path}"],
                   fast_compile=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["num_devices"] == 8 and results["temp_bytes_per_device"] > 0
    assert "param_bytes_per_device" in proc.stdout
