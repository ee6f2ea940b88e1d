"""A fork server for the test suite's CLI runs (``conftest.run_cli``): one process imports JAX, Flax, optax and the
library once, then runs each ``python -m MODULE ARGS...`` request in a forked child of itself.

A CLI started from scratch spends ~2 s of one core importing JAX and Flax before it reads its first flag, and the
suite starts ~150 of them (most check one bad input and exit). A forked child is still a separate process with its
own exit status, stdout, stderr, signals and devices, so the tests see what a user's shell sees, minus the imports.
Forking is only safe before any XLA backend or thread exists; this server never touches a device and refuses to
serve (the caller then starts real processes) if an import started a thread or a backend.

Protocol (one JSON object per line): the caller writes
``{"args": [...], "env": {...}, "stdout": PATH, "stderr": PATH}``; the server answers ``{"pid": N}`` once the
child runs and ``{"returncode": N}`` when it has exited. The server's first line is ``{"ready": true}`` or
``{"ready": false, "why": ...}``.
"""

import json
import os
import sys

# The heavy libraries the CLIs import, then every module of the library (the experiments import them in main()).
PRELOAD = ("numpy", "jax", "jax.numpy", "flax.linen", "flax.nnx", "optax", "orbax.checkpoint", "ml_collections",
           "absl.app", "absl.flags", "absl.logging", "tqdm")


def _preload() -> str | None:
    """Imports :data:`PRELOAD` and every ``llmopt_jax`` module; returns why forking would be unsafe afterwards, or
    None."""
    import importlib
    import pkgutil
    import threading

    def load(name: str):
        try:
            return importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional dependency missing: the child imports what it needs itself
            return None

    for name in PRELOAD:
        load(name)
    package = load("llmopt_jax")
    for info in pkgutil.walk_packages(package.__path__, "llmopt_jax.") if package else ():
        load(info.name)
    if threading.active_count() != 1:
        return f"{threading.active_count()} threads after the imports"
    from jax._src import xla_bridge

    if xla_bridge._backends:  # noqa: SLF001 - no public way to ask whether a backend exists yet
        return "an XLA backend was initialised by an import"
    return None


def _exit_code(e: SystemExit) -> int:
    """The status ``python`` exits with for ``e`` (printing a non-integer code, as the interpreter does)."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def _child(request: dict) -> None:
    """Runs the request as ``python -m`` would, in this forked process, and exits with its status."""
    import atexit
    import runpy

    code = 1
    try:
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT),
                                (2, request["stderr"], os.O_WRONLY | os.O_CREAT)):
            target = os.open(path, flags, 0o600)
            os.dup2(target, fd)
            os.close(target)
        os.environ.clear()
        os.environ.update(request["env"])
        module, *args = request["args"]
        sys.argv = [module, *args]  # runpy puts the module's file in argv[0], as ``python -m`` does
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = _exit_code(e)
        except BaseException:  # noqa: BLE001 - an uncaught exception ends the process as the interpreter would
            sys.excepthook(*sys.exc_info())
            code = 1
        atexit._run_exitfuncs()  # noqa: SLF001 - os._exit skips them
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def main() -> None:
    root = sys.argv[1]
    os.chdir(root)
    sys.path[0] = root  # ``python -m`` from the repository root puts the root first
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    requests = os.fdopen(os.dup(0), "r")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):  # nothing the imports print may reach the protocol pipes
        os.dup2(devnull, fd)
    why = _preload()
    answers.write(json.dumps({"ready": why is None, "why": why}) + "\n")
    if why is not None:
        return
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            requests.close()
            answers.close()
            _child(request)
        answers.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    main()
