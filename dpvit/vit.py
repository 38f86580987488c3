"""The Vision Transformer: patch embedding, cls token, position embedding, pre-norm blocks.

Module and parameter names follow timm (``patch_embed.proj.weight``, ``cls_token``,
``pos_embed``, ``blocks.3.attn.qkv.weight``, ``blocks.3.mlp.fc2.bias``, ``norm.weight``,
``head.bias``), so checkpoints read like timm state dicts.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dpvit.errors import ConfigError, InputError
from dpvit.nn import functional as F
from dpvit.nn.attention import Attention
from dpvit.nn.layers import GELU, Conv2d, Dropout, Layer, LayerNorm, Linear, no_tick
from dpvit.nn.params import ParamStore
from dpvit.nn.patch_embed import PatchEmbed, stem_widths
from dpvit.options import option


@dataclass
class ViTConfig:
    """The model shape. On resume it always comes from the checkpoint."""

    img_size: int = option(28, "input image side in pixels")
    in_chans: int = option(1, "input channels")
    num_classes: int = option(10, "number of classes")
    patch_size: int = option(4, "patch side in pixels; must divide img_size")
    embed_dim: int = option(64, "token embedding size D", flag="dim")
    depth: int = option(6, "number of transformer blocks")
    num_heads: int = option(4, "attention heads; must divide embed_dim", flag="heads")
    mlp_ratio: float = option(2.0, "MLP hidden size as a multiple of embed_dim")
    qkv_bias: bool = option(True, "bias on the fused qkv projection")
    patch_embed: str = option("linear", "patch embedding: one linear map per patch, the same as "
                                      "a conv, or a stem of stride-2 3x3 convs with ReLU",
                            choices=("linear", "conv", "stem"))
    patch_overlap: int = option(0, "pixels each conv patch window reaches into its neighbours "
                                 "on every side (kernel patch_size + 2 * overlap, same stride)")
    pos_embed: str = option("learned", "position embedding", choices=("learned", "sincos"))
    pool: str = option("cls", "pooling before the head", choices=("cls", "mean"))
    drop_rate: float = option(0.0, "dropout after attention projection and in the MLP")
    attn_drop_rate: float = option(0.0, "dropout on attention weights")

    @property
    def patch_window(self) -> int:
        """Side of the pixel window each patch token sees (its conv kernel)."""
        return self.patch_size + 2 * self.patch_overlap

    def validate(self) -> None:
        """Raise ConfigError with one clear sentence for an impossible shape, naming each
        setting as its flag is typed (``--dim``, ``--heads``)."""
        flags = {"img_size": "--img-size", "in_chans": "--in-chans",
                 "num_classes": "--num-classes", "patch_size": "--patch-size",
                 "embed_dim": "--dim", "depth": "--depth", "num_heads": "--heads"}
        for name, flag in flags.items():
            if getattr(self, name) < 1:
                raise ConfigError(f"{flag} must be a positive integer, got {getattr(self, name)}")
        if self.img_size % self.patch_size:
            raise ConfigError(
                f"--patch-size ({self.patch_size}) must divide --img-size ({self.img_size})"
            )
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"--dim ({self.embed_dim}) must be divisible by --heads ({self.num_heads})"
            )
        if self.patch_embed == "stem" and (self.patch_size < 2
                                           or self.patch_size & (self.patch_size - 1)
                                           or self.embed_dim % (self.patch_size // 2)):
            raise ConfigError(f"--patch-embed stem needs --patch-size a power of 2 >= 2 "
                              f"(one stride-2 conv per halving) and --dim divisible by "
                              f"--patch-size / 2; got {self.patch_size} and {self.embed_dim}")
        if self.patch_overlap < 0 or (self.patch_overlap and self.patch_embed != "conv"):
            raise ConfigError(f"--patch-overlap must be 0, or positive with --patch-embed conv; "
                              f"got {self.patch_overlap} with {self.patch_embed} (a linear "
                              "patch embedding needs --patch-overlap 0)")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"--mlp-ratio must be positive, got {self.mlp_ratio}")
        if self.pos_embed == "sincos" and self.embed_dim % 4:
            raise ConfigError(
                f"--pos-embed sincos needs --dim divisible by 4, got {self.embed_dim}")
        for name, flag in (("drop_rate", "--drop-rate"), ("attn_drop_rate", "--attn-drop-rate")):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{flag} must be in [0, 1), got {getattr(self, name)}")


def _trunc_normal(rng: np.random.Generator, std: float, shape: tuple[int, ...]) -> np.ndarray:
    """N(0, std) truncated at +-2 std by redrawing the values outside (as torch's trunc_normal_)."""
    values = rng.normal(0.0, std, shape)
    outside = np.abs(values) > 2 * std
    while outside.any():
        values[outside] = rng.normal(0.0, std, int(outside.sum()))
        outside = np.abs(values) > 2 * std
    return values


def sincos_pos_embed(embed_dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (1, grid*grid + 1, D), zeros for the cls token.

    Half of D encodes the row, half the column; each half is sin and cos of the position at
    D/4 frequencies 1 / 10000^(i / (D/4)), as in MAE.
    """
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    parts = []
    for pos in (rows.reshape(-1), cols.reshape(-1)):
        angles = np.outer(pos, omega)
        parts += [np.sin(angles), np.cos(angles)]
    table = np.concatenate(parts, axis=1)
    return np.concatenate([np.zeros((1, embed_dim)), table])[None]


class Mlp(Layer):
    """fc1 -> GELU -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden: int, drop: float, layer_id: int) -> None:
        super().__init__()
        self.fc1 = self.add("fc1", Linear(dim, hidden))
        self.act = self.add("act", GELU())
        self.drop1 = self.add("drop1", Dropout(drop, layer_id))
        self.fc2 = self.add("fc2", Linear(hidden, dim))
        self.drop2 = self.add("drop2", Dropout(drop, layer_id + 1))
        self.sequence = [self.fc1, self.act, self.drop1, self.fc2, self.drop2]

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        for layer in self.sequence:
            x = layer.forward(x, train)
        return x

    def backward(self, dy: np.ndarray, tick: Callable[[], None] = no_tick) -> np.ndarray:
        for layer in reversed(self.sequence):
            dy = layer.backward(dy)
            tick()
        return dy


class Block(Layer):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    ``cls_only=True`` computes the output of the first (cls) token alone, (B, 1, D): it is all
    the head of a cls-pooled ViT reads from the last block, and it skips that block's MLP and
    attention projection for the other tokens. Gradients
    are unchanged: the skipped outputs never reach the loss.
    """

    def __init__(self, cfg: ViTConfig, index: int, cls_only: bool = False) -> None:
        super().__init__()
        self.cls_only = cls_only
        D = cfg.embed_dim
        base = 4 * index  # four dropout layers per block, each keyed by its own id
        self.norm1 = self.add("norm1", LayerNorm(D))
        self.attn = self.add("attn", Attention(D, cfg.num_heads, cfg.qkv_bias,
                                               cfg.attn_drop_rate, cfg.drop_rate, base))
        self.norm2 = self.add("norm2", LayerNorm(D))
        self.mlp = self.add("mlp", Mlp(D, int(D * cfg.mlp_ratio), cfg.drop_rate, base + 2))

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        queries = 1 if self.cls_only else None
        # Each branch returns a fresh array that no layer keeps, so the residuals are added into
        # it in place: no new array, and the sum is still in the cache for the next layer.
        x_attn = self.attn.forward(self.norm1.forward(x, train), train, queries)
        x_attn += x[:, : x_attn.shape[1]]
        out = self.mlp.forward(self.norm2.forward(x_attn, train), train)
        out += x_attn
        return out

    def backward(self, dy: np.ndarray, tick: Callable[[], None] = no_tick) -> np.ndarray:
        """``tick()`` is called between the layers (see `VisionTransformer.backward`)."""
        # the residual sends dy both around and through each branch (added in place, as above)
        dx = self.norm2.backward(self.mlp.backward(dy, tick))
        dx += dy
        tick()
        dx_in = self.norm1.backward(self.attn.backward(dx, tick))
        dx_in[:, : dx.shape[1]] += dx
        return dx_in


class VisionTransformer(Layer):
    """ViT classifier over (B, C, H, W) images; returns logits (B, num_classes).

    Args:
        cfg: model shape (validated here).
        dtype: float32 for training, float64 for gradient checks.
        seed: initialisation seed (the same on every rank, so all ranks start identical).
        shared_params: bind to this flat parameter buffer instead of initialising one (see
            ``replica``).
    """

    def __init__(self, cfg: ViTConfig, dtype: np.dtype | type = np.float32, seed: int = 0,
                 shared_params: np.ndarray | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = self.add("patch_embed", PatchEmbed(
            cfg.img_size, cfg.patch_size, cfg.in_chans, D, cfg.patch_embed, cfg.patch_overlap))
        n_tokens = self.patch_embed.num_patches + 1
        self.declare("cls_token", (1, 1, D), no_weight_decay=True)
        self.fixed_pos_embed = None
        if cfg.pos_embed == "learned":
            self.declare("pos_embed", (1, n_tokens, D), no_weight_decay=True)
        last = cfg.depth - 1
        self.blocks = [
            self.add(f"blocks.{i}", Block(cfg, i, cls_only=cfg.pool == "cls" and i == last))
            for i in range(cfg.depth)
        ]
        self.norm = self.add("norm", LayerNorm(D))
        self.head = self.add("head", Linear(D, cfg.num_classes))
        self.store = ParamStore(self, dtype, shared_params)
        if cfg.pos_embed == "sincos":
            self.fixed_pos_embed = sincos_pos_embed(D, self.patch_embed.grid).astype(dtype)
        self.dropouts = [m for _, m in self.named_modules() if isinstance(m, Dropout) and m.p]
        if shared_params is None:
            self.init_weights(seed)

    def replica(self) -> VisionTransformer:
        """A model that reads this one's parameter buffer (not a copy) and has its own
        gradient buffer and layer caches, so that another thread can run forward and backward
        on it at the same time (see ``dpvit.parallel.replicas``)."""
        return VisionTransformer(self.cfg, self.dtype, shared_params=self.store.flat_params)

    @property
    def dtype(self) -> np.dtype:
        return self.store.dtype

    def init_weights(self, seed: int) -> None:
        """The original (JAX) ViT init, timm's ``weight_init="jax"``, into the flat buffer.

        Linear weights xavier-uniform, the patch projection lecun-normal (std 1/sqrt(fan_in)),
        the other convs of a stem He-normal (std sqrt(2/fan_in), as they feed a ReLU),
        pos_embed ~ N(0, 0.02) truncated at 2 std, cls_token ~ N(0, 1e-6), zero biases, unit
        norm scales. One change: the head is xavier-uniform too, not zero. timm's default
        (every weight N(0, 0.02)) starts a model this narrow (fan_in 16-128) with near-uniform
        attention and learns several times slower (docs/results.md, "Recipe choices").
        """
        rng = np.random.default_rng(seed)
        for name, module in self.named_modules():
            for local, view in module.params.items():
                if isinstance(module, LayerNorm):
                    view[...] = 1.0 if local == "weight" else 0.0
                elif local == "bias":
                    view[...] = 0.0
                elif local == "cls_token":
                    view[...] = rng.normal(0.0, 1e-6, view.shape)
                elif local == "pos_embed":
                    view[...] = _trunc_normal(rng, 0.02, view.shape)
                elif name == "patch_embed.proj.":
                    view[...] = rng.normal(0.0, 1.0 / np.sqrt(view[0].size), view.shape)
                elif isinstance(module, Conv2d):  # stem convs feed a ReLU: He normal
                    view[...] = rng.normal(0.0, np.sqrt(2.0 / view[0].size), view.shape)
                else:  # Linear weights (out, in)
                    bound = np.sqrt(6.0 / (view.shape[0] + view.shape[1]))
                    view[...] = rng.uniform(-bound, bound, view.shape)

    def num_params(self) -> int:
        return self.store.numel

    def set_dropout_keys(self, seed: int, step: int, sample_ids: np.ndarray) -> None:
        """Key this step's dropout masks by global sample index (no-op without dropout)."""
        for layer in self.dropouts:
            layer.set_keys(seed, step, sample_ids)

    def check_input(self, x: np.ndarray) -> None:
        """Raise InputError naming the expected and actual image shape."""
        c, s = self.cfg.in_chans, self.cfg.img_size
        if x.ndim != 4 or x.shape[1:] != (c, s, s):
            raise InputError(
                f"expected images of shape (batch, {c}, {s}, {s}), got {tuple(x.shape)}"
            )

    def forward(self, x: np.ndarray, train: bool = False) -> np.ndarray:
        self.check_input(x)
        x = np.asarray(x, dtype=self.dtype)
        tokens = self.patch_embed.forward(x, train)  # (B, N, D)
        B, N, D = tokens.shape
        h = np.empty((B, N + 1, D), dtype=self.dtype)
        h[:, :1] = self.params["cls_token"]
        h[:, 1:] = tokens
        h += self.params["pos_embed"] if self.fixed_pos_embed is None else self.fixed_pos_embed
        for block in self.blocks:
            h = block.forward(h, train)
        h = self.norm.forward(h, train)  # (B, 1, D) when the last block is cls-only
        pooled = h[:, 0] if self.cfg.pool == "cls" else h[:, 1:].mean(axis=1)
        self.cache = h.shape
        return self.head.forward(pooled, train)

    def backward(self, dlogits: np.ndarray, input_grad: bool = True,
                 on_ready: Callable[[int], None] | None = None) -> np.ndarray | None:
        """Backward through the whole model; accumulates every gradient, returns d(images).

        Training passes ``input_grad=False``: nothing needs d(images) there, and the patch
        embedding's first layer then skips its d(input) GEMM and, for a conv, its most
        expensive part, the col2im scatter (None is returned).

        ``on_ready(offset)``, if given, is called after the head, the norm, each block, the
        embeddings and the patch embedding with the lowest flat offset from which this
        backward has added every gradient up to the end of the buffer (the buffer's layout
        follows construction: the cls token and position embedding, the patch embedding,
        the blocks, the norm, the head; backward runs mostly in reverse), so that a bucketed
        allreduce may start on it (``dpvit.parallel.gradsync``); and again with the same offset
        between the layers inside each block, so that the allreduce's buckets in flight move
        on while backward runs (MPICH progresses them only inside MPI calls).
        """
        B, T, D = self._take_cache()
        done = _ReadyTracker(self, on_ready)
        dpooled = self.head.backward(dlogits)
        done("head")
        dh = np.zeros((B, T, D), dtype=dpooled.dtype)
        if self.cfg.pool == "cls":
            dh[:, 0] = dpooled
        else:
            dh[:, 1:] = (dpooled / (T - 1))[:, None, :]
        dh = self.norm.backward(dh)
        done("norm")
        for i, block in reversed(list(enumerate(self.blocks))):
            dh = block.backward(dh, done.tick)
            done(f"blocks.{i}")
        if self.fixed_pos_embed is None:
            self.grads["pos_embed"] += dh.sum(axis=0, keepdims=True)
        self.grads["cls_token"] += dh[:, :1].sum(axis=0, keepdims=True)
        done("cls_token", "pos_embed")
        dx = self.patch_embed.backward(dh[:, 1:], input_grad=input_grad, tick=done.tick)
        done("patch_embed")
        return dx

    def parts(self) -> list[tuple[int, str]]:
        """(first flat offset, name) of each top-level part's parameters, in buffer order
        (``cls_token``, ``pos_embed``, ``patch_embed``, ``blocks.i``, ``norm``, ``head``)."""
        if getattr(self, "_parts", None) is None:
            first: dict[str, int] = {}
            for spec in self.store.specs:
                pieces = spec.name.split(".")
                first.setdefault(".".join(pieces[:2]) if pieces[0] == "blocks" else pieces[0],
                                 spec.offset)
            self._parts = sorted((offset, name) for name, offset in first.items())
        return self._parts

    def predict_proba(self, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
        """Softmax probabilities in evaluation mode, in batches (no gradients kept)."""
        out = []
        for start in range(0, len(x), batch_size):
            out.append(F.softmax_fwd(self.forward(x[start : start + batch_size], train=False)))
        return np.concatenate(out) if out else np.zeros((0, self.cfg.num_classes), self.dtype)


class _ReadyTracker:
    """Calls ``on_ready(offset)`` as backward completes parts: ``offset`` is where the run of
    completed parts at the end of the buffer begins (backward order and buffer order differ
    at the front: the embeddings come first in the buffer but finish before the patch
    embedding)."""

    def __init__(self, model: VisionTransformer, on_ready: Callable[[int], None] | None) -> None:
        self.on_ready = on_ready
        self.parts = model.parts() if on_ready is not None else []
        self.done: set[str] = set()
        self.reported = -1

    def __call__(self, *names: str) -> None:
        if self.on_ready is None:
            return
        self.done.update(names)
        offset = None
        for start, name in reversed(self.parts):
            if name not in self.done:
                break
            offset = start
        if offset is not None and offset != self.reported:
            self.reported = offset
            self.on_ready(offset)

    def tick(self) -> None:
        """Between layers: ``on_ready`` again with the offset last reported (starts nothing new,
        lets the collectives in flight progress)."""
        if self.on_ready is not None and self.reported >= 0:
            self.on_ready(self.reported)


def expected_num_params(cfg: ViTConfig) -> int:
    """Parameter count from the shape alone (the formula tests check the model against)."""
    D, p, C = cfg.embed_dim, cfg.patch_size, cfg.in_chans
    n = (cfg.img_size // p) ** 2
    hidden = int(D * cfg.mlp_ratio)
    if cfg.patch_embed == "stem":
        widths = stem_widths(C, D, p)
        patch = sum(9 * c_in * c_out + c_out for c_in, c_out in itertools.pairwise(widths))
    else:
        patch = D * C * cfg.patch_window**2 + D
    pos = (n + 1) * D if cfg.pos_embed == "learned" else 0
    block = (2 * 2 * D  # two layer norms
             + 3 * D * D + (3 * D if cfg.qkv_bias else 0)  # qkv
             + D * D + D  # proj
             + D * hidden + hidden + hidden * D + D)  # mlp
    return patch + D + pos + cfg.depth * block + 2 * D + D * cfg.num_classes + cfg.num_classes
