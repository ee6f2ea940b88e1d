"""experiments.quantization_case_study: row order, Pareto front, one-line errors, and a smoke run on the real
model that resumes without recomputing."""

import json

import pytest

from conftest import assert_one_line_error, run_cli
from experiments.quantization_case_study import grid, label, pareto_front, row_key, storage_format


def test_grid_runs_cheap_and_headline_rows_first_and_never_twice():
    from configs.quantization_case_study import get_config

    c = get_config("default")
    rows = grid(c)
    keys = [row_key(r) for r in rows]
    assert len(keys) == len(set(keys))
    assert [r["method"] for r in rows[:2]] == ["float32", "bfloat16"]
    first_gptq = next(i for i, r in enumerate(rows) if r["method"] == "gptq")
    assert all(r["method"] == "rtn" for r in rows[2:first_gptq]) and first_gptq == 2 + 16
    assert label(rows[first_gptq]) == "gptq 3-bit per channel"
    assert label(rows[first_gptq + 1]) == "gptq 3-bit per channel act-order"
    extras = [label(r) for r in rows[first_gptq + 6: first_gptq + 10]]  # after the per-channel GPTQ rows
    assert extras == ["SparseGPT+GPTQ 4-bit per channel + 50% sparse", "SmoothQuant 8-bit per channel W8A8",
                      "gptq 4-bit g64 act-order + int8 embedding", "QAT 3-bit per channel (QAT, then RTN)"]
    assert label(rows[first_gptq + 10]) == "W8A8 8-bit per channel (no smoothing)"
    assert storage_format(rows[first_gptq + 10]) == storage_format(rows[first_gptq + 7]) == "w8a8"


def test_pareto_front():
    points = [(4.0, 20.0), (3.0, 50.0), (4.5, 19.0), (5.0, 25.0), (3.0, 40.0), (32.0, 12.0)]
    assert pareto_front(points) == [(3.0, 40.0), (4.0, 20.0), (4.5, 19.0), (32.0, 12.0)]


@pytest.mark.parametrize("override, fragment", [("--config.extras=nope", "unknown extra row 'nope'"),
                                                ("--config.bits=9", "bits must be an integer in 2..8"),
                                                ("--config.extras=qat", "run the QAT preset first")])
def test_bad_input_one_line(tmp_path, override, fragment):
    proc = run_cli(["experiments.quantization_case_study", "--config=configs/quantization_case_study.py:smoke",
                    override, f"--config.qat_model={tmp_path}/none", f"--workdir={tmp_path}/run"])
    assert_one_line_error(proc, fragment)


@pytest.mark.slow
def test_smoke_study_runs_and_resumes(tmp_path):
    # The study's machinery (row order, resume, table, plot, report_only) on data-free rows only (suite time): GPTQ on
    # the real model runs in the quantization notebook (3-bit act-order, asserted better than RTN) and the compress
    # CLI smoke (packed 3-bit g64), SparseGPT+GPTQ in test_api, SmoothQuant in the notebook.
    args = ["experiments.quantization_case_study", "--config=configs/quantization_case_study.py:smoke",
            "--config.methods=rtn", "--config.extras=", "--config.group_sizes=-1", "--config.act_order=",
            "--config.progress=False", f"--workdir={tmp_path}"]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    by_label = {label(r): r for r in rows}
    assert list(by_label) == ["float32", "bfloat16", "rtn 4-bit per channel"]
    f32 = by_label["float32"]
    assert f32["bits_per_weight"] == 32 and by_label["bfloat16"]["bits_per_weight"] == 16
    rtn = by_label["rtn 4-bit per channel"]
    assert 4 < rtn["bits_per_weight"] < 4.1 and rtn["model_bytes"] < 0.35 * f32["model_bytes"]
    assert f32["perplexity_close"] < rtn["perplexity_close"] < 3 * f32["perplexity_close"]
    assert all(r["decode_tokens_per_s"] > 0 for r in rows)
    assert (tmp_path / "table.md").read_text().count("\n") == 2 + len(rows)
    assert (tmp_path / "perplexity_vs_bits.png").stat().st_size > 10_000

    again = run_cli(args)  # every row is on disk: nothing is recomputed
    assert again.returncode == 0, again.stderr
    assert "to compress)" not in again.stdout

    report = run_cli(args[:-2] + ["--config.group_sizes=-1,64", "--config.report_only=True", f"--workdir={tmp_path}"])
    assert report.returncode == 0, report.stderr
    assert "rows not run yet: rtn 4-bit g64" in report.stdout
    assert len(json.loads((tmp_path / "results.json").read_text())["rows"]) == len(rows)
