"""dpvit's parameters in the layout of timm's ``VisionTransformer`` state dict, and back.

dpvit already names its parameters as timm does (``blocks.3.attn.qkv.weight``), and every
tensor but one has timm's shape and memory order: the fused qkv projection splits its 3*D
outputs as (3, heads, head_dim) in both, Linear weights are (out, in) in both, and conv weights
are (out, in, k, k) in both. The exceptions, handled here:

- ``patch_embed.proj.weight`` of the linear patch embedding is (D, C*p*p), each patch
  flattened in (C, p, p) order (``dpvit.nn.patch_embed``); timm's conv weight (D, C, p, p)
  flattened row-major is that same order, so the map is a reshape.
- ``--pos-embed sincos`` is a fixed table in dpvit, not a parameter; timm's ``pos_embed`` is a
  parameter, so the export writes the table's values into it (zeros in the cls-token slot).
- ``--pool mean`` normalises every token with ``norm`` and then averages the patch tokens
  (the cls token is left out). timm's ``global_pool="avg"`` does the same average, but by
  default it moves the final norm after the pooling (``fc_norm``: LayerNorm of the mean, not
  mean of the LayerNorms); ``fc_norm=False`` keeps it before, as dpvit has it.
- Two of timm's defaults differ from dpvit's arithmetic and are passed explicitly: dpvit's GELU
  is the tanh approximation (``nn.GELU(approximate="tanh")``; timm's default is the exact erf
  form) and its LayerNorm eps is 1e-6 (timm's ViT default too, stated anyway).

timm cannot express the conv stem (``--patch-embed stem``: several 3x3 convs with ReLU) nor an
overlapping patch embedding (``--patch-overlap``: kernel larger than stride, zero padding);
``unsupported`` says so, and the export refuses them rather than write a file that loads into
a different function.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import Any

import numpy as np

from dpvit.errors import ConfigError
from dpvit.vit import VisionTransformer, ViTConfig, sincos_pos_embed

#: What dpvit computes where timm has a choice (written into every exported file).
GELU_APPROXIMATE = "tanh"
LAYER_NORM_EPS = 1e-6


def unsupported(cfg: ViTConfig) -> str | None:
    """Why timm's VisionTransformer cannot compute this model, or None when it can."""
    if cfg.patch_embed == "stem":
        return ("--patch-embed stem (stride-2 3x3 convs with ReLU between them) has no "
                "counterpart in timm's VisionTransformer, whose patch embedding is a single conv")
    if cfg.patch_overlap:
        return (f"--patch-overlap {cfg.patch_overlap} (a {cfg.patch_window}x{cfg.patch_window} "
                f"kernel at stride {cfg.patch_size}, zero-padded) has no counterpart in timm's "
                "VisionTransformer, whose patch conv has kernel = stride and no padding")
    return None


def timm_kwargs(cfg: ViTConfig) -> dict[str, Any]:
    """The JSON-serialisable ``VisionTransformer`` arguments that rebuild ``cfg``'s function
    (with ``act_layer`` and ``norm_layer`` from ``GELU_APPROXIMATE`` and ``LAYER_NORM_EPS``,
    which are not JSON values; ``loading_snippet`` passes them)."""
    kwargs: dict[str, Any] = {
        "img_size": cfg.img_size, "patch_size": cfg.patch_size, "in_chans": cfg.in_chans,
        "num_classes": cfg.num_classes, "embed_dim": cfg.embed_dim, "depth": cfg.depth,
        "num_heads": cfg.num_heads, "mlp_ratio": cfg.mlp_ratio, "qkv_bias": cfg.qkv_bias,
        "class_token": True, "no_embed_class": False,
        "global_pool": "token" if cfg.pool == "cls" else "avg",
    }
    if cfg.pool == "mean":
        kwargs["fc_norm"] = False  # norm each token, then average (timm's default: the reverse)
    return kwargs


def to_timm(params: dict[str, np.ndarray], cfg: ViTConfig) -> dict[str, np.ndarray]:
    """dpvit's named parameters -> timm's state dict (float32, C order, timm's key order).

    Raises:
        ConfigError: the model is one timm cannot express (``unsupported``).
    """
    reason = unsupported(cfg)
    if reason:
        raise ConfigError(reason)
    out: dict[str, np.ndarray] = {}
    for name, value in params.items():
        if name == "patch_embed.proj.weight":
            value = value.reshape(cfg.embed_dim, cfg.in_chans, cfg.patch_size, cfg.patch_size)
        out[name] = value
        if name == "cls_token" and cfg.pos_embed == "sincos":
            grid = cfg.img_size // cfg.patch_size
            out["pos_embed"] = sincos_pos_embed(cfg.embed_dim, grid)
    order = ["cls_token", "pos_embed"]  # timm registers these first
    keys = [k for k in order if k in out] + [k for k in out if k not in order]
    return {k: np.ascontiguousarray(out[k], dtype=np.float32) for k in keys}


