"""Tests for dpvit.checkpoint: bit-exact round trip, damage detection, atomicity, rotation."""

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from dpvit import checkpoint as ck
from dpvit.checkpoint import Checkpoint, CheckpointError
from dpvit.checkpoint.seal import seal

REPO = Path(__file__).resolve().parents[1]


def make_ckpt(step=7, scale=1.0):
    rng = np.random.default_rng(step)
    params = {
        "patch_embed.proj.weight": rng.standard_normal((8, 1, 4, 4)).astype(np.float32) * scale,
        "cls_token": rng.standard_normal((1, 1, 8)).astype(np.float32),
        "blocks.0.attn.qkv.weight": rng.standard_normal((24, 8)),  # float64
        "blocks.10.mlp.fc2.bias": np.array([np.nan, -0.0, np.inf, 1e-45], np.float32),
        "head.bias": np.zeros(10, np.float32),
        "logit_scale": np.array(2.5, np.float64),  # 0-d: no chunking, digest only
        "empty": np.zeros((0, 3), np.float32),
        "t.weight": rng.standard_normal((6, 4)).astype(np.float32).T,  # not C-contiguous
    }
    optimizer = {
        "exp_avg": {k: np.full_like(v, 0.5) for k, v in params.items()},
        "exp_avg_sq": {k: rng.random(v.shape).astype(v.dtype) for k, v in params.items()},
    }
    data_rng = np.random.default_rng(123)
    data_rng.random(5)
    return Checkpoint(
        params=params,
        optimizer=optimizer,
        optimizer_scalars={"step": step, "beta1": 0.9, "nesterov": True},
        rng={"data": data_rng.bit_generator.state, "mt": np.random.MT19937(5).state},
        step=step,
        epoch=2,
        step_in_epoch=3,
        world_size=4,
        config={"model": {"dim": 8, "depth": 1}, "lr": 3e-4, "dataset": "mnist"},
        metrics=[{"step": 1, "loss": 2.31}, {"step": 2, "loss": float("nan")}],
    )


def assert_same(a: Checkpoint, b: Checkpoint):
    assert list(a.params) == list(b.params)
    for name, arr in a.params.items():
        assert b.params[name].dtype == arr.dtype and b.params[name].shape == arr.shape
        assert b.params[name].tobytes() == arr.tobytes(), name
    assert a.optimizer.keys() == b.optimizer.keys()
    for state, arrays in a.optimizer.items():
        for name, arr in arrays.items():
            assert b.optimizer[state][name].tobytes() == arr.tobytes()
            assert b.optimizer[state][name].dtype == arr.dtype


def test_round_trip_bit_exact(tmp_path):
    saved = make_ckpt()
    path = tmp_path / "step-7.h5"
    ck.save_checkpoint(path, saved)
    loaded = ck.load_checkpoint(path)
    assert_same(saved, loaded)
    assert loaded.optimizer_scalars == {"step": 7, "beta1": 0.9, "nesterov": True}
    assert type(loaded.optimizer_scalars["step"]) is int
    assert (loaded.step, loaded.epoch, loaded.step_in_epoch, loaded.world_size) == (7, 2, 3, 4)
    assert loaded.config == saved.config
    assert loaded.metrics[0] == {"step": 1, "loss": 2.31} and np.isnan(loaded.metrics[1]["loss"])

    expected = np.random.default_rng(123)
    expected.random(5)
    restored = np.random.default_rng()
    restored.bit_generator.state = loaded.rng["data"]
    np.testing.assert_array_equal(restored.random(10), expected.random(10))
    mt = np.random.MT19937()
    mt.state = loaded.rng["mt"]
    assert mt.random_raw() == np.random.MT19937(5).random_raw()

    with h5py.File(path) as f:  # the layout DESIGN.md promises
        assert f["params/blocks/0/attn/qkv/weight"].fletcher32
        assert "optimizer/exp_avg_sq/head/bias" in f
        assert f.attrs["format_version"] == 1 and f.attrs["dpvit_version"]
    assert [p.name for p in tmp_path.iterdir()] == ["step-7.h5"]


