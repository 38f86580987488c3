"""The sharded optimizer (``--shard-optimizer``, `dpvit.parallel.shard`): the same update as
without it, 1/N of the optimizer memory per rank, and checkpoints that resume either way on
any number of ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, TINY_ARGS, assert_bitwise_same_state, mpirun, run_dpvit, train

from dpvit.checkpoint import load_checkpoint
from dpvit.optim import build_optimizer
from dpvit.parallel.shard import Shard
from dpvit.vit import VisionTransformer, ViTConfig

WORKER = Path(__file__).resolve().parent / "mpi_workers" / "shard_worker.py"
MEMORY = REPO / "launch" / "optimizer_memory.py"

#: float64, dropout on, and a clip far below the tiny model's gradient norm (about 4), so
#: every step is clipped by the global norm that the shards agree on.
TRAIN_64 = ["--dtype", "float64", "--drop-rate", "0.1", "--grad-clip", "0.05"]


def run_script(path: Path, *args: str, ranks: int) -> str:
    done = subprocess.run([mpirun(), "-n", str(ranks), sys.executable, str(path), *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def assert_close_state(path_a: Path, path_b: Path, step: int) -> None:
    """Two checkpoints of step ``step`` hold the same parameters and optimizer state to float64
    rounding (the ranks sum in other orders), under the same names, shapes and dtypes."""
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    assert a.step == b.step == step
    assert a.optimizer_scalars == b.optimizer_scalars
    assert a.params.keys() == b.params.keys() and a.optimizer.keys() == b.optimizer.keys()
    pairs = [(f"params {n}", a.params[n], b.params[n]) for n in a.params]
    pairs += [(f"{s} {n}", a.optimizer[s][n], b.optimizer[s][n])
              for s in a.optimizer for n in a.optimizer[s]]
    for what, x, y in pairs:
        assert x.shape == y.shape and x.dtype == y.dtype, what
        np.testing.assert_allclose(y, x, rtol=1e-10, atol=1e-13, err_msg=what)


# -- in one process ---------------------------------------------------------------------------


def test_shards_split_the_buffer_into_contiguous_balanced_blocks():
    shards = [Shard.of(10, r, 3) for r in range(3)]
    assert shards[0].counts == (4, 3, 3)
    assert [(s.start, s.stop) for s in shards] == [(0, 4), (4, 7), (7, 10)]
    assert Shard.of(2, 2, 3).counts == (1, 1, 0)


@pytest.mark.parametrize("name,kwargs", [("adamw", {}), ("sgd", {"nesterov": True}),
                                         ("sgd", {"momentum": 0.0})])
def test_shards_take_the_unsharded_step_element_for_element(name, kwargs):
    """Given the same summed gradient, three shards' updates put together are the unsharded
    update bit for bit: the weight decay mask is cut with the state (the shards' borders fall
    inside decayed weights and undecayed biases and norms alike)."""
    cfg = ViTConfig(embed_dim=16, depth=2, num_heads=2, patch_size=7)
    rng = np.random.default_rng(0)
    whole = VisionTransformer(cfg, np.float64, seed=0).store
    whole.flat_params[:] = rng.standard_normal(whole.numel)
    stores = [VisionTransformer(cfg, np.float64, seed=0).store for _ in range(3)]
    for store in stores:
        store.flat_params[:] = whole.flat_params
    optimizers = [build_optimizer(name, store, 0.1, 0.3, **kwargs,
                                  shard=Shard.of(store.numel, r, 3))
                  for r, store in enumerate(stores)]
    reference = build_optimizer(name, whole, 0.1, 0.3, **kwargs)
    mask = whole.decay_mask()
    assert all(mask[o.part].any() and not mask[o.part].all() for o in optimizers)
    for _ in range(3):
        grad = rng.standard_normal(whole.numel)
        whole.flat_grads[:] = grad
        reference.step()
        for store, optimizer in zip(stores, optimizers, strict=True):
            store.flat_grads[:] = grad
            optimizer.step()
    together = np.concatenate([s.flat_params[o.part] for s, o in zip(stores, optimizers,
                                                                    strict=True)])
    assert together.tobytes() == whole.flat_params.tobytes()
    for state, value in reference.state.items():
        parts = np.concatenate([o.state[state] for o in optimizers])
        assert parts.tobytes() == value.tobytes(), state


def test_a_shard_holds_a_slice_of_the_state_and_loads_its_slice_of_a_checkpoint():
    store = VisionTransformer(ViTConfig(embed_dim=16, depth=1, num_heads=2, patch_size=7),
                              np.float32, seed=0).store
    whole = build_optimizer("adamw", store, 1e-3, 0.05)
    shard = Shard.of(store.numel, 1, 3)
    part = build_optimizer("adamw", store, 1e-3, 0.05, shard=shard)
    # the moments, the decay mask and the scratch: a third each, to one float32 value
    assert part.nbytes() <= whole.nbytes() / 3 + 4 * 4
    saved = {n: np.arange(store.numel, dtype=np.float32) + i
             for i, n in enumerate(whole.state_names)}
    part.load_state_dict(saved, {"steps": 7})
    for name, value in saved.items():
        np.testing.assert_array_equal(part.state[name], value[shard.start : shard.stop])
    assert part.steps == 7


@pytest.mark.parametrize("args,message", [
    (["--shard-optimizer", "--bucket-mb", "1"],
     "--shard-optimizer cannot be combined with --bucket-mb or --grad-compression"),
    (["--shard-optimizer", "--grad-compression", "bf16"],
     "--shard-optimizer cannot be combined with --bucket-mb or --grad-compression"),
])
def test_combinations_that_sharding_does_not_support_are_one_clear_line(args, message):
    result = run_dpvit("train", args, timeout=60)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and message in errors[0], result.stderr


def test_resuming_a_bucketed_run_sharded_is_refused_in_one_line(tmp_path):
    """The saved --bucket-mb of a resumed run meets --shard-optimizer given now."""
    run = tmp_path / "run"
    train(run, "--max-steps", "1", "--bucket-mb", "0.01")
    result = run_dpvit("train", [*TINY_ARGS, "--run-dir", str(run), "--resume", "auto",
                                 "--max-steps", "2", "--shard-optimizer"], timeout=60)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "--shard-optimizer cannot be combined" in errors[0]


# -- across ranks -----------------------------------------------------------------------------


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["collectives", "nonfinite"])
@pytest.mark.parametrize("ranks", [2, 3])
def test_worker(mode, ranks):
    """The vector collectives on uneven blocks; a NaN on one rank's input is refused by every
    rank; a non-finite slice on one rank stops every rank before a checkpoint."""
    assert run_script(WORKER, mode, ranks=ranks) == "OK"


@pytest.mark.mpi
@pytest.mark.parametrize("ranks,optimizer", [(2, "adamw"), (3, "adamw"), (3, "sgd")])
def test_sharded_equals_unsharded_on_the_same_ranks(tmp_path, ranks, optimizer):
    """float64: parameters and optimizer state after 6 clipped steps within 1e-10 of the
    unsharded run on as many ranks (the gradient is summed in another order)."""
    extra = [*TRAIN_64, "--max-steps", "6", "--optimizer", optimizer,
             *(["--nesterov"] if optimizer == "sgd" else [])]
    train(tmp_path / "plain", *extra, ranks=ranks)
    train(tmp_path / "sharded", *extra, "--shard-optimizer", ranks=ranks)
    assert_close_state(tmp_path / "plain" / "checkpoints" / "last.h5",
                       tmp_path / "sharded" / "checkpoints" / "last.h5", 6)


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_each_rank_holds_one_nth_of_the_optimizer_state(ranks):
    """Bytes of the moment arrays each rank holds after a real step: 1/N of the unsharded
    state, to one value per moment."""
    out = json.loads(run_script(MEMORY, "--dim", "16", "--depth", "1", "--heads", "2",
                                "--patch-size", "7", "--json", ranks=ranks))
    whole = out["unsharded"]["ranks"][0]["state"]
    assert whole == 2 * 4 * out["unsharded"]["parameters"]  # AdamW's two float32 moments
    sharded = [row["state"] for row in out["sharded"]["ranks"]]
    assert sum(sharded) == whole
    assert max(sharded) <= whole / ranks + 2 * 4


@pytest.mark.mpi
def test_checkpoints_resume_across_sharding_and_rank_counts(tmp_path):
    """A sharded run's checkpoint is an unsharded run's (to float64 rounding); it resumes
    unsharded on 1 and 3 ranks and sharded on its own 2 ranks (bit for bit), and an
    unsharded checkpoint resumes sharded on 3 ranks; every run ends where the uninterrupted
    unsharded run ends."""
    steps = [*TRAIN_64, "--max-steps", "10", "--checkpoint-every", "4"]
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    train(plain, *steps, ranks=2)
    train(sharded, *steps, "--shard-optimizer", ranks=2)
    assert_close_state(plain / "checkpoints" / "step-4.h5",
                       sharded / "checkpoints" / "step-4.h5", 4)
    reference = plain / "checkpoints" / "last.h5"
    resumes = [("unsharded1", sharded, ["--shard-optimizer", "false"], None),
               ("unsharded3", sharded, ["--shard-optimizer", "false"], 3),
               ("sharded2", sharded, [], 2),
               ("sharded3", plain, ["--shard-optimizer"], 3)]
    for name, source, flags, ranks in resumes:
        run = tmp_path / name
        result = train(run, "--resume", str(source / "checkpoints" / "step-4.h5"), *flags,
                       ranks=ranks)
        assert "resuming from" in result.stderr
        saved = json.loads((run / "config.json").read_text())["train"]
        assert saved["shard_optimizer"] == name.startswith("sharded"), name
        assert_close_state(reference, run / "checkpoints" / "last.h5", 10)
    assert_bitwise_same_state(sharded / "checkpoints" / "last.h5",
                              tmp_path / "sharded2" / "checkpoints" / "last.h5", 10)
