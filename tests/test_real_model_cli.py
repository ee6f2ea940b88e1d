"""The perplexity, generate and bench_decode commands on the real model, and their one-line errors."""

import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


def read_results(workdir):
    with open(workdir / "results.json") as f:
        return json.load(f)


def test_perplexity_cli_on_a_user_text_file(tmp_path):
    text = tmp_path / "story.txt"
    text.write_text(" ".join(f"The {i}th cat sat on the mat and looked at the dog." for i in range(200)))
    proc = run_cli(["experiments.perplexity", "--config=configs/perplexity.py:smoke", f"--config.eval.text_file={text}",
                    "--config.eval.seq_len=128", "--config.eval.max_windows=3", "--config.eval.batch_size=2",
                    f"--workdir={tmp_path}/run"])
    assert proc.returncode == 0, proc.stderr
    results = read_results(tmp_path / "run")
    assert results["num_eval_tokens"] == 3 * 127 and results["num_windows"] == 3
    assert 1.0 < results["perplexity"] < 20.0  # a repetitive text is easy to predict
    assert results["seconds"] > 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["eval"]["seq_len"] == 128


def test_generate_cli_answers_and_compiles_decode_once(tmp_path):
    proc = run_cli(["experiments.generate", "--config=configs/generate.py:smoke",
                    "--config.prompt=What is the capital of France?", f"--workdir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr
    results = read_results(tmp_path)
    assert results["text"] == "The capital of France is Paris."
    assert "Paris" in proc.stdout
    assert results["num_compiled"] == {"prefill": 1, "decode": 1}
    assert results["stopped"] == [True]
    assert results["prefill_tokens_per_s"] > 0 and results["decode_tokens_per_s"] > 0


def test_generate_cli_sampling_batch(tmp_path):
    proc = run_cli(["experiments.generate", "--config=configs/generate.py:smoke", "--config.greedy=False",
                    "--config.temperature=1.0", "--config.top_p=0.9", "--config.top_k=50", "--config.num_samples=3",
                    "--config.stream=False", "--config.seed=3", f"--workdir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr
    results = read_results(tmp_path)
    assert len(results["texts"]) == 3 and len(set(results["texts"])) > 1


def test_bench_decode_smoke(tmp_path):
    proc = run_cli(["experiments.bench_decode", "--config=configs/bench_decode.py:smoke", "--config.llama_cpp=False",
                    f"--workdir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr
    results = read_results(tmp_path)
    row = results["rows"][0]
    assert row["engine"] == "jax" and row["decode_tokens_per_s"] > 0 and 0 < row["fraction_of_bound"]
    assert results["jax_float32_b1_decode_tokens_per_s"] == row["decode_tokens_per_s"]
    packed = results["rows"][1]  # decoded from packed int4 weights (the embedding too where the CPU kernel runs)
    assert packed["dtype"] == "int4_g32" and packed["decode_tokens_per_s"] > 0
    assert packed["weight_bytes"] < 0.35 * row["weight_bytes"]
    assert (tmp_path / "decode.png").stat().st_size > 0


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["experiments.perplexity", "--config=configs/perplexity.py:smoke", "--config.model=/nope/model.gguf"],
         "model '/nope/model.gguf' not found"),
        (["experiments.perplexity", "--config=configs/perplexity.py:smoke", "--config.eval.text_file=/nope.txt"],
         "text file not found: /nope.txt"),
        (["experiments.perplexity", "--config=configs/perplexity.py:smoke", "--config.eval.seqlen=3"],
         "unknown config key 'eval.seqlen'"),
        (["experiments.generate", "--config=configs/generate.py:smoke", "--config.top_p=0"], "top_p must be in (0, 1]"),
        (["experiments.generate", "--config=configs/generate.py:smoke", "--config.max_new_tokens=100000"],
         "exceeds the model's context"),
    ],
)
def test_bad_input_one_line(tmp_path, args, fragment):
    proc = run_cli(args + [f"--workdir={tmp_path}"])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and fragment in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_truncated_gguf_model_is_one_line(tmp_path):
    from llmopt_jax.io.gguf import resolve_model_path

    truncated = tmp_path / "cut.gguf"
    with open(resolve_model_path("smollm2-135m"), "rb") as f:
        truncated.write_bytes(f.read(5_000_000))
    proc = run_cli(["experiments.generate", "--config=configs/generate.py:smoke", f"--config.model={truncated}",
                    f"--workdir={tmp_path}/run"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {truncated}: truncated or corrupted")
