"""``python -m dpvit.export`` and ``python -m dpvit.train --init-from``: timm-layout safetensors.

timm (with torch) is a test-time reference only, like torch in tests/test_vs_torch.py: the
exported file, loaded into ``timm.models.vision_transformer.VisionTransformer`` with
``strict=True`` by the very snippet the command prints, must compute dpvit's logits.
``.ci/run`` installs torch, torchvision and timm; without them these tests fail under CI=1 and
are skipped elsewhere.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, TINY_ARGS, missing, real_data_dir, run_dpvit, train

from dpvit.checkpoint import Checkpoint, save_checkpoint
from dpvit.config import Config
from dpvit.data import DATASETS, load_split, normalize, prepare_dataset, train_batches
from dpvit.errors import ConfigError, UserError
from dpvit.inference import load_model
from dpvit.interop.timm_layout import loading_snippet, metadata, timm_kwargs, to_timm
from dpvit.interop.weights import load_init_weights, read_weights, save_weights
from dpvit.nn.losses import CrossEntropyLoss
from dpvit.vit import VisionTransformer, ViTConfig

INSTALL_TIMM = "pip install torch==2.14.1 torchvision==0.29.1 timm"
#: the (pool, patch embedding, position embedding) of the trained checkpoints
KINDS = {"cls-linear": ["--pool", "cls", "--patch-embed", "linear"],
         "mean-conv-sincos": ["--pool", "mean", "--patch-embed", "conv", "--pos-embed", "sincos"]}


@pytest.fixture(autouse=True)
def _safetensors():
    """The export extra (in the test extra too): without it these tests fail under CI=1."""
    try:
        import safetensors.numpy  # noqa: F401
    except ImportError:
        missing("safetensors (the export extra)", 'pip install -e ".[test,export]"')


def _timm():
    try:
        import safetensors.torch  # noqa: F401
        import timm.models.vision_transformer
        import torch
    except ImportError as err:  # CI installs them: there the comparison fails, not skips
        missing(f"timm and torch (the test references; {err})", INSTALL_TIMM)
    return torch, timm.models.vision_transformer


def _error_line(result) -> str:
    """The one error line of a failed command (and nothing like a traceback)."""
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints after 3 training steps: cls pooling with the linear patch embedding,
    mean pooling with the conv one (and the fixed sin-cos position embedding)."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, flags in KINDS.items():
        train(root / name, "--max-steps", "3", *flags)
        out[name] = root / name / "checkpoints" / "last.h5"
    return out


def _export(checkpoint: Path, out: Path) -> str:
    result = run_dpvit("export", ["--checkpoint", str(checkpoint), "--out", str(out)])
    assert result.returncode == 0, result.stderr
    assert out.is_file()
    return result.stdout


def _test_images(n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    store = prepare_dataset("mnist", str(real_data_dir()))
    images, labels = load_split(store, "test")
    return images[:n], labels[:n]


@pytest.mark.parametrize("kind", list(KINDS))
def test_exported_checkpoint_gives_dpvits_logits_in_timm(trained, tmp_path, kind):
    torch, _ = _timm()
    out = tmp_path / "vit.safetensors"
    printed = _export(trained[kind], out)
    namespace: dict = {}
    exec(printed, namespace)  # the printed snippet: builds the timm model, loads strict=True
    timm_model = namespace["model"]
    meta = namespace["meta"]
    dp_model, cfg, _ = load_model(trained[kind])
    assert json.loads(meta["timm_kwargs"]) == timm_kwargs(cfg.model)
    # the recorded normalisation is what dpvit applies to the idx pixels
    norm = namespace["norm"]
    images, _ = _test_images()
    x = normalize(images, norm["mean"][0], norm["std"][0])
    np.testing.assert_array_equal(x, normalize(images, DATASETS["mnist"].mean,
                                               DATASETS["mnist"].std))
    want = dp_model.forward(x)
    with torch.no_grad():
        got = timm_model(torch.from_numpy(x)).numpy()
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()
    assert np.abs(want).max() > 0.1  # not a trivially zero model


@pytest.mark.parametrize("variant", [
    {"pool": "mean", "patch_embed": "linear"},
    {"pool": "cls", "patch_embed": "conv", "pos_embed": "sincos"},
    {"qkv_bias": False, "depth": 2, "mlp_ratio": 1.5, "num_heads": 4},
    {"img_size": 32, "patch_size": 8, "in_chans": 3, "num_classes": 7, "pool": "mean"},
])
def test_layout_variants_match_timm(tmp_path, variant):
    """Shapes and options beyond the trained pair, on random weights (no training)."""
    torch, _ = _timm()
    cfg = ViTConfig(**{"embed_dim": 16, "depth": 1, "num_heads": 2, "patch_size": 7, **variant})
    model = VisionTransformer(cfg, np.float32, seed=1)
    rng = np.random.default_rng(0)
    model.store.flat_params[...] = rng.normal(0, 0.3, model.store.flat_params.shape)
    out = tmp_path / "vit.safetensors"
    save_weights(out, to_timm(model.store.named_params(), cfg),
                 metadata(cfg, DATASETS["mnist"], {}))
    namespace: dict = {}
    exec(loading_snippet(str(out)), namespace)
    x = rng.normal(size=(4, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(np.float32)
    with torch.no_grad():
        got = namespace["model"](torch.from_numpy(x)).numpy()
    assert np.abs(got - model.forward(x)).max() <= 1e-4


def test_init_from_continues_where_the_exported_model_left_off(trained, tmp_path):
    """Export, --init-from, one more epoch: the first logged loss is the exported model's
    loss on that batch, and the optimizer started fresh (its step count restarts)."""
    out = tmp_path / "vit.safetensors"
    _export(trained["cls-linear"], out)
    run = tmp_path / "finetune"
    flags = ["--epochs", "1", "--log-every", "1", "--augment", "false", *KINDS["cls-linear"]]
    result = train(run, "--init-from", str(out), *flags)
    assert "starting from the weights in" in result.stderr
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if m.get("kind") == "step"]
    assert [m["step"] for m in steps] == list(range(1, 9))  # a new run, not a resume

    # the first batch of that run (epoch 0, seed 0, one rank, no augmentation)
    model, cfg, _ = load_model(trained["cls-linear"])
    store = prepare_dataset("mnist", str(real_data_dir()))
    images, labels = load_split(store, "train")
    n = int(TINY_ARGS[TINY_ARGS.index("--train-subset") + 1])
    batch = int(TINY_ARGS[TINY_ARGS.index("--batch-size") + 1])
    first = train_batches(n, batch, 0, 0, 0, 1)[0]
    info = DATASETS["mnist"]
    logits = model.forward(normalize(images[first], info.mean, info.std))
    want, _ = CrossEntropyLoss(cfg.train.label_smoothing)(logits, labels[first].astype(np.int64),
                                                          denominator=batch)
    assert steps[0]["loss"] == pytest.approx(want, rel=1e-5)
    # the guard is not vacuous: the same run from a fresh initialisation starts elsewhere
    fresh = tmp_path / "fresh"
    train(fresh, "--max-steps", "1", *flags)
    fresh_first = json.loads((fresh / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(fresh_first["loss"] - want) > 1e-3


def test_reset_head_keeps_a_new_head_and_accepts_another_class_count(trained, tmp_path):
    out = tmp_path / "vit.safetensors"
    _export(trained["cls-linear"], out)
    _, cfg, _ = load_model(trained["cls-linear"])
    five = ViTConfig(**{**cfg.model.__dict__, "num_classes": 5})
    with pytest.raises(ConfigError, match=r"head\.weight has shape \(10, 16\) but the model "
                                          r"config needs \(5, 16\).*--num-classes 10.*"
                                          r"--reset-head"):
        load_init_weights(out, five)
    weights = load_init_weights(out, five, reset_head=True)
    assert "head.weight" not in weights and "blocks.0.attn.qkv.weight" in weights
    tensors, _ = read_weights(out)
    np.testing.assert_array_equal(weights["patch_embed.proj.weight"],
                                  tensors["patch_embed.proj.weight"].reshape(16, 49))


# -- bad inputs: one clear line each ------------------------------------------------------------


def _save_model_checkpoint(path: Path, **model) -> Path:
    cfg = Config(model=ViTConfig(**{"embed_dim": 16, "depth": 1, "num_heads": 2, **model}))
    net = VisionTransformer(cfg.model, np.float32, seed=0)
    save_checkpoint(path, Checkpoint(params={k: v.copy() for k, v in
                                             net.store.named_params().items()},
                                     config=cfg.to_dict()))
    return path


@pytest.mark.parametrize(("model", "says"), [
    ({"patch_embed": "stem", "patch_size": 4}, "--patch-embed stem"),
    ({"patch_embed": "conv", "patch_size": 7, "patch_overlap": 1}, "--patch-overlap 1"),
])
def test_export_refuses_what_timm_cannot_compute(tmp_path, model, says):
    checkpoint = _save_model_checkpoint(tmp_path / "model.h5", **model)
    out = tmp_path / "vit.safetensors"
    line = _error_line(run_dpvit("export", ["--checkpoint", str(checkpoint), "--out", str(out)]))
    assert says in line and "no counterpart in timm" in line and "no file written" in line
    assert not out.exists() and list(tmp_path.iterdir()) == [checkpoint]


def test_export_of_a_missing_or_damaged_checkpoint_is_one_line(tmp_path):
    good = _save_model_checkpoint(tmp_path / "good.h5", patch_size=7)
    damaged = tmp_path / "damaged.h5"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    (tmp_path / "text.h5").write_text("not a checkpoint\n")
    out = tmp_path / "vit.safetensors"
    for name, says in (("absent.h5", "does not exist"), ("damaged.h5", "damaged"),
                       ("text.h5", "checkpoint")):
        result = run_dpvit("export", ["--checkpoint", str(tmp_path / name), "--out", str(out)])
        assert says in _error_line(result), name
        assert not out.exists()


def test_init_from_a_file_of_other_shapes_names_the_first_tensor(tmp_path):
    out = tmp_path / "vit.safetensors"
    checkpoint = _save_model_checkpoint(tmp_path / "model.h5", patch_size=7)
    result = run_dpvit("export", ["--checkpoint", str(checkpoint), "--out", str(out), "--quiet"])
    assert result.returncode == 0 and result.stdout == "", result.stderr
    run = tmp_path / "run"
    wider = [*TINY_ARGS, "--dim", "32", "--run-dir", str(run), "--init-from", str(out)]
    line = _error_line(run_dpvit("train", wider))
    assert "tensor cls_token has shape (1, 1, 16) but the model config needs (1, 1, 32)" in line
    assert "exported from a model with --dim 16" in line
    assert not run.exists()  # refused before the run directory is created


@pytest.mark.parametrize(("content", "says"), [
    (None, "no such file"),
    (b"not safetensors at all", "is not a readable safetensors file"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1", "is not a readable safetensors file"),
])
def test_init_from_a_missing_or_foreign_file_is_one_line(tmp_path, content, says):
    path = tmp_path / "weights.safetensors"
    if content is not None:
        path.write_bytes(content)
    run = tmp_path / "run"
    line = _error_line(run_dpvit("train", [*TINY_ARGS, "--run-dir", str(run),
                                           "--init-from", str(path)]))
    assert says in line and str(path) in line
    assert not run.exists()


def test_init_from_an_hdf5_checkpoint_is_one_line(tmp_path):
    checkpoint = _save_model_checkpoint(tmp_path / "model.h5", patch_size=7)
    with pytest.raises(UserError, match="is not a readable safetensors file"):
        load_init_weights(checkpoint, ViTConfig(embed_dim=16, depth=1, num_heads=2,
                                                patch_size=7))


def _without(module: str, command: str, args: list[str]):
    """Run ``python -m dpvit.<command> args`` as if ``module`` were not installed."""
    code = (f"import sys; sys.modules[{module!r}] = None; sys.argv[0] = 'dpvit.{command}'; "
            f"from dpvit.{command} import main; main()")
    return run_dpvit_code(code, args)


def run_dpvit_code(code: str, args: list[str]):
    import os
    import subprocess

    env = {**os.environ, "DPVIT_DATA_DIR": str(real_data_dir())}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO)


def test_missing_safetensors_names_the_pip_command(tmp_path):
    checkpoint = _save_model_checkpoint(tmp_path / "model.h5", patch_size=7)
    out = tmp_path / "vit.safetensors"
    line = _error_line(_without("safetensors", "export",
                                ["--checkpoint", str(checkpoint), "--out", str(out)]))
    assert 'pip install "safetensors>=0.4"' in line and not out.exists()
    (tmp_path / "w.safetensors").write_bytes(b"")
    line = _error_line(_without("safetensors", "train", [
        *TINY_ARGS, "--run-dir", str(tmp_path / "run"),
        "--init-from", str(tmp_path / "w.safetensors")]))
    assert "--init-from needs the optional package safetensors" in line
    assert 'pip install "safetensors>=0.4"' in line
