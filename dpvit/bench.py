"""``python -m dpvit.bench``: training throughput, per-layer times, MFU, memory, scaling.

    python -m dpvit.bench                         # this process (all cores)
    mpirun -n 2 python -m dpvit.bench --json      # two ranks, one BLAS thread each
    python -m dpvit.bench --compare-torch --ranks 2   # dpvit vs PyTorch DDP (gloo), same run
    python -m dpvit.bench --scaling               # -n 1 (1 thread), 1 process, -n 2, -n 4;
                                                  # --batch-size images per replica in each
    mpirun -n 2 python -m dpvit.bench --comm      # the gradient allreduce per bucket size and
                                                  # compression, alone and inside the step

The step measured is the trainer's own step (`dpvit.training.step.TrainStep`: forward, loss,
backward, gradient allreduce, clipping, AdamW) on a fixed synthetic batch, the same work the
PyTorch reference ``launch/bench/torch_vit_ref.py`` times, so the two numbers compare
directly. ``--compare-torch`` and ``--scaling`` start their own jobs (mpirun, torchrun) one
after another, interleaved over ``--rounds``, so every number in their table comes from the
same run on the same machine; a ratio is the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import statistics
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

from dpvit.cli import CliParser, run_main
from dpvit.errors import ConfigError, UserError
from dpvit.flops import train_flops_per_image
from dpvit.parallel.comm import Comm
from dpvit.parallel.gradsync import COMPRESSIONS
from dpvit.parallel.launcher import find_mpirun
from dpvit.parallel.replicas import MICRO_BATCH
from dpvit.parallel.threads import available_cores
from dpvit.profiling import (
    StepBench,
    comm_table,
    gemm_peak_flops,
    layer_table,
    peak_rss_bytes,
    summarize,
)
from dpvit.vit import ViTConfig

logger = logging.getLogger("dpvit.bench")

#: The PyTorch reference script in a checkout of the repository (an installed dpvit has none:
#: pass ``--torch-ref PATH``).
DEFAULT_TORCH_REF = Path(__file__).resolve().parents[1] / "launch" / "bench" / "torch_vit_ref.py"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = CliParser(prog="python -m dpvit.bench", description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=128, help="images per rank per step")
    p.add_argument("--micro-batch", type=int, default=MICRO_BATCH,
                   help="most images per forward/backward pass, as in training; 0 runs each "
                        "rank's batch at once")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp-ratio", type=float, default=2.0)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--bucket-mb", type=float, default=0.0,
                   help="gradient allreduce in buckets of this many MiB (as training's flag)")
    p.add_argument("--grad-compression", choices=("none", "fp16", "bf16"), default="none",
                   help="16-bit gradients on the wire (as training's flag)")
    p.add_argument("--comm", action="store_true",
                   help="communication mode: for each --comm-buckets x --comm-compressions, "
                        "the allreduce alone, the step with it, and the share of the "
                        "allreduce hidden behind backward")
    p.add_argument("--comm-buckets", default="0,0.1,0.25",
                   help="bucket sizes in MiB for --comm (0: one allreduce)")
    p.add_argument("--comm-compressions", default="none,fp16",
                   help="compressions for --comm (none, fp16, bf16)")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--compare-torch", action="store_true",
                   help="also run the PyTorch DDP reference with --ranks processes")
    p.add_argument("--scaling", action="store_true", help="compare rank and thread counts")
    p.add_argument("--ranks", type=int, default=2, help="processes for --compare-torch")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds for comparisons")
    p.add_argument("--torch-ref", type=Path, default=DEFAULT_TORCH_REF,
                   help="the PyTorch reference script (default: launch/bench/torch_vit_ref.py "
                        "in the repository)")
    args = p.parse_args(argv)
    for name in ("batch_size", "steps", "repeats", "ranks", "rounds"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer")
    if args.micro_batch < 0:
        raise ConfigError("--micro-batch must be 0 (off) or a positive integer")
    if args.bucket_mb < 0:
        raise ConfigError("--bucket-mb must not be negative")
    try:
        buckets = [float(b) for b in args.comm_buckets.split(",")]
    except ValueError:
        raise ConfigError(f"--comm-buckets must be numbers separated by commas, got "
                          f"{args.comm_buckets!r}") from None
    compressions = args.comm_compressions.split(",")
    if any(b < 0 for b in buckets) or any(c not in COMPRESSIONS for c in compressions):
        raise ConfigError(f"--comm-buckets takes sizes >= 0 and --comm-compressions "
                          f"{', '.join(COMPRESSIONS)}; got {args.comm_buckets!r} and "
                          f"{args.comm_compressions!r}")
    args.comm_settings = [(b, c) for c in compressions for b in buckets]
    return args


def model_config(args: argparse.Namespace) -> ViTConfig:
    cfg = ViTConfig(embed_dim=args.dim, depth=args.depth, num_heads=args.heads,
                    mlp_ratio=args.mlp_ratio, patch_size=args.patch_size)
    cfg.validate()
    return cfg


def measure(comm: Comm, args: argparse.Namespace) -> dict[str, Any]:
    """Throughput of this process group, and where the time goes."""
    cfg = model_config(args)
    # one BLAS thread's peak with all ranks busy at once, times the rank's replica threads
    # (an estimate of the threads' combined peak)
    peak = comm.allreduce_min(gemm_peak_flops()) * comm.threads
    bench = StepBench(cfg, comm, args.batch_size, args.dtype, args.micro_batch,
                      args.bucket_mb, args.grad_compression)
    result = summarize(bench.run(args.steps, args.warmup, args.repeats),
                       args.batch_size * comm.size)
    train_flops = train_flops_per_image(cfg)
    result.update(
        world_size=comm.size,
        threads_per_rank=comm.threads,
        batch_per_rank=args.batch_size,
        micro_batch=args.micro_batch,
        params=bench.model.num_params(),
        train_gflop_per_image=train_flops / 1e9,
        gemm_peak_gflops_per_rank=peak / 1e9,
        mfu=result["images_per_s"] * train_flops / (peak * comm.size),
    )
    if not args.no_layers:
        result["layers"] = layer_table(bench, args.steps)
    result["peak_rss_mib_per_rank"] = comm.allreduce_max(peak_rss_bytes()) / 2**20
    return result


def format_measurement(r: dict[str, Any]) -> str:
    lines = [
        f"dpvit: {r['world_size']} rank(s) x {r['threads_per_rank']} thread(s), "
        f"batch {r['batch_per_rank']}/rank in micro-batches of "
        f"{r['micro_batch'] or r['batch_per_rank']}, {r['params']} params",
        f"  images/s      {r['images_per_s']:.0f} (min {r['images_per_s_min']:.0f}, "
        f"max {r['images_per_s_max']:.0f}); step {r['step_ms']:.1f} ms",
        f"  allreduce     {100 * r['allreduce_share']:.1f}% of step time",
        f"  compute       {r['compute_ms_fastest_rank']:.1f} ms of forward/backward per step"
        + (f" on the fastest rank, {r['compute_ms_slowest_rank']:.1f} on the slowest, which "
           "the others wait for" if r["world_size"] > 1 else ""),
        f"  MFU           {100 * r['mfu']:.1f}% of {r['gemm_peak_gflops_per_rank']:.0f} "
        f"GFLOP/s GEMM peak per rank ({r['train_gflop_per_image']:.3f} GFLOP/image)",
        f"  peak memory   {r['peak_rss_mib_per_rank']:.0f} MiB per rank",
    ]
    if "layers" in r:
        lines.append("  per layer (rank 0, ms per step; containers include their children):")
        lines += [f"    {row['layer']:<20} {row['ms_per_step']:8.2f}" for row in r["layers"]]
    return "\n".join(lines)


# -- comparisons: separate jobs, run one after another ------------------------------------------


def _run(cmd: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if done.returncode != 0:
        raise UserError(f"benchmark job failed ({' '.join(cmd)}): {done.stderr.strip()[-500:]}")
    return done.stdout


def dpvit_job(args: argparse.Namespace, ranks: int | None, threads: int,
              batch_size: int | None = None) -> dict[str, Any]:
    """The ``--json`` measurement of ``python -m dpvit.bench`` with ``ranks`` (None: no
    mpirun) and ``batch_size`` images per rank (default ``--batch-size``)."""
    cmd = [sys.executable, "-m", "dpvit.bench", "--json", "--no-layers",
           "--batch-size", str(batch_size or args.batch_size),
           "--micro-batch", str(args.micro_batch),
           "--steps", str(args.steps),
           "--repeats", str(args.repeats), "--dim", str(args.dim), "--depth", str(args.depth),
           "--heads", str(args.heads), "--mlp-ratio", str(args.mlp_ratio),
           "--patch-size", str(args.patch_size)]
    if ranks is not None:
        cmd = [find_mpirun(), "-n", str(ranks), *cmd]
    return json.loads(_run(cmd, {"DPVIT_NUM_THREADS": str(threads)}))


def check_torch_reference(torch_ref: Path) -> None:
    """Before any job runs: PyTorch is installed and the reference script exists."""
    if importlib.util.find_spec("torch") is None:
        raise UserError("--compare-torch needs PyTorch: pip install torch==2.13.0 "
                        "(a CPU build; never a dependency of dpvit)")
    if not torch_ref.is_file():
        raise UserError(f"PyTorch reference {torch_ref} not found; pass --torch-ref PATH "
                        "(launch/bench/torch_vit_ref.py in the dpvit repository)")


def torch_job(args: argparse.Namespace, ranks: int, threads: int) -> dict[str, Any]:
    """``images_per_s`` of the PyTorch reference: DDP (gloo) over ``ranks`` processes if
    ranks > 1."""
    check_torch_reference(args.torch_ref)
    ref = [str(args.torch_ref), "--threads", str(threads), "--batch", str(args.batch_size),
           "--steps", str(args.steps * args.repeats), "--dim", str(args.dim),
           "--depth", str(args.depth), "--heads", str(args.heads),
           "--mlp", str(int(args.dim * args.mlp_ratio))]
    cmd = [sys.executable, *ref]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               *ref]
    out = _run(cmd, {"OMP_NUM_THREADS": str(threads)})
    match = re.search(r"images/s=([0-9.]+)", out)
    if match is None:
        raise UserError(f"could not read images/s from the PyTorch reference output: {out!r}")
    return {"images_per_s": float(match.group(1))}


def compare(args: argparse.Namespace, jobs: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The measurement of each job in each of the interleaved rounds."""
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in jobs}
    for _ in range(args.rounds):
        for name, job in jobs.items():
            records[name].append(job())
            logger.info("%-28s %8.0f images/s", name, records[name][-1]["images_per_s"])
    return records


