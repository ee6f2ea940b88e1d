"""Test setup: 8 fake CPU devices for sharding tests, float32 matmuls at full precision, a shared XLA compilation
cache, helpers and the fixtures several modules share (the tiny model config, the real SmolLM2 read once)."""

import os


def _pin_xdist_worker() -> None:
    """Under pytest-xdist (``make test``: ``-n 2``), gives each worker its own share of the CPUs, before JAX sizes its
    thread pools (XLA counts the CPUs of the affinity mask); subprocesses and notebook kernels inherit it.

    Two workers whose XLA programs each use every core slow each other far more than they gain: a solver's
    per-column loop waits at every parallel op for a thread the other worker has descheduled (measured on 2
    cores with another JAX process busy: GPTQ on a ``[192, 576]`` matrix 21 ms alone, ~500 ms in most runs shared,
    10-11 ms pinned to one core). ``LLMOPT_JAX_TEST_PIN=0`` turns it off."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if not worker.startswith("gw") or count < 2 or os.environ.get("LLMOPT_JAX_TEST_PIN", "1") == "0":
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < count:
        return
    from benchmarks.harness import pin_threads

    pin_threads(set(cpus[int(worker[2:]) % count :: count]))


_pin_xdist_worker()

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
FAST_COMPILE = "--xla_backend_optimization_level=0"
# The suite compiles hundreds of small programs and runs each a few times: LLVM's optimisation passes are most of
# the compile time and buy nothing on a 2-layer model (measured cold on 2 cores: test_moe, test_train,
# test_serve_engine and test_model 231 s -> 124 s). Only this process and its in-process tests: the CLIs and
# notebook kernels the tests start run the real model with XLA's defaults (run_cli and execute_notebook drop
# XLA_FLAGS; run_cli(..., fast_compile=True) asks for it). An explicit level in XLA_FLAGS wins.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + FAST_COMPILE
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The persistent compilation cache the CLIs use (llmopt_jax.cli.enable_compilation_cache), also for this process,
# pytest-xdist workers and notebook kernels (they inherit the environment): an executable compiled once is reused
# by every later test, worker and run. LLMOPT_JAX_COMPILATION_CACHE=off turns it off here as in the CLIs.
_cache = os.environ.get("LLMOPT_JAX_COMPILATION_CACHE", os.path.join("~", ".cache", "llmopt_jax", "xla"))
if _cache.strip().lower() not in ("", "off", "0", "none"):
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser(_cache))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import atexit  # noqa: E402
import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from llmopt_jax.models.config import ModelConfig  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny model most unit tests use (modules that need another shape say so with dataclasses.replace): one shape,
# so the executables compiled for it are shared across modules through the compilation cache.
TINY_CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_seq_len=64)


def load_config(name: str, preset: str):
    """``configs/NAME.py``'s ``get_config(preset)`` (the same object the CLI builds, unlocked)."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


class _ForkServer:
    """The client of ``tests/cli_forkserver.py``: runs ``python -m ARGS...`` in a forked child of a process that has
    imported JAX and the library already (~2 s less per CLI run; the suite starts ~150), all in the environment
    the server started with. Used by :func:`run_cli`; ``LLMOPT_JAX_TEST_FORKSERVER=0`` turns it off."""

    def __init__(self, env: dict):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "cli_forkserver.py"), ROOT], cwd=ROOT, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.buffer = b""
        ready = self._message(deadline=time.monotonic() + 300)
        self.ok = bool(ready and ready.get("ready"))

    def _message(self, deadline: float) -> dict | None:
        """The server's next message, or None at the deadline or when the server has gone."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return None
            data = os.read(fd, 65536)
            if not data:
                self.ok = False
                return None
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def run(self, args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess | None:
        """``args`` run in a forked child; None when the server cannot serve (the caller starts a process)."""
        cmd = [sys.executable, "-m", *args]
        with tempfile.TemporaryDirectory(prefix="llmopt_cli_") as tmp:
            out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
            try:
                request = {"args": args, "env": env, "stdout": out, "stderr": err}
                self.proc.stdin.write((json.dumps(request) + "\n").encode())
                self.proc.stdin.flush()
            except OSError:
                self._abandon(None)
                return None
            started = None
            try:
                started = self._message(deadline=time.monotonic() + 60)
                if started is None:
                    self._abandon(None)
                    return None
                finished = self._message(deadline=time.monotonic() + timeout)
                timed_out = finished is None and self.ok
                if timed_out:
                    os.kill(started["pid"], signal.SIGKILL)
                    finished = self._message(deadline=time.monotonic() + 60)
                if finished is None:
                    raise RuntimeError(f"the CLI fork server died running {args}")
            except BaseException:
                # A test interrupted mid-run (pytest-timeout, Ctrl-C) would leave the child's exit status unread and
                # the next request reading it: stop the child and this server, later runs start plain processes.
                self._abandon(started)
                raise
            read = lambda path: Path(path).read_text(encoding="utf-8", errors="replace")  # noqa: E731
            if timed_out:
                raise subprocess.TimeoutExpired(cmd, timeout, output=read(out), stderr=read(err))
            return subprocess.CompletedProcess(cmd, finished["returncode"], read(out), read(err))

    def _abandon(self, started: dict | None) -> None:
        """Stops the child of ``started`` (if any) and the server; the server serves no more."""
        self.ok = False
        if started is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(started["pid"], signal.SIGKILL)
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


_fork_servers: dict[tuple, _ForkServer] = {}  # one per environment the CLI runs asked for


def _environment_key(env: dict) -> tuple:
    """What a process started with ``env`` imports the libraries under (pytest's per-test ``PYTEST_CURRENT_TEST``
    aside; a forked child gets ``env`` itself)."""
    return tuple(sorted((k, v) for k, v in env.items() if k != "PYTEST_CURRENT_TEST"))


def run_cli(args, env_extra=None, timeout=600, fast_compile=False, **kwargs):
    """Runs ``python -m ARGS...`` from the repository root; returns the CompletedProcess. ``fast_compile``: XLA
    without LLVM optimisation, for runs on small models whose time is compilation. Runs go through a fork server
    (:class:`_ForkServer`, one per environment); runs with ``subprocess`` options start a process."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # subprocesses see one CPU device unless the test says otherwise
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.update(env_extra or {})
    if fast_compile:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()
    if not kwargs and os.environ.get("LLMOPT_JAX_TEST_FORKSERVER", "1") != "0":
        key = _environment_key(env)
        server = _fork_servers.get(key)
        if server is None and len(_fork_servers) < 4:
            server = _fork_servers[key] = _ForkServer(env)
            atexit.register(server.close)
        if server is not None and server.ok:
            proc = server.run(list(args), env, timeout)
            if proc is not None:
                return proc
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kwargs
    )


