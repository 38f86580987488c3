"""The first minutes of a new user (issue 17, items 1, 4, 5 and 8), as real processes.

- The README's test command works from a fresh clone with no environment variable: the tests
  find MNIST in ``data/mnist/`` (where ``python -m dpvit.train`` puts it), download it there
  when it is absent, and stop with one message when that fails.
- Offline, training, ``python -m dpvit.data fetch`` and ``python -m dpvit.evaluate`` say once,
  within seconds, which files are missing and what to do, and leave nothing behind (no run
  directory, data directory, cache or lock); evaluation needs the test files only.
- A data directory dpvit was pointed at gets no file; the log says which copy of the data is
  used, where, and that its checksums match.

"Offline" is simulated by pointing the mirrors at closed ports on 127.0.0.1
(``DPVIT_MNIST_MIRROR``); no test reaches outside this machine.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import REPO, TINY_ARGS, mpirun, real_data_dir, run_dpvit

OFFLINE = "http://127.0.0.1:9/ http://127.0.0.1:1/"  # closed ports: refused at once
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
TEST_FILES = MNIST_FILES[2:]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a new user: no DPVIT_DATA_DIR, dpvit importable from REPO."""
    env = {k: v for k, v in os.environ.items() if k != "DPVIT_DATA_DIR"}
    env["PYTHONPATH"] = str(REPO)
    return {**env, **extra}


def copy_mnist(dest: Path, names: tuple[str, ...] = MNIST_FILES) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(real_data_dir() / name, dest / name)
    return dest


def listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower() or "Abort" in line]


def assert_one_plain_message(stderr: str, *parts: str) -> str:
    """Exactly one error line, no MPI abort, no warnings, naming every ``part``."""
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    assert "Abort(" not in stderr and "warning" not in stderr.lower(), stderr
    for part in ("python -m dpvit.data fetch mnist", "data/README.md", "DPVIT_DATA_DIR", *parts):
        assert part in lines[0], lines[0]
    return lines[0]


# -- item 1: the README's test command from a fresh clone -------------------------------------

@pytest.fixture
def fresh_clone(tmp_path) -> Path:
    """This working tree as a new user's clone has it: tracked and new files, no data/."""
    clone = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        source = REPO / name
        if source.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    assert not (clone / "data" / "mnist").exists()
    return clone


def run_pytest(clone: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=clone, capture_output=True, text=True, timeout=600,
                          env={**clean_env(**env), "PYTHONPATH": str(clone)})


def test_fresh_clone_collects_and_finds_data_mnist(fresh_clone, tmp_path):
    """Without DPVIT_DATA_DIR the suite collects (collection stopped with `real MNIST not
    found at` a directory beside the repository before) and a real-data test reads MNIST
    from data/mnist/."""
    copy_mnist(fresh_clone / "data" / "mnist")
    collected = run_pytest(fresh_clone, "--collect-only", "-q",
                           DPVIT_CACHE_DIR=str(tmp_path / "cache"))
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    summary = collected.stdout.strip().splitlines()[-1]
    assert " collected" in summary and "error" not in summary, summary
    assert int(summary.split()[0]) > 100, summary
    verified = run_pytest(fresh_clone, "-q", "tests/test_data_mnist.py::test_cli_verify_real_mnist",
                          DPVIT_CACHE_DIR=str(tmp_path / "cache"))
    assert verified.returncode == 0, verified.stdout[-3000:]


@pytest.fixture
def local_mirror():
    """The real MNIST files served over HTTP on 127.0.0.1, as a mirror."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(real_data_dir()))
    handler.log_message = lambda *args: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_tests_download_mnist_into_data_mnist_first(fresh_clone, tmp_path, local_mirror):
    """No data/mnist and no DPVIT_DATA_DIR: the tests fetch MNIST into data/mnist/ with
    dpvit's own downloader (here from a local mirror), then run."""
    done = run_pytest(fresh_clone, "-q", "tests/test_data_mnist.py::test_cli_verify_real_mnist",
                      DPVIT_CACHE_DIR=str(tmp_path / "cache"), DPVIT_MNIST_MIRROR=local_mirror)
    assert done.returncode == 0, done.stdout[-3000:]
    assert sorted(p.name for p in (fresh_clone / "data" / "mnist").glob("*.gz")) == sorted(
        MNIST_FILES)
    assert (fresh_clone / "data" / "mnist" / "mnist.h5").is_file()  # dpvit's own directory


def test_tests_offline_without_mnist_stop_with_one_message(fresh_clone, tmp_path):
    done = run_pytest(fresh_clone, "-q", "tests/test_data_mnist.py",
                      DPVIT_CACHE_DIR=str(tmp_path / "cache"), DPVIT_MNIST_MIRROR=OFFLINE)
    assert done.returncode == 1, done.stdout[-3000:]
    messages = [line for line in done.stdout.splitlines() if "the tests need MNIST" in line]
    assert len(messages) == 1, done.stdout[-3000:]
    for part in ("no mirror reachable", str(fresh_clone / "data" / "mnist"), "DPVIT_DATA_DIR",
                 "python -m dpvit.data fetch mnist", "data/README.md"):
        assert part in messages[0], messages[0]
    assert not (fresh_clone / "data" / "mnist").exists()


