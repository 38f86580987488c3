"""``python -m dpvit.train``: train the ViT, data-parallel over every rank the launcher started.

    python -m dpvit.train --epochs 1                    # one process (uses all cores)
    mpirun -n 4 python -m dpvit.train                   # four ranks, one BLAS thread each
    mpirun -n 2 python -m dpvit.train --resume auto --run-dir runs/x   # continue, any rank count

Rank 0 writes ``config.json``, ``metrics.jsonl``, ``report/`` and ``checkpoints/`` into the run
directory; the other ranks write nothing.

Exit status: 0 done; 1 an error (one line naming the file or setting); 143 (SIGTERM) or 130
(SIGINT) after a requested stop, with a checkpoint of the last step written, so a scheduler
can requeue the same command with ``--resume auto`` (or ``--resume must``, which fails instead
of starting a new run when the run directory has no valid checkpoint). docs/reliability.md
lists the faults.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

from dpvit.checkpoint import Checkpoint, find_resume_checkpoint, load_checkpoint
from dpvit.cli import agree, run_main
from dpvit.config import Config, TrainConfig, load_config
from dpvit.data import prepare_dataset, split_size
from dpvit.errors import ConfigError, UserError
from dpvit.parallel.comm import Comm
from dpvit.parallel.launcher import launcher_rank
from dpvit.training.guard import RunDirLock, StopSignals, check_same_setup
from dpvit.training.schedule import Schedule
from dpvit.training.tensorboard import require_tensorboardx
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
    stamp = comm.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
    return Path("runs") / f"{cfg.train.dataset}-{stamp}"


def find_checkpoint(cfg: Config, run_dir: Path) -> Checkpoint | None:
    """Rank 0: the checkpoint named by ``--resume`` (None when there is nothing to resume).

    ``--resume auto`` and ``--resume must`` take the newest valid checkpoint in ``run_dir``;
    when there is none, ``auto`` warns and starts a new run (so a mistyped ``--run-dir`` is
    seen) and ``must`` fails (for schedulers that requeue a job which must continue).

    Raises:
        UserError: ``--resume must`` found no valid checkpoint, or the named file is missing
            or damaged.
    """
    resume = cfg.train.resume
    if not resume:
        return None
    if resume in ("auto", "must"):
        path = find_resume_checkpoint(run_dir)
        if path is None and resume == "must":
            raise UserError(f"--resume must found no valid checkpoint in {run_dir}; check "
                            "--run-dir (--resume auto would start a new run there)")
        if path is None:
            logger.warning("--resume auto found no checkpoint in %s; starting a new run",
                           run_dir)
            return None
    else:
        path = Path(resume)
    ckpt = load_checkpoint(path)
    logger.info("resuming from %s (step %d, saved by %d rank(s))", path, ckpt.step,
                ckpt.world_size)
    return ckpt


def resume_point(comm: Comm, cfg: Config, explicit: set[str],
                 run_dir: Path) -> tuple[Config, Checkpoint | None]:
    """``--resume`` on every rank: the run's config and rank 0's checkpoint (None elsewhere,
    and when there is nothing to resume).

    Rank 0 finds and reads the checkpoint (`find_checkpoint`); every rank then takes its
    config (`merge_resumed_config`). Both steps are agreed (`dpvit.cli.agree`): no valid
    checkpoint for ``--resume must``, a damaged file or a model flag that contradicts the
    checkpoint is one line from rank 0, and every rank exits 1 without an MPI abort.
    """
    ckpt = agree(comm, find_checkpoint, cfg, run_dir, root_only=True)
    saved = comm.broadcast_object((ckpt.config, str(ckpt.path)) if ckpt is not None else None)
    if saved is None:
        return cfg, ckpt
    return agree(comm, merge_resumed_config, cfg, explicit, *saved), ckpt


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
    merged.train.validate()  # a flag given now may not fit a saved one (--shard-optimizer)
    return merged


def run(comm: Comm, argv: list[str] | None) -> int:
    """The command body, run on every rank by ``run_main``."""
    cfg, explicit = load_config(argv)
    comm.set_collective_timeout(cfg.train.collective_timeout)
    if cfg.train.debug:
        if launcher_rank() != 0:
            return 0  # debug mode is one process whatever the launcher: launcher rank 0
        apply_debug_settings(cfg, explicit)
    run_dir = resolve_run_dir(cfg, comm)
    cfg.train.run_dir = str(run_dir)
    # What can fail without writing anything (the checkpoint to resume, the setup, the data:
    # offline, files missing) comes before the run directory is created, so a start that
    # cannot train leaves no empty run directory behind.
    cfg, ckpt = resume_point(comm, cfg, explicit, run_dir)
    check_same_setup(comm, cfg)
    init_weights = initial_weights(comm, cfg, ckpt)
    store_path = agree(comm, partial(prepare_dataset, cfg.train.dataset, cfg.train.data_dir,
                                     comm, store_dir=cfg.train.store_dir))
    agree(comm, schedule_fits, cfg.train, store_path)
    with StopSignals() as stop, RunDirLock(comm, run_dir):
        return train_in_claimed_dir(run_dir, comm, cfg, ckpt, stop, store_path, init_weights)


def schedule_fits(train: TrainConfig, store_path: Path) -> Schedule:
    """The run's schedule; a ConfigError when the global batch exceeds the training images."""
    images = split_size(store_path, "train")
    return Schedule.for_run(train, images if train.train_subset is None
                            else min(images, train.train_subset))


