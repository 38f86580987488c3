"""Augmentation keyed by (seed, epoch, sample index); normalisation; the batch iterator."""

from __future__ import annotations

import numpy as np
import pytest

from dpvit.data import Augmentation, BatchIterator, augment, normalize, train_batches
from dpvit.data.augment import sample_params, warp_affine

N = 64


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (N, 28, 28), dtype=np.uint8)


def per_sample(images, batches, seed=3, epoch=1):
    out = {}
    for idx in batches:
        for i, img in zip(idx, augment(images[idx], idx, seed, epoch), strict=True):
            out[int(i)] = img
    return out


def test_augmented_sample_independent_of_world_size_and_batch(images):
    reference = per_sample(images, [np.arange(N)])
    for world_size in (1, 2, 3, 4):
        for rank in range(world_size):
            got = per_sample(images, train_batches(N, 16, 5, 1, rank, world_size))
            for i, img in got.items():
                np.testing.assert_array_equal(img, reference[i])
    singles = per_sample(images, [np.array([i]) for i in range(N)][::-1])
    for i in range(N):
        np.testing.assert_array_equal(singles[i], reference[i])


def test_augmentation_changes_with_epoch_and_seed(images):
    idx = np.arange(8)
    a = augment(images[idx], idx, 0, 0)
    assert a.dtype == np.float32 and a.shape == (8, 28, 28)
    assert a.min() >= 0 and a.max() <= 255
    assert not np.allclose(a, augment(images[idx], idx, 0, 1))
    assert not np.allclose(a, augment(images[idx], idx, 1, 0))
    assert not np.allclose(a, images[idx])


def test_warp_identity_shift_and_rotation(images):
    x = images[:4]
    params = np.tile([0.0, 1.0, 0.0, 0.0, 1.0], (4, 1))
    np.testing.assert_array_equal(warp_affine(x, params), x)
    params[:, 2:4] = [1.0, -2.0]  # one pixel right, two up; uncovered pixels are zero
    out = warp_affine(x, params)
    np.testing.assert_array_equal(out[:, :-2, 1:], x[:, 2:, :-1])
    assert out[:, :, 0].max() == 0 and out[:, -2:].max() == 0
    params[:, :] = [np.pi / 2, 1.0, 0.0, 0.0, 1.0]  # exact quarter turn: grid maps onto grid
    np.testing.assert_allclose(warp_affine(x, params), np.rot90(x, -1, axes=(1, 2)), atol=1e-2)
    params[:, :] = [0.0, 1.0, 40.0, 0.0, 1.0]  # shifted entirely out of the frame
    assert warp_affine(x, params).max() == 0


def test_warp_mirror(images):
    x = images[:4]
    params = np.tile([0.0, 1.0, 0.0, 0.0, -1.0], (4, 1))
    np.testing.assert_array_equal(warp_affine(x, params), x[:, :, ::-1])


def test_strengths_scale_the_draws_and_flips_leave_the_rest_alone():
    idx = np.arange(2000)
    digits = sample_params(idx, 0, 0, Augmentation())
    assert np.abs(digits[:, 0]).max() <= np.deg2rad(10) and np.abs(digits[:, 2:4]).max() <= 2
    assert digits[:, 1].min() >= 0.9 and digits[:, 1].max() <= 1.1
    np.testing.assert_array_equal(digits[:, 4], 1.0)
    mirrored = sample_params(idx, 0, 0, Augmentation(hflip=True))
    np.testing.assert_array_equal(mirrored[:, :4], digits[:, :4])
    assert 0.45 < np.mean(mirrored[:, 4] == -1) < 0.55
    clothes = sample_params(idx, 0, 0, Augmentation(shift=3, rotate_deg=0, zoom=0))
    np.testing.assert_array_equal(clothes[:, :2], np.tile([0.0, 1.0], (2000, 1)))
    assert 2.9 < np.abs(clothes[:, 2:4]).max() <= 3


def test_augment_rejects_mismatched_indices(images):
    with pytest.raises(ValueError, match="one sample index per image"):
        augment(images[:4], np.arange(3), 0, 0)


def test_normalize(images):
    x = normalize(images[:5], 0.5, 0.25)
    assert x.shape == (5, 1, 28, 28) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0], (images[:5] / 255.0 - 0.5) / 0.25, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefetch", [False, True])
def test_batch_iterator(images, prefetch):
    labels = np.arange(N) % 10
    batches = [*train_batches(N, 10, 0, 2, 1, 3), np.array([], dtype=np.int64)]
    it = BatchIterator(images, labels, batches, 0.1, 0.3, augment=Augmentation(), seed=0, epoch=2,
                       prefetch=prefetch)
    got = list(it)
    assert len(got) == len(it) == len(batches)
    for (x, y), idx in zip(got, batches, strict=True):
        assert x.dtype == np.float32 and x.shape == (len(idx), 1, 28, 28)
        assert y.dtype == np.int64
        np.testing.assert_array_equal(y, labels[idx])
        np.testing.assert_array_equal(x, normalize(augment(images[idx], idx, 0, 2), 0.1, 0.3))
    plain = BatchIterator(images, labels, batches[:1], 0.1, 0.3, prefetch=prefetch)
    x, _ = next(iter(plain))
    np.testing.assert_array_equal(x, normalize(images[batches[0]], 0.1, 0.3))
