"""experiments.compress on the real model (smoke preset) and its one-line errors."""

import json

import pytest

from conftest import assert_one_line_error, run_cli

pytestmark = pytest.mark.slow


def test_compress_smoke_prunes_and_saves(tmp_path):
    saved = tmp_path / "pruned.gguf"
    proc = run_cli(["experiments.compress", "--config=configs/compress.py:smoke", "--config.pattern=2:4",
                    "--config.progress=False", f"--config.save={saved}", f"--workdir={tmp_path}/run"])
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in ("method", "perplexity", "num_eval_tokens", "sparsity", "bits_per_weight", "model_bytes",
                "seconds_compress"):
        assert key in results, key
    assert results["method"] == "sparsegpt" and results["pattern"] == "2:4"
    assert abs(results["sparsity"] - 0.5) < 1e-3 and results["num_eval_tokens"] == 4 * 511
    assert 10 < results["perplexity"] < 200
    layers = json.loads((tmp_path / "run" / "layers.json").read_text())
    assert len(layers) == 30 * 7 and all(0 < r["relative_error"] < 1 for r in layers)

    from llmopt_jax.io.gguf import config_from_gguf, params_from_gguf, read_gguf

    f = read_gguf(str(saved))
    params = params_from_gguf(f, config_from_gguf(f))
    q = params["layers"]["q_proj"]["kernel"]  # [layers, d, heads, head_dim]; 2:4 along the input axis d
    groups = (q.reshape(30, 576 // 4, 4, -1) != 0).sum(axis=2)
    assert (groups <= 2).all()


def test_compress_smoke_gptq_runs_from_packed_weights(tmp_path):
    proc = run_cli(["experiments.compress", "--config=configs/compress.py:smoke", "--config.method=gptq",
                    "--config.bits=3", "--config.group_size=64", "--config.act_order=True", "--config.progress=False",
                    f"--workdir={tmp_path}/run"])
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == "gptq" and results["bits"] == 3 and results["group_size"] == 64
    assert results["bits_per_weight"] == pytest.approx(3 + 24 / 64)  # codes + f16 scale and u8 zero-point per 64
    # float32 SmolLM2 holds 513 MiB; the packed blocks shrink it to ~155 MiB (the f32 embedding stays)
    assert 140 * 2**20 < results["model_bytes"] < 170 * 2**20
    assert 10 < results["perplexity"] < 100


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("--config.method=gptq --config.bits=9", "bits must be an integer in 2..8"),
        ("--config.method=rtn --config.bits=4 --config.group_size=100", "group_size 100 does not divide"),
        ("--config.bits=4", "needs a quantizing method"),
        ("--config.method=smoothquant --config.bits=4", "smoothquant is W8A8"),
        ("--config.sparsity=1.5", "sparsity must be in [0, 1)"),
        ("--config.pattern=3:2", "need 0 < N < M"),
        ("--config.method=prune", "unknown method 'prune'"),
        ("--config.calib.seq_len=100000", "calib.seq_len=100000 must be in [2, 8192]"),
        ("--config.calib.text_file={short}", "fewer than one window of 128"),
        ("--config.calib.text_file=/no/such.txt", "text file not found"),
    ],
)
def test_bad_input_one_line(tmp_path, override, fragment):
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate on.")
    overrides = override.format(short=short).split()
    proc = run_cli(["experiments.compress", "--config=configs/compress.py:smoke", *overrides,
                    f"--workdir={tmp_path}/run"])
    assert_one_line_error(proc, fragment)
