"""Shared command-line plumbing for ``experiments/*.py``.

``python -m experiments.NAME --config=configs/FILE.py:PRESET --config.a.b=value --workdir=DIR``: the config
is an ``ml_collections`` file whose ``get_config(preset)`` returns a locked ``ConfigDict``; overrides of
unknown keys, values of the wrong type, a missing file and any :class:`LlmoptError` end the program with one
line on stderr and exit status 2. Other exceptions are bugs and keep their traceback. Ctrl-C (SIGINT) and SIGTERM
end it with one line and exit status 130 or 143 (see :mod:`llmopt_jax.interrupt`).

The workdir is locked for the whole run (:mod:`llmopt_jax.workdir`): a second run on it exits at once with status 2.

``--help`` prints the experiment's docstring, its flags and how to list the config keys: ``--print_config`` prints
the resolved config (after the ``--config.*`` overrides) as ``KEY=VALUE`` lines and exits 0 without touching the
workdir.

Compiled XLA programs are kept in a persistent cache (``$LLMOPT_JAX_COMPILATION_CACHE``, default
``~/.cache/llmopt_jax/xla``; ``off`` disables it), as MaxText does: a second run of the same experiment skips most
compiles (SparseGPT's solver for one matrix shape: 2.1 s cold, 0.6 s from the cache on CPU).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from typing import Callable, Collection

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from llmopt_jax import workdir as workdirs
from llmopt_jax.errors import LlmoptError
from llmopt_jax.interrupt import ignore_stop_signals, install_raising_handlers
from llmopt_jax.jsonio import write_json

EXIT_USER_ERROR = 2


def fail(message: str) -> None:
    """Prints ``error: message`` as one line and exits with status 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


HELP_ARGS = ("--help", "-h", "-?", "--helpshort")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _experiment_name(argv0: str) -> str:
    """``experiments.NAME`` of the running script (``python -m experiments.NAME``), else its path."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None and spec.name else argv0


def _first_paragraph(text: str | None) -> str:
    """The first paragraph of a docstring, as one line."""
    return " ".join((text or "").strip().split("\n\n")[0].split())


def help_text(argv0: str) -> str:
    """What ``--help`` prints: the experiment's docstring, the flags, and how to see the config keys."""
    import importlib.util

    name = _experiment_name(argv0)
    doc = (getattr(sys.modules.get("__main__"), "__doc__", None) or "").strip()
    config_file = os.path.join("configs", f"{name.rsplit('.', 1)[-1]}.py")
    if not os.path.isfile(os.path.join(ROOT, config_file)):  # e.g. aot_memory reads configs/train.py
        named = re.search(r"--config=(configs/\w+\.py)", doc)
        config_file = named.group(1) if named else config_file
    presets = ""
    if os.path.isfile(os.path.join(ROOT, config_file)):
        try:  # the config file's docstring names its presets
            spec = importlib.util.spec_from_file_location("help_config", os.path.join(ROOT, config_file))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            presets = _first_paragraph(module.__doc__)
        except Exception:  # noqa: BLE001 - help must print even when the config file is broken
            presets = ""
    else:
        config_file = "configs/FILE.py"
    command = f"python -m {name}" if "/" not in name else f"python {name}"
    workdir_default = flags.FLAGS["workdir"].default
    lines = [
        f"usage: {command} --config={config_file}:PRESET [--config.KEY=VALUE ...] --workdir=DIR", "",
        *([doc, ""] if doc else []),
        "flags:",
        "  --config=FILE.py:PRESET  the ml_collections config file and preset; --config.KEY=VALUE overrides any key",
        f"  --workdir=DIR            {flags.FLAGS['workdir'].help}"
        + (f" (default: {workdir_default})" if workdir_default else " (required)"),
        f"  --print_config           {flags.FLAGS['print_config'].help}",
        "",
        f"The config keys and their values: {command} --config={config_file}:PRESET --print_config",
    ]
    if presets:
        lines.append(f"{config_file}: {presets}")
    lines.append("absl's own flags: --helpfull")
    return "\n".join(lines)


def format_config(config: ConfigDict) -> str:
    """``config`` as ``KEY=VALUE`` lines in the config's order, one per leaf (what ``--config.KEY=VALUE`` takes;
    strings and lists as JSON)."""
    flat = workdirs.flatten(json.loads(config.to_json_best_effort()))
    return "\n".join(f"{key}={json.dumps(value)}" for key, value in flat.items())


