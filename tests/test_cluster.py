"""dpvit across hosts: MPICH jobs on an emulated cluster of 2 hosts (launch/cluster.py).

Each host is a network namespace with its own host name, joined to the others by a veth link
through a bridge, so that ranks on different hosts talk TCP over the links, as on separate
machines (the file system stays shared, as a cluster's shared file system is). Needs root,
iproute2 and util-linux: without them the tests skip, except under CI=1, where they fail.
Runs use the tiny model on a few hundred real MNIST images, one thread per rank.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, TINY_ARGS, load_params, mpirun, real_data_dir, train, under_ci

pytestmark = [pytest.mark.cluster, pytest.mark.mpi]

CLUSTER = REPO / "launch" / "cluster.py"
STATE = Path(os.environ.get("DPVIT_CLUSTER_DIR", "/run/dpvit-cluster"))
HOSTS = ["dpvit-h0", "dpvit-h1"]
LINKS = ["dpvit-v0", "dpvit-v1"]
FLOAT64 = ["--dtype", "float64"]


def _cannot(reason: str) -> None:
    """A missing capability: fail under CI (which must provide it), else skip."""
    if under_ci():
        pytest.fail(f"emulated cluster unavailable under CI: {reason}")
    pytest.skip(f"emulated cluster unavailable: {reason}")


def _cluster(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLUSTER), *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster():
    """Two hosts, unlimited links; whatever happens, torn down afterwards (leftovers of an
    earlier session first)."""
    if os.geteuid() != 0:
        _cannot("needs root (network namespaces)")
    for tool in ("ip", "tc", "unshare", "mount"):
        if shutil.which(tool) is None:
            _cannot(f"`{tool}` not found (iproute2 / util-linux)")
    probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        _cannot(f"cannot create namespaces: {probe.stderr.strip()}")
    try:
        _cluster("down")
        done = _cluster("up", "--hosts", str(len(HOSTS)))
        assert done.returncode == 0, f"cluster up failed:\n{done.stdout}{done.stderr}"
        yield
    finally:
        done = _cluster("down")
        assert done.returncode == 0, f"cluster down failed:\n{done.stderr}"


def _link_bytes() -> list[tuple[int, int]]:
    """(into, out of) each host's link, in bytes."""
    stats = [Path("/sys/class/net") / link / "statistics" for link in LINKS]
    return [(int((s / "tx_bytes").read_text()), int((s / "rx_bytes").read_text()))
            for s in stats]


def _on_cluster(*mpi_args: str, run_dir: Path, extra: tuple[str, ...] = (),
                private: Path | None = None, timeout: float = 120) -> str:
    """``cluster.py run -- mpirun MPI_ARGS python -m dpvit.train TINY --run-dir ...``; fails the
    test with the output unless it succeeds. Returns the output."""
    cmd = [sys.executable, str(CLUSTER), "run",
           *(["--private", str(private)] if private else []), "--",
           mpirun(), *mpi_args, sys.executable, "-m", "dpvit.train", *TINY_ARGS,
           "--run-dir", str(run_dir), *extra]
    env = {**os.environ, "DPVIT_DATA_DIR": str(real_data_dir())}
    # a session of its own: on a timeout the whole job (mpirun too) goes; ranks left on the
    # hosts go with the cluster
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"cluster job timed out after {timeout} s:\n{out[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"cluster job failed ({proc.returncode}):\n{out[-3000:]}")
    return out


def _assert_same_params(path: Path, reference: Path, what: str) -> None:
    params, ref = load_params(path), load_params(reference)
    assert params.keys() == ref.keys()
    for name, value in ref.items():
        np.testing.assert_allclose(params[name], value, rtol=1e-10, atol=1e-13,
                                   err_msg=f"{name}: {what}")


@pytest.fixture(scope="module")
def two_by_two(cluster, tmp_path_factory):
    """12 float64 steps on 2 hosts x 2 ranks; the link bytes the job moved."""
    run = tmp_path_factory.mktemp("cluster") / "2x2"
    before = _link_bytes()
    _on_cluster("-n", "4", "-ppn", "2", run_dir=run, extra=(*FLOAT64, "--max-steps", "12"))
    after = _link_bytes()
    moved = [(a[0] - b[0], a[1] - b[1]) for a, b in zip(after, before, strict=True)]
    return run, moved


