"""idx validation, the HDF5 store and prepare_dataset, on a tiny synthetic dataset."""

from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing
import struct
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from dpvit.data import DATASETS, DataError, load_split, prepare_dataset, resolve_data_dir
from dpvit.data import store as store_mod
from dpvit.data.__main__ import main as cli_main
from dpvit.data.idx import DatasetInfo, parse_idx
from dpvit.errors import AgreedError

TRAIN_N, TEST_N = 40, 12


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    """Encode an array in the idx format."""
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def tiny_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (TRAIN_N, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, TRAIN_N, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (TEST_N, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, TEST_N, dtype=np.uint8),
    }


def write_files(directory: Path, payloads: dict[str, bytes], gz: bool = True) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, payload in payloads.items():
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(payload, mtime=0))
        else:
            (directory / name).write_bytes(payload)


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """Register dataset "tiny" (good files in tmp/data/tiny, dpvit's own data directory with
    tmp as the working directory) and point the cache into tmp."""
    arrays = tiny_arrays()
    payloads = {name: idx_bytes(a) for name, a in arrays.items()}
    info = replace(
        DATASETS["mnist"], name="tiny", mirrors=(),
        sha256={n: hashlib.sha256(p).hexdigest() for n, p in payloads.items()},
    )
    assert isinstance(info, DatasetInfo)
    monkeypatch.setitem(DATASETS, "tiny", info)
    monkeypatch.setenv("DPVIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DPVIT_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    data_dir = tmp_path / "data" / "tiny"
    write_files(data_dir, payloads)
    return {"dir": data_dir, "arrays": arrays, "payloads": payloads, "info": info}


def h5_files(tmp_path: Path) -> list[Path]:
    return [p for p in tmp_path.rglob("*") if ".h5" in p.name and not p.name.endswith(".lock")]


def test_prepare_and_load_roundtrip(tiny):
    path = prepare_dataset("tiny", str(tiny["dir"]))
    assert path == tiny["dir"] / "tiny.h5"
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = load_split(path, split)
        assert images.dtype == np.uint8 and labels.dtype == np.int64
        np.testing.assert_array_equal(images, tiny["arrays"][f"{prefix}-images-idx3-ubyte"])
        np.testing.assert_array_equal(labels, tiny["arrays"][f"{prefix}-labels-idx1-ubyte"])
    with h5py.File(path, "r") as f:
        assert json.loads(f.attrs["source_sha256"]) == tiny["info"].sha256
        assert json.loads(f.attrs["class_names"]) == list(tiny["info"].class_names)
        assert f["train/images"].compression == "gzip"


def test_plain_idx_files_accepted(tiny, tmp_path):
    plain = tmp_path / "plain"
    write_files(plain, tiny["payloads"], gz=False)
    images, _ = load_split(prepare_dataset("tiny", str(plain)), "train")
    assert images.shape == (TRAIN_N, 28, 28)


def test_existing_store_reused_without_reading_idx(tiny, monkeypatch):
    path = prepare_dataset("tiny", str(tiny["dir"]))
    mtime = path.stat().st_mtime_ns

    def forbidden(*args, **kwargs):
        raise AssertionError("idx files re-read although the store matches")

    monkeypatch.setattr(store_mod, "read_split", forbidden)
    monkeypatch.setattr(store_mod, "locate_idx_files", forbidden)
    assert prepare_dataset("tiny", str(tiny["dir"])) == path
    assert path.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("content", [b"not an hdf5 file", "stale"])
def test_damaged_or_stale_store_rebuilt(tiny, content):
    path = tiny["dir"] / "tiny.h5"
    if content == "stale":
        prepare_dataset("tiny", str(tiny["dir"]))
        with h5py.File(path, "a") as f:
            f.attrs["source_sha256"] = json.dumps({"other": "checksums"})
    else:
        path.write_bytes(content)
    assert prepare_dataset("tiny", str(tiny["dir"])) == path
    assert load_split(path, "test")[0].shape == (TEST_N, 28, 28)


def test_read_only_data_dir_uses_cache(tiny, monkeypatch, tmp_path):
    from dpvit.data import location

    for module in (store_mod, location):
        monkeypatch.setattr(module, "_dir_is_writable", lambda p, create=True: False)
    path = prepare_dataset("tiny", str(tiny["dir"]))
    assert path == tmp_path / "cache" / "tiny.h5"
    assert not (tiny["dir"] / "tiny.h5").exists()


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("how", ["--data-dir", "DPVIT_DATA_DIR", "root holding tiny/"])
def test_store_never_written_into_a_directory_dpvit_was_pointed_at(tiny, monkeypatch, tmp_path,
                                                                   how):
    """Item 8 of issue 17: a writable copy of the data outside data/<name>/ (a reference copy
    the user pointed at; root can write anywhere) gets no store and no lock: the cache does."""
    copy = tmp_path / "reference" / "tiny"
    write_files(copy, tiny["payloads"])
    before = listing(copy)
    arg = str(copy) if how != "root holding tiny/" else str(copy.parent)
    if how == "DPVIT_DATA_DIR":
        monkeypatch.setenv("DPVIT_DATA_DIR", arg)
        arg = None
    path = prepare_dataset("tiny", arg)
    assert path == tmp_path / "cache" / "tiny.h5"
    assert listing(copy) == before and listing(copy.parent) == ["tiny"]
    assert prepare_dataset("tiny", arg) == path  # found again in the cache


def test_store_beside_dpvits_own_data_dir_only(tiny, monkeypatch, tmp_path):
    """data/<name>/ in the working directory is dpvit's own: the store lives beside the
    files, whether named explicitly, relatively, or by default; a link from data/<name> to
    another directory is not dpvit's own."""
    assert store_mod.is_own_data_dir("tiny", tiny["dir"])
    assert store_mod.is_own_data_dir("tiny", Path("data/tiny"))
    assert prepare_dataset("tiny", None).absolute() == tiny["dir"] / "tiny.h5"
    assert prepare_dataset("tiny", "data/tiny") == Path("data/tiny/tiny.h5")
    elsewhere = tmp_path / "elsewhere"
    tiny["dir"].rename(elsewhere)
    (tmp_path / "data" / "tiny").symlink_to(elsewhere)
    assert not store_mod.is_own_data_dir("tiny", tiny["dir"])
    (elsewhere / "tiny.h5").unlink()
    (elsewhere / ".tiny.h5.lock").unlink()
    before = listing(elsewhere)
    assert prepare_dataset("tiny", None) == tmp_path / "cache" / "tiny.h5"
    assert listing(elsewhere) == before


def test_store_dir_chosen_by_the_user(tiny, tmp_path):
    """--store-dir DIR (config field store_dir) wins over both defaults."""
    chosen = tmp_path / "stores"
    path = prepare_dataset("tiny", str(tiny["dir"]), store_dir=str(chosen))
    assert path == chosen / "tiny.h5"
    assert not (tiny["dir"] / "tiny.h5").exists() and not (tmp_path / "cache").exists()
    assert cli_main(["fetch", "tiny", "--store-dir", str(chosen)]) == 0


def test_unwritable_store_dir_is_one_clear_error(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DataError) as info:
        prepare_dataset("tiny", str(tiny["dir"]), store_dir=str(blocker / "stores"))
    message = str(info.value)
    assert "--store-dir" in message and "DPVIT_CACHE_DIR" in message and "\n" not in message
    assert message.startswith(str(blocker / "stores" / "tiny.h5"))


def test_store_never_creates_a_sibling_of_another_datasets_dir(tiny, monkeypatch, tmp_path):
    """DPVIT_DATA_DIR=.../mnist with another dataset whose files sit in a system directory:
    the store goes to the cache, not into a new directory beside the MNIST one, nor into an
    existing one."""
    monkeypatch.setitem(DATASETS, "tiny", replace(tiny["info"], system_dirs=(str(tiny["dir"]),)))
    mnist_dir = tmp_path / "datasets" / "mnist"
    mnist_dir.mkdir(parents=True)
    assert prepare_dataset("tiny", str(mnist_dir)) == tmp_path / "cache" / "tiny.h5"
    assert not (tmp_path / "datasets" / "tiny").exists()
    (tmp_path / "cache" / "tiny.h5").unlink()
    (tmp_path / "datasets" / "tiny").mkdir()  # an existing sibling is read, never written
    assert prepare_dataset("tiny", str(mnist_dir)) == tmp_path / "cache" / "tiny.h5"
    assert listing(tmp_path / "datasets" / "tiny") == []


def test_resolve_data_dir(tiny, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir("mnist", None) == Path("data/mnist")
    monkeypatch.setenv("DPVIT_DATA_DIR", str(tmp_path / "elsewhere"))
    assert resolve_data_dir("mnist", None) == tmp_path / "elsewhere"
    assert resolve_data_dir("tiny", str(tmp_path / "data")) == tiny["dir"]  # root holding tiny/
    # A directory named after another dataset is a sibling, not this dataset's files.
    assert resolve_data_dir("fashion-mnist", "/x/mnist") == Path("/x/fashion-mnist")
    with pytest.raises(DataError, match="Unknown dataset 'cifar'"):
        resolve_data_dir("cifar", None)


class FakeComm:
    """Rank ``rank`` of two, run one after the other: rank 0's broadcast goes into ``mailbox``,
    which rank 1 reads (an empty mailbox: rank 1 receives its own value)."""

    def __init__(self, rank: int, size: int, mailbox: dict | None = None) -> None:
        self.rank, self.size, self.barriers = rank, size, 0
        self.mailbox = {} if mailbox is None else mailbox

    def barrier(self) -> None:
        self.barriers += 1

    def broadcast_object(self, obj, root: int = 0):
        if self.rank == root:
            self.mailbox["sent"] = obj
        return self.mailbox.get("sent", obj)


def test_comm_rank0_builds_other_ranks_wait_and_find(tiny):
    mailbox: dict = {}
    rank0, rank1 = FakeComm(0, 2, mailbox), FakeComm(1, 2, mailbox)
    with pytest.raises(DataError, match="cannot see it"):
        prepare_dataset("tiny", str(tiny["dir"]), FakeComm(1, 2))  # rank 0 never ran
    path = prepare_dataset("tiny", str(tiny["dir"]), rank0)
    assert prepare_dataset("tiny", str(tiny["dir"]), rank1) == path
    assert rank0.barriers == rank1.barriers == 1


def test_comm_rank0_failure_is_every_ranks_one_message(tiny, caplog):
    """Files missing on rank 0: every rank raises the same AgreedError (which run_main
    reports once, from rank 0, with no MPI_Abort), and nothing is created."""
    (tiny["dir"] / "t10k-labels-idx1-ubyte.gz").unlink()
    mailbox: dict = {}
    errors = []
    for rank in (0, 1):
        with pytest.raises(AgreedError) as info:
            prepare_dataset("tiny", str(tiny["dir"]), FakeComm(rank, 2, mailbox), download=False)
        assert isinstance(info.value, DataError)
        errors.append(str(info.value))
    assert errors[0] == errors[1] and "t10k-labels-idx1-ubyte.gz" in errors[0]


def _worker(data_dir: str, log: str, queue) -> None:
    original = store_mod.convert

    def counted(*args, **kwargs):
        with open(log, "a") as fh:
            fh.write("convert\n")
        time.sleep(0.3)  # widen the window in which the others arrive
        original(*args, **kwargs)

    store_mod.convert = counted
    queue.put(str(prepare_dataset("tiny", data_dir)))


def test_four_processes_convert_once(tiny, tmp_path):
    ctx = multiprocessing.get_context("fork")  # inherits the monkeypatched registry
    queue = ctx.Queue()
    log = tmp_path / "conversions.log"
    procs = [ctx.Process(target=_worker, args=(str(tiny["dir"]), str(log), queue))
             for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    paths = {queue.get(timeout=5) for _ in procs}
    assert paths == {str(tiny["dir"] / "tiny.h5")}
    assert log.read_text().count("convert") == 1
    assert not [p for p in tiny["dir"].iterdir() if ".tmp" in p.name]
    assert load_split(Path(paths.pop()), "train")[0].shape == (TRAIN_N, 28, 28)


# --- bad files -------------------------------------------------------------------------

def _labels(n: int, top: int = 10) -> bytes:
    return idx_bytes(np.arange(n, dtype=np.uint8) % top)


BAD_FILES = {
    # case: (file to replace, replacement payload or None for gzip truncation, message part)
    "truncated gzip": ("train-images-idx3-ubyte", None, "truncated or corrupt"),
    "wrong magic": ("train-images-idx3-ubyte",
                    b"\x12\x34\x08\x03" + bytes(12 + TRAIN_N * 784), "magic number"),
    "wrong dimensions": ("t10k-images-idx3-ubyte",
                         idx_bytes(np.zeros((TEST_N, 27, 27), np.uint8)), "(N, 28, 28)"),
    "images as labels": ("train-labels-idx1-ubyte",
                         idx_bytes(np.zeros((TRAIN_N, 28, 28), np.uint8)), "1-D uint8"),
    "header/length mismatch": ("train-images-idx3-ubyte",
                               idx_bytes(np.zeros((TRAIN_N, 28, 28), np.uint8))[:-784],
                               "truncated or padded"),
    "count mismatch": ("t10k-labels-idx1-ubyte", _labels(TEST_N - 1), "expected 12 labels"),
    "label out of range": ("train-labels-idx1-ubyte", _labels(TRAIN_N, 11),
                           "labels in 0..9 but record 10 is 10"),
    "checksum mismatch": ("t10k-images-idx3-ubyte",
                          idx_bytes(np.ones((TEST_N, 28, 28), np.uint8)), "SHA-256"),
}


def assert_clean_error(err: DataError, file_part: str, what: str, tmp_path: Path) -> None:
    message = str(err)
    assert file_part in message and what in message, message
    assert "\n" not in message and message.endswith(".")
    assert h5_files(tmp_path) == [], "a store or temporary file was written from a bad file"


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_rejected(tiny, tmp_path, case):
    name, payload, what = BAD_FILES[case]
    gz = tiny["dir"] / f"{name}.gz"
    if payload is None:
        gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    else:
        gz.write_bytes(gzip.compress(payload))
    with pytest.raises(DataError) as info:
        prepare_dataset("tiny", str(tiny["dir"]))
    assert_clean_error(info.value, f"{name}.gz", what, tmp_path)


def test_missing_file(tiny, tmp_path):
    (tiny["dir"] / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as info:
        prepare_dataset("tiny", str(tiny["dir"]), download=False)
    assert_clean_error(info.value, "t10k-labels-idx1-ubyte.gz", "could not be found", tmp_path)
    assert "train-images" not in str(info.value)  # only the missing file is named
    with pytest.raises(DataError) as info:  # no mirror can supply it either
        prepare_dataset("tiny", str(tiny["dir"]), download=True)
    assert_clean_error(info.value, "t10k-labels-idx1-ubyte.gz", "--data-dir", tmp_path)


def test_unreadable_file_directory(tiny, tmp_path):
    gz = tiny["dir"] / "train-labels-idx1-ubyte.gz"
    gz.unlink()
    gz.mkdir()
    with pytest.raises(DataError) as info:
        prepare_dataset("tiny", str(tiny["dir"]))
    assert_clean_error(info.value, "train-labels-idx1-ubyte.gz", "found a directory", tmp_path)


def test_unreadable_file_permission(tiny, tmp_path, monkeypatch):
    real_read_bytes = Path.read_bytes

    def read_bytes(self):
        if self.name.startswith("t10k-images"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(DataError) as info:
        prepare_dataset("tiny", str(tiny["dir"]))
    assert_clean_error(info.value, "t10k-images-idx3-ubyte.gz", "Permission denied", tmp_path)


def test_parse_idx_recognises_spec_dtypes(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = parse_idx(idx_bytes(a, 0x0D), tmp_path / "f")
    np.testing.assert_array_equal(out, a)
    assert out.dtype == np.float32
    with pytest.raises(DataError, match="idx header"):
        parse_idx(b"\x00", tmp_path / "f")


def test_load_split_errors(tmp_path):
    h5py.File(tmp_path / "groupless.h5", "w").close()
    with pytest.raises(DataError, match="expected train/images"):
        load_split(tmp_path / "groupless.h5", "train")
    with pytest.raises(DataError, match="readable dpvit HDF5 store"):
        load_split(tmp_path / "absent.h5", "train")
    with pytest.raises(DataError, match="split in"):
        load_split(tmp_path / "absent.h5", "validation")


def test_cli(tiny, tmp_path, capsys):
    assert cli_main(["fetch", "tiny", "--data-dir", str(tiny["dir"])]) == 0
    assert capsys.readouterr().out.strip() == str(tiny["dir"] / "tiny.h5")
    assert cli_main(["verify", "tiny", "--data-dir", str(tiny["dir"])]) == 0
    assert "train: 40 images OK" in capsys.readouterr().out
    assert cli_main(["info", "tiny", "--data-dir", str(tiny["dir"])]) == 0
    assert "tiny.h5" in capsys.readouterr().out
    assert cli_main(["fetch", "tiny", "--offline", "--data-dir", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--data-dir" in err
    assert not (tmp_path / "none").exists()


def test_downloads_never_create_a_sibling_of_a_directory_dpvit_was_pointed_at(tmp_path,
                                                                               monkeypatch):
    """DPVIT_DATA_DIR=<ref>/mnist with fashion-mnist reads <ref>/fashion-mnist when it exists;
    when it does not, the download goes to the cache and the reference tree gets nothing."""
    ref = tmp_path / "ref"
    (ref / "mnist").mkdir(parents=True)
    cache = tmp_path / "cache"
    monkeypatch.setenv("DPVIT_CACHE_DIR", str(cache))
    info = replace(store_mod.get_info("fashion-mnist"), system_dirs=())  # not the Debian copy
    data_dir = store_mod.resolve_data_dir("fashion-mnist", str(ref / "mnist"))
    assert data_dir == ref / "fashion-mnist"
    targets = []

    def fake_fetch(info, target, names, **kwargs):
        targets.append(target)
        return {name: target / name for name in names}

    monkeypatch.setattr(store_mod, "fetch_missing", fake_fetch)
    store_mod.locate_idx_files(info, data_dir, download=True)
    assert targets == [cache / "fashion-mnist"]
    assert sorted(p.name for p in ref.iterdir()) == ["mnist"]
