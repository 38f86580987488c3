"""Writing files so that a crash never leaves a partial file under the final name.

Every file dpvit writes for later (checkpoints, the dataset store, report files, downloads)
goes through `atomic_write` or `publish`: the bytes go to a temporary name in the same
directory, are flushed to disk, and are then renamed over the final name, and the directory
entry is flushed too. A reader sees either the previous file or the complete new one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Temporary files are "<final name>.tmp-<pid>-<hex>" (git-ignored), so that leftovers of a
#: killed writer can be recognised and removed (`dpvit.checkpoint.prune_checkpoints`).
TMP_MARK = ".tmp-"


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's) data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(final: Path) -> Path:
    """A fresh temporary name beside ``final``, unique across processes and calls."""
    return final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}")


def publish(tmp: Path, final: Path) -> None:
    """Make the complete file ``tmp`` appear as ``final``: fsync, rename, fsync the directory."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(final.parent)


@contextmanager
def atomic_write(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``final`` durably.

    The temporary file is removed whatever happens, so an exception (a full disk, a bad
    value) leaves ``final`` as it was and nothing beside it.
    """
    final = Path(final)
    tmp = temp_path_for(final)
    try:
        yield tmp
        publish(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` with `atomic_write`."""
    with atomic_write(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
