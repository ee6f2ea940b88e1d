"""Clean stops on Ctrl-C (SIGINT) and SIGTERM.

Every CLI turns both signals into :class:`Interrupted` (a ``KeyboardInterrupt``, so code that cleans up on
Ctrl-C also cleans up on SIGTERM) and exits with ``128 + signal number`` (130, 143) after one line. A loop
that must not be torn mid-step (training) uses :class:`StopFlag`: the first signal only sets a flag that the
loop checks between steps; a second one raises at once, abandoning the step in flight.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by ``signum``; ``str()`` is the one line to print."""

    def __init__(self, signum: int, message: str | None = None):
        self.signum = int(signum)
        super().__init__(message or f"interrupted by {signal.Signals(self.signum).name}")

    @property
    def exit_status(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    """Signal handler: stop the program where it is, as Ctrl-C does."""
    raise Interrupted(signum)


def _in_main_thread() -> bool:
    # Python only lets the main thread install signal handlers.
    return threading.current_thread() is threading.main_thread()


def install_raising_handlers() -> None:
    """Makes SIGINT and SIGTERM raise :class:`Interrupted` (SIGTERM would otherwise kill without cleanup)."""
    if _in_main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, _raise_interrupted)


def ignore_stop_signals() -> None:
    """Ignores further SIGINT/SIGTERM, so that a second Ctrl-C cannot tear the exit path's one line."""
    if _in_main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


class StopFlag:
    """Context manager: the first SIGINT/SIGTERM sets :attr:`signum`; a second one raises :class:`Interrupted`.

    Outside the main thread it installs nothing and :attr:`requested` stays False.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal has arrived."""
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            return
        raise Interrupted(self.signum)

    def __enter__(self) -> StopFlag:
        if _in_main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            # None: the previous handler was installed from C and cannot be reinstalled from Python.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
