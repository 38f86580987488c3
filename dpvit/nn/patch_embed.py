"""Patch embeddings: an image (B, C, H, W) becomes a sequence of patch tokens (B, N, D)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dpvit.nn.layers import Conv2d, Layer, Linear, ReLU, no_tick


def stem_widths(in_chans: int, embed_dim: int, patch_size: int) -> list[int]:
    """Channels through a conv stem, input first: one doubling per stride-2 conv, ending at D
    (``[1, 32, 64]`` for 1 input channel, D = 64 and p = 4)."""
    halvings = patch_size.bit_length() - 1
    return [in_chans] + [embed_dim >> (halvings - 1 - i) for i in range(halvings)]


class PatchEmbed(Layer):
    """Image (B, C, H, W) -> patch tokens (B, N, D), N = (H/p) * (W/p).

    ``kind="linear"`` flattens each patch in (C, p, p) order and applies a Linear; ``"conv"``
    is a convolution with kernel = stride = p, as in timm. The two compute the same function
    (the linear weight is the conv weight flattened), so ``linear`` is the cheaper default.
    ``overlap=o`` (conv only) widens each window by o pixels on every side, zero-padding the
    image by o, as the overlapping patch embedding of PVT v2: neighbouring tokens then share
    pixels, and the grid is unchanged.

    ``kind="stem"`` is the convolutional stem of Xiao et al. 2021 ("Early convolutions help
    transformers see better") without its batch norms, which data parallelism would have to
    synchronise: log2(p) 3x3 convolutions of stride 2 and padding 1, ReLU between them, the
    channels doubling up to D (1 -> D/2 -> D for p = 4). Each token then sees a (2p - 1) px
    window through a nonlinear feature map, for about 8% more FLOPs than the linear embedding at
    the default shape.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int,
                 kind: str = "linear", overlap: int = 0) -> None:
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid = img_size // patch_size
        self.num_patches = self.grid * self.grid
        self.kind = kind
        self.convs: list[Layer] = []  # the conv kinds' layers in order, ending with proj
        if overlap and kind != "conv":
            raise ValueError(f"an overlapping patch embedding must be 'conv', got {kind!r}")
        if kind == "linear":
            self.proj = self.add("proj", Linear(in_chans * patch_size * patch_size, embed_dim))
        elif kind == "conv":
            self.proj = self.add("proj", Conv2d(in_chans, embed_dim, patch_size + 2 * overlap,
                                                patch_size, padding=overlap))
            self.convs = [self.proj]
        elif kind == "stem":
            widths = stem_widths(in_chans, embed_dim, patch_size)
            for i in range(len(widths) - 2):
                self.convs.append(self.add(f"stem.{2 * i}", Conv2d(widths[i], widths[i + 1], 3,
                                                                   2, padding=1)))
                self.convs.append(self.add(f"stem.{2 * i + 1}", ReLU()))
            self.proj = self.add("proj", Conv2d(widths[-2], embed_dim, 3, 2, padding=1))
            self.convs.append(self.proj)
        else:
            raise ValueError(f"patch_embed must be 'linear', 'conv' or 'stem', got {kind!r}")

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        B, C = x.shape[:2]
        g, p = self.grid, self.patch_size
        if self.kind == "linear":
            patches = x.reshape(B, C, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(B, g * g, -1)
            return self.proj.forward(patches, train)
        for layer in self.convs:
            x = layer.forward(x, train)  # ends (B, D, g, g)
        return x.reshape(B, x.shape[1], g * g).transpose(0, 2, 1)

    def backward(self, dy: np.ndarray, input_grad: bool = True,
                 tick: Callable[[], None] = no_tick) -> np.ndarray | None:
        """Accumulates the gradients; returns d(images), or None without ``input_grad``;
        ``tick()`` between the stem's layers (see `dpvit.nn.layers.no_tick`)."""
        B, _, D = dy.shape
        g, p, C = self.grid, self.patch_size, self.in_chans
        if self.kind == "linear":
            dpatches = self.proj.backward(dy, input_grad=input_grad)
            if dpatches is None:
                return None
            dpatches = dpatches.reshape(B, g, g, C, p, p)
            return dpatches.transpose(0, 3, 1, 4, 2, 5).reshape(B, C, g * p, g * p)
        dx = dy.transpose(0, 2, 1).reshape(B, D, g, g)
        for layer in reversed(self.convs[1:]):
            dx = layer.backward(dx)
            tick()
        return self.convs[0].backward(dx, input_grad=input_grad)  # the conv reading the images
