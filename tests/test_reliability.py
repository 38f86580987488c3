"""Faults a long job meets, each injected into real processes: signals, killed ranks, a crash
mid-write, damaged checkpoints, divergence, a bad run directory, mismatched ranks, two jobs
on one directory (the table in README.md, "Reliability", is what these tests back).

Runs use the tiny model on a few hundred real MNIST images; a job that must be interrupted
mid-run trains for many epochs (``LONG``) and is signalled once its log shows training steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import REPO, TINY_ARGS, mpirun, real_data_dir, run_dpvit, train, under_ci
from test_checkpoint import _damage

from dpvit.checkpoint import find_resume_checkpoint, load_checkpoint, save_checkpoint
from dpvit.checkpoint.seal import seal
from dpvit.errors import AgreedError

LONG = ["--epochs", "1000", "--log-every", "1", "--checkpoint-every", "4"]


def _start(run_dir: Path, *extra: str, ranks: int = 2) -> tuple[subprocess.Popen, Path]:
    """Start a tiny training job in the background; stderr goes to ``run_dir``.log."""
    log = run_dir.with_suffix(".log")
    cmd = [mpirun(), "-n", str(ranks), sys.executable, "-m", "dpvit.train", *TINY_ARGS,
           "--run-dir", str(run_dir), *extra]
    env = {**os.environ, "DPVIT_DATA_DIR": str(real_data_dir())}
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    return proc, log


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"never saw {text!r}:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc), e.g. mpirun's proxy and ranks."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _ranks(proc: subprocess.Popen) -> list[int]:
    """The rank processes of an mpirun job (python processes below the launcher)."""
    pids = [p for p in _descendants(proc.pid)
            if "dpvit.train" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
    with_rank = {}
    for pid in pids:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next(int(v.split(b"=")[1]) for v in env if v.startswith(b"PMI_RANK="))
        with_rank[rank] = pid
    return [with_rank[r] for r in sorted(with_rank)]


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _steps_in(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.h5"))


# -- 1. preemption ---------------------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_stops_at_a_step_boundary_and_resume_loses_nothing(tmp_path, sig):
    """SIGTERM/SIGINT to mpirun (forwarded to every rank) -> checkpoint of the last step,
    exit 128+signal; resuming then gives bitwise the parameters of an uninterrupted run."""
    run = tmp_path / "run"
    proc, log = _start(run, *LONG, "--checkpoint-every", "0")
    _wait_for(log, "step 11/", proc)
    family = _descendants(proc.pid)  # listed now: once mpirun is gone, orphans have new parents
    assert len(_ranks(proc)) == 2 and set(_ranks(proc)) <= set(family)
    sent = time.monotonic()
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == 128 + sig
    ended = time.monotonic() - sent
    while any(_running(p) for p in family) and time.monotonic() - sent < 10:
        time.sleep(0.02)
    assert not [p for p in family if _running(p)], "processes left behind after mpirun exited"
    out = log.read_text()
    stops = [line for line in out.splitlines() if f"stopped by {sig.name}" in line]
    assert len(stops) == 1 and "[rank 0/2] warning:" in stops[0], out
    step = int(stops[0].split("after step ")[1].split(";")[0])
    assert step >= 11 and ended < 10
    assert load_checkpoint(run / "checkpoints" / "last.h5").step == step
    if sig == signal.SIGINT:
        return  # the same stop as SIGTERM; comparing with a straight run once is enough
    train(run, *LONG, "--max-steps", str(step + 3), "--resume", "auto", ranks=2)
    train(tmp_path / "straight", *LONG, "--max-steps", str(step + 3), ranks=2)
    a = load_checkpoint(run / "checkpoints" / "last.h5")
    b = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.h5")
    assert a.step == b.step == step + 3
    for name in b.params:
        assert a.params[name].tobytes() == b.params[name].tobytes(), name


def test_second_signal_stops_at_once():
    """The first SIGINT only sets the flag; the second raises KeyboardInterrupt right away."""
    from dpvit.training.guard import StopSignals

    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_stop_votes_summed_over_ranks_agree_on_one_signal():
    """Each rank votes for the signal it received; the summed votes name the same signal on
    every rank, SIGTERM winning over SIGINT as the larger number."""
    from dpvit.training.guard import StopSignals, agreed_signal, stop_votes

    def votes(*signals):
        ranks = []
        for signum in signals:
            stop = StopSignals()
            stop.signum = signum
            ranks.append(stop_votes(stop))
        return np.sum(ranks, axis=0)

    assert agreed_signal(votes(0, 0, 0)) == 0 and agreed_signal(stop_votes(None)) == 0
    assert agreed_signal(votes(0, signal.SIGINT, 0)) == signal.SIGINT
    assert agreed_signal(votes(signal.SIGINT, signal.SIGTERM, signal.SIGINT)) == signal.SIGTERM


# -- 2. a killed rank ------------------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("victim", ["rank 0", "rank 1", "mpirun"])
def test_sigkill_ends_the_whole_job_and_resume_continues(tmp_path, victim):
    """SIGKILL to a rank (Hydra kills the others) or to mpirun itself (its proxy ends the
    ranks): every process is gone within 30 s and --resume auto continues."""
    run = tmp_path / "run"
    proc, log = _start(run, *LONG)
    _wait_for(log, "saved checkpoint", proc)
    _wait_for(log, "step 14/", proc)
    pids = _ranks(proc)
    family = _descendants(proc.pid)
    assert len(pids) == 2
    killed = time.monotonic()
    os.kill(proc.pid if victim == "mpirun" else pids[int(victim[-1])], signal.SIGKILL)
    assert proc.wait(timeout=30) != 0
    while any(_running(p) for p in family) and time.monotonic() - killed < 30:
        time.sleep(0.02)
    ended = time.monotonic() - killed
    assert not any(_running(p) for p in family), f"left behind after {ended:.1f} s"
    newest = _steps_in(run)[-1]
    result = train(run, *LONG, "--max-steps", str(newest + 2), "--resume", "auto")
    assert f"resuming from {run}/checkpoints/step-{newest}.h5" in result.stderr


# -- 3. a crash while writing a checkpoint -----------------------------------------------------

WRITER = """
import sys, numpy as np
from dpvit.checkpoint import Checkpoint, find_resume_checkpoint, load_checkpoint, save_rolling
last = find_resume_checkpoint(sys.argv[1])
start = 1 if last is None else load_checkpoint(last).step + 1
big = np.random.default_rng(0).random(4_000_000, dtype=np.float32)  # 16 MB per file
for step in range(start, start + 10_000):
    save_rolling(sys.argv[1], Checkpoint(params={"w": big}, step=step), keep=2, is_best=False)
    print(step, flush=True)
