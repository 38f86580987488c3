"""Property-based fuzzing of the two readers that take files from outside: the idx reader and
the checkpoint loader. Random byte flips, overwritten runs and truncations of valid files must
give either the original content or the project's own one-line error (DataError /
CheckpointError) naming the file, never another exception.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpvit.checkpoint import (
    Checkpoint,
    CheckpointError,
    find_resume_checkpoint,
    load_checkpoint,
    read_checkpoint_step,
    save_checkpoint,
)
from dpvit.data.idx import DATASETS, DataError, parse_idx, read_payload, read_split

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def damaged(draw, original: bytes) -> bytes:
    """``original`` with a few bytes flipped, a run overwritten, and/or its tail cut off."""
    data = bytearray(original)
    for _ in range(draw(st.integers(0, 6))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= draw(st.integers(1, 255))
    if draw(st.booleans()):
        start = draw(st.integers(0, len(data) - 1))
        run = draw(st.binary(min_size=1, max_size=64))
        data[start : start + len(run)] = run
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def _idx(array: np.ndarray, code: int) -> bytes:
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                      *array.shape)
    return header + array.tobytes()


IMAGES = _idx(np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8), 0x08)
LABELS = _idx(np.array([1, 7, 3], dtype=np.uint8), 0x08)
FLOATS = _idx(np.linspace(-1, 1, 12, dtype=">f4").reshape(3, 4), 0x0D)


@FUZZ
@given(data=st.data(), which=st.sampled_from(["images", "labels", "floats"]),
       compress=st.booleans())
def test_idx_reader_gives_data_or_a_data_error(tmp_path, data, which, compress):
    original = {"images": IMAGES, "labels": LABELS, "floats": FLOATS}[which]
    raw = gzip.compress(original, mtime=0) if compress else original
    path = tmp_path / f"{which}-idx"
    path.write_bytes(data.draw(damaged(raw)))
    other = tmp_path / "other-idx"
    other.write_bytes(LABELS if which == "images" else IMAGES)
    try:
        array = parse_idx(read_payload(path), path)
    except DataError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
    else:
        assert isinstance(array, np.ndarray) and array.dtype.isnative
    images, labels = (path, other) if which == "images" else (other, path)
    with pytest.raises(DataError):  # never the MNIST checksums, so always a clear rejection
        read_split(DATASETS["mnist"], "test", images, labels)


def _checkpoint() -> Checkpoint:
    rng = np.random.default_rng(0)
    params = {"patch_embed.proj.weight": rng.standard_normal((4, 1, 7, 7)).astype(np.float32),
              "cls_token": rng.standard_normal((1, 1, 4)).astype(np.float32),
              "head.bias": np.zeros(10, np.float32)}
    return Checkpoint(params=params,
                      optimizer={"exp_avg": {k: v * 0.5 for k, v in params.items()}},
                      optimizer_scalars={"step": 3}, rng={"scheme": "keyed", "seed": 0},
                      step=3, epoch=0, step_in_epoch=3, config={"model": {"embed_dim": 4}},
                      metrics=[{"kind": "step", "loss": 2.3}])


@pytest.fixture(scope="module")
def valid_checkpoint(tmp_path_factory) -> tuple[Checkpoint, bytes]:
    path = tmp_path_factory.mktemp("fuzz") / "step-3.h5"
    ckpt = _checkpoint()
    save_checkpoint(path, ckpt)
    return ckpt, path.read_bytes()


@FUZZ
@given(data=st.data())
def test_checkpoint_loader_gives_the_checkpoint_or_a_checkpoint_error(tmp_path, data,
                                                                      valid_checkpoint):
    ckpt, original = valid_checkpoint
    directory = tmp_path / "ckpts"
    directory.mkdir(exist_ok=True)
    path: Path = directory / "step-3.h5"
    path.write_bytes(data.draw(damaged(original)))
    try:
        loaded = load_checkpoint(path)
    except CheckpointError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
        assert find_resume_checkpoint(directory) is None
    else:  # the change hit bytes HDF5 never reads: the content must be exactly the original
        for name, value in ckpt.params.items():
            assert loaded.params[name].tobytes() == value.tobytes()
        assert loaded.step == 3 and read_checkpoint_step(path) == 3
        assert find_resume_checkpoint(directory) == path
