"""Bad input to any experiment ends in one ``error:`` line on stderr and exit status 2, before anything slow runs,
with no traceback and no partial output; ``--help`` and ``--print_config`` say how to see the config keys.

One parametrized table per CLI. Unless a case says otherwise, the error comes before the workdir is created (the
run leaves nothing behind) and within a few seconds: no model loads and nothing compiles.
"""

import json
import os

import pytest

from conftest import run_cli
from llmopt_jax.config_checks import check_text_length, parse_list
from llmopt_jax.errors import ConfigError, DataError

# A directory nobody can create files in, root included (chmod does not stop root).
UNWRITABLE = "/proc"


def _inputs(tmp_path) -> dict:
    """Files the cases refer to: ``{short}`` (a sentence), ``{medium}`` (630 bytes), ``{empty}``, ``{afile}`` (a
    file used as a workdir)."""
    (tmp_path / "short.txt").write_text("Too short to evaluate on.\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "afile").write_text("not a directory")
    # More bytes than a window of 512 tokens, fewer tokens: only the tokenizer can tell.
    (tmp_path / "medium.txt").write_text("The quick brown fox jumps over the lazy dog. " * 14)
    return {"short": tmp_path / "short.txt", "empty": tmp_path / "empty.txt", "afile": tmp_path / "afile",
            "medium": tmp_path / "medium.txt", "tmp": tmp_path, "unwritable": UNWRITABLE}


def check_error(tmp_path, module, preset, overrides, expected, *, workdir=None, created=False, timeout=300):
    """Runs ``python -m module --config=preset OVERRIDES --workdir=...`` and checks the one-line error.

    ``expected``: the whole error line (after ``error: ``), formatted with :func:`_inputs`'s paths. ``created``:
    whether the run may have created the workdir (errors that need the model come after the workdir is locked);
    it never holds ``results.json``.
    """
    paths = _inputs(tmp_path)
    workdir = str(workdir or tmp_path / "run").format(**paths)
    args = [module, f"--config={preset}", *[o.format(**paths) for o in overrides], f"--workdir={workdir}"]
    proc = run_cli(args, timeout=timeout)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {expected.format(**paths)}"], proc.stderr[-3000:]
    if os.path.isdir(workdir):
        assert created, f"{workdir} was created by a run that failed validation: {os.listdir(workdir)}"
        assert not os.path.exists(os.path.join(workdir, "results.json"))
    return proc


# ---------------------------------------------------------------------------------------------------------------
# experiments.train

@pytest.mark.parametrize("overrides, expected, workdir", [
    (["--config.train.log_every=0"], "train.log_every=0 must be positive", None),
    (["--config.optim.learning_rate=-0.001"], "optim.learning_rate=-0.001 must be positive", None),
    (["--config.optim.learning_rate=0"], "optim.learning_rate=0.0 must be positive", None),
    (["--config.optim.warmup_steps=-1"], "optim.warmup_steps=-1 must be >= 0", None),
    (["--config.train.steps=0"], "train.steps=0 must be positive", None),
    ([], "--workdir {afile} is a file, not a directory", "{afile}"),
    ([], "workdir {unwritable} is not writable (cannot create {unwritable}/.lock: No such file or directory)",
     "{unwritable}"),
])
def test_train(tmp_path, overrides, expected, workdir):
    check_error(tmp_path, "experiments.train", "configs/train.py:smoke", overrides, expected, workdir=workdir,
                created=workdir == "{unwritable}")  # it exists already


def test_generate(tmp_path):
    check_error(tmp_path, "experiments.generate", "configs/generate.py:smoke", ["--config.num_samples=0"],
                "num_samples must be positive, got 0")


@pytest.mark.slow
def test_train_smoke_preset_with_fewer_steps_than_its_warmup_runs(tmp_path):
    # The smoke preset warms up over 10 steps; a 5-step run warms up over half the run, and says so.
    proc = run_cli(["experiments.train", "--config=configs/train.py:smoke", "--config.train.steps=5",
                    "--config.data.seq_len=32", "--config.data.batch_size=2", "--config.train.progress=False",
                    "--config.train.peak_flops_per_s=1e12", f"--workdir={tmp_path}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "note: optim.warmup_steps=10 does not fit a run of 5 steps: warming up over 2 steps" in proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == 5 and results["warmup_steps"] == 2


# ---------------------------------------------------------------------------------------------------------------
# experiments.perplexity

@pytest.mark.parametrize("overrides, expected, created", [
    (["--config.eval.max_windows=-5"], "eval.max_windows=-5 must be positive, or 0 / -1 for every window", False),
    (["--config.eval.seq_len=1"], "eval.seq_len=1 must be at least 2 (tokens per window)", False),
    (["--config.eval.batch_size=0"], "eval.batch_size=0 must be positive (windows per call)", False),
    (["--config.eval.text_file={empty}"], "the evaluation text {empty} is empty", False),
    (["--config.eval.text_file={short}"], "the evaluation text {short} has 26 bytes, fewer than one window of "
     "eval.seq_len=512 tokens: give a longer text or a smaller eval.seq_len", False),
    (["--config.eval.text_file={tmp}/none.txt"], "text file not found: {tmp}/none.txt", False),
    # The model's context is in the model file: this one loads the model (~10-20 s), and fails before compiling.
    (["--config.eval.seq_len=9000"], "eval.seq_len=9000 must be in [2, 8192] (the model's context)", True),
])
def test_perplexity(tmp_path, overrides, expected, created):
    check_error(tmp_path, "experiments.perplexity", "configs/perplexity.py:smoke", overrides, expected,
                created=created)


# ---------------------------------------------------------------------------------------------------------------
# experiments.compress (more cases: tests/test_compress_cli.py::test_bad_input_one_line)

@pytest.mark.parametrize("overrides, expected", [
    (["--config.save={tmp}/no/such/dir/model.gguf"],
     "cannot save to {tmp}/no/such/dir/model.gguf: directory {tmp}/no/such/dir does not exist"),
    (["--config.save={unwritable}/model.gguf"],
     "cannot save to {unwritable}/model.gguf: directory {unwritable} is not writable"),
    (["--config.eval.text_file={empty}"], "the evaluation text {empty} is empty"),
    (["--config.eval.text_file={short}"], "the evaluation text {short} has 26 bytes, fewer than one window of "
     "eval.seq_len=512 tokens: give a longer text or a smaller eval.seq_len"),
    (["--config.eval.max_windows=-5"], "eval.max_windows=-5 must be positive, or 0 / -1 for every window"),
    ([], "--workdir {afile} is a file, not a directory"),
])
def test_compress(tmp_path, overrides, expected):
    workdir = "{afile}" if "is a file" in expected else None
    check_error(tmp_path, "experiments.compress", "configs/compress.py:smoke", overrides, expected, workdir=workdir)


# ---------------------------------------------------------------------------------------------------------------
# experiments.sparsegpt_case_study

@pytest.mark.parametrize("overrides, expected", [
    (["--config.sparsities=abc"], "sparsities: 'abc' is not a number (comma-separated list, e.g. 0.5,0.7)"),
    # Only the tokenizer can tell: this one loads the model (~10 s) and fails before any calibration.
    (["--config.eval.far_text_file={medium}"], "the far evaluation text {medium} (eval.far_text_file) has 141 "
     "tokens, fewer than one window of eval.seq_len=512: give a longer text or a smaller eval.seq_len"),
    (["--config.sparsities=0.5,x"], "sparsities: 'x' is not a number (comma-separated list, e.g. 0.5,0.7)"),
    (["--config.patterns=2-4"], "pattern must be 'N:M' (e.g. '2:4') or 'unstructured', got '2-4'"),
    (["--config.eval.close_text_file={short}"], "the close evaluation text {short} (eval.close_text_file) has 26 "
     "bytes, fewer than one window of eval.seq_len=512 tokens: give a longer text or a smaller eval.seq_len"),
    (["--config.eval.far_text_file={empty}"], "the far evaluation text {empty} (eval.far_text_file) is empty"),
    (["--config.eval.far_max_windows=-2"], "eval.far_max_windows=-2 must be positive, or 0 / -1 for every window"),
    ([], "--workdir {afile} is a file, not a directory"),
])
def test_sparsegpt_case_study(tmp_path, overrides, expected):
    workdir = "{afile}" if "is a file" in expected else None
    check_error(tmp_path, "experiments.sparsegpt_case_study", "configs/sparsegpt_case_study.py:smoke", overrides,
                expected, workdir=workdir, created="tokens, fewer" in expected)


# ---------------------------------------------------------------------------------------------------------------
# experiments.quantization_case_study (more cases: tests/test_quantization_case_study.py::test_bad_input_one_line)

@pytest.mark.parametrize("overrides, expected", [
    (["--config.bits=abc"], "bits: 'abc' is not an integer (comma-separated list, e.g. 3,4)"),
    (["--config.bits=4,3.5"], "bits: '3.5' is not an integer (comma-separated list, e.g. 3,4)"),
    (["--config.group_sizes=64,x"], "group_sizes: 'x' is not an integer (comma-separated list, e.g. -1,64)"),
    (["--config.act_order=4"], "act_order: '4' is not a valid BITS/GROUP setting (comma-separated list, e.g. "
     "4/-1,3/64)"),
    (["--config.report_only=True"], "report_only=True: workdir {tmp}/run has no finished rows (no "
     "{tmp}/run/rows.jsonl); run the study without report_only first, or give the workdir of a study"),
    (["--config.eval.close_text_file={short}"], "the close evaluation text {short} (eval.close_text_file) has 26 "
     "bytes, fewer than one window of eval.seq_len=512 tokens: give a longer text or a smaller eval.seq_len"),
])
def test_quantization_case_study(tmp_path, overrides, expected):
    check_error(tmp_path, "experiments.quantization_case_study", "configs/quantization_case_study.py:smoke",
                overrides, expected)


def test_report_only_on_rows_of_another_grid(tmp_path):
    # rows.jsonl exists but holds none of this config's rows: still nothing to report.
    run = tmp_path / "run"
    run.mkdir()
    (run / "rows.jsonl").write_text("")
    check_error(tmp_path, "experiments.quantization_case_study", "configs/quantization_case_study.py:smoke",
                ["--config.report_only=True"], "report_only=True: workdir {tmp}/run has no finished rows "
                "({tmp}/run/rows.jsonl holds none of the 9 rows of this config); run the study without report_only "
                "first, or give the workdir of a study", created=True)
    assert sorted(os.listdir(run)) == ["rows.jsonl"]  # no config.json, no table


# ---------------------------------------------------------------------------------------------------------------
# experiments.calibration_study (more cases: tests/test_calibration_study.py::test_bad_config_one_line)

@pytest.mark.parametrize("overrides, expected", [
    (["--config.damp_fractions=0.1,abc"], "damp_fractions: 'abc' is not a number (comma-separated list, e.g. "
     "0.01,0.1)"),
    (["--config.report_only=True"], "report_only=True: workdir {tmp}/run has no finished rows (no "
     "{tmp}/run/rows.jsonl); run the study without report_only first, or give the workdir of a study"),
    (["--config.eval.close_text_file={empty}"], "the close evaluation text {empty} (eval.close_text_file) is empty"),
    (["--config.eval.far_text_file={short}"], "the far evaluation text {short} (eval.far_text_file) has 26 bytes, "
     "fewer than one window of eval.seq_len=128 tokens: give a longer text or a smaller eval.seq_len"),
])
def test_calibration_study(tmp_path, overrides, expected):
    check_error(tmp_path, "experiments.calibration_study", "configs/calibration_study.py:smoke", overrides, expected)


# ---------------------------------------------------------------------------------------------------------------
# The benchmarks

@pytest.mark.parametrize("module, overrides, expected", [
    ("bench_decode", ["--config.batches=abc"], "batches: 'abc' is not an integer (comma-separated list, e.g. 1,8)"),
    ("bench_decode", ["--config.batches=1,0"], "batches: 0 is not positive: a batch must be positive "
     "(comma-separated list, e.g. 1,8)"),
    ("bench_decode", ["--config.packed=int4/x"], "packed row 'int4/x': group size must be an integer"),
    ("bench_decode", ["--config.packed_embedding=maybe"], "packed_embedding must be auto, yes or no, got 'maybe'"),
    ("bench_prune", ["--config.sizes=abc"], "sizes: 'abc' is not an integer (comma-separated list, e.g. 512,4096)"),
    ("bench_prune", ["--config.patterns=2-4"], "pattern must be 'N:M' (e.g. '2:4') or 'unstructured', got '2-4'"),
    ("bench_prune", ["--config.e2e_repeats=0"], "bench_prune needs repeats >= 1, model_repeats >= 1, e2e_repeats >= 1, "
     "sizes >= 8 and tokens >= 0"),
    ("bench_quantize", ["--config.sizes=256,abc"], "sizes: 'abc' is not an integer (comma-separated list, e.g. "
     "576,1536)"),
    ("bench_quantize", ["--config.sizes=-256"], "sizes: -256 is not positive: a size must be positive "
     "(comma-separated list, e.g. 576,1536)"),
])
def test_benchmarks(tmp_path, module, overrides, expected):
    check_error(tmp_path, f"experiments.{module}", f"configs/{module}.py:smoke", overrides, expected)


# ---------------------------------------------------------------------------------------------------------------
# --help and --print_config

EXPERIMENTS = ["train", "perplexity", "generate", "compress", "sparsegpt_case_study", "quantization_case_study",
               "calibration_study", "aot_memory", "bench_decode", "bench_prune", "bench_quantize"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_help_lists_the_flags_and_how_to_see_the_config_keys(name):
    proc = run_cli([f"experiments.{name}", "--help"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in ("--config=", "--workdir=", "--print_config"):
        assert flag in proc.stdout, proc.stdout
    config_file = "configs/train.py" if name == "aot_memory" else f"configs/{name}.py"
    assert f"python -m experiments.{name} --config={config_file}:PRESET --print_config" in proc.stdout


def test_print_config_prints_the_resolved_config_and_creates_no_workdir(tmp_path):
    proc = run_cli(["experiments.compress", "--config=configs/compress.py:smoke", "--config.eval.seq_len=64",
                    "--print_config", f"--workdir={tmp_path}/run"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert "eval.seq_len=64" in lines and 'method="sparsegpt"' in lines and "calib.num_samples=16" in lines
    assert not (tmp_path / "run").exists()
    # No --workdir needed to look at a config.
    proc = run_cli(["experiments.train", "--config=configs/train.py:smoke", "--print_config"], timeout=120)
    assert proc.returncode == 0 and "optim.warmup_steps=10" in proc.stdout.splitlines(), proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# The helpers behind the messages

def test_parse_list():
    assert parse_list("1, 8,", "batches", int, positive=True, item="batch") == [1, 8]
    assert parse_list("", "sizes") == []
    assert parse_list(4, "bits") == [4]
    assert parse_list("0.5,0.7", "sparsities", float) == [0.5, 0.7]
    with pytest.raises(ConfigError, match=r"^batches: 0 is not positive: a batch must be positive \(comma"):
        parse_list("1,0", "batches", int, positive=True, item="batch")
    with pytest.raises(ConfigError, match=r"^sizes: '1e3' is not an integer"):
        parse_list("1e3", "sizes", int)
    with pytest.raises(ConfigError, match=r"^dtypes: unknown dtype 'float8'; choose from float32, bfloat16$"):
        parse_list("float32,float8", "dtypes", str, item="dtype", choices=("float32", "bfloat16"))


def test_check_text_length_never_rejects_a_text_that_could_fill_a_window():
    check_text_length("x" * 127, 128, "text")  # 127 bytes can be 128 tokens with a SentencePiece prefix token
    with pytest.raises(DataError, match="has 126 bytes, fewer than one window of eval.seq_len=128 tokens"):
        check_text_length("x" * 126, 128, "text")
    with pytest.raises(DataError, match="^the text is empty$"):
        check_text_length(" \n", 128, "text")