"""


def test_writer_killed_at_random_moments_never_leaves_a_bad_checkpoint(tmp_path):
    """A process saving large checkpoints in a loop is SIGKILLed mid-write, three times."""
    rng = np.random.default_rng(0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], env=env,
                                stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # one save done: the next is under way
        time.sleep(rng.uniform(0, 0.2))
        proc.kill()
        proc.wait(timeout=30)
        names = [p.name for p in tmp_path.iterdir()]
        finals = [n for n in names if ".tmp-" not in n]
        for name in finals:
            load_checkpoint(tmp_path / name)  # every file under a final name is complete
        newest = max(load_checkpoint(tmp_path / n).step for n in finals)
        assert load_checkpoint(find_resume_checkpoint(tmp_path)).step == newest


# -- 4. damaged checkpoints through the command line ----------------------------------------------

def _one_error(result: subprocess.CompletedProcess) -> str:
    errors = [ln for ln in result.stderr.splitlines() if " error: " in ln]
    assert result.returncode == 1 and len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("saved") / "run"
    train(run, "--max-steps", "8", "--checkpoint-every", "4")
    return run


@pytest.mark.parametrize(("how", "message"), [
    ("truncated", "truncated"),
    ("flipped", "is damaged: its SHA-256 digest does not match"),
    ("missing_dataset", "missing dataset /params/cls_token"),
    ("wrong_shape", "/params/head.weight should have shape (10, 16) for its model config but "
                    "has shape (10, 8)"),
])
def test_damaged_checkpoint_given_by_path(saved_run, tmp_path, how, message):
    path = tmp_path / "step-4.h5"
    path.write_bytes((saved_run / "checkpoints" / "step-4.h5").read_bytes())
    if how == "wrong_shape":  # a consistent file (valid digest) whose arrays do not fit its config
        ckpt = load_checkpoint(path)
        ckpt.params["head.weight"] = ckpt.params["head.weight"][:, :8].copy()
        save_checkpoint(path, ckpt)
    else:
        _damage(path, how)
    if how == "missing_dataset":
        seal(path)  # as a buggy writer would have left it, past the whole-file digest
    line = _one_error(run_dpvit("train", [*TINY_ARGS, "--run-dir", str(tmp_path / "r"),
                                          "--resume", str(path)], timeout=60))
    assert str(path) in line and message in line, line


def test_model_flag_conflicting_with_the_checkpoint_names_the_file(saved_run, tmp_path):
    path = saved_run / "checkpoints" / "step-4.h5"
    line = _one_error(run_dpvit("train", ["--run-dir", str(tmp_path / "r"), "--resume", str(path),
                                          "--depth", "3"], timeout=60))
    assert "depth=3 conflicts with the checkpoint's depth=1" in line and str(path) in line


def test_resume_auto_skips_a_damaged_newest_checkpoint(saved_run, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("step-4.h5", "step-8.h5"):
        (run / "checkpoints" / name).write_bytes((saved_run / "checkpoints" / name).read_bytes())
    _damage(run / "checkpoints" / "step-8.h5", "flipped")
    result = train(run, "--max-steps", "10", "--resume", "auto")
    assert f"warning: skipping checkpoint {run}/checkpoints/step-8.h5" in result.stderr
    assert f"resuming from {run}/checkpoints/step-4.h5 (step 4" in result.stderr


# -- 5. non-finite values --------------------------------------------------------------------------

@pytest.mark.mpi
def test_divergence_skips_steps_then_stops_and_keeps_the_last_checkpoint(tmp_path):
    """--lr 1e30 on a resumed run: every rank skips the same NaN steps and stops together."""
    run = tmp_path / "run"
    train(run, "--max-steps", "8", ranks=2)
    result = run_dpvit("train", [*TINY_ARGS, "--run-dir", str(run), "--resume", "auto",
                                 "--lr", "1e30", "--max-steps", "40"], ranks=2, timeout=60)
    line = _one_error(result)
    assert "[rank 0/2]" in line and "5 steps in a row had a non-finite loss" in line
    assert "BAD TERMINATION" not in result.stdout + result.stderr  # a clean exit, not an abort
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r["kind"] == "skipped"]
    assert [r["in_a_row"] for r in skipped] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "best.h5", "last.h5", "step-8.h5"]
    assert all(np.isfinite(v).all() for v in load_checkpoint(run / "checkpoints/last.h5")
               .params.values())


def _trainer(run_dir: Path, *extra: str):
    from dpvit.config import load_config
    from dpvit.parallel.comm import LocalComm
    from dpvit.training.trainer import Trainer

    cfg, _ = load_config([*TINY_ARGS, "--data-dir", str(real_data_dir()), *extra])
    return Trainer(cfg, LocalComm(), run_dir)


def test_nan_batch_is_skipped_and_training_continues(tmp_path):
    """In process: a batch with a NaN pixel leaves parameters and optimizer state untouched."""
    trainer = _trainer(tmp_path, "--max-bad-steps", "2")
    idx = np.arange(32)
    x = ((trainer.train_x[idx] / 255.0 - 0.13) / 0.31)[:, None].astype(np.float32)
    y = trainer.train_y[idx]
    before = trainer.store.flat_params.copy()
    bad = x.copy()
    bad[3, 0, 5, 5] = np.nan
    stats = trainer.train_step(idx, bad, y)
    assert stats["skipped_steps"] == 1 and np.isnan(stats["loss"])
    assert np.array_equal(trainer.store.flat_params, before) and trainer.optimizer.steps == 0
    assert trainer.train_step(idx, x, y)["skipped_steps"] == 1
    assert not np.array_equal(trainer.store.flat_params, before)
    trainer.train_step(idx, bad, y)
    with pytest.raises(AgreedError, match="2 steps in a row had a non-finite"):
        trainer.train_step(idx, bad, y)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record == {"kind": "skipped", "step": 1, "epoch": 0, "loss": "nan",
                      "grad_norm": "nan", "in_a_row": 1}


def test_a_checkpoint_never_holds_non_finite_values(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.optimizer.state["exp_avg_sq"][7] = np.inf  # e.g. a squared gradient overflowed
    with pytest.raises(AgreedError, match="the optimizer exp_avg_sq became non-finite"):
        trainer.save(is_best=False)
    assert not (tmp_path / "checkpoints").exists()


# -- 6. bad environment ----------------------------------------------------------------------------

@pytest.mark.mpi
def test_run_dir_that_cannot_be_created(tmp_path):
    (tmp_path / "file.txt").write_text("a regular file\n")
    run = tmp_path / "file.txt" / "run"
    result = run_dpvit("train", [*TINY_ARGS, "--run-dir", str(run)], ranks=2, timeout=60)
    line = _one_error(result)
    assert f"run directory {run} is not usable: Not a directory" in line
    assert "BAD TERMINATION" not in result.stdout + result.stderr


@pytest.mark.mpi
def test_full_run_dir_is_found_before_training(tmp_path):
    mount = tmp_path / "tiny-fs"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        reason = f"cannot mount a tmpfs here ({mounted.stderr.strip()}; needs root)"
        if under_ci():  # CI runs as root: there the test must run, not skip
            pytest.fail(f"{reason}; CI must run the tests as root", pytrace=False)
        pytest.skip(reason)
    try:
        result = run_dpvit("train", [*TINY_ARGS, "--run-dir", str(mount / "run")], ranks=2,
                           timeout=60)
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    assert "No space left on device" in _one_error(result)
    assert "training" not in result.stderr


def _mpmd(*commands: list[str]) -> subprocess.CompletedProcess:
    """``mpirun -n 1 CMD0 : -n 1 CMD1 ...``: one rank per command."""
    cmd = [mpirun()]
    for i, command in enumerate(commands):
        cmd += [*([":"] if i else []), "-n", "1", *command]
    env = {**os.environ, "DPVIT_DATA_DIR": str(real_data_dir())}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=REPO)


@pytest.mark.mpi
def test_ranks_started_with_different_flags(tmp_path):
    base = [sys.executable, "-m", "dpvit.train", *TINY_ARGS, "--run-dir", str(tmp_path / "r")]
    line = _one_error(_mpmd([*base, "--lr", "0.1"], [*base, "--lr", "0.2"]))
    assert "rank(s) [1] were started with a different configuration" in line
    assert "train.lr=0.2 (rank 0: 0.1)" in line


@pytest.mark.mpi
def test_ranks_running_different_dpvit_versions(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "dpvit").symlink_to(REPO / "dpvit")
    (other / "sitecustomize.py").write_text("import dpvit\ndpvit.__version__ = '9.9.9'\n")
    base = [sys.executable, "-m", "dpvit.train", *TINY_ARGS, "--run-dir", str(tmp_path / "r")]
    line = _one_error(_mpmd(base, ["env", f"PYTHONPATH={other}", *base]))
    assert "dpvit_version='9.9.9' (rank 0: '0.1.0')" in line


@pytest.mark.mpi
def test_second_job_on_the_same_run_dir_is_refused(tmp_path):
    run = tmp_path / "run"
    first, log = _start(run, *LONG)
    try:
        _wait_for(log, "step 2/", first)
        holder = _ranks(first)[0]
        result = run_dpvit("train", [*TINY_ARGS, "--run-dir", str(run)], ranks=2, timeout=60)
        line = _one_error(result)
        assert f"run directory {run} is in use by another dpvit job (pid {holder} on" in line
        assert first.poll() is None  # the first job is unaffected
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 143
    with h5py.File(run / "checkpoints" / "last.h5") as f:  # written by the first job only
        assert f.attrs["world_size"] == 2
    train(run, "--resume", "auto", "--max-steps", "40", *LONG)  # the lock died with its holder
