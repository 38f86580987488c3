"""Reading user images for ``dpvit.predict`` and preparing them the way MNIST digits were.

Files are recognised by their first bytes, not their names: PNG/JPEG (and any other format
Pillow reads, an optional extra), numpy ``.npy`` and idx files (gzip or plain). Every image is
turned into a grayscale float array and then prepared as LeCun et al. prepared MNIST:

1. polarity: MNIST digits are light on a dark background; an image whose border is mostly light
   is inverted, and the background level is subtracted so it becomes 0;
2. the bounding box of the ink is scaled, keeping its aspect ratio, to fit 20x20 pixels
   (area averaging when shrinking, linear interpolation when growing);
3. that is placed in a 28x28 frame so that its centre of mass lies at the frame's centre.

An image that is already in that form (28x28, dark background, ink within a 20x20 box, centre
of mass within a pixel of the centre), such as an MNIST record saved as PNG, is passed through
unchanged, so resampling never blurs a digit that needs no fitting.

``encode_png`` writes small uint8 images as PNG with zlib alone, so that the report can embed
test images without Pillow or matplotlib.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np

from dpvit.data.idx import DataError, parse_idx, read_payload
from dpvit.errors import InputError

INK_THRESHOLD = 0.1  # share of the brightest ink that counts for the bounding box
SIDE, BOX = 28, 20  # output side; side of the box the digit is scaled into
NPY_MAGIC, GZIP_MAGIC = b"\x93NUMPY", b"\x1f\x8b"
#: What `read_images` reads, for error messages.
READABLE = ("PNG, JPEG or another image format Pillow opens, a .npy array, or an idx file "
            "(gzip-compressed or not)")


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of (..., 3) RGB, the weights Pillow's ``convert("L")`` uses."""
    return rgb[..., :3] @ np.array([0.299, 0.587, 0.114])


