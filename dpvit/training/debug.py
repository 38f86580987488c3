"""``--debug``: checks that are too slow for training but find bugs and bad data quickly.

- ``watch_non_finite(model)`` makes every layer check its forward output and backward input
  gradient, so the first layer that produces a NaN or Inf is named instead of a NaN loss
  appearing steps later.
- ``gradient_spot_check(...)`` compares a few entries of the analytic gradient on the first
  batch with central finite differences and reports the relative error of each.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from dpvit.errors import UserError
from dpvit.nn.layers import Layer
from dpvit.vit import VisionTransformer

logger = logging.getLogger(__name__)


class NonFiniteError(UserError):
    """A layer produced NaN or Inf values."""


def _check(name: str, what: str, array: np.ndarray) -> None:
    if not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise NonFiniteError(
            f"layer {name or 'model'} {what} has {bad} non-finite value(s) of {array.size}")


def watch_non_finite(model: VisionTransformer) -> None:
    """Wrap each layer's forward/backward (on the instance) to fail on non-finite values.

    Children run before their parents return, so the innermost layer to produce a bad value
    raises first and is the one named.
    """
    for prefix, module in model.named_modules():
        if not isinstance(module, Layer):
            continue
        name = prefix.rstrip(".")
        forward, backward = module.forward, module.backward

        def checked_forward(x, train, *args, _f=forward, _name=name):
            out = _f(x, train, *args)
            _check(_name, "forward output", out)
            return out

        def checked_backward(dy, *args, _b=backward, _name=name, **kwargs):
            dx = _b(dy, *args, **kwargs)
            if dx is not None:  # None: the first layer skipped d(images)
                _check(_name, "backward gradient", dx)
            return dx

        module.forward, module.backward = checked_forward, checked_backward


def gradient_spot_check(model: VisionTransformer, loss_of: Callable[[], tuple[float, np.ndarray]],
                        entries: int = 6, seed: int = 0, h: float = 1e-6) -> list[dict]:
    """Central differences for a few random parameter entries against the analytic gradient.

    Args:
        model: a float64 model; its gradient buffer is overwritten.
        loss_of: runs forward + loss on a fixed batch and returns (loss, dlogits).
        entries: how many parameter entries to check.
        seed: picks the entries.
        h: finite-difference step.

    Returns:
        One dict per entry: parameter name, index, analytic, numeric, relative error
        |a - n| / max(|a| + |n|, 1e-12).
    """
    store = model.store
    store.zero_grad()
    _, dlogits = loss_of()
    model.backward(dlogits)
    rng = np.random.default_rng(seed)
    results = []
    for flat_index in rng.choice(store.numel, size=min(entries, store.numel), replace=False):
        spec = next(s for s in store.specs if s.offset <= flat_index < s.offset + s.size)
        analytic = float(store.flat_grads[flat_index])
        old = store.flat_params[flat_index]
        store.flat_params[flat_index] = old + h
        plus = loss_of()[0]
        store.flat_params[flat_index] = old - h
        minus = loss_of()[0]
        store.flat_params[flat_index] = old
        numeric = (plus - minus) / (2 * h)
        err = abs(analytic - numeric) / max(abs(analytic) + abs(numeric), 1e-12)
        local = tuple(int(i) for i in np.unravel_index(flat_index - spec.offset, spec.shape))
        results.append({"name": spec.name, "index": local,
                        "analytic": analytic, "numeric": numeric, "rel_err": err})
        logger.info("gradient check %s%s: analytic %.6e, numeric %.6e, rel err %.1e",
                    spec.name, list(local), analytic, numeric, err)
    store.zero_grad()
    return results
