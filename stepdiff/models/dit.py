r"""The Diffusion Transformer (DiT) of Peebles & Xie 2023, with class or context conditioning.

An image $x$ ``[B, C, H, W]`` is cut into $p\times p$ patches, each linearly embedded to width $d$
(``hidden``), plus a fixed 2-D sine-cosine position embedding: $T = HW/p^2$ tokens. The time and
class give one vector per image,

$$c = \mathrm{MLP}(\gamma(1000\,t)) + E[y]$$

($E$ holds one extra row, the null class ``n_classes``, for classifier-free guidance), and every
**DiTBlock** is conditioned on $c$ by adaLN-Zero: from $c$ it regresses shifts $\beta$, scales
$\gamma$ and gates $\alpha$ for its two branches,

$$x \leftarrow x + \alpha_1 \odot \mathrm{Attn}\big(\mathrm{LN}(x)(1 + \gamma_1) + \beta_1\big),\qquad
x \leftarrow x + \alpha_2 \odot \mathrm{MLP}\big(\mathrm{LN}(x)(1 + \gamma_2) + \beta_2\big),$$

with the regression zero-initialised, so $\alpha = 0$ and every block starts as the identity.
With a context (text tokens, ``context_dim > 0``) a cross-attention branch
$x \leftarrow x + \mathrm{Attn}(\mathrm{LN}(x), \text{context})$ sits between the two (as in
PixArt-$\alpha$), its output projection zero-initialised too; ``pooled_context=True`` also adds a
zero-initialised projection of the mean context token to $c$
({class}`~stepdiff.models.layers.PooledContext`), as Stable Diffusion 3 adds its pooled text vector, so
the caption modulates every block. A last adaLN-modulated linear layer,
zero-initialised, maps each token back to a $p\times p\times C$ patch, and the patches are put
back in place. The attention is the package's {class}`~stepdiff.models.attention.Attention`, so on
CUDA it runs the Triton kernels.

Each $\mathrm{LN}(x)(1 + \gamma) + \beta$ is one call of {func}`stepdiff.kernels.norm.adaln_modulate`:
on CUDA the fused Triton kernel (one pass over the tokens), elsewhere the PyTorch reference
(``norm_backend`` chooses). The ``nn.LayerNorm`` modules (without parameters) stay for their
$\epsilon$, so the state-dict keys are those of the unfused network.

Presets ({data}`DIT_PRESETS`) are the paper's S and B models with patch 2 or 4; DiT-S has 33 M and
DiT-B 130 M parameters for its 32x32x4 latents and 1000 classes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor, nn

from ..kernels.norm import adaln_modulate
from .attention import Attention
from .layers import (
    PooledContext,
    TimestepEmbedder,
    batch_time,
    check_backend,
    check_context,
    check_labels,
    check_text_routes,
    zero_,
)

__all__ = ["DiTConfig", "DiTBlock", "FinalLayer", "DiT", "DIT_PRESETS", "sincos_position_embedding", "norm_modulate"]


@dataclass
class DiTConfig:
    """Sizes of a {class}`DiT` (the defaults are the ``tiny`` preset); ``DiTConfig.preset(name,
    **changes)`` gives a named one."""

    in_channels: int = 3  # C of the images (the output has the same)
    patch_size: int = 2  # p: tokens are p x p patches
    hidden: int = 96  # d, the width of every token
    depth: int = 6  # DiT blocks
    heads: int = 4  # attention heads (head width d / heads)
    mlp_ratio: float = 4.0  # MLP hidden width / d
    freq_dim: int = 256  # sinusoidal time features fed to the time MLP
    n_classes: int = 0  # 0: no class input; else labels 0..n_classes-1 plus the null class n_classes
    context_dim: int = 0  # 0: no cross-attention; else the width D_c of the context [B, L, D_c]
    pooled_context: bool = False  # also add a projection of the mean context token to the time embedding
    pooled_gain: float = 0.0  # 0: the pool starts at zero (off); g > 0: W ~ N(0, g^2 / context_dim) (on)
    cross_attention: bool = True  # False: no cross-attention layers; the context enters by the pool only
    attn_backend: str | None = None  # stepdiff.kernels.attention backend, or "sdpa" (None: by device)
    norm_backend: str | None = None  # stepdiff.kernels.adaln_modulate backend (None: by device)

    def __post_init__(self) -> None:
        check_backend("attn_backend", self.attn_backend, attention=True)
        check_backend("norm_backend", self.norm_backend)
        for name in ("in_channels", "patch_size", "hidden", "depth", "heads", "freq_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        check_text_routes(self.context_dim, self.pooled_context, self.pooled_gain, self.cross_attention)
        for name in ("n_classes", "context_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"heads {self.heads} does not divide hidden {self.hidden}")
        if self.hidden % 4:
            raise ValueError(f"hidden must be divisible by 4 (the 2-D sin-cos position embedding); got {self.hidden}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive; got {self.mlp_ratio}")

    @classmethod
    def preset(cls, name: str, **changes) -> DiTConfig:
        """A named configuration ({data}`DIT_PRESETS`), with fields replaced by ``changes``
        (e.g. ``in_channels=1, n_classes=10``)."""
        if name not in DIT_PRESETS:
            raise ValueError(f"unknown DiT preset {name!r}; choose one of {sorted(DIT_PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown DiTConfig fields {unknown}; the fields are {sorted(known)}")
        return replace(DIT_PRESETS[name], **changes)


DIT_PRESETS: dict[str, DiTConfig] = {
    # Peebles & Xie 2023, Table 1: DiT-S (12 blocks, width 384, 6 heads), DiT-B (12, 768, 12).
    "S/2": DiTConfig(patch_size=2, hidden=384, depth=12, heads=6),
    "S/4": DiTConfig(patch_size=4, hidden=384, depth=12, heads=6),
    "B/2": DiTConfig(patch_size=2, hidden=768, depth=12, heads=12),
    "B/4": DiTConfig(patch_size=4, hidden=768, depth=12, heads=12),
    # 1.06 M parameters (32x32x3, no conditioning), for the CPU: 256 tokens of width 96 for a 32x32 image.
    "tiny": DiTConfig(patch_size=2, hidden=96, depth=6, heads=4),
}


def sincos_position_embedding(dim: int, h: int, w: int, device: torch.device | None = None) -> Tensor:
    r"""The fixed 2-D position embedding of a $h\times w$ grid of tokens: ``[h * w, dim]`` (row-major).

    The first half of the features encodes the column $j$ and the second the row $i$, each as
    $(\sin(j\omega_k), \cos(j\omega_k))_{k < \mathrm{dim}/4}$ with $\omega_k = 10000^{-k/(\mathrm{dim}/4)}$
    (the Transformer's features, one set per axis, as in MAE and DiT).
    """
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)
    cols = torch.arange(w, device=device, dtype=torch.float32).repeat(h)

    def axis(pos: Tensor) -> Tensor:
        angles = pos[:, None] * omega[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([axis(cols), axis(rows)], dim=1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    r"""$x(1 + \gamma) + \beta$, one $(\beta, \gamma)$ per image broadcast over its tokens."""
    return x * (1 + scale) + shift


def norm_modulate(norm: nn.LayerNorm, x: Tensor, shift: Tensor, scale: Tensor, backend: str | None = None) -> Tensor:
    r"""$\mathrm{LN}(x)(1 + \gamma) + \beta$ for tokens ``x [B, T, d]`` and ``shift``, ``scale``
    ``[B, d]``, with the $\epsilon$ of ``norm`` (a LayerNorm without parameters), in one call of
    {func}`stepdiff.kernels.norm.adaln_modulate` (``backend`` as there)."""
    return adaln_modulate(x, shift, scale, norm.eps, backend=backend)


class DiTBlock(nn.Module):
    r"""Self-attention, optional cross-attention and an MLP on tokens $x$ ``[B, T, d]``, conditioned on
    $c$ ``[B, d]`` by adaLN-Zero. From $(\beta_1, \gamma_1, \alpha_1, \beta_2, \gamma_2, \alpha_2) =
    W\,\mathrm{SiLU}(c) + b$ (six vectors of width $d$),

    $$x \leftarrow x + \alpha_1 \odot \mathrm{Attn}\big(\mathrm{LN}(x)(1 + \gamma_1) + \beta_1\big),\qquad
    x \leftarrow x + \alpha_2 \odot \mathrm{MLP}\big(\mathrm{LN}(x)(1 + \gamma_2) + \beta_2\big),$$

    with, when ``context_dim > 0``, $x \leftarrow x + \mathrm{Attn}(\mathrm{LN}'(x), \text{context})$ in
    between ($\mathrm{LN}'$ with its own scale and shift). $\mathrm{MLP}(h) = W_2\,\mathrm{GELU}(W_1 h + b_1) + b_2$
    (tanh GELU) has width ``mlp_ratio`` $\cdot\, d$."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, context_dim: int, backend: str | None,
                 norm_backend: str | None = None) -> None:
        super().__init__()
        self.norm_backend = norm_backend
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads, qkv_bias=True, backend=backend)
        self.cross = None
        if context_dim:
            self.norm_cross = nn.LayerNorm(hidden, eps=1e-6)
            self.cross = Attention(hidden, heads, context_dim=context_dim, qkv_bias=True, backend=backend)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        width = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.GELU(approximate="tanh"), nn.Linear(width, hidden))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)  # [B, d] each
        x = x + gate1[:, None] * self.attn(norm_modulate(self.norm1, x, shift1, scale1, self.norm_backend))
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), context, context_mask)
        return x + gate2[:, None] * self.mlp(norm_modulate(self.norm2, x, shift2, scale2, self.norm_backend))


