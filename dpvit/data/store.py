"""Convert verified idx files once into an HDF5 store that every rank reads.

Layout of ``<name>.h5``::

    /train/images  uint8 (N, 28, 28), chunked, gzip + shuffle, fletcher32
    /train/labels  uint8 (N,)
    /test/images, /test/labels
    attrs: format_version, dataset, splits, class_names, mean, std,
           source_sha256 (JSON: idx file name -> payload SHA-256), dpvit_version,
           sources (JSON: idx file name -> path it was read from), created (ISO time)

A store may hold only some splits (``splits`` lists them): ``python -m dpvit.evaluate`` needs
the test split alone, so it never fetches or converts the training files. Stores written
before ``sources`` and ``created`` existed are read the same way.

Where the store lives is ``dpvit.data.location``'s rule (never in a directory dpvit was only
pointed at, such as a read-only reference copy). A store whose
recorded source checksums equal the registry's is reused without touching the idx files,
wherever it is found (the store directory, the data directory, the cache). Conversion holds
an ``fcntl`` lock and writes a temporary file that is fsynced and renamed, so several
processes starting together convert exactly once and no reader ever sees half a file. A
preparation that fails (offline, files missing) removes the directories and lock it created.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dpvit import __version__
from dpvit.data.download import DownloadError, fetch_missing, missing_files_message
from dpvit.data.idx import (
    SPLITS,
    DataError,
    DatasetInfo,
    find_idx_file,
    get_info,
    read_split,
)
from dpvit.data.location import (
    _dir_is_writable,
    cache_dir,
    is_own_data_dir,
    resolve_data_dir,
    store_candidates,
    store_dir_for,
)
from dpvit.errors import AgreedError, UserError
from dpvit.files import atomic_write

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


class AgreedDataError(DataError, AgreedError):
    """A data problem rank 0 found and broadcast: every rank raises it together, so the job
    reports it once and exits without ``MPI_Abort``."""


def split_files(info: DatasetInfo, splits: Sequence[str]) -> list[str]:
    """The idx file names of ``splits``."""
    for split in splits:
        if split not in SPLITS:
            raise DataError(f"{info.name}: expected a split in {SPLITS} but got {split!r}.")
    return [f for split in splits for f in info.files[split]]


def _store_matches(path: Path, info: DatasetInfo, splits: Sequence[str] = SPLITS) -> bool:
    """True if ``path`` is a complete store holding ``splits``, built from the expected files."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            recorded = json.loads(f.attrs.get("source_sha256", "{}"))
            ok = (
                f.attrs.get("format_version") == FORMAT_VERSION
                and f.attrs.get("dataset") == info.name
                and all(recorded.get(n) == info.sha256[n] for n in split_files(info, splits))
                and all(f"{s}/images" in f and f"{s}/labels" in f for s in splits)
            )
    except (OSError, ValueError) as exc:
        logger.warning("%s: ignoring unreadable store (%s)", path, exc)
        return False
    if not ok:
        logger.info("%s: store lacks %s or does not match the %s source checksums", path,
                    "/".join(splits), info.name)
    return bool(ok)


def find_store(name: str, data_dir: str | None, store_dir: str | None = None,
               splits: Sequence[str] = SPLITS) -> Path | None:
    """Path of an existing store for ``name`` that holds ``splits`` and matches, or None."""
    info = get_info(name)
    ddir = resolve_data_dir(name, data_dir)
    return next((p for p in store_candidates(info, ddir, store_dir)
                 if _store_matches(p, info, splits)), None)