def expected_shapes(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the timm state dict for ``cfg``, with its shape, in timm's order."""
    model = VisionTransformer(cfg, np.float32, seed=0)
    return {k: v.shape for k, v in to_timm(model.store.named_params(), cfg).items()}


def _flags_differing(saved: dict[str, Any], cfg: ViTConfig) -> str:
    """``--dim 32 --depth 2``: the model flags of ``saved`` that differ from ``cfg``."""
    parts = []
    for f in fields(ViTConfig):
        if f.name in saved and saved[f.name] != getattr(cfg, f.name):
            flag = f.metadata.get("flag") or f.name.replace("_", "-")
            parts.append(f"--{flag} {saved[f.name]}")
    return " ".join(parts)


def from_timm(tensors: dict[str, np.ndarray], cfg: ViTConfig, source: str,
              skip_head: bool = False, saved_config: dict[str, Any] | None = None,
              ) -> dict[str, np.ndarray]:
    """A timm state dict -> dpvit's named parameters for a model of ``cfg``, shape-checked.

    Args:
        tensors: the file's tensors by timm name.
        cfg: the model they must fit.
        source: the file, for messages.
        skip_head: leave ``head.*`` out (its shape is not checked): the model keeps its own
            freshly initialised head (``--reset-head``).
        saved_config: the dpvit model config the file was exported from (its metadata), to
            name the flags that would make the shapes fit.

    Returns:
        dpvit name -> array (the model's parameters; with ``--pos-embed sincos`` the file's
        ``pos_embed`` is checked against the fixed table and not returned).

    Raises:
        ConfigError: one line naming the first tensor that is missing, unexpected or of
            another shape, or a model timm cannot express.
    """
    expected = expected_shapes(cfg)
    hint = _flags_differing(saved_config or {}, cfg)
    hint = (f"; the file was exported from a model with {hint}" if hint else
            "; pass the model flags it was trained with")
    wanted = {k: s for k, s in expected.items() if not (skip_head and k.startswith("head."))}
    for name, shape in wanted.items():
        if name not in tensors:
            raise ConfigError(f"{source} has no tensor {name} (shape {shape}), which the model "
                              f"config needs{hint}")
        found = tuple(tensors[name].shape)
        if found != shape:
            head = ("; --reset-head starts a new head instead"
                    if name.startswith("head.") else "")
            raise ConfigError(f"{source}: tensor {name} has shape {found} but the model config "
                              f"needs {shape}{hint}{head}")
    for name in tensors:
        if name not in expected and not (skip_head and name.startswith("head.")):
            raise ConfigError(f"{source} has a tensor {name} that this model config does not "
                              f"have{hint}")
    out = {}
    for name in wanted:
        value = np.asarray(tensors[name])
        if not np.issubdtype(value.dtype, np.floating):
            raise ConfigError(f"{source}: tensor {name} is {value.dtype}, not floating point")
        if name == "pos_embed" and cfg.pos_embed == "sincos":
            table = sincos_pos_embed(cfg.embed_dim, cfg.img_size // cfg.patch_size)
            if not np.allclose(value, table, atol=1e-5):
                raise ConfigError(f"{source}: pos_embed is a learned position embedding, but "
                                  "--pos-embed sincos uses a fixed table and would drop it; "
                                  "train with --pos-embed learned")
            continue
        if name == "patch_embed.proj.weight" and cfg.patch_embed == "linear":
            value = value.reshape(cfg.embed_dim, -1)
        out[name] = value
    return out


def metadata(cfg: ViTConfig, info: Any, source: dict[str, Any]) -> dict[str, str]:
    """The file's metadata (safetensors metadata is str -> str, so each value is JSON).

    Keys: ``format`` ("pt", as PyTorch-side loaders expect), ``timm_kwargs``,
    ``gelu_approximate``, ``layer_norm_eps``, ``normalization`` (how pixels become model
    input), ``dpvit_config`` (the model section of dpvit's config), ``source``.
    """
    normalization = {
        "mean": [info.mean] * cfg.in_chans, "std": [info.std] * cfg.in_chans,
        "input": "x = (pixels / 255 - mean) / std, pixels in 0..255, shape (B, C, H, W)",
        "polarity": "as the idx files store it: light strokes (255) on a dark background (0)",
        "dataset": info.name, "class_names": list(info.class_names),
    }
    return {
        "format": "pt",
        "timm_kwargs": json.dumps(timm_kwargs(cfg)),
        "gelu_approximate": json.dumps(GELU_APPROXIMATE),
        "layer_norm_eps": json.dumps(LAYER_NORM_EPS),
        "normalization": json.dumps(normalization),
        "dpvit_config": json.dumps(asdict(cfg)),
        "source": json.dumps(source),
    }


def loading_snippet(path: str) -> str:
    """Python that builds the timm model and loads the file (what ``dpvit.export`` prints)."""
    return f'''import json
from functools import partial

import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

path = {path!r}
with safe_open(path, "pt") as f:
    meta = f.metadata()
model = VisionTransformer(
    **json.loads(meta["timm_kwargs"]),
    act_layer=partial(nn.GELU, approximate=json.loads(meta["gelu_approximate"])),
    norm_layer=partial(nn.LayerNorm, eps=json.loads(meta["layer_norm_eps"])),
)
model.load_state_dict(load_file(path), strict=True)
model.eval()
norm = json.loads(meta["normalization"])  # input: (pixels / 255 - mean) / std, (B, C, H, W)
'''
