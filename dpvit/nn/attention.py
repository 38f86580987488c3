"""Multi-head self-attention with a fused qkv projection, as timm's ``Attention``."""

from __future__ import annotations

import numpy as np

from dpvit.nn import functional as F
from dpvit.nn.layers import Dropout, Layer, Linear


class Attention(Layer):
    """softmax(q k^T / sqrt(hd)) v over H heads, then an output projection.

    Shapes: x (B, N, D) -> qkv (B, N, 3, H, hd) -> q, k, v (B, H, N, hd) -> scores (B, H, N, N)
    -> out (B, N, D). Children keep timm's names: ``qkv``, ``attn_drop``, ``proj``,
    ``proj_drop``.

    Args:
        dim: embedding size D.
        num_heads: H; D must be divisible by H.
        qkv_bias: whether the fused qkv projection has a bias.
        attn_drop, proj_drop: dropout on the attention weights and on the output.
        layer_id: base id that keys this block's dropout masks.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        layer_id: int = 0,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(
                f"embed_dim ({dim}) must be divisible by num_heads ({num_heads})"
            )
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = self.add("qkv", Linear(dim, 3 * dim, bias=qkv_bias))
        self.attn_drop = self.add("attn_drop", Dropout(attn_drop, layer_id))
        self.proj = self.add("proj", Linear(dim, dim))
        self.proj_drop = self.add("proj_drop", Dropout(proj_drop, layer_id + 1))

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        B, N, D = x.shape
        H, hd = self.num_heads, self.head_dim
        qkv = self.qkv.forward(x, train).reshape(B, N, 3, H, hd).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, hd) each
        scores = q @ k.transpose(0, 1, 3, 2)  # (B, H, N, N)
        scores *= self.scale
        attn = F.softmax_fwd(scores)
        attn_d = self.attn_drop.forward(attn, train)
        out = (attn_d @ v).transpose(0, 2, 1, 3).reshape(B, N, D)
        self.cache = (q, k, v, attn, attn_d)
        return self.proj_drop.forward(self.proj.forward(out, train), train)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        q, k, v, attn, attn_d = self._take_cache()
        B, H, N, hd = q.shape
        dout = self.proj.backward(self.proj_drop.backward(dy))
        dout = dout.reshape(B, N, H, hd).transpose(0, 2, 1, 3)  # (B, H, N, hd)
        dqkv = np.empty((3, B, H, N, hd), dtype=dy.dtype)
        np.matmul(attn_d.transpose(0, 1, 3, 2), dout, out=dqkv[2])  # dv
        dattn = self.attn_drop.backward(dout @ v.transpose(0, 1, 3, 2))
        dscores = F.softmax_bwd(dattn, attn)
        dscores *= self.scale
        np.matmul(dscores, k, out=dqkv[0])  # dq
        np.matmul(dscores.transpose(0, 1, 3, 2), q, out=dqkv[1])  # dk
        return self.qkv.backward(dqkv.transpose(1, 3, 0, 2, 4).reshape(B, N, 3 * H * hd))
