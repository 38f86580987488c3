"""Configuration: dataclasses with defaults, then a TOML file, then command-line flags.

Every field of ``ViTConfig`` and ``TrainConfig`` is a flag: ``--<name>`` with ``_`` written as
``-`` (a few model fields have short names, e.g. ``--dim`` for
``embed_dim``). A TOML file given with ``--config FILE`` (or the name of a preset shipped in
``dpvit/configs/``, e.g. ``--config mnist``) may set the same keys, written as the flag names
with underscores; flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dpvit.cli import CliParser
from dpvit.data.augment import Augmentation
from dpvit.errors import ConfigError
from dpvit.options import option
from dpvit.vit import ViTConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class TrainConfig:
    """How to train. The learning rate is for the global batch, whatever the rank count."""

    dataset: str = option("mnist", "dataset", choices=("mnist", "fashion-mnist"))
    data_dir: str | None = option(None, "dataset directory (default: $DPVIT_DATA_DIR, "
                                      "else data/<dataset>)")
    store_dir: str | None = option(None, "where to write the converted HDF5 store (default: "
                                       "data/<dataset>/ when that is the data directory, "
                                       "else $DPVIT_CACHE_DIR or ~/.cache/dpvit)")
    epochs: int = option(8, "training epochs")
    max_steps: int | None = option(None, "stop after this many optimizer steps in all")
    batch_size: int = option(64, "global batch size, across all ranks")
    optimizer: str = option("adamw", "optimizer", choices=("adamw", "sgd"))
    lr: float = option(4e-3, "peak learning rate for the global batch")
    min_lr: float = option(1e-5, "learning rate at the end of the cosine schedule")
    warmup_epochs: float = option(1.0, "linear warmup length, at most a fifth of the run")
    weight_decay: float = option(0.05, "decoupled weight decay (not on biases, norms, embeddings)")
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(False, "Nesterov momentum for SGD")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.999, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 disables)")
    max_bad_steps: int = option(5, "stop after this many steps in a row with a non-finite loss "
                                 "or gradient norm (each is skipped, not applied)")
    label_smoothing: float = option(0.1, "cross-entropy label smoothing")
    ema_decay: float = option(0.0, "keep an exponential moving average of the weights with "
                                   "this decay per step and evaluate, report and export it "
                                   "(0: off)")
    augment: bool = option(True, "random shift/rotation/scale of training images")
    aug_shift: float = option(Augmentation.shift, "largest random shift in pixels")
    aug_rotate: float = option(Augmentation.rotate_deg, "largest random rotation in degrees")
    aug_zoom: float = option(Augmentation.zoom, "random scale drawn from [1 - zoom, 1 + zoom]")
    aug_hflip: bool = option(Augmentation.hflip, "mirror half of the training images left-right")
    no_aug_epochs: int = option(1, "train the last N epochs on unaugmented images")
    seed: int = option(0, "seed for initialisation, shuffling, augmentation and dropout")
    run_dir: str | None = option(None, "output directory (default runs/<dataset>-<timestamp>)")
    resume: str | None = option(None, "'auto': continue from the newest valid checkpoint in "
                                      "--run-dir, or start a new run (with a warning) when "
                                      "there is none; 'must': the same, but fail when there is "
                                      "none; or a checkpoint path")
    init_from: str | None = option(None, "start from these weights: a .safetensors file in "
                                         "timm's VisionTransformer layout (python -m "
                                         "dpvit.export); a fresh optimizer, not a resume, and "
                                         "ignored when --resume finds a checkpoint")
    reset_head: bool = option(False, "with --init-from: keep a freshly initialised head "
                                     "instead of the file's (e.g. MNIST -> Fashion-MNIST)")
    checkpoint_every: int = option(0, "also checkpoint every N steps (0: only at epoch ends)")
    keep: int = option(3, "rolling step checkpoints to keep")
    log_every: int = option(50, "log training metrics every N steps")
    tensorboard: str | None = option(None, "also write rank 0's metrics and per-epoch confusion "
                                           "matrix as TensorBoard event files into this "
                                           "directory (needs tensorboardX)")
    timeline: str | None = option(None, "write a Chrome trace (Perfetto, chrome://tracing) of "
                                        "--timeline-steps steps of every rank to this JSON "
                                        "file (docs/performance.md)")
    timeline_steps: int = option(20, "steps --timeline records, after a few warm-up steps")
    train_subset: int | None = option(None, "use only the first N training images")
    test_subset: int | None = option(None, "use only the first N test images")
    dtype: str = option("float32", "parameter and activation dtype", choices=("float32", "float64"))
    progress: str = option("auto", "what rank 0 shows while training: auto (a live bar when a "
                           "terminal shows stderr, also under mpirun; else plain), bar, plain "
                           "(a log line every --log-every steps with percentage and ETA), none",
                           choices=("auto", "bar", "plain", "none"))
    no_progress: bool = option(False, "same as --progress plain")
    debug: bool = option(False, "single-process debug mode: float64, small subset, checks")
    bucket_mb: float = option(0.0, "gradient allreduce in buckets of about this many MiB, "
                                   "each started as soon as backward has produced it "
                                   "(overlapped with the rest of backward); 0: one allreduce "
                                   "after backward")
    grad_compression: str = option("none", "send gradients as 16-bit floats (summed in float32, "
                                           "with error feedback)",
                                   choices=("none", "fp16", "bf16"))
    shard_optimizer: bool = option(False, "keep on each rank the optimizer state (AdamW "
                                          "moments, SGD momentum) of its 1/N slice of the "
                                          "parameters only: the gradient is reduce-scattered "
                                          "and the updated slices allgathered (ZeRO stage 1; "
                                          "checkpoints unchanged)")
    collective_timeout: float = option(600.0, "seconds a rank may wait in one collective "
                                              "before the whole job stops with a message "
                                              "naming the missing ranks (0: wait forever)")

    def validate(self) -> None:
        """Raise ConfigError with one clear sentence for an impossible setting, naming the
        setting as its flag is typed (``--batch-size``)."""
        for name in ("epochs", "batch_size", "keep", "log_every", "max_bad_steps", "max_steps",
                     "train_subset", "test_subset", "timeline_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{_flag(self, name)} must be a positive integer, got {value}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        for name in ("warmup_epochs", "checkpoint_every", "grad_clip", "no_aug_epochs",
                     "aug_shift", "aug_rotate", "bucket_mb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_flag(self, name)} must not be negative, "
                                  f"got {getattr(self, name)}")
        for name in ("label_smoothing", "aug_zoom", "ema_decay"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{_flag(self, name)} must be in [0, 1), "
                                  f"got {getattr(self, name)}")
        if self.resume in ("auto", "must") and not self.run_dir:
            raise ConfigError(f"--resume {self.resume} needs --run-dir (the run directory to "
                              "continue)")
        if self.shard_optimizer and (self.bucket_mb > 0 or self.grad_compression != "none"):
            raise ConfigError("--shard-optimizer cannot be combined with --bucket-mb or "
                              "--grad-compression: the sharded step sums the whole gradient "
                              "in one reduce-scatter")
        if self.reset_head and not self.init_from:
            raise ConfigError("--reset-head needs --init-from (the weights whose head it "
                              "replaces)")

    def augmentation(self, epoch: int) -> Augmentation | None:
        """The training-image perturbation in ``epoch`` (0-based), or None for clean images.

        The last ``no_aug_epochs`` epochs see the images as the test set shows them, so the
        final low-learning-rate steps fit that distribution (YOLOX's "no-aug epochs").
        """
        if not self.augment or epoch >= self.epochs - self.no_aug_epochs:
            return None
        return Augmentation(shift=self.aug_shift, rotate_deg=self.aug_rotate,
                            zoom=self.aug_zoom, hflip=self.aug_hflip)


@dataclass
class Config:
    """Everything a run needs; serialised as JSON into checkpoints and config.json."""

    model: ViTConfig = field(default_factory=ViTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, Any]]) -> Config:
        """Rebuild a Config from ``to_dict`` output (unknown keys are an error)."""
        model = _apply(ViTConfig(), data.get("model", {}), "model")
        train = _apply(TrainConfig(), data.get("train", {}), "train")
        return cls(model=model, train=train)


def _flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or f.name.replace("_", "-")


def _flag(obj: Any, name: str) -> str:
    """The flag of config field ``name`` as the user types it: ``--batch-size``."""
    return "--" + _flag_name(next(f for f in fields(obj) if f.name == name))


def _key_map() -> dict[str, tuple[str, str]]:
    """TOML/flag key (underscored) -> (section, field name)."""
    keys = {}
    for section, cls in (("model", ViTConfig), ("train", TrainConfig)):
        for f in fields(cls):
            keys[_flag_name(f).replace("-", "_")] = (section, f.name)
            keys[f.name] = (section, f.name)
    return keys


def _coerce(value: Any, f: dataclasses.Field, where: str) -> Any:
    """Check a TOML value against the field's type; ints are accepted for floats."""
    kind = type(f.default) if f.default is not None else None
    if value is None:
        return None
    if f.name in ("max_steps", "train_subset", "test_subset"):
        kind = int
    elif f.name in ("data_dir", "store_dir", "run_dir", "resume", "init_from", "tensorboard",
                    "timeline"):
        kind = str
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    wrong_type = kind is not None and not isinstance(value, kind)
    if wrong_type or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"{where}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where}: must be one of {', '.join(choices)}, got {value!r}")
    return value


