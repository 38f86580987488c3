"""Bucketed, overlapped and compressed gradient allreduce (`dpvit.parallel.gradsync`)."""

from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, assert_bitwise_same_state, load_params, missing, mpirun, train

from dpvit.checkpoint import load_checkpoint
from dpvit.nn.losses import CrossEntropyLoss
from dpvit.optim import AdamW
from dpvit.parallel.comm import LocalComm
from dpvit.parallel.gradsync import Codec, GradSync, bf16_bits, bf16_value, bucket_bounds
from dpvit.training.step import TrainStep
from dpvit.vit import VisionTransformer, ViTConfig

WORKER = Path(__file__).resolve().parent / "mpi_workers" / "gradsync_worker.py"


def worker(mode: str, ranks: int) -> str:
    done = subprocess.run([mpirun(), "-n", str(ranks), sys.executable, str(WORKER), mode],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


# -- encodings ----------------------------------------------------------------------------------

#: float32 bit patterns -> bfloat16 bit patterns, worked out by hand (round to nearest even on
#: bit 16): exact, below half, exactly half with an even/odd kept bit, above half, the carry
#: into the exponent, the largest float32 (rounds to inf), inf, and a negative value.
BF16_TABLE = [
    (0x3F800000, 0x3F80),  # 1.0
    (0x3F807FFF, 0x3F80),  # below half: down
    (0x3F808000, 0x3F80),  # half, kept bit 0 (even): down
    (0x3F818000, 0x3F82),  # half, kept bit 1 (odd): up
    (0x3F808001, 0x3F81),  # above half: up
    (0x3FFFFFFF, 0x4000),  # carries into the exponent: 2.0
    (0x7F7FFFFF, 0x7F80),  # float32 max rounds to inf
    (0x7F800000, 0x7F80),  # inf
    (0xC0490FDB, 0xC049),  # -pi
    (0x00000001, 0x0000),  # the smallest subnormal rounds to +0
]


def test_bf16_rounding_matches_a_hand_computed_table():
    bits = np.array([b for b, _ in BF16_TABLE], dtype=np.uint32)
    expected = np.array([e for _, e in BF16_TABLE], dtype=np.uint16)
    np.testing.assert_array_equal(bf16_bits(bits.view(np.float32)), expected)
    assert np.isnan(bf16_value(bf16_bits(np.array([np.nan], np.float32))))[0]


def test_bf16_rounding_matches_torch():
    if importlib.util.find_spec("torch") is None:
        missing("PyTorch (the test reference)", "pip install torch")
    import torch
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(200_000) * 10.0 ** rng.uniform(-40, 38, 200_000)).astype(np.float32)
    x[:4] = [np.inf, -np.inf, 3.4e38, -0.0]
    ours = bf16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_codec_keeps_small_gradients_and_huge_ones(kind):
    rows = np.array([[1e-9, -3e-12, 2e-10, 0.0], [4e4, -1e5, 7.0, 1e-3],
                     [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    _, decoded = Codec(kind).round_trip(rows)
    peak = np.abs(rows).max(axis=1, keepdims=True)
    bound = (2.0**-8 if kind == "bf16" else 2.0**-11) * np.maximum(np.abs(rows), 2**-24 * peak)
    assert np.all(np.abs(decoded - rows) <= bound)
    assert np.all(decoded[0, :3] != 0)  # fp16's scale: 1e-9 does not flush to zero


def test_buckets_cover_the_buffer_from_its_end():
    bounds = bucket_bounds(205_962, 4, 0.25)
    assert bounds[0][1] == 205_962 and bounds[-1][0] == 0
    assert all(a[0] == b[1] for a, b in itertools.pairwise(bounds))
    assert bucket_bounds(1000, 4, 0) == [(0, 1000)]


# -- error feedback -----------------------------------------------------------------------------


def _compressed_sum(kind: str, steps: int, feedback: bool) -> tuple[np.ndarray, np.ndarray]:
    """(sum of the true gradients, sum of what the allreduce delivered) over ``steps``."""
    n = 5000
    buf = np.zeros(n + 2, dtype=np.float32)
    sync = GradSync(LocalComm(), buf, n, bucket_mb=0.004, compression=kind)
    rng = np.random.default_rng(0)
    base = (1.0 + 1e-3 * rng.standard_normal(n)).astype(np.float32)  # below bf16's ulp of 1
    true_sum = np.zeros(n)
    sent_sum = np.zeros(n)
    for _ in range(steps):
        grad = base + 1e-4 * rng.standard_normal(n).astype(np.float32)
        buf[:n] = grad
        sync.begin()
        sync.finish()
        sync.commit(updated=True)
        if not feedback:
            sync.residual[:] = 0
        true_sum += grad
        sent_sum += buf[:n]
    return true_sum, sent_sum


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_error_feedback_makes_the_sum_of_sent_gradients_track_the_true_sum(kind):
    steps = 300
    true_sum, with_feedback = _compressed_sum(kind, steps, feedback=True)
    _, without = _compressed_sum(kind, steps, feedback=False)
    err = np.abs(with_feedback - true_sum).max()
    # with feedback the error stays one rounding (it is the residual), not `steps` of them
    ulp = 2.0**-7 if kind == "bf16" else 2.0**-10
    assert err <= ulp
    assert np.abs(without - true_sum).max() > 10 * err


def test_a_refused_update_keeps_the_previous_residual():
    n = 1000
    buf = np.zeros(n, dtype=np.float32)
    sync = GradSync(LocalComm(), buf, n, bucket_mb=0, compression="bf16")
    buf[:] = 1.001
    sync.begin()
    sync.finish()
    sync.commit(updated=True)
    kept = sync.residual.copy()
    buf[:] = np.inf
    sync.begin()
    sync.finish()
    sync.commit(updated=False)
    np.testing.assert_array_equal(sync.residual, kept)


def test_overlapped_buckets_start_only_on_finished_gradients():
    """Every bucket's values when its allreduce starts are its final local gradients."""
    comm = LocalComm()
    started: list[tuple[np.ndarray, np.ndarray]] = []
    comm.iallreduce_sum_ = lambda buf, channel=0: started.append((buf, buf.copy()))
    cfg = ViTConfig(embed_dim=16, depth=2, num_heads=2, patch_size=7)
    model = VisionTransformer(cfg, np.float64, seed=0)
    step = TrainStep(model, comm, AdamW(model.store, lr=0.0), CrossEntropyLoss(),
                     batch_size=16, grad_clip=0, seed=0, bucket_mb=0.001)
    assert step.overlaps(16)
    rng = np.random.default_rng(0)
    step(0, np.arange(16), rng.random((16, 1, 28, 28)), rng.integers(0, 10, 16), 0.0)
    assert len(started) == len(step.sync.bounds) > 10
    for final, at_start in started:
        np.testing.assert_array_equal(final, at_start)


def test_collectives_in_flight_progress_between_the_layers_of_backward():
    """MPICH moves a nonblocking collective on only inside MPI calls: the step tests the
    buckets in flight between the layers inside each block and the stem, not only between
    blocks. Gradients are the same with and without the ticks."""
    depth = 3
    cfg = ViTConfig(embed_dim=16, depth=depth, num_heads=2, patch_size=4, patch_embed="stem")
    rng = np.random.default_rng(0)
    x, y = rng.random((8, 1, 28, 28)), rng.integers(0, 10, 8)
    grads = []
    for bucket_mb in (0.0005, 0.0):
        comm = LocalComm()
        tests = []
        comm.test = lambda request, tests=tests: tests.append(request) or False  # in flight
        model = VisionTransformer(cfg, np.float64, seed=0)
        step = TrainStep(model, comm, AdamW(model.store, lr=0.0), CrossEntropyLoss(),
                         batch_size=8, grad_clip=0, seed=0, bucket_mb=bucket_mb)
        step(0, np.arange(8), x, y, 0.0)
        grads.append(model.store.grad_buffer[: model.store.numel].copy())
        if bucket_mb:
            # 8 ticks per block (5 MLP layers, 2 in attention, 1 between the branches), 2 in
            # the stem, besides one test per finished part
            assert len(tests) >= 8 * depth + 2 + depth
    np.testing.assert_array_equal(grads[0], grads[1])


# -- across ranks -------------------------------------------------------------------------------


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 4])
def test_bucketed_allreduce_equals_one_allreduce(ranks):
    """MPICH sums each element in the same rank order for a slice as for the whole buffer:
    bit-identical (the worker reports "close <rel>" otherwise, accepted to 1e-10)."""
    out = worker("equal", ranks)
    if out != "bitwise":
        assert out.startswith("close") and float(out.split()[1]) < 1e-10, out


@pytest.mark.mpi
def test_compressed_allreduce_gives_every_rank_the_same_bytes():
    assert worker("compressed", 2) == "OK"


TRAIN_64 = ["--max-steps", "6", "--dtype", "float64", "--drop-rate", "0.1"]


@pytest.mark.mpi
def test_bucketed_n_ranks_equal_one_rank_at_the_same_global_batch(tmp_path):
    """As tests/test_train.py's test, with small buckets (dozens per step) overlapped with
    backward; 2 bucketed ranks also equal 2 unbucketed ranks bit for bit."""
    train(tmp_path / "n1", *TRAIN_64, threads=1)
    reference = load_params(tmp_path / "n1" / "checkpoints" / "last.h5")
    train(tmp_path / "plain2", *TRAIN_64, ranks=2)
    plain = load_params(tmp_path / "plain2" / "checkpoints" / "last.h5")
    for ranks in (2, 4):
        run = tmp_path / f"bucketed{ranks}"
        train(run, *TRAIN_64, "--bucket-mb", "0.001", ranks=ranks)
        params = load_params(run / "checkpoints" / "last.h5")
        for name, value in reference.items():
            np.testing.assert_allclose(params[name], value, rtol=1e-10, atol=1e-13,
                                       err_msg=f"{name} with {ranks} ranks")
            if ranks == 2:
                assert params[name].tobytes() == plain[name].tobytes(), name


@pytest.mark.mpi
def test_compressed_resume_is_bitwise_identical(tmp_path):
    """The error-feedback residuals (one per rank) are in the checkpoint, so stopping and
    resuming changes nothing; an uncompressed checkpoint resumes compressed (zero residual)
    and a compressed one resumes uncompressed."""
    flags = ["--grad-compression", "fp16", "--bucket-mb", "0.002"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(straight, "--max-steps", "12", "--checkpoint-every", "5", *flags, ranks=2)
    train(split, "--max-steps", "5", *flags, ranks=2)
    saved = load_checkpoint(split / "checkpoints" / "last.h5")
    assert {"grad_residual_rank0", "grad_residual_rank1"} <= set(saved.optimizer)
    assert any(np.any(v != 0) for v in saved.optimizer["grad_residual_rank1"].values())
    train(split, "--max-steps", "12", "--resume", "auto", *flags, ranks=2)
    assert_bitwise_same_state(straight / "checkpoints" / "last.h5",
                              split / "checkpoints" / "last.h5", 12)

    plain = tmp_path / "plain"
    train(plain, "--max-steps", "5", ranks=2)
    train(plain, "--max-steps", "8", "--resume", "auto", *flags, ranks=2)
    resumed = load_checkpoint(plain / "checkpoints" / "last.h5")
    assert resumed.step == 8 and "grad_residual_rank0" in resumed.optimizer
    # a resumed run keeps its saved training flags unless given again
    train(split, "--max-steps", "14", "--resume", "auto", "--grad-compression", "none",
          "--bucket-mb", "0", ranks=2)
    assert load_checkpoint(split / "checkpoints" / "last.h5").step == 14
    assert not any(s.startswith("grad_residual")
                   for s in load_checkpoint(split / "checkpoints" / "last.h5").optimizer)


def test_residuals_of_another_world_size_fold_onto_this_one():
    """4 ranks' residuals resumed on 2: rank 1 takes old ranks 1 and 3 (the sum over ranks,
    which error feedback delays, is kept); the same world size gets its own row back."""
    comm = LocalComm()
    comm.rank, comm.size = 1, 2
    sync = GradSync(comm, np.zeros(8, np.float32), 8, bucket_mb=0, compression="fp16")
    saved = np.arange(32, dtype=np.float32).reshape(4, 8)
    sync.load_residuals(saved)
    np.testing.assert_array_equal(sync.residual, saved[1] + saved[3])
    sync.load_residuals(saved[:2])
    np.testing.assert_array_equal(sync.residual, saved[1])
    sync.load_residuals(None)
    assert not sync.residual.any()


def test_bench_comm_mode_reports_every_setting(capsys):
    import json

    from dpvit.bench import run

    run(LocalComm(), ["--comm", "--json", "--steps", "1", "--warmup", "0", "--repeats", "1",
                      "--batch-size", "2", "--depth", "1", "--comm-buckets", "0,0.01",
                      "--comm-compressions", "none,bf16"])
    rows = json.loads(capsys.readouterr().out)["comm"]
    assert [(r["bucket_mb"], r["compression"]) for r in rows] == [
        (0.0, "none"), (0.01, "none"), (0.0, "bf16"), (0.01, "bf16")]
    assert all(r["allreduce_ms"] >= 0 and r["images_per_s"] > 0 for r in rows)
