"""Attention rollout (Abnar & Zuidema, 2020, "Quantifying Attention Flow in Transformers").

Which image patches the classification token ends up drawing on, through all layers: each
block's attention, averaged over heads, is mixed with the identity for the residual path
(0.5 A + 0.5 I, rows renormalised), and the blocks' matrices are multiplied from the first to
the last. The row of the class token (or, for mean pooling, the mean of the patch rows) over
the patch columns is the map; a last block that computes the class token's query alone
(``Block.cls_only``) provides exactly that row. It reads the softmax weights each
``Attention`` keeps in its ``cache`` after a forward pass, so it costs one ordinary
evaluation forward.
"""

from __future__ import annotations

import numpy as np

from dpvit.vit import VisionTransformer


def attention_rollout(model: VisionTransformer, x: np.ndarray) -> np.ndarray:
    """Rollout maps for normalised images ``x`` (B, C, H, W).

    Returns:
        (B, g, g) float64 maps on the patch grid (g = img_size // patch_size), each scaled
        to a maximum of 1.
    """
    model.forward(x, train=False)
    B = len(x)
    rollout = None
    for block in model.blocks:
        cache = block.attn.cache
        if cache is None:
            raise RuntimeError("Attention.cache is empty after a forward pass; rollout needs "
                               "the attention weights (q, k, v, attn, attn_d)")
        # (B, Q, N), heads averaged; Q = 1 in a cls-only last block, which is all we need
        attn = cache[3].astype(np.float64).mean(axis=1)
        Q, N = attn.shape[-2:]
        mixed = 0.5 * attn + 0.5 * np.eye(N)[:Q]
        mixed /= mixed.sum(axis=-1, keepdims=True)
        rollout = mixed if rollout is None else mixed @ rollout
    # (B, N-1): the class token's row, or the mean of the patch rows for mean pooling
    maps = rollout[:, 0, 1:] if model.cfg.pool == "cls" else rollout[:, 1:, 1:].mean(axis=1)
    g = model.patch_embed.grid
    maps = maps.reshape(B, g, g)
    return maps / np.maximum(maps.max(axis=(1, 2), keepdims=True), 1e-12)
