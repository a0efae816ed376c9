r"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022), in miniature.

An encoder maps an image $x$ ``[B, C, H, W]`` to a diagonal Gaussian $q(z\mid x) =
\mathcal N(\mu(x), \mathrm{diag}\,s^2(x))$ over latents $z$ ``[B, c, H/f, W/f]`` with a few
channels $c$ (4, as Stable Diffusion) and a downsampling factor $f = 2^{\text{levels}-1}$ (4 at
32x32, 2 at 16x16); a decoder maps $z$ back to an image. Both are convolutional: ResBlocks
(GroupNorm, SiLU, 3x3 convolution, twice, plus the skip) at each level, a stride-2 convolution
(encoder) or nearest-neighbour doubling and a convolution (decoder) between levels.

**The loss** per image is Stable Diffusion's pixel term and KL term,

$$\mathcal L(x) = \sum_{\text{pixels}}\lvert x - \hat x\rvert
+ \beta\,\mathrm{KL}\big(q(z\mid x)\,\|\,\mathcal N(0, I)\big),
\qquad \hat x = \mathrm{dec}(z),\ z\sim q(z\mid x),$$

with a small $\beta$ (``kl_weight``, $10^{-6}$ as in Stable Diffusion's KL-f8): the KL only
keeps the latents from drifting to huge values and the posterior from collapsing to a point; it
is no VAE bound. Stable Diffusion adds a perceptual (LPIPS) term and a patch adversary for
texture; both need a pretrained network or a second model. They are left out here: the "shapes"
and digits images are flat regions with sharp edges and no texture, the L1 term (whose minimiser
is a median, not a mean) already keeps edges from being averaged into blur as L2 would, and the
measured PSNR and the Fréchet distance of reconstructions say how much is lost.

**Latent scale.** The latents come out at whatever scale the encoder settled on, while a
diffusion model assumes data of about unit variance. As Stable Diffusion does, a single
``scale_factor`` $= 1/\mathrm{std}(z)$ is measured once on a batch of training latents
({meth}`Autoencoder.fit_scale_factor`) and stored with the model (a buffer, so it travels in
the ``state_dict``): diffusion runs on $z\cdot$ ``scale_factor`` ({meth}`Autoencoder.encode_latents`)
and the decoder is given $z/$ ``scale_factor`` ({meth}`Autoencoder.decode_latents`). Here $z$ is
the posterior mean (the posterior's spread is negligible at this $\beta$, and the mean keeps the
training latents deterministic); ``sample=True`` measures on draws instead, as Stable Diffusion
does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AutoencoderConfig",
    "AE_PRESETS",
    "DiagonalGaussian",
    "AEResBlock",
    "Encoder",
    "Decoder",
    "Autoencoder",
    "autoencoder_loss",
    "psnr",
]


@dataclass
class AutoencoderConfig:
    """Sizes of an {class}`Autoencoder` (the defaults are the ``f4`` preset for 32x32x3 images)."""

    in_channels: int = 3
    channels: int = 32  # width of the first level; level i has channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 2)  # one entry per level; downsampling factor 2^(levels-1)
    num_res_blocks: int = 1  # per level, in the encoder and the decoder
    latent_channels: int = 4  # c
    norm_groups: int = 8
    kl_weight: float = 1e-6  # beta

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        for name in ("in_channels", "channels", "num_res_blocks", "latent_channels", "norm_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if not self.channel_mult or any(isinstance(m, bool) or not isinstance(m, int) or m < 1
                                        for m in self.channel_mult):
            raise ValueError(f"channel_mult must be one positive integer per level; got {self.channel_mult}")
        for width in {self.channels * m for m in self.channel_mult}:
            if width % self.norm_groups:
                raise ValueError(f"norm_groups {self.norm_groups} does not divide the width {width}")
        if not (isinstance(self.kl_weight, (int, float)) and self.kl_weight >= 0):
            raise ValueError(f"kl_weight must be a number >= 0; got {self.kl_weight!r}")

    @property
    def factor(self) -> int:
        """The downsampling factor $f = 2^{\\text{levels}-1}$."""
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def preset(cls, name: str, **changes) -> AutoencoderConfig:
        """A named configuration ({data}`AE_PRESETS`) with fields replaced by ``changes``."""
        if name not in AE_PRESETS:
            raise ValueError(f"unknown autoencoder preset {name!r}; choose one of {sorted(AE_PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown AutoencoderConfig fields {unknown}; the fields are {sorted(known)}")
        return replace(AE_PRESETS[name], **changes)


AE_PRESETS: dict[str, AutoencoderConfig] = {
    # 32x32x3 -> 8x8x4 (f = 4, 12x fewer numbers).
    "f4": AutoencoderConfig(),
    # 16x16 -> 8x8x4 (f = 2).
    "f2": AutoencoderConfig(channel_mult=(1, 2)),
    # For tests: f = 4 with few channels.
    "tiny": AutoencoderConfig(channels=8, channel_mult=(1, 2, 2), norm_groups=4),
}


