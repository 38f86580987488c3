"""The train command as users run it: outputs, checkpoints, resume, rank equivalence, errors.

Every test launches real processes (``python -m dpvit.train``, under ``mpirun -n N`` where N is
given) on the first few hundred real MNIST images with a tiny model.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from helpers import (
    TINY_ARGS,
    assert_bitwise_same_state,
    load_params,
    real_data_dir,
    run_dpvit,
    train,
)

from dpvit import train as dpvit_train
from dpvit.checkpoint import load_checkpoint
from dpvit.config import Config
from dpvit.data import prepare_dataset
from dpvit.flops import forward_flops_per_image
from dpvit.parallel.comm import LocalComm
from dpvit.vit import VisionTransformer

REPORT_KEYS = {"dataset", "split", "epoch", "step", "world_size", "num_samples", "loss",
               "accuracy", "macro_f1", "per_class", "confusion_matrix"}


def _train_flops(run) -> dict[tuple[str, int], int]:
    """``train_flops`` of a run's step and epoch records in metrics.jsonl, by (kind, step)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["kind"], r["step"]): r["train_flops"] for r in records
            if r["kind"] in ("step", "epoch")}


def _flops_per_image(run) -> int:
    """Forward and backward FLOPs of one image for the run's model: 3 forward passes."""
    cfg = Config.from_dict(json.loads((run / "config.json").read_text()))
    return 3 * forward_flops_per_image(cfg.model)


def test_single_process_run_writes_every_output(tmp_path):
    run = tmp_path / "run"
    train(run, "--epochs", "2", "--checkpoint-every", "3", "--keep", "2", "--log-every", "4")
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["embed_dim"] == 16 and config["train"]["epochs"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    # training compute: every image of every step (global batch 32), forward and backward
    per_image = _flops_per_image(run)
    flops = _train_flops(run)
    assert sorted(flops) == [("epoch", 8), ("epoch", 16), ("step", 4), ("step", 8),
                             ("step", 12), ("step", 16)]
    assert flops == {(kind, step): step * 32 * per_image for kind, step in flops}
    report = json.loads((run / "report" / "report.json").read_text())
    assert set(report) >= REPORT_KEYS
    assert report["num_samples"] == 200 and report["step"] == 16
    assert report["train_flops"] == 16 * 32 * per_image
    assert report["train_flops_per_image"] == per_image
    assert np.array(report["confusion_matrix"]).sum() == 200
    assert (run / "report" / "report.md").read_text().startswith("# mnist test report")
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["best.h5", "last.h5", "step-15.h5", "step-16.h5"]  # keep 2 of 3,6,...,16


def test_checkpoint_round_trip_predicts_exactly_as_trained(tmp_path):
    """Parameters saved by training load into a fresh model (initialised from another seed)
    that gives every test image the class and the probability the trained model's report
    gave it (predictions.csv: the trained replicas' evaluation, float64 softmax, 6 decimals)."""
    run = tmp_path / "run"
    train(run, "--epochs", "1")
    ckpt = load_checkpoint(run / "checkpoints" / "last.h5")
    cfg = Config.from_dict(ckpt.config)
    model = VisionTransformer(cfg.model, seed=cfg.train.seed + 1)
    assert set(ckpt.params) == set(model.store.named_params())
    for name, view in model.store.named_params().items():
        view[...] = ckpt.params[name]
    from dpvit.data import DATASETS, load_split, normalize, prepare_dataset

    images, labels = load_split(prepare_dataset("mnist", cfg.train.data_dir), "test")
    info = DATASETS["mnist"]
    logits = model.forward(normalize(images[:200], info.mean, info.std)).astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    with open(run / "report" / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["index"]) for r in rows] == list(range(200))
    assert [int(r["label"]) for r in rows] == labels[:200].tolist()
    assert [int(r["prediction"]) for r in rows] == probs.argmax(axis=1).tolist()
    np.testing.assert_allclose([float(r["confidence"]) for r in rows], probs.max(axis=1),
                               rtol=0, atol=2e-6)  # 5e-7 of rounding, float32 noise
    report = json.loads((run / "report" / "report.json").read_text())
    assert np.trace(report["confusion_matrix"]) == int(np.sum(probs.argmax(1) == labels[:200]))


