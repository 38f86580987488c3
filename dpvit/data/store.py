"""Convert verified idx files once into an HDF5 store that every rank reads.

Layout of ``<name>.h5``::

    /train/images  uint8 (N, 28, 28), chunked, gzip + shuffle, fletcher32
    /train/labels  uint8 (N,)
    /test/images, /test/labels
    attrs: format_version, dataset, splits, class_names, mean, std,
           source_sha256 (JSON: idx file name -> payload SHA-256), dpvit_version

The store lives in the dataset's directory when that is writable and otherwise in a user
cache (``$DPVIT_CACHE_DIR`` or ``~/.cache/dpvit``), so read-only shared copies of the data
work. A store whose recorded source checksums equal the registry's is reused without
touching the idx files. Conversion holds an ``fcntl`` lock and writes a temporary file that
is fsynced and renamed, so several processes starting together convert exactly once and no
reader ever sees half a file.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dpvit import __version__
from dpvit.data.download import fetch_missing, missing_files_message
from dpvit.data.idx import (
    DATASETS,
    SPLITS,
    DataError,
    DatasetInfo,
    find_idx_file,
    get_info,
    read_split,
)
from dpvit.files import atomic_write

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def resolve_data_dir(name: str, data_dir: str | None) -> Path:
    """Directory that holds (or will receive) the idx files of dataset ``name``.

    ``data_dir`` (or ``$DPVIT_DATA_DIR`` when it is None, or ``data/<name>`` relative to the
    working directory when neither is set) may be the dataset's own directory or a root
    holding ``<name>/``. A directory named after a *different* known dataset is read as a
    sibling, so ``DPVIT_DATA_DIR=/datasets/mnist`` with ``--dataset fashion-mnist`` looks in
    ``/datasets/fashion-mnist`` instead of misreading the MNIST files.
    """
    get_info(name)
    path = _requested_dir(name, data_dir)
    if (path / name).is_dir():
        return path / name
    if _names_another_dataset(name, path):
        return path.parent / name
    return path


def _requested_dir(name: str, data_dir: str | None) -> Path:
    """``data_dir``, else ``$DPVIT_DATA_DIR``, else ``data/<name>``."""
    if data_dir is None:
        data_dir = os.environ.get("DPVIT_DATA_DIR") or str(Path("data") / name)
    return Path(data_dir).expanduser()


def _names_another_dataset(name: str, path: Path) -> bool:
    """True if ``path`` is the directory of another known dataset (read as a sibling)."""
    return path.name != name and path.name in DATASETS


def cache_dir() -> Path:
    """User cache for stores that cannot live next to read-only data."""
    return Path(os.environ.get("DPVIT_CACHE_DIR") or Path.home() / ".cache" / "dpvit")


def _dir_is_writable(path: Path) -> bool:
    """True if ``path`` exists or can be created, and files can be created in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    # root passes os.access everywhere: also honour a directory marked read-only (no write
    # bits), such as a shared dataset copy, so dpvit never writes into it
    return os.access(path, os.W_OK | os.X_OK) and bool(path.stat().st_mode & 0o222)


def store_candidates(info: DatasetInfo, data_dir: Path) -> list[Path]:
    """Places a store for ``info`` may live, in order of preference."""
    return [data_dir / f"{info.name}.h5", cache_dir() / f"{info.name}.h5"]