def test_no_reference_to_the_shared_copy():
    """The tests and dpvit find MNIST through DPVIT_DATA_DIR or data/mnist only."""
    needle = "shared" + "/datasets"
    offenders = [str(p.relative_to(REPO)) for folder in ("dpvit", "tests")
                 for p in (REPO / folder).rglob("*.py") if needle in p.read_text()]
    assert offenders == []


# -- item 4: offline, one message at once, nothing left behind ---------------------------------

@pytest.mark.mpi
def test_offline_training_says_once_what_to_do_and_leaves_nothing(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    cmd = [mpirun(), "-n", "2", sys.executable, "-m", "dpvit.train", *TINY_ARGS,
           "--run-dir", "runs/first"]
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=120,
                          env=clean_env(DPVIT_CACHE_DIR=str(work / "cache"),
                                        DPVIT_MNIST_MIRROR=OFFLINE))
    elapsed = time.monotonic() - start
    assert done.returncode == 1, done.stderr
    assert elapsed < 20, f"{elapsed:.1f} s"  # start-up of two ranks included; was 35 s
    line = assert_one_plain_message(done.stderr, *MNIST_FILES, str(work / "data" / "mnist"),
                                    "no mirror reachable")
    assert "[rank 0/2]" in line
    assert listing(work) == []  # no runs/first (config.json, .lock), no data/mnist, no cache


def test_offline_fetch_is_one_line_at_once(tmp_path):
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "dpvit.data", "fetch", "mnist"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60,
                          env=clean_env(DPVIT_CACHE_DIR=str(tmp_path / "cache"),
                                        DPVIT_MNIST_MIRROR=OFFLINE))
    assert done.returncode == 1 and time.monotonic() - start < 10
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert_one_plain_message(done.stderr, *MNIST_FILES, "data/mnist")
    assert listing(tmp_path) == []


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny model trained for two steps on the real data."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    cache = tmp_path_factory.mktemp("cache")
    done = run_dpvit("train", [*TINY_ARGS, "--max-steps", "2", "--run-dir", str(run_dir)],
                     env={"DPVIT_CACHE_DIR": str(cache)})
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir / "checkpoints" / "last.h5"


def test_evaluate_needs_the_test_files_only(checkpoint, tmp_path):
    """Offline with no data it names the two test files only; with the test files alone (no
    training files anywhere) it scores the checkpoint without trying to download."""
    env = {"DPVIT_CACHE_DIR": str(tmp_path / "cache"), "DPVIT_MNIST_MIRROR": OFFLINE}
    empty = tmp_path / "empty" / "mnist"
    args = ["--checkpoint", str(checkpoint), "--run-dir", str(tmp_path / "eval"),
            "--test-subset", "200"]
    done = run_dpvit("evaluate", [*args, "--data-dir", str(empty)], env=env)
    assert done.returncode == 1, done.stderr
    line = assert_one_plain_message(done.stderr, *TEST_FILES)
    assert "train-" not in line
    assert not empty.exists() and not (tmp_path / "cache").exists()
    test_only = copy_mnist(tmp_path / "test-only" / "mnist", TEST_FILES)
    done = run_dpvit("evaluate", [*args, "--data-dir", str(test_only)], env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "downloading" not in done.stderr and "accuracy" in done.stderr
    assert listing(test_only) == sorted(TEST_FILES)  # the store went to the cache


# -- items 8 and 5: a pointed-at copy gets no file; the log says which copy is used ------------

@pytest.mark.mpi
def test_reference_copy_gets_no_file_and_the_log_names_the_copy(tmp_path):
    reference = copy_mnist(tmp_path / "reference" / "mnist")
    for path in reference.iterdir():
        path.chmod(0o444)  # as in a reference copy; the directory itself stays writable
    before = listing(tmp_path / "reference")
    cache = tmp_path / "cache"
    env = {"DPVIT_DATA_DIR": str(reference), "DPVIT_CACHE_DIR": str(cache)}
    first = run_dpvit("train", [*TINY_ARGS, "--max-steps", "2", "--run-dir",
                                str(tmp_path / "run")], ranks=2, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert listing(tmp_path / "reference") == before  # no mnist.h5, no .mnist.h5.lock
    assert (cache / "mnist.h5").is_file()
    notes = [line for line in first.stderr.splitlines() if "mnist data:" in line]
    assert len(notes) == 1 and "[rank 0/2]" in notes[0], first.stderr
    assert str(reference) in notes[0] and str(cache / "mnist.h5") in notes[0]
    assert "SHA-256 match" in notes[0]
    again = run_dpvit("evaluate", ["--checkpoint", str(tmp_path / "run/checkpoints/last.h5"),
                                   "--test-subset", "200"], env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    notes = [line for line in again.stderr.splitlines() if "mnist data:" in line]
    assert len(notes) == 1, again.stderr
    assert f"the existing store {cache / 'mnist.h5'}" in notes[0]
    assert f"from {reference}" in notes[0] and "SHA-256" in notes[0]
    assert listing(tmp_path / "reference") == before