def read_init_weights(cfg: Config, ckpt: Checkpoint | None) -> dict | None:
    """Rank 0: the ``--init-from`` parameters (None when there are none, or when resuming:
    the checkpoint's parameters win); checks the ``--tensorboard`` extra too.

    Raises:
        UserError: tensorboardX or safetensors missing, an unreadable file, or (ConfigError)
            the first tensor that does not fit the model config.
    """
    if cfg.train.tensorboard:
        require_tensorboardx()
    path = cfg.train.init_from
    if not path:
        return None
    if ckpt is not None:
        logger.info("--init-from %s ignored: resuming %s", path, ckpt.path)
        return None
    from dpvit.interop.weights import load_init_weights

    weights = load_init_weights(path, cfg.model, reset_head=cfg.train.reset_head)
    logger.info("starting from the weights in %s%s (a fresh optimizer)", path,
                ", with a new head" if cfg.train.reset_head else "")
    return weights


def initial_weights(comm: Comm, cfg: Config, ckpt: Checkpoint | None) -> dict | None:
    """``read_init_weights`` on rank 0, agreed: a bad file is one line from rank 0 and every
    rank exits 1, before the run directory is created. Rank 0 gets the weights (the Trainer
    broadcasts them with the initial parameters), the other ranks None."""
    return agree(comm, read_init_weights, cfg, ckpt, root_only=True)


def train_in_claimed_dir(run_dir: Path, comm: Comm, cfg: Config, ckpt: Checkpoint | None,
                         stop: StopSignals, store_path: Path,
                         init_weights: dict | None = None) -> int:
    """Start or resume (``ckpt``, rank 0's) in the claimed ``run_dir`` with the dataset store
    every rank prepared (and rank 0's ``--init-from`` weights, if any); train."""
    if comm.is_root:
        (run_dir / "config.json").write_text(cfg.to_json() + "\n")
        logger.info("run directory %s; model %s", run_dir, _describe(cfg.model))
    comm.barrier()
    trainer = Trainer(cfg, comm, run_dir, stop, store_path=store_path,
                      init_weights=init_weights)
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
    sys.exit(run_main(partial(run, argv=argv), argv, single_process="--debug" in args,
                      parse_args=load_config, announce_threads=True, spare_ranks=True))


if __name__ == "__main__":
    main()
