"""Fetch dataset files from public mirrors with retries, resume and checksum verification.

Only the standard library (urllib) is used so that a fresh machine needs nothing extra.
Each file is downloaded to ``<name>.gz.part`` next to its destination; an interrupted
transfer resumes from the bytes already on disk with an HTTP Range request. A finished file
is verified (SHA-256 of the decompressed payload) *before* it is moved into place with
``os.replace``, so the data directory only ever holds complete, correct files. A mirror that
serves a file with the wrong checksum is skipped and the next mirror is tried.

A mirror that cannot be reached at all on the first attempt (no DNS answer, connection
refused, no route, connect timeout) is not retried; when that is true of every mirror the
machine is taken to be offline and the download stops at once with one message. Failures
after a connection was made (a dropped transfer, HTTP 5xx) are retried with backoff.
``DPVIT_<DATASET>_MIRROR`` (e.g. ``DPVIT_MNIST_MIRROR``, whitespace-separated base URLs)
replaces a dataset's mirrors, for a local copy or for tests.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from dpvit.data.idx import DataError, DatasetInfo, find_idx_file, sha256_of_payload
from dpvit.files import publish
from dpvit.terminal import TerminalTqdm, bar_terminal

logger = logging.getLogger(__name__)

_CHUNK = 1 << 16
_USER_AGENT = "dpvit-data/0.1 (+urllib)"
#: connect() errors meaning the host cannot be reached from here at all
_UNREACHABLE_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN,
                       errno.EADDRNOTAVAIL, errno.ECONNREFUSED}


class DownloadError(DataError):
    """Files could not be downloaded; ``why`` says why in a few words, ``missing`` names them.

    ``offline`` is true when no mirror could be reached at all.
    """

    def __init__(self, message: str, why: str = "", missing: Sequence[str] = (),
                 offline: bool = False) -> None:
        super().__init__(message)
        self.why, self.missing, self.offline = why, list(missing), offline


def mirror_env_var(name: str) -> str:
    """The environment variable that overrides the mirrors of dataset ``name``."""
    return "DPVIT_" + name.upper().replace("-", "_") + "_MIRROR"


def mirrors_for(info: DatasetInfo) -> tuple[str, ...]:
    """The base URLs to try for ``info``: ``$DPVIT_<NAME>_MIRROR`` if set, else the registry's."""
    override = os.environ.get(mirror_env_var(info.name), "").split()
    return tuple(override) or info.mirrors


def _cannot_connect(exc: BaseException) -> bool:
    """True if ``exc`` says the host could not be reached at all (before any HTTP exchange)."""
    if not isinstance(exc, urllib.error.URLError) or isinstance(exc, urllib.error.HTTPError):
        return False
    reason = exc.reason
    if isinstance(reason, (socket.gaierror, ConnectionRefusedError, TimeoutError)):
        return True
    return isinstance(reason, OSError) and reason.errno in _UNREACHABLE_ERRNOS


class _Progress:
    """tqdm's bar when a terminal shows stderr (`bar_terminal`: also rank 0 under mpirun),
    otherwise a log line at each quarter of the file."""

    def __init__(self, label: str, total: int | None, done: int) -> None:
        self.label, self.total, self.done = label, total, done
        self._next_log = int(4 * done / total + 1) / 4 if total else 0.25
        self.terminal = bar_terminal(sys.stderr)
        self.bar = None
        if self.terminal is not None:
            self.bar = TerminalTqdm(total=total, initial=done, desc=label, unit="B",
                                    unit_scale=True, file=sys.stderr, terminal=self.terminal)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.total and self.done >= self._next_log * self.total:
            frac = self.done / self.total
            logger.info("%s: %.0f%% of %.1f MB", self.label, 100 * frac, self.total / 1e6)
            self._next_log = int(4 * frac + 1) / 4

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.terminal.close()
        elif not self.total:  # the size was not announced: one line at the end
            logger.info("%s: %.1f MB", self.label, self.done / 1e6)


def _transfer(url: str, part: Path, timeout: float, label: str) -> None:
    """Append the rest of ``url`` to ``part``, resuming with a Range request if it exists.

    Raises:
        urllib.error.URLError, OSError, http.client.HTTPException: on network failures; the
            bytes received so far stay in ``part`` for the next attempt.
    """
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the partial file is already complete
            return
        raise
    with response:
        if offset and response.status != 206:
            logger.info("%s: server ignored the Range request; restarting the file", url)
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        progress = _Progress(label, total, offset)
        try:
            with open(part, "ab" if offset else "wb") as out:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    progress.update(len(chunk))
        finally:
            progress.close()
        if total is not None and part.stat().st_size < total:
            raise http.client.IncompleteRead(b"", total - part.stat().st_size)


