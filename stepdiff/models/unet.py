r"""The UNet denoiser of DDPM (Ho et al. 2020), with the conditioning of later work.

The network maps a noisy image $x_t$ ``[B, C, H, W]``, its time $t$ and optionally a class $y$ or
a context (text tokens) to a tensor of the same shape. It is built from:

- **ResBlock**: $h = \mathrm{Conv}(\mathrm{SiLU}(\mathrm{GN}(x)))$, then the time (and class)
  embedding $e$ enters as a scale and shift,
  $h \leftarrow \mathrm{GN}(h)\,(1 + s(e)) + b(e)$ (Nichol & Dhariwal 2021; DDPM adds $b(e)$ only,
  ``scale_shift=False``), then $\mathrm{Conv}(\mathrm{Dropout}(\mathrm{SiLU}(h)))$ with the last
  convolution zero-initialised, and $x$ (through a 1x1 convolution when the width changes) is
  added back: every block starts as the identity on its skip path.
- **AttnBlock**: self-attention over the $HW$ pixels as tokens, $x + \mathrm{Attn}(\mathrm{GN}(x))$,
  and with a context, cross-attention $x + \mathrm{Attn}(\mathrm{GN}(x), \text{context})$, each
  output projection zero-initialised. The attention is the package's
  {class}`~stepdiff.models.attention.Attention`, so on CUDA it runs the Triton kernels.
- **Down/Upsample**: a stride-2 3x3 convolution; nearest-neighbour doubling then a 3x3 convolution.

Level $i$ of ``channel_mult`` works at resolution $H/2^i$ with ``channels * channel_mult[i]``
channels and ``num_res_blocks`` ResBlocks (plus an AttnBlock each where $i \in$ ``attn_levels``).
The way up mirrors the way down with one more block per level, each taking the matching
activation of the way down concatenated to its input; a middle stage (ResBlock, AttnBlock,
ResBlock) sits at the bottom. The time enters as $e = \mathrm{MLP}(\gamma(1000\,t)) + E[y]$, with
$\gamma$ the sinusoidal features of {func}`~stepdiff.models.layers.timestep_embedding` and the class
table $E$ holding one extra row, the null class ``n_classes`` (classifier-free guidance). With
``pooled_context=True`` a text-conditioned UNet adds $W\bar c$, a zero-initialised projection of the
mean real context token ({class}`~stepdiff.models.layers.PooledContext`, as SDXL adds its pooled
text vector): the caption then reaches every ResBlock through $e$, not only the attention blocks.

**Kernels and layout.** Every $\mathrm{SiLU}(\mathrm{GN}(\cdot))$ pair (the first norm of each
ResBlock, the second one with DDPM's additive time, the output norm) is one call of
{func}`stepdiff.kernels.norm.group_norm_silu`: on CUDA the fused Triton kernel (one pass over memory),
elsewhere the PyTorch reference, which computes exactly what ``F.silu(F.group_norm(x))`` does
(``norm_backend`` chooses). The ``nn.GroupNorm`` modules stay as holders of the parameters, so
the state-dict keys are those of the unfused network. ``channels_last=True`` (or
{meth}`UNet.set_channels_last`) runs the network in channels-last memory format, the weights
stored so too: the layout GPU convolutions on tensor cores prefer, in which the fused norm keeps
its input's layout and attention reads the pixels as tokens without a copy. The output is given
back in the input's layout; the values equal the NCHW network's up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.norm import group_norm_silu
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

__all__ = ["UNetConfig", "norm_silu", "ResBlock", "AttnBlock", "Downsample", "Upsample", "UNet", "UNET_PRESETS"]


@dataclass
class UNetConfig:
    """Sizes of a {class}`UNet` (the defaults are the ``tiny`` preset); ``UNetConfig.preset(name,
    **changes)`` gives a named one."""

    in_channels: int = 3  # C of the images (the output has the same)
    channels: int = 32  # base width; level i has channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 2)  # one entry per resolution level
    num_res_blocks: int = 1  # ResBlocks per level on the way down (one more on the way up)
    attn_levels: tuple[int, ...] = (2,)  # levels (0 = full resolution) with attention; the middle always has it
    heads: int = 4  # attention heads (head width = channels of the level / heads)
    dropout: float = 0.0
    norm_groups: int = 8  # GroupNorm groups; must divide every width
    scale_shift: bool = True  # time as scale and shift of the second norm (False: DDPM's additive shift)
    n_classes: int = 0  # 0: no class input; else labels 0..n_classes-1 plus the null class n_classes
    context_dim: int = 0  # 0: no cross-attention; else the width D_c of the context [B, L, D_c]
    pooled_context: bool = False  # also add a projection of the mean context token to the time embedding
    pooled_gain: float = 0.0  # 0: the pool starts at zero (off); g > 0: W ~ N(0, g^2 / context_dim) (on)
    cross_attention: bool = True  # False: no cross-attention layers; the context enters by the pool only
    attn_backend: str | None = None  # stepdiff.kernels.attention backend, or "sdpa" (None: by device)
    norm_backend: str | None = None  # stepdiff.kernels.group_norm_silu backend (None: by device)
    channels_last: bool = False  # run (and store the weights) in channels-last memory format

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        check_backend("attn_backend", self.attn_backend, attention=True)
        check_backend("norm_backend", self.norm_backend)
        if not isinstance(self.channels_last, bool):
            raise ValueError(f"channels_last must be True or False; got {self.channels_last!r}")
        self.attn_levels = tuple(self.attn_levels)
        for name in ("in_channels", "channels", "num_res_blocks", "heads", "norm_groups"):
            _positive_int(name, getattr(self, name))
        check_text_routes(self.context_dim, self.pooled_context, self.pooled_gain, self.cross_attention)
        for name in ("n_classes", "context_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
        if not self.channel_mult:
            raise ValueError("channel_mult must have at least one level")
        for m in self.channel_mult:
            _positive_int("channel_mult entries", m)
        for level in self.attn_levels:
            if not (isinstance(level, int) and 0 <= level < len(self.channel_mult)):
                raise ValueError(f"attn_levels must name levels 0..{self.levels - 1}; got {self.attn_levels}")
        for width in {self.channels * m for m in self.channel_mult}:
            if width % self.norm_groups:
                raise ValueError(f"norm_groups {self.norm_groups} does not divide the width {width}")
            if width % self.heads:
                raise ValueError(f"heads {self.heads} does not divide the width {width}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1); got {self.dropout}")

    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    @classmethod
    def preset(cls, name: str, **changes) -> UNetConfig:
        """A named configuration ({data}`UNET_PRESETS`), with fields replaced by ``changes``
        (e.g. ``in_channels=1, n_classes=10``)."""
        if name not in UNET_PRESETS:
            raise ValueError(f"unknown UNet preset {name!r}; choose one of {sorted(UNET_PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown UNetConfig fields {unknown}; the fields are {sorted(known)}")
        return replace(UNET_PRESETS[name], **changes)


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


UNET_PRESETS: dict[str, UNetConfig] = {
    # 1.19 M parameters (32x32x3, no conditioning): trains on a CPU. 8x8, 16x16 and 32x32 inputs
    # go through levels of 1x, 1/2 and 1/4 the size; attention at the coarsest level (8x8 for
    # 32x32 images) and in the middle. Two blocks per level would make it 1.74 M.
    "tiny": UNetConfig(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attn_levels=(2,), heads=4),
    # Ho et al. 2020, CIFAR-10 (32x32x3): 35.7 M parameters. One attention head of full width at
    # 16x16, the time added as a shift, dropout 0.1, GroupNorm with 32 groups.
    "ddpm-cifar": UNetConfig(
        channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_levels=(1,), heads=1,
        dropout=0.1, norm_groups=32, scale_shift=False,
    ),
}


def norm_silu(norm: nn.GroupNorm, x: Tensor, backend: str | None = None) -> Tensor:
    r"""$\mathrm{SiLU}(\mathrm{GN}(x))$ with the groups, parameters and $\epsilon$ of ``norm``, in one
    call of {func}`stepdiff.kernels.norm.group_norm_silu` (``backend`` as there)."""
    return group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, backend=backend)


class ResBlock(nn.Module):
    r"""$x \mapsto \mathrm{skip}(x) + \mathrm{Conv}_2\big(\mathrm{SiLU}(\mathrm{GN}(h)\,(1 + s) + b)\big)$,
    $h = \mathrm{Conv}_1(\mathrm{SiLU}(\mathrm{GN}(x)))$, $(s, b)$ from the embedding $e$ (with
    ``scale_shift=False``: $\mathrm{SiLU}(\mathrm{GN}(h + b))$). The norm-SiLU pairs are fused
    ({func}`norm_silu`, ``norm_backend``)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float, scale_shift: bool,
                 norm_backend: str | None = None) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.norm_backend = norm_backend
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out if scale_shift else c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(norm_silu(self.norm1, x, self.norm_backend))
        e = self.emb(F.silu(emb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = F.silu(self.norm2(h) * (1 + scale) + shift)
        else:
            h = norm_silu(self.norm2, h + e, self.norm_backend)
        return self.skip(x) + self.conv2(self.dropout(h))


class AttnBlock(nn.Module):
    r"""Self-attention over pixels, $x + \mathrm{Attn}(\mathrm{GN}(x))$, then (with ``context_dim``)
    cross-attention to the context, $x + \mathrm{Attn}(\mathrm{GN}(x), c)$; both start switched off."""

    def __init__(self, channels: int, heads: int, groups: int, context_dim: int, backend: str | None) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.attn = Attention(channels, heads, qkv_bias=True, backend=backend)
        zero_(self.attn.to_out)
        self.cross = None
        if context_dim:
            self.norm_cross = nn.GroupNorm(groups, channels)
            self.cross = Attention(channels, heads, context_dim=context_dim, qkv_bias=True, backend=backend)
            zero_(self.cross.to_out)

    def forward(self, x: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        B, C, H, W = x.shape

        def tokens(t: Tensor) -> Tensor:  # [B, C, H, W] -> [B, HW, C]
            return t.flatten(2).transpose(1, 2)

        def image(t: Tensor) -> Tensor:  # [B, HW, C] -> [B, C, H, W]
            return t.transpose(1, 2).reshape(B, C, H, W)

        x = x + image(self.attn(tokens(self.norm(x))))
        if self.cross is not None:
            x = x + image(self.cross(tokens(self.norm_cross(x)), context, context_mask))
        return x


class Downsample(nn.Module):
    r"""Halve the resolution: a 3x3 convolution with stride 2 and zero padding 1,
    $y_{ij} = b + \sum_{u, v \in \{-1, 0, 1\}} W_{uv}\, x_{2i+u,\, 2j+v}$ (each $W_{uv}$ a channels-by-channels
    matrix), so ``[B, C, H, W]`` becomes ``[B, C, ceil(H/2), ceil(W/2)]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    r"""Double the resolution: nearest-neighbour copies $u_{ij} = x_{\lfloor i/2\rfloor,\, \lfloor j/2\rfloor}$,
    then a 3x3 convolution with zero padding 1, $y = W * u + b$; ``[B, C, H, W]`` becomes ``[B, C, 2H, 2W]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.ModuleList):
    """Modules run in turn, each given what it takes (ResBlock: the embedding; AttnBlock: the context)."""

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        for m in self:
            if isinstance(m, ResBlock):
                h = m(h, emb)
            elif isinstance(m, AttnBlock):
                h = m(h, context, context_mask)
            else:
                h = m(h)
        return h


class UNet(nn.Module):
    r"""The UNet of the module docstring; see {class}`UNetConfig` for sizes and presets.

    ``forward(x, t, y=None, context=None, context_mask=None)``: ``x`` ``[B, in_channels, H, W]``
    with $H, W$ divisible by $2^{\text{levels}-1}$; ``t`` a float or ``[B]``; ``y`` ``[B]`` labels in
    $0..$ ``n_classes`` (``None``: the null class); ``context`` ``[B, L, context_dim]`` and
    ``context_mask`` ``[B, L]`` (bool, padding on the right) when ``context_dim > 0``; ``embedding``
    ``[B, embed_dim]`` (optional) is added to the time embedding as a class embedding is (a
    {class}`~stepdiff.models.text.WordRows` bag of words); ``spatial`` ``[B, channels, H, W]``
    (optional) is added to the input convolution's output, a per-pixel condition (a
    {class}`~stepdiff.models.layout.LayoutRows` map). Returns a tensor shaped like ``x``:
    exactly zero at initialisation (zero output convolution).
    """

    def __init__(self, config: UNetConfig | None = None, **kwargs) -> None:
        super().__init__()
        if config is None:
            config = UNetConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a config or keyword arguments, not both")
        self.config = c = config
        ch, G, emb_dim = c.channels, c.norm_groups, 4 * c.channels
        self.embed_dim = emb_dim  # the width of the time embedding every block reads
        self.time_embed = TimestepEmbedder(ch, emb_dim)
        self.class_embed = nn.Embedding(c.n_classes + 1, emb_dim) if c.n_classes else None

        def res(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, c_out, emb_dim, G, c.dropout, c.scale_shift, c.norm_backend)

        def attn(width: int) -> AttnBlock:
            return AttnBlock(width, c.heads, G, c.context_dim if c.cross_attention else 0, c.attn_backend)

        self.conv_in = nn.Conv2d(c.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips, width = [ch], ch  # widths of the activations the way up will take back
        for i, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                stage = Stage([res(width, ch * mult)])
                width = ch * mult
                if i in c.attn_levels:
                    stage.append(attn(width))
                self.down.append(stage)
                skips.append(width)
            if i < c.levels - 1:
                self.down.append(Stage([Downsample(width)]))
                skips.append(width)
        self.mid = Stage([res(width, width), attn(width), res(width, width)])
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(c.channel_mult))):
            for j in range(c.num_res_blocks + 1):
                stage = Stage([res(width + skips.pop(), ch * mult)])
                width = ch * mult
                if i in c.attn_levels:
                    stage.append(attn(width))
                if i > 0 and j == c.num_res_blocks:
                    stage.append(Upsample(width))
                self.up.append(stage)
        self.norm_out = nn.GroupNorm(G, width)
        self.conv_out = zero_(nn.Conv2d(width, c.in_channels, 3, padding=1))
        # Made last, so that a random start (pooled_gain > 0) leaves every other weight as the seed draws it.
        self.pooled = PooledContext(c.context_dim, emb_dim, c.pooled_gain) if c.pooled_context else None
        self.channels_last = False
        self.set_channels_last(c.channels_last)

    def set_channels_last(self, enabled: bool = True) -> UNet:
        """Run in channels-last memory format from now on (``enabled``), or in NCHW: the
        convolution weights are converted in place (same values, other strides; parameters stay
        the same objects, so an optimiser holding them is unaffected); ``config.channels_last``
        does not change (it gives the setting a model is built with). Returns the model."""
        if not isinstance(enabled, bool):
            raise ValueError(f"enabled must be True or False; got {enabled!r}")
        layout = torch.channels_last if enabled else torch.contiguous_format
        with torch.no_grad():
            for p in self.parameters():
                if p.ndim == 4 and not p.is_contiguous(memory_format=layout):
                    p.data = p.data.contiguous(memory_format=layout)
        self.channels_last = enabled
        return self

    @property
    def null_class(self) -> int | None:
        """The label meaning "no class" (``n_classes``); ``None`` without class conditioning."""
        return self.config.n_classes if self.config.n_classes > 0 else None

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None, *,
                embedding: Tensor | None = None, spatial: Tensor | None = None) -> Tensor:
        self._check_image(x)
        B = x.shape[0]
        emb = self.time_embed(batch_time(t, B, x.device))
        y = check_labels(y, self.config.n_classes, B, x.device)
        if y is not None:
            emb = emb + self.class_embed(y)
        if embedding is not None:
            if not isinstance(embedding, Tensor) or embedding.shape != (B, self.embed_dim) \
                    or not embedding.is_floating_point():
                desc = f"{embedding.dtype} {tuple(embedding.shape)}" if isinstance(embedding, Tensor) \
                    else type(embedding).__name__
                raise ValueError(f"embedding must be a float tensor [{B}, {self.embed_dim}] (the batch, the time "
                                 f"embedding's width); got {desc}")
            emb = emb + embedding.to(emb.dtype)
        context, context_mask = check_context(context, context_mask, self.config.context_dim, B)
        if self.pooled is not None:
            emb = emb + self.pooled(context, context_mask).to(emb.dtype)
        backend = self.config.norm_backend
        h = self.conv_in(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)
        if spatial is not None:
            want = (B, self.config.channels, *x.shape[-2:])
            if not isinstance(spatial, Tensor) or tuple(spatial.shape) != want or not spatial.is_floating_point():
                desc = f"{spatial.dtype} {tuple(spatial.shape)}" if isinstance(spatial, Tensor) \
                    else type(spatial).__name__
                raise ValueError(f"spatial must be a float tensor {list(want)} (the batch, the UNet's base width "
                                 f"channels, the image's height and width); got {desc}")
            h = h + spatial.to(h.dtype)
        hs = [h]
        for stage in self.down:
            h = stage(h, emb, context, context_mask)
            hs.append(h)
        h = self.mid(h, emb, context, context_mask)
        for stage in self.up:
            h = stage(torch.cat([h, hs.pop()], dim=1), emb, context, context_mask)
        out = self.conv_out(norm_silu(self.norm_out, h, backend)).to(x.dtype)
        if x.is_contiguous() and not out.is_contiguous():
            out = out.contiguous()  # back to the caller's layout
        return out

    def _check_image(self, x: Tensor) -> None:
        c = self.config
        if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
            desc = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a float image batch [B, {c.in_channels}, H, W]; got {desc}")
        if x.shape[1] != c.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels but this UNet takes in_channels={c.in_channels}; "
                             f"got shape {tuple(x.shape)}")
        k = 2 ** (c.levels - 1)
        if x.shape[2] % k or x.shape[3] % k or x.shape[0] < 1:
            raise ValueError(f"the height and width of x must be divisible by {k} (2^(levels-1), "
                             f"{c.levels} levels); got {tuple(x.shape[2:])}")

    def num_parameters(self) -> int:
        """The number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