def _flag_error_message(e: BaseException, argv: list[str]) -> str:
    """One readable line for a flag-parsing failure; names the offending ``--config.`` override."""
    text = str(e).replace("\\'", "'").replace("\\n", " ")
    if isinstance(e, (AttributeError, KeyError)):
        match = re.search(r"'([A-Za-z_]\w*)'", text)
        if match:
            key = match.group(1)
            overrides = [a.split("=", 1)[0].lstrip("-") for a in argv if a.startswith("--config.")]
            full = next((o for o in overrides if key in o.split(".")), f"config.{key}")
            hint = re.search(r'Did you mean "([^"]+)"', text)
            suggestion = f' (did you mean "{hint.group(1)}"?)' if hint else ""
            return f"unknown config key {full.removeprefix('config.')!r}{suggestion}"
    return text


def prepare_workdir(
    config: ConfigDict, workdir: str, *, resumable: Collection[str] | None = None,
    checkpoints: str = "checkpoints", process_index: int = 0,
) -> str:
    """Creates and locks ``workdir`` and writes the resolved ``config.json`` into it; returns its absolute path.

    ``resumable``: None for an experiment that starts afresh each time (``config.json`` is overwritten).
    Otherwise the experiment resumes from ``WORKDIR/checkpoints`` and ``resumable`` names the config keys (or
    sections) that may change between a run and its resumption; when a checkpoint exists, any other changed key
    refuses the run, and allowed changes are appended to ``WORKDIR/config_history.jsonl``. The order is lock,
    compare, write (atomically), so a refused config never replaces the stored one. On multi-host runs pass
    ``process_index``: only process 0 writes.
    """
    workdir = workdirs.ensure_workdir(workdir)
    workdirs.lock_workdir(workdir, process_index)
    resolved = json.loads(config.to_json_best_effort())
    changes = None
    if resumable is not None and workdirs.has_checkpoint(os.path.join(workdir, checkpoints)):
        stored = workdirs.read_stored_config(workdir)
        if stored is not None:
            changes = workdirs.resume_changes(workdir, stored, resolved, resumable)
    if process_index == 0:
        write_json(os.path.join(workdir, "config.json"), resolved)
        if changes is not None:
            workdirs.record_resume(workdir, changes)
    return workdir


def enable_compilation_cache() -> str | None:
    """Points JAX's persistent compilation cache at ``$LLMOPT_JAX_COMPILATION_CACHE`` (default
    ``~/.cache/llmopt_jax/xla``); returns the directory, or None when the variable is ``off``."""
    import jax

    path = os.environ.get("LLMOPT_JAX_COMPILATION_CACHE", os.path.join("~", ".cache", "llmopt_jax", "xla"))
    if path.strip().lower() in ("", "off", "0", "none"):
        return None
    path = os.path.expanduser(path)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


def run(main: Callable[[ConfigDict, str], None], default_workdir: str | None = None) -> None:
    """Runs ``main(config, workdir)`` as an absl app with ``--config`` and ``--workdir`` flags."""
    config_flag = config_flags.DEFINE_config_file("config", None, "ml_collections config file:preset", lock_config=True)
    workdir_flag = flags.DEFINE_string("workdir", default_workdir, "directory for results, logs and checkpoints")
    print_flag = flags.DEFINE_bool(
        "print_config", False, "print the resolved config (after the overrides) as KEY=VALUE lines and exit; "
        "creates no workdir")

    def parse(argv: list[str]) -> list[str]:
        if any(a in HELP_ARGS for a in argv[1:]):
            print(help_text(argv[0]))
            sys.exit(0)
        try:
            rest = flags.FLAGS(argv)
            if config_flag.value is None:
                fail("--config=FILE.py:PRESET is required")
            # A config file that failed to load is only reported when touched.
            config_flag.value.to_dict()
        except SystemExit:
            raise
        except Exception as e:  # noqa: BLE001 - every parse failure is the user's input
            fail(_flag_error_message(e, argv))
        if not workdir_flag.value and not print_flag.value:
            fail("--workdir=DIR is required")
        return rest

    def wrapped(argv: list[str]) -> None:
        if len(argv) > 1:
            fail(f"unexpected arguments {argv[1:]}")
        if print_flag.value:  # before anything else happens: nothing is computed or written
            print(format_config(config_flag.value))
            return
        logging.set_verbosity(logging.WARNING)
        enable_compilation_cache()
        try:
            main(config_flag.value, workdir_flag.value)
        except LlmoptError as e:
            fail(str(e))
        except KeyboardInterrupt as e:
            exit_interrupted(e)

    install_raising_handlers()
    try:
        app.run(wrapped, flags_parser=parse)
    except KeyboardInterrupt as e:  # during flag parsing, before main
        exit_interrupted(e)


def exit_interrupted(e: KeyboardInterrupt) -> None:
    """Prints the interruption's one line (no traceback) and exits with 130 (SIGINT) or 143 (SIGTERM)."""
    ignore_stop_signals()
    signum = getattr(e, "signum", signal.SIGINT)
    message = " ".join(str(e).split()) or f"interrupted by {signal.Signals(signum).name}"
    print(message, file=sys.stderr, flush=True)
    sys.exit(128 + signum)