def download_file(
    urls: Sequence[str],
    dest: Path,
    expected_sha256: str,
    *,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Download one file from the first mirror that delivers it intact.

    Args:
        urls: candidate URLs for the same file, tried in order.
        dest: final path (e.g. ``data/mnist/train-images-idx3-ubyte.gz``).
        expected_sha256: SHA-256 of the decompressed payload.
        timeout: socket timeout in seconds for each request.
        retries: attempts per mirror for network errors (a checksum failure moves on
            to the next mirror at once).
        backoff: seconds before the first retry, doubled after each further failure.
        sleep: the function used to wait (tests pass a no-op).

    Returns:
        ``dest``, which now holds a verified file.

    Raises:
        DataError: no mirror delivered a file with the expected checksum; the message lists
            what each mirror did.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = []
    unreachable = []
    for url in urls:
        problem, reached = _try_mirror(url, part, timeout, retries, backoff, sleep, dest.name)
        if not reached:
            unreachable.append(f"{urllib.parse.urlsplit(url).hostname}: {problem}")
        if problem is None:
            try:
                digest = sha256_of_payload(part)
            except DataError:
                digest = "unreadable"
            if digest == expected_sha256:
                publish(part, dest)
                logger.info("downloaded %s from %s", dest, url)
                return dest
            problem = f"checksum mismatch (payload SHA-256 {digest})"
            logger.warning("%s: %s; trying the next mirror", url, problem)
        failures.append(f"{url}: {problem}")
        part.unlink(missing_ok=True)  # never resume one mirror's bytes from another
    offline = bool(urls) and len(unreachable) == len(urls)
    why = (f"no mirror reachable: {', '.join(unreachable)}; is this machine offline?"
           if offline else "; ".join(failures) or "no mirrors configured")
    raise DownloadError(
        f"{dest}: expected a download with payload SHA-256 {expected_sha256} but no mirror "
        f"delivered one ({'; '.join(failures) or 'no mirrors configured'}).",
        why=why, missing=[dest.name], offline=offline,
    )


def _try_mirror(
    url: str,
    part: Path,
    timeout: float,
    retries: int,
    backoff: float,
    sleep: Callable[[float], None],
    label: str,
) -> tuple[str | None, bool]:
    """Transfer ``url`` into ``part`` with retries.

    Returns:
        (None on success, else the reason; False if the host could not be reached at all).

    Network errors and HTTP 5xx are retried (resuming the partial file); other HTTP errors
    (404, 403, ...) end this mirror at once, and so does a first attempt that cannot even
    connect (no DNS answer, refused, unreachable, connect timeout): retrying that within
    seconds rarely helps, and offline it only delays the message.
    """
    reason = "no attempt made"
    for attempt in range(1, retries + 1):
        try:
            _transfer(url, part, timeout, label)
            return None, True
        except urllib.error.HTTPError as exc:
            reason = f"HTTP {exc.code}"
            if exc.code < 500:
                return reason, True
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = str(getattr(exc, "reason", None) or exc) or type(exc).__name__
            if attempt == 1 and _cannot_connect(exc):
                reason = getattr(exc.reason, "strerror", None) or reason  # no "[Errno -2]"
                logger.debug("%s: cannot connect (%s); not retrying", url, reason)
                return reason, False
        logger.warning("%s: attempt %d/%d failed (%s)", url, attempt, retries, reason)
        if attempt < retries:
            sleep(backoff * 2 ** (attempt - 1))
    return reason, True


def missing_files_message(info: DatasetInfo, directory: Path, missing: Sequence[str],
                          why: str | None = None) -> str:
    """The one-sentence help shown when files are absent and cannot be downloaded.

    ``why`` (the download's failure, in a few words) is None when downloading was off.
    """
    names = ", ".join(f"{name}.gz" for name in missing)
    found = "could not be found" if why is None else f"could not be found or downloaded ({why})"
    return (
        f"{directory}: expected the {info.name} idx files but {names} {found}; copy them "
        f"(gzip or plain) into {directory.resolve()}, or pass --data-dir DIR (or set "
        f"DPVIT_DATA_DIR) pointing at a directory that holds them, or download them with "
        f"`python -m dpvit.data fetch {info.name}` where there is network access "
        f"(sources and checksums: data/README.md)."
    )


def fetch_missing(
    info: DatasetInfo,
    directory: Path,
    *,
    mirrors: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    **kwargs: float,
) -> dict[str, Path]:
    """Make sure every idx file of ``info`` is in ``directory``, downloading the absent ones.

    Args:
        info: the dataset.
        directory: where the files live or are downloaded to.
        mirrors: base URLs overriding :func:`mirrors_for` (tests point this at 127.0.0.1).
        names: the idx files wanted (default: all of ``info``'s).
        **kwargs: passed to :func:`download_file` (timeout, retries, backoff, sleep).

    Returns:
        file name -> path of each file (present or freshly downloaded).

    Raises:
        DownloadError: a file could not be downloaded; the message names every missing file
            and where to put it. Offline (no mirror reachable) this happens within the first
            connection attempts, without retries.
    """
    bases = tuple(mirrors_for(info) if mirrors is None else mirrors)
    wanted = tuple(info.file_names if names is None else names)
    paths: dict[str, Path] = {}
    missing = [n for n in wanted if find_idx_file(directory, n) is None]
    for name in wanted:
        found = find_idx_file(directory, name)
        if found is not None:
            paths[name] = found
            continue
        urls = [base.rstrip("/") + f"/{name}.gz" for base in bases]
        try:
            paths[name] = download_file(urls, directory / f"{name}.gz", info.sha256[name],
                                        **kwargs)
        except DownloadError as exc:  # one message: what each mirror did is in exc.why
            raise DownloadError(missing_files_message(info, directory, missing, exc.why),
                                why=exc.why, missing=missing, offline=exc.offline) from exc
        missing.remove(name)
    return paths
