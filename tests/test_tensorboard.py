"""``--tensorboard DIR``: event files that the real ``tensorboard`` package reads back.

tensorboard (its EventAccumulator, what ``tensorboard --logdir`` serves from) and Pillow (to
decode the image) are installed by the ``test`` and ``predict`` extras.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, TINY_ARGS, missing, real_data_dir, train

from dpvit.training.tensorboard import (
    CONFUSION_TAG,
    EPOCH_TAGS,
    STEP_TAGS,
    TensorBoardLog,
    confusion_heatmap,
)


@pytest.fixture
def tensorboardx():
    """The tensorboard extra (in the test extra too): without it, fail under CI=1, else skip."""
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        missing("tensorboardX (the tensorboard extra)", 'pip install -e ".[test,tensorboard]"')


def _accumulator(logdir):
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        missing("tensorboard (reads the event files back)", 'pip install -e ".[test]"')
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def _decode(png: bytes) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        missing("Pillow (decodes the image)", 'pip install -e ".[predict]"')
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_tensorboard_lists_the_runs_scalars_and_confusion_image(tmp_path, tensorboardx):
    run, logdir = tmp_path / "run", tmp_path / "tb"
    train(run, "--max-steps", "4", "--log-every", "2", "--tensorboard", str(logdir))
    events = _accumulator(logdir)
    tags = events.Tags()
    assert set(STEP_TAGS.values()) | set(EPOCH_TAGS.values()) <= set(tags["scalars"])
    # the same numbers as metrics.jsonl, the source of truth, at the same steps
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for kind, table in (("step", STEP_TAGS), ("epoch", EPOCH_TAGS)):
        logged = [r for r in records if r["kind"] == kind]
        assert logged
        for key, tag in table.items():
            got = [(s.step, s.value) for s in events.Scalars(tag)]
            want = [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in logged]
            assert got == want, tag
    assert [s.step for s in events.Scalars("train/loss")] == [2, 4]
    # the epoch's confusion matrix: the report's figure, which decodes to its stated size
    (image,) = events.Images(CONFUSION_TAG)
    assert image.step == 4
    pixels = _decode(image.encoded_image_string)
    assert pixels.shape == (image.height, image.width, 3) and pixels.std() > 0
    figure = run / "report" / "confusion_matrix.png"
    if figure.is_file():  # matplotlib drew it (the plots extra)
        assert image.encoded_image_string == figure.read_bytes()


def test_confusion_heatmap_without_matplotlib_decodes(tmp_path, tensorboardx):
    """The fallback image (no report figure): dpvit's own PNG encoder, read by tensorboard
    and decoded by Pillow, shaded by the share of each true class."""
    cm = np.array([[8, 2, 0], [0, 10, 0], [5, 0, 5]])
    log = TensorBoardLog(tmp_path, enabled=True)
    log.confusion(cm, step=7, report_dir=tmp_path / "no-report")
    log.close()
    (image,) = _accumulator(tmp_path).Images(CONFUSION_TAG)
    pixels = _decode(image.encoded_image_string)
    assert image.step == 7 and pixels.shape == (48, 48, 3) == (image.height, image.width, 3)
    np.testing.assert_array_equal(pixels, confusion_heatmap(cm))
    assert tuple(pixels[24, 24]) == (8, 48, 107)  # cell (1, 1): 100% -> the darkest blue
    assert tuple(pixels[0, 40]) == (255, 255, 255)  # cell (0, 2): 0% -> white


def test_other_ranks_and_no_flag_write_nothing(tmp_path):
    for log in (TensorBoardLog(tmp_path / "a", enabled=False), TensorBoardLog(None, True)):
        log.record({"kind": "step", "step": 1, "loss": 1.0})
        log.confusion(np.eye(2, dtype=int), 1)
        log.close()
    assert list(tmp_path.iterdir()) == []


def test_missing_tensorboardx_names_the_pip_command(tmp_path):
    run = tmp_path / "run"
    code = ("import sys; sys.modules['tensorboardX'] = None; sys.argv[0] = 'dpvit.train'; "
            "from dpvit.train import main; main()")
    env = {**os.environ, "DPVIT_DATA_DIR": str(real_data_dir())}
    result = subprocess.run(
        [sys.executable, "-c", code, *TINY_ARGS, "--run-dir", str(run),
         "--tensorboard", str(tmp_path / "tb")],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 1 and len(errors) == 1, result.stderr
    assert "--tensorboard needs the optional package tensorboardX" in errors[0]
    assert 'pip install "tensorboardX>=2.6"' in errors[0]
    assert not run.exists() and not (tmp_path / "tb").exists()
