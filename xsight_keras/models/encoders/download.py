"""Fetching a published checkpoint into the torch hub cache: once, streamed, hash-checked, atomic.

Every encoder's ``encoder_weights="imagenet"`` goes through :func:`download_checkpoint`. The file
is streamed in 1 MiB chunks into a hidden temporary file beside its destination, its SHA-256 is
compared with the prefix in its torchvision name (``resnet18-f37072fd.pth``), and only then is it
renamed into place with ``os.replace``: the cache never holds a partial or corrupt file under a
checkpoint's name, and two processes (``torchrun`` ranks) downloading at once each rename a
complete, identical file.

The standard library does the transfer rather than ``torch.hub.download_url_to_file``, which
does the temporary file and the hash prefix as well but opens the URL without a timeout (an
unroutable host hangs) and whose errors name neither the URL nor where the file belongs.

``XSIGHT_WEIGHTS_URL_PREFIX`` (a mirror or an air-gapped site's file server, ``https://``,
``http://`` or ``file://``) replaces everything before the file name in every checkpoint URL.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from tqdm import tqdm

#: Environment variable: a URL prefix that replaces the published one (mirrors, offline sites).
WEIGHTS_URL_ENV = "XSIGHT_WEIGHTS_URL_PREFIX"
#: Bytes read and written at a time; the file is never held in memory whole.
CHUNK_BYTES = 1 << 20
#: Seconds to wait for a connection or for the next chunk before giving up.
TIMEOUT_S = 30.0


class WeightsDownloadError(FileNotFoundError):
    """A checkpoint is not in the cache and could not be downloaded (offline, unreachable, HTTP
    error). A ``FileNotFoundError``: the file the run needs is not there."""


class CorruptDownloadError(ValueError):
    """A downloaded file's SHA-256 does not start with the prefix its name carries (corrupt,
    truncated or another file); it was not kept."""


def checkpoint_url(url: str) -> str:
    """``url``, or the same file name under ``$XSIGHT_WEIGHTS_URL_PREFIX`` when that is set."""
    prefix = os.environ.get(WEIGHTS_URL_ENV, "").strip()
    if not prefix:
        return url
    return f"{prefix.rstrip('/')}/{url.rsplit('/', 1)[-1]}"


def _unreachable(url: str, destination: Path, reason: object, what: str) -> WeightsDownloadError:
    return WeightsDownloadError(
        f"could not download the {what} from {url} ({reason}). Without network access, place "
        f"that file at {destination} (copy it from a machine that can reach the URL; "
        f"TORCH_HOME chooses the folder, {WEIGHTS_URL_ENV} a mirror), or pass a local file with "
        f"encoder_weights=/path/to/file.pth, or train from random initialisation with "
        f"encoder_weights: none (--encoder_weights none)."
    )


def download_checkpoint(
    url: str,
    destination: str | os.PathLike,
    sha256_prefix: str,
    progress: bool | None = None,
    timeout: float = TIMEOUT_S,
    what: str = "checkpoint",
) -> Path:
    """Download ``url`` to ``destination`` unless it is already there; return ``destination``.

    ``sha256_prefix``: the leading hex digits the file's SHA-256 must have (torchvision names its
    files ``<name>-<prefix>.pth``). ``what`` names the file in messages. ``progress``: a tqdm
    bar on stderr; ``None`` shows it only on a terminal.

    A file already at ``destination`` is reused without hashing it again (as torch.hub does):
    only a file that passed this check is ever renamed there, a damaged one fails loudly when
    it is read, and hashing ~100 MB at every model build would slow every build.

    Raises :class:`WeightsDownloadError` (a ``FileNotFoundError``) when the URL cannot be read,
    :class:`CorruptDownloadError` (a ``ValueError``) when the hash does not match; either way,
    and on ``KeyboardInterrupt``, no file is left in the destination folder. Errors creating or
    writing that folder propagate as they are.
    """
    destination = Path(destination)
    if destination.is_file():
        return destination
    response = _open(url, destination, timeout, what)  # offline: fails before touching the disk
    with response:
        print(f"Downloading {url} to {destination}", file=sys.stderr)
        destination.parent.mkdir(parents=True, exist_ok=True)
        # Hidden, unique and not ending in .pth: never taken for a checkpoint, even when a
        # killed process leaves it behind. os.open applies the umask (mkstemp: owner-only).
        partial = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}.partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as out:
                received, total, digest = _copy(response, out, url, destination, progress, what)
            actual = digest[: len(sha256_prefix)]
            if actual != sha256_prefix.lower():
                size = f"{received} of {total}" if total not in (None, received) else f"{received}"
                raise CorruptDownloadError(
                    f"download of the {what} from {url} refused: its SHA-256 starts with "
                    f"{actual}, expected {sha256_prefix} ({size} bytes received); the file is "
                    f"corrupt, truncated or not the published one, and was not kept. Try again, "
                    f"or place a good copy at {destination}."
                )
            os.replace(partial, destination)
        finally:  # also on KeyboardInterrupt: no partial file stays in the cache
            partial.unlink(missing_ok=True)
    return destination


def _open(url: str, destination: Path, timeout: float, what: str):
    """The open HTTP (or file://) response for ``url``; :class:`WeightsDownloadError` if not."""
    request = urllib.request.Request(url, headers={"User-Agent": "xsight-keras"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError is an OSError
        reason = exc if isinstance(exc, urllib.error.HTTPError) else getattr(exc, "reason", exc)
        raise _unreachable(url, destination, reason, what) from exc


def _copy(response, out, url: str, destination: Path, progress: bool | None, what: str):
    """Copy ``response`` into the open file ``out`` chunk by chunk; return (bytes received, the
    announced length or None, hex SHA-256)."""
    length = response.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None
    sha256 = hashlib.sha256()
    received = 0
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=destination.name,
              disable=None if progress is None else not progress, file=sys.stderr) as bar:
        while True:
            try:
                chunk = response.read(CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as exc:
                reason = f"connection lost after {received} bytes: {exc!r}"
                raise _unreachable(url, destination, reason, what) from exc
            if not chunk:
                break
            out.write(chunk)
            sha256.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    return received, total, sha256.hexdigest()
