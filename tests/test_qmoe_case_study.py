"""experiments.qmoe_case_study: the SwitchTransformer table from abstract shapes, one-line errors, and a smoke
run on the real model (2 blocks) that writes the contract's rows and resumes without recomputing."""

import json

import pytest

from conftest import assert_one_line_error, run_cli
from llmopt_jax.compress.moe_scale import SWITCH_SPECS, abstract_switch_params, count_params, scale_table


def test_switch_shapes_match_the_published_sizes_and_allocate_nothing():
    tree = abstract_switch_params(SWITCH_SPECS["switch-c-2048"])
    leaf = tree["encoder"][0]["moe"]["wi"]
    assert leaf.shape == (2048, 2080, 6144) and not hasattr(leaf, "addressable_data")  # a ShapeDtypeStruct
    for name, spec in SWITCH_SPECS.items():
        counts = count_params(abstract_switch_params(spec))
        assert abs(counts["total"] / spec.published_params - 1) < 0.02, name
        assert counts["expert"] > 0.9 * counts["total"]
    rows = {r["model"]: r for r in scale_table(0.8, seconds_per_expert={"switch-c-2048": 2.0})}
    c2048 = rows["switch-c-2048"]
    assert 3.1e12 < c2048["bytes_bf16"] < 3.2e12 and 150e9 < c2048["bytes_compressed"] < 165e9  # QMoE: < 160 GB
    assert c2048["num_experts_total"] == 2048 * 30 and c2048["hours_solve_estimate"] == pytest.approx(2048 * 30 * 2 / 3600)
    assert not c2048["per_device"]["1x H200 (141 GB)"]["fits_compressed"]
    assert c2048["per_device"]["4x A6000 (48 GB)"]["fits_compressed"]
    assert "hours_solve_estimate" not in rows["switch-base-128"]


@pytest.mark.parametrize("override, fragment", [("--config.rows=moe,nope", "rows: unknown ['nope']"),
                                                ("--config.moe.top_k=9", "moe.top_k=9 must be in 1..moe.num_experts=8"),
                                                ("--config.qmoe.codec=zip", "qmoe.codec must be one of"),
                                                ("--config.moe.model=/nonexistent", "is not a directory")])
def test_bad_input_one_line(tmp_path, override, fragment):
    proc = run_cli(["experiments.qmoe_case_study", "--config=configs/qmoe_case_study.py:smoke", "--config.rows=moe",
                    override, f"--workdir={tmp_path}/run"])
    assert_one_line_error(proc, fragment)


@pytest.mark.slow
def test_smoke_study_writes_the_contract_rows_and_resumes(tmp_path):
    args = ["experiments.qmoe_case_study", "--config=configs/qmoe_case_study.py:smoke",
            "--config.rows=moe,rtn_ternary,gptq_ternary,gptq_2bit", "--config.progress=False", f"--workdir={tmp_path}"]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["label"]: r for r in results["rows"]}
    assert list(rows) == ["moe", "rtn_ternary", "gptq_ternary", "gptq_2bit"]
    for r in rows.values():
        for key in ("bits_per_expert_param", "ppl_close", "ppl_far", "model_bytes", "zero_fraction",
                    "seconds_compress"):
            assert isinstance(r[key], (int, float)) and r[key] >= 0, (r["label"], key)
        assert r["decode_tokens_per_s"] > 0
    assert rows["moe"]["bits_per_expert_param"] == 32
    for label in ("rtn_ternary", "gptq_ternary"):
        t = rows[label]
        assert t["bits_per_expert_param"] < 1.3 and t["codec"] == "ans" and 0.7 < t["zero_fraction"] < 0.95
        assert t["model_bytes"] < rows["moe"]["model_bytes"] - 0.9 * rows["moe"]["expert_bytes"]
        assert t["other_codec"]["codec"] == "dictionary"
    assert 2 < rows["gptq_2bit"]["bits_per_expert_param"] < 2.2
    assert rows["gptq_ternary"]["seconds_solve"] > 0 and rows["gptq_ternary"]["rtn_fallback_experts"] >= 0
    scale = {r["model"]: r for r in results["switch_scale"]}
    assert scale["switch-c-2048"]["bits_per_expert_param"] == rows["gptq_ternary"]["bits_per_expert_param"]
    assert (tmp_path / "moe_model" / "config.json").exists()
    assert (tmp_path / "perplexity_vs_bits.png").stat().st_size > 10_000
    assert (tmp_path / "table.md").read_text().count("\n") == 2 + len(rows)

    again = run_cli(args)  # every row is on disk: nothing is recomputed, the MoE model is not rebuilt
    assert again.returncode == 0, again.stderr
    assert "bits/expert param" not in again.stdout
