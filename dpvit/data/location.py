"""Where a dataset's files are read from and where dpvit may write.

The idx files are read from ``--data-dir``, else ``$DPVIT_DATA_DIR``, else ``data/<name>/``
(dpvit's own directory, where it downloads them). The HDF5 store is written to
``--store-dir`` when given; else beside the idx files when the data directory is dpvit's own
(``data/<name>/`` in the working directory or this checkout); else the user cache
(``$DPVIT_CACHE_DIR`` or ``~/.cache/dpvit``). A directory the user only pointed at, such as a
read-only reference copy, never gets a file, even when dpvit could write there (as root it
always can), and dpvit creates no directory but its own.
"""

from __future__ import annotations

import os
from pathlib import Path

from dpvit.data.idx import DATASETS, DatasetInfo, get_info

#: this checkout's root, whose ``data/<name>/`` is dpvit's own data directory
_CHECKOUT = Path(__file__).resolve().parents[2]


def resolve_data_dir(name: str, data_dir: str | None) -> Path:
    """Directory that holds (or will receive) the idx files of dataset ``name``.

    ``data_dir`` (or ``$DPVIT_DATA_DIR`` when it is None, or ``data/<name>`` relative to the
    working directory when neither is set) may be the dataset's own directory or a root
    holding ``<name>/``. A directory named after a *different* known dataset is read as a
    sibling, so ``DPVIT_DATA_DIR=/datasets/mnist`` with ``--dataset fashion-mnist`` looks in
    ``/datasets/fashion-mnist`` instead of misreading the MNIST files.
    """
    get_info(name)
    path = _requested_dir(name, data_dir)
    if (path / name).is_dir():
        return path / name
    if _names_another_dataset(name, path):
        return path.parent / name
    return path


def _requested_dir(name: str, data_dir: str | None) -> Path:
    """``data_dir``, else ``$DPVIT_DATA_DIR``, else ``data/<name>``."""
    if data_dir is None:
        data_dir = os.environ.get("DPVIT_DATA_DIR") or str(Path("data") / name)
    return Path(data_dir).expanduser()


def _names_another_dataset(name: str, path: Path) -> bool:
    """True if ``path`` is the directory of another known dataset (read as a sibling)."""
    return path.name != name and path.name in DATASETS


def cache_dir() -> Path:
    """User cache for stores (and downloads that cannot go into the data directory)."""
    return Path(os.environ.get("DPVIT_CACHE_DIR") or Path.home() / ".cache" / "dpvit")


def is_own_data_dir(name: str, data_dir: Path) -> bool:
    """True if ``data_dir`` is dpvit's own ``data/<name>/`` (in the working directory or in
    this checkout), not a link out of it: the one data directory dpvit writes its store into.
    """
    bases = [Path.cwd()]
    if (_CHECKOUT / "pyproject.toml").is_file():
        bases.append(_CHECKOUT)
    here = Path(os.path.abspath(data_dir))
    for base in bases:
        own = base / "data" / name
        if here == own and (not here.exists() or here.resolve() == own.parent.resolve() / name):
            return True
    return False


def store_dir_for(name: str, data_dir: Path, store_dir: str | None = None) -> Path:
    """Where the store of ``name`` is written: ``store_dir``, else ``data_dir`` when it is
    dpvit's own (:func:`is_own_data_dir`) and writable, else the cache."""
    if store_dir:
        return Path(store_dir).expanduser()
    own = is_own_data_dir(name, data_dir) and _dir_is_writable(data_dir, create=False)
    return data_dir if own else cache_dir()


def _dir_is_writable(path: Path, create: bool = True) -> bool:
    """True if files can be created in ``path``, which exists or (``create``) is created now.

    Without ``create`` nothing is made: a missing ``path`` counts as writable when its
    nearest existing parent is.
    """
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
    else:
        path = Path(os.path.abspath(path))
        while not path.exists() and path != path.parent:
            path = path.parent
    # root passes os.access everywhere: also honour a directory marked read-only (no write
    # bits), such as a shared dataset copy, so dpvit never writes into it
    return os.access(path, os.W_OK | os.X_OK) and bool(path.stat().st_mode & 0o222)


def store_candidates(info: DatasetInfo, data_dir: Path, store_dir: str | None = None) -> list[Path]:
    """Places a store for ``info`` may be found, the one it is written to first."""
    home = store_dir_for(info.name, data_dir, store_dir)
    places = [home, data_dir, cache_dir()]
    unique = [p for i, p in enumerate(places) if p not in places[:i]]
    return [p / f"{info.name}.h5" for p in unique]
