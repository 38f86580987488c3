"""The whole model: gradient check with the loss, flat-buffer views, shapes, errors, learning."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import TOLERANCE, numeric_grad, rel_err

from dpvit.nn.losses import CrossEntropyLoss
from dpvit.optim import AdamW
from dpvit.vit import VisionTransformer, ViTConfig, expected_num_params

TINY = dict(img_size=8, patch_size=4, in_chans=1, embed_dim=8, depth=1, num_heads=2,
            mlp_ratio=2.0, num_classes=3)


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(patch_embed="conv", pool="mean", pos_embed="sincos", in_chans=2),
        dict(drop_rate=0.2, attn_drop_rate=0.1, depth=2),
        dict(patch_embed="conv", patch_overlap=1),
        dict(patch_embed="stem", in_chans=2),
    ],
    ids=["linear-cls-learned", "conv-mean-sincos", "dropout-depth2", "conv-overlap", "stem"],
)
def test_tiny_vit_with_loss_matches_finite_differences(variant):
    cfg = ViTConfig(**{**TINY, **variant})
    model = VisionTransformer(cfg, dtype=np.float64, seed=1)
    rng = np.random.default_rng(0)
    model.store.flat_params[:] = rng.standard_normal(model.store.numel) * 0.3
    x = rng.standard_normal((3, cfg.in_chans, 8, 8))
    y = np.array([0, 2, 1])
    loss_fn = CrossEntropyLoss(label_smoothing=0.1)
    model.set_dropout_keys(seed=5, step=0, sample_ids=np.arange(3))

    def loss() -> float:
        return loss_fn(model.forward(x, train=True), y)[0]

    model.store.zero_grad()
    _, dlogits = loss_fn(model.forward(x, train=True), y)
    dx = model.backward(dlogits)
    assert rel_err(dx, numeric_grad(loss, x)) < TOLERANCE
    numeric = numeric_grad(loss, model.store.flat_params)
    for spec in model.store.specs:
        sl = slice(spec.offset, spec.offset + spec.size)
        err = rel_err(model.store.flat_grads[sl], numeric[sl])
        assert err < TOLERANCE, f"{spec.name}: rel err {err:.2e}"


def test_default_preset_parameter_count_and_names():
    cfg = ViTConfig()
    model = VisionTransformer(cfg)
    assert model.num_params() == expected_num_params(cfg) == 205_962
    names = [s.name for s in model.store.specs]
    for name in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.5.attn.qkv.weight",
                 "blocks.3.mlp.fc2.bias", "blocks.0.norm1.weight", "norm.weight", "head.bias"):
        assert name in names


@pytest.mark.parametrize("variant", [dict(), dict(patch_embed="conv", pos_embed="sincos"),
                                     dict(patch_embed="conv", patch_overlap=2),
                                     dict(patch_embed="stem", patch_size=2)])
def test_every_parameter_is_a_view_into_the_flat_buffer(variant):
    model = VisionTransformer(ViTConfig(**{**TINY, **variant}))
    store = model.store
    covered = np.zeros(store.numel, dtype=bool)
    for _, module in model.named_modules():
        for local, view in module.params.items():
            assert np.shares_memory(view, store.flat_params), local
            assert np.shares_memory(module.grads[local], store.flat_grads), local
    for spec in store.specs:
        assert not covered[spec.offset : spec.offset + spec.size].any(), "overlapping views"
        covered[spec.offset : spec.offset + spec.size] = True
    assert covered.all(), "gap in the flat buffer"
    assert expected_num_params(model.cfg) == store.numel


@pytest.mark.parametrize("variant", [dict(), dict(patch_embed="conv", patch_overlap=1),
                                     dict(patch_embed="stem")])
def test_backward_without_input_grad_gives_the_same_parameter_gradients(variant):
    """Training skips d(images); every parameter gradient is unchanged by that."""
    model = VisionTransformer(ViTConfig(**{**TINY, **variant}), dtype=np.float64, seed=2)
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8))
    grads = []
    for input_grad in (True, False):
        model.store.zero_grad()
        dx = model.backward(np.ones((4, 3)) - 3 * model.forward(x, train=True),
                            input_grad=input_grad)
        assert (dx is None) == (not input_grad)
        grads.append(model.store.flat_grads.copy())
    assert np.array_equal(grads[0], grads[1]) and np.abs(grads[0]).max() > 0


def test_output_shapes_and_dtypes():
    model = VisionTransformer(ViTConfig())
    x = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    logits = model.forward(x, train=True)
    assert logits.shape == (5, 10) and logits.dtype == np.float32
    dx = model.backward(np.ones_like(logits))
    assert dx.shape == x.shape and dx.dtype == np.float32
    model64 = VisionTransformer(ViTConfig(**TINY), dtype=np.float64)
    assert model64.forward(np.zeros((2, 1, 8, 8)), train=False).dtype == np.float64


def test_wrong_image_shape_is_one_clear_error():
    model = VisionTransformer(ViTConfig())
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 1, 28, 28\), got "
                                         r"\(2, 1, 32, 32\)"):
        model.forward(np.zeros((2, 1, 32, 32), np.float32))


def test_heads_must_divide_embed_dim():
    with pytest.raises(ValueError, match=r"--dim \(64\) must be divisible by --heads \(5\)"):
        VisionTransformer(ViTConfig(num_heads=5))


def test_overfits_one_batch():
    """A working forward/backward/optimizer drives the loss on one fixed batch towards zero."""
    cfg = ViTConfig(**{**TINY, "embed_dim": 16, "depth": 2})
    model = VisionTransformer(cfg, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 12)
    opt = AdamW(model.store, lr=3e-3, weight_decay=0.0)
    loss_fn = CrossEntropyLoss()
    first = None
    for _ in range(150):
        model.store.zero_grad()
        loss, dlogits = loss_fn(model.forward(x, train=True), y)
        first = loss if first is None else first
        model.backward(dlogits)
        opt.step()
    assert loss < 0.05 < first
    assert (model.forward(x).argmax(axis=1) == y).all()


@pytest.mark.parametrize("patch_embed", ["linear", "conv"])
def test_init_follows_the_jax_vit(patch_embed):
    model = VisionTransformer(ViTConfig(patch_embed=patch_embed), dtype=np.float64, seed=1)
    p = model.store.named_params()
    qkv = p["blocks.0.attn.qkv.weight"]  # xavier-uniform: U(+-sqrt(6 / (64 + 192)))
    bound = np.sqrt(6 / (64 + 192))
    assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.95 * bound
    assert qkv.std() == pytest.approx(bound / np.sqrt(3), rel=0.02)
    assert p["patch_embed.proj.weight"].std() == pytest.approx(1 / 4, rel=0.05)  # fan_in 16
    pos = p["pos_embed"]  # truncated, not clipped: nothing piles up at the bounds
    assert np.abs(pos).max() <= 0.04 and np.count_nonzero(np.abs(pos) > 0.0399) < 3
    assert pos.std() == pytest.approx(0.02 * 0.88, rel=0.05)  # std of N(0,1) cut at 2 is 0.88
    assert np.abs(p["cls_token"]).max() < 1e-5
    assert not p["head.bias"].any() and not p["blocks.0.mlp.fc1.bias"].any()
    assert (p["norm.weight"] == 1).all() and not p["norm.bias"].any()
    again = VisionTransformer(ViTConfig(patch_embed=patch_embed), dtype=np.float64, seed=1)
    assert np.array_equal(again.store.flat_params, model.store.flat_params)


def test_stem_init_is_he_then_lecun():
    """The stem conv before the ReLU is He-normal, the last one (the patch projection)
    lecun-normal, as the linear patch embedding."""
    cfg = ViTConfig(patch_embed="stem")
    p = VisionTransformer(cfg, dtype=np.float64, seed=1).store.named_params()
    assert p["patch_embed.stem.0.weight"].shape == (32, 1, 3, 3)
    assert p["patch_embed.stem.0.weight"].std() == pytest.approx(np.sqrt(2 / 9), rel=0.1)
    assert p["patch_embed.proj.weight"].shape == (64, 32, 3, 3)
    assert p["patch_embed.proj.weight"].std() == pytest.approx(1 / np.sqrt(288), rel=0.05)
    assert not p["patch_embed.stem.0.bias"].any()
    assert VisionTransformer(cfg).num_params() == expected_num_params(cfg) == 223_690
