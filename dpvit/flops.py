"""Model FLOPs: one image's forward pass, training on one image, and a run's training so far.

The count is the usual model-FLOPs one: every GEMM and attention matmul (multiply-adds x 2);
element-wise work (norms, softmax, GELU) is left out. Training on an image costs 3 forward
passes (backward runs two matmuls per forward one: the input's gradient and the weights'). The
benchmark's MFU, the trainer's ``train_flops`` metric and the report all use this one count, so
recipes of any model size or epoch count compare on the same compute axis.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from dpvit.nn.patch_embed import stem_widths

if TYPE_CHECKING:  # vit.py is not imported at run time: the count needs only the shape
    from dpvit.vit import ViTConfig

#: Forward passes' worth of FLOPs in one training step on an image (forward + backward).
TRAIN_FORWARDS = 3

_PREFIXES = ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def forward_flops_per_image(cfg: ViTConfig) -> int:
    """Multiply-adds x 2 of one image's forward pass: every GEMM and attention matmul."""
    n = (cfg.img_size // cfg.patch_size) ** 2
    T, D, hidden = n + 1, cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    if cfg.patch_embed == "stem":  # 3x3 stride-2 convs, each halving the side
        widths = stem_widths(cfg.in_chans, D, cfg.patch_size)
        patch = sum(2 * (cfg.img_size >> (i + 1)) ** 2 * 9 * c_in * c_out
                    for i, (c_in, c_out) in enumerate(itertools.pairwise(widths)))
    else:
        patch = 2 * n * cfg.in_chans * cfg.patch_window**2 * D
    block = 2 * T * D * (3 * D + D + 2 * hidden) + 2 * 2 * T * T * D
    return patch + cfg.depth * block + 2 * D * cfg.num_classes


def train_flops_per_image(cfg: ViTConfig) -> int:
    """FLOPs of training on one image: its forward and backward pass."""
    return TRAIN_FORWARDS * forward_flops_per_image(cfg)


def training_compute(cfg: ViTConfig, step: int, batch_size: int) -> dict[str, int]:
    """The training compute after ``step`` optimizer steps of global batch ``batch_size``.

    Images seen is steps x global batch (a skipped step used its batch up too), so the count
    is the same on any number of ranks and a resumed run continues it from its step.

    Returns:
        ``train_flops`` (spent so far) and ``train_flops_per_image``, as report.json and
        metrics.jsonl carry them.
    """
    per_image = train_flops_per_image(cfg)
    return {"train_flops": step * batch_size * per_image, "train_flops_per_image": per_image}


def format_flops(flops: float) -> str:
    """``flops`` with an SI prefix and one decimal, e.g. ``34.1 TFLOP``."""
    for scale, prefix in _PREFIXES:
        if abs(flops) >= scale:
            return f"{flops / scale:.1f} {prefix}FLOP"
    return f"{flops:.0f} FLOP"
