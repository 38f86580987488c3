"""Losses. Each ``__call__`` returns ``(loss, dinput)``: the scalar and its gradient.

Both losses average over ``denominator`` samples, which defaults to the local batch size. The
data-parallel trainer passes the *global* batch size instead, so that summing the ranks'
gradients gives exactly the gradient of the mean over the global batch, also for an uneven
split of the batch across ranks.
"""

from __future__ import annotations

import numpy as np


def _check_denominator(denominator: int | None, batch: int) -> int:
    d = batch if denominator is None else int(denominator)
    if d <= 0:
        raise ValueError(f"loss denominator must be positive, got {d}")
    return d


class CrossEntropyLoss:
    """Softmax cross-entropy with label smoothing, from integer class targets.

    With smoothing ``s`` over ``K`` classes the target distribution is
    ``(1 - s) * onehot + s / K`` (as ``torch.nn.CrossEntropyLoss(label_smoothing=s)``).
    The log-softmax subtracts the row maximum first, so large logits never overflow.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def __call__(
        self, logits: np.ndarray, targets: np.ndarray, denominator: int | None = None
    ) -> tuple[float, np.ndarray]:
        """Loss summed over the rows of ``logits`` (B, K) and divided by ``denominator``."""
        B, K = logits.shape
        targets = np.asarray(targets)
        if targets.shape != (B,):
            raise ValueError(f"targets must have shape ({B},), got {targets.shape}")
        if B and (targets.min() < 0 or targets.max() >= K):
            raise ValueError(f"targets must be class indices in [0, {K}), got {targets.max()}")
        d = _check_denominator(denominator, B)
        shifted = logits - logits.max(axis=1, keepdims=True)
        logsumexp = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        logp = shifted - logsumexp  # (B, K) log-softmax
        target_dist = np.full_like(logp, self.label_smoothing / K)
        target_dist[np.arange(B), targets] += 1.0 - self.label_smoothing
        loss = -float(np.sum(target_dist * logp)) / d
        dlogits = np.exp(logp)
        dlogits -= target_dist
        dlogits *= 1.0 / d
        return loss, dlogits


class MSELoss:
    """Mean squared error: sum over samples of the per-sample mean of (pred - target)^2."""

    def __call__(
        self, pred: np.ndarray, target: np.ndarray, denominator: int | None = None
    ) -> tuple[float, np.ndarray]:
        """Loss over the batch (first axis) divided by ``denominator``."""
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {pred.shape} differs from target shape {target.shape}")
        B = pred.shape[0]
        d = _check_denominator(denominator, B)
        per_sample = pred[0].size if B else 1
        diff = pred - target
        loss = float(np.sum(diff * diff)) / (d * per_sample)
        diff *= 2.0 / (d * per_sample)
        return loss, diff