def _damage(path: Path, how: str):
    if how == "truncated":
        size = path.stat().st_size
        with open(path, "r+b") as fh:
            fh.truncate(size // 2)
    elif how == "not_hdf5":
        path.write_text("this is a text file, not a checkpoint\n")
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "flipped":
        with h5py.File(path) as f:  # the raw data of a contiguous chunk, not HDF5 metadata
            ds = f["params/blocks/0/attn/qkv/weight"]
            offset = ds.id.get_chunk_info(0).byte_offset
        with open(path, "r+b") as fh:
            fh.seek(offset + 100)
            byte = fh.read(1)
            fh.seek(offset + 100)
            fh.write(bytes([byte[0] ^ 0x10]))
    elif how == "rewritten_data":  # valid fletcher32, so only the SHA-256 digest notices
        with h5py.File(path, "r+") as f:
            f["params/head/bias"][3] = 1.0
    elif how == "edited_config":
        with h5py.File(path, "r+") as f:
            f.attrs["config"] = f.attrs["config"].replace("0.0003", "0.003")
    elif how == "missing_dataset":
        with h5py.File(path, "r+") as f:
            del f["params/cls_token"]
    elif how == "missing_attr":
        with h5py.File(path, "r+") as f:
            del f.attrs["step"]
    elif how == "wrong_version":
        with h5py.File(path, "r+") as f:
            f.attrs["format_version"] = 99


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", "truncated"),
        ("not_hdf5", "not an HDF5 file"),
        ("empty", "not an HDF5 file"),
        ("flipped", "failed its fletcher32 checksum"),
        ("rewritten_data", "digest does not match"),
        ("edited_config", "digest does not match"),
        ("missing_dataset", "missing dataset /params/cls_token"),
        ("missing_attr", "missing attribute 'step'"),
        ("wrong_version", "format version 99"),
    ],
)
def test_damage_is_a_clear_error(tmp_path, how, message):
    """Each check inside the HDF5 file, reached by re-sealing the damaged file (as a foreign
    or buggy writer would have produced it), so the whole-file digest lets it through."""
    path = tmp_path / "step-1.h5"
    ck.save_checkpoint(path, make_ckpt())
    _damage(path, how)
    if how not in ("truncated", "not_hdf5", "empty"):
        seal(path)
    with pytest.raises(CheckpointError, match=message) as info:
        ck.load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("how", ["flipped", "missing_dataset", "missing_attr", "wrong_version"])
def test_any_change_after_saving_is_refused_before_hdf5_reads_it(tmp_path, how):
    path = tmp_path / "step-1.h5"
    ck.save_checkpoint(path, make_ckpt())
    _damage(path, how)
    with pytest.raises(CheckpointError, match="is damaged: its SHA-256 digest does not match"):
        ck.load_checkpoint(path)
    with open(path, "r+b") as fh:  # a damaged header
        fh.write(b"x")
    with pytest.raises(CheckpointError, match="is damaged: its header is unreadable"):
        ck.read_checkpoint_step(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path}/nope.h5 does not exist"):
        ck.load_checkpoint(tmp_path / "nope.h5")