def assert_one_line_error(proc, fragment: str) -> None:
    """``proc`` (a finished CLI run) exited with status 2 and its last stderr line is ``error: ...`` naming
    ``fragment``."""
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, proc.stderr


def execute_notebook(name: str) -> None:
    """Runs ``notebooks/NAME.ipynb`` top to bottom in a fresh kernel (its own asserts included); raises on the first
    failing cell. The kernel sees one CPU device, like a user's laptop."""
    import nbformat
    from nbclient import NotebookClient

    path = os.path.join(ROOT, "notebooks", f"{name}.ipynb")
    nb = nbformat.read(path, as_version=4)
    env_backup = os.environ.pop("XLA_FLAGS", None)
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    finally:
        if env_backup is not None:
            os.environ["XLA_FLAGS"] = env_backup


@pytest.fixture
def tiny_config():
    return load_config("train", "tiny")


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    """:data:`TINY_CFG`, the tiny model config (frozen: ``dataclasses.replace`` it for another shape)."""
    return TINY_CFG


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32), loaded once per test session."""
    from llmopt_jax.io.load import load_pretrained

    return load_pretrained("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_gguf():
    """SmolLM2-135M's GGUF read once per session: ``(GGUFFile, ModelConfig, float32 NumPy parameter tree)``, the
    parts ``load_pretrained`` assembles, for tests of the readers and writers. Read-only: copy before changing."""
    from llmopt_jax.io.gguf import config_from_gguf, params_from_gguf, read_gguf, resolve_model_path

    f = read_gguf(resolve_model_path("smollm2-135m"))
    cfg = config_from_gguf(f)
    pure = params_from_gguf(f, cfg)
    for leaf in jax.tree.leaves(pure):
        leaf.flags.writeable = False  # shared by several tests: a test that writes into it fails, not its neighbours
    return f, cfg, pure


# Seconds the heaviest modules took in `make test` (2-core host, workers pinned, compilation cache cold; 3 Dec 2026),
# to start them first.
MODULE_SECONDS = {
    "test_notebook_quantization.py": 153, "test_compress_cli.py": 128, "test_real_model_cli.py": 111,
    "test_experiments.py": 100, "test_lora.py": 97, "test_notebook_quickstart.py": 96,
    "test_notebook_sparsegpt_case_study.py": 81, "test_reference_llamacpp.py": 80, "test_serve_cli.py": 78,
    "test_multiprocess.py": 71, "test_quantization_case_study.py": 64, "test_gguf_write.py": 60, "test_packed.py": 58,
    "test_serve_engine.py": 57, "test_moe.py": 56, "test_qmoe_case_study.py": 55, "test_workdir.py": 55,
}


def pytest_collection_modifyitems(config, items):
    """The heaviest modules (:data:`MODULE_SECONDS`, longest first), then the other modules with ``slow`` tests (the
    real model, notebooks, CLI runs), then the rest; each module's tests still together and in order. With
    ``pytest -n 2 --dist loadfile --no-loadscope-reorder`` (``make test``) the long modules start early on both
    workers and the short ones fill the end (longest-processing-time-first), instead of one long module running
    alone after the other worker has finished."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    # stable: the order within each group is kept
    items.sort(key=lambda item: (-MODULE_SECONDS.get(item.path.name, 0), item.path not in slow))
