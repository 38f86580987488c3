"""Pure numpy kernels in forward/backward pairs.

Each ``*_fwd`` returns its output and whatever the matching ``*_bwd`` needs; no kernel keeps
state. Layers in ``layers.py`` bind parameters to these and keep the cache between the two
calls. All kernels work in the dtype of their inputs (float32 for training, float64 for
gradient checks) and avoid float64 creep: scalar constants are plain Python floats, which numpy
does not let upcast a float32 array.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

# ---------------------------------------------------------------------------------------------
# Linear: y = x @ W.T + b, with W in torch layout (out_features, in_features).


def linear_fwd(x2d: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """(M, I) @ (O, I).T + (O,) -> (M, O), one GEMM."""
    y = x2d @ weight.T
    if bias is not None:
        y += bias
    return y


def linear_bwd(
    dy2d: np.ndarray, x2d: np.ndarray, weight: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``linear_fwd``: (dx (M, I), dW (O, I), db (O,))."""
    return dy2d @ weight, dy2d.T @ x2d, dy2d.sum(axis=0)


# ---------------------------------------------------------------------------------------------
# Convolution through im2col: the (kh, kw) window of every output pixel becomes a row of a
# matrix, so the convolution is one GEMM. The windows are a strided view; only the reshape to
# 2-D copies.


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial output length of a convolution along one axis."""
    return (size + 2 * padding - kernel) // stride + 1


def im2col(x: np.ndarray, kh: int, kw: int, stride: int, padding: int) -> np.ndarray:
    """(B, C, H, W) -> (B*Ho*Wo, C*kh*kw), rows ordered (b, i, j), columns (c, ki, kj)."""
    B, C, H, W = x.shape
    if padding:
        x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    Ho = conv_output_size(H, kh, stride, padding)
    Wo = conv_output_size(W, kw, stride, padding)
    sb, sc, sh, sw = x.strides
    windows = as_strided(
        x,
        shape=(B, Ho, Wo, C, kh, kw),
        strides=(sb, sh * stride, sw * stride, sc, sh, sw),
        writeable=False,
    )
    return windows.reshape(B * Ho * Wo, C * kh * kw)


def col2im(
    cols: np.ndarray, x_shape: tuple[int, ...], kh: int, kw: int, stride: int, padding: int
) -> np.ndarray:
    """Adjoint of ``im2col``: sums every window's gradient back into (B, C, H, W).

    Loops over the kh*kw kernel offsets (never over pixels); each iteration is one strided
    add over all images, channels and output positions.
    """
    B, C, H, W = x_shape
    Ho = conv_output_size(H, kh, stride, padding)
    Wo = conv_output_size(W, kw, stride, padding)
    windows = cols.reshape(B, Ho, Wo, C, kh, kw).transpose(0, 3, 4, 5, 1, 2)
    dx = np.zeros((B, C, H + 2 * padding, W + 2 * padding), dtype=cols.dtype)
    if stride == kh and stride == kw:  # non-overlapping windows (patch embedding): one scatter
        dx6 = dx[:, :, : Ho * kh, : Wo * kw].reshape(B, C, Ho, kh, Wo, kw)
        dx6 += windows.transpose(0, 1, 4, 2, 5, 3)
    else:
        for i in range(kh):
            for j in range(kw):
                dx[:, :, i : i + stride * Ho : stride, j : j + stride * Wo : stride] += windows[
                    :, :, i, j
                ]
    if padding:
        dx = dx[:, :, padding:-padding, padding:-padding]
    return dx


# ---------------------------------------------------------------------------------------------
# Softmax over the last axis.


def softmax_fwd(x: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis (max subtracted before exp)."""
    y = x - x.max(axis=-1, keepdims=True)
    np.exp(y, out=y)
    y /= y.sum(axis=-1, keepdims=True)
    return y


def softmax_bwd(dy: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dx = y * (dy - sum(dy * y)) over the last axis, given the softmax output y."""
    dx = dy * y
    dx -= y * dx.sum(axis=-1, keepdims=True)
    return dx


# ---------------------------------------------------------------------------------------------
# GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def gelu_fwd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GELU (tanh form). Returns (y, t) where t = tanh(...) is reused by the backward pass."""
    t = x * x
    t *= _GELU_A
    t += 1.0
    t *= x
    t *= _GELU_C
    np.tanh(t, out=t)
    y = t + 1.0
    y *= x
    y *= 0.5
    return y, t


def gelu_bwd(dy: np.ndarray, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """d/dx GELU = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 a x^2)."""
    inner = x * x
    inner *= 3.0 * _GELU_A
    inner += 1.0
    inner *= _GELU_C
    inner *= x
    sech2 = t * t
    np.subtract(1.0, sech2, out=sech2)
    inner *= sech2
    inner += t
    inner += 1.0
    inner *= 0.5
    inner *= dy
    return inner


# ---------------------------------------------------------------------------------------------
# Layer norm over the last axis.


def layernorm_fwd(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """y = (x - mean) / sqrt(var + eps) * weight + bias. Returns (y, xhat, rstd)."""
    mean = x.mean(axis=-1, keepdims=True)
    xhat = x - mean
    var = np.mean(xhat * xhat, axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat *= rstd
    y = xhat * weight
    y += bias
    return y, xhat, rstd


def layernorm_bwd(
    dy: np.ndarray, xhat: np.ndarray, rstd: np.ndarray, weight: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``layernorm_fwd``: (dx, dweight, dbias).

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), with g = dy * weight.
    """
    D = xhat.shape[-1]
    dy2 = dy.reshape(-1, D)
    xhat2 = xhat.reshape(-1, D)
    dweight = np.einsum("md,md->d", dy2, xhat2)
    dbias = dy2.sum(axis=0)
    g = dy * weight
    mean_g = g.mean(axis=-1, keepdims=True)
    mean_gx = np.mean(g * xhat, axis=-1, keepdims=True)
    g -= mean_g
    g -= xhat * mean_gx
    g *= rstd
    return g, dweight, dbias
