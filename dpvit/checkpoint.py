"""HDF5 training checkpoints: atomic save, verified load, rolling retention and resume lookup.

Layout (format version 1), readable with `h5dump` or h5py:

    /params/<a>/<b>/...           one dataset per parameter; "blocks.3.attn.qkv.weight" is
                                  stored at /params/blocks/3/attn/qkv/weight
    /optimizer/<state>/<a>/...    e.g. /optimizer/exp_avg/blocks/3/attn/qkv/weight
    /optimizer attrs              optimizer scalars such as "step"
    /rng/state                    JSON of the RNG state(s), as uint8 bytes
    /metrics                      JSON list of the metrics history, as uint8 bytes
    root attrs                    format_version, dpvit_version, step, epoch, position,
                                  world_size, config (JSON), digest (SHA-256)

Containers carry a "names" attribute (JSON list) giving the dotted names in their original
order. Every non-scalar dataset has a fletcher32 chunk checksum, and the root "digest" is a
SHA-256 over every dataset's path, dtype, shape and bytes plus the metadata attributes, so a
flipped byte anywhere is caught on load. Files are written to a temporary name in the same
directory, fsynced and renamed, so a crash never leaves a partial file under the final name.
Nothing in the file depends on the number of ranks, so a run resumes on any world size.
The module is generic over named arrays; it does not know the model classes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import h5py
import numpy as np

from dpvit import __version__
from dpvit.errors import UserError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
T = TypeVar("T")
_STEP_RE = re.compile(r"^step-(\d+)\.h5$")
_TMP_MARK = ".tmp-"  # temporary files are "<final name>.tmp-<pid>-<hex>" (git-ignored)
_META_ATTRS = ("format_version", "step", "epoch", "position", "world_size", "config")
# what h5py and the decoders raise on damaged metadata (RuntimeError: e.g. a corrupt local heap,
# found by tests/test_fuzz.py)
_READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError)
# every file starts with a 512-byte HDF5 user block holding _MAGIC and the SHA-256 and size of
# the whole file, checked before HDF5 reads anything (see _check_sealed)
_HEADER_BYTES = 512
_MAGIC = b"dpvit checkpoint\n"
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class CheckpointError(UserError):
    """A checkpoint file is missing, damaged, or not one this version of dpvit can read."""


@dataclass
class Checkpoint:
    """Everything needed to continue a run exactly.

    Attributes:
        params: Dotted timm-style name -> parameter array.
        optimizer: State name ("exp_avg", "exp_avg_sq", "momentum_buffer") -> param name ->
            array.
        optimizer_scalars: Scalar optimizer state, e.g. {"step": 123}.
        rng: JSON-serialisable RNG state, e.g. {"data": generator.bit_generator.state}.
        step: Optimizer steps done.
        epoch: Current epoch (0-based).
        position: Steps done inside the current epoch.
        world_size: Number of ranks that wrote it (informational; resume works on any).
        config: The full resolved configuration.
        metrics: Metrics history, one dict per logged step or epoch.
        path: The file it was loaded from (None when built in memory); for error messages.
    """

    params: dict[str, np.ndarray]
    optimizer: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    optimizer_scalars: dict[str, float | int] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    epoch: int = 0
    position: int = 0
    world_size: int = 1
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = field(default=None, compare=False)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _to_json(obj: Any) -> str:
    return json.dumps(obj, default=_json_default, sort_keys=True)


def _name_to_path(name: str) -> str:
    parts = name.split(".")
    if not name or "/" in name or any(not p for p in parts):
        raise ValueError(
            f"invalid array name {name!r}: use dotted names like 'blocks.0.norm1.weight'"
        )
    return "/".join(parts)


def _bytes_array(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def _write_array(group: h5py.Group, path: str, arr: np.ndarray, digest: Any) -> None:
    data = np.asarray(arr, order="C")
    checks = {"fletcher32": True} if data.ndim > 0 and data.size > 0 else {}
    ds = group.create_dataset(path, data=data, **checks)
    _update_digest(digest, ds.name, data)


def _update_digest(digest: Any, name: str, data: np.ndarray) -> None:
    header = f"{name}|{data.dtype.str}|{data.shape}|"
    digest.update(header.encode())
    digest.update(np.asarray(data, order="C").reshape(-1).view(np.uint8))


def _write_named(group: h5py.Group, arrays: dict[str, np.ndarray], digest: Any) -> None:
    group.attrs["names"] = _to_json(list(arrays))
    for name, arr in arrays.items():
        try:
            _write_array(group, _name_to_path(name), np.asarray(arr), digest)
        except ValueError as exc:
            raise ValueError(f"cannot store {name!r} under {group.name}: {exc}") from exc


def _meta_digest(digest: Any, attrs: dict[str, Any], scalars: dict[str, Any]) -> None:
    meta = {k: attrs[k] for k in _META_ATTRS}
    digest.update(_to_json({"meta": meta, "optimizer_scalars": scalars}).encode())


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(final: Path) -> Path:
    return final.with_name(f"{final.name}{_TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}")


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> None:
    """Write `ckpt` to `path` atomically (call on rank 0 only).

    The file is written under a temporary name in the same directory, flushed and fsynced,
    renamed over `path` with `os.replace`, and the directory is fsynced, so `path` holds
    either the previous file or the complete new one, whatever happens.

    Args:
        path: Final file name, e.g. run/checkpoints/step-200.h5.
        ckpt: The state to save; arrays keep their dtype and bytes exactly.

    Raises:
        CheckpointError: If the file cannot be written (disk full, permissions).
        ValueError: If a name is not a valid dotted name or a value is not JSON-serialisable.
    """
    final = Path(path)
    tmp = _tmp_name(final)
    attrs = {
        "format_version": FORMAT_VERSION,
        "step": int(ckpt.step),
        "epoch": int(ckpt.epoch),
        "position": int(ckpt.position),
        "world_size": int(ckpt.world_size),
        "config": _to_json(ckpt.config),
    }
    scalars = {
        k: _json_default(v) if isinstance(v, np.generic) else v
        for k, v in ckpt.optimizer_scalars.items()
    }
    try:
        digest = hashlib.sha256()
        with h5py.File(tmp, "w", locking=False, userblock_size=_HEADER_BYTES) as f:
            _write_named(f.create_group("params"), ckpt.params, digest)
            opt = f.create_group("optimizer")
            for state in sorted(ckpt.optimizer):  # HDF5 lists groups alphabetically
                if not state or "." in state or "/" in state:
                    raise ValueError(f"invalid optimizer state name {state!r}")
                _write_named(opt.create_group(state), ckpt.optimizer[state], digest)
            for key, value in scalars.items():
                opt.attrs[key] = value
            _write_array(f, "rng/state", _bytes_array(_to_json(ckpt.rng)), digest)
            _write_array(f, "metrics", _bytes_array(_to_json(ckpt.metrics)), digest)
            _meta_digest(digest, attrs, scalars)
            f.attrs.update(attrs)
            f.attrs["dpvit_version"] = __version__
            f.attrs["digest"] = digest.hexdigest()
            f.flush()
        _seal(tmp)
        _fsync_path(tmp)
        os.replace(tmp, final)
        _fsync_path(final.parent)
    except OSError as exc:
        raise CheckpointError(f"could not write checkpoint {final}: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    logger.debug("saved checkpoint %s (step %d)", final, ckpt.step)


def _read_array(group: h5py.Group, path: str, where: Path) -> np.ndarray:
    obj = group.get(path)
    if not isinstance(obj, h5py.Dataset):
        raise CheckpointError(f"checkpoint {where} is missing dataset {group.name}/{path}")
    try:
        return obj[()]
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint {where} is damaged: dataset {obj.name} failed its fletcher32 checksum"
        ) from exc


def _read_json_bytes(group: h5py.Group, path: str, where: Path, digest: Any) -> Any:
    data = _read_array(group, path, where)
    _update_digest(digest, f"{group.name.rstrip('/')}/{path}", data)
    try:
        return json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {where} has unreadable JSON in /{path}") from exc


def _read_named(group: h5py.Group, where: Path, digest: Any) -> dict[str, np.ndarray]:
    names = json.loads(_attr(group, "names", where))
    out = {}
    for name in names:
        path = _name_to_path(name)
        out[name] = _read_array(group, path, where)
        _update_digest(digest, f"{group.name}/{path}", out[name])
    return out


def _attr(obj: h5py.HLObject, key: str, where: Path) -> Any:
    if key not in obj.attrs:
        raise CheckpointError(f"checkpoint {where} is missing attribute {key!r} on {obj.name}")
    value = obj.attrs[key]
    return value.item() if isinstance(value, np.generic) else value


def _group(parent: h5py.Group, key: str, where: Path) -> h5py.Group:
    obj = parent.get(key)
    if not isinstance(obj, h5py.Group):
        raise CheckpointError(f"checkpoint {where} is missing group /{key}")
    return obj


def _file_digest(fh: Any) -> tuple[str, int]:
    """SHA-256 and length of an open file's bytes after the header."""
    fh.seek(_HEADER_BYTES)
    digest, size = hashlib.sha256(), _HEADER_BYTES
    while chunk := fh.read(1 << 20):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def _seal(path: Path) -> None:
    """Write the header: magic line, then JSON with the SHA-256 and size of the whole file."""
    with open(path, "r+b") as fh:
        sha, size = _file_digest(fh)
        header = _MAGIC + json.dumps({"sha256": sha, "size": size}).encode() + b"\n"
        fh.seek(0)
        fh.write(header.ljust(_HEADER_BYTES, b" "))


