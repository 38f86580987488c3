"""Reading and writing ``.safetensors`` weight files with the ``safetensors`` package's numpy API.

``safetensors`` is the optional extra ``export`` (``pip install -e ".[export]"``); without it
these functions raise one line saying so. ``load_init_weights`` is what
``python -m dpvit.train --init-from FILE`` reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from dpvit.errors import ConfigError, UserError
from dpvit.files import atomic_write
from dpvit.interop.timm_layout import from_timm
from dpvit.vit import ViTConfig

INSTALL_EXPORT = 'pip install "safetensors>=0.4"  (or: pip install -e ".[export]")'


def missing_extra(what: str, package: str, install: str) -> UserError:
    """The one-line error for a feature whose optional package is not installed."""
    return UserError(f"{what} needs the optional package {package}, which is not installed; "
                     f"install it with: {install}")


def _safetensors_numpy(what: str):
    try:
        import safetensors.numpy as stnp
    except ImportError:
        raise missing_extra(what, "safetensors", INSTALL_EXPORT) from None
    return stnp


def save_weights(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                 metadata: dict[str, str], what: str = "dpvit.export") -> None:
    """Write ``tensors`` and ``metadata`` to ``path`` atomically (a crash leaves no partial file).

    Raises:
        UserError: safetensors is not installed, or the file cannot be written.
    """
    stnp = _safetensors_numpy(what)
    final = Path(path)
    try:
        with atomic_write(final) as tmp:
            stnp.save_file(tensors, str(tmp), metadata=metadata)
    except OSError as err:
        raise UserError(f"could not write {final}: {err.strerror or err}") from err


def read_weights(path: str | os.PathLike,
                 what: str = "--init-from") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata of a safetensors file.

    Raises:
        UserError: safetensors is not installed, or the file is missing or not a safetensors
            file (one line naming it).
    """
    stnp = _safetensors_numpy(what)
    from safetensors import safe_open

    file = Path(path)
    if not file.is_file():
        raise UserError(f"{what} {file}: no such file")
    try:
        with safe_open(str(file), framework="np") as f:
            meta = f.metadata() or {}
        tensors = stnp.load_file(str(file))
    except Exception as err:  # safetensors raises SafetensorError, or OSError, ValueError
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{what} {file} is not a readable safetensors file ({first})") from None
    return tensors, meta


def _json_meta(meta: dict[str, str], key: str) -> Any:
    try:
        return json.loads(meta[key]) if key in meta else None
    except ValueError:
        return None


def load_init_weights(path: str | os.PathLike, cfg: ViTConfig,
                      reset_head: bool = False) -> dict[str, np.ndarray]:
    """The parameters of ``path`` (timm layout, e.g. from ``python -m dpvit.export``) as dpvit
    names, checked against the model config ``cfg``.

    Args:
        path: the .safetensors file.
        cfg: the model being trained.
        reset_head: leave the head out: the model keeps its freshly initialised one.

    Raises:
        UserError: no safetensors, a missing or unreadable file, or (ConfigError) the first
            tensor whose name or shape does not fit ``cfg``.
    """
    tensors, meta = read_weights(path)
    saved = _json_meta(meta, "dpvit_config")
    approx = _json_meta(meta, "gelu_approximate")
    if approx not in (None, "tanh"):
        raise ConfigError(f"--init-from {path} was saved for GELU approximate={approx!r}; "
                          "dpvit computes the tanh approximation")
    return from_timm(tensors, cfg, f"--init-from {path}", skip_head=reset_head,
                     saved_config=saved if isinstance(saved, dict) else None)