def describe_store(path: Path) -> str:
    """Where a store's data came from, for the log: "built <when> from <dirs>"."""
    try:
        with h5py.File(path, "r") as f:
            sources = json.loads(f.attrs.get("sources", "{}"))
            created = f.attrs.get("created", "")
    except (OSError, ValueError):
        return "origin unknown"
    dirs = sorted({str(Path(p).parent) for p in sources.values()})
    origin = f"from {', '.join(dirs)}" if dirs else "from idx files not recorded (older store)"
    return f"built {created} {origin}" if created else f"built {origin}"


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (created if needed) for the block."""
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def locate_idx_files(
    info: DatasetInfo, data_dir: Path, download: bool, names: Sequence[str] | None = None,
    **download_kwargs: Any,
) -> dict[str, Path]:
    """Find each idx file in ``data_dir``, the system dirs or ``<cache>/<name>/``, else download.

    ``names`` (default: every file of ``info``) limits the search to some files. Downloads go
    to ``data_dir`` when it is dpvit's own or an existing writable directory, else to
    ``<cache>/<name>/``.

    Raises:
        DataError: a file is missing and downloading is off or failed; the message names
            the missing files and where to put them.
    """
    wanted = list(info.file_names if names is None else names)
    found: dict[str, Path] = {}
    for name in wanted:
        for directory in (data_dir, *map(Path, info.system_dirs), cache_dir() / info.name):
            path = find_idx_file(directory, name)
            if path is not None:
                found[name] = path
                break
    missing = [n for n in wanted if n not in found]
    if not missing:
        return found
    if not download:
        raise DataError(missing_files_message(info, data_dir, missing))
    # a directory the user pointed at receives downloads if it exists; dpvit creates only its
    # own data/<name>/ (never, say, a sibling of a read-only reference copy)
    own = is_own_data_dir(info.name, data_dir)
    target = data_dir if _dir_is_writable(data_dir, create=own) and (own or data_dir.is_dir()) \
        else cache_dir() / info.name
    logger.info("downloading %s into %s", ", ".join(missing), target)
    try:
        fetched = fetch_missing(info, target, names=missing, **download_kwargs)
    except DownloadError as exc:  # say where the user should put them: the data directory
        raise DownloadError(missing_files_message(info, data_dir, exc.missing, exc.why),
                            why=exc.why, missing=exc.missing, offline=exc.offline) from None
    return {**found, **{n: fetched[n] for n in missing}}


def convert(info: DatasetInfo, files: dict[str, Path], store_path: Path,
            splits: Sequence[str] = SPLITS) -> None:
    """Verify the idx files of ``splits`` and write the store atomically to ``store_path``.

    Every file is read and checked before anything is written, so a bad file leaves no
    store (and no temporary file) behind.
    """
    arrays = {}
    digests: dict[str, str] = {}
    for split in splits:
        images_name, labels_name = info.files[split]
        images, labels, d = read_split(info, split, files[images_name], files[labels_name])
        arrays[split] = (images, labels)
        digests.update(d)
    sources = {n: str(Path(os.path.abspath(files[n]))) for n in split_files(info, splits)}
    with atomic_write(store_path) as tmp, h5py.File(tmp, "w") as f:
        for split, (images, labels) in arrays.items():
            g = f.create_group(split)
            g.create_dataset("images", data=images, chunks=(min(1024, len(images)),
                             *info.image_shape), compression="gzip", compression_opts=1,
                             shuffle=True, fletcher32=True)
            g.create_dataset("labels", data=labels, compression="gzip", fletcher32=True)
        f.attrs.update({
            "format_version": FORMAT_VERSION,
            "dataset": info.name,
            "splits": json.dumps(list(splits)),
            "class_names": json.dumps(list(info.class_names)),
            "mean": info.mean,
            "std": info.std,
            "source_sha256": json.dumps(digests, sort_keys=True),
            "sources": json.dumps(sources, sort_keys=True),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "dpvit_version": __version__,
        })
    logger.debug("wrote %s", store_path)


def _absent_dirs(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    absent = []
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        absent.append(path)
        path = path.parent
    return absent


def _prepare_here(name: str, data_dir: str | None, download: bool, store_dir: str | None,
                  splits: Sequence[str], **kwargs: Any) -> tuple[Path, str]:
    """Find or build the store in this process (the single-process half of prepare).

    Returns:
        the store's path and one sentence for the log: which copy, where, checksum status.
    """
    info = get_info(name)
    ddir = resolve_data_dir(name, data_dir)
    names = split_files(info, splits)
    checked = "the SHA-256 of its idx files match dpvit's registry"
    existing = find_store(name, data_dir, store_dir, splits)
    if existing is not None:
        return existing, (f"{name} data: the existing store {existing} "
                          f"({describe_store(existing)}; {checked})")
    # Fail before creating any directory or lock file when the files are absent and
    # cannot be downloaded.
    if not download:
        locate_idx_files(info, ddir, download=False, names=names)
    home = store_dir_for(name, ddir, store_dir)
    store_path = home / f"{name}.h5"
    lock = home / f".{name}.h5.lock"
    created = [*_absent_dirs(ddir), *_absent_dirs(home), *_absent_dirs(cache_dir() / name)]
    new_lock = not lock.exists()
    try:
        try:
            home.mkdir(parents=True, exist_ok=True)
            with _file_lock(lock):
                if _store_matches(store_path, info, splits):  # converted while we waited
                    return store_path, (f"{name} data: the store {store_path} another "
                                        f"process just built ({describe_store(store_path)}; "
                                        f"{checked})")
                files = locate_idx_files(info, ddir, download, names=names, **kwargs)
                logger.debug("converting %s idx files into %s", name, store_path)
                convert(info, files, store_path, splits)
        except OSError as exc:  # the store's directory: not creatable, read-only, full
            raise DataError(
                f"{store_path}: expected to write the {name} store there but "
                f"{exc.strerror or exc} ({exc.filename or home}); pass --store-dir DIR or set "
                f"DPVIT_CACHE_DIR to a writable directory."
            ) from None
    except DataError:
        if new_lock:  # leave nothing behind: the lock and the directories made for it
            with contextlib.suppress(OSError):
                lock.unlink(missing_ok=True)
        for directory in sorted(set(created), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if empty
        raise
    dirs = sorted({str(Path(os.path.abspath(files[n])).parent) for n in names})
    return store_path, (f"{name} data: the {'/'.join(splits)} idx files in {', '.join(dirs)}, "
                        f"verified (SHA-256 match dpvit's registry) and converted into "
                        f"{store_path}")


def prepare_dataset(
    name: str, data_dir: str | None, comm: Any = None, download: bool = True, *,
    store_dir: str | None = None, splits: Sequence[str] = SPLITS, **kwargs: Any
) -> Path:
    """Return the path of the verified HDF5 store for ``name``, building it if needed.

    Rank 0 (or the only process when ``comm`` is None) finds, verifies and converts the idx
    files and logs once which copy of the data is used; the other ranks wait asleep and then
    locate the same store. This assumes a file system shared by all ranks (or a store
    prepared beforehand on each node). A ``UserError`` on rank 0 (files missing, offline,
    corrupt) is broadcast and raised on every rank as :class:`AgreedDataError`: one message,
    every rank exits, no ``MPI_Abort``.

    Args:
        name: "mnist" or "fashion-mnist".
        data_dir: see :func:`resolve_data_dir`.
        comm: object with ``rank``, ``barrier()`` and ``broadcast_object()`` (and optionally
            ``sleeping_barrier()`` and ``no_deadline()``), or None for a single process.
        download: fetch missing files from the mirrors.
        store_dir: where to write the store (default: :func:`store_dir_for`).
        splits: the splits needed (``("test",)`` for evaluation alone).
        **kwargs: passed to the downloader (mirrors, timeout, retries, backoff, sleep).

    Raises:
        DataError: unknown dataset, missing/corrupt files, or no store visible on this rank.
    """
    if comm is None:
        path, note = _prepare_here(name, data_dir, download, store_dir, splits, **kwargs)
        logger.info("%s", note)
        return path
    error = None
    no_deadline = getattr(comm, "no_deadline", contextlib.nullcontext)
    with no_deadline():  # rank 0 may download for minutes while the others wait
        if comm.rank == 0:
            try:
                path, note = _prepare_here(name, data_dir, download, store_dir, splits, **kwargs)
                logger.info("%s", note)
            except UserError as exc:
                error = str(exc)
        getattr(comm, "sleeping_barrier", comm.barrier)()
    error = comm.broadcast_object(error)
    if error is not None:
        raise AgreedDataError(error)
    if comm.rank == 0:
        return path
    found = find_store(name, data_dir, store_dir, splits)
    if found is None:
        raise DataError(
            f"{resolve_data_dir(name, data_dir)}: expected the {name} store written by rank 0 "
            f"but this rank cannot see it (is the directory on a shared file system?)."
        )
    return found


def load_split(store_path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one split into memory: (images uint8 (N, 28, 28), labels int64 (N,)).

    Raises:
        DataError: the store is missing, unreadable, corrupt or lacks ``split``.
    """
    if split not in SPLITS:
        raise DataError(f"{store_path}: expected a split in {SPLITS} but got {split!r}.")
    try:
        with h5py.File(store_path, "r") as f:
            images = f[split]["images"][...]
            labels = f[split]["labels"][...].astype(np.int64)
    except KeyError as exc:
        raise DataError(
            f"{store_path}: expected {split}/images and {split}/labels but one is missing ({exc})."
        ) from None
    except OSError as exc:
        raise DataError(
            f"{store_path}: expected a readable dpvit HDF5 store but reading failed ({exc})."
        ) from None
    return images, labels


def split_size(store_path: Path, split: str) -> int:
    """The number of samples in ``split`` of a store, without reading them."""
    try:
        with h5py.File(store_path, "r") as f:
            return int(f[split]["labels"].shape[0])
    except (KeyError, OSError) as exc:
        raise DataError(f"{store_path}: expected a readable {split} split ({exc}).") from None