def _check_sealed(path: Path) -> None:
    """Compare the file with its header before the HDF5 library parses any of it.

    HDF5 can loop forever on damaged metadata (tests/test_fuzz.py found a flipped byte that
    makes reading an attribute hang), so a damaged file must be refused on its bytes alone.
    Files without the header (written before it existed) go straight to HDF5.
    """
    with open(path, "rb") as fh:
        head = fh.read(_HEADER_BYTES)
        if head[: len(_MAGIC)] != _MAGIC:
            fh.seek(_HEADER_BYTES)
            if fh.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
                raise CheckpointError(f"checkpoint {path} is damaged: its header is unreadable")
            return
        try:
            sealed = json.loads(head[len(_MAGIC):].decode())
            expected_sha, expected_size = str(sealed["sha256"]), int(sealed["size"])
        except (UnicodeDecodeError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"checkpoint {path} is damaged: its header is unreadable") \
                from None
        sha, size = _file_digest(fh)
    if size < expected_size:
        raise CheckpointError(
            f"checkpoint {path} is truncated (the file has {size} of its {expected_size} bytes)")
    if size != expected_size or sha != expected_sha:
        raise CheckpointError(
            f"checkpoint {path} is damaged: its SHA-256 digest does not match the one saved with "
            "it (the file changed after it was written)")


