"""Layers: parameters bound to the kernels of ``functional.py``, plus the cache between passes.

The contract every layer keeps (docs/design.md, "The layer contract"):

- ``forward(x, train)`` returns the output and keeps what backward needs in ``self.cache``
  (one slot, overwritten every call).
- ``backward(dy)`` returns ``dx``, *adds* into ``self.grads`` and clears the cache.
- Layers never update their own weights; the optimizer works on the flat buffers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dpvit.nn import functional as F
from dpvit.nn.params import Module


def no_tick() -> None:
    """The default ``tick`` of a composite layer's backward: nothing to do between layers.

    Backward passes that take a ``tick`` call it between their layers, so that a caller
    can do a little work of its own there: the bucketed allreduce lets MPI move the buckets
    in flight (``dpvit.parallel.gradsync``), since MPICH progresses them only inside MPI calls.
    """


class Layer(Module):
    """A module with a forward/backward pair and a one-slot cache."""

    def __init__(self) -> None:
        super().__init__()
        self.cache: Any = None

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dy: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _take_cache(self) -> Any:
        """Return the cache and clear it, failing clearly on backward-before-forward."""
        if self.cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called without a forward pass")
        cache, self.cache = self.cache, None
        return cache


class Linear(Layer):
    """y = x @ W.T + b over the last axis; any leading axes are folded into one GEMM.

    Args:
        in_features: size of the last input axis.
        out_features: size of the last output axis.
        bias: whether to add a bias (not weight-decayed).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.has_bias = bias
        self.declare("weight", (out_features, in_features))
        if bias:
            self.declare("bias", (out_features,), no_weight_decay=True)

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        x2d = x.reshape(-1, self.in_features)
        y = F.linear_fwd(x2d, self.params["weight"], self.params.get("bias"))
        self.cache = (x2d, x.shape)
        return y.reshape(*x.shape[:-1], self.out_features)

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """Accumulates the weight and bias gradients; returns d(input) unless ``input_grad``
        is False (the input is the image patches), which skips its GEMM."""
        x2d, x_shape = self._take_cache()
        dx, dw, db = F.linear_bwd(dy.reshape(-1, self.out_features), x2d, self.params["weight"],
                                  input_grad)
        self.grads["weight"] += dw
        if self.has_bias:
            self.grads["bias"] += db
        return None if dx is None else dx.reshape(x_shape)


class Conv2d(Layer):
    """2-D convolution (B, C, H, W) -> (B, O, Ho, Wo) as one im2col GEMM.

    Inputs and outputs are (B, C, H, W) arrays as in torch, but the output is a view of
    channels-last (B, Ho, Wo, O) memory, which is what ``im2col`` reads fastest: a stack of
    convolutions never converts between layouts.

    Args:
        in_channels, out_channels: C and O.
        kernel_size: square kernel side k; the weight is (O, C, k, k) as in torch.
        stride, padding: as in torch (zero padding on all four sides).
        bias: whether to add a learned bias per output channel.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if kernel_size < 1 or stride < 1 or padding < 0:
            raise ValueError(
                f"Conv2d needs kernel_size >= 1, stride >= 1, padding >= 0; got "
                f"{kernel_size}, {stride}, {padding}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.k, self.stride, self.padding = kernel_size, stride, padding
        self.has_bias = bias
        self.declare("weight", (out_channels, in_channels, kernel_size, kernel_size))
        if bias:
            self.declare("bias", (out_channels,), no_weight_decay=True)

    def _weight_2d(self) -> np.ndarray:
        """The (O, C, k, k) weight as (O, k*k*C), the column order of ``F.im2col``."""
        return self.params["weight"].transpose(0, 2, 3, 1).reshape(self.out_channels, -1)

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        B, C, H, W = x.shape
        if self.in_channels != C:
            raise ValueError(f"Conv2d expects {self.in_channels} input channels, got {C}")
        Ho = F.conv_output_size(H, self.k, self.stride, self.padding)
        Wo = F.conv_output_size(W, self.k, self.stride, self.padding)
        x_last = x.transpose(0, 2, 3, 1)
        cols = F.im2col(x_last, self.k, self.k, self.stride, self.padding)
        y = F.linear_fwd(cols, self._weight_2d(), self.params.get("bias"))
        self.cache = (cols, x_last.shape)
        return y.reshape(B, Ho, Wo, self.out_channels).transpose(0, 3, 1, 2)

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """Accumulates the weight and bias gradients; returns d(input) unless ``input_grad``
        is False (the input is the image), which skips a GEMM and the col2im scatter."""
        cols, x_shape = self._take_cache()
        dy2d = dy.transpose(0, 2, 3, 1).reshape(-1, self.out_channels)
        k, C, O = self.k, self.in_channels, self.out_channels
        dcols, dw, db = F.linear_bwd(dy2d, cols, self._weight_2d(), input_grad)
        self.grads["weight"] += dw.reshape(O, k, k, C).transpose(0, 3, 1, 2)
        if self.has_bias:
            self.grads["bias"] += db
        if dcols is None:
            return None
        return F.col2im(dcols, x_shape, k, k, self.stride, self.padding).transpose(0, 3, 1, 2)


class LayerNorm(Layer):
    """Layer norm over the last axis with a learned scale and shift (neither weight-decayed)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.declare("weight", (dim,), no_weight_decay=True)
        self.declare("bias", (dim,), no_weight_decay=True)

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        y, xhat, rstd = F.layernorm_fwd(x, self.params["weight"], self.params["bias"], self.eps)
        self.cache = (xhat, rstd)
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        xhat, rstd = self._take_cache()
        dx, dw, db = F.layernorm_bwd(dy, xhat, rstd, self.params["weight"])
        self.grads["weight"] += dw
        self.grads["bias"] += db
        return dx