def paired_ratio(rates: dict[str, list[float]], a: str, b: str) -> float:
    """Median over the rounds of a's images/s over b's in the same round: the jobs of a round
    run back to back, so each ratio compares them on the machine of the same minutes, which
    a ratio of medians taken from different rounds would not on a shared machine."""
    return statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True))


def comparison_jobs(args: argparse.Namespace) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The jobs to run and the (numerator, denominator) ratios to print."""
    cores = available_cores()
    if args.scaling:
        # Every job runs --batch-size images per model replica (a rank, or a replica thread of
        # the lone process), as training splits one global batch: the lone process gets the
        # batch of `cores` ranks, so it synchronises its threads as often per image as -n 2
        # does its ranks.
        jobs = {
            "dpvit -n 1 x 1 thread": partial(dpvit_job, args, 1, 1),
            f"dpvit 1 process x {cores} threads": partial(dpvit_job, args, None, cores,
                                                          args.batch_size * cores),
            "dpvit -n 2 x 1 thread": partial(dpvit_job, args, 2, 1),
            "dpvit -n 4 x 1 thread": partial(dpvit_job, args, 4, 1),
        }
        names = list(jobs)
        return jobs, [(names[2], names[0]), (names[3], names[2]), (names[1], names[2])]
    threads = 1 if args.ranks > 1 else cores
    ours = f"dpvit -n {args.ranks} x {threads} thread(s)"
    theirs = f"torch DDP {args.ranks} x {threads} thread(s)"
    jobs = {ours: partial(dpvit_job, args, args.ranks if args.ranks > 1 else None, threads),
            theirs: partial(torch_job, args, args.ranks, threads)}
    return jobs, [(ours, theirs)]


def summarize_comparison(args: argparse.Namespace, records: dict[str, list[dict[str, Any]]],
                         ratios: list[tuple[str, str]]) -> tuple[dict[str, Any], str]:
    """The JSON object and the table of a comparison: each job's median images/s and, for
    dpvit's jobs, the median forward/backward ms per step of the fastest and the slowest
    rank (when the slowest is slower, a synchronous step goes at its pace); then the ratios."""
    rates = {name: [r["images_per_s"] for r in rounds] for name, rounds in records.items()}
    compute = {name: {rank: [r[f"compute_ms_{rank}_rank"] for r in rounds]
                      for rank in ("fastest", "slowest")}
               for name, rounds in records.items() if "compute_ms_slowest_rank" in rounds[0]}
    result = {"images_per_s": {k: statistics.median(v) for k, v in rates.items()},
              "images_per_s_rounds": rates,
              "compute_ms_rounds": compute,
              "ratios": {f"{a} / {b}": paired_ratio(rates, a, b) for a, b in ratios}}
    lines = ([f"{args.batch_size} images per model replica (rank or thread) per step"]
             if args.scaling else [])
    for name, rate in result["images_per_s"].items():
        line = f"{name:<36} {rate:8.0f} images/s"
        if name in compute:
            ms = {rank: statistics.median(v) for rank, v in compute[name].items()}
            line += (f"; forward/backward {ms['fastest']:.0f} ms/step on the fastest rank, "
                     f"{ms['slowest']:.0f} on the slowest")
        lines.append(line)
    lines += [f"{k}: {v:.2f}x (median of the rounds' ratios)" for k, v in result["ratios"].items()]
    return result, "\n".join(lines)


def measure_comm(comm: Comm, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """--comm: the gradient allreduce of this job's ranks per bucket size and compression."""
    rows = comm_table(model_config(args), comm, args.batch_size, args.comm_settings,
                      args.steps, args.warmup, args.repeats, args.micro_batch)
    lines = [f"gradient allreduce on {comm.size} rank(s), batch {args.batch_size}/rank "
             "(alone: ms per allreduce; exposed: ms per step waited after backward; hidden: "
             "1 - exposed / alone)",
             f"  {'bucket MiB':>10} {'compression':>11} {'buckets':>7} {'alone ms':>9} "
             f"{'exposed ms':>10} {'hidden':>6} {'images/s':>8} {'step ms':>7}"]
    lines += [f"  {r['bucket_mb']:>10g} {r['compression']:>11} {r['buckets']:>7} "
              f"{r['allreduce_ms']:>9.2f} {r['exposed_ms']:>10.2f} "
              f"{100 * r['hidden_share']:>5.0f}% {r['images_per_s']:>8.0f} "
              f"{r['step_ms']:>7.1f}" for r in rows]
    return {"world_size": comm.size, "batch_per_rank": args.batch_size, "comm": rows}, \
        "\n".join(lines)


def run(comm: Comm, argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.comm:
        result, text = measure_comm(comm, args)
    elif args.compare_torch or args.scaling:
        if comm.size > 1:
            raise ConfigError("--compare-torch and --scaling start their own jobs; run them "
                              "without mpirun (use --ranks N)")
        if args.compare_torch:
            check_torch_reference(args.torch_ref)
        jobs, ratios = comparison_jobs(args)
        result, text = summarize_comparison(args, compare(args, jobs), ratios)
    else:
        result = measure(comm, args)
        text = format_measurement(result)
    if comm.is_root:
        print(json.dumps(result) if args.json else text, flush=True)
    return 0


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``dpvit-bench``)."""
    sys.exit(run_main(partial(run, argv=argv), argv, parse_args=parse_args,
                      announce_threads=True))


if __name__ == "__main__":
    main()
