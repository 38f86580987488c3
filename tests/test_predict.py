"""``python -m dpvit.predict`` classifies files as ``evaluate`` classified the same records,
whatever their format, size, colour or polarity; bad files are reported one by one."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
from helpers import missing, real_data_dir, run_dpvit, train

from dpvit.data import load_split, prepare_dataset
from dpvit.data.imageio import READABLE, _to_gray, prepare_digit, read_images
from dpvit.errors import InputError

#: A run sure enough of some test digits (about 3 s): 250 steps on 4000 images.
CONFIDENT_ARGS = ["--dim", "32", "--heads", "2", "--depth", "1", "--train-subset", "4000",
                  "--test-subset", "500", "--epochs", "2", "--augment", "false",
                  "--label-smoothing", "0", "--weight-decay", "0", "--lr", "3e-3",
                  "--warmup-epochs", "0.1", "--log-every", "125"]


def need_pillow():
    """Pillow is the optional ``predict`` extra: CI installs it, so there it must be present."""
    try:
        from PIL import Image
    except ImportError:
        missing("Pillow (the predict extra)", 'pip install -e ".[predict]"')
    return Image


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint, {test index: evaluate's predicted class}, confident indices, test images)."""
    root = tmp_path_factory.mktemp("predict")
    train(root / "run", *CONFIDENT_ARGS)
    ckpt = root / "run" / "checkpoints" / "last.h5"
    result = run_dpvit("evaluate", ["--checkpoint", str(ckpt), "--run-dir", str(root / "ev"),
                                    "--test-subset", "500"])
    assert result.returncode == 0, result.stderr
    with open(root / "ev" / "report" / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    predicted = {int(r["index"]): int(r["prediction"]) for r in rows}
    # a tiny ViT learns slowly (about 60% after these 250 steps, as the same model in torch):
    # the digits it is surest of are the ones whose class must survive resampling
    by_confidence = sorted(rows, key=lambda r: -float(r["confidence"]))[:12]
    confident = sorted(int(r["index"]) for r in by_confidence)
    images, _ = load_split(prepare_dataset("mnist", str(real_data_dir())), "test")
    return ckpt, predicted, confident, images


def _predict(ckpt, files, *extra):
    result = run_dpvit("predict", ["--checkpoint", str(ckpt), "--json", *map(str, files),
                                   *extra])
    return result, json.loads(result.stdout)


def test_png_inverted_and_large_rgb_versions_get_evaluates_classes(trained, tmp_path):
    Image = need_pillow()
    ckpt, predicted, confident, images = trained
    files, expected = [], []
    for i in confident:
        digit = images[i]
        big = np.asarray(Image.fromarray(digit).resize((64, 64), Image.BILINEAR)) / 255.0
        # dark blue ink on a cream background: RGB, light background, 64x64
        rgb = np.stack([250 - 230 * big, 245 - 215 * big, 230 - 90 * big], axis=-1)
        versions = {"png": digit, "inverted.png": 255 - digit, "rgb64.png": rgb.astype(np.uint8),
                    "rgb64.jpg": rgb.astype(np.uint8)}
        for suffix, array in versions.items():
            path = tmp_path / f"{i}.{suffix}"
            Image.fromarray(array).save(path, **({"quality": 95} if "jpg" in suffix else {}))
            files.append(path)
            expected.append(predicted[i])
    result, out = _predict(ckpt, files, "--top-k", "2")
    assert result.returncode == 0, result.stderr
    got = [p["top_k"][0]["class"] for p in out["predictions"]]
    assert [p["file"] for p in out["predictions"]] == [str(f) for f in files]
    mismatched = [str(f.name) for f, g, e in zip(files, got, expected, strict=True) if g != e]
    assert not mismatched
    top = out["predictions"][0]["top_k"]
    assert len(top) == 2 and top[0]["probability"] >= top[1]["probability"]


def test_idx_and_npy_records_get_evaluates_classes(trained, tmp_path):
    ckpt, predicted, _, images = trained
    picks = [0, 7, 123, 499]
    idx_file = real_data_dir() / "t10k-images-idx3-ubyte.gz"
    np.save(tmp_path / "stack.npy", images[picks].astype(np.float32) / 255.0)
    result, out = _predict(ckpt, [idx_file, tmp_path / "stack.npy"], "--index", "0", "1",
                           "2", "3")
    assert result.returncode == 0, result.stderr
    got = [p["top_k"][0]["class"] for p in out["predictions"]]
    assert got[:4] == [predicted[i] for i in range(4)]
    assert got[4:] == [predicted[i] for i in picks]
    assert out["predictions"][1]["file"] == f"{idx_file}[1]"


def test_bad_files_are_reported_one_by_one_and_the_rest_classified(trained, tmp_path):
    ckpt, predicted, _, images = trained
    good = tmp_path / "good.npy"
    np.save(good, images[3])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    blank = tmp_path / "blank.npy"
    np.save(blank, np.zeros((28, 28)))
    files = [corrupt, good, text, tmp_path / "missing.png", blank]
    result, out = _predict(ckpt, files)
    assert result.returncode == 1
    assert [p["file"] for p in out["predictions"]] == [str(good)]
    assert out["predictions"][0]["top_k"][0]["class"] == predicted[3]
    assert [e["file"] for e in out["errors"]] == [str(f) for f in files if f != good]
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 4 and "Traceback" not in result.stderr
    assert "blank image" in error_lines[-1]
    assert error_lines[1].endswith(f"{text}: not a file dpvit can read; expected {READABLE}")
    assert "BytesIO" not in result.stderr and " at 0x" not in result.stderr
    assert "threads per rank" not in result.stderr  # said by train and bench only
    plain = run_dpvit("predict", ["--checkpoint", str(ckpt), str(good), "--top-k", "3"])
    assert plain.returncode == 0 and plain.stdout.startswith(f"{good}: {predicted[3]} (")


def test_prepare_digit_fits_scales_and_centres_like_mnist():
    images, _ = load_split(prepare_dataset("mnist", str(real_data_dir())), "test")
    digit = images[0]
    assert np.array_equal(prepare_digit(digit.astype(float)), digit)  # already MNIST-shaped
    assert np.array_equal(prepare_digit(255.0 - digit), digit)  # polarity fixed exactly
    # the same digit twice as large, off-centre on a bigger canvas: back to about the original
    canvas = np.zeros((90, 70))
    canvas[30:86, 2:58] = np.kron(digit, np.ones((2, 2)))
    out = prepare_digit(canvas).astype(float)
    rows, cols = np.indices(out.shape)
    assert abs((rows * out).sum() / out.sum() - 14) <= 0.5
    assert abs((cols * out).sum() / out.sum() - 14) <= 0.5
    assert np.abs(out - digit).mean() < 12
    with pytest.raises(InputError, match="blank image"):
        prepare_digit(np.full((28, 28), 200.0))


def test_a_file_that_is_no_image_is_named_with_the_formats_read(tmp_path):
    need_pillow()
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(InputError) as caught:
        read_images(text)
    assert str(caught.value) == (f"{text}: not a file dpvit can read; expected PNG, JPEG or "
                                 "another image format Pillow opens, a .npy array, or an idx "
                                 "file (gzip-compressed or not)")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(InputError, match=r"broken\.png: a damaged image \(") as caught:
        read_images(broken)
    assert "BytesIO" not in str(caught.value)


def test_without_pillow_png_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(InputError, match=r"needs Pillow.*\.\[predict\]"):
        read_images(path)


def test_grayscale_conversion_of_arrays():
    rgb = np.zeros((5, 6, 3), np.uint8)
    rgb[..., 1] = 100
    np.testing.assert_allclose(_to_gray(rgb, "x"), 58.7)  # ITU-R 601 luma, as Pillow's "L"
    np.testing.assert_allclose(_to_gray(np.full((3, 3), 0.5, np.float32), "x"), 127.5)
    assert _to_gray(np.zeros((3, 4, 5)), "x").shape == (4, 5)  # channels first
    with pytest.raises(InputError, match="2-D grayscale or RGB"):
        _to_gray(np.zeros((2, 3, 4, 5)), "x")



def test_classify_spreads_batches_over_replicas_in_order():
    """Two replica threads give every image the probabilities one thread gives it, in order."""
    from dpvit.inference import EVAL_BATCH
    from dpvit.parallel.replicas import Replicas
    from dpvit.predict import classify
    from dpvit.vit import VisionTransformer, ViTConfig

    model = VisionTransformer(ViTConfig(embed_dim=16, depth=1, num_heads=2), seed=0)
    rng = np.random.default_rng(0)
    images = [(f"img{i}", rng.integers(0, 256, (28, 28), dtype=np.uint8))
              for i in range(2 * EVAL_BATCH + 5)]  # three batches, the last one short
    one = classify(Replicas(model, 1), list("0123456789"), 0.13, 0.31, images, 10)
    two = classify(Replicas(model, 2), list("0123456789"), 0.13, 0.31, images, 10)
    assert [r["file"] for r in two] == [name for name, _ in images]
    assert two == one
    probs = np.array([[t["probability"] for t in r["top_k"]] for r in one])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