def _apply(obj: Any, values: dict[str, Any], section: str) -> Any:
    by_name = {f.name: f for f in fields(obj)}
    for key, value in values.items():
        if key not in by_name:
            raise ConfigError(
                f"unknown {section} key {key!r}; valid keys: {', '.join(sorted(by_name))}"
            )
        setattr(obj, key, _coerce(value, by_name[key], f"{section}.{key}"))
    return obj


def read_toml(path_or_preset: str) -> dict[str, Any]:
    """Read a TOML config file, or a preset by name from ``dpvit/configs/``."""
    path = Path(path_or_preset)
    if not path.exists() and (CONFIG_DIR / f"{path_or_preset}.toml").exists():
        path = CONFIG_DIR / f"{path_or_preset}.toml"
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        presets = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
        raise ConfigError(
            f"config file {path_or_preset} not found (presets: {', '.join(presets) or 'none'})"
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    keys = _key_map()
    unknown = sorted(k for k in data if k not in keys)
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown key(s) {', '.join(unknown)}; "
            f"valid keys: {', '.join(sorted(keys))}"
        )
    return data


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _none_or(kind: type):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with ``--config`` and one flag per config field, defaults left unset."""
    parser = CliParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="TOML file, or a preset name (e.g. mnist)")
    for title, cls in (("model", ViTConfig), ("training", TrainConfig)):
        group = parser.add_argument_group(title)
        for f in fields(cls):
            flag = "--" + _flag_name(f)
            help_text = f"{f.metadata['help']} (default: {f.default})"
            if isinstance(f.default, bool):
                if f.default is False and f.name in ("no_progress", "debug", "nesterov",
                                                        "reset_head"):
                    group.add_argument(flag, dest=f.name, action="store_true", help=help_text)
                elif f.name == "shard_optimizer":
                    # alone it turns on; "false" turns off what a resumed run saved
                    group.add_argument(flag, dest=f.name, type=_parse_bool, nargs="?",
                                       const=True, metavar="BOOL", help=help_text)
                else:
                    group.add_argument(flag, dest=f.name, type=_parse_bool, metavar="BOOL",
                                       help=help_text)
                continue
            kind = {int: int, float: float, str: str}.get(type(f.default), str)
            if f.name in ("max_steps", "train_subset", "test_subset"):
                kind = _none_or(int)
            group.add_argument(flag, dest=f.name, type=kind, choices=f.metadata.get("choices"),
                               help=help_text)
    return parser


def load_config(argv: list[str] | None, prog: str = "dpvit.train") -> tuple[Config, set[str]]:
    """Defaults, the dataset's preset, the TOML file, then flags (each layer wins over the last).

    The preset of the chosen dataset (``dpvit/configs/<dataset>.toml``) is the recipe tuned for
    it, so ``--dataset fashion-mnist`` alone trains with the Fashion-MNIST recipe.

    Returns:
        The config and the keys set explicitly (by the file or a flag, not by a preset).

    Raises:
        ConfigError: an unknown flag or key, a value of the wrong type, or an impossible shape.
    """
    parser = build_parser(prog, "Train a numpy Vision Transformer, data-parallel over MPI.")
    args = vars(parser.parse_args(argv))
    keys = _key_map()
    given: dict[str, Any] = {}
    if "config" in args:
        for key, value in read_toml(args.pop("config")).items():
            given[keys[key][1]] = value
    given.update(args)
    dataset = given.get("dataset", TrainConfig().dataset)
    preset = CONFIG_DIR / f"{dataset}.toml"
    values = {keys[k][1]: v for k, v in read_toml(str(preset)).items()} if preset.exists() else {}
    values.update(given)
    sections: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for name, value in values.items():
        sections[keys[name][0]][name] = value
    cfg = Config.from_dict(sections)
    cfg.model.validate()
    cfg.train.validate()
    return cfg, set(given)