def _store_matches(path: Path, info: DatasetInfo) -> bool:
    """True if ``path`` is a complete store built from the expected source files."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            ok = (
                f.attrs.get("format_version") == FORMAT_VERSION
                and f.attrs.get("dataset") == info.name
                and json.loads(f.attrs.get("source_sha256", "{}")) == info.sha256
                and all(f"{s}/images" in f and f"{s}/labels" in f for s in SPLITS)
            )
    except (OSError, ValueError) as exc:
        logger.warning("%s: ignoring unreadable store (%s)", path, exc)
        return False
    if not ok:
        logger.info("%s: store does not match the %s source checksums", path, info.name)
    return bool(ok)


def find_store(name: str, data_dir: str | None) -> Path | None:
    """Path of an existing, matching store for ``name``, or None."""
    info = get_info(name)
    ddir = resolve_data_dir(name, data_dir)
    return next((p for p in store_candidates(info, ddir) if _store_matches(p, info)), None)


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
    info: DatasetInfo, data_dir: Path, download: bool, **download_kwargs: Any
) -> dict[str, Path]:
    """Find each idx file in ``data_dir``, the system dirs or ``<cache>/<name>/``, else download.

    Downloads go to ``data_dir`` when writable, else to ``<cache>/<name>/``.

    Raises:
        DataError: a file is missing and downloading is off or failed; the message names
            the missing files and where to put them.
    """
    found: dict[str, Path] = {}
    for name in info.file_names:
        for directory in (data_dir, *map(Path, info.system_dirs), cache_dir() / info.name):
            path = find_idx_file(directory, name)
            if path is not None:
                found[name] = path
                break
    missing = [n for n in info.file_names if n not in found]
    if not missing:
        return found
    if not download:
        raise DataError(missing_files_message(info, data_dir, missing))
    target = data_dir if _dir_is_writable(data_dir) else cache_dir() / info.name
    logger.info("downloading %s into %s", ", ".join(missing), target)
    fetched = fetch_missing(info, target, **download_kwargs)
    return {**found, **{n: fetched[n] for n in missing}}


def convert(info: DatasetInfo, files: dict[str, Path], store_path: Path) -> None:
    """Verify the idx files and write the store atomically to ``store_path``.

    Every file is read and checked before anything is written, so a bad file leaves no
    store (and no temporary file) behind.
    """
    splits = {}
    digests: dict[str, str] = {}
    for split in SPLITS:
        images_name, labels_name = info.files[split]
        images, labels, d = read_split(info, split, files[images_name], files[labels_name])
        splits[split] = (images, labels)
        digests.update(d)
    with atomic_write(store_path) as tmp, h5py.File(tmp, "w") as f:
        for split, (images, labels) in splits.items():
            g = f.create_group(split)
            g.create_dataset("images", data=images, chunks=(min(1024, len(images)),
                             *info.image_shape), compression="gzip", compression_opts=1,
                             shuffle=True, fletcher32=True)
            g.create_dataset("labels", data=labels, compression="gzip", fletcher32=True)
        f.attrs.update({
            "format_version": FORMAT_VERSION,
            "dataset": info.name,
            "splits": json.dumps(list(SPLITS)),
            "class_names": json.dumps(list(info.class_names)),
            "mean": info.mean,
            "std": info.std,
            "source_sha256": json.dumps(digests, sort_keys=True),
            "dpvit_version": __version__,
        })
    logger.info("wrote %s", store_path)


def _prepare_here(name: str, data_dir: str | None, download: bool, **kwargs: Any) -> Path:
    """Find or build the store in this process (the single-process half of prepare)."""
    info = get_info(name)
    ddir = resolve_data_dir(name, data_dir)
    existing = find_store(name, data_dir)
    if existing is not None:
        return existing
    # Fail before creating any directory or lock file when the files are absent and
    # cannot be downloaded.
    if not download:
        locate_idx_files(info, ddir, download=False)
    # A sibling derived from another dataset's directory is used if it exists, but never
    # created: that would write into a dataset tree the user only pointed at for MNIST.
    may_create = not _names_another_dataset(name, _requested_dir(name, data_dir))
    home = ddir if (ddir.is_dir() or may_create) and _dir_is_writable(ddir) else cache_dir()
    home.mkdir(parents=True, exist_ok=True)
    store_path = home / f"{name}.h5"
    with _file_lock(home / f".{name}.h5.lock"):
        if _store_matches(store_path, info):  # another process converted while we waited
            return store_path
        files = locate_idx_files(info, ddir, download, **kwargs)
        logger.info("converting %s idx files into %s", name, store_path)
        convert(info, files, store_path)
    return store_path


def prepare_dataset(
    name: str, data_dir: str | None, comm: Any = None, download: bool = True, **kwargs: Any
) -> Path:
    """Return the path of the verified HDF5 store for ``name``, building it if needed.

    Rank 0 (or the only process when ``comm`` is None) finds, verifies and converts the idx
    files; the other ranks wait at ``comm.barrier()`` and then locate the same store. This
    assumes a file system shared by all ranks (or a store prepared beforehand on each node).
    An exception on rank 0 propagates before the barrier; the caller's abort-on-error
    handling (``dpvit.parallel.comm``) must end the other ranks.

    Args:
        name: "mnist" or "fashion-mnist".
        data_dir: see :func:`resolve_data_dir`.
        comm: object with ``rank`` and ``barrier()``, or None for a single process.
        download: fetch missing files from the mirrors.
        **kwargs: passed to the downloader (mirrors, timeout, retries, backoff, sleep).

    Raises:
        DataError: unknown dataset, missing/corrupt files, or no store visible on this rank.
    """
    if comm is None:
        return _prepare_here(name, data_dir, download, **kwargs)
    if comm.rank == 0:
        path = _prepare_here(name, data_dir, download, **kwargs)
        comm.barrier()
        return path
    comm.barrier()
    found = find_store(name, data_dir)
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
