"""An exponential moving average of the weights (``--ema-decay``), the model a run evaluates.

After every optimizer step ``average = decay * average + (1 - decay) * weights``. The average
trails the noisy end of AdamW's trajectory and scores higher than the weights themselves until
the learning rate has decayed (Polyak averaging; timm's ``ModelEmaV3``, PyTorch's
``AveragedModel``). Every rank holds the whole average and updates it from the same
parameters in the same order, so it is bitwise identical on every rank and for every rank
count, like the parameters.

Training keeps stepping the weights; evaluations, reports, the best checkpoint and what
``evaluate``, ``predict`` and ``export`` load are the average (the checkpoint's ``/ema``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

from dpvit.nn.params import ParamStore


class WeightAverage:
    """The running average of a `ParamStore`'s flat parameters."""

    def __init__(self, store: ParamStore, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the average's decay must be in (0, 1), got {decay}")
        self.store, self.decay = store, decay
        self.flat = store.flat_params.copy()  # starts at the initial (or resumed) weights
        self._scratch = np.empty_like(self.flat)

    def update(self) -> None:
        """Fold the current weights in: ``average += (1 - decay) * (weights - average)``."""
        np.subtract(self.store.flat_params, self.flat, out=self._scratch)
        self._scratch *= 1.0 - self.decay
        self.flat += self._scratch

    def named(self) -> dict[str, np.ndarray]:
        """The average by parameter name (views), as the checkpoint stores it."""
        return self.store.named_views(self.flat)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model's weights are the average; the weights come back after,
        bit for bit."""
        weights = self.store.flat_params.copy()
        self.store.flat_params[...] = self.flat
        try:
            yield
        finally:
            self.store.flat_params[...] = weights
