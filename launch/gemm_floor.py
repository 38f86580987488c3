"""The GEMM floor of the training step: the step's matrix products alone, against the step.

    python launch/gemm_floor.py --rounds 20

numpy's only fast kernels for the model's FLOPs are BLAS's, so the time the training step's
matrix products take by themselves bounds what any numpy step can reach: its model FLOP
utilisation (MFU) and its images/s. This script replays every GEMM and batched matmul of one
`StepBench` step (the default model of ``python -m dpvit.bench``, ``--batch-size`` images in
micro-batches of ``MICRO_BATCH``, one BLAS thread) with the same shapes and memory layouts as
``dpvit.nn`` uses (a fused qkv GEMM; strided q, k, v views of its output; the cls-only last
block), and nothing else: no bias, softmax, GELU, layer norm, loss or optimizer. Rounds
alternate the floor and the real step (ABBA); printed are the median milliseconds, the MFU of
each against the float32 GEMM peak measured in the same process, and the floor's share of the
step. Each block gets its own arrays, as in the model, so the products find the cache as cold
as they do in training.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads its BLAS

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpvit.flops import train_flops_per_image  # noqa: E402
from dpvit.parallel.allocator import keep_freed_memory  # noqa: E402
from dpvit.parallel.comm import LocalComm  # noqa: E402
from dpvit.parallel.replicas import MICRO_BATCH  # noqa: E402
from dpvit.profiling import StepBench, gemm_peak_flops  # noqa: E402
from dpvit.vit import ViTConfig  # noqa: E402


class LinearProducts:
    """The three products of one Linear layer: y = x W^T forward; dx = dy W and dW = dy^T x
    backward (dx left out for the first layer, whose input is the image patches)."""

    def __init__(self, rng: np.random.Generator, rows: int, fan_in: int, fan_out: int,
                 input_grad: bool = True) -> None:
        self.x = rng.standard_normal((rows, fan_in), dtype=np.float32)
        self.dy = rng.standard_normal((rows, fan_out), dtype=np.float32)
        self.weight = rng.standard_normal((fan_out, fan_in), dtype=np.float32)
        self.input_grad = input_grad
        self.flops = 2 * rows * fan_in * fan_out * (3 if input_grad else 2)

    def forward(self) -> None:
        self.x @ self.weight.T

    def backward(self) -> None:
        if self.input_grad:
            self.dy @ self.weight
        self.dy.T @ self.x


class AttentionProducts:
    """The six batched matmuls of attention over (B, H) stacks of (N, hd) matrices, laid out
    as `dpvit.nn.attention.Attention` lays them out: q, k, v strided views of the fused qkv
    output (B, N, 3, H, hd), the output and the q, k, v gradients written into interleaved
    (B, N, H, hd) and (B, N, 3, H, hd) buffers."""

    def __init__(self, rng: np.random.Generator, batch: int, tokens: int, heads: int,
                 head_dim: int, queries: int) -> None:
        B, N, H, hd, Q = batch, tokens, heads, head_dim, queries
        qkv = rng.standard_normal((B, N, 3, H, hd), dtype=np.float32).transpose(2, 0, 3, 1, 4)
        self.q = np.ascontiguousarray(qkv[0, :, :, :Q])  # Attention scales q into a new array
        self.k, self.v = qkv[1], qkv[2]
        self.attn = rng.random((B, H, Q, N), dtype=np.float32)
        self.out = np.empty((B, Q, H, hd), dtype=np.float32)
        self.dout = rng.standard_normal((B, Q, H, hd), dtype=np.float32).transpose(0, 2, 1, 3)
        dqkv = np.empty((B, N, 3, H, hd), dtype=np.float32)
        self.dq = dqkv[:, :Q, 0].transpose(0, 2, 1, 3)
        self.dk, self.dv = (dqkv[:, :, i].transpose(0, 2, 1, 3) for i in (1, 2))
        self.flops = 6 * 2 * B * H * Q * N * hd

    def forward(self) -> None:
        self.q @ self.k.transpose(0, 1, 3, 2)
        np.matmul(self.attn, self.v, out=self.out.transpose(0, 2, 1, 3))

    def backward(self) -> None:
        np.matmul(self.attn.transpose(0, 1, 3, 2), self.dout, out=self.dv)
        self.dout @ self.v.transpose(0, 1, 3, 2)
        np.matmul(self.attn, self.k, out=self.dq)  # dscores has attn's shape
        np.matmul(self.attn.transpose(0, 1, 3, 2), self.q, out=self.dk)


def products_of_step(cfg: ViTConfig, batch_size: int) -> tuple[Callable[[], None], int]:
    """A function that runs the matrix products of one training step of ``batch_size`` images
    on the ``cfg`` model with linear patch embedding, forward then backward, and their FLOPs."""
    if cfg.patch_embed != "linear" or cfg.pool != "cls":
        raise SystemExit("the floor is written for the benchmark's model: linear patches, cls")
    rng = np.random.default_rng(0)
    micro = min(MICRO_BATCH, batch_size)
    if batch_size % micro:
        raise SystemExit(f"--batch-size must be a multiple of the micro-batch, {micro}")
    patches = (cfg.img_size // cfg.patch_size) ** 2
    N, D = patches + 1, cfg.embed_dim
    hidden = int(D * cfg.mlp_ratio)
    H = cfg.num_heads
    layers: list[LinearProducts | AttentionProducts] = [
        LinearProducts(rng, micro * patches, cfg.in_chans * cfg.patch_size**2, D,
                       input_grad=False)]
    for i in range(cfg.depth):
        Q = 1 if i == cfg.depth - 1 else N  # the last block computes the cls token alone
        layers += [LinearProducts(rng, micro * N, D, 3 * D),
                   AttentionProducts(rng, micro, N, H, D // H, Q),
                   LinearProducts(rng, micro * Q, D, D),
                   LinearProducts(rng, micro * Q, D, hidden),
                   LinearProducts(rng, micro * Q, hidden, D)]
    layers.append(LinearProducts(rng, micro, D, cfg.num_classes))

    def step() -> None:
        for _ in range(batch_size // micro):
            for layer in layers:
                layer.forward()
            for layer in reversed(layers):
                layer.backward()
    return step, batch_size // micro * sum(layer.flops for layer in layers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128, help="images per step (one rank)")
    args = p.parse_args()
    keep_freed_memory()  # as the trainer does
    cfg = ViTConfig()
    bench = StepBench(cfg, LocalComm(), args.batch_size)
    floor, floor_flops = products_of_step(cfg, args.batch_size)
    jobs = {"step": bench.step, "floor": floor}
    for job in jobs.values():
        for _ in range(3):
            job()
    seconds: dict[str, list[float]] = {name: [] for name in jobs}
    for i in range(args.rounds):
        for name in ("step", "floor") if i % 4 in (0, 3) else ("floor", "step"):
            start = time.perf_counter()
            jobs[name]()
            seconds[name].append(time.perf_counter() - start)
    peak = gemm_peak_flops()
    flops = train_flops_per_image(cfg) * args.batch_size
    step, product = (statistics.median(seconds[name]) for name in ("step", "floor"))
    ratio = statistics.median(f / s for f, s in zip(seconds["floor"], seconds["step"], strict=True))
    print(f"{args.rounds} rounds, {args.batch_size} images per step in micro-batches of "
          f"{min(MICRO_BATCH, args.batch_size)}, one BLAS thread; GEMM peak "
          f"{peak / 1e9:.0f} GFLOP/s; model {flops / 1e9:.2f} GFLOP per step, of which the "
          f"products compute {floor_flops / 1e9:.2f} (the last block's output is the cls "
          "token's alone, and no gradient reaches the image)")
    for name, secs in (("training step", step), ("its matrix products alone", product)):
        print(f"  {name:26s} {secs * 1e3:7.1f} ms   {args.batch_size / secs:6.0f} images/s   "
              f"MFU {100 * flops / secs / peak:5.1f}%")
    print(f"  products / step: {ratio:.2f} (median of the rounds' ratios)")


if __name__ == "__main__":
    main()