def test_two_hosts_equal_one_process_and_talk_over_the_links(two_by_two, tmp_path):
    """2 hosts x 2 ranks match one process with one thread at the same global batch (32), and
    the gradients crossed the links: every step's Allreduce must bring each host the other
    host's share of every gradient entry, so at least 12 steps x 3514 parameters x 8 bytes
    (337 KB) go into and out of each host's link. With MPICH's default UCX netmod, which
    reaches the other namespace through shared memory, only Hydra's control traffic (some KB)
    crosses."""
    run, moved = two_by_two
    reference = tmp_path / "one"
    train(reference, *FLOAT64, "--max-steps", "12", threads=1)
    _assert_same_params(run / "checkpoints" / "last.h5",
                        reference / "checkpoints" / "last.h5", "2 hosts x 2 ranks")
    params = load_params(reference / "checkpoints" / "last.h5")
    gradient_bytes = sum(v.size for v in params.values()) * 8
    floor = 12 * gradient_bytes
    for host, (into, out) in zip(HOSTS, moved, strict=True):
        assert into >= floor and out >= floor, (
            f"{host}: {into} bytes in, {out} out over its link; a TCP Allreduce moves at "
            f"least {floor} each way")
    assert (run / ".lock").read_text().strip().endswith("on dpvit-h0"), "rank 0 not on h0"


def test_only_rank_0_writes_files(cluster, tmp_path):
    """Every file of a run (config, metrics, checkpoints, report, lock) comes from rank 0.

    With one file system every rank sees, a file does not tell which rank wrote it; so here
    each host gets its own copy of the directory holding the run (`run --private`, a bind
    mount on each host, like a node-local disk), and rank 0 runs on host 0, rank 1 on host 1
    (one rank per host). A file or directory that rank 1 created, even one that rank 0
    overwrote later, is left in host 1's copy, which must stay empty; the job must still
    succeed, since no rank but 0 needs the run directory of a fresh run. Host 0's copy holds
    every output."""
    local = tmp_path / "local"
    run = local / "run"
    _on_cluster("-n", "2", "-ppn", "1", run_dir=run, private=local,
                extra=("--max-steps", "4", "--checkpoint-every", "2", "--keep", "3"))
    on_h0, on_h1 = (STATE / "private" / host / local.resolve().relative_to("/")
                    for host in HOSTS)
    assert on_h1.is_dir(), "host 1 ran without its own copy"
    written = sorted(str(p.relative_to(on_h0)) for p in on_h0.rglob("*"))
    for expected in ("run/.lock", "run/config.json", "run/metrics.jsonl",
                     "run/checkpoints/last.h5", "run/checkpoints/step-2.h5",
                     "run/report/report.json"):
        assert expected in written, f"{expected} missing on host 0: {written}"
    assert (on_h0 / "run" / ".lock").read_text().strip().endswith("on dpvit-h0")
    by_others = sorted(str(p.relative_to(on_h1)) for p in on_h1.rglob("*"))
    assert by_others == [], f"ranks on host 1 wrote {by_others}"
    assert list(local.iterdir()) == [], "the launching machine's own copy was written"


def test_resume_on_one_host_equals_the_uninterrupted_two_host_run(two_by_two, tmp_path):
    """A 2 hosts x 2 ranks run stopped after 6 steps continues with `--resume auto` as one
    host x 2 ranks to step 12: the parameters equal the uninterrupted 2 x 2 run's."""
    straight, _ = two_by_two
    run = tmp_path / "moved"
    _on_cluster("-n", "4", "-ppn", "2", run_dir=run, extra=(*FLOAT64, "--max-steps", "6"))
    before = _link_bytes()
    out = _on_cluster("-hosts", HOSTS[0], "-n", "2", run_dir=run,
                      extra=(*FLOAT64, "--max-steps", "12", "--resume", "auto"))
    assert "saved by 4 rank(s)" in out
    into_h1 = _link_bytes()[1][0] - before[1][0]
    gradient_bytes = sum(v.nbytes for v in load_params(run / "checkpoints" / "last.h5").values())
    assert into_h1 < gradient_bytes, f"{into_h1} bytes went to host 1: not 1 host x 2 ranks"
    _assert_same_params(run / "checkpoints" / "last.h5", straight / "checkpoints" / "last.h5",
                        "resumed on 1 host x 2 ranks")


