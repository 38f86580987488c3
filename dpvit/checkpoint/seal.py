"""The checkpoint header: SHA-256 and size of the whole file, checked before HDF5 reads it.

Every checkpoint starts with a 512-byte HDF5 user block holding a magic line and JSON with the
SHA-256 and size of the bytes after it. HDF5 can loop forever on damaged metadata
(tests/test_fuzz.py found a flipped byte that makes reading an attribute hang), so a damaged
file must be refused on its bytes alone, before the HDF5 library parses any of it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dpvit.errors import UserError

HEADER_BYTES = 512
_MAGIC = b"dpvit checkpoint\n"
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class CheckpointError(UserError):
    """A checkpoint file is missing, damaged, or not one this version of dpvit can read."""


def _file_digest(fh: Any) -> tuple[str, int]:
    """SHA-256 and length of an open file's bytes after the header."""
    fh.seek(HEADER_BYTES)
    digest, size = hashlib.sha256(), HEADER_BYTES
    while chunk := fh.read(1 << 20):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def seal(path: Path) -> None:
    """Write the header: magic line, then JSON with the SHA-256 and size of the whole file."""
    with open(path, "r+b") as fh:
        sha, size = _file_digest(fh)
        header = _MAGIC + json.dumps({"sha256": sha, "size": size}).encode() + b"\n"
        fh.seek(0)
        fh.write(header.ljust(HEADER_BYTES, b" "))


def check_sealed(path: Path) -> None:
    """Compare the file with its header before the HDF5 library parses any of it.

    HDF5 can loop forever on damaged metadata (tests/test_fuzz.py found a flipped byte that
    makes reading an attribute hang), so a damaged file must be refused on its bytes alone.
    Files without the header (written before it existed) go straight to HDF5.
    """
    with open(path, "rb") as fh:
        head = fh.read(HEADER_BYTES)
        if head[: len(_MAGIC)] != _MAGIC:
            fh.seek(HEADER_BYTES)
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
