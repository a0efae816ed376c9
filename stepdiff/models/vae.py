r"""A variational autoencoder (Kingma & Welling 2014) for small images, and its ELBO term by term.

A latent $z \in \R^k$ with prior $p(z) = \mathcal N(0, I)$ generates an image $x$ through a decoder
$p_\theta(x\mid z)$; an encoder $q_\phi(z\mid x) = \mathcal N\big(\mu_\phi(x), \mathrm{diag}\,s_\phi^2(x)\big)$
stands in for the intractable posterior. For every $q$,

$$\log p_\theta(x) \;\ge\; \mathcal L(x) =
\underbrace{\mathbb E_{q_\phi(z\mid x)}\big[\log p_\theta(x\mid z)\big]}_{\text{reconstruction}}
- \underbrace{\mathrm{KL}\big(q_\phi(z\mid x)\,\big\|\,p(z)\big)}_{\text{KL to the prior}},$$

with equality exactly when $q_\phi(z\mid x)$ is the true posterior $p_\theta(z\mid x)$: the gap is
$\mathrm{KL}(q_\phi(z\mid x)\,\|\,p_\theta(z\mid x))$.

- **KL to the prior**, in closed form for a diagonal Gaussian:
  $\tfrac12\sum_j\big(\mu_j^2 + s_j^2 - 1 - \log s_j^2\big)$.
- **Reconstruction**, a Monte Carlo estimate through the **reparameterisation**
  $z = \mu_\phi(x) + s_\phi(x)\odot\varepsilon$, $\varepsilon\sim\mathcal N(0, I)$, which makes the
  estimate differentiable in $\phi$.
- **The decoder likelihood** is a Gaussian of mean $m_\theta(z)$ (no output activation) and
  standard deviation $\sigma$, either fixed (``decoder_std``) or learned, one $\sigma_d$ per pixel
  shared by all images. ``likelihood`` chooses how it scores the data:

  - ``"discretised"`` (the default): the data take ``levels`` values $-1 + 2i/(n-1)$ in $[-1, 1]$
    (17 for 8x8 digits, 256 for 8-bit images) and each gets the Gaussian mass of its bin of
    width $\Delta = 2/(n-1)$, the outermost bins extended to $\pm\infty$ (as DDPM's decoder, Ho et
    al. 2020):
    $P(x_d\mid z) = \Phi\big(\tfrac{x_d + \Delta/2 - m_d}{\sigma_d}\big)
    - \Phi\big(\tfrac{x_d - \Delta/2 - m_d}{\sigma_d}\big)$.
    These are probabilities of the discrete data, so $-\mathcal L/(D\ln 2)$ is an upper bound
    on the data's code length in **bits per dimension** ({meth}`VAE.bits_per_dim`).
  - ``"gaussian"``: the continuous density $\mathcal N(x; m_\theta(z), \sigma^2 I)$ (the
    linear-Gaussian model of the tests, where everything has a closed form). A density is not a
    probability of discrete data: its "bits per dimension" only bound the discrete data's after
    uniform dequantisation ({func}`bits_per_dim` with ``bin_width``).

Encoder and decoder are MLPs on the flattened image with widths ``hidden`` (SiLU between
layers); ``hidden=()`` makes both linear. {meth}`VAE.log_weights` gives the importance weights
$\log p_\theta(x\mid z) + \log p(z) - \log q_\phi(z\mid x)$ whose mean is the ELBO and whose
log-mean-exp is the importance-weighted bound of Burda et al. 2016 ({meth}`VAE.iwae_bound`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "VAEConfig",
    "VAE",
    "ELBO",
    "gaussian_kl",
    "gaussian_log_prob",
    "discretised_gaussian_log_prob",
    "bits_per_dim",
    "vae_loss",
]

LIKELIHOODS = ("discretised", "gaussian")
_LOG_2PI = math.log(2 * math.pi)


@dataclass
class VAEConfig:
    """Sizes of a {class}`VAE` (the defaults suit scikit-learn's 8x8 digits, 17 levels)."""

    in_channels: int = 1
    image_size: int = 8
    latent_dim: int = 16  # k
    hidden: tuple[int, ...] = (256, 256)  # MLP widths of the encoder (the decoder mirrors them); () = linear
    likelihood: str = "discretised"  # "discretised" (over `levels` values) or "gaussian" (a density)
    levels: int = 17  # values of the data in [-1, 1] (discretised likelihood)
    decoder_std: float | None = None  # fixed sigma of the decoder, or None: learned, one per pixel

    def __post_init__(self) -> None:
        self.hidden = tuple(self.hidden)
        for name in ("in_channels", "image_size", "latent_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        for w in self.hidden:
            if isinstance(w, bool) or not isinstance(w, int) or w < 1:
                raise ValueError(f"hidden widths must be positive integers; got {self.hidden}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}; got {self.likelihood!r}")
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 2:
            raise ValueError(f"levels must be an integer >= 2; got {self.levels!r}")
        if self.decoder_std is not None and not (isinstance(self.decoder_std, (int, float)) and self.decoder_std > 0):
            raise ValueError(f"decoder_std must be a positive number or None (learned); got {self.decoder_std!r}")

    @property
    def dims(self) -> int:
        """$D$, the number of pixel values of one image."""
        return self.in_channels * self.image_size**2


class ELBO(NamedTuple):
    r"""The two terms of the ELBO per image, in nats: ``reconstruction`` $\mathbb E_q[\log p(x\mid z)]$
    (a Monte Carlo estimate) and ``kl`` $\mathrm{KL}(q(z\mid x)\,\|\,p(z))$ (exact); ``elbo`` is
    their difference."""

    reconstruction: Tensor
    kl: Tensor

    @property
    def elbo(self) -> Tensor:
        return self.reconstruction - self.kl


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    r"""$\mathrm{KL}\big(\mathcal N(\mu, \mathrm{diag}\,e^{\ell})\,\|\,\mathcal N(0, I)\big)
    = \tfrac12\sum_j(\mu_j^2 + e^{\ell_j} - 1 - \ell_j)$, summed over every axis but the first."""
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1)


def gaussian_log_prob(x: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    r"""$\log\mathcal N(x; m, \sigma^2)$ elementwise, $\sigma = e^{\log\sigma}$."""
    return -0.5 * ((x - mean) * torch.exp(-log_std)).square() - log_std - 0.5 * _LOG_2PI


def discretised_gaussian_log_prob(x: Tensor, mean: Tensor, log_std: Tensor, levels: int) -> Tensor:
    r"""$\log P(x)$ elementwise for $x$ on the grid $-1 + 2i/(n-1)$, $n$ = ``levels``: the mass of
    $\mathcal N(m, \sigma^2)$ on the bin $[x - \Delta/2, x + \Delta/2]$, $\Delta = 2/(n-1)$, the
    end bins extended to $\pm\infty$, so the $n$ probabilities of a pixel sum to 1.

    Computed as a difference of log-CDFs, $\log(\Phi(b) - \Phi(a)) = \log\Phi(b) + \log(1 - e^{\log\Phi(a) -
    \log\Phi(b)})$, and for a bin in the right tail ($a > 0$) through $\Phi(b) - \Phi(a) = \Phi(-a) - \Phi(-b)$,
    so that a bin far from the mean keeps its (tiny) mass instead of rounding to $\log 0$.
    """
    half = 1.0 / (levels - 1)
    inv = torch.exp(-log_std)
    # The outermost bins run to infinity; a large finite bound keeps every branch finite (no
    # inf * 0 in the backward pass of the branch torch.where does not select).
    big = torch.tensor(1e4, dtype=x.dtype, device=x.device)
    lo = torch.where(x < -1.0 + half, -big, (x - half - mean) * inv)
    hi = torch.where(x > 1.0 - half, big, (x + half - mean) * inv)
    right = lo > 0
    p = torch.special.log_ndtr(torch.where(right, -lo, hi))
    q = torch.special.log_ndtr(torch.where(right, -hi, lo))
    tiny = torch.finfo(x.dtype).tiny
    return p + torch.log((-torch.expm1(q - p)).clamp(min=tiny))


def bits_per_dim(log_likelihood: Tensor, dims: int, bin_width: float | None = None) -> Tensor:
    r"""Nats per image to bits per dimension: $-\log p / (D \ln 2)$.

    ``log_likelihood``: a log-probability of discrete data (or a bound on one), per image. For the
    log-*density* of continuous data in $[-1, 1]$ give ``bin_width`` $\Delta$ (e.g. $2/255$ for
    8-bit data): $-(\log p + D\log\Delta)/(D\ln 2)$, the usual conversion, a bound on the
    discrete data's bits when the density was evaluated at uniformly dequantised points.
    """
    if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
        raise ValueError(f"dims must be a positive integer; got {dims!r}")
    nats = -log_likelihood
    if bin_width is not None:
        if not bin_width > 0:
            raise ValueError(f"bin_width must be positive; got {bin_width!r}")
        nats = nats - dims * math.log(bin_width)
    return nats / (dims * math.log(2.0))


def _mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    r"""The VAE of the module docstring; sizes in {class}`VAEConfig`.

    - {meth}`encode` ``x -> (mean, logvar)`` of $q(z\mid x)$, each ``[B, k]``;
    - {meth}`reparameterise` $z = \mu + e^{\ell/2}\varepsilon$;
    - {meth}`decode` ``z -> `` the decoder mean $m_\theta(z)$ as images ``[..., C, H, W]``;
    - {meth}`log_likelihood` $\log p_\theta(x\mid z)$ per image;
    - {meth}`elbo` the two terms, {meth}`bits_per_dim`, {meth}`log_weights`, {meth}`iwae_bound`;
    - {meth}`sample` images from the prior (the decoder mean).
    """

    def __init__(self, config: VAEConfig | None = None, **kwargs) -> None:
        super().__init__()
        if config is None:
            config = VAEConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a config or keyword arguments, not both")
        self.config = c = config
        D, k = c.dims, c.latent_dim
        self.encoder = _mlp([D, *c.hidden, 2 * k])
        self.decoder = _mlp([k, *reversed(c.hidden), D])
        if c.decoder_std is None:
            self.log_std = nn.Parameter(torch.zeros(D))  # sigma_d = 1 to start
        else:
            self.register_buffer("log_std", torch.full((D,), math.log(c.decoder_std)))

    # --- the pieces ---------------------------------------------------------------------------

    def _check(self, x: Tensor) -> Tensor:
        c = self.config
        want = (c.in_channels, c.image_size, c.image_size)
        if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point() or tuple(x.shape[1:]) != want:
            desc = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a float image batch [B, {', '.join(map(str, want))}]; got {desc}")
        if c.likelihood == "discretised":
            # The discretised likelihood scores the grid's values only; off the grid its number is no bound.
            u = (x.detach() + 1.0) * (c.levels - 1) / 2.0
            off = (u - u.round()).abs().max() if x.numel() else torch.zeros(())
            if float(off) > 1e-3 or float(x.detach().min()) < -1 - 1e-6 or float(x.detach().max()) > 1 + 1e-6:
                raise ValueError(
                    f"x must take the {c.levels} values -1 + 2i/{c.levels - 1} in [-1, 1] (levels={c.levels}) for the "
                    f"discretised likelihood; its values are up to {float(off):.3g} bins off the grid, in "
                    f"[{float(x.min()):.4g}, {float(x.max()):.4g}]"
                )
        return x

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The mean and log-variance ``[B, k]`` of $q(z\\mid x)$."""
        h = self.encoder(self._check(x).flatten(1))
        mean, logvar = h.chunk(2, dim=-1)
        return mean, logvar

    @staticmethod
    def reparameterise(mean: Tensor, logvar: Tensor, samples: int | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
        r"""$z = \mu + e^{\ell/2}\odot\varepsilon$: ``[B, k]``, or ``[S, B, k]`` for ``samples`` $= S$."""
        shape = mean.shape if samples is None else (samples, *mean.shape)
        eps = torch.randn(shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * eps

    def decode(self, z: Tensor) -> Tensor:
        """The decoder mean $m_\\theta(z)$: ``[..., k]`` to images ``[..., C, H, W]``."""
        c = self.config
        return self.decoder(z).unflatten(-1, (c.in_channels, c.image_size, c.image_size))

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        r"""$\log p_\theta(x\mid z)$ per image: ``x [B, C, H, W]``, ``z [..., B, k]`` to ``[..., B]``."""
        c = self.config
        mean = self.decoder(z)
        flat = self._check(x).flatten(1)
        log_std = self.log_std.to(mean.dtype)
        if c.likelihood == "discretised":
            lp = discretised_gaussian_log_prob(flat, mean, log_std, c.levels)
        else:
            lp = gaussian_log_prob(flat, mean, log_std)
        return lp.sum(-1)

    # --- the bound ----------------------------------------------------------------------------

    def elbo(self, x: Tensor, *, samples: int = 1, generator: torch.Generator | None = None) -> ELBO:
        r"""The two terms per image ``[B]``: the reconstruction averaged over ``samples``
        reparameterised draws of $z$, and the exact KL to the prior."""
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive integer; got {samples!r}")
        mean, logvar = self.encode(x)
        z = self.reparameterise(mean, logvar, samples, generator)
        return ELBO(self.log_likelihood(x, z).mean(0), gaussian_kl(mean, logvar))

    def forward(self, x: Tensor, *, samples: int = 1, generator: torch.Generator | None = None) -> ELBO:
        r"""The same as {meth}`elbo`: the terms of $\mathcal L(x)$ per image."""
        return self.elbo(x, samples=samples, generator=generator)

    def bits_per_dim(self, x: Tensor, *, samples: int = 1, generator: torch.Generator | None = None) -> Tensor:
        r"""$-\mathcal L(x)/(D\ln 2)$ per image: an upper bound on the bits per dimension of the
        discrete data (discretised likelihood only; see {func}`bits_per_dim` for a density)."""
        if self.config.likelihood != "discretised":
            raise ValueError("bits per dimension of the data need likelihood='discretised' (a Gaussian density "
                             "is no probability of discrete data); use bits_per_dim(elbo, dims, bin_width) instead")
        return bits_per_dim(self.elbo(x, samples=samples, generator=generator).elbo, self.config.dims)

    def log_weights(self, x: Tensor, samples: int, generator: torch.Generator | None = None) -> Tensor:
        r"""$\log w_s = \log p_\theta(x\mid z_s) + \log p(z_s) - \log q_\phi(z_s\mid x)$ for $S$ =
        ``samples`` draws $z_s\sim q_\phi(z\mid x)$: ``[S, B]``. Their mean estimates the ELBO;
        with the exact posterior as encoder every $\log w_s$ equals $\log p_\theta(x)$."""
        mean, logvar = self.encode(x)
        z = self.reparameterise(mean, logvar, samples, generator)
        log_prior = gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z)).sum(-1)
        log_q = gaussian_log_prob(z, mean, 0.5 * logvar).sum(-1)
        return self.log_likelihood(x, z) + log_prior - log_q

    def iwae_bound(self, x: Tensor, samples: int, generator: torch.Generator | None = None) -> Tensor:
        r"""$\log\frac1S\sum_s w_s$ per image (Burda et al. 2016): a bound on $\log p_\theta(x)$ that
        tightens as $S$ grows (the ELBO at $S = 1$, in expectation)."""
        lw = self.log_weights(x, samples, generator)
        return torch.logsumexp(lw, 0) - math.log(samples)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        r"""``n`` images from the model: $z\sim\mathcal N(0, I)$, then the decoder mean $m_\theta(z)$
        clamped to $[-1, 1]$ (the usual VAE "sample"; drawing the pixel noise too would add
        independent speckle of size $\sigma_d$)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer; got {n!r}")
        p = next(self.decoder.parameters())
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=p.device, dtype=p.dtype)
        return self.decode(z).clamp(-1.0, 1.0)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """The decoder mean at the encoder mean, clamped to $[-1, 1]$."""
        return self.decode(self.encode(x)[0]).clamp(-1.0, 1.0)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def vae_loss(model: VAE, x0: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    r"""$-\mathcal L$ in nats per dimension, averaged over the batch (one reparameterised draw per
    image), in the shape of {func}`stepdiff.train.train`'s ``loss_fn(model, x0, y, generator)``. The
    model is called through its ``forward``, so a ``DistributedDataParallel`` wrapper works."""
    if y is not None:
        raise ValueError("the VAE is unconditional: train it without labels")
    terms = model(x0, generator=generator)
    return -terms.elbo.mean() / x0[0].numel()