def test_crash_before_rename_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "last.h5"
    ck.save_checkpoint(path, make_ckpt(step=1))

    def crash(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(CheckpointError, match="could not write checkpoint"):
        ck.save_checkpoint(path, make_ckpt(step=2))
    assert ck.load_checkpoint(path).step == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.h5"]


KILL_WORKER = """
import sys, time, h5py, numpy as np
from dpvit import checkpoint as ck
real = h5py.Group.create_dataset
def slow(self, *args, **kwargs):
    ds = real(self, *args, **kwargs)
    print("WRITING", flush=True)
    time.sleep(30)
    return ds
h5py.Group.create_dataset = slow
ck.save_checkpoint(sys.argv[1], ck.Checkpoint(params={"w": np.ones((512, 512))}, step=2))
"""


def test_sigkill_mid_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "step-2.h5"
    previous = tmp_path / "step-1.h5"
    ck.save_checkpoint(previous, make_ckpt(step=1))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_WORKER, str(target)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout.readline().strip() == "WRITING"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not target.exists()
    assert any(".tmp-" in p.name for p in tmp_path.iterdir())  # the dead writer's leftovers
    assert ck.list_checkpoints(tmp_path) == [previous]
    assert ck.find_resume_checkpoint(tmp_path) == previous


def test_list_and_prune(tmp_path):
    for step in (10, 2, 30, 100):
        ck.save_checkpoint(tmp_path / f"step-{step}.h5", make_ckpt(step=step))
    (tmp_path / "step-5.h5.tmp-1-ab").write_bytes(b"partial")
    (tmp_path / "best.h5").write_bytes(b"")
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == [
        "step-2.h5",
        "step-10.h5",
        "step-30.h5",
        "step-100.h5",
    ]
    ck.prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.h5", "step-100.h5", "step-30.h5"]


def test_save_rolling_links_last_and_best(tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    for step in (1, 2, 3):
        ck.save_rolling(ckpts, make_ckpt(step=step), keep=2, is_best=step == 2)
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["best.h5", "last.h5", "step-2.h5", "step-3.h5"]
    assert ck.load_checkpoint(ckpts / "last.h5").step == 3
    assert ck.load_checkpoint(ckpts / "best.h5").step == 2
    assert ck.find_resume_checkpoint(run) == ckpts / "step-3.h5"


def test_resume_skips_damaged_newest(tmp_path, caplog):
    for step in (1, 2):
        ck.save_rolling(tmp_path, make_ckpt(step=step), keep=5, is_best=False)
    newest = tmp_path / "step-2.h5"
    _damage(newest, "flipped")  # last.h5 is the same inode, damaged too
    with caplog.at_level(logging.WARNING, logger="dpvit.checkpoint"):
        assert ck.find_resume_checkpoint(tmp_path) == tmp_path / "step-1.h5"
    assert any(
        str(newest) in r.getMessage() and "digest" in r.getMessage() for r in caplog.records
    )
    _damage(tmp_path / "step-1.h5", "truncated")
    assert ck.find_resume_checkpoint(tmp_path) is None
    assert ck.find_resume_checkpoint(tmp_path / "absent") is None


def _header_less(path: Path, ckpt: Checkpoint, monkeypatch) -> None:
    """Write ``ckpt`` as dpvit did before the 512-byte header existed: the same HDF5 body,
    starting at byte 0 (no user block), unsealed."""
    from dpvit.checkpoint import format as fmt

    with monkeypatch.context() as m:
        m.setattr(fmt, "HEADER_BYTES", 0)  # h5py: no user block
        m.setattr(fmt, "seal", lambda path: None)
        ck.save_checkpoint(path, ckpt)
    assert path.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
    with h5py.File(path, "r") as f:
        assert f.userblock_size == 0


def test_checkpoint_without_the_header_still_loads(tmp_path, monkeypatch):
    """Older checkpoints have no header: they go straight to HDF5 and load as saved, found by
    --resume auto like any other, their inner SHA-256 digest still checked."""
    old = tmp_path / "step-7.h5"
    _header_less(old, make_ckpt(), monkeypatch)
    loaded = ck.load_checkpoint(old)
    assert_same(make_ckpt(), loaded)
    assert (loaded.step, loaded.epoch, loaded.world_size) == (7, 2, 4)
    assert loaded.config == make_ckpt().config
    assert ck.read_checkpoint_step(old) == 7 and ck.find_resume_checkpoint(tmp_path) == old
    _damage(old, "rewritten_data")
    with pytest.raises(CheckpointError, match="digest does not match"):
        ck.load_checkpoint(old)
    assert ck.find_resume_checkpoint(tmp_path) is None
