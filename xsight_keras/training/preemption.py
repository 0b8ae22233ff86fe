"""Stopping a run the way clusters stop jobs: signals, resume points on a timer, exit statuses.

SLURM sends SIGTERM (or the signal chosen with ``sbatch --signal``) some time before it kills a
job; a user presses Ctrl-C (SIGINT). Inside :class:`StopSignals` the first SIGTERM, SIGINT or
SIGUSR1 becomes a request that training honours at the end of the current step:
:class:`~xsight_keras.training.state.TrainingState` writes a mid-epoch resume point and raises
:class:`TrainingStopped`, the loaders' worker processes are closed, and ``scripts/train.py``
exits with 128 + the signal number (143 SIGTERM, 130 SIGINT, 138 SIGUSR1). A second signal ends
the process at once (worker processes are killed first). ``every_minutes`` also asks for a resume
point every so many minutes, for jobs that are killed without a warning signal.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

#: The signals that stop a run gracefully.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def exit_status(signum: int) -> int:
    """The exit status of a run stopped by ``signum``: 128 + its number, as a shell reports it."""
    return 128 + int(signum)


class TrainingStopped(Exception):
    """Training stopped on a signal after writing a resume point (``signum``, ``exit_status``)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_status = exit_status(signum)


def child_processes(pid: int | None = None) -> set[int]:
    """The PIDs of every live process below ``pid`` (default: this one), read from ``/proc``
    (the loaders' workers are children of the forkserver, itself a child of the trainer).
    Without ``/proc``, this process' ``multiprocessing`` children."""
    pid = os.getpid() if pid is None else pid
    proc = Path("/proc")
    if not proc.is_dir():
        return {child.pid for child in multiprocessing.active_children()}
    parents = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def kill_worker_processes() -> None:
    """SIGKILL every process below this one (data-loader workers, the forkserver) without
    waiting for them: the way out when the user asked to stop at once."""
    for pid in child_processes():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class StopSignals:
    """A context manager that turns stop signals into a request polled between steps.

    ``poll()`` → ``(signum, due)``: the first stop signal received (0: none) and whether
    ``every_minutes`` have passed since the last resume point (:meth:`written` restarts that
    clock). Handlers are installed only in the main thread (elsewhere ``signal`` cannot) and the
    previous ones come back on exit.
    """

    def __init__(self, every_minutes: float | None = None):
        self.every = every_minutes * 60 if every_minutes else None
        self.signum = 0
        self._last = time.monotonic()
        self._previous = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum:  # the second one: no more waiting
            print(f"\n{name} again: stopping now, without a resume point", file=sys.stderr,
                  flush=True)
            kill_worker_processes()
            os._exit(exit_status(signum))
        self.signum = signum
        print(f"\n{name}: stopping after the current step and writing a resume point "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def poll(self) -> tuple[int, bool]:
        due = self.every is not None and time.monotonic() - self._last >= self.every
        return self.signum, due

    def written(self) -> None:
        """A resume point was just written: the timer starts again."""
        self._last = time.monotonic()
