"""experiments.sweep: grid parsing and typing against the train config, a smoke sweep that ranks its runs and
resumes without retraining, and one-line errors."""

import json

import pytest

from conftest import load_config, run_cli
from experiments.sweep import parse_assignments, run_name, typed
from llmopt_jax.errors import ConfigError


def test_grid_values_take_the_train_configs_types():
    base = load_config("train", "tiny")
    assert parse_assignments("optim.learning_rate=1e-3, 3e-3;data.batch_size=4", "g") == [
        ("optim.learning_rate", ["1e-3", "3e-3"]), ("data.batch_size", ["4"])]
    assert typed(base, "optim.learning_rate", "1e-3") == pytest.approx(1e-3)
    assert typed(base, "data.batch_size", "8") == 8 and isinstance(typed(base, "data.batch_size", "8"), int)
    assert typed(base, "train.progress", "False") is False
    with pytest.raises(ConfigError, match="no key 'optim.nope'"):
        typed(base, "optim.nope", "1")
    with pytest.raises(ConfigError, match="is not a int"):
        typed(base, "data.batch_size", "many")
    with pytest.raises(ConfigError, match="cannot read 'lr'"):
        parse_assignments("lr", "sweep.grid")
    assert run_name({"optim.learning_rate": 0.001, "data.batch_size": 8}) == "learning_rate=0.001,batch_size=8"


def test_smoke_sweep_ranks_runs_and_resumes(tmp_path):
    args = ["experiments.sweep", "--config=configs/sweep.py:smoke", "--config.progress=False", f"--workdir={tmp_path}"]
    proc = run_cli(args, fast_compile=True)  # 2 runs x 3 steps: compilation is the time
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["values"]["optim.learning_rate"] for r in results["rows"]] == [0.001, 0.01]
    metrics = [r["final_loss_mean_last10"] for r in results["rows"]]
    assert metrics[0] != metrics[1]  # the learning rate changed the run
    assert results["best"]["optim.learning_rate"] == results["rows"][metrics.index(min(metrics))]["values"][
        "optim.learning_rate"]
    for r in results["rows"]:
        assert json.loads((tmp_path / "runs" / run_name(r["values"]) / "results.json").read_text())["steps"] == 3
    assert (tmp_path / "sweep.png").stat().st_size > 5_000
    again = run_cli(args, fast_compile=True)
    assert again.returncode == 0 and "final_loss_mean_last10=" not in again.stdout, again.stderr


def test_unknown_key_is_one_line(tmp_path):
    proc = run_cli(["experiments.sweep", "--config=configs/sweep.py:smoke", "--config.sweep.grid=optim.lr=1,2",
                    f"--workdir={tmp_path}"])
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "error: sweep: the train config has no key 'optim.lr'", proc.stderr
