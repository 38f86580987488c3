"""Configuration: defaults, shipped TOML presets, precedence of flags, clear errors."""

from __future__ import annotations

import dataclasses

import pytest

from dpvit.config import CONFIG_DIR, Config, TrainConfig, load_config
from dpvit.data import Augmentation
from dpvit.errors import ConfigError


def test_mnist_preset_changes_only_what_its_comments_explain():
    """The shipped mnist.toml is the tuned recipe: the built-in defaults but for a shorter
    schedule on a conv stem; every other key it holds repeats a default."""
    preset, explicit = load_config(["--config", "mnist"])
    default = Config()
    changed = {f.name for f in dataclasses.fields(TrainConfig)
               if getattr(preset.train, f.name) != getattr(default.train, f.name)}
    assert changed == {"epochs", "warmup_epochs"}
    assert (preset.train.epochs, preset.train.warmup_epochs) == (5, 0.3)
    assert preset.model == dataclasses.replace(default.model, patch_embed="stem", depth=4)
    assert {"lr", "batch_size", "epochs"} <= explicit


def test_the_long_recipe_changes_the_mnist_preset_only_where_its_comments_say():
    long, _ = load_config(["--config", "mnist-long"])
    short, _ = load_config([])
    changed = {f.name for f in dataclasses.fields(TrainConfig)
               if getattr(long.train, f.name) != getattr(short.train, f.name)}
    assert changed == {"epochs", "warmup_epochs", "no_aug_epochs"}
    assert long.model == dataclasses.replace(short.model, depth=6)
    assert long.train.epochs <= 30


def test_the_default_command_trains_the_mnist_preset():
    """No flags at all: the dataset's preset applies, as with ``--config mnist``."""
    assert load_config([])[0] == load_config(["--config", "mnist"])[0]


def test_fashion_preset_changes_only_what_its_comments_explain():
    fashion, _ = load_config(["--config", "fashion-mnist"])
    default = Config()
    changed = {f.name for f in dataclasses.fields(TrainConfig)
               if getattr(fashion.train, f.name) != getattr(default.train, f.name)}
    assert changed == {"dataset", "epochs", "lr", "augment", "aug_hflip", "aug_rotate",
                       "aug_zoom"}
    assert fashion.model == dataclasses.replace(default.model, patch_embed="stem", depth=5)


def test_choosing_a_dataset_applies_its_preset_under_file_and_flags(tmp_path):
    fashion, explicit = load_config(["--dataset", "fashion-mnist", "--epochs", "3"])
    assert fashion == load_config(["--config", "fashion-mnist", "--epochs", "3"])[0]
    assert explicit == {"dataset", "epochs"}  # preset values never override a checkpoint's
    path = tmp_path / "mine.toml"
    path.write_text('dataset = "fashion-mnist"\naug_hflip = false\n')
    mine, explicit = load_config(["--config", str(path)])
    preset = load_config(["--dataset", "fashion-mnist"])[0]
    assert mine.train.epochs == preset.train.epochs and preset.train.aug_hflip
    assert not mine.train.aug_hflip
    assert explicit == {"dataset", "aug_hflip"}


def test_augmentation_flags_reach_the_loader():
    cfg, _ = load_config(["--aug-shift", "3", "--aug-rotate", "0", "--aug-hflip", "true",
                          "--epochs", "5", "--no-aug-epochs", "2"])
    assert cfg.train.augmentation(2) == Augmentation(shift=3, rotate_deg=0, zoom=0.1, hflip=True)
    assert cfg.train.augmentation(3) is None and cfg.train.augmentation(4) is None
    assert load_config(["--augment", "false"])[0].train.augmentation(0) is None


def test_presets_ship_inside_the_package():
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.toml")) == ["fashion-mnist", "mnist",
                                                                 "mnist-long"]


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('lr = 1e-3\nepochs = 2\ndim = 32\n')
    cfg, explicit = load_config(["--config", str(path), "--lr", "5e-4"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.model.embed_dim) == (5e-4, 2, 32)
    assert {"lr", "epochs", "embed_dim"} <= explicit


@pytest.mark.parametrize("text, message", [
    ("lr = 'fast'\n", "lr"),
    ("learning_rate = 1e-3\n", r"unknown key\(s\) learning_rate"),
    ("lr = \n", "not valid TOML"),
])
def test_bad_file_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(["--config", str(path)])


def test_missing_preset_lists_the_presets():
    with pytest.raises(ConfigError,
                       match=r"not found \(presets: fashion-mnist, mnist, mnist-long\)"):
        load_config(["--config", "cifar"])


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--max-steps", "0"], "--max-steps must be a positive integer, got 0"),
    (["--lr", "0"], "--lr must be positive, got 0.0"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1), got 1.0"),
    (["--dim", "30", "--heads", "4"], "--dim (30) must be divisible by --heads (4)"),
    (["--patch-size", "5"], "--patch-size (5) must divide --img-size (28)"),
    (["--depth", "0"], "--depth must be a positive integer, got 0"),
    (["--patch-overlap", "2"], "positive with --patch-embed conv; got 2 with stem"),
    (["--patch-embed", "conv", "--patch-overlap", "-1"], "--patch-overlap must be 0"),
    (["--patch-embed", "stem", "--patch-size", "7"], "--patch-size a power of 2 >= 2"),
    (["--patch-embed", "stem", "--patch-overlap", "1"], "positive with --patch-embed conv"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must not be negative, got -1.0"),
    (["--grad-clip", "-1"], "--grad-clip must not be negative, got -1.0"),
    (["--aug-zoom", "1"], "--aug-zoom must be in [0, 1), got 1.0"),
    (["--aug-rotate", "-5"], "--aug-rotate must not be negative, got -5.0"),
    (["--no-aug-epochs", "-1"], "--no-aug-epochs must not be negative, got -1"),
    (["--drop-rate", "1"], "--drop-rate must be in [0, 1), got 1.0"),
    (["--resume", "auto"], "--resume auto needs --run-dir"),
    (["--resume", "must"], "--resume must needs --run-dir"),
])
def test_impossible_settings(argv, message):
    """Each message names the setting as its flag is typed (`--batch-size`, not batch_size)."""
    with pytest.raises(ConfigError) as caught:
        load_config(argv)
    assert message in str(caught.value)
    assert "_" not in str(caught.value)  # no field names such as batch_size


def test_abbreviated_flags_are_refused():
    """argparse would read --resum as --resume; a typo must be an error, not a guess."""
    with pytest.raises(ConfigError, match="unrecognized arguments: --resum"):
        load_config(["--resum", "auto", "--run-dir", "x"])