def _to_gray(array: np.ndarray, where: str) -> np.ndarray:
    """(H, W), (H, W, 1|3|4) or (1|3|4, H, W) array -> (H, W) float64 in 0..255."""
    a = np.asarray(array)
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer)
                               or np.issubdtype(a.dtype, np.floating)):
        raise InputError(f"{where}: expected numeric pixel values but found dtype {a.dtype}")
    a = a.astype(np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channels first -> channels last
    if a.ndim == 3 and a.shape[-1] == 4:  # alpha: composite over a contrasting background
        alpha = a[..., 3:] / (255.0 if a[..., 3].max() > 1 else 1.0)
        ink = _luminance(a[..., :3])
        background = 0.0 if np.average(ink, weights=alpha[..., 0] + 1e-9) > 127.5 else 255.0
        a = (a[..., :3] * alpha + background * (1 - alpha))
    if a.ndim == 3 and a.shape[-1] == 3:
        a = _luminance(a)
    elif a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2 or min(a.shape) < 1:
        raise InputError(f"{where}: expected a 2-D grayscale or RGB(A) image, got shape "
                         f"{tuple(np.shape(array))}")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{where}: the image contains NaN or infinite values")
    if a.max() <= 1.0 and a.min() >= 0.0 and np.issubdtype(np.asarray(array).dtype, np.floating):
        a = a * 255.0  # floats in [0, 1]
    return a


def _records(array: np.ndarray, index: list[int] | None, where: str,
             ) -> list[tuple[str, np.ndarray]]:
    """Split an (N, H, W[, C]) stack into named records, picking ``index`` when given."""
    if index is None:
        index = list(range(len(array)))
    out = []
    for i in index:
        if not -len(array) <= i < len(array):
            raise InputError(f"{where}: --index {i} is out of range for {len(array)} records")
        out.append((f"{where}[{i}]", _to_gray(array[i], f"{where}[{i}]")))
    return out


def _read_pillow(data: bytes, where: str) -> np.ndarray:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise InputError(f"{where}: reading PNG/JPEG images needs Pillow, which is not "
                         'installed: pip install -e ".[predict]"') from None
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        # Pillow's message names only its in-memory buffer (<_io.BytesIO object at 0x...>)
        raise InputError(f"{where}: not a file dpvit can read; expected {READABLE}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{where}: a damaged image ({exc})") from None
    try:
        with image:
            image.load()
            if image.mode in ("I", "I;16", "I;16B", "F"):  # 16/32-bit: stretch to 0..255
                a = np.asarray(image, dtype=np.float64)
                span = a.max() - a.min()
                return (a - a.min()) * (255.0 / span) if span else np.zeros_like(a)
            if image.mode in ("L", "1"):
                return np.asarray(image.convert("L"))
            alpha = "A" in image.getbands() or "transparency" in image.info
            return np.asarray(image.convert("RGBA" if alpha else "RGB"))
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{where}: a damaged {image.format} image ({exc})") from None


def read_images(path: Path, index: list[int] | None = None) -> list[tuple[str, np.ndarray]]:
    """Every image in one file, as (name, (H, W) float64 grayscale in 0..255).

    Args:
        path: a PNG/JPEG (or other Pillow) image, a ``.npy`` array (one image (H, W) or
            (H, W, C), or a stack (N, H, W), (N, H, W, C), (N, C, H, W)) or an idx file,
            gzip-compressed or not.
        index: records to pick from a multi-image file (all when None; ignored for a
            single image).

    Raises:
        InputError: the file is missing, unreadable, corrupt or not an image.
    """
    where = str(path)
    try:
        head = path.open("rb").read(8)
    except OSError as exc:
        raise InputError(f"{where}: cannot read the file ({exc.strerror or exc})") from None
    if head.startswith(NPY_MAGIC):
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"{where}: not a readable .npy array ({exc})") from None
        # (H, W) and (H, W, 1|3|4) are one image; (N, H, W) and (N, ..., ...) are a stack
        stacked = array.ndim == 4 or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4))
        if stacked or index is not None:
            return _records(array if stacked else array[None], index, where)
        return [(where, _to_gray(array, where))]
    if head.startswith(GZIP_MAGIC) or head[:2] == b"\x00\x00":
        try:
            array = parse_idx(read_payload(path), path)
        except DataError as exc:
            raise InputError(str(exc)) from None
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3:
            raise InputError(f"{where}: expected an idx file of images (N, H, W) but found "
                             f"shape {array.shape} (a label file?)")
        return _records(array, index, where)
    return [(where, _to_gray(_read_pillow(path.read_bytes(), where), where))]


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) resampling weights: area averaging when shrinking, linear when growing."""
    scale = n_in / n_out
    if scale >= 1.0:  # each output pixel averages the input it covers (fractional overlaps)
        lo = np.arange(n_out)[:, None] * scale
        j = np.arange(n_in)[None, :]
        weights = np.clip(np.minimum(j + 1, lo + scale) - np.maximum(j, lo), 0.0, None)
    else:
        centres = (np.arange(n_out) + 0.5) * scale - 0.5  # output centres, input coordinates
        weights = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] - centres[:, None]))
    return weights / weights.sum(axis=1, keepdims=True)


def _centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    total = image.sum()
    rows, cols = np.indices(image.shape)
    return float((rows * image).sum() / total), float((cols * image).sum() / total)


def prepare_digit(gray: np.ndarray) -> np.ndarray:
    """An MNIST-style (28, 28) uint8 image from any (H, W) grayscale image (0..255).

    Raises:
        InputError: the image is blank (no ink after removing the background).
    """
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    if background > 127.5:  # dark ink on a light background: invert to MNIST's polarity
        gray, background = 255.0 - gray, 255.0 - background
    ink = np.clip(gray - background, 0.0, None)
    if ink.max() <= 0:
        raise InputError("blank image: no pixel differs from the background")
    ink *= 255.0 / ink.max()
    rows = np.flatnonzero(ink.max(axis=1) > INK_THRESHOLD * 255)
    cols = np.flatnonzero(ink.max(axis=0) > INK_THRESHOLD * 255)
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    if gray.shape == (SIDE, SIDE) and background == 0 and max(height, width) <= BOX:
        r, c = _centre_of_mass(ink)
        if abs(r - SIDE / 2) <= 1 and abs(c - SIDE / 2) <= 1:
            return np.clip(np.rint(gray), 0, 255).astype(np.uint8)  # already MNIST-shaped
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = BOX / max(height, width)
    out_h, out_w = max(1, round(height * scale)), max(1, round(width * scale))
    small = resize_matrix(height, out_h) @ crop @ resize_matrix(width, out_w).T
    r, c = _centre_of_mass(small)
    top = round(SIDE / 2 - r)
    left = round(SIDE / 2 - c)
    top, left = min(max(top, 0), SIDE - out_h), min(max(left, 0), SIDE - out_w)
    frame = np.zeros((SIDE, SIDE))
    frame[top : top + out_h, left : left + out_w] = small
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W) grayscale or (H, W, 3) RGB image (8-bit, no filtering)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"expected a (H, W) or (H, W, 3) image, got shape {image.shape}")
    h, w = image.shape[:2]
    colour = 0 if image.ndim == 2 else 2
    rows = image.reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter 0
    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(raw, 9)) + _png_chunk(b"IEND", b""))