def _flat(params: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([params[name].ravel() for name in sorted(params)]).astype(np.float64)


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_n_ranks_equal_one_rank_at_the_same_global_batch(tmp_path, dtype):
    """Augmentation and dropout are on: both are keyed by sample, not by rank or thread.

    One process with one thread is the reference; one process with 3 replica threads (32
    images split 11/11/10) and 2 and 4 ranks must match it. float64: every parameter within
    rtol 1e-10. float32: the whole parameter vector within relative L2 error 1e-5:
    entry-wise, float32 rounding differences that depend on the summation order are
    amplified by AdamW in parameters whose gradient is near 0.
    """
    extra = ["--max-steps", "6", "--dtype", dtype, "--drop-rate", "0.1"]
    train(tmp_path / "n1", *extra, threads=1)
    reference = load_params(tmp_path / "n1" / "checkpoints" / "last.h5")
    for ranks, threads in ((None, 3), (2, None), (4, None)):
        what = f"{ranks} ranks" if ranks else f"1 process x {threads} threads"
        run = tmp_path / what.replace(" ", "")
        train(run, *extra, ranks=ranks, threads=threads)
        params = load_params(run / "checkpoints" / "last.h5")
        if dtype == "float64":
            for name, value in reference.items():
                np.testing.assert_allclose(params[name], value, rtol=1e-10, atol=1e-13,
                                           err_msg=f"{name} with {what}")
        else:
            a, b = _flat(params), _flat(reference)
            assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5, what


@pytest.mark.mpi
def test_resume_is_bitwise_identical_on_the_same_world_size(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(straight, "--max-steps", "12", "--checkpoint-every", "5", ranks=2)
    train(split, "--max-steps", "5", ranks=2)
    train(split, "--max-steps", "12", "--resume", "auto", ranks=2)
    assert_bitwise_same_state(straight / "checkpoints" / "last.h5",
                              split / "checkpoints" / "last.h5", 12)


@pytest.mark.mpi
def test_checkpoint_from_four_ranks_resumes_on_two(tmp_path):
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    train(straight, "--max-steps", "10", "--dtype", "float64", ranks=4)
    train(moved, "--max-steps", "4", "--dtype", "float64", ranks=4)
    result = train(moved, "--max-steps", "10", "--dtype", "float64", "--resume", "auto",
                   ranks=2)
    assert "saved by 4 rank(s)" in result.stderr
    a = load_checkpoint(straight / "checkpoints" / "last.h5")
    b = load_checkpoint(moved / "checkpoints" / "last.h5")
    assert b.world_size == 2 and b.step == 10
    for name in a.params:
        np.testing.assert_allclose(b.params[name], a.params[name], rtol=1e-10, atol=1e-13)
    # the training compute of a step is the same on 4 ranks, and on 2 after the resume
    straight_flops, moved_flops = _train_flops(straight), _train_flops(moved)
    assert sorted(straight_flops) == [("epoch", 8), ("epoch", 10), ("step", 10)]
    assert {key: moved_flops[key] for key in straight_flops} == straight_flops
    assert straight_flops[("step", 10)] == 10 * 32 * _flops_per_image(straight)


def test_resume_rejects_a_conflicting_model_flag(tmp_path):
    run = tmp_path / "run"
    train(run, "--max-steps", "2")
    result = run_dpvit("train", ["--run-dir", str(run), "--resume", "auto", "--dim", "32"])
    assert result.returncode == 1
    assert "embed_dim=32 conflicts with the checkpoint's embed_dim=16" in result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--heads", "5"], "--dim (64) must be divisible by --heads (5)"),
        (["--patch-size", "5"], "--patch-size (5) must divide --img-size (28)"),
        (["--epochs", "zero"], "argument --epochs: invalid int value: 'zero'"),
        (["--resume", "auto"], "--resume auto needs --run-dir"),
    ],
)
def test_bad_flags_give_one_clear_line(args, message):
    result = run_dpvit("train", args, timeout=60)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.mpi
