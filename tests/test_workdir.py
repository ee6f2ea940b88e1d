"""Workdirs that cannot be corrupted: the per-run lock, the resume check, clean stops on SIGINT/SIGTERM."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from ml_collections import ConfigDict

from conftest import ROOT, load_config, run_cli
from llmopt_jax import cli
from llmopt_jax.interrupt import Interrupted, StopFlag
from llmopt_jax.train.checkpoint import Checkpointer, complete_steps
from llmopt_jax.workdir import (
    WorkdirError, WorkdirLock, config_changes, lock_workdir, release_workdir, resume_changes,
)

from experiments.train import RESUMABLE_CHANGES

# The smoke model on a few short windows: ~15 s per run on 2 cores, most of it start-up and compilation.
SMALL = ["--config=configs/train.py:smoke", "--config.data.seq_len=32", "--config.data.batch_size=2",
         "--config.train.progress=False", "--config.train.peak_flops_per_s=1e12"]
INTERRUPTED_LINE = "interrupted at step {n}; rerun the same command to resume from step {m}"


def _env() -> dict:
    """The environment conftest.run_cli gives its subprocesses (one CPU device, quiet TF logging)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)
    return env


def _start(args: list[str], **kwargs) -> subprocess.Popen:
    """``python -m ARGS...`` from the repository root, in the background, output captured as text."""
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _kill(proc: subprocess.Popen) -> None:
    """Kills ``proc`` (one we started) if it is still running, and reaps it."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=60)


def _logged_steps(workdir) -> list[int]:
    """Steps in ``WORKDIR/metrics.jsonl``; every line must be complete JSON."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        text = f.read()
    assert not text or text.endswith("\n"), "metrics.jsonl ends in a partial line"
    return [json.loads(line)["step"] for line in text.splitlines()]


def _wait_for(condition, proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Polls ``condition()`` until true while ``proc`` runs; fails with ``what`` on timeout or early exit."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _lock_holder_pid(workdir) -> str:
    path = os.path.join(workdir, ".lock")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.readline().strip()


# ---------------------------------------------------------------------------------------------------------------
# The lock


def test_lock_is_exclusive_reentrant_and_released(tmp_path):
    first = lock_workdir(str(tmp_path))
    try:
        assert lock_workdir(str(tmp_path)) is first  # a second prepare_workdir() in one process reuses it
        with pytest.raises(WorkdirError) as e:
            WorkdirLock(str(tmp_path)).acquire()  # another descriptor conflicts, as another process would
        assert str(e.value).startswith(f"workdir {tmp_path} is in use by process {os.getpid()} (")
        assert (tmp_path / ".lock").read_text().splitlines()[0] == str(os.getpid())
    finally:
        release_workdir(str(tmp_path))
    with WorkdirLock(str(tmp_path)) as again:
        assert again.held
    assert not again.held


def test_lock_held_by_another_process_names_it_and_dies_with_it(tmp_path):
    holder_code = textwrap.dedent(f"""
        import sys, time
        from llmopt_jax.workdir import lock_workdir
        lock_workdir({str(tmp_path)!r})
        print("locked", flush=True)
        time.sleep(120)
    """)
    holder = _start(["-c", holder_code, "holder-marker"])
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirError) as e:
            WorkdirLock(str(tmp_path)).acquire()
        message = str(e.value)
        assert message.startswith(f"workdir {tmp_path} is in use by process {holder.pid} (")
        assert "holder-marker" in message and "\n" not in message
        holder.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel alone drops the lock
        holder.wait(timeout=30)
        with WorkdirLock(str(tmp_path)) as lock:
            assert lock.held
    finally:
        _kill(holder)


def test_workdir_that_is_a_file_or_not_writable(tmp_path):
    config = ConfigDict(dict(a=1))
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(WorkdirError, match=f"--workdir {afile} is a file, not a directory"):
        cli.prepare_workdir(config, str(afile))
    with pytest.raises(WorkdirError, match=f"cannot create --workdir {afile}/sub"):
        cli.prepare_workdir(config, str(afile / "sub"))
    # /proc exists on Linux and refuses new files, for root too (chmod does not stop root).
    with pytest.raises(WorkdirError, match="workdir /proc is not writable"):
        cli.prepare_workdir(config, "/proc")
    proc = run_cli(["experiments.train", *SMALL, f"--workdir={afile}"], timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"error: --workdir {afile} is a file, not a directory"]


# ---------------------------------------------------------------------------------------------------------------
# The resume check


