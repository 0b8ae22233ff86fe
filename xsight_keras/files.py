"""Writing files so that a crash never leaves a half-written one where a good one was."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

#: errno values of a write the disk refused (full, over quota, failing): not a bug to trace back
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EROFS})


class WriteFailedError(OSError):
    """The disk refused a write (full, over quota, read-only, I/O error); the message names the
    path and the free space, and says the previous file is still in place."""

    def __str__(self) -> str:
        return self.strerror


def _free_space(path: Path) -> str:
    for folder in (path, *path.parents):
        try:
            return f"{shutil.disk_usage(folder).free / 2**20:,.1f} MiB free on its filesystem"
        except OSError:
            continue
    return "free space unknown"


def write_failure(path, exc: OSError) -> OSError:
    """``exc`` as a :class:`WriteFailedError` naming ``path`` and its free space when its errno
    is one of :data:`WRITE_ERRNOS`; other errors come back unchanged (raise the result)."""
    if isinstance(exc, WriteFailedError) or exc.errno not in WRITE_ERRNOS:
        return exc
    path = Path(path)
    error = WriteFailedError(exc.errno, f"could not write {path}: {os.strerror(exc.errno)} "
                             f"({_free_space(path.parent)}); the previous version was kept")
    error.filename = str(path)
    return error


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk, then rename it over
    ``path``. An interruption leaves the previous file as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_failure(path, exc) from exc
        raise
    return path
