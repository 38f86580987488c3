"""PyTorch reference ViT that ``python -m dpvit.bench --compare-torch`` times beside dpvit.

A test and benchmark reference only: torch is never a dependency of dpvit. Same shape as the
dpvit default: patch 4 on 28x28 (49 tokens + cls), pre-norm blocks, GELU MLP. Measures
training images/s on CPU (forward, cross-entropy, backward, AdamW on a fixed random batch)
for one process (threads = --threads), or under torch.distributed DDP (gloo) when launched
with torchrun / ``python -m torch.distributed.run``. Prints one line ending in
``images/s=N``, which the benchmark reads.
"""

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d, h, mlp):
        super().__init__()
        self.n1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.n2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, mlp)
        self.fc2 = nn.Linear(mlp, d)
        self.h = h

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.n1(x)).reshape(B, T, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // self.h), -1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))


class ViT(nn.Module):
    def __init__(self, d=64, depth=6, heads=4, mlp=128, patch=4, img=28, classes=10):
        super().__init__()
        self.p = patch
        n = (img // patch) ** 2
        self.embed = nn.Linear(patch * patch, d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, n + 1, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        B, p = x.shape[0], self.p
        x = x.reshape(B, 28 // p, p, 28 // p, p).permute(0, 1, 3, 2, 4).reshape(B, -1, p * p)
        x = torch.cat([self.cls.expand(B, -1, -1), self.embed(x)], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128, help="images per process per step")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    ddp = "WORLD_SIZE" in os.environ
    m = ViT(a.dim, a.depth, a.heads, a.mlp)
    if ddp:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        m = nn.parallel.DistributedDataParallel(m)
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    x = torch.rand(a.batch, 1, 28, 28)
    y = torch.randint(0, 10, (a.batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
        opt.step()

    for _ in range(5):
        step()
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    dt = time.perf_counter() - t
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if rank == 0:
        params = sum(p.numel() for p in m.parameters())
        print(f"torch {torch.__version__} world={world} threads={a.threads} "
              f"batch/proc={a.batch} params={params} "
              f"images/s={a.batch * world * a.steps / dt:.0f}")
    if ddp:
        # left to interpreter exit, gloo's threads sometimes abort a rank ("terminate called
        # without an active exception") after the result is printed, failing the job
        dist.barrier()
        del m, opt
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
