r"""A small MLP denoiser for 2-D (or any flat $d$-dimensional) data.

$f_\theta(x, t, y) \in \mathbb R^d$ for $x \in \mathbb R^d$, a time $t \in [0, 1]$ and, optionally,
a class $y$. The time enters through Fourier features ({class}`TimeEmbedding`) and, with the
class embedding, conditions every residual block additively:

$$e = \mathrm{MLP}(\gamma(t)) + E[y],\qquad h_0 = W_{\rm in}x,\qquad
h_{l+1} = h_l + W_2^{(l)}\,\phi\big(W_1^{(l)}\,\mathrm{LN}(h_l) + U^{(l)}e\big),\qquad
f = W_{\rm out}\,\phi(\mathrm{LN}(h_L)),$$

$\phi$ the activation (SiLU by default). What $f$ predicts ($\varepsilon$, $x_0$, $v$, the
velocity, ...) is decided by the loss it is trained with ({mod}`stepdiff.train`), not here.
Class conditioning keeps one extra "null" class, index ``n_classes``, that stands for "no
label": training with labels sometimes replaced by it (``label_dropout`` in
{func}`stepdiff.train.train`) makes one network both conditional and unconditional, as
classifier-free guidance needs (Ho & Salimans 2022).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["MLPConfig", "TimeEmbedding", "Block", "MLP"]

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}


@dataclass
class MLPConfig:
    """Sizes of an {class}`MLP`."""

    dim: int = 2  # d, the dimension of the data
    hidden: int = 128  # width of the residual stream and of every layer
    n_layers: int = 3  # residual blocks
    n_freqs: int = 32  # Fourier frequencies of the time embedding (2 * n_freqs features)
    max_freq: float = 1000.0  # highest angular frequency, in radians per unit of t
    n_classes: int = 0  # 0: unconditional; otherwise labels 0..n_classes-1, plus the null class
    activation: str = "silu"  # "silu", "relu" (the tutorial's Fig. 6 network) or "gelu"

    def __post_init__(self) -> None:
        for name in ("dim", "hidden", "n_layers", "n_freqs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        k = self.n_classes
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"n_classes must be a non-negative integer; got {self.n_classes!r}")
        if not self.max_freq >= 1:
            raise ValueError(f"max_freq must be >= 1; got {self.max_freq}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")


class TimeEmbedding(nn.Module):
    r"""Fourier features of $t\in[0,1]$: $\gamma(t) = (\sin\omega_k t,\ \cos\omega_k t)_{k<F}$.

    The $F$ = ``n_freqs`` angular frequencies are spaced geometrically,
    $\omega_k = \omega_{\max}^{k/(F-1)}$, from 1 to $\omega_{\max}$ = ``max_freq``: the slow ones
    tell far-apart times apart, the fast ones the small differences near $t = 0$ where the
    noise level of the tutorial's $\sigma_q\sqrt t$ changes fastest. ``[B]`` to ``[B, 2F]``.
    """

    def __init__(self, n_freqs: int, max_freq: float) -> None:
        super().__init__()
        exponents = torch.arange(n_freqs, dtype=torch.float32) / max(n_freqs - 1, 1)
        self.register_buffer("freqs", math.log(max_freq) * exponents, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        angles = t[:, None] * torch.exp(self.freqs)[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class Block(nn.Module):
    r"""A residual block conditioned on $e$: $h + W_2\,\phi\big(W_1\,\mathrm{LN}(h) + U e\big)$."""

    def __init__(self, hidden: int, activation: str) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.cond = nn.Linear(hidden, hidden, bias=False)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        return h + self.fc2(self.act(self.fc1(self.norm(h)) + self.cond(e)))


class MLP(nn.Module):
    r"""The network $f_\theta(x, t, y)$ of the module docstring; see {class}`MLPConfig` for sizes.

    ``forward(x, t, y=None)``: ``x`` ``[B, d]``; ``t`` ``[B]`` or a scalar (times in
    $[0, 1]$, not checked here: the losses and samplers check them); ``y`` ``[B]`` int64
    labels in $0..$ ``n_classes`` (the last is the null class) or ``None``, which means the
    null class for a conditional model. Returns ``[B, d]`` in the dtype of ``x``.
    """

    def __init__(self, config: MLPConfig | None = None, **kwargs) -> None:
        super().__init__()
        if config is None:
            config = MLPConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a config or keyword arguments, not both")
        self.config = c = config
        self.time_embed = TimeEmbedding(c.n_freqs, c.max_freq)
        self.time_mlp = nn.Sequential(
            nn.Linear(2 * c.n_freqs, c.hidden),
            ACTIVATIONS[c.activation](),
            nn.Linear(c.hidden, c.hidden),
        )
        self.class_embed = nn.Embedding(c.n_classes + 1, c.hidden) if c.n_classes > 0 else None
        self.input = nn.Linear(c.dim, c.hidden)
        self.blocks = nn.ModuleList(Block(c.hidden, c.activation) for _ in range(c.n_layers))
        self.norm = nn.LayerNorm(c.hidden)
        self.act = ACTIVATIONS[c.activation]()
        self.output = nn.Linear(c.hidden, c.dim)

    @property
    def null_class(self) -> int | None:
        """The label meaning "no class" (``n_classes``); ``None`` for an unconditional model."""
        return self.config.n_classes if self.config.n_classes > 0 else None

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        B, d = self._check(x, y)
        t = torch.as_tensor(t, device=x.device).to(x.dtype)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must be a scalar or have shape [{B}] (one per sample); got {tuple(t.shape)}")
        e = self.time_mlp(self.time_embed(t))
        if self.class_embed is not None:
            if y is None:
                y = torch.full((B,), self.config.n_classes, device=x.device, dtype=torch.long)
            e = e + self.class_embed(y)
        h = self.input(x)
        for block in self.blocks:
            h = block(h, e)
        return self.output(self.act(self.norm(h)))

    def _check(self, x: Tensor, y: Tensor | None) -> tuple[int, int]:
        d = self.config.dim
        if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != d:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape [B, {d}]; got {shape}")
        B = x.shape[0]
        if y is not None:
            if self.class_embed is None:
                raise ValueError("this MLP is unconditional (n_classes = 0) but got labels y")
            if y.shape != (B,) or y.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"y must be integer labels of shape [{B}]; got {y.dtype} {tuple(y.shape)}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) > self.config.n_classes):
                raise ValueError(
                    f"labels must lie in 0..{self.config.n_classes} (the last is the null class); "
                    f"got values in [{int(y.min())}, {int(y.max())}]"
                )
        return B, d

    def num_parameters(self) -> int:
        """The number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