class ReLU(Layer):
    """max(x, 0); the gradient at exactly 0 is taken as 0."""

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        mask = x > 0
        self.cache = mask
        return x * mask

    def backward(self, dy: np.ndarray) -> np.ndarray:
        return dy * self._take_cache()


class GELU(Layer):
    """GELU in its tanh approximation (as ``torch.nn.GELU(approximate="tanh")``).

    The tanh form keeps the backward pass to elementwise numpy without ``erf``, which numpy
    lacks; it differs from the exact form by less than 1e-3 everywhere.
    """

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        y, s = F.gelu_fwd(x)
        self.cache = (x, s)
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        x, s = self._take_cache()
        return F.gelu_bwd(dy, x, s)


class Dropout(Layer):
    """Inverted dropout: zero a fraction ``p`` of activations in training, scale the rest by
    1/(1-p); identity at evaluation.

    The mask of sample ``i`` is drawn from a generator keyed by (seed, step, layer id, global
    sample index), set each step through ``set_keys``, so training gives the same result
    whatever the number of ranks the batch is split over.
    """

    def __init__(self, p: float = 0.0, layer_id: int = 0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.layer_id = layer_id
        self.keys: tuple[int, int, np.ndarray] | None = None  # (seed, step, sample indices)

    def set_keys(self, seed: int, step: int, sample_ids: np.ndarray) -> None:
        """Key the next training masks by (seed, step, sample index)."""
        self.keys = (int(seed), int(step), np.asarray(sample_ids, dtype=np.int64))

    def _mask(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        if self.keys is None:
            raise RuntimeError("Dropout in training needs set_keys(seed, step, sample_ids) first")
        seed, step, ids = self.keys
        if len(ids) != shape[0]:
            raise ValueError(f"Dropout got {len(ids)} sample ids for a batch of {shape[0]}")
        keep = np.empty(shape, dtype=dtype)
        for b, sid in enumerate(ids):
            rng = np.random.default_rng([seed, step, self.layer_id, int(sid)])
            keep[b] = rng.random(shape[1:]) >= self.p
        keep *= 1.0 / (1.0 - self.p)
        return keep

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        if not train or self.p == 0.0:
            self.cache = 1.0
            return x
        mask = self._mask(x.shape, x.dtype)
        self.cache = mask
        return x * mask

    def backward(self, dy: np.ndarray) -> np.ndarray:
        mask = self._take_cache()
        return dy if isinstance(mask, float) else dy * mask


class Flatten(Layer):
    """(B, ...) -> (B, prod(...)); backward restores the shape."""

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        self.cache = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        return dy.reshape(self._take_cache())
