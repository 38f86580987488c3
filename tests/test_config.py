"""Configuration: defaults, shipped TOML presets, precedence of flags, clear errors."""

from __future__ import annotations

import dataclasses

import pytest

from dpvit.config import CONFIG_DIR, Config, TrainConfig, load_config
from dpvit.data import Augmentation
from dpvit.errors import ConfigError


def test_mnist_preset_is_the_default_recipe():
    preset, explicit = load_config(["--config", "mnist"])
    assert preset == load_config([])[0]
    assert {"lr", "batch_size", "epochs"} <= explicit


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
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.toml")) == ["fashion-mnist", "mnist"]


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
    with pytest.raises(ConfigError, match=r"not found \(presets: fashion-mnist, mnist\)"):
        load_config(["--config", "cifar"])


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "batch_size must be a positive integer"),
    (["--label-smoothing", "1"], "label_smoothing"),
    (["--dim", "30", "--heads", "4"], "divisible by num_heads"),
    (["--patch-overlap", "2"], "positive with patch_embed conv; got 2 with linear"),
    (["--patch-embed", "conv", "--patch-overlap", "-1"], "patch_overlap must be 0"),
    (["--patch-embed", "stem", "--patch-size", "7"], "power of 2 >= 2"),
    (["--patch-embed", "stem", "--patch-overlap", "1"], "positive with patch_embed conv"),
    (["--warmup-epochs", "-1"], "must not be negative"),
    (["--aug-zoom", "1"], "aug_zoom must be in"),
    (["--aug-rotate", "-5"], "aug_rotate must not be negative"),
    (["--no-aug-epochs", "-1"], "no_aug_epochs must not be negative"),
])
def test_impossible_settings(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv)
