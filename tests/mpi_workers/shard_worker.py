"""MPI worker for tests/test_shard.py: `mpirun -n N python shard_worker.py MODE`.

Modes (each prints "OK" on rank 0 when every check passed on every rank):
    collectives: the vector collectives of the sharded optimizer (reduce-scatter, in-place
        allgather, gather and scatter) on uneven blocks, against sums and copies done by hand.
    nonfinite: a sharded step whose gradient is NaN on one rank's input only is refused on
        every rank alike and changes nothing; the next finite step updates every rank alike;
        a non-finite optimizer slice on one rank stops every rank before a checkpoint.
"""

import math
import sys
import traceback

import numpy as np

from dpvit.errors import AgreedError
from dpvit.nn.losses import CrossEntropyLoss
from dpvit.optim import AdamW
from dpvit.parallel.comm import init_comm
from dpvit.parallel.shard import Shard
from dpvit.training.nonfinite import check_finite
from dpvit.training.step import TrainStep
from dpvit.vit import VisionTransformer, ViTConfig


def collectives(comm) -> None:
    numel = 10 * comm.size + 1  # uneven blocks
    shard = Shard.of(numel, comm.rank, comm.size)
    rows = [np.random.default_rng(r).standard_normal(numel) for r in range(comm.size)]
    mine = rows[comm.rank].copy()
    comm.reduce_scatter_sum_(mine, shard.counts)
    np.testing.assert_allclose(mine[shard.start : shard.stop],
                               np.sum(rows, axis=0)[shard.start : shard.stop], rtol=1e-14)
    buf = np.full(numel, -1.0)
    buf[shard.start : shard.stop] = comm.rank
    comm.allgatherv_(buf, shard.counts)
    expected = np.repeat(np.arange(comm.size, dtype=float), shard.counts)
    np.testing.assert_array_equal(buf, expected)
    whole = np.empty(numel) if comm.is_root else None
    comm.gatherv(buf[shard.start : shard.stop] * 2, whole, shard.counts)
    if comm.is_root:
        np.testing.assert_array_equal(whole, 2 * expected)
    part = np.empty(shard.counts[comm.rank])
    comm.scatterv(whole if comm.is_root else None, part, shard.counts)
    np.testing.assert_array_equal(part, 2 * comm.rank)


def nonfinite(comm) -> None:
    cfg = ViTConfig(embed_dim=16, depth=1, num_heads=2, patch_size=7)
    model = VisionTransformer(cfg, np.float64, seed=0)
    optimizer = AdamW(model.store, lr=1e-2,
                      shard=Shard.of(model.store.numel, comm.rank, comm.size))
    step = TrainStep(model, comm, optimizer, CrossEntropyLoss(), batch_size=4 * comm.size,
                     grad_clip=1.0, seed=0)
    rng = np.random.default_rng(comm.rank)
    x, y = rng.random((4, 1, 28, 28)), rng.integers(0, 10, 4)
    indices = comm.rank * 4 + np.arange(4)
    before = model.store.flat_params.copy()
    bad = x.copy()
    if comm.rank == comm.size - 1:
        bad[0, 0, 3, 3] = np.nan
    def finite(loss: float, norm: float) -> bool:  # as NonFiniteSteps decides
        return math.isfinite(loss) and math.isfinite(norm)

    refused = step(0, indices, bad, y, 1e-2, may_update=finite)
    assert not refused.updated and np.isnan(refused.grad_norm), refused
    assert np.array_equal(model.store.flat_params, before) and optimizer.steps == 0
    assert not any(v.any() for v in optimizer.state.values())
    taken = step(1, indices, x, y, 1e-2, may_update=finite)
    assert taken.updated and np.isfinite(taken.grad_norm)
    assert not np.array_equal(model.store.flat_params, before)
    comm.check_identical(model.store.flat_params, "parameters after a sharded step")
    norms = comm.allgather_object((taken.grad_norm, taken.loss))
    assert all(n == norms[0] for n in norms), norms  # the same bytes on every rank
    if comm.rank == comm.size - 1:
        optimizer.state["exp_avg_sq"][0] = np.inf
    try:
        check_finite(dict(optimizer.state), 2, comm)
    except AgreedError as err:
        assert "exp_avg_sq" in str(err), err
    else:
        raise AssertionError("a non-finite slice on one rank did not stop every rank")


if __name__ == "__main__":
    comm = init_comm()
    try:
        {"collectives": collectives, "nonfinite": nonfinite}[sys.argv[1]](comm)
    except BaseException:  # one rank's failed check must not leave the others waiting
        traceback.print_exc()
        comm.abort(1)
    if comm.is_root:
        print("OK", flush=True)
