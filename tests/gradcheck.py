"""Finite-difference gradient checking for layers, losses and whole models (float64).

The relative error between an analytic gradient ``a`` and its central-difference estimate
``n`` is taken array-wise:

    rel_err(a, n) = ||a - n||_2 / max(||a||_2 + ||n||_2, 1e-30)

with ``n_i = (f(w + h e_i) - f(w - h e_i)) / (2 h)`` and ``h = 1e-6``. The scalar ``f`` is
``sum(layer(x) * g)`` for a fixed random ``g``, so the analytic gradients are what
``backward(g)`` returns (input) or accumulates (parameters).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dpvit.nn.params import ParamStore

STEP = 1e-6
TOLERANCE = 1e-6


def rel_err(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """The array-wise relative error of the module docstring."""
    num = np.linalg.norm((analytic - numeric).ravel())
    den = max(np.linalg.norm(analytic.ravel()) + np.linalg.norm(numeric.ravel()), 1e-30)
    return float(num / den)


def numeric_grad(f: Callable[[], float], w: np.ndarray, h: float = STEP) -> np.ndarray:
    """Central differences of the scalar ``f()`` with respect to every entry of ``w`` (in place)."""
    grad = np.zeros_like(w)
    flat, gflat = w.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        plus = f()
        flat[i] = old - h
        minus = f()
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * h)
    return grad


def check_layer(layer, x: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Relative errors of d(input) and of every parameter gradient of ``layer`` at ``x``.

    Allocates a float64 ParamStore over ``layer`` (children included), fills the parameters
    with random values and checks each of them, by its dotted name.
    """
    store = ParamStore(layer, np.float64)
    rng = np.random.default_rng(seed)
    store.flat_params[:] = rng.standard_normal(store.numel) * 0.5
    g = rng.standard_normal(layer.forward(x, train=True).shape)

    def f() -> float:
        return float(np.sum(layer.forward(x, train=True) * g))

    store.zero_grad()
    layer.forward(x, train=True)
    dx = layer.backward(g)
    errors = {"input": rel_err(dx, numeric_grad(f, x))}
    for name, param in store.named_params().items():
        errors[name] = rel_err(store.grad(name), numeric_grad(f, param))
    return errors
