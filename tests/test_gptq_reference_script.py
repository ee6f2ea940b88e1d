"""scripts/gptq_reference_perplexity.py's --compare-only: our rows and the ratios refreshed from rows files, the
reference rows untouched (the reference run itself needs torch, transformers and a checkout; not run here)."""

import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")


def row(method, bits, close, far, seed=0):
    return {"method": method, "bits": bits, "group_size": -1, "act_order": False, "perplexity_close": close,
            "perplexity_far": far, "settings": {"compute_dtype": "mixed", "calib": {"seed": seed}}}


def test_compare_only_refreshes_ours_and_ratios(tmp_path):
    out = tmp_path / "ref.json"
    reference = {"reference_close": 60.0, "reference_far": 150.0, "reference_seconds": 1.0}
    stale = {"ours_close": 1.0, "ours_far": 1.0, "ratio_close": 9.0, "ratio_far": 9.0}
    out.write_text(json.dumps({"rows": {
        "gptq 3-bit per channel": {**reference, **stale},
        "gptq 3-bit per channel seed 1": dict(reference),
        "rtn 3-bit per channel": {**reference, **stale},  # no row of ours any more: stale entries go
    }, "dense": {"close": 12.7}}))
    for name, rows in (("s0.jsonl", [row("gptq", 3, 66.0, 120.0)]), ("s1.jsonl", [row("gptq", 3, 54.0, 165.0, 1)])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gptq_reference_perplexity.py"),
                           f"--out={out}", f"--compare-only=0={tmp_path / 's0.jsonl'},1={tmp_path / 's1.jsonl'}"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    seed0, seed1 = result["rows"]["gptq 3-bit per channel"], result["rows"]["gptq 3-bit per channel seed 1"]
    assert seed0["ours_close"] == 66.0 and abs(seed0["ratio_close"] - 1.1) < 1e-12 and abs(seed0["ratio_far"] - 0.8) < 1e-12
    assert seed1["ours_far"] == 165.0 and abs(seed1["ratio_far"] - 1.1) < 1e-12 and seed1["ours_compute_dtype"] == "mixed"
    assert set(result["rows"]["rtn 3-bit per channel"]) == set(reference)
    assert result["rows"]["gptq 3-bit per channel"]["reference_close"] == 60.0 and result["dense"] == {"close": 12.7}
