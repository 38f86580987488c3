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
    dy2d: np.ndarray, x2d: np.ndarray, weight: np.ndarray, input_grad: bool = True
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Gradients of ``linear_fwd``: (dx (M, I), dW (O, I), db (O,)); dx is None (its GEMM
    skipped) without ``input_grad``.

    The bias gradient is a GEMV with a vector of ones: a column sum in BLAS, cheaper than
    ``sum(axis=0)``.
    """
    db = np.ones(dy2d.shape[0], dtype=dy2d.dtype) @ dy2d
    return (dy2d @ weight if input_grad else None), dy2d.T @ x2d, db


# ---------------------------------------------------------------------------------------------
# Convolution through im2col: the (kh, kw) window of every output pixel becomes a row of a
# matrix, so the convolution is one GEMM. Both work channels-last, (B, H, W, C): a window row
# (ki, kj, c) then holds runs of kw * C contiguous numbers, which numpy copies much faster than
# the channels-first runs of kw (docs/performance.md), and the GEMM's (B*Ho*Wo, O) output
# already is the next layer's channels-last input.


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial output length of a convolution along one axis."""
    return (size + 2 * padding - kernel) // stride + 1


def im2col(x: np.ndarray, kh: int, kw: int, stride: int, padding: int) -> np.ndarray:
    """(B, H, W, C) -> (B*Ho*Wo, kh*kw*C), rows ordered (b, i, j), columns (ki, kj, c)."""
    B, H, W, C = x.shape
    if padding:
        padded = np.zeros((B, H + 2 * padding, W + 2 * padding, C), dtype=x.dtype)
        padded[:, padding:-padding, padding:-padding] = x
        x = padded
    Ho = conv_output_size(H, kh, stride, padding)
    Wo = conv_output_size(W, kw, stride, padding)
    sb, sh, sw, sc = x.strides
    windows = as_strided(
        x,
        shape=(B, Ho, Wo, kh, kw, C),
        strides=(sb, sh * stride, sw * stride, sh, sw, sc),
        writeable=False,
    )
    return windows.reshape(B * Ho * Wo, kh * kw * C)


def col2im(
    cols: np.ndarray, x_shape: tuple[int, ...], kh: int, kw: int, stride: int, padding: int
) -> np.ndarray:
    """Adjoint of ``im2col``: sums every window's gradient back into (B, H, W, C).

    Loops over the kh*kw kernel offsets (never over pixels); each iteration is one strided
    add over all images, output positions and channels.
    """
    B, H, W, C = x_shape
    Ho = conv_output_size(H, kh, stride, padding)
    Wo = conv_output_size(W, kw, stride, padding)
    windows = cols.reshape(B, Ho, Wo, kh, kw, C)
    dx = np.zeros((B, H + 2 * padding, W + 2 * padding, C), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            dx[:, i : i + stride * Ho : stride, j : j + stride * Wo : stride] += windows[
                :, :, :, i, j
            ]
    if padding:
        dx = dx[:, padding:-padding, padding:-padding]
    return dx


# ---------------------------------------------------------------------------------------------
# Softmax over the last axis.
#
# Reductions along a short last axis (50 keys) are slow in numpy: a row sum costs five times a
# matrix-vector product, a row maximum ten times a maximum over whole blocks. So rows are summed
# with a GEMV against a vector of ones, and the usual shift by the row maximum is left out:
# softmax is the same for any shift, and float32 exp only overflows above 88, far beyond the
# attention scores of trained models (docs/performance.md), so the shift's extra pass over the
# scores buys nothing. Rows whose sum of exp leaves _SUM_RANGE (a score above ~69, near
# overflow, or all scores below ~-69, where subnormals lose precision) are redone with the
# exact shift, so the result never rests on that assumption.
_SUM_RANGE = (1e-30, 1e30)


def row_sum(x: np.ndarray) -> np.ndarray:
    """Sum over the last axis as a matrix-vector product (keeps BLAS's precision and speed)."""
    return x @ np.ones(x.shape[-1], dtype=x.dtype)


def softmax_fwd(x: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis of an array of two or more dimensions."""
    with np.errstate(over="ignore"):  # an overflowing row is redone below
        y = np.exp(x)
    sums = row_sum(y)
    bad = ~((sums >= _SUM_RANGE[0]) & (sums <= _SUM_RANGE[1]))  # inf and nan are bad too
    if bad.any():  # rare: shift those rows by their own maximum
        rows = x[bad]
        exact = np.exp(rows - rows.max(axis=-1, keepdims=True))
        y[bad] = exact
        sums[bad] = row_sum(exact)
    np.reciprocal(sums, out=sums)
    y *= sums[..., None]
    return y


def softmax_bwd(dy: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dx = y * (dy - sum(dy * y)) over the last axis, given the softmax output y."""
    dx = dy * y
    dx -= y * row_sum(dx)[..., None]
    return dx


# ---------------------------------------------------------------------------------------------
# GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def gelu_fwd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GELU (tanh form) as 0.5 x s, s = 1 + tanh(u), u = sqrt(2/pi) (x + a x^3).

    Returns (y, s); the backward pass reuses s. Every line is one pass over the data. y starts
    as 0.5 x while x is still in the cache from the GEMM that wrote it, and the last pass reads
    y and s alone: a last pass that also read x would push part of y out of the cache before
    the next layer's GEMM reads it.
    """
    y = x * 0.5
    s = x * x
    s *= _GELU_C * _GELU_A
    s += _GELU_C
    s *= x  # u
    np.tanh(s, out=s)
    s += 1.0
    y *= s
    return y, s


def gelu_bwd(dy: np.ndarray, x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """d/dx (0.5 x s) = s (0.5 + 0.5 sqrt(2/pi) x (1 + 3 a x^2) (2 - s)), since
    ds/dx = (1 - tanh^2) du/dx and 1 - tanh^2 = s (2 - s)."""
    g = x * x
    g *= 1.5 * _GELU_C * _GELU_A
    g += 0.5 * _GELU_C
    g *= x
    g *= np.subtract(2.0, s)
    g += 0.5
    g *= s
    g *= dy
    return g


# ---------------------------------------------------------------------------------------------
# Layer norm over the last axis.


def layernorm_fwd(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """y = (x - mean) / sqrt(var + eps) * weight + bias. Returns (y, xhat, rstd).

    Means over the last axis are GEMVs against a vector of 1/D (see ``row_sum``).
    """
    inv_d = np.full(x.shape[-1], 1.0 / x.shape[-1], dtype=x.dtype)
    xhat = x - (x @ inv_d)[..., None]
    var = (xhat * xhat) @ inv_d
    var += eps
    rstd = np.reciprocal(np.sqrt(var, out=var), out=var)[..., None]
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
    ones = np.ones(dy2.shape[0], dtype=dy.dtype)
    dbias = ones @ dy2
    dweight = ones @ (dy2 * xhat.reshape(-1, D))
    inv_d = np.full(D, 1.0 / D, dtype=dy.dtype)
    g = dy * weight
    mean_g = g @ inv_d
    mean_gx = (g * xhat) @ inv_d
    g -= mean_g[..., None]
    g -= xhat * mean_gx[..., None]
    g *= rstd
    return g, dweight, dbias
