"""The known datasets and a strict reader for the idx file format they ship in.

The idx format (LeCun's MNIST page) is a big-endian header followed by a raw array:
two zero bytes, a dtype code, the number of dimensions, one uint32 per dimension, then the
data. Files are usually gzip-compressed. Every check here exists because a real download can
be truncated, swapped (labels saved as images), or be a different dataset with the same file
names (MNIST and Fashion-MNIST share them), and the user should get one sentence saying so,
not a reshape error from deep inside numpy.

Checksums are SHA-256 digests of the *decompressed* payloads: mirrors and distributions
(Debian) recompress the .gz files, so digests of the compressed bytes differ between copies of
the same data.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpvit.errors import UserError

GZIP_MAGIC = b"\x1f\x8b"

# idx dtype codes from the format's specification, stored big-endian.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

SPLITS = ("train", "test")


class DataError(UserError):
    """A dataset file is missing, unreadable, corrupt or not what was expected.

    The message is one sentence naming the file, what was expected and what was found;
    as a ``UserError`` the entry points print it without a traceback and exit non-zero.
    """


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of one dataset: where its files come from and what they contain.

    Attributes:
        name: registry key, also the default directory name under ``data/``.
        files: split -> (images file, labels file), uncompressed idx names (the ``.gz``
            variant is accepted and is what mirrors serve).
        sha256: file name -> SHA-256 of the decompressed idx payload.
        class_names: human-readable label for each class index.
        mean: mean of the training pixels scaled to [0, 1].
        std: standard deviation of the training pixels scaled to [0, 1].
        mirrors: base URLs tried in order; a file's URL is base + name + ".gz".
        system_dirs: directories a distribution package installs the files into.
        image_shape: (height, width) of every image.
        num_classes: labels lie in ``range(num_classes)``.
    """

    name: str
    files: dict[str, tuple[str, str]]
    sha256: dict[str, str]
    class_names: tuple[str, ...]
    mean: float
    std: float
    mirrors: tuple[str, ...]
    system_dirs: tuple[str, ...] = ()
    image_shape: tuple[int, int] = (28, 28)
    num_classes: int = 10
    file_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        names = tuple(f for split in SPLITS for f in self.files[split])
        object.__setattr__(self, "file_names", names)


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist",
        files=_IDX_FILES,
        sha256={
            "train-images-idx3-ubyte":
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte":
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte":
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte":
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        class_names=tuple(str(i) for i in range(10)),
        mean=0.1306604762738429,
        std=0.30810780385646264,
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
    ),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        files=_IDX_FILES,
        sha256={
            "train-images-idx3-ubyte":
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte":
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte":
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte":
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        class_names=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
        mean=0.2860405969887955,
        std=0.35302424451492254,
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
    ),
}


def get_info(name: str) -> DatasetInfo:
    """Look up a dataset by name, raising DataError for an unknown one."""
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(sorted(DATASETS))
        raise DataError(f"Unknown dataset {name!r}: expected one of {known}.") from None


def find_idx_file(directory: Path, file_name: str) -> Path | None:
    """Return ``directory/file_name.gz`` or ``directory/file_name`` if either exists."""
    for candidate in (directory / f"{file_name}.gz", directory / file_name):
        if candidate.exists():
            return candidate
    return None


def read_payload(path: Path) -> bytes:
    """Read a file's bytes, decompressing it if it starts with the gzip magic.

    Raises:
        DataError: the file is missing, unreadable, or a truncated/corrupt gzip stream.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: expected an idx file but the file does not exist.") from None
    except IsADirectoryError:
        raise DataError(f"{path}: expected an idx file but found a directory.") from None
    except OSError as exc:
        raise DataError(
            f"{path}: expected a readable idx file but reading failed ({exc.strerror or exc})."
        ) from None
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(
            f"{path}: expected a complete gzip stream but it is truncated or corrupt ({exc})."
        ) from None


def sha256_of_payload(path: Path) -> str:
    """SHA-256 hex digest of a file's decompressed payload (see :func:`read_payload`)."""
    return hashlib.sha256(read_payload(path)).hexdigest()


def parse_idx(payload: bytes, path: Path) -> np.ndarray:
    """Decode an idx payload into a native-endian array, validating header and length.

    Args:
        payload: decompressed file contents.
        path: the file the payload came from, used in error messages only.

    Raises:
        DataError: bad magic number, unknown dtype code, or a length that does not match
            the dimensions in the header.
    """
    if len(payload) < 4:
        raise DataError(f"{path}: expected an idx header but the file has {len(payload)} bytes.")
    zero, code, ndim = struct.unpack(">HBB", payload[:4])
    if zero != 0 or code not in IDX_DTYPES or ndim == 0:
        raise DataError(
            f"{path}: expected an idx magic number (00 00, dtype code, ndim) "
            f"but found 0x{payload[:4].hex()}."
        )
    header_len = 4 + 4 * ndim
    if len(payload) < header_len:
        raise DataError(
            f"{path}: expected a {header_len}-byte header for {ndim} dimensions "
            f"but the file has {len(payload)} bytes."
        )
    dims = struct.unpack(f">{ndim}I", payload[4:header_len])
    dtype = IDX_DTYPES[code]
    expected = header_len + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(payload) != expected:
        raise DataError(
            f"{path}: expected {expected} bytes for {dims[0]} records of shape {dims[1:]} "
            f"but found {len(payload)} (truncated or padded file)."
        )
    array = np.frombuffer(payload, dtype=dtype, offset=header_len).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)


def read_split(
    info: DatasetInfo, split: str, images_path: Path, labels_path: Path
) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Read and fully verify one split of a known dataset.

    Args:
        info: the dataset the files must belong to.
        split: "train" or "test" (selects the expected checksums).
        images_path: idx3 image file, gzip or plain.
        labels_path: idx1 label file, gzip or plain.

    Returns:
        (images uint8 (N, H, W), labels uint8 (N,), {file name: payload SHA-256}).

    Raises:
        DataError: for any file that fails a check; nothing is returned partially.
    """
    images_name, labels_name = info.files[split]
    arrays = {}
    digests = {}
    for name, path in ((images_name, images_path), (labels_name, labels_path)):
        payload = read_payload(path)
        digest = hashlib.sha256(payload).hexdigest()
        arrays[name] = parse_idx(payload, path)
        digests[name] = digest
    images, labels = arrays[images_name], arrays[labels_name]
    h, w = info.image_shape
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (h, w):
        raise DataError(
            f"{images_path}: expected uint8 images of shape (N, {h}, {w}) "
            f"but found {images.dtype} with shape {images.shape}."
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(
            f"{labels_path}: expected a 1-D uint8 label file but found {labels.dtype} "
            f"with shape {labels.shape}."
        )
    if len(images) != len(labels):
        raise DataError(
            f"{labels_path}: expected {len(images)} labels to match {images_path.name} "
            f"but found {len(labels)}."
        )
    if len(labels) and int(labels.max()) >= info.num_classes:
        bad = int(np.argmax(labels >= info.num_classes))
        raise DataError(
            f"{labels_path}: expected labels in 0..{info.num_classes - 1} "
            f"but record {bad} is {int(labels[bad])}."
        )
    for name, path in ((images_name, images_path), (labels_name, labels_path)):
        if digests[name] != info.sha256[name]:
            raise DataError(
                f"{path}: expected the {info.name} {name} payload with SHA-256 "
                f"{info.sha256[name]} but found {digests[name]} (corrupt or a different dataset)."
            )
    return images, labels, digests
