"""Training augmentation (random translation, small affine, mirror) and normalisation, in numpy.

Each sample's transform is drawn from ``np.random.default_rng([seed, epoch, index])``, keyed
by the sample's index in the dataset and never by rank or position in the batch, so sample
``i`` is augmented identically whatever the world size or batch composition. The warp is
one vectorised bilinear resampling of an inverse affine map over the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Augmentation:
    """How strongly to perturb training images (the ``--aug-*`` flags).

    The defaults suit digits: small shifts, rotations and zooms keep a digit's identity. For
    clothing (Fashion-MNIST) a mirror image is the same garment while a rotated one is not a
    photo the test set contains, so its preset flips and shifts instead.
    """

    shift: float = 2.0  # largest translation in pixels (continuous, bilinear)
    rotate_deg: float = 10.0  # largest rotation either way
    zoom: float = 0.1  # scale drawn from [1 - zoom, 1 + zoom]
    hflip: bool = False  # mirror left-right with probability 1/2


def sample_params(sample_indices: np.ndarray, seed: int, epoch: int,
                  aug: Augmentation) -> np.ndarray:
    """Per-sample (angle_rad, scale, shift_x, shift_y, flip), shape (B, 5), float64.

    Uniform draws: angle in ±rotate_deg, scale in 1 ± zoom, shifts in ±shift pixels; flip is
    -1 (mirror) or 1. The first four draws of each sample do not depend on ``hflip``, so
    turning flips on leaves every other parameter as it was.
    """
    lo = np.array([-np.deg2rad(aug.rotate_deg), 1 - aug.zoom, -aug.shift, -aug.shift])
    hi = np.array([np.deg2rad(aug.rotate_deg), 1 + aug.zoom, aug.shift, aug.shift])
    u = np.array([np.random.default_rng([seed, epoch, int(i)]).random(5)
                  for i in np.asarray(sample_indices).reshape(-1)]).reshape(-1, 5)
    flip = np.where(aug.hflip & (u[:, 4:] < 0.5), -1.0, 1.0)
    return np.concatenate([lo + u[:, :4] * (hi - lo), flip], axis=1)


def warp_affine(images: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Rotate/scale about the image centre, then translate, with bilinear sampling.

    Args:
        images: (B, H, W) pixel values (uint8 or float).
        params: (B, 5) rows of (angle_rad, scale, shift_x, shift_y, flip); flip -1 mirrors
            the result left-right, 1 leaves it.

    Returns:
        float32 (B, H, W); pixels sampled from outside the image are 0.
    """
    b, h, w = images.shape
    p = params.astype(np.float32)
    angle, s, tx, ty, flip = (p[:, k, None] for k in range(5))
    cy, cx = np.float32((h - 1) / 2), np.float32((w - 1) / 2)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx = flip * (xx.reshape(1, -1) - cx) - tx  # output pixel relative to the shifted centre
    dy = yy.reshape(1, -1) - cy - ty
    cos, sin = np.cos(angle) / s, np.sin(angle) / s  # inverse of s * R(angle)
    # Clipping to [-1, size] keeps every tap inside a one-pixel zero border while leaving
    # the interpolated value unchanged (outside the image it is 0 either way).
    src_x = np.clip(cos * dx + sin * dy + cx, -1, w)
    src_y = np.clip(-sin * dx + cos * dy + cy, -1, h)
    x0, y0 = np.floor(src_x), np.floor(src_y)
    fx, fy = src_x - x0, src_y - y0
    stride = w + 2
    base = (y0.astype(np.int64) + 1) * stride + x0.astype(np.int64) + 1
    base += np.arange(b, dtype=np.int64)[:, None] * (h + 2) * stride
    padded = np.zeros((b, h + 2, stride), dtype=np.float32)
    padded[:, 1:-1, 1:-1] = images
    flat = padded.reshape(-1)
    flat = np.append(flat, np.zeros(stride + 1, np.float32))  # taps past the last image
    top = flat[base] * (1 - fx) + flat[base + 1] * fx
    bottom = flat[base + stride] * (1 - fx) + flat[base + stride + 1] * fx
    return (top * (1 - fy) + bottom * fy).reshape(b, h, w)


def augment(
    images_uint8: np.ndarray,
    sample_indices: np.ndarray,
    seed: int,
    epoch: int,
    aug: Augmentation = Augmentation(),
) -> np.ndarray:
    """Randomly translate, rotate, scale and (optionally) mirror each image.

    Args:
        images_uint8: (B, H, W) uint8 images.
        sample_indices: (B,) dataset indices of the images (the randomness key).
        seed: run seed.
        epoch: epoch number.
        aug: the strengths.

    Returns:
        float32 (B, H, W) in pixel units 0..255 (not rounded, so no precision is lost
        before :func:`normalize`).
    """
    if len(images_uint8) != len(sample_indices):
        raise ValueError(f"expected one sample index per image, got {len(sample_indices)} "
                         f"indices for {len(images_uint8)} images")
    return warp_affine(images_uint8, sample_params(sample_indices, seed, epoch, aug))


def normalize(images: np.ndarray, mean: float, std: float) -> np.ndarray:
    """Scale pixels 0..255 (uint8 or float) to [0, 1], standardise, add the channel axis.

    Returns:
        float32 (B, 1, H, W) equal to ``(images / 255 - mean) / std``.
    """
    x = np.asarray(images, dtype=np.float32)
    x = x * np.float32(1.0 / (255.0 * std)) - np.float32(mean / std)
    return x[:, None, :, :]
