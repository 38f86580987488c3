"""Real MNIST (and Fashion-MNIST when the Debian package is installed) end to end.

The MNIST files come from ``helpers.real_data_dir()``: $DPVIT_DATA_DIR, else the repository's
``data/mnist/`` (downloaded there first when absent). A directory given by $DPVIT_DATA_DIR may
be a read-only reference copy (tests may run as root, for whom it is technically writable):
dpvit must write nothing into it, so its store goes to a temporary cache.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import missing, real_data_dir

from dpvit.data import DATASETS, load_split, prepare_dataset
from dpvit.data import store as store_mod

REPO = Path(__file__).resolve().parents[1]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
TRAIN_HIST = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_HIST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist_dir() -> Path:
    return real_data_dir()


@pytest.fixture(scope="module")
def read_only_sources(tmp_path_factory):
    """The cache in a temp dir."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPVIT_CACHE_DIR", str(cache))
        yield cache


def test_real_mnist(read_only_sources, mnist_dir):
    before = sorted(p.name for p in mnist_dir.iterdir())
    path = prepare_dataset("mnist", str(mnist_dir))
    if store_mod.is_own_data_dir("mnist", mnist_dir):  # data/mnist: the store lives beside
        assert path == mnist_dir / "mnist.h5"
    else:  # a directory dpvit was only pointed at gets nothing
        assert path == read_only_sources / "mnist.h5"
        assert sorted(p.name for p in mnist_dir.iterdir()) == before
    train_x, train_y = load_split(path, "train")
    test_x, test_y = load_split(path, "test")
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int64
    assert np.bincount(train_y, minlength=10).tolist() == TRAIN_HIST
    assert np.bincount(test_y, minlength=10).tolist() == TEST_HIST
    info = DATASETS["mnist"]
    assert abs(train_x.mean() / 255 - info.mean) < 1e-6
    assert prepare_dataset("mnist", str(mnist_dir)) == path  # reused
    if path.parent == read_only_sources:
        assert sorted(p.name for p in read_only_sources.iterdir()) == [".mnist.h5.lock",
                                                                       "mnist.h5"]


def test_fashion_mnist_from_debian_package(read_only_sources, tmp_path):
    if not FASHION_DIR.is_dir():
        missing("Fashion-MNIST", "apt-get install dataset-fashion-mnist")
    # An empty data dir: the files are found in the system directory instead.
    path = prepare_dataset("fashion-mnist", str(tmp_path / "fashion-mnist"), download=False)
    _, train_y = load_split(path, "train")
    _, test_y = load_split(path, "test")
    assert np.bincount(train_y).tolist() == [6000] * 10
    assert np.bincount(test_y).tolist() == [1000] * 10


def test_cli_verify_real_mnist(mnist_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "dpvit.data", "verify", "mnist", "--data-dir", str(mnist_dir)],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "train: 60000 images OK" in proc.stdout