class FinalLayer(nn.Module):
    r"""adaLN-modulated LayerNorm, then a linear map of each token to its ``p * p * C`` patch values:
    with $(\beta, \gamma) = W\,\mathrm{SiLU}(c) + b$, each token $x \in \mathbb R^d$ becomes
    $W_o\big(\mathrm{LN}(x)(1 + \gamma) + \beta\big) + b_o \in \mathbb R^{p^2 C}$."""

    def __init__(self, hidden: int, patch_size: int, out_channels: int, norm_backend: str | None = None) -> None:
        super().__init__()
        self.norm_backend = norm_backend
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(norm_modulate(self.norm, x, shift, scale, self.norm_backend))


class DiT(nn.Module):
    r"""The DiT of the module docstring; see {class}`DiTConfig` for sizes and presets.

    ``forward(x, t, y=None, context=None, context_mask=None)``: ``x`` ``[B, in_channels, H, W]``
    with $H, W$ divisible by the patch size (any such size: the position embedding is computed for
    the grid at hand); ``t`` a float or ``[B]``; ``y`` ``[B]`` labels in $0..$ ``n_classes``
    (``None``: the null class); ``context`` ``[B, L, context_dim]`` and ``context_mask`` ``[B, L]``
    (bool, padding on the right) when ``context_dim > 0``. Returns a tensor shaped like ``x``:
    exactly zero at initialisation.
    """

    def __init__(self, config: DiTConfig | None = None, **kwargs) -> None:
        super().__init__()
        if config is None:
            config = DiTConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a config or keyword arguments, not both")
        self.config = c = config
        d, p = c.hidden, c.patch_size
        self.patch_embed = nn.Conv2d(c.in_channels, d, kernel_size=p, stride=p)
        self.time_embed = TimestepEmbedder(c.freq_dim, d)
        self.class_embed = nn.Embedding(c.n_classes + 1, d) if c.n_classes else None
        self.blocks = nn.ModuleList(
            DiTBlock(d, c.heads, c.mlp_ratio, c.context_dim if c.cross_attention else 0, c.attn_backend,
                     c.norm_backend) for _ in range(c.depth)
        )
        self.final = FinalLayer(d, p, c.in_channels, c.norm_backend)
        self._init_weights()
        # Made last (after DiT's initialisation, which would redraw it), so that a random start
        # (pooled_gain > 0) leaves every other weight as the seed draws it.
        self.pooled = PooledContext(c.context_dim, d, c.pooled_gain) if c.pooled_context else None

    def _init_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linear maps (and patch embedding), N(0, 0.02) time MLP
        and class table, and zeros wherever a branch must start switched off."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        for block in self.blocks:
            zero_(block.adaLN_modulation[-1])
            if block.cross is not None:
                zero_(block.cross.to_out)
        zero_(self.final.adaLN_modulation[-1])
        zero_(self.final.linear)

    @property
    def null_class(self) -> int | None:
        """The label meaning "no class" (``n_classes``); ``None`` without class conditioning."""
        return self.config.n_classes if self.config.n_classes > 0 else None

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        self._check_image(x)
        B, C, H, W = x.shape
        p = self.config.patch_size
        h, w = H // p, W // p
        c = self.time_embed(batch_time(t, B, x.device))
        y = check_labels(y, self.config.n_classes, B, x.device)
        if y is not None:
            c = c + self.class_embed(y)
        context, context_mask = check_context(context, context_mask, self.config.context_dim, B)
        if self.pooled is not None:
            c = c + self.pooled(context, context_mask).to(c.dtype)
        # [B, T, d], T = h * w, made contiguous once: the whole residual stream then keeps that layout
        # (a transposed one would be copied again by every norm and linear map).
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2).contiguous()
        tokens = tokens + sincos_position_embedding(self.config.hidden, h, w, x.device).to(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens, c, context, context_mask)
        patches = self.final(tokens, c)  # [B, T, p * p * C]
        out = patches.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
        return out.to(x.dtype)

    def _check_image(self, x: Tensor) -> None:
        c = self.config
        if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
            desc = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a float image batch [B, {c.in_channels}, H, W]; got {desc}")
        if x.shape[1] != c.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels but this DiT takes in_channels={c.in_channels}; "
                             f"got shape {tuple(x.shape)}")
        if x.shape[2] % c.patch_size or x.shape[3] % c.patch_size or x.shape[0] < 1:
            raise ValueError(f"the height and width of x must be divisible by the patch size {c.patch_size}; "
                             f"got {tuple(x.shape[2:])}")

    def num_parameters(self) -> int:
        """The number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
