"""One flat parameter buffer, its gradient twin, and named views into both.

Every parameter of a model is a view into ``ParamStore.flat_params`` and every gradient a view
into ``ParamStore.flat_grads``. Zeroing all gradients is then one ``fill(0)``, the optimizer is a
few vectorised operations over the whole model, the gradient allreduce is one MPI call on one
contiguous buffer, and a checkpoint is named slices of one array.

Construction is two-phase because shapes are known layer by layer while the buffer can only be
allocated once all of them are: modules *declare* parameters while the model is built, then
``ParamStore.build()`` allocates both buffers and hands every module its views.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ParamSpec:
    """Where one named parameter lives in the flat buffers."""

    name: str  # timm-style dotted name, e.g. "blocks.0.attn.qkv.weight"
    shape: tuple[int, ...]
    offset: int  # first element in the flat buffers
    size: int  # number of elements
    no_weight_decay: bool  # biases, norm weights, pos_embed and cls_token are not decayed


class Module:
    """Base class of every layer: named parameters and gradients, and child modules.

    ``params`` and ``grads`` map a layer's local parameter names (``"weight"``) to views into the
    model's flat buffers; they are filled in by ``ParamStore.build()``. Layers mutate these
    views only in place, so they never detach from the buffer.
    """

    def __init__(self) -> None:
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self._declared: list[tuple[str, tuple[int, ...], bool]] = []
        self._children: dict[str, Module] = {}

    def declare(self, name: str, shape: tuple[int, ...], no_weight_decay: bool = False) -> None:
        """Record a parameter that ``ParamStore.build()`` will allocate."""
        self._declared.append((name, tuple(int(s) for s in shape), no_weight_decay))

    def add(self, name: str, module: Module) -> Module:
        """Register a child module under ``name`` (the next part of the dotted name)."""
        self._children[name] = module
        return module

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """All modules in construction order, with their dotted prefixes."""
        yield prefix, self
        for name, child in self._children.items():
            yield from child.named_modules(f"{prefix}{name}.")


class ParamStore:
    """Allocates the flat float buffers of a module tree and binds every parameter as a view.

    Args:
        root: the model; its declared parameters and those of its children, in construction
            order, become consecutive slices of the buffers.
        dtype: float32 for training, float64 for gradient checks.
        shared_params: another store's ``flat_params`` to bind to instead of allocating one
            (a replica that reads the same parameters and keeps its own gradients).
    """

    def __init__(self, root: Module, dtype: np.dtype | type = np.float32,
                 shared_params: np.ndarray | None = None) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"parameter dtype must be float32 or float64, got {self.dtype}")
        self.specs: list[ParamSpec] = []
        owners: list[tuple[Module, str]] = []
        offset = 0
        for prefix, module in root.named_modules():
            for local, shape, no_wd in module._declared:
                size = int(np.prod(shape, dtype=np.int64))
                self.specs.append(ParamSpec(prefix + local, shape, offset, size, no_wd))
                owners.append((module, local))
                offset += size
        self._by_name = {s.name: s for s in self.specs}
        if len(self._by_name) != len(self.specs):
            raise ValueError("duplicate parameter names in model")
        self.numel = offset
        if shared_params is None:
            self.flat_params = np.zeros(offset, dtype=self.dtype)
        elif shared_params.shape != (offset,) or shared_params.dtype != self.dtype:
            raise ValueError(f"shared parameters {shared_params.dtype}{shared_params.shape} do "
                             f"not fit this model's {self.dtype}({offset},)")
        else:
            self.flat_params = shared_params
        self._owners = owners
        self.grad_buffer = np.zeros(offset, dtype=self.dtype)
        self.flat_grads = self.grad_buffer
        self._bind()

    def _bind(self) -> None:
        for spec, (module, local) in zip(self.specs, self._owners, strict=True):
            module.params[local] = self.param(spec.name)
            module.grads[local] = self.grad(spec.name)

    def extend_grads(self, slots: int) -> np.ndarray:
        """Give the gradient buffer ``slots`` more elements after the gradients; return them.

        ``grad_buffer`` is then the gradients followed by those slots, so numbers that must be
        summed across ranks with the gradients (a loss, a count) travel in the same collective.
        Every gradient view is rebound to the new buffer; call it before the first backward.
        """
        self.grad_buffer = np.zeros(self.numel + slots, dtype=self.dtype)
        self.flat_grads = self.grad_buffer[: self.numel]
        self._bind()
        return self.grad_buffer[self.numel :]

    def _view(self, flat: np.ndarray, name: str) -> np.ndarray:
        spec = self._by_name[name]
        return flat[spec.offset : spec.offset + spec.size].reshape(spec.shape)

    def param(self, name: str) -> np.ndarray:
        """The view of parameter ``name`` into ``flat_params``."""
        return self._view(self.flat_params, name)

    def grad(self, name: str) -> np.ndarray:
        """The view of gradient ``name`` into ``flat_grads``."""
        return self._view(self.flat_grads, name)

    def named_params(self) -> dict[str, np.ndarray]:
        """All parameters by name, as views (write through them to change the model)."""
        return self.named_views(self.flat_params)

    def named_views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Named views into any buffer laid out like ``flat_params`` (e.g. optimizer state)."""
        if flat.shape != (self.numel,):
            raise ValueError(f"buffer of shape {flat.shape} is not laid out like the parameters")
        return {s.name: self._view(flat, s.name) for s in self.specs}

    def decay_mask(self) -> np.ndarray:
        """Boolean mask over the flat buffer: True where weight decay applies."""
        mask = np.ones(self.numel, dtype=bool)
        for spec in self.specs:
            if spec.no_weight_decay:
                mask[spec.offset : spec.offset + spec.size] = False
        return mask

    def zero_grad(self) -> None:
        """Reset every gradient to zero (layers accumulate into them)."""
        self.flat_grads.fill(0)
