"""Every layer and loss: finite-difference gradient checks (float64), shapes and dtypes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from gradcheck import TOLERANCE, check_layer, numeric_grad, rel_err

from dpvit.nn import functional as F
from dpvit.nn.attention import Attention
from dpvit.nn.layers import GELU, Conv2d, Dropout, Flatten, LayerNorm, Linear, ReLU
from dpvit.nn.losses import CrossEntropyLoss, MSELoss
from dpvit.nn.params import ParamStore
from dpvit.nn.patch_embed import PatchEmbed
from dpvit.vit import Block, Mlp, ViTConfig

rng = np.random.default_rng(42)


def keyed_dropout(p: float, batch: int) -> Dropout:
    layer = Dropout(p, layer_id=3)
    layer.set_keys(seed=7, step=1, sample_ids=np.arange(100, 100 + batch))
    return layer


def keyed(layer, batch: int):
    """Key every dropout inside ``layer`` so its masks stay fixed across forward calls."""
    for _, module in layer.named_modules():
        if isinstance(module, Dropout):
            module.set_keys(seed=7, step=1, sample_ids=np.arange(batch))
    return layer


def relu_input() -> np.ndarray:
    """ReLU has a kink at 0: keep every entry at least 0.1 away from it."""
    x = rng.standard_normal((3, 5, 4))
    return np.where(np.abs(x) < 0.1, 0.5, x)


CASES = {
    "linear": (lambda: Linear(6, 5), lambda: rng.standard_normal((3, 4, 6))),
    "linear_no_bias": (lambda: Linear(6, 5, bias=False), lambda: rng.standard_normal((7, 6))),
    "conv_3x3_pad1": (lambda: Conv2d(2, 3, 3, 1, 1), lambda: rng.standard_normal((2, 2, 5, 5))),
    "conv_3x3_stride2": (lambda: Conv2d(2, 3, 3, 2, 0), lambda: rng.standard_normal((2, 2, 7, 7))),
    "conv_patch": (lambda: Conv2d(1, 4, 2, 2, 0), lambda: rng.standard_normal((2, 1, 4, 4))),
    "layernorm": (lambda: LayerNorm(6), lambda: rng.standard_normal((3, 4, 6))),
    "relu": (ReLU, relu_input),
    "gelu": (GELU, lambda: rng.standard_normal((3, 5, 4)) * 2),
    "dropout": (lambda: keyed_dropout(0.4, 3), lambda: rng.standard_normal((3, 5, 4))),
    "flatten": (Flatten, lambda: rng.standard_normal((3, 2, 2, 2))),
    "attention": (lambda: Attention(8, 2), lambda: rng.standard_normal((2, 5, 8))),
    "attention_dropout": (
        lambda: keyed(Attention(8, 2, attn_drop=0.3, proj_drop=0.2), 2),
        lambda: rng.standard_normal((2, 5, 8)),
    ),
    "patch_embed_linear": (
        lambda: PatchEmbed(8, 4, 2, 6, "linear"),
        lambda: rng.standard_normal((2, 2, 8, 8)),
    ),
    "patch_embed_conv": (
        lambda: PatchEmbed(8, 4, 2, 6, "conv"),
        lambda: rng.standard_normal((2, 2, 8, 8)),
    ),
    "patch_embed_stem": (
        lambda: PatchEmbed(8, 4, 2, 6, "stem"),
        lambda: rng.standard_normal((2, 2, 8, 8)),
    ),
    "mlp": (lambda: keyed(Mlp(6, 10, 0.25, 0), 2), lambda: rng.standard_normal((2, 3, 6))),
    "block": (
        lambda: Block(ViTConfig(embed_dim=8, num_heads=2, mlp_ratio=2.0), 0),
        lambda: rng.standard_normal((2, 5, 8)),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_gradients_match_finite_differences(case):
    make_layer, make_input = CASES[case]
    errors = check_layer(make_layer(), make_input())
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOLERANCE, f"{case}: {worst} rel err {errors[worst]:.2e} ({errors})"


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_keeps_float32(case):
    make_layer, make_input = CASES[case]
    layer = make_layer()
    store = ParamStore(layer, np.float32)
    store.flat_params[:] = rng.standard_normal(store.numel).astype(np.float32) * 0.1
    x = make_input().astype(np.float32)
    y = layer.forward(x, train=True)
    dx = layer.backward(np.ones_like(y))
    assert y.dtype == np.float32 and dx.dtype == np.float32 and dx.shape == x.shape
    assert store.flat_grads.dtype == np.float32


def test_backward_without_forward_is_a_clear_error():
    layer = Linear(3, 2)
    ParamStore(layer, np.float64)
    with pytest.raises(RuntimeError, match="without a forward pass"):
        layer.backward(np.ones((1, 2)))


def test_conv_matches_direct_convolution():
    """im2col convolution equals the textbook sum over the kernel window."""
    conv = Conv2d(2, 3, 3, stride=2, padding=1)
    store = ParamStore(conv, np.float64)
    store.flat_params[:] = rng.standard_normal(store.numel)
    x = rng.standard_normal((2, 2, 6, 5))
    y = conv.forward(x, train=False)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    w, b = conv.params["weight"], conv.params["bias"]
    expected = np.zeros_like(y)
    for i in range(y.shape[2]):
        for j in range(y.shape[3]):
            window = xp[:, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3]
            expected[:, :, i, j] = np.einsum("bckl,ockl->bo", window, w) + b
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_linear_and_conv_patch_embedding_agree():
    """The linear patch embedding is the conv one with its weight flattened."""
    lin, conv = PatchEmbed(8, 4, 2, 6, "linear"), PatchEmbed(8, 4, 2, 6, "conv")
    s_lin, s_conv = ParamStore(lin, np.float64), ParamStore(conv, np.float64)
    s_conv.flat_params[:] = rng.standard_normal(s_conv.numel)
    s_lin.flat_params[:] = s_conv.flat_params  # same (O, C*p*p) order, same bias
    x = rng.standard_normal((3, 2, 8, 8))
    np.testing.assert_allclose(lin.forward(x, False), conv.forward(x, False), rtol=1e-12)


def test_stem_patch_embedding_is_strided_convs_with_relu():
    """p = 4: conv 3x3/2 to D/2 channels, ReLU, conv 3x3/2 to D; the same grid as p x p patches."""
    stem = PatchEmbed(8, 4, 2, 6, "stem")
    store = ParamStore(stem, np.float64)
    store.flat_params[:] = rng.standard_normal(store.numel)
    assert [tuple(v.shape) for v in store.named_params().values()] == [
        (3, 2, 3, 3), (3,), (6, 3, 3, 3), (6,)]
    x = rng.standard_normal((3, 2, 8, 8))
    first, second = Conv2d(2, 3, 3, 2, 1), Conv2d(3, 6, 3, 2, 1)
    for conv, name in ((first, "stem.0."), (second, "proj.")):
        ParamStore(conv, np.float64)
        for local in ("weight", "bias"):
            conv.params[local][...] = store.named_params()[name + local]
    expected = second.forward(np.maximum(first.forward(x, False), 0), False)  # (3, 6, 2, 2)
    np.testing.assert_allclose(stem.forward(x, False),
                               expected.reshape(3, 6, 4).transpose(0, 2, 1), rtol=1e-12)


def test_gelu_is_the_tanh_form():
    x = np.linspace(-4, 4, 17)
    y = GELU().forward(x, train=False)
    expected = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(y, expected, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_without_the_max_shift_redoes_extreme_rows(dtype):
    """softmax_fwd leaves out the shift by the row maximum; rows whose exp would overflow or
    underflow are redone with it, silently."""
    x = rng.standard_normal((3, 4, 6)) * 3
    x[0, 1] += 500.0  # exp overflows float32, and leaves the safe range of sums in float64
    x[1, 2] -= 500.0  # every exp underflows
    x[2, 3, 0] = 80.0  # one score near float32's limit
    x = x.astype(dtype)
    expected = np.exp(x - x.max(axis=-1, keepdims=True), dtype=np.float64)
    expected /= expected.sum(axis=-1, keepdims=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = F.softmax_fwd(x)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, expected, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-7 if dtype == np.float32 else 1e-15)


def test_dropout_masks_depend_on_sample_not_batch_position():
    x = np.ones((4, 6))
    full = keyed_dropout(0.5, 4).forward(x, train=True)
    part = Dropout(0.5, layer_id=3)
    part.set_keys(seed=7, step=1, sample_ids=np.arange(102, 104))
    np.testing.assert_array_equal(part.forward(x[2:], train=True), full[2:])
    assert np.array_equal(Dropout(0.5).forward(x, train=False), x)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_gradient(smoothing):
    loss_fn = CrossEntropyLoss(label_smoothing=smoothing)
    logits = rng.standard_normal((5, 4)) * 3
    targets = np.array([0, 3, 1, 1, 2])
    _, dlogits = loss_fn(logits, targets, denominator=8)
    numeric = numeric_grad(lambda: loss_fn(logits, targets, denominator=8)[0], logits)
    assert rel_err(dlogits, numeric) < TOLERANCE


def test_cross_entropy_value_and_stability():
    logits = np.array([[1000.0, 0.0], [0.0, 0.0]])
    loss, dlogits = CrossEntropyLoss()(logits, np.array([0, 1]))
    assert np.isfinite(loss) and np.all(np.isfinite(dlogits))
    np.testing.assert_allclose(loss, np.log(2) / 2, rtol=1e-12)
    smooth, _ = CrossEntropyLoss(0.2)(np.zeros((1, 4)), np.array([2]))
    np.testing.assert_allclose(smooth, np.log(4), rtol=1e-12)  # uniform logits: log K always


def test_mse_gradient():
    pred, target = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    loss, dpred = MSELoss()(pred, target)
    np.testing.assert_allclose(loss, np.mean((pred - target) ** 2), rtol=1e-12)
    assert rel_err(dpred, numeric_grad(lambda: MSELoss()(pred, target)[0], pred)) < TOLERANCE


def test_loss_input_errors():
    with pytest.raises(ValueError, match="class indices"):
        CrossEntropyLoss()(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="shape"):
        MSELoss()(np.zeros((2, 3)), np.zeros((2, 2)))