def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    _check_sealed(path)
    if not h5py.is_hdf5(path):
        raise CheckpointError(f"checkpoint {path} is not an HDF5 file (empty or wrong file)")
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as exc:
        if "truncated file" in str(exc):
            raise CheckpointError(
                f"checkpoint {path} is truncated (the file ends before its recorded size)"
            ) from exc
        raise CheckpointError(f"checkpoint {path} cannot be opened as HDF5 ({exc})") from exc


def read_checkpoint_step(path: str | os.PathLike) -> int:
    """Return the stored step of a checkpoint without reading its arrays.

    Raises:
        CheckpointError: If the file cannot be opened or has no step attribute.
    """
    where = Path(path)
    return _read(where, lambda f: int(_attr(f, "step", where)))


def load_checkpoint(path: str | os.PathLike, verify: bool = True) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`.

    Args:
        path: The .h5 file.
        verify: Recompute the SHA-256 digest and compare it with the stored one (the
            fletcher32 chunk checksums are always checked by HDF5 while reading).

    Returns:
        The checkpoint, with every array's dtype and bytes as saved.

    Raises:
        CheckpointError: One sentence naming the file and the problem: missing, not HDF5,
            truncated, damaged data, a missing dataset/group/attribute, or an unsupported
            format version.
    """
    where = Path(path)
    return _read(where, lambda f: _load(f, where, verify))


def _read(where: Path, read: Callable[[h5py.File], T]) -> T:
    """Open ``where`` and apply ``read``; anything h5py or a decoder raises on a damaged file
    becomes one CheckpointError naming it."""
    try:
        with _open(where) as f:
            return read(f)
    except CheckpointError:
        raise
    except _READ_ERRORS as exc:
        raise CheckpointError(f"checkpoint {where} is damaged or malformed ({exc})") from exc


def _load(f: h5py.File, where: Path, verify: bool) -> Checkpoint:
    version = _attr(f, "format_version", where)
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {where} has format version {version}, this dpvit reads version "
            f"{FORMAT_VERSION}"
        )
    attrs = {k: _attr(f, k, where) for k in _META_ATTRS}
    digest = hashlib.sha256()
    params = _read_named(_group(f, "params", where), where, digest)
    opt = _group(f, "optimizer", where)
    optimizer = {}
    for state in opt:  # alphabetical, the order save_checkpoint writes them in
        group = opt[state]
        if not isinstance(group, h5py.Group):
            raise CheckpointError(f"checkpoint {where} has a malformed /optimizer/{state}")
        optimizer[state] = _read_named(group, where, digest)
    scalars = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in opt.attrs.items()}
    rng = _read_json_bytes(f, "rng/state", where, digest)
    metrics = _read_json_bytes(f, "metrics", where, digest)
    _meta_digest(digest, attrs, scalars)
    if verify and digest.hexdigest() != _attr(f, "digest", where):
        raise CheckpointError(f"checkpoint {where} is damaged: its SHA-256 digest does not match")
    return Checkpoint(
        params=params,
        optimizer=optimizer,
        optimizer_scalars=scalars,
        rng=rng,
        step=int(attrs["step"]),
        epoch=int(attrs["epoch"]),
        position=int(attrs["position"]),
        world_size=int(attrs["world_size"]),
        config=json.loads(attrs["config"]),
        metrics=metrics,
        path=where,
    )


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
    for path in directory.glob(f"*.h5{_TMP_MARK}*"):  # left by a writer that was killed
        path.unlink(missing_ok=True)


def _link_atomic(source: Path, target: Path) -> None:
    """Make `target` name the same content as `source`, replacing it atomically."""
    tmp = _tmp_name(target)
    try:
        try:
            os.link(source, tmp)
        except OSError:  # no hard links on this filesystem: copy instead
            shutil.copyfile(source, tmp)
            _fsync_path(tmp)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


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
        _fsync_path(directory)
    except OSError as exc:
        raise CheckpointError(f"could not update last.h5/best.h5 in {directory}: {exc}") from exc
    prune_checkpoints(directory, keep)
    return path