def test_config_changes_and_allowed_keys():
    old = {"optim": {"learning_rate": 0.003, "b1": 0.9}, "train": {"steps": 60}, "aot": {"num_devices": 8}}
    new = {"optim": {"learning_rate": 0.001, "b1": 0.9}, "train": {"steps": 90}, "aot": {"num_devices": 4},
           "seed": 1}
    changes = config_changes(old, new)
    assert sorted(changes) == ["aot.num_devices", "optim.learning_rate", "seed", "train.steps"]
    assert changes["optim.learning_rate"] == (0.003, 0.001) and repr(changes["seed"][0]) == "(unset)"
    with pytest.raises(WorkdirError) as e:
        resume_changes("/w", old, new, RESUMABLE_CHANGES)
    assert str(e.value) == ("workdir /w was run with other settings: optim.learning_rate 0.003 -> 0.001, "
                            "seed (unset) -> 1; use another workdir or restore the old values")
    allowed = dict(new)
    allowed.pop("seed")
    allowed["optim"] = old["optim"]
    assert resume_changes("/w", old, allowed, RESUMABLE_CHANGES) == {"aot.num_devices": (8, 4),
                                                                       "train.steps": (60, 90)}


def _checkpoint(workdir) -> None:
    """A complete (finalized) checkpoint at step 5 in ``WORKDIR/checkpoints``."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=1, async_save=False)
    ckpt.maybe_save(5, {"x": np.zeros(2, np.float32)}, {"epoch": 0, "index": 5})
    ckpt.close()


def test_prepare_workdir_compares_before_writing(tmp_path):
    workdir = str(tmp_path)
    config = load_config("train", "tiny")
    try:
        cli.prepare_workdir(config, workdir, resumable=RESUMABLE_CHANGES)
        stored = (tmp_path / "config.json").read_text()
        changed = load_config("train", "tiny")
        changed.optim.learning_rate = 0.001
        # No checkpoint yet: nothing to resume, the new config simply replaces the old one.
        cli.prepare_workdir(changed, workdir, resumable=RESUMABLE_CHANGES)
        assert json.loads((tmp_path / "config.json").read_text())["optim"]["learning_rate"] == 0.001
        (tmp_path / "config.json").write_text(stored)
        _checkpoint(workdir)
        assert complete_steps(os.path.join(workdir, "checkpoints")) == [5]
        with pytest.raises(WorkdirError, match=r"optim.learning_rate 0.003 -> 0.001;"):
            cli.prepare_workdir(changed, workdir, resumable=RESUMABLE_CHANGES)
        assert (tmp_path / "config.json").read_text() == stored  # a refused config is never written
        assert not (tmp_path / "config_history.jsonl").exists()
        longer = load_config("train", "tiny")
        longer.train.steps, longer.train.log_every = 40, 5
        cli.prepare_workdir(longer, workdir, resumable=RESUMABLE_CHANGES)
        assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 40
        (record,) = [json.loads(line) for line in (tmp_path / "config_history.jsonl").read_text().splitlines()]
        assert record["changed"] == {"train.log_every": {"old": 1, "new": 5}, "train.steps": {"old": 20, "new": 40}}
        # Experiments that do not resume overwrite config.json whatever the checkpoints.
        cli.prepare_workdir(changed, workdir)
        assert json.loads((tmp_path / "config.json").read_text())["optim"]["learning_rate"] == 0.001
    finally:
        release_workdir(workdir)


# ---------------------------------------------------------------------------------------------------------------
# SIGINT / SIGTERM


def test_stop_flag_notes_the_first_signal_and_raises_on_the_second():
    before = signal.getsignal(signal.SIGTERM)
    with StopFlag() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        assert stop.signum == signal.SIGTERM
        with pytest.raises(Interrupted) as e:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
        assert e.value.exit_status == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_any_cli_stops_with_one_line(tmp_path, signum, status):
    """A CLI other than train (here a main that waits) ends on the signal: one line, 130/143, no traceback."""
    code = textwrap.dedent("""
        import sys, time
        from llmopt_jax import cli
        def main(config, workdir):
            cli.prepare_workdir(config, workdir)
            print("ready", flush=True)
            time.sleep(120)
        cli.run(main)
    """)
    proc = _start(["-c", code, "--config=configs/train.py:tiny", f"--workdir={tmp_path}"])
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == status, err[-2000:]
        assert "Traceback" not in err
        assert err.strip().splitlines() == [f"interrupted by {signal.Signals(signum).name}"]
    finally:
        _kill(proc)


# ---------------------------------------------------------------------------------------------------------------
# experiments.train end to end


@pytest.fixture(scope="module")
def lone_run(tmp_path_factory):
    """A 12-step smoke run on its own: its workdir and results."""
    workdir = tmp_path_factory.mktemp("lone")
    proc = run_cli(["experiments.train", *SMALL, "--config.train.steps=12", f"--workdir={workdir}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, json.loads((workdir / "results.json").read_text())


@pytest.mark.slow
def test_second_run_on_a_busy_workdir_exits_at_once(tmp_path, lone_run):
    args = ["-m", "experiments.train", *SMALL, "--config.train.steps=12", f"--workdir={tmp_path}"]
    # The first run compiles while the second starts; on 2 cores it yields to the one whose latency we measure.
    first = _start(args)
    try:
        os.setpriority(os.PRIO_PROCESS, first.pid, 10)
        _wait_for(lambda: _lock_holder_pid(tmp_path) == str(first.pid), first, 120, "the first run to lock")
        t0 = time.monotonic()
        second = run_cli(args[1:], timeout=60)
        seconds = time.monotonic() - t0
        assert second.returncode == 2 and seconds < 10, (seconds, second.stderr[-2000:])
        assert "Traceback" not in second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert lines[0].startswith(f"error: workdir {tmp_path} is in use by process {first.pid} (")
        assert "experiments.train" in lines[0]
        out, err = first.communicate(timeout=300)
        assert first.returncode == 0, err[-3000:]
    finally:
        _kill(first)
    assert json.loads((tmp_path / "results.json").read_text())["final_loss"] == lone_run[1]["final_loss"]


@pytest.mark.slow
def test_resume_refuses_other_settings_and_extends_steps(tmp_path, lone_run):
    workdir = tmp_path / "w"
    shutil.copytree(lone_run[0], workdir)
    stored = (workdir / "config.json").read_text()
    base = ["experiments.train", *SMALL, f"--workdir={workdir}"]
    proc = run_cli([*base, "--config.train.steps=12", "--config.optim.learning_rate=0.001"], timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: workdir {workdir} was run with other settings: optim.learning_rate 0.003 -> 0.001; "
        "use another workdir or restore the old values"
    ]
    assert (workdir / "config.json").read_text() == stored
    proc = run_cli([*base, "--config.train.steps=16"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == 16 and results["resumed_from_step"] == 12
    assert _logged_steps(workdir) == list(range(1, 17))
    (record,) = [json.loads(line) for line in (workdir / "config_history.jsonl").read_text().splitlines()]
    assert record["changed"] == {"train.steps": {"old": 12, "new": 16}}


def _interrupt(args: list[str], workdir, signum: int, after_step: int) -> tuple[int, str]:
    """Starts a train run, sends ``signum`` once it has logged ``after_step``; ``(exit status, all output)``."""
    proc = _start(args)
    try:
        _wait_for(lambda: any(s >= after_step for s in _logged_steps(workdir)), proc, 240, f"step {after_step}")
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
        return proc.returncode, out + err
    finally:
        _kill(proc)


def _interrupted_line(output: str) -> tuple[int, int]:
    """``(N, M)`` of the one ``interrupted at step N; ... from step M`` line in ``output``."""
    lines = [line for line in output.splitlines() if line.startswith("interrupted at step")]
    assert len(lines) == 1, output[-3000:]
    n, m = int(lines[0].split()[3].rstrip(";")), int(lines[0].split()[-1])
    assert lines[0] == INTERRUPTED_LINE.format(n=n, m=m)
    return n, m


@pytest.mark.slow
def test_sigint_and_sigterm_stop_training_cleanly_and_the_same_command_resumes(tmp_path):
    steps = 100  # the signals come at steps 6 to ~20: far enough from the end whatever the load
    args = ["-m", "experiments.train", *SMALL, f"--config.train.steps={steps}", "--config.train.checkpoint_every=5",
            f"--workdir={tmp_path}"]
    checkpoints = os.path.join(tmp_path, "checkpoints")

    status, output = _interrupt(args, tmp_path, signal.SIGINT, after_step=6)
    assert status == 130 and "Traceback" not in output, output[-3000:]
    n, m = _interrupted_line(output)
    assert 6 <= n < steps and m == max(complete_steps(checkpoints)) and n - 5 < m <= n
    assert max(_logged_steps(tmp_path)) == n  # the step in flight finished and was logged; nothing after it

    status, output = _interrupt(args, tmp_path, signal.SIGTERM, after_step=m + 6)
    assert status == 143 and "Traceback" not in output, output[-3000:]
    n2, m2 = _interrupted_line(output)
    assert m + 6 <= n2 < steps and m2 == max(complete_steps(checkpoints)) > m

    proc = run_cli(args[1:], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == steps and results["resumed_from_step"] == m2
    assert _logged_steps(tmp_path) == list(range(1, steps + 1))