class DiagonalGaussian:
    r"""$\mathcal N(\mu, \mathrm{diag}\,e^{\ell})$ over latents ``[B, c, h, w]``:
    {meth}`~stepdiff.models.autoencoder.DiagonalGaussian.sample`,
    {meth}`~stepdiff.models.autoencoder.DiagonalGaussian.mode` and the
    {meth}`~stepdiff.models.autoencoder.DiagonalGaussian.kl` to $\mathcal N(0, I)$ per image. The log-variance is
    clamped to $[-30, 20]$ (as Stable Diffusion's) so that a wild encoder output cannot overflow."""

    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        r"""$\tfrac12\sum(\mu^2 + e^{\ell} - 1 - \ell)$ over every latent entry of each image: ``[B]``."""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class AEResBlock(nn.Module):
    r"""$x \mapsto \mathrm{skip}(x) + \mathrm{Conv}_2(\mathrm{SiLU}(\mathrm{GN}(h)))$,
    $h = \mathrm{Conv}_1(\mathrm{SiLU}(\mathrm{GN}(x)))$."""

    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Encoder(nn.Module):
    r"""$x \mapsto (\mu(x), \log s^2(x))$: an image ``[B, C, H, W]`` to the mean and log-variance
    ``[B, 2c, H/f, W/f]`` (concatenated along the channels)."""

    def __init__(self, c: AutoencoderConfig) -> None:
        super().__init__()
        G = c.norm_groups
        layers: list[nn.Module] = [nn.Conv2d(c.in_channels, c.channels, 3, padding=1)]
        width = c.channels
        for i, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers.append(AEResBlock(width, c.channels * mult, G))
                width = c.channels * mult
            if i < len(c.channel_mult) - 1:
                layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        layers += [AEResBlock(width, width, G), nn.GroupNorm(G, width), nn.SiLU(),
                   nn.Conv2d(width, 2 * c.latent_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Decoder(nn.Module):
    r"""$z \mapsto \hat x = \mathrm{dec}(z)$: latents ``[B, c, h, w]`` to an image ``[B, C, f h, f w]``."""

    def __init__(self, c: AutoencoderConfig) -> None:
        super().__init__()
        G = c.norm_groups
        width = c.channels * c.channel_mult[-1]
        layers: list[nn.Module] = [nn.Conv2d(c.latent_channels, width, 3, padding=1), AEResBlock(width, width, G)]
        for i in reversed(range(len(c.channel_mult))):
            for _ in range(c.num_res_blocks):
                layers.append(AEResBlock(width, c.channels * c.channel_mult[i], G))
                width = c.channels * c.channel_mult[i]
            if i > 0:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(width, width, 3, padding=1)]
        layers += [nn.GroupNorm(G, width), nn.SiLU(), nn.Conv2d(width, c.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class Autoencoder(nn.Module):
    r"""The autoencoder of the module docstring; sizes in {class}`AutoencoderConfig`.

    - {meth}`encode` ``x -> DiagonalGaussian`` over ``[B, c, H/f, W/f]``; {meth}`decode` ``z -> x̂``;
    - ``forward(x, generator=None, sample=True)`` $\to$ ``(x̂, posterior)``;
    - {meth}`loss` the L1 + $\beta$ KL objective and its parts;
    - ``scale_factor`` (a buffer, 1 until {meth}`fit_scale_factor`), {meth}`encode_latents` and
      {meth}`decode_latents` for diffusion in the scaled latent space.
    """

    def __init__(self, config: AutoencoderConfig | None = None, **kwargs) -> None:
        super().__init__()
        if config is None:
            config = AutoencoderConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a config or keyword arguments, not both")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.register_buffer("scale_factor", torch.tensor(1.0))

    @property
    def factor(self) -> int:
        return self.config.factor

    def latent_shape(self, height: int, width: int | None = None) -> tuple[int, int, int]:
        """``(c, H/f, W/f)`` for images of ``height`` x ``width`` (error if $f$ does not divide them)."""
        width = height if width is None else width
        f = self.factor
        if height % f or width % f or height < f or width < f:
            raise ValueError(f"image size {height}x{width} is not divisible by the autoencoder's downsampling "
                             f"factor {f} (2^(levels-1), channel_mult={self.config.channel_mult})")
        return self.config.latent_channels, height // f, width // f

    def _check_images(self, x: Tensor) -> Tensor:
        c = self.config
        if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point() or x.shape[1] != c.in_channels:
            desc = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a float image batch [B, {c.in_channels}, H, W]; got {desc}")
        self.latent_shape(x.shape[2], x.shape[3])
        return x

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """The posterior $q(z\\mid x)$ over latents ``[B, c, H/f, W/f]``."""
        mean, logvar = self.encoder(self._check_images(x)).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: Tensor) -> Tensor:
        """Latents ``[B, c, h, w]`` (unscaled) to images ``[B, C, f h, f w]`` (not clamped)."""
        c = self.config
        if not isinstance(z, Tensor) or z.ndim != 4 or not z.is_floating_point() or z.shape[1] != c.latent_channels:
            desc = f"{z.dtype} {tuple(z.shape)}" if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"z must be a float latent batch [B, {c.latent_channels}, h, w]; got {desc}")
        return self.decoder(z)

    def forward(self, x: Tensor, generator: torch.Generator | None = None,
                sample: bool = True) -> tuple[Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    def loss(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
        r"""The mean over the batch of $\mathcal L(x)/D$ ($D$ pixel values per image), and its parts
        ``{"l1": mean absolute error per pixel, "kl": KL per image}``."""
        return _loss(self(x, generator), x, self.config.kl_weight)

    # --- the scaled latent space of diffusion -------------------------------------------------

    @torch.no_grad()
    def fit_scale_factor(self, images: Tensor, *, batch_size: int = 256, sample: bool = False,
                         generator: torch.Generator | None = None) -> float:
        r"""Set ``scale_factor`` to $1/\mathrm{std}(z)$ over all entries of the latents of ``images``
        (the posterior means, or draws with ``sample=True``) and return it."""
        self._check_images(images)
        was = self.training
        self.eval()
        try:
            device = self.scale_factor.device
            zs = []
            for i in range(0, images.shape[0], batch_size):
                post = self.encode(images[i : i + batch_size].to(device))
                zs.append((post.sample(generator) if sample else post.mode()).double())
        finally:
            self.train(was)
        z = torch.cat(zs)
        if z.numel() < 2:
            raise ValueError("fit_scale_factor needs at least two latent entries")
        std = float(z.std())
        if not (std > 0 and math.isfinite(std)):
            raise ValueError(f"the latents have standard deviation {std}; cannot rescale them to unit variance")
        self.scale_factor.fill_(1.0 / std)
        return 1.0 / std

    def encode_latents(self, x: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """The latents diffusion runs on: ``scale_factor`` times the posterior mean (or a draw)."""
        post = self.encode(x)
        z = post.sample(generator) if sample else post.mode()
        return z * self.scale_factor.to(z.dtype)

    def decode_latents(self, z: Tensor, *, clamp: bool = True) -> Tensor:
        """Scaled latents back to images: ``decode(z / scale_factor)``, clamped to $[-1, 1]$."""
        x = self.decode(z / self.scale_factor.to(z.dtype))
        return x.clamp(-1.0, 1.0) if clamp else x

    @torch.no_grad()
    def reconstruct(self, x: Tensor, *, batch_size: int = 256) -> Tensor:
        """``decode(mean of q(z|x))`` clamped to $[-1, 1]$, in batches, in evaluation mode."""
        was = self.training
        self.eval()
        try:
            device = self.scale_factor.device
            out = [self.decode(self.encode(x[i : i + batch_size].to(device)).mode()).clamp(-1.0, 1.0).cpu()
                   for i in range(0, x.shape[0], batch_size)]
        finally:
            self.train(was)
        return torch.cat(out)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def autoencoder_loss(model: Autoencoder, x0: Tensor, y: Tensor | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
    r"""$\frac1{BD}\sum_b\big(\lVert x_b - \hat x_b\rVert_1 + \beta\,\mathrm{KL}_b\big)$ ({meth}`Autoencoder.loss`) in
    the shape of {func}`stepdiff.train.train`'s ``loss_fn(model, x0, y, generator)``."""
    if y is not None:
        raise ValueError("the autoencoder is unconditional: train it without labels")
    # Called through forward, so that a DistributedDataParallel wrapper (which hides the model's
    # other methods in .module) synchronises the gradients.
    config = getattr(model, "module", model).config
    return _loss(model(x0, generator), x0, config.kl_weight)[0]


def _loss(out: tuple[Tensor, DiagonalGaussian], x: Tensor, kl_weight: float) -> tuple[Tensor, dict]:
    recon, posterior = out
    D = x[0].numel()
    l1 = (recon.float() - x.float()).abs().flatten(1).sum(1)
    kl = posterior.kl().float()
    total = (l1 + kl_weight * kl).mean() / D
    return total, {"l1": float(l1.detach().mean()) / D, "kl": float(kl.detach().mean())}


def psnr(x: Tensor, reference: Tensor, data_range: float = 2.0) -> Tensor:
    r"""Peak signal-to-noise ratio per image, in dB: $10\log_{10}\big(R^2/\mathrm{MSE}\big)$ with $R$ =
    ``data_range`` (2 for images in $[-1, 1]$). ``[B, ...]`` pairs to ``[B]``."""
    if not isinstance(x, Tensor) or not isinstance(reference, Tensor) or x.shape != reference.shape or x.ndim < 2:
        raise ValueError(f"x and reference must be batches [B, ...] of the same shape; got "
                         f"{getattr(x, 'shape', type(x).__name__)} and {getattr(reference, 'shape', None)}")
    mse = (x.double() - reference.double()).square().flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)
