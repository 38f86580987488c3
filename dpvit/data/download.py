"""Fetch dataset files from public mirrors with retries, resume and checksum verification.

Only the standard library (urllib) is used so that a fresh machine needs nothing extra.
Each file is downloaded to ``<name>.gz.part`` next to its destination; an interrupted
transfer resumes from the bytes already on disk with an HTTP Range request. A finished file
is verified (SHA-256 of the decompressed payload) *before* it is moved into place with
``os.replace``, so the data directory only ever holds complete, correct files. A mirror that
serves a file with the wrong checksum is skipped and the next mirror is tried.
"""

from __future__ import annotations

import http.client
import logging
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from dpvit.data.idx import DataError, DatasetInfo, find_idx_file, sha256_of_payload
from dpvit.files import publish

logger = logging.getLogger(__name__)

_CHUNK = 1 << 16
_USER_AGENT = "dpvit-data/0.1 (+urllib)"


class _Progress:
    """A one-line progress bar on a TTY stderr, otherwise a log line every ~10 %."""

    def __init__(self, label: str, total: int | None, done: int) -> None:
        self.label = label
        self.total = total
        self.done = done
        self.tty = sys.stderr.isatty()
        self._next_log = 0.0

    def update(self, n: int) -> None:
        self.done += n
        frac = self.done / self.total if self.total else None
        if self.tty:
            if frac is None:
                text = f"{self.done / 1e6:7.1f} MB"
            else:
                bar = "#" * int(30 * frac)
                text = f"[{bar:<30}] {100 * frac:5.1f}% of {self.total / 1e6:.1f} MB"
            sys.stderr.write(f"\r{self.label}: {text}")
            sys.stderr.flush()
        elif frac is not None and frac >= self._next_log:
            logger.info("%s: %.0f%% of %.1f MB", self.label, 100 * frac, self.total / 1e6)
            self._next_log = frac + 0.1

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


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
    for url in urls:
        problem = _try_mirror(url, part, timeout, retries, backoff, sleep, dest.name)
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
    raise DataError(
        f"{dest}: expected a download with payload SHA-256 {expected_sha256} but no mirror "
        f"delivered one ({'; '.join(failures) or 'no mirrors configured'})."
    )


def _try_mirror(
    url: str,
    part: Path,
    timeout: float,
    retries: int,
    backoff: float,
    sleep: Callable[[float], None],
    label: str,
) -> str | None:
    """Transfer ``url`` into ``part`` with retries; return None on success, else the reason.

    Network errors and HTTP 5xx are retried (resuming the partial file); other HTTP errors
    (404, 403, ...) end this mirror at once.
    """
    reason = "no attempt made"
    for attempt in range(1, retries + 1):
        try:
            _transfer(url, part, timeout, label)
            return None
        except urllib.error.HTTPError as exc:
            reason = f"HTTP {exc.code}"
            if exc.code < 500:
                return reason
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = str(getattr(exc, "reason", None) or exc) or type(exc).__name__
        logger.warning("%s: attempt %d/%d failed (%s)", url, attempt, retries, reason)
        if attempt < retries:
            sleep(backoff * 2 ** (attempt - 1))
    return reason


def missing_files_message(info: DatasetInfo, directory: Path, missing: Sequence[str]) -> str:
    """The one-sentence help shown when files are absent and cannot be downloaded."""
    names = ", ".join(f"{name}.gz" for name in missing)
    return (
        f"{directory}: expected the {info.name} idx files but {names} could not be found or "
        f"downloaded; place them (gzip or plain) in {directory.resolve()} or pass --data-dir "
        f"DIR (or set DPVIT_DATA_DIR) pointing at a directory that holds them."
    )


def fetch_missing(
    info: DatasetInfo,
    directory: Path,
    *,
    mirrors: Sequence[str] | None = None,
    **kwargs: float,
) -> dict[str, Path]:
    """Make sure every idx file of ``info`` is in ``directory``, downloading the absent ones.

    Args:
        info: the dataset.
        directory: where the files live or are downloaded to.
        mirrors: base URLs overriding ``info.mirrors`` (tests point this at 127.0.0.1).
        **kwargs: passed to :func:`download_file` (timeout, retries, backoff, sleep).

    Returns:
        file name -> path of each file (present or freshly downloaded).

    Raises:
        DataError: a file could not be downloaded; the message names every missing file and
            where to put it.
    """
    bases = tuple(info.mirrors if mirrors is None else mirrors)
    paths: dict[str, Path] = {}
    missing = [n for n in info.file_names if find_idx_file(directory, n) is None]
    for name in info.file_names:
        found = find_idx_file(directory, name)
        if found is not None:
            paths[name] = found
            continue
        urls = [base.rstrip("/") + f"/{name}.gz" for base in bases]
        try:
            paths[name] = download_file(urls, directory / f"{name}.gz", info.sha256[name],
                                        **kwargs)
        except DataError as exc:
            logger.error("%s", exc)
            raise DataError(missing_files_message(info, directory, missing)) from exc
        missing.remove(name)
    return paths
