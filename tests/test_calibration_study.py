"""experiments.calibration_study: variant parsing, one-line errors, and a smoke run on the real model that resumes."""

import json

import pytest

from conftest import assert_one_line_error, run_cli
from experiments.calibration_study import parse_variant
from llmopt_jax.errors import ConfigError


def test_parse_variant():
    assert parse_variant("topics+code+prose/128x512") == {
        "variant": "topics+code+prose/128x512", "sources": "topics,code,prose", "num_samples": 128, "seq_len": 512}
    for bad in ("topics/128", "topics:128x512", "topics/0x512", "Topics/4x4"):
        with pytest.raises(ConfigError, match="must look like SOURCES/NxL"):
            parse_variant(bad)
    with pytest.raises(ConfigError, match="2 windows cannot cover 3 sources"):
        parse_variant("topics+code+prose/2x64")


def test_study_rows_dampening_after_its_set_and_never_twice():
    from configs.calibration_study import get_config
    from experiments.calibration_study import study_rows

    c = get_config("smoke")
    c.damp_fractions, c.damp_variant = "0.1,0.01,0.1", "topics/4x64"
    keys = [(r["variant"], r["method"], r["damp_fraction"]) for r in study_rows(c)]
    assert keys == [("topics/4x64", "sparsegpt", 0.01), ("topics/4x64", "wanda", None), ("topics/4x64", "sparsegpt", 0.1),
                    ("topics+prose/4x64", "sparsegpt", 0.01), ("topics+prose/4x64", "wanda", None)]


@pytest.mark.slow
def test_smoke_study_runs_and_resumes(tmp_path):
    # Wanda (no solver) keeps this to seconds; SparseGPT goes through the same compress_and_evaluate call.
    args = ["experiments.calibration_study", "--config=configs/calibration_study.py:smoke", "--config.methods=wanda",
            f"--workdir={tmp_path}"]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    assert [(r["variant"], r["method"]) for r in rows] == [("topics/4x64", "wanda"), ("topics+prose/4x64", "wanda")]
    for r in rows:
        assert abs(r["sparsity"] - 0.5) < 1e-3 and 10 < r["perplexity_close"] < 1000 and 10 < r["perplexity_far"] < 1000
    # Different calibration sets give different pruned models.
    assert rows[0]["perplexity_far"] != rows[1]["perplexity_far"]
    assert (tmp_path / "calibration.png").stat().st_size > 10_000 and "topics+prose/4x64" in (tmp_path / "table.md").read_text()

    again = run_cli(args)  # every row is on disk: nothing is pruned again, same table
    assert again.returncode == 0, again.stderr
    assert "damp=" not in again.stdout
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == rows


@pytest.mark.parametrize("override, fragment", [
    ("--config.variants=topics/4x64,news/4x64", "unknown calibration source 'news'"),
    ("--config.variants=topics/4", "must look like SOURCES/NxL"),
    ("--config.methods=sparsegpt,obs", "unknown method 'obs'"),
    ("--config.sparsity=1.0", "sparsity must be in [0, 1)"),
    ("--config.damp_fractions=0.1,x", "damp_fractions: 'x' is not a number"),
])
def test_bad_config_one_line(tmp_path, override, fragment):
    proc = run_cli(["experiments.calibration_study", "--config=configs/calibration_study.py:smoke", override,
                    f"--workdir={tmp_path}"])
    assert_one_line_error(proc, fragment)
