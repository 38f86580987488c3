"""The checkpoint file: one HDF5 file per saved state, written atomically, verified on load.

Layout (format version 1), readable with `h5dump` or h5py:

    /params/<a>/<b>/...           one dataset per parameter; "blocks.3.attn.qkv.weight" is
                                  stored at /params/blocks/3/attn/qkv/weight
    /optimizer/<state>/<a>/...    e.g. /optimizer/exp_avg/blocks/3/attn/qkv/weight
    /optimizer attrs              optimizer scalars such as "step"
    /ema/<a>/...                  only with --ema-decay: the weights' moving average, the
                                  model that evaluate, predict and export load
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

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import h5py
import numpy as np

from dpvit import __version__
from dpvit.checkpoint.seal import HEADER_BYTES, CheckpointError, check_sealed, seal
from dpvit.files import atomic_write

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
T = TypeVar("T")
_META_ATTRS = ("format_version", "step", "epoch", "position", "world_size", "config")
# what h5py and the decoders raise on damaged metadata (RuntimeError: e.g. a corrupt local heap,
# found by tests/test_fuzz.py)
_READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError)


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
        step_in_epoch: Steps done inside the current epoch (the file's "position" attribute).
        world_size: Number of ranks that wrote it (informational; resume works on any).
        config: The full resolved configuration.
        metrics: Metrics history, one dict per logged step or epoch.
        ema: The weights' moving average by parameter name (empty: the run keeps none).
        path: The file it was loaded from (None when built in memory); for error messages.
    """

    params: dict[str, np.ndarray]
    optimizer: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    optimizer_scalars: dict[str, float | int] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    world_size: int = 1
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    ema: dict[str, np.ndarray] = field(default_factory=dict)
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
    attrs = {
        "format_version": FORMAT_VERSION,
        "step": int(ckpt.step),
        "epoch": int(ckpt.epoch),
        "position": int(ckpt.step_in_epoch),
        "world_size": int(ckpt.world_size),
        "config": _to_json(ckpt.config),
    }
    scalars = {
        k: _json_default(v) if isinstance(v, np.generic) else v
        for k, v in ckpt.optimizer_scalars.items()
    }
    try:
        with atomic_write(final) as tmp:
            digest = hashlib.sha256()
            with h5py.File(tmp, "w", locking=False, userblock_size=HEADER_BYTES) as f:
                _write_named(f.create_group("params"), ckpt.params, digest)
                opt = f.create_group("optimizer")
                for state in sorted(ckpt.optimizer):  # HDF5 lists groups alphabetically
                    if not state or "." in state or "/" in state:
                        raise ValueError(f"invalid optimizer state name {state!r}")
                    _write_named(opt.create_group(state), ckpt.optimizer[state], digest)
                for key, value in scalars.items():
                    opt.attrs[key] = value
                if ckpt.ema:  # absent without --ema-decay, so such files are unchanged
                    _write_named(f.create_group("ema"), ckpt.ema, digest)
                _write_array(f, "rng/state", _bytes_array(_to_json(ckpt.rng)), digest)
                _write_array(f, "metrics", _bytes_array(_to_json(ckpt.metrics)), digest)
                _meta_digest(digest, attrs, scalars)
                f.attrs.update(attrs)
                f.attrs["dpvit_version"] = __version__
                f.attrs["digest"] = digest.hexdigest()
                f.flush()
            seal(tmp)
    except OSError as exc:
        raise CheckpointError(f"could not write checkpoint {final}: {exc}") from exc
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


def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    check_sealed(path)
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
    ema = _read_named(_group(f, "ema", where), where, digest) if "ema" in f else {}
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
        step_in_epoch=int(attrs["position"]),
        world_size=int(attrs["world_size"]),
        config=json.loads(attrs["config"]),
        metrics=metrics,
        ema=ema,
        path=where,
    )


def restore_arrays(ckpt: Checkpoint, group: str, saved: dict[str, np.ndarray],
                   views: dict[str, np.ndarray]) -> None:
    """Copy every saved array of ``group`` into the model's view of the same name.

    Args:
        ckpt: the checkpoint (its path names the file in errors).
        group: "params" or "optimizer/<state>", for the message.
        saved: the checkpoint's arrays of that group, by dotted name.
        views: the model's views to fill, by dotted name (e.g. ``store.named_params()``).

    Raises:
        CheckpointError: an array is missing or its shape does not fit the model.
    """
    for name, view in views.items():
        array = saved.get(name)
        if array is None or array.shape != view.shape:
            found = "nothing" if array is None else f"shape {array.shape}"
            raise CheckpointError(f"checkpoint {ckpt.path}: /{group}/{name} should have shape "
                                  f"{view.shape} for its model config but has {found}")
        view[...] = array
