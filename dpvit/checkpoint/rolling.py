"""Rolling checkpoints of a run: step-N.h5 files, last.h5 and best.h5, retention, resume lookup."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from dpvit.checkpoint.format import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    read_checkpoint_step,
    save_checkpoint,
)
from dpvit.files import TMP_MARK, fsync_path, temp_path_for

logger = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step-(\d+)\.h5$")


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Return the rolling checkpoints `step-<N>.h5` in `ckpt_dir`, sorted by N ascending.

    Temporary files, `last.h5` and `best.h5` are not listed; a missing directory gives [].
    """
    directory = Path(ckpt_dir)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def _checkpoint_dir(run_dir_or_ckpt_dir: str | os.PathLike) -> Path:
    directory = Path(run_dir_or_ckpt_dir)
    nested = directory / "checkpoints"
    return nested if nested.is_dir() else directory


def find_resume_checkpoint(run_dir_or_ckpt_dir: str | os.PathLike) -> Path | None:
    """Return the newest valid checkpoint for `--resume auto`, or None if there is none.

    Candidates are `step-*.h5` and `last.h5` in the run directory's `checkpoints/` (or in
    the given directory itself), ordered by their stored step. Each is fully loaded and
    verified, newest first; a damaged one is skipped with a WARNING naming the file and the
    problem, so a crash or bad disk block in the newest file falls back to an older one.
    """
    directory = _checkpoint_dir(run_dir_or_ckpt_dir)
    candidates = list_checkpoints(directory)
    last = directory / "last.h5"
    if last.is_file():
        candidates.append(last)
    ranked, seen = [], set()
    for path in candidates:
        stat = path.stat()
        inode = (stat.st_dev, stat.st_ino)
        if inode in seen:  # last.h5 is usually a hard link to the newest step file
            continue
        seen.add(inode)
        try:
            step = read_checkpoint_step(path)
        except CheckpointError as exc:
            logger.warning("skipping checkpoint %s: %s", path, exc)
            continue
        ranked.append((step, path.name != "last.h5", path))
    for _, _, path in sorted(ranked, reverse=True):
        try:
            load_checkpoint(path, verify=True)
        except CheckpointError as exc:
            logger.warning("skipping checkpoint %s: %s", path, exc)
            continue
        return path
    return None


def prune_checkpoints(ckpt_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` `step-*.h5` files, and stale temporary files.

    `last.h5` and `best.h5` are separate links or copies, so they survive pruning. Call it
    only from the single writer (rank 0), after its save has completed.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    directory = Path(ckpt_dir)
    steps = list_checkpoints(directory)
    for path in steps[: max(0, len(steps) - keep)]:
        path.unlink(missing_ok=True)
        logger.debug("pruned checkpoint %s", path)
    for path in directory.glob(f"*.h5{TMP_MARK}*"):  # left by a writer that was killed
        path.unlink(missing_ok=True)


def _link_atomic(source: Path, target: Path) -> None:
    """Make `target` name the same content as `source`, replacing it atomically."""
    tmp = temp_path_for(target)
    try:
        try:
            os.link(source, tmp)
        except OSError:  # no hard links on this filesystem: copy instead
            shutil.copyfile(source, tmp)
            fsync_path(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def save_rolling(ckpt_dir: str | os.PathLike, ckpt: Checkpoint, keep: int, is_best: bool) -> Path:
    """Save `ckpt_dir/step-<step>.h5`, point `last.h5` (and `best.h5`) at it, then prune.

    Args:
        ckpt_dir: The run's checkpoints directory (created if missing).
        ckpt: The state to save.
        keep: How many `step-*.h5` files to keep.
        is_best: Also update `best.h5` (e.g. best test accuracy so far).

    Returns:
        The path of the new step file.

    Raises:
        CheckpointError: If a file cannot be written.
    """
    directory = Path(ckpt_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{int(ckpt.step)}.h5"
    save_checkpoint(path, ckpt)
    try:
        _link_atomic(path, directory / "last.h5")
        if is_best:
            _link_atomic(path, directory / "best.h5")
        fsync_path(directory)
    except OSError as exc:
        raise CheckpointError(f"could not update last.h5/best.h5 in {directory}: {exc}") from exc
    prune_checkpoints(directory, keep)
    return path