def test_resume_auto_warns_when_it_starts_anew_and_resume_must_fails(tmp_path):
    """A mistyped --run-dir is not a silent new run: `auto` warns, `must` stops in one line."""
    typo = tmp_path / "typo"
    result = run_dpvit("train", [*TINY_ARGS, "--run-dir", str(typo), "--resume", "must",
                                 "--max-steps", "1"], ranks=2, timeout=60)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].endswith(
        f"[rank 0/2] error: --resume must found no valid checkpoint in {typo}; check --run-dir "
        "(--resume auto would start a new run there)"), result.stderr
    assert "Abort(" not in result.stderr and "Traceback" not in result.stderr
    run = tmp_path / "run"
    fresh = train(run, "--resume", "auto", "--max-steps", "1")
    assert (f"warning: --resume auto found no checkpoint in {run}; starting a new run"
            in fresh.stderr)
    resumed = train(run, "--resume", "must", "--max-steps", "2")
    assert "resuming from" in resumed.stderr and "warning" not in resumed.stderr
    assert load_checkpoint(run / "checkpoints" / "last.h5").step == 2


@pytest.mark.mpi
def test_damaged_resume_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not an HDF5 file at all")
    result = run_dpvit("train", ["--run-dir", str(tmp_path / "r"), "--resume", str(bad)],
                       ranks=2, timeout=60)
    assert result.returncode != 0
    assert str(bad) in result.stderr and "Traceback" not in result.stderr


@pytest.mark.mpi
def test_debug_mode_is_one_process_float64_with_gradient_check(tmp_path):
    run = tmp_path / "run"
    result = run_dpvit("train", [*TINY_ARGS, "--debug", "--max-steps", "2", "--run-dir",
                                 str(run)], ranks=2)
    assert result.returncode == 0, result.stderr
    assert "debug mode: one process, float64" in result.stderr
    errors = [float(line.rsplit(" ", 1)[1]) for line in result.stderr.splitlines()
              if "gradient check on the first batch: max relative error" in line]
    assert len(errors) == 1 and errors[0] < 1e-6
    assert "on 1 rank(s)" in result.stderr
    assert json.loads((run / "config.json").read_text())["train"]["dtype"] == "float64"


def test_debug_mode_names_the_first_layer_with_non_finite_output():
    from dpvit.training.debug import NonFiniteError, watch_non_finite
    from dpvit.vit import ViTConfig

    model = VisionTransformer(ViTConfig(img_size=8, embed_dim=8, depth=2, num_heads=2),
                              dtype=np.float64)
    model.store.param("blocks.1.mlp.fc1.weight")[0, 0] = np.inf
    watch_non_finite(model)
    with pytest.raises(NonFiniteError, match=r"layer blocks\.1\.mlp\.fc1 forward output"):
        model.forward(np.ones((2, 1, 8, 8)), train=True)


class MirrorComm(LocalComm):
    """Rank 1 of 2, the absent rank 0 mirroring it: sums double, gathers repeat, broadcasts
    keep this rank's value. Enough to run the whole command in-process as a non-root rank."""

    rank, size = 1, 2

    def allreduce_sum_(self, buf):
        buf *= 2

    def _allreduce_small(self, value, op):
        return value * 2 if op == "sum" else super()._allreduce_small(value, op)

    def allgather_object(self, obj):
        return [obj, obj]

    def _gather_rows(self, row):
        return np.stack([row, row])


def test_only_rank_zero_writes_files(tmp_path, monkeypatch):
    data_dir = real_data_dir()
    prepare_dataset("mnist", str(data_dir))  # what rank 0 does before the barrier
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    comm = MirrorComm()
    assert dpvit_train.run(comm, [*TINY_ARGS, "--data-dir", str(data_dir), "--epochs", "1",
                                  "--run-dir", str(work / "run")]) == 0
    # trained, evaluated and "saved" as a non-root rank: not one file or directory created
    assert list(work.iterdir()) == []
