"""Multi-head self-attention with a fused qkv projection, as timm's ``Attention``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dpvit.nn import functional as F
from dpvit.nn.layers import Dropout, Layer, Linear, no_tick


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

    def forward(self, x: np.ndarray, train: bool, num_queries: int | None = None) -> np.ndarray:
        """Self-attention over all N tokens of x (B, N, D).

        With ``num_queries=Q`` only the first Q tokens attend (they still see all N keys) and
        the output is (B, Q, D): the last block of a cls-pooled ViT needs only the cls token.
        """
        B, N, D = x.shape
        H, hd = self.num_heads, self.head_dim
        Q = N if num_queries is None else num_queries
        qkv = self.qkv.forward(x, train).reshape(B, N, 3, H, hd).transpose(2, 0, 3, 1, 4)
        q = qkv[0, :, :, :Q] * self.scale  # scaling q (B, H, Q, hd) is cheaper than the scores
        k, v = qkv[1], qkv[2]  # (B, H, N, hd) strided views; matmul reads them in place
        attn = F.softmax_fwd(q @ k.transpose(0, 1, 3, 2))  # (B, H, Q, N)
        attn_d = self.attn_drop.forward(attn, train)
        out = np.empty((B, Q, H, hd), dtype=attn.dtype)
        np.matmul(attn_d, v, out=out.transpose(0, 2, 1, 3))  # heads land already interleaved
        self.cache = (q, k, v, attn, attn_d, out)
        return self.proj_drop.forward(self.proj.forward(out.reshape(B, Q, D), train), train)

    def backward(self, dy: np.ndarray, tick: Callable[[], None] = no_tick) -> np.ndarray:
        q, k, v, attn, attn_d, out = self._take_cache()
        B, H, Q, hd = q.shape
        N = k.shape[2]
        dout_rows = self.proj.backward(self.proj_drop.backward(dy)).reshape(B, Q, H, hd)
        tick()
        dout = dout_rows.transpose(0, 2, 1, 3)  # (B, H, Q, hd) view
        # gradients are written straight into the (B, N, 3, H, hd) layout the qkv Linear wants
        dqkv = np.empty((B, N, 3, H, hd), dtype=dy.dtype)
        dqkv[:, Q:, 0] = 0.0  # tokens that were not queries
        dq = dqkv[:, :Q, 0].transpose(0, 2, 1, 3)
        dk, dv = (dqkv[:, :, i].transpose(0, 2, 1, 3) for i in (1, 2))
        np.matmul(attn_d.transpose(0, 1, 3, 2), dout, out=dv)
        dattn = self.attn_drop.backward(dout @ v.transpose(0, 1, 3, 2))
        # softmax backward: dscores = attn * (dattn - sum_j dattn_ij attn_ij). That row sum
        # equals dout_i . out_i (FlashAttention's D term, dropout included since
        # out = attn_d @ v), a sum over hd = 16 numbers per row instead of N = 50.
        row_dots = F.row_sum(dout_rows * out).transpose(0, 2, 1)[..., None]  # (B, H, Q, 1)
        dscores = np.subtract(dattn, row_dots, out=dattn)
        dscores *= attn
        np.matmul(dscores, k, out=dq)
        dq *= self.scale
        np.matmul(dscores.transpose(0, 1, 3, 2), q, out=dk)  # q is already scaled
        tick()
        dx = self.qkv.backward(dqkv.reshape(B, N, 3 * H * hd))
        if "bias" in self.qkv.grads:
            # The key bias adds q_i . b_k to every score of query i, which softmax cancels: its
            # exact gradient is 0 (each dscores row sums to 0). Computed, it is rounding noise
            # that depends on the summation order, i.e. on the number of ranks, and AdamW
            # would scale that noise up to lr-sized steps. Keep the exact value.
            self.qkv.grads["bias"][H * hd : 2 * H * hd] = 0.0
        return dx
