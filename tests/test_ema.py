"""``--ema-decay``: the weights' moving average is what a run evaluates, saves, resumes and
what ``evaluate``/``predict``/``export`` load."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from helpers import assert_bitwise_same_state, run_dpvit, train

from dpvit.checkpoint import load_checkpoint
from dpvit.config import Config
from dpvit.data import DATASETS, load_split, normalize, prepare_dataset
from dpvit.inference import load_model
from dpvit.training.ema import WeightAverage
from dpvit.vit import VisionTransformer, ViTConfig

TINY = ViTConfig(embed_dim=16, depth=1, num_heads=2, patch_size=7)


def test_the_average_decays_geometrically_towards_the_weights():
    """From a0 with weights held at w, k updates leave w + decay**k * (a0 - w)."""
    model = VisionTransformer(TINY, np.float64, seed=0)
    start = model.store.flat_params.copy()
    average = WeightAverage(model.store, 0.9)
    model.store.flat_params[...] = start + 1.0
    for _ in range(5):
        average.update()
    np.testing.assert_allclose(average.flat, start + 1.0 - 0.9**5, rtol=0, atol=1e-12)


def test_applied_swaps_the_average_in_and_the_weights_back_bit_for_bit():
    model = VisionTransformer(TINY, np.float32, seed=0)
    average = WeightAverage(model.store, 0.5)
    model.store.flat_params[...] += np.float32(0.25)
    weights = model.store.flat_params.copy()
    average.update()
    with average.applied():
        np.testing.assert_array_equal(model.store.flat_params, average.flat)
        assert not np.array_equal(model.store.flat_params, weights)
    assert model.store.flat_params.tobytes() == weights.tobytes()


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1])
def test_a_decay_outside_zero_one_is_refused(decay):
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(VisionTransformer(TINY, np.float32).store, decay)


def test_an_ema_decay_of_one_is_a_clear_error():
    result = run_dpvit("train", ["--ema-decay", "1"], timeout=60)
    assert result.returncode == 1
    assert "--ema-decay must be in [0, 1), got 1.0" in result.stderr
    assert "Traceback" not in result.stderr


def _confidences(params: dict[str, np.ndarray], cfg: Config, n: int) -> np.ndarray:
    """Each of the first ``n`` test images' top softmax probability under ``params``."""
    model = VisionTransformer(cfg.model, np.float32)
    for name, view in model.store.named_params().items():
        view[...] = params[name]
    images, _ = load_split(prepare_dataset("mnist", cfg.train.data_dir), "test")
    info = DATASETS["mnist"]
    logits = model.forward(normalize(images[:n], info.mean, info.std)).astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (probs / probs.sum(axis=1, keepdims=True)).max(axis=1)


def test_the_run_evaluates_and_load_model_loads_the_average(tmp_path):
    """The report's per-image confidences are the average's, not the weights'; `load_model`
    (evaluate, predict, export) gives the average too."""
    run = tmp_path / "run"
    train(run, "--epochs", "1", "--ema-decay", "0.8")
    ckpt = load_checkpoint(run / "checkpoints" / "last.h5")
    assert set(ckpt.ema) == set(ckpt.params)
    cfg = Config.from_dict(ckpt.config)
    with open(run / "report" / "predictions.csv", newline="") as fh:
        reported = np.array([float(row["confidence"]) for row in csv.DictReader(fh)])
    of_average = _confidences(ckpt.ema, cfg, len(reported))
    of_weights = _confidences(ckpt.params, cfg, len(reported))
    np.testing.assert_allclose(reported, of_average, rtol=0, atol=2e-6)
    assert np.abs(reported - of_weights).max() > 1e-3  # the two models differ visibly
    model, _, _ = load_model(run / "checkpoints" / "last.h5")
    for name, view in model.store.named_params().items():
        assert view.tobytes() == ckpt.ema[name].tobytes(), name


def test_a_run_without_the_average_saves_none(tmp_path):
    run = tmp_path / "run"
    train(run, "--max-steps", "2")
    assert load_checkpoint(run / "checkpoints" / "last.h5").ema == {}


@pytest.mark.mpi
def test_resume_continues_the_average_bitwise(tmp_path):
    """Stopped at step 5 and resumed, the average ends as the uninterrupted run's (an average
    restarted from the resumed weights would not)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    ema = ("--ema-decay", "0.9")
    train(straight, "--max-steps", "12", *ema, ranks=2)
    train(split, "--max-steps", "5", *ema, ranks=2)
    train(split, "--max-steps", "12", "--resume", "auto", *ema, ranks=2)
    assert_bitwise_same_state(straight / "checkpoints" / "last.h5",
                              split / "checkpoints" / "last.h5", 12)