def test_the_hostfile_example_runs_as_documented(cluster, tmp_path):
    """launch/hostfile.example with its placeholder names replaced by the emulated hosts runs
    the command its "Use with:" line documents (tiny model, 2 steps), with ranks on both."""
    example = (REPO / "launch" / "hostfile.example").read_text()
    usage = next(line.split("Use with:", 1)[1].split() for line in example.splitlines()
                 if "Use with:" in line)
    placeholders = [line.split(":")[0] for line in example.splitlines()
                    if line.strip() and not line.startswith("#")]
    assert len(placeholders) == len(HOSTS), placeholders
    for placeholder, host in zip(placeholders, HOSTS, strict=True):
        example = example.replace(placeholder, host)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(example)
    py = usage.index("python")
    assert usage[:2] == ["mpirun", "-f"] and usage[py:py + 3] == ["python", "-m", "dpvit.train"]
    assert "--run-dir" in usage[py + 3:], usage
    run = tmp_path / "run"
    before = _link_bytes()
    _on_cluster("-f", str(hostfile), *usage[3:py], run_dir=run, extra=("--max-steps", "4"))
    after = _link_bytes()
    params = load_params(run / "checkpoints" / "last.h5")
    floor = 4 * sum(v.nbytes for v in params.values())  # 4 steps' gradients (float32)
    for host, a, b in zip(HOSTS, after, before, strict=True):
        assert a[0] - b[0] >= floor and a[1] - b[1] >= floor, f"{host}: too few bytes crossed"


def test_hosts_with_different_numbers_of_ranks_train(cluster, tmp_path):
    """1 rank on host 0 and 3 on host 1 (more ranks than this machine's 2 cores there): every
    rank must wait for the gradient the same way, since MPI never matches a blocking
    Allreduce with a nonblocking Iallreduce; a mismatch hangs in the first step, which the
    collective deadline turns into a failure within seconds."""
    run = tmp_path / "run"
    _on_cluster("-hosts", f"{HOSTS[0]}:1,{HOSTS[1]}:3", "-n", "4", run_dir=run,
                extra=("--max-steps", "3", "--collective-timeout", "20"), timeout=90)
    assert (run / "checkpoints" / "last.h5").is_file()


def _namespace_pids(host: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", host], capture_output=True, text=True,
                         timeout=10).stdout
    return [int(p) for p in out.split()]


def test_a_host_that_loses_its_link_ends_the_job(cluster, tmp_path):
    """Host 1's link goes down mid-run (2 hosts x 1 rank, --collective-timeout 4): within the
    timeout + 15 s the job has ended with an error, rank 0's one line names rank 1 as silent,
    and no process is left on either host; the launcher (mpirun, on the launching machine)
    has returned too."""
    run = tmp_path / "run"
    cmd = [sys.executable, str(CLUSTER), "run", "--", mpirun(), "-n", "2", "-ppn", "1",
           sys.executable, "-m", "dpvit.train", *TINY_ARGS, "--train-subset", "60000",
           "--log-every", "20", "--collective-timeout", "4", "--run-dir", str(run)]
    env = {**os.environ, "DPVIT_DATA_DIR": str(real_data_dir())}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").stat().st_size:
            assert proc.poll() is None, f"the job ended early: {proc.stdout.read()[-2000:]}"
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        subprocess.run(["ip", "link", "set", LINKS[1], "down"], check=True, timeout=10)
        cut = time.monotonic()
        try:
            out, _ = proc.communicate(timeout=4 + 15)
        except subprocess.TimeoutExpired:
            pytest.fail("the job did not end within --collective-timeout + 15 s")
        took = time.monotonic() - cut
    finally:
        subprocess.run(["ip", "link", "set", LINKS[1], "up"], check=False, timeout=10)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    errors = [line for line in out.splitlines() if "error: rank" in line]
    assert proc.returncode != 0 and took < 4 + 15
    assert any("[rank 0/2] error: rank 0 waited" in e and "rank(s) [1] did not answer" in e
               for e in errors), out[-3000:]
    time.sleep(1)
    assert _namespace_pids(HOSTS[0]) == [] and _namespace_pids(HOSTS[1]) == [], "processes left"
