"""Optimizer memory per rank, with and without ``--shard-optimizer``.

    mpirun -n 2 python launch/optimizer_memory.py --dim 384 --depth 12 --heads 6 [--json]

For each mode it builds the model and the optimizer as the trainer does (`build_optimizer`,
`TrainStep`), takes one training step on a synthetic batch (so a sharded step runs its
collectives), and gathers every rank's bytes: the optimizer state (AdamW's two moments) and
everything the optimizer holds (the state, its weight decay mask and its scratch; the sharded
step adds no buffer: it reduce-scatters in place). Rank 0 prints a table (or JSON).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from dpvit.nn.losses import CrossEntropyLoss
from dpvit.optim import build_optimizer
from dpvit.parallel.comm import init_comm
from dpvit.parallel.shard import Shard
from dpvit.training.step import TrainStep
from dpvit.vit import VisionTransformer, ViTConfig


def measure(comm, cfg: ViTConfig, sharded: bool, optimizer: str, batch: int) -> dict:
    model = VisionTransformer(cfg, np.float32, seed=0)
    store = model.store
    shard = Shard.of(store.numel, comm.rank, comm.size) if sharded else None
    opt = build_optimizer(optimizer, store, 1e-3, 0.05, shard=shard)
    step = TrainStep(model, comm, opt, CrossEntropyLoss(), batch_size=batch * comm.size,
                     grad_clip=1.0, seed=0)
    rng = np.random.default_rng(comm.rank)
    x = rng.random((batch, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(np.float32)
    y = rng.integers(0, cfg.num_classes, batch)
    step(0, comm.rank * batch + np.arange(batch), x, y, 1e-3)
    row = {"state": opt.state_nbytes(), "optimizer": opt.nbytes()}
    return {"parameters": store.numel, "ranks": comm.allgather_object(row)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    parser.add_argument("--batch", type=int, default=2, help="images per rank in the step")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    comm = init_comm()
    cfg = ViTConfig(embed_dim=args.dim, depth=args.depth, num_heads=args.heads,
                    patch_size=args.patch_size)
    result = {mode: measure(comm, cfg, mode == "sharded", args.optimizer, args.batch)
              for mode in ("unsharded", "sharded")}
    if not comm.is_root:
        return
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['sharded']['parameters']:,} parameters, {args.optimizer}, "
          f"{comm.size} rank(s); MiB per rank")
    print(f"{'mode':>10} {'rank':>4} {'state':>9} {'optimizer':>10}")
    for mode, found in result.items():
        for rank, row in enumerate(found["ranks"]):
            print(f"{mode:>10} {rank:>4} {row['state'] / 2**20:9.2f} "
                  f"{row['optimizer'] / 2**20:10.2f}")


if __name__ == "__main__":
    main()
