"""Workdirs that two runs cannot corrupt: an OS lock per run, and a config check before a run resumes.

- :func:`lock_workdir` holds ``fcntl.flock`` on ``WORKDIR/.lock`` for the life of the process. The kernel drops
  the lock when the process ends, however it ends (SIGKILL included), so a lock is never stale; the file only
  carries the holder's pid and command line for the message a second run prints.
- :func:`resume_changes` compares the config of a run about to resume with the stored ``config.json``: keys
  outside the experiment's ``allowed`` set (the ones that change results) refuse the resume.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shlex
import sys
import time
from typing import Any, Collection, Mapping

from llmopt_jax.errors import LlmoptError

LOCK_NAME = ".lock"
HISTORY_NAME = "config_history.jsonl"


class WorkdirError(LlmoptError):
    """A workdir that cannot be used: a file, not writable, in use by another run, or run with other settings."""


def ensure_workdir(workdir: str) -> str:
    """Creates ``workdir`` if needed; returns its absolute path. Raises :class:`WorkdirError` for a file."""
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"--workdir {path} is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"cannot create --workdir {path}: {e.strerror or e}") from e
    return path


def _command_line() -> str:
    """This process's command line, as a shell would need it."""
    return shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])


def _read_holder(fd: int, patience_s: float = 1.0) -> tuple[str, str]:
    """``(pid, command)`` written by the lock's holder; waits briefly, the holder writes right after locking."""
    deadline = time.monotonic() + patience_s
    while True:
        text = os.pread(fd, 65536, 0).decode("utf-8", "replace")
        pid, _, command = text.partition("\n")
        if pid.strip() or time.monotonic() > deadline:
            return pid.strip() or "unknown", " ".join(command.split()) or "unknown command"  # one line
        time.sleep(0.02)


class WorkdirLock:
    """An exclusive, non-blocking ``flock`` on ``directory/name`` that lasts until :meth:`release` or exit."""

    def __init__(self, directory: str, name: str = LOCK_NAME):
        self.directory = directory
        self.path = os.path.join(directory, name)
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self.fd is not None

    def acquire(self) -> WorkdirLock:
        """Takes the lock, or raises :class:`WorkdirError` naming the process that holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WorkdirError(
                f"workdir {self.directory} is not writable (cannot create {self.path}: {e.strerror or e})"
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, command = _read_holder(fd)
            os.close(fd)
            raise WorkdirError(f"workdir {self.directory} is in use by process {pid} ({command})") from None
        except OSError as e:  # a filesystem without flock support
            os.close(fd)
            raise WorkdirError(f"cannot lock workdir {self.directory}: {e.strerror or e}") from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{_command_line()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        """Drops the lock (closing the descriptor releases the flock); the file stays, empty."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


# Locks this process holds, by lock-file path. flock conflicts between two descriptors of one process too,
# so a second prepare_workdir() on the same workdir in one process must reuse the lock it already holds.
_HELD: dict[str, WorkdirLock] = {}


def lock_workdir(workdir: str, process_index: int = 0) -> WorkdirLock:
    """Locks ``workdir`` until the process exits (reentrant within one process).

    On a multi-host run sharing one workdir, process ``i > 0`` locks ``.lock.process{i}``: the hosts of one run
    do not exclude each other, while a second run still collides with the first host by host.
    """
    name = LOCK_NAME if process_index == 0 else f"{LOCK_NAME}.process{process_index}"
    path = os.path.join(workdir, name)
    if path not in _HELD or not _HELD[path].held:
        _HELD[path] = WorkdirLock(workdir, name).acquire()
    return _HELD[path]


def release_workdir(workdir: str) -> None:
    """Releases every lock this process holds on ``workdir`` (for tests and notebooks that reuse one)."""
    workdir = os.path.abspath(workdir)
    for path in [p for p, lock in _HELD.items() if lock.directory == workdir]:
        _HELD.pop(path).release()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for every leaf of nested mappings (lists are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class _Unset:
    """A key that one of two configs lacks."""

    def __repr__(self) -> str:
        return "(unset)"


_MISSING = _Unset()


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old value, new value)}`` for every leaf that differs between two nested configs."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k, _MISSING), b.get(k, _MISSING)) for k in sorted(a.keys() | b.keys())
            if a.get(k, _MISSING) != b.get(k, _MISSING)}


def is_allowed(key: str, allowed: Collection[str]) -> bool:
    """Whether ``key`` is in ``allowed``, directly or under an allowed section (``aot`` allows ``aot.x``)."""
    return any(key == a or key.startswith(a + ".") for a in allowed)


def _show(value: Any) -> str:
    """A config value as the user would type it on the command line."""
    if value is _MISSING:
        return repr(value)
    return value if isinstance(value, str) and value else json.dumps(value, separators=(",", ":"))


def read_stored_config(workdir: str) -> dict | None:
    """``WORKDIR/config.json`` as a dict, or None when there is none."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise WorkdirError(f"cannot read {path} ({e}); use another workdir") from e


def resume_changes(workdir: str, stored: Mapping[str, Any], resolved: Mapping[str, Any],
                   allowed: Collection[str]) -> dict[str, tuple[Any, Any]]:
    """The changes from ``stored`` to ``resolved`` config, all of them in ``allowed``; raises
    :class:`WorkdirError` with a one-line diff when a key outside ``allowed`` changed."""
    changes = config_changes(stored, resolved)
    refused = {k: v for k, v in changes.items() if not is_allowed(k, allowed)}
    if refused:
        diff = ", ".join(f"{k} {_show(old)} -> {_show(new)}" for k, (old, new) in refused.items())
        raise WorkdirError(
            f"workdir {workdir} was run with other settings: {diff}; use another workdir or restore the old values"
        )
    return changes


def record_resume(workdir: str, changes: Mapping[str, tuple[Any, Any]]) -> None:
    """Appends one line to ``WORKDIR/config_history.jsonl``: when a run resumed, and the settings it changed."""
    record = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "resumed": True,
        "changed": {k: {"old": old, "new": new} for k, (old, new) in changes.items()},
        "command": _command_line(),
    }
    # One write() of one line: a reader never sees half a record.
    with open(os.path.join(workdir, HISTORY_NAME), "a") as f:
        f.write(json.dumps(record, sort_keys=True, default=str) + "\n")


def has_checkpoint(directory: str) -> bool:
    """Whether ``directory`` holds at least one complete (orbax-finalized) checkpoint."""
    if not os.path.isdir(directory):
        return False
    from llmopt_jax.train.checkpoint import complete_steps  # orbax is slow to import; only resuming runs need it

    return bool(complete_steps(directory))
