"""Optimizers over the flat parameter buffer, the learning-rate schedule, gradient clipping.

One optimizer updates the whole model with a handful of vectorised operations on
``ParamStore.flat_params``; its state (momentum, Adam moments) is flat too, laid out like the
parameters, so a checkpoint stores it under the same names. Given a `Shard`
(``--shard-optimizer``, `dpvit.parallel.shard`), it holds the state of that contiguous slice
only and updates only that slice, with the same per-element operations.
"""

from __future__ import annotations

import math

import numpy as np

from dpvit.nn.params import ParamStore
from dpvit.parallel.shard import Shard


class Optimizer:
    """Common bookkeeping: the current learning rate, the decay mask and the step count.

    Args:
        store: the model's flat buffers; ``step()`` reads ``flat_grads``, writes ``flat_params``.
        lr: learning rate; the trainer overwrites ``self.lr`` from the schedule every step.
        weight_decay: applied only where ``store.decay_mask()`` is True (not on biases, norm
            weights, ``pos_embed`` or ``cls_token``, as timm's ``no_weight_decay``).
        shard: this rank's slice of the parameters: the state covers it alone and ``step()``
            updates it alone (the caller sums its gradient and spreads the result). None: the
            whole model.
    """

    state_names: tuple[str, ...] = ()

    def __init__(self, store: ParamStore, lr: float, weight_decay: float,
                 shard: Shard | None = None) -> None:
        self.store = store
        self.lr = lr
        self.weight_decay = weight_decay
        self.shard = shard
        self.part = slice(0, store.numel) if shard is None else slice(shard.start, shard.stop)
        size = self.part.stop - self.part.start
        # per-entry weight decay: the mask's own slice, so a shard decays exactly the entries
        # that the whole-model optimizer decays
        self.decay = store.decay_mask()[self.part].astype(store.dtype) * weight_decay
        self.steps = 0
        self.state = {name: np.zeros(size, dtype=store.dtype) for name in self.state_names}
        self._tmp = np.empty(size, dtype=store.dtype)  # scratch reused every step

    def params_and_grads(self) -> tuple[np.ndarray, np.ndarray]:
        """Views of the parameters this optimizer updates and of their gradients (read at
        every step: the trainer extends the gradient buffer after building the optimizer)."""
        return self.store.flat_params[self.part], self.store.flat_grads[self.part]

    def state_nbytes(self) -> int:
        """Bytes of memory the state keeps alive (the moments: what sharding divides)."""
        return sum(_owned_nbytes(a) for a in self.state.values())

    def nbytes(self) -> int:
        """Bytes of memory this optimizer keeps alive: its state, decay mask and scratch."""
        return self.state_nbytes() + _owned_nbytes(self.decay) + _owned_nbytes(self._tmp)

    def step(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """(flat state buffers by name, scalars) for checkpoints: this rank's slice when
        sharded (``dpvit.parallel.shard.gather_state`` collects the whole)."""
        return dict(self.state), {"steps": self.steps}

    def load_state_dict(self, buffers: dict[str, np.ndarray], scalars: dict[str, int]) -> None:
        """Restore state in place from buffers laid out like the parameters (a checkpoint's;
        a sharded optimizer keeps its slice) or like ``state_dict``'s; names must match."""
        if set(buffers) != set(self.state_names):
            raise ValueError(
                f"optimizer state has {sorted(buffers)}, expected {list(self.state_names)}"
            )
        for name, value in buffers.items():
            whole = value.shape == (self.store.numel,)
            np.copyto(self.state[name], value[self.part] if whole else value)
        self.steps = int(scalars["steps"])


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as ``torch.optim.AdamW``.

    p <- p * (1 - lr * wd) - lr * m_hat / (sqrt(v_hat) + eps), with bias-corrected moments.
    """

    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, store: ParamStore, lr: float = 1e-3, weight_decay: float = 0.05,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 shard: Shard | None = None) -> None:
        super().__init__(store, lr, weight_decay, shard)
        self.beta1, self.beta2 = betas
        self.eps = eps

    def step(self) -> None:
        self.steps += 1
        (p, g), tmp = self.params_and_grads(), self._tmp
        m, v = self.state["exp_avg"], self.state["exp_avg_sq"]
        b1, b2 = self.beta1, self.beta2
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - b2
        v += tmp
        bias1 = 1.0 - b1**self.steps
        bias2 = 1.0 - b2**self.steps
        p -= (self.lr * self.decay) * p  # decoupled decay, on the pre-update parameters
        np.sqrt(v, out=tmp)
        tmp *= 1.0 / math.sqrt(bias2)
        tmp += self.eps
        np.divide(m, tmp, out=tmp)
        tmp *= self.lr / bias1
        p -= tmp


class SGD(Optimizer):
    """SGD with momentum (optionally Nesterov) and L2 weight decay, as ``torch.optim.SGD``."""

    state_names = ("momentum_buffer",)

    def __init__(self, store: ParamStore, lr: float = 0.1, weight_decay: float = 0.0,
                 momentum: float = 0.9, nesterov: bool = False,
                 shard: Shard | None = None) -> None:
        super().__init__(store, lr, weight_decay, shard)
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.momentum, self.nesterov = momentum, nesterov

    def step(self) -> None:
        self.steps += 1
        (p, g), tmp = self.params_and_grads(), self._tmp
        np.multiply(self.decay, p, out=tmp)
        tmp += g  # g + wd * p
        buf = self.state["momentum_buffer"]
        if self.steps == 1:
            np.copyto(buf, tmp)  # torch starts the buffer at the first gradient
        else:
            buf *= self.momentum
            buf += tmp
        if self.nesterov:
            tmp += self.momentum * buf
        else:
            np.copyto(tmp, buf)
        tmp *= self.lr
        p -= tmp


def _owned_nbytes(array: np.ndarray) -> int:
    """Bytes of the memory ``array`` keeps alive: its base's when it is a view (a slice of a
    whole-model buffer would keep the whole buffer)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array.nbytes


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float) -> float:
    """Linear warmup from base_lr/warmup to base_lr, then cosine decay to min_lr.

    ``step`` counts from 0 (the first optimizer step uses ``lr_at(0, ...)``).
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def clip_grad_norm_(grads: np.ndarray, max_norm: float) -> float:
    """Scale ``grads`` in place so their global L2 norm is at most ``max_norm`` (0: never).

    Returns the norm before clipping, accumulated in float64 so float32 gradients of large
    models do not lose precision.
    """
    g64 = grads.astype(np.float64, copy=False)
    norm = math.sqrt(float(g64 @ g64))
    clip_to_norm_(grads, norm, max_norm)
    return norm


def clip_to_norm_(grads: np.ndarray, norm: float, max_norm: float) -> None:
    """Scale ``grads`` in place by ``max_norm / norm`` when ``norm`` (the global norm, which
    a shard of the gradient cannot compute alone) exceeds ``max_norm`` (0: never)."""
    if max_norm > 0 and norm > max_norm:
        grads *= max_norm / (norm + 1e-6)


def build_optimizer(name: str, store: ParamStore, lr: float, weight_decay: float, *,
                    momentum: float = 0.9, nesterov: bool = False,
                    betas: tuple[float, float] = (0.9, 0.999),
                    shard: Shard | None = None) -> Optimizer:
    """The optimizer named by the config ("adamw" or "sgd"), of the whole model or of
    ``shard``."""
    if name == "adamw":
        return AdamW(store, lr, weight_decay, betas, shard=shard)
    if name == "sgd":
        return SGD(store, lr, weight_decay, momentum, nesterov, shard=shard)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {name!r}")
