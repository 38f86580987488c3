"""The downloader against a local HTTP server on 127.0.0.1 (never the real mirrors)."""

from __future__ import annotations

import gzip
import hashlib
import logging
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from dpvit.data import DATASETS, DataError, load_split, prepare_dataset
from dpvit.data.download import (
    DownloadError,
    download_file,
    fetch_missing,
    mirror_env_var,
    mirrors_for,
)

PAYLOAD = b"\x00\x00\x08\x01\x00\x00\x10\x00" + bytes(range(256)) * 16  # idx1, 4096 records
GOOD = gzip.compress(PAYLOAD, compresslevel=0, mtime=0)  # stored blocks: large enough to split
CORRUPT = gzip.compress(PAYLOAD[:-1] + b"\x01", mtime=0)
SHA = hashlib.sha256(PAYLOAD).hexdigest()
NO_SERVER = "http://127.0.0.1:1"  # nothing listens on port 1: connection refused at once
CLOSED = "http://127.0.0.1:9"  # the discard port, closed here: another refused mirror


class Handler(BaseHTTPRequestHandler):
    """Paths: /good/, /corrupt/, /flaky/ (first reply cut in half), /norange/, /busy/ (503),
    else 404."""

    files: ClassVar[dict[str, bytes]] = {}
    requests: ClassVar[list[tuple[str, str | None]]] = []
    cut: ClassVar[set[str]] = set()

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self.requests.append((self.path, self.headers.get("Range")))
        mode, _, name = self.path.strip("/").partition("/")
        if mode == "busy":
            self.send_error(503)
            return
        body = CORRUPT if mode == "corrupt" else self.files.get(name)
        if body is None or mode not in {"good", "corrupt", "flaky", "norange"}:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and mode != "norange":
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if mode == "flaky" and self.path not in self.cut:
            self.cut.add(self.path)
            self.wfile.write(body[: len(body) // 2])  # then the connection drops
            return
        self.wfile.write(body[start:])


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def fresh_handler():
    Handler.files = {"f.gz": GOOD}
    Handler.requests = []
    Handler.cut = set()


FAST = {"timeout": 5.0, "retries": 3, "sleep": lambda s: None}


def test_good_mirror(server, tmp_path):
    dest = download_file([f"{server}/good/f.gz"], tmp_path / "f.gz", SHA, **FAST)
    assert dest.read_bytes() == GOOD
    assert not (tmp_path / "f.gz.part").exists()


def test_interrupted_transfer_resumes_with_range(server, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    dest = download_file([f"{server}/flaky/f.gz"], tmp_path / "f.gz", SHA, **FAST)
    assert dest.read_bytes() == GOOD
    assert Handler.requests == [("/flaky/f.gz", None), ("/flaky/f.gz", f"bytes={len(GOOD) // 2}-")]
    assert "attempt 1/3 failed" in caplog.text


def test_leftover_part_file_resumed(server, tmp_path):
    (tmp_path / "f.gz.part").write_bytes(GOOD[:1000])
    download_file([f"{server}/good/f.gz"], tmp_path / "f.gz", SHA, **FAST)
    assert Handler.requests == [("/good/f.gz", "bytes=1000-")]
    assert (tmp_path / "f.gz").read_bytes() == GOOD


def test_server_ignoring_range_restarts_file(server, tmp_path):
    (tmp_path / "f.gz.part").write_bytes(b"garbage!" * 10)
    download_file([f"{server}/norange/f.gz"], tmp_path / "f.gz", SHA, **FAST)
    assert (tmp_path / "f.gz").read_bytes() == GOOD


def test_corrupt_mirror_rejected_next_tried(server, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    urls = [f"{server}/corrupt/f.gz", f"{server}/missing/f.gz", f"{server}/good/f.gz"]
    download_file(urls, tmp_path / "f.gz", SHA, **FAST)
    assert (tmp_path / "f.gz").read_bytes() == GOOD
    assert [p for p, _ in Handler.requests] == ["/corrupt/f.gz", "/missing/f.gz", "/good/f.gz"]
    assert "checksum mismatch" in caplog.text


def test_all_mirrors_fail(server, tmp_path):
    retries = []
    urls = [f"{server}/corrupt/f.gz", f"{server}/busy/f.gz", f"{NO_SERVER}/f.gz"]
    with pytest.raises(DownloadError) as info:
        download_file(urls, tmp_path / "f.gz", SHA, timeout=5, retries=3, backoff=0.5,
                      sleep=retries.append)
    message = str(info.value)
    assert str(tmp_path / "f.gz") in message and "checksum mismatch" in message
    assert "HTTP 503" in message and "refused" in message.lower()
    assert not info.value.offline  # two mirrors answered
    # exponential backoff between the busy mirror's three attempts; the refused one: none
    assert retries == [0.5, 1.0]
    assert [p for p, _ in Handler.requests].count("/busy/f.gz") == 3
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_unreachable_mirror_skipped_without_retries(server, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    retries = []
    download_file([f"{NO_SERVER}/f.gz", f"{server}/good/f.gz"], tmp_path / "f.gz", SHA,
                  timeout=5, retries=3, sleep=retries.append)
    assert (tmp_path / "f.gz").read_bytes() == GOOD
    assert retries == [] and caplog.text == ""


def test_offline_is_one_message_at_once(tmp_path, caplog):
    """Item 4 of issue 17: every mirror unreachable (closed local ports stand in for no
    network) is recognised on the first connection attempts: no retries, no backoff, no
    warnings, and one message naming the files, where to put them, the fetch command and the
    README."""
    caplog.set_level(logging.INFO, logger="dpvit")
    slept = []
    start = time.monotonic()
    with pytest.raises(DownloadError) as err:
        fetch_missing(DATASETS["mnist"], tmp_path, mirrors=[NO_SERVER, CLOSED], timeout=30,
                      retries=3, backoff=10, sleep=slept.append)
    assert time.monotonic() - start < 2 and slept == []
    assert err.value.offline
    message = str(err.value)
    assert "no mirror reachable" in message and "offline" in message
    for part in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "--data-dir",
                 "DPVIT_DATA_DIR", "python -m dpvit.data fetch mnist", "data/README.md",
                 str(tmp_path.resolve())):
        assert part in message
    assert "\n" not in message
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert list(tmp_path.iterdir()) == []


def test_mirror_environment_variable(server, tmp_path, monkeypatch):
    """DPVIT_MNIST_MIRROR replaces the registry's mirrors (whitespace-separated bases)."""
    info = replace(DATASETS["mnist"], name="mnist", sha256={"f": SHA},
                   files={"train": ("f", "f"), "test": ("f", "f")})
    assert mirror_env_var("fashion-mnist") == "DPVIT_FASHION_MNIST_MIRROR"
    monkeypatch.setenv("DPVIT_MNIST_MIRROR", f"{NO_SERVER}/  {server}/good/")
    assert mirrors_for(info) == (f"{NO_SERVER}/", f"{server}/good/")
    paths = fetch_missing(info, tmp_path, **FAST)
    assert paths["f"].read_bytes() == GOOD
    monkeypatch.setenv("DPVIT_MNIST_MIRROR", "")
    assert mirrors_for(info) == DATASETS["mnist"].mirrors


def test_offline_message_names_every_file_and_place(tmp_path):
    info = DATASETS["mnist"]
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"present")
    with pytest.raises(DataError) as err:
        fetch_missing(info, tmp_path, mirrors=[NO_SERVER], **FAST)
    message = str(err.value)
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        assert name in message
    assert "train-labels" not in message  # already there
    assert str(tmp_path.resolve()) in message and "--data-dir" in message
    assert "\n" not in message


@pytest.fixture
def tiny_remote(server, tmp_path, monkeypatch):
    """Dataset "tiny" served by the local server under /good/; tmp is the working directory
    (so data/tiny is dpvit's own data directory) and holds the cache."""
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 8, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 4, dtype=np.uint8),
    }
    payloads = {n: _idx(a) for n, a in arrays.items()}
    Handler.files = {f"{n}.gz": gzip.compress(p) for n, p in payloads.items()}
    info = replace(DATASETS["mnist"], name="tiny",
                   sha256={n: hashlib.sha256(p).hexdigest() for n, p in payloads.items()})
    monkeypatch.setitem(DATASETS, "tiny", info)
    monkeypatch.setenv("DPVIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DPVIT_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    return arrays


def test_prepare_dataset_downloads_into_data_dir(server, tmp_path, tiny_remote):
    path = prepare_dataset("tiny", None, mirrors=[f"{server}/good/"], **FAST)
    assert path == Path("data/tiny/tiny.h5")
    assert sorted(p.name for p in Path("data/tiny").glob("*.gz")) == sorted(Handler.files)
    np.testing.assert_array_equal(load_split(path, "test")[1],
                                  tiny_remote["t10k-labels-idx1-ubyte"])


def test_test_split_alone_fetches_only_test_files(server, tmp_path, tiny_remote):
    """What python -m dpvit.evaluate asks for: the training files are neither downloaded nor
    converted; a later training run rebuilds the store with both splits."""
    path = prepare_dataset("tiny", None, splits=("test",), mirrors=[f"{server}/good/"], **FAST)
    assert sorted(p for p, _ in Handler.requests) == ["/good/t10k-images-idx3-ubyte.gz",
                                                      "/good/t10k-labels-idx1-ubyte.gz"]
    np.testing.assert_array_equal(load_split(path, "test")[1],
                                  tiny_remote["t10k-labels-idx1-ubyte"])
    with pytest.raises(DataError, match="train/images"):
        load_split(path, "train")
    assert prepare_dataset("tiny", None, splits=("test",), mirrors=[NO_SERVER]) == path  # reused
    full = prepare_dataset("tiny", None, mirrors=[f"{server}/good/"], **FAST)
    assert full == path and load_split(full, "train")[0].shape == (8, 28, 28)
    assert prepare_dataset("tiny", None, splits=("test",), mirrors=[NO_SERVER]) == path


def test_prepare_dataset_offline_leaves_nothing_behind(tmp_path, tiny_remote):
    """Offline: one DataError, and no data directory, cache, lock or partial file remains."""
    with pytest.raises(DownloadError) as err:
        prepare_dataset("tiny", None, mirrors=[NO_SERVER, CLOSED], **FAST)
    assert err.value.offline and str(Path("data/tiny").resolve()) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _idx(a: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, a.ndim]) + b"".join(d.to_bytes(4, "big") for d in a.shape)
    return header + a.tobytes()


class _Tty:
    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


def test_progress_bar_on_tty_and_log_lines_otherwise(server, tmp_path, monkeypatch, caplog):
    tty = _Tty()
    monkeypatch.setattr("sys.stderr", tty)
    download_file([f"{server}/good/f.gz"], tmp_path / "a.gz", SHA, **FAST)
    assert "a.gz: 100%|" in tty.text and tty.text.endswith("\n")  # tqdm's bar, left drawn
    monkeypatch.undo()
    caplog.set_level(logging.INFO, logger="dpvit.data.download")
    download_file([f"{server}/good/f.gz"], tmp_path / "b.gz", SHA, **FAST)
    assert "b.gz: 100% of" in caplog.text
