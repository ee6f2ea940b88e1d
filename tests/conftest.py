"""Test setup: 8 fake CPU devices for sharding tests, float32 matmuls at full precision, helpers."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, preset: str):
    """``configs/NAME.py``'s ``get_config(preset)`` (the same object the CLI builds, unlocked)."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def run_cli(args, env_extra=None, timeout=600, **kwargs):
    """Runs ``python -m ARGS...`` from the repository root; returns the CompletedProcess."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # subprocesses see one CPU device unless the test says otherwise
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kwargs
    )


@pytest.fixture
def tiny_config():
    return load_config("train", "tiny")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32), loaded once per test session."""
    from llmopt_jax.io.load import load_pretrained

    return load_pretrained("smollm2-135m")
