r"""Data that needs no download: 2-D toy distributions, a 1-D mixture, and small image sets.

Every sampler here takes ``n`` and a ``generator`` (a ``torch.Generator`` on the CPU, an
``int`` seed, or ``None`` for PyTorch's global generator) and returns a float32 tensor of
shape ``[n, 2]`` on the CPU; an ``int`` seed gives the same points on every machine.
The toys are scaled to a radius of about 2, so each coordinate has a spread of order 1,
like the $\mathcal N(0, I)$ noise they are paired with.

- {func}`spiral`: the tutorial's 2-D spiral (its Figures 6, 7 and 10).
- {func}`swiss_roll`: the 2-D swiss roll of scikit-learn's ``make_swiss_roll``.
- {func}`two_moons`: two interleaved half circles.
- {func}`eight_gaussians`: eight Gaussians on a circle; {func}`eight_gaussians_mixture` is the
  same law as a {class}`~stepdiff.denoisers.GaussianMixture`, whose exact denoiser is known.
- {func}`checkerboard`: uniform on the dark squares of a checkerboard.
- {func}`annulus`: uniform on a ring, the tutorial's base distribution in Figures 7 and 9.
- {func}`mixture_1d`: a three-component 1-D mixture, the one target of chapters I.1 and I.2.

Images live in {mod}`stepdiff.image_data` (digits with a fixed split, MNIST, Fashion-MNIST,
CIFAR-10, image folders) and procedural scenes in {mod}`stepdiff.shapes`; ``ImageSet``,
``load_digits``, ``load_image_folder`` and ``IMAGE_EXTENSIONS`` are re-exported here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .denoisers import GaussianMixture

__all__ = [
    "spiral",
    "swiss_roll",
    "two_moons",
    "eight_gaussians",
    "eight_gaussians_mixture",
    "checkerboard",
    "annulus",
    "mixture_1d",
    "ImageSet",
    "load_digits",
    "load_image_folder",
    "IMAGE_EXTENSIONS",
]

f32 = torch.float32


def _generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    """An ``int`` seed as a fresh CPU generator; a generator or ``None`` unchanged."""
    if generator is None:
        return None
    if isinstance(generator, bool) or not isinstance(generator, (int, torch.Generator)):
        kind = type(generator).__name__
        raise TypeError(f"generator must be a torch.Generator, an int seed or None; got {kind}")
    if isinstance(generator, int):
        return torch.Generator().manual_seed(generator)
    if generator.device.type != "cpu":
        raise ValueError(f"the data are drawn on the CPU; got a generator on {generator.device}")
    return generator


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer; got {n!r}")


def _check_nonneg(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0; got {value}")


def _add_noise(x: Tensor, noise: float, g: torch.Generator | None) -> Tensor:
    """$x + \\text{noise}\\cdot z$ with $z \\sim \\mathcal N(0, I)$ (no draw when ``noise = 0``)."""
    if noise == 0:
        return x
    return x + noise * torch.randn(x.shape, generator=g, dtype=x.dtype)


# --- 2-D toys ---------------------------------------------------------------------------------


def spiral(
    n: int,
    *,
    turns: float = 2.0,
    radius: float = 2.0,
    noise: float = 0.05,
    generator: torch.Generator | int | None = None,
) -> Tensor:
    r"""The tutorial's 2-D spiral: an Archimedean spiral from the origin, plus Gaussian noise.

    $$\theta = \theta_{\max}\sqrt u,\quad u\sim U[0,1],\qquad
    x = R\,\frac{\theta}{\theta_{\max}}\begin{pmatrix}\cos\theta\\ \sin\theta\end{pmatrix}
    + \text{noise}\cdot z,\quad z\sim\mathcal N(0, I_2),$$

    with $\theta_{\max} = 2\pi\cdot$ ``turns`` and $R$ = ``radius``. The square root spreads the
    points evenly along the curve (the arc length from the centre grows like $\theta^2$), so
    the outer turns are not starved. The tutorial does not give its spiral's parameters;
    these are ours. Shape ``[n, 2]``, float32.
    """
    _check_n(n)
    if not turns > 0 or not radius > 0:
        raise ValueError(f"turns and radius must be positive; got turns={turns}, radius={radius}")
    _check_nonneg("noise", noise)
    g = _generator(generator)
    theta_max = 2 * math.pi * turns
    s = torch.rand(n, generator=g, dtype=f32).sqrt()
    theta = theta_max * s
    x = radius * s[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    return _add_noise(x, noise, g)


def swiss_roll(
    n: int,
    *,
    radius: float = 2.0,
    noise: float = 0.05,
    generator: torch.Generator | int | None = None,
) -> Tensor:
    r"""The 2-D swiss roll (the $(x, z)$ plane of scikit-learn's ``make_swiss_roll``), rescaled.

    $$\theta = \tfrac{3\pi}{2}(1 + 2u),\quad u\sim U[0,1],\qquad
    x = \frac{R}{9\pi/2}\,\theta\begin{pmatrix}\cos\theta\\ \sin\theta\end{pmatrix}
    + \text{noise}\cdot z,$$

    so the angle is uniform on $[\tfrac{3\pi}2, \tfrac{9\pi}2]$ (one and a half turns, starting
    a third of the way out) and the outer end lies at radius $R$ = ``radius``. Unlike
    {func}`spiral`, the density is uniform in angle, hence thinner on the outer turns.
    Shape ``[n, 2]``, float32.
    """
    _check_n(n)
    if not radius > 0:
        raise ValueError(f"radius must be positive; got {radius}")
    _check_nonneg("noise", noise)
    g = _generator(generator)
    theta = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=f32))
    direction = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    x = (radius / (4.5 * math.pi)) * theta[:, None] * direction
    return _add_noise(x, noise, g)


def two_moons(
    n: int,
    *,
    noise: float = 0.05,
    generator: torch.Generator | int | None = None,
    return_labels: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Two interleaved half circles of radius 1 (the geometry of scikit-learn's ``make_moons``).

    Each point picks a moon $c \in \{0, 1\}$ with probability $\tfrac12$ and an angle
    $\theta\sim U[0, \pi]$:

    $$x = \begin{cases}(\cos\theta,\ \sin\theta) - m & c = 0 \text{ (upper moon)}\\
    (1 - \cos\theta,\ \tfrac12 - \sin\theta) - m & c = 1 \text{ (lower moon)}\end{cases}
    \;+\ \text{noise}\cdot z,$$

    centred by $m = (\tfrac12, \tfrac14)$, the exact mean of the noiseless law. Unlike
    ``make_moons``, which spaces the angles evenly, the points are i.i.d. draws. Shape
    ``[n, 2]``, float32; with ``return_labels`` also the moon of each point, int64 ``[n]``.
    """
    _check_n(n)
    _check_nonneg("noise", noise)
    g = _generator(generator)
    labels = torch.randint(0, 2, (n,), generator=g)
    theta = math.pi * torch.rand(n, generator=g, dtype=f32)
    upper = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    lower = torch.stack([1 - torch.cos(theta), 0.5 - torch.sin(theta)], 1)
    x = torch.where(labels[:, None] == 0, upper, lower) - torch.tensor([0.5, 0.25])
    x = _add_noise(x, noise, g)
    return (x, labels) if return_labels else x


def eight_gaussians_mixture(radius: float = 2.0, std: float = 0.2) -> GaussianMixture:
    r"""Eight Gaussians on a circle, as an exact {class}`~stepdiff.denoisers.GaussianMixture`:

    $$p = \frac18\sum_{k=0}^{7}\mathcal N\big(m_k,\ s^2 I_2\big),\qquad
    m_k = R\,(\cos\tfrac{2\pi k}8, \sin\tfrac{2\pi k}8),$$

    $R$ = ``radius``, $s$ = ``std``. Its {meth}`~stepdiff.denoisers.GaussianMixture.denoise`
    is the exact $\mathbb E[x_0\mid x_t]$, the ground truth a trained model should approach.
    """
    if not radius > 0 or not std >= 0:
        raise ValueError(f"need radius > 0 and std >= 0; got radius={radius}, std={std}")
    angles = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    return GaussianMixture(means, std**2)


def eight_gaussians(
    n: int,
    *,
    radius: float = 2.0,
    std: float = 0.2,
    generator: torch.Generator | int | None = None,
    return_labels: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""``n`` draws from {func}`eight_gaussians_mixture` (equal weights $\tfrac18$).

    Mode $k$ sits at angle $2\pi k/8$ on the circle of radius ``radius``; neighbouring modes
    are $2R\sin(\pi/8) \approx 0.77R$ apart, so with the defaults ($R = 2$, $s = 0.2$) they are
    separated by about 7.7 standard deviations. Shape ``[n, 2]``, float32; with
    ``return_labels`` also each point's mode $k$, int64 ``[n]``.
    """
    _check_n(n)
    if n == 0:  # GaussianMixture.sample (torch.multinomial) refuses n = 0
        x, labels = torch.zeros(0, 2, dtype=f32), torch.zeros(0, dtype=torch.int64)
        return (x, labels) if return_labels else x
    mixture = eight_gaussians_mixture(radius, std)
    x, labels = mixture.sample(n, _generator(generator), return_labels=True)
    x = x.to(f32)
    return (x, labels) if return_labels else x


def checkerboard(
    n: int,
    *,
    squares: int = 4,
    size: float = 4.0,
    generator: torch.Generator | int | None = None,
) -> Tensor:
    r"""Uniform on the dark squares of a ``squares`` $\times$ ``squares`` board of side ``size``.

    The board $[-L/2, L/2]^2$ ($L$ = ``size``) is cut into $k\times k$ squares of side $L/k$;
    square $(i, j)$, counted from the lower left, is dark when $i + j$ is even. A point
    picks a dark square uniformly, then a uniform position inside it:

    $$x = -\tfrac L2 + \tfrac Lk\big((i, j) + (u_1, u_2)\big),\quad u_1,u_2\sim U[0,1].$$

    With the default $k = 4$ that is 8 of the 16 squares. Shape ``[n, 2]``, float32.
    """
    _check_n(n)
    if isinstance(squares, bool) or not isinstance(squares, int) or squares < 2:
        raise ValueError(f"squares must be an integer >= 2; got {squares!r}")
    if not size > 0:
        raise ValueError(f"size must be positive; got {size}")
    g = _generator(generator)
    ij = torch.cartesian_prod(torch.arange(squares), torch.arange(squares))
    dark = ij[ij.sum(1) % 2 == 0].to(f32)
    pick = torch.randint(0, dark.shape[0], (n,), generator=g)
    u = torch.rand(n, 2, generator=g, dtype=f32)
    return -size / 2 + (size / squares) * (dark[pick] + u)


def annulus(
    n: int,
    *,
    r_inner: float = 1.5,
    r_outer: float = 2.0,
    generator: torch.Generator | int | None = None,
) -> Tensor:
    r"""Uniform on the ring $r_{\rm in} \le \|x\| \le r_{\rm out}$ (the tutorial's base, Figs 7, 9).

    $$\theta\sim U[0, 2\pi),\qquad
    r = \sqrt{r_{\rm in}^2 + u\,(r_{\rm out}^2 - r_{\rm in}^2)},\quad u\sim U[0,1],$$

    $x = r(\cos\theta, \sin\theta)$: $r^2$ is uniform because the area within radius $r$ grows
    like $r^2$. The tutorial gives no radii; the defaults put the ring around the
    {func}`spiral`. ``r_inner = 0`` gives the uniform disc. Shape ``[n, 2]``, float32.
    """
    _check_n(n)
    if not 0 <= r_inner < r_outer:
        raise ValueError(f"need 0 <= r_inner < r_outer; got r_inner={r_inner}, r_outer={r_outer}")
    g = _generator(generator)
    theta = 2 * math.pi * torch.rand(n, generator=g, dtype=f32)
    u = torch.rand(n, generator=g, dtype=f32)
    r = torch.sqrt(r_inner**2 + u * (r_outer**2 - r_inner**2))
    return r[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], 1)


def mixture_1d(
    means: tuple[float, ...] = (-2.0, 0.0, 2.5),
    stds: tuple[float, ...] = (0.3, 0.4, 0.5),
    weights: tuple[float, ...] = (0.25, 0.45, 0.3),
) -> GaussianMixture:
    r"""A multimodal 1-D target $p_0 = \sum_k \pi_k\,\mathcal N(m_k, s_k^2)$.

    Defaults: $m = (-2, 0, 2.5)$, $s = (0.3, 0.4, 0.5)$, $\pi = (0.25, 0.45, 0.3)$, three
    separated, unequal modes. With these defaults it is the one 1-D target of the book's
    chapters I.1 (the tutorial's Figures 1 and 2, whose own target the tutorial does not
    state) and I.2 (Claim 1 and Lemma 1 on a grid). As a
    {class}`~stepdiff.denoisers.GaussianMixture` it gives the exact densities of the forward
    marginals, ``log_prob(x, t, schedule)``, and samples, ``sample(n, generator)`` (``[n, 1]``).
    """
    if not len(means) == len(stds) == len(weights) >= 1:
        raise ValueError(
            f"means, stds and weights must have the same positive length; got {len(means)}, {len(stds)}, {len(weights)}"
        )
    if any(not s >= 0 for s in stds):
        raise ValueError(f"stds must be >= 0; got {stds}")
    means_t = torch.tensor(means, dtype=torch.float64)[:, None]
    variances = torch.tensor(stds, dtype=torch.float64) ** 2
    return GaussianMixture(means_t, variances, torch.tensor(weights, dtype=torch.float64))


# --- images: they live in stepdiff.image_data; re-exported here for existing imports ------------

from .image_data import IMAGE_EXTENSIONS, ImageSet, load_digits, load_image_folder  # noqa: E402
