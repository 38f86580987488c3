"""Property-based fuzzing of the two readers that take files from outside: the idx reader and
the checkpoint loader. Random byte flips, overwritten runs and truncations of valid files must
give either the original content or the project's own one-line error (DataError /
CheckpointError) naming the file, never another exception.

A checkpoint is fuzzed twice: as damaged on disk (the whole-file SHA-256 header refuses it
before HDF5 reads a byte), and re-sealed after the damage, as a buggy or foreign writer would
have left it, so the HDF5 library, the fletcher32 checksums and the inner digest meet the
damaged bytes; each load then runs in a forked child with a time limit, so a hang in HDF5 is
a failure instead of a stuck test run.
"""

from __future__ import annotations

import gzip
import multiprocessing
import struct
import traceback
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from dpvit.checkpoint import (
    Checkpoint,
    CheckpointError,
    find_resume_checkpoint,
    load_checkpoint,
    read_checkpoint_step,
    save_checkpoint,
)
from dpvit.checkpoint.seal import HEADER_BYTES, seal
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


#: Seconds one load of the small fuzzed checkpoint may take (it takes milliseconds).
LOAD_LIMIT_S = 10


class LoadHungError(AssertionError):
    """load_checkpoint did not return within its time limit."""


def _load_and_compare(conn, path: Path, ckpt: Checkpoint) -> None:
    """In the child: load ``path``; send what came out (run by `_load_bounded`)."""
    try:
        loaded = load_checkpoint(path)
        same = (list(loaded.params) == list(ckpt.params) and loaded.step == ckpt.step
                and all(loaded.params[n].tobytes() == v.tobytes() for n, v in ckpt.params.items())
                and all(loaded.optimizer[s][n].tobytes() == v.tobytes()
                        for s, arrays in ckpt.optimizer.items() for n, v in arrays.items()))
        resumed = find_resume_checkpoint(path.parent)
        conn.send(("loaded", f"same content: {same}; resume finds it: {resumed == path}"))
    except CheckpointError as exc:
        conn.send(("CheckpointError", f"{exc}|resume finds none: "
                                      f"{find_resume_checkpoint(path.parent) is None}"))
    except BaseException:
        conn.send(("other", traceback.format_exc()))


def _load_bounded(path: Path, ckpt: Checkpoint,
                  limit_s: float = LOAD_LIMIT_S) -> tuple[str, str]:
    """``load_checkpoint(path)`` in a forked child, failing the test if it takes longer than
    ``limit_s`` (HDF5 can loop forever on damaged metadata) or crashes the process."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_load_and_compare, args=(send, path, ckpt), daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(limit_s):
            kept = path.with_name("hang.h5")
            kept.write_bytes(path.read_bytes())
            raise LoadHungError(f"load_checkpoint hung on a re-sealed damaged file (kept as "
                                f"{kept})")
        try:
            return receive.recv()
        except EOFError:
            child.join()
            pytest.fail(f"load_checkpoint crashed the process (exit code {child.exitcode})")
    finally:
        child.kill()
        child.join()


# derandomize: the same 150 damaged files every run. HDF5 itself loops forever on some
# metadata damage (about 1 random file in 3000, see the test below), so random examples would
# fail a run now and then; a change to the file layout or to HDF5 changes these examples, and
# a hang or a stray exception among them is then a reproducible failure.
@settings(max_examples=150, deadline=None, database=None, derandomize=True,  # LOAD_LIMIT_S
          phases=[Phase.explicit, Phase.generate],  # shrinking a hang would repeat the wait
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_resealed_damage_reaches_hdf5_and_gives_the_checkpoint_or_a_checkpoint_error(
        tmp_path, data, valid_checkpoint):
    """Damage after the header, then a valid header for the damaged bytes: HDF5 parses them.
    Only the original content or one CheckpointError naming the file may come out."""
    ckpt, original = valid_checkpoint
    directory = tmp_path / "resealed"
    directory.mkdir(exist_ok=True)
    path: Path = directory / "step-3.h5"
    path.write_bytes(original[:HEADER_BYTES] + data.draw(damaged(original[HEADER_BYTES:])))
    seal(path)
    kind, detail = _load_bounded(path, ckpt)
    event(kind)  # --hypothesis-show-statistics: how often HDF5 refused the bytes
    if kind == "CheckpointError":
        message, resume = detail.rsplit("|", 1)
        assert str(path) in message and "\n" not in message, message
        assert resume == "resume finds none: True", message
    else:  # the inner SHA-256 covers every array and attribute: only the original loads
        assert kind == "loaded", detail
        assert detail == "same content: True; resume finds it: True"


#: One byte of the fuzzed checkpoint's HDF5 metadata (offset in the file, value as saved, value
#: that hangs), found by the fuzzing above: reading the root attributes never returns.
HANGING_BYTE = (2776, 5, 151)


@pytest.mark.xfail(raises=LoadHungError, strict=True,
                   reason="known gap: HDF5 loops forever reading an attribute after this "
                          "one-byte change, when the file is sealed after the damage (a buggy "
                          "writer) or has no header (older checkpoints); only the whole-file "
                          "header stops it. Remove this mark once load_checkpoint bounds the "
                          "time HDF5 may take.")
def test_known_hdf5_hang_on_one_metadata_byte(tmp_path, valid_checkpoint):
    ckpt, original = valid_checkpoint
    offset, saved, hanging = HANGING_BYTE
    assert original[offset] == saved, "the file layout changed: find the byte again"
    path = tmp_path / "step-3.h5"
    path.write_bytes(original[:offset] + bytes([hanging]) + original[offset + 1:])
    seal(path)
    kind, detail = _load_bounded(path, ckpt, limit_s=3)
    assert kind == "CheckpointError", detail
