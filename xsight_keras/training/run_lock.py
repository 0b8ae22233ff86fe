"""One run per run directory: a lock file held for as long as a training process lives.

``<run>/run.lock`` is locked with ``fcntl.flock`` and holds the holder's PID, host and start
time. The kernel drops the lock when the holder dies, however it dies (SIGKILL, out of memory,
a node reboot of a local disk), so a lock left by a dead process is taken over without
guessing from PIDs; its old contents are reported. A second run, or a resume, into a folder
whose holder is alive stops with :class:`RunDirectoryInUse` naming that holder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = "run.lock"


class RunDirectoryInUse(RuntimeError):
    """Another live process trains into this run directory."""


def _describe(info: dict) -> str:
    started = info.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if started else ""
    return f"PID {info.get('pid', '?')} on host {info.get('host', '?')}{when}"


class RunLock:
    """Hold ``run_dir/run.lock`` (a context manager; :meth:`acquire` / :meth:`release`).

    ``acquire()`` creates the folder if needed (``create=False``: it must exist), takes the lock without waiting and writes this
    process' PID, host and start time into it; raises :class:`RunDirectoryInUse` if a live
    process holds it. ``stale``: what the previous holder wrote if it died holding the lock.
    """

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.stale: dict | None = None
        self._fd = None

    def acquire(self, create: bool = True) -> RunLock:
        if not create and not self.run_dir.is_dir():
            raise FileNotFoundError(f"{self.run_dir} is not a run directory (it does not exist)")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:  # not writable, a file in the way, read-only filesystem
            raise PermissionError(f"cannot write to the output directory {self.run_dir}: "
                                  f"{exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise RunDirectoryInUse(
                f"{self.run_dir} is in use by another training run ({_describe(holder)}); wait "
                f"for it to end, stop it, or choose another --experiment_name") from None
        previous = _read(fd)
        if previous.get("pid"):  # written by a holder that never released: it died
            self.stale = previous
            print(f"taking over the lock of {self.run_dir}: its holder ({_describe(previous)}) "
                  f"is no longer running", file=sys.stderr)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # a clean end leaves no holder behind to report as stale
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}
