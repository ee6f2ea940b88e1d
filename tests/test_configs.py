"""Config files: the shared blocks of ``configs/common.py`` and loading by path from any working directory."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, load_config
from llmopt_jax.errors import ConfigError

# Loads every config file as the CLIs do (ml_collections' --config flag, by path) and prints one key of each.
LOAD_ALL = """
import glob, sys
from absl import flags
from ml_collections import config_flags
paths = sorted(p for p in glob.glob(sys.argv[1] + "/configs/*.py") if not p.endswith("common.py"))
for i, path in enumerate(paths):
    flag = config_flags.DEFINE_config_file(f"c{i}", None, "", lock_config=True)
    flags.FLAGS(["prog", f"--c{i}={path}"])
    print(path.rsplit("/", 1)[1], flag.value.preset)
"""


def test_config_files_load_by_path_from_another_directory(tmp_path):
    # Neither the working directory nor sys.path holds the repository root: common.py is found next to the files.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", LOAD_ALL, ROOT], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = proc.stdout.split()[::2]
    assert "compress.py" in loaded and "train.py" in loaded and len(loaded) >= 10


def test_shared_blocks():
    assert load_config("compress", "gptq").calib.to_dict() == dict(
        text_file="", sources="topics,code,prose", num_samples=128, seq_len=512, seed=0, batch_size=0,
        compute_dtype="auto")
    assert set(load_config("bench_prune", "smoke").calib) == {"num_samples", "seq_len", "seed", "batch_size",
                                                              "sources"}
    study = load_config("sparsegpt_case_study", "smoke")
    assert study.sparsegpt.to_dict() == dict(blocksize=128, damp_fraction=0.01)
    assert study.eval.to_dict() == dict(close_text_file="", far_text_file="", seq_len=512, batch_size=4,
                                        close_max_windows=2, far_max_windows=2)
    assert load_config("bench_quantize", "smoke").blocksize == 128
    mesh = load_config("perplexity", "smoke").mesh.to_dict()
    assert mesh["data"] == -1 and mesh["fsdp"] == 1 and mesh["dcn_data"] == 1 and len(mesh) == 10
    assert load_config("train", "smoke").mesh.fsdp == -1


def test_shared_blocks_refuse_unknown_keys():
    import importlib.util

    spec = importlib.util.spec_from_file_location("configs_common_test", os.path.join(ROOT, "configs", "common.py"))
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    with pytest.raises(ConfigError, match="unknown keys"):
        common.calib_config(keys=("seed", "windows"))
    with pytest.raises(ConfigError, match="unknown mesh axes"):
        common.mesh_config(pipeline=2)
