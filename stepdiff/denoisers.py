r"""Exact denoisers: $\mathbb E[x_0 \mid x_t]$ in closed form, the ground truth for every test.

For a Gaussian mixture target $p_0 = \sum_k \pi_k\,\mathcal N(m_k, C_k)$ in $\mathbb R^d$ and a path
$x_t = \alpha x_0 + \sigma\varepsilon$, everything is Gaussian given the component:

$$x_t \mid k \sim \mathcal N(\alpha m_k,\ \alpha^2 C_k + \sigma^2 I), \qquad
\mathbb E[x_0 \mid x_t, k] = m_k + \alpha C_k(\alpha^2 C_k + \sigma^2 I)^{-1}(x_t - \alpha m_k),$$

and the component posterior is $w_k(x_t) \propto \pi_k\,\mathcal N(x_t;\alpha m_k, \alpha^2C_k+\sigma^2I)$, so

$$\mathbb E[x_0\mid x_t] = \sum_k w_k(x_t)\,\mathbb E[x_0\mid x_t, k].$$

This covers a single point ($K=1$, $C=0$), a finite set of points (the empirical
distribution of a training set: $w$ is a softmax of $-\|x_t-\alpha a_k\|^2/2\sigma^2$), an
isotropic or full Gaussian ($K=1$), and mixtures. Covariances are diagonalised once,
$C_k = U_k\Lambda_kU_k^\top$, so each evaluation is a few matrix products in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .schedules import Schedule, _as_time, check_time

__all__ = [
    "GaussianMixture",
    "ExactDenoiser",
    "exact_denoiser",
    "point_masses",
    "gaussian",
    "isotropic_gaussian",
]

f64 = torch.float64


def _as_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    if isinstance(generator, int):
        return torch.Generator().manual_seed(generator)
    return generator


class GaussianMixture:
    r"""A mixture $\sum_k\pi_k\mathcal N(m_k, C_k)$ in $\mathbb R^d$; components may be points.

    ``means``: ``[K, d]``. ``covs``: ``None`` or ``0`` (point masses), a scalar variance
    shared by all, per-component variances ``[K]``, diagonals ``[K, d]``, or full matrices
    ``[K, d, d]``. ``weights``: ``[K]`` (normalised here), uniform by default.
    """

    def __init__(self, means: Tensor, covs: Tensor | float | None = None, weights: Tensor | None = None):
        means = torch.as_tensor(means, dtype=f64)
        if means.ndim == 1:
            means = means[:, None]
        if means.ndim != 2:
            raise ValueError(f"means must have shape [K, d]; got {tuple(means.shape)}")
        K, d = means.shape
        self.means = means
        if weights is None:
            weights = torch.full((K,), 1.0 / K, dtype=f64)
        weights = torch.as_tensor(weights, dtype=f64)
        if weights.shape != (K,) or bool((weights < 0).any()) or not float(weights.sum()) > 0:
            raise ValueError(f"weights must be {K} non-negative numbers with a positive sum")
        self.weights = weights / weights.sum()
        covs = torch.zeros((), dtype=f64) if covs is None else torch.as_tensor(covs, dtype=f64)
        # Store every covariance as eigenvalues [K, d] and, when not diagonal, eigenvectors.
        self.eigvecs: Tensor | None = None
        if covs.ndim == 0:
            self.eigvals = covs.expand(K, d).clone()
        elif covs.shape == (K,):
            self.eigvals = covs[:, None].expand(K, d).clone()
        elif covs.shape == (K, d):
            self.eigvals = covs.clone()
        elif covs.shape == (K, d, d):
            if not torch.allclose(covs, covs.transpose(-1, -2)):
                raise ValueError("covariance matrices must be symmetric")
            self.eigvals, self.eigvecs = torch.linalg.eigh(covs)
        else:
            raise ValueError(
                f"covs must be a scalar, [K]={K}, [K, d]=({K}, {d}) or [K, d, d]; got {tuple(covs.shape)}"
            )
        if bool((self.eigvals < -1e-12).any()):
            raise ValueError("covariances must be positive semi-definite")
        self.eigvals = self.eigvals.clamp(min=0.0)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def covariances(self) -> Tensor:
        """The component covariances as full matrices ``[K, d, d]``."""
        if self.eigvecs is None:
            return torch.diag_embed(self.eigvals)
        return self.eigvecs @ torch.diag_embed(self.eigvals) @ self.eigvecs.transpose(-1, -2)

    def mean(self) -> Tensor:
        r"""$\mathbb E[x_0] = \sum_k \pi_k m_k$."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        r"""$\mathrm{Cov}[x_0] = \sum_k\pi_k(C_k + m_km_k^\top) - \mu\mu^\top$."""
        mu = self.mean()
        second = torch.einsum("k,kij->ij", self.weights, self.covariances())
        second = second + torch.einsum("k,ki,kj->ij", self.weights, self.means, self.means)
        return second - torch.outer(mu, mu)

    def sample(
        self, n: int, generator: torch.Generator | int | None = None, return_labels: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``n`` draws from $p_0$ (float64, ``[n, d]``); optionally their component labels."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative integer; got {n!r}")
        g = _as_generator(generator)
        if n == 0:
            empty = torch.empty(0, self.dim, dtype=f64)
            return (empty, torch.empty(0, dtype=torch.long)) if return_labels else empty
        labels = torch.multinomial(self.weights, n, replacement=True, generator=g)
        z = torch.randn(n, self.dim, generator=g, dtype=f64) * self.eigvals[labels].sqrt()
        if self.eigvecs is not None:
            z = torch.einsum("nij,nj->ni", self.eigvecs[labels], z)
        x = self.means[labels] + z
        return (x, labels) if return_labels else x

    def _component_terms(self, x: Tensor, t: Tensor | float, schedule: Schedule):
        """At time(s) t: alpha [n,1,1], z = U^T(x - alpha m) [n,K,d], var = alpha^2 lambda + sigma^2
        [n,K,d], and log N(x; alpha m_k, alpha^2 C_k + sigma^2 I) + log pi_k [n,K]."""
        t = check_time(t).to(f64)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x.shape[0]):
            raise ValueError(f"t must be a scalar or have shape [{x.shape[0]}]; got {tuple(t.shape)}")
        alpha = schedule.alpha(t).reshape(-1, 1, 1)
        sigma = schedule.sigma(t).reshape(-1, 1, 1)
        y = x[:, None, :] - alpha * self.means[None]
        z = y if self.eigvecs is None else torch.einsum("kji,nkj->nki", self.eigvecs, y)
        var = alpha**2 * self.eigvals[None] + sigma**2
        log_joint = -0.5 * (z**2 / var + torch.log(2 * math.pi * var)).sum(-1) + torch.log(self.weights)[None]
        return alpha, z, var, log_joint

    def _check_x(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [n, {self.dim}]; got {tuple(x.shape)}")
        return x.to(f64)

    def log_prob(self, x: Tensor, t: Tensor | float = 0.0, schedule: Schedule | None = None) -> Tensor:
        r"""$\log p_t(x)$, the density of $x_t$ (of $x_0$ when ``t = 0``); shape ``[n]``.

        At $t = 0$ point masses have no density (the result is $-\infty$ or $+\infty$).
        """
        x = self._check_x(x)
        if schedule is None:
            from .schedules import VESchedule

            schedule, t = VESchedule(1.0), 0.0
        return torch.logsumexp(self._component_terms(x, t, schedule)[3], dim=-1)

    def posterior_weights(self, x: Tensor, t: Tensor | float, schedule: Schedule) -> Tensor:
        r"""$w_k(x_t) = p(k \mid x_t)$, shape ``[n, K]``."""
        x = self._check_x(x)
        return torch.softmax(self._component_terms(x, t, schedule)[3], dim=-1)

    def denoise(self, x: Tensor, t: Tensor | float, schedule: Schedule) -> Tensor:
        r"""$\mathbb E[x_0 \mid x_t = x]$ (float64, ``[n, d]``); see the module docstring."""
        x = self._check_x(x)
        alpha, z, var, log_joint = self._component_terms(x, t, schedule)
        w = torch.softmax(log_joint, dim=-1)
        # E[x0 | x_t, k] - m_k = alpha U diag(lambda / var) U^T (x_t - alpha m_k).
        shrunk = alpha * self.eigvals[None] / var * z
        if self.eigvecs is not None:
            shrunk = torch.einsum("kij,nkj->nki", self.eigvecs, shrunk)
        return torch.einsum("nk,nkd->nd", w, self.means[None] + shrunk)

    def score(self, x: Tensor, t: Tensor | float, schedule: Schedule) -> Tensor:
        r"""$\nabla_x\log p_t(x) = (\alpha\,\mathbb E[x_0\mid x_t] - x)/\sigma^2$ (Tweedie)."""
        x64 = self._check_x(x)
        t = _as_time(t).to(f64)
        alpha = schedule.alpha(t).reshape(-1, 1)
        sigma = schedule.sigma(t).reshape(-1, 1)
        return (alpha * self.denoise(x64, t, schedule) - x64) / sigma**2

    def marginal(self, t: float, schedule: Schedule) -> GaussianMixture:
        r"""The law of $x_t$ as a mixture: means $\alpha m_k$, covariances $\alpha^2C_k + \sigma^2 I$."""
        t = check_time(t)
        if t.ndim:
            raise ValueError("marginal takes a single time")
        a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
        covs = a**2 * self.covariances() + s**2 * torch.eye(self.dim, dtype=f64)
        return GaussianMixture(a * self.means, covs, self.weights)


class ExactDenoiser:
    r"""The callable $D(x, t) = \mathbb E[x_0\mid x_t = x]$ for a mixture target and a schedule.

    Takes ``x`` of shape ``[B, d]`` (any float dtype and device) and ``t`` scalar or ``[B]``;
    computes in float64 on the CPU and returns in the dtype and device of ``x``.
    """

    def __init__(self, target: GaussianMixture, schedule: Schedule):
        self.target = target
        self.schedule = schedule

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        t = _as_time(t).detach().cpu()
        return self.target.denoise(x.detach().cpu(), t, self.schedule).to(device=x.device, dtype=x.dtype)

    def __repr__(self) -> str:
        return f"ExactDenoiser(K={self.target.n_components}, d={self.target.dim}, schedule={self.schedule!r})"


def exact_denoiser(target: GaussianMixture, schedule: Schedule) -> ExactDenoiser:
    r"""$D(x, t) = \mathbb E[x_0\mid x_t = x]$ for ``target`` under ``schedule`` (see {class}`ExactDenoiser`).

    For a standard normal target and $\sigma(t) = 1$ the posterior mean shrinks $x$ by half,
    $D(x, t) = x / (1 + \sigma^2)$:

    ```python
    >>> import torch
    >>> from stepdiff.schedules import VESchedule
    >>> D = exact_denoiser(isotropic_gaussian(torch.zeros(2), std=1.0), VESchedule(sigma_q=2.0))
    >>> D(torch.tensor([[2.0, -2.0]]), torch.tensor(0.25))
    tensor([[ 1., -1.]])

    ```
    """
    return ExactDenoiser(target, schedule)


def point_masses(points: Tensor, weights: Tensor | None = None) -> GaussianMixture:
    r"""$\sum_k \pi_k\delta_{a_k}$: a finite set of points (e.g. a training set), ``[K, d]``."""
    return GaussianMixture(points, None, weights)


def gaussian(mean: Tensor, cov: Tensor) -> GaussianMixture:
    r"""$\mathcal N(m, C)$ with a full covariance ``[d, d]``."""
    mean = torch.as_tensor(mean, dtype=f64).reshape(1, -1)
    cov = torch.as_tensor(cov, dtype=f64)
    return GaussianMixture(mean, cov[None], None)


def isotropic_gaussian(mean: Tensor, std: float) -> GaussianMixture:
    r"""$\mathcal N(m, s^2 I)$."""
    mean = torch.as_tensor(mean, dtype=f64).reshape(1, -1)
    return GaussianMixture(mean, float(std) ** 2, None)
