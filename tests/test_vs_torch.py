"""dpvit against PyTorch on the same weights: logits, every gradient, optimizer steps.

torch is a test-time reference only (never a dependency of dpvit); `.ci/run` installs the
local CPU build so these tests run in CI.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import missing

from dpvit.nn.losses import CrossEntropyLoss, MSELoss
from dpvit.nn.params import ParamStore
from dpvit.optim import SGD, AdamW, clip_grad_norm_, lr_at
from dpvit.vit import VisionTransformer, ViTConfig

try:
    import torch
except ImportError:  # CI installs it: there the comparison fails instead of skipping
    missing("PyTorch (the test reference)", "pip install torch==2.14.1 torchvision==0.29.1 timm")
F = torch.nn.functional


def torch_vit(params: dict[str, torch.Tensor], x: torch.Tensor, cfg: ViTConfig) -> torch.Tensor:
    """The timm ViT forward written with torch ops over dpvit's named parameters."""
    B = x.shape[0]
    if cfg.patch_embed == "stem":  # conv 3x3/2, ReLU, conv 3x3/2 for patch_size 4
        h = F.relu(F.conv2d(x, params["patch_embed.stem.0.weight"],
                            params["patch_embed.stem.0.bias"], stride=2, padding=1))
        h = F.conv2d(h, params["patch_embed.proj.weight"], params["patch_embed.proj.bias"],
                     stride=2, padding=1)
    else:
        k = cfg.patch_size + 2 * cfg.patch_overlap
        w = params["patch_embed.proj.weight"].reshape(cfg.embed_dim, cfg.in_chans, k, k)
        h = F.conv2d(x, w, params["patch_embed.proj.bias"], stride=cfg.patch_size,
                     padding=cfg.patch_overlap)
    h = h.flatten(2).transpose(1, 2)
    h = torch.cat([params["cls_token"].expand(B, -1, -1), h], dim=1) + params["pos_embed"]
    H, D = cfg.num_heads, cfg.embed_dim

    def ln(t, name):
        return F.layer_norm(t, (D,), params[f"{name}.weight"], params[f"{name}.bias"], eps=1e-6)

    for i in range(cfg.depth):
        p = f"blocks.{i}."
        T = h.shape[1]
        qkv = F.linear(ln(h, p + "norm1"), params[p + "attn.qkv.weight"],
                       params[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) * (D // H) ** -0.5, dim=-1) @ v
        h = h + F.linear(a.transpose(1, 2).reshape(B, T, D), params[p + "attn.proj.weight"],
                         params[p + "attn.proj.bias"])
        m = F.linear(ln(h, p + "norm2"), params[p + "mlp.fc1.weight"], params[p + "mlp.fc1.bias"])
        m = F.linear(F.gelu(m, approximate="tanh"), params[p + "mlp.fc2.weight"],
                     params[p + "mlp.fc2.bias"])
        h = h + m
    h = ln(h, "norm")
    return F.linear(h[:, 0], params["head.weight"], params["head.bias"])


@pytest.mark.parametrize("variant", [{}, {"patch_embed": "conv", "patch_overlap": 2},
                                     {"patch_embed": "stem"}],
                         ids=["default", "overlapping-conv-patches", "conv-stem"])
def test_default_vit_logits_and_gradients_match_torch(variant):
    cfg = ViTConfig(depth=2, **variant)
    model = VisionTransformer(cfg, dtype=np.float64, seed=3)
    rng = np.random.default_rng(0)
    model.store.flat_params += rng.standard_normal(model.store.numel) * 0.05
    x = rng.random((6, 1, 28, 28))
    y = rng.integers(0, 10, 6)
    logits = model.forward(x, train=True)
    loss, dlogits = CrossEntropyLoss(0.1)(logits, y)
    model.backward(dlogits)

    named = model.store.named_params()
    tparams = {n: torch.tensor(v, requires_grad=True) for n, v in named.items()}
    tlogits = torch_vit(tparams, torch.tensor(x), cfg)
    tloss = F.cross_entropy(tlogits, torch.tensor(y), label_smoothing=0.1)
    tloss.backward()
    np.testing.assert_allclose(logits, tlogits.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(loss, tloss.item(), rtol=1e-12)
    for name, tp in tparams.items():
        np.testing.assert_allclose(model.store.grad(name), tp.grad.numpy(), rtol=1e-8,
                                   atol=1e-12, err_msg=name)


def test_mse_matches_torch():
    rng = np.random.default_rng(1)
    pred, target = rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    loss, dpred = MSELoss()(pred, target)
    tp = torch.tensor(pred, requires_grad=True)
    tl = F.mse_loss(tp, torch.tensor(target))
    tl.backward()
    np.testing.assert_allclose(loss, tl.item(), rtol=1e-12)
    np.testing.assert_allclose(dpred, tp.grad.numpy(), rtol=1e-12)


def _run_optimizer(make_ours, make_torch, steps=5):
    model = VisionTransformer(ViTConfig(img_size=8, embed_dim=8, depth=1, num_heads=2),
                              dtype=np.float64)
    store: ParamStore = model.store
    rng = np.random.default_rng(2)
    named = store.named_params()
    tparams = {n: torch.tensor(v.copy(), requires_grad=True) for n, v in named.items()}
    decayed = [tparams[s.name] for s in store.specs if not s.no_weight_decay]
    plain = [tparams[s.name] for s in store.specs if s.no_weight_decay]
    ours, theirs = make_ours(store), make_torch(decayed, plain)
    for _ in range(steps):
        grads = rng.standard_normal(store.numel)
        store.flat_grads[:] = grads
        ours.step()
        for name, view in store.named_views(grads).items():
            tparams[name].grad = torch.tensor(view.copy())
        theirs.step()
    for name, tp in tparams.items():
        np.testing.assert_allclose(store.param(name), tp.detach().numpy(), rtol=1e-10,
                                   atol=1e-14, err_msg=name)


def test_adamw_matches_torch_with_no_decay_groups():
    _run_optimizer(
        lambda s: AdamW(s, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99)),
        lambda d, p: torch.optim.AdamW([{"params": d, "weight_decay": 0.1},
                                        {"params": p, "weight_decay": 0.0}],
                                       lr=1e-2, betas=(0.9, 0.99), eps=1e-8),
    )


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch(nesterov):
    _run_optimizer(
        lambda s: SGD(s, lr=0.05, weight_decay=1e-3, momentum=0.9, nesterov=nesterov),
        lambda d, p: torch.optim.SGD([{"params": d, "weight_decay": 1e-3},
                                      {"params": p, "weight_decay": 0.0}],
                                     lr=0.05, momentum=0.9, nesterov=nesterov),
    )


def test_clipping_and_schedule_match_torch():
    g = np.random.default_rng(3).standard_normal(100) * 3
    tg = torch.tensor(g.copy(), requires_grad=True)
    tg.grad = torch.tensor(g.copy())
    tnorm = torch.nn.utils.clip_grad_norm_([tg], max_norm=1.0)
    norm = clip_grad_norm_(g, 1.0)
    np.testing.assert_allclose(norm, tnorm.item(), rtol=1e-12)
    np.testing.assert_allclose(g, tg.grad.numpy(), rtol=1e-12)
    # warmup then cosine to min_lr
    assert lr_at(0, 1.0, 10, 110, 0.0) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 110, 0.0) == pytest.approx(1.0)
    assert lr_at(60, 1.0, 10, 110, 0.0) == pytest.approx(0.5)
    assert lr_at(110, 1.0, 10, 110, 0.1) == pytest.approx(0.1)
