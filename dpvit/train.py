"""``python -m dpvit.train``: train the ViT, data-parallel over every rank the launcher started.

    python -m dpvit.train --epochs 1                    # one process (uses all cores)
    mpirun -n 4 python -m dpvit.train                   # four ranks, one BLAS thread each
    mpirun -n 2 python -m dpvit.train --resume auto --run-dir runs/x   # continue, any rank count

Rank 0 writes ``config.json``, ``metrics.jsonl``, ``report/`` and ``checkpoints/`` into the run
directory; the other ranks write nothing.

Exit status: 0 done; 1 an error (one line naming the file or setting); 143 (SIGTERM) or 130
(SIGINT) after a requested stop, with a checkpoint of the last step written, so a scheduler
can requeue the same command with ``--resume auto``. docs/reliability.md lists the faults.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

from dpvit.checkpoint import Checkpoint, find_resume_checkpoint, load_checkpoint
from dpvit.cli import run_main
from dpvit.config import Config, load_config
from dpvit.errors import ConfigError
from dpvit.parallel.comm import Comm
from dpvit.parallel.launcher import launcher_rank
from dpvit.training.guard import RunDirLock, StopSignals, check_same_setup
from dpvit.training.trainer import Trainer
from dpvit.vit import ViTConfig

logger = logging.getLogger("dpvit.train")


def apply_debug_settings(cfg: Config, explicit: set[str]) -> None:
    """--debug: float64, a small subset, per-step logging (subset and logging flags given
    explicitly still win); the per-layer checks are switched on by the Trainer."""
    cfg.train.dtype = "float64"
    for key, value in (("train_subset", 2048), ("test_subset", 1000), ("log_every", 1),
                       ("epochs", 1), ("no_progress", True)):
        if key not in explicit:
            setattr(cfg.train, key, value)
    logger.info("debug mode: one process, float64, %s training / %s test images, checks on",
                cfg.train.train_subset, cfg.train.test_subset)


def resolve_run_dir(cfg: Config, comm: Comm) -> Path:
    """``--run-dir``, or ``runs/<dataset>-<timestamp>`` chosen by rank 0 for every rank."""
    if cfg.train.run_dir:
        return Path(cfg.train.run_dir)
    if cfg.train.resume == "auto":
        raise ConfigError("--resume auto needs --run-dir (the run directory to continue)")
    stamp = comm.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
    return Path("runs") / f"{cfg.train.dataset}-{stamp}"


def find_checkpoint(cfg: Config, run_dir: Path) -> Checkpoint | None:
    """Rank 0: the checkpoint named by ``--resume`` (None when there is nothing to resume)."""
    if not cfg.train.resume:
        return None
    if cfg.train.resume == "auto":
        path = find_resume_checkpoint(run_dir)
        if path is None:
            logger.info("--resume auto: no valid checkpoint in %s, starting fresh", run_dir)
            return None
    else:
        path = Path(cfg.train.resume)
    ckpt = load_checkpoint(path)
    logger.info("resuming from %s (step %d, saved by %d rank(s))", path, ckpt.step,
                ckpt.world_size)
    return ckpt


def merge_resumed_config(cfg: Config, explicit: set[str], saved: dict, source: str) -> Config:
    """The checkpoint's config, with training flags given now taking precedence.

    The model shape always comes from the checkpoint: a model flag that contradicts it is an
    error rather than a silently different model.
    """
    merged = Config.from_dict(saved)
    for key, value in asdict(cfg.model).items():
        if key in explicit and value != getattr(merged.model, key):
            raise ConfigError(
                f"model setting {key}={value!r} conflicts with the checkpoint's "
                f"{key}={getattr(merged.model, key)!r} in {source}; the model shape comes from "
                "the checkpoint"
            )
    for key, value in asdict(cfg.train).items():
        if key in explicit or key in ("resume", "run_dir"):
            setattr(merged.train, key, value)
    return merged


def run(comm: Comm, argv: list[str] | None) -> int:
    """The command body, run on every rank by ``run_main``."""
    cfg, explicit = load_config(argv)
    if cfg.train.debug:
        if launcher_rank() != 0:
            return 0  # debug mode is one process whatever the launcher: launcher rank 0
        apply_debug_settings(cfg, explicit)
    run_dir = resolve_run_dir(cfg, comm)
    cfg.train.run_dir = str(run_dir)
    with StopSignals() as stop, RunDirLock(comm, run_dir):
        return train_in_claimed_dir(run_dir, comm, cfg, explicit, stop)


def train_in_claimed_dir(run_dir: Path, comm: Comm, cfg: Config, explicit: set[str],
             stop: StopSignals) -> int:
    """Resume or start in the claimed ``run_dir`` once every rank agrees on the setup; train."""
    ckpt = find_checkpoint(cfg, run_dir) if comm.is_root else None
    saved = comm.broadcast_object((ckpt.config, str(ckpt.path)) if ckpt is not None else None)
    if saved is not None:
        cfg = merge_resumed_config(cfg, explicit, *saved)
    check_same_setup(comm, cfg)
    if comm.is_root:
        (run_dir / "config.json").write_text(cfg.to_json() + "\n")
        logger.info("run directory %s; model %s", run_dir, _describe(cfg.model))
    comm.barrier()
    trainer = Trainer(cfg, comm, run_dir, stop)
    trainer.restore_everywhere(ckpt)
    start = time.perf_counter()
    report = trainer.fit()
    if report is None:
        logger.info("nothing to do: step %d already reached", trainer.state.step)
    else:
        logger.info("done in %.1f s: test accuracy %.2f%%, report in %s",
                    time.perf_counter() - start, 100 * report["accuracy"], run_dir / "report")
    return 0


def _describe(model: ViTConfig) -> str:
    return (f"ViT dim {model.embed_dim}, depth {model.depth}, heads {model.num_heads}, "
            f"patch {model.patch_size}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``dpvit-train``)."""
    args = sys.argv[1:] if argv is None else argv
    sys.exit(run_main(partial(run, argv=argv), argv, single_process="--debug" in args))


if __name__ == "__main__":
    main()
