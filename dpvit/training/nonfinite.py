"""Non-finite steps: skip a step whose loss or gradient norm is NaN/Inf, stop after too many.

Both numbers are identical on every rank (the loss is allreduced, the norm is computed from the
allreduced gradient), so every rank skips the same steps and stops at the same step without
another collective; the stop is an `AgreedError`, reported once by rank 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from dpvit.errors import AgreedError

logger = logging.getLogger(__name__)


class NonFiniteSteps:
    """Decides whether a step may update the model, from its agreed loss and gradient norm.

    Both numbers are identical on every rank (the loss is allreduced, the norm is computed from
    the allreduced gradient), so every rank skips the same steps without another collective.

    Args:
        limit: stop the run after this many skipped steps in a row.
        log_metrics: writes one metrics.jsonl record (a no-op off rank 0).
    """

    def __init__(self, limit: int, log_metrics: Callable[[dict[str, Any]], None]) -> None:
        self.limit, self.log_metrics = limit, log_metrics
        self.in_a_row = 0
        self.total = 0

    def may_update(self, step: int, epoch: int, loss: float, grad_norm: float) -> bool:
        """True when step number `step` may update; else record and count it as skipped.

        Raises:
            AgreedError: on the `limit`-th non-finite step in a row.
        """
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        self.log_metrics({"kind": "skipped", "step": step, "epoch": epoch, "loss": str(loss),
                          "grad_norm": str(grad_norm), "in_a_row": self.in_a_row})
        logger.warning("step %d skipped: loss %s, gradient norm %s (%d in a row, limit %d)",
                       step, loss, grad_norm, self.in_a_row, self.limit)
        if self.in_a_row >= self.limit:
            raise AgreedError(
                f"stopping at step {step}: {self.in_a_row} steps in a row had a non-finite loss "
                "or gradient norm (training diverged); no checkpoint holds these values; resume "
                "from the last checkpoint with a lower --lr, or raise --max-bad-steps")
        return False


def check_finite(buffers: dict[str, np.ndarray], step: int, comm: Any = None) -> None:
    """Stop if any of the named buffers holds NaN or Inf.

    Called on the parameters after every update and on the whole training state before every
    checkpoint, so that no checkpoint holds non-finite values. Buffers identical on every rank
    need no ``comm``: every rank stops together. Given ``comm`` (a collective), the ranks
    agree which buffers are non-finite anywhere, for buffers that differ between ranks (a
    sharded optimizer's slices).
    """
    flags = np.array([not np.isfinite(buf).all() for buf in buffers.values()], dtype=np.int64)
    if comm is not None:
        flags = comm.allreduce_max(flags)
    bad = [name for name, flag in zip(buffers, flags, strict=True) if flag]
    if bad:
        raise AgreedError(
            f"stopping at step {step}: the {' and '.join(bad)} became non-finite (NaN or Inf); "
            "no checkpoint holds these values; resume from the last checkpoint with a lower --lr")
