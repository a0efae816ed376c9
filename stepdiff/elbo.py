r"""The variational bound (ELBO) of a trained diffusion model on discrete images, term by term.

Read as a hierarchical VAE whose encoder is the fixed forward process $q(x_t\mid x_0)$, a
diffusion model bounds the log-probability of an image $x_0$ as a VAE does. In continuous time
(Kingma et al. 2021, "Variational diffusion models"), with $\lambda = \log(\alpha^2/\sigma^2)$ the
log-SNR, $\lambda_{\max} = \lambda(t_{\min})$ and $\lambda_{\min} = \lambda(t_{\max})$,

$$-\log P(x_0) \;\le\; \underbrace{\mathrm{KL}\big(q(x_{t_{\max}}\mid x_0)\,\|\,p(x_{t_{\max}})\big)}_{\text{prior}}
+ \underbrace{\tfrac12\int_{\lambda_{\min}}^{\lambda_{\max}}
\mathbb E_{\varepsilon}\big\|\varepsilon - \hat\varepsilon(x_\lambda, \lambda)\big\|^2\,d\lambda}_{\text{diffusion}}
\;\underbrace{-\,\mathbb E_{q}\big[\log p(x_0\mid x_{t_{\min}})\big]}_{\text{reconstruction}} .$$

The diffusion term is the limit of the per-step KL divergences of the discrete chain,
$\tfrac12(\mathrm{SNR}(s) - \mathrm{SNR}(t))\|x_0 - \hat x_0\|^2$, summed over a grid that
becomes fine: $\tfrac12\int -\tfrac{d\,\mathrm{SNR}}{dt}\|x_0 - \hat x_0\|^2\,dt$, and since
$\|x_0 - \hat x_0\|^2 = e^{-\lambda}\|\varepsilon - \hat\varepsilon\|^2$ and
$d\,\mathrm{SNR} = e^{\lambda}d\lambda$, it is the noise-prediction loss integrated uniformly in
$\lambda$. It is estimated here without bias by stratified draws of $\lambda$ (and one
$\varepsilon$ per draw) for each image.

- **prior**: $p(x_{t_{\max}}) = \mathcal N(0, \sigma(t_{\max})^2 I)$, the law the samplers start
  from (as in {func}`stepdiff.likelihood.ode_log_likelihood`), so the term is
  $\tfrac12\,\mathrm{SNR}(t_{\max})\,\|x_0\|^2$ in closed form.
- **reconstruction**: the data take ``levels`` values $-1 + 2i/(n-1)$ and the decoder
  $p(x_0\mid x_{t_{\min}})$ gives each pixel the mass of $\mathcal N(\hat x_0, (\sigma/\alpha)^2)$ on
  its bin ({func}`stepdiff.models.vae.discretised_gaussian_log_prob`, the same likelihood as the
  VAE's decoder), $\hat x_0$ the model's prediction at $t_{\min}$ and $\sigma/\alpha$ the noise
  level there. One draw of $x_{t_{\min}}$ per image.

Every term is a probability of the discrete data, so $-\mathcal L/(D\ln 2)$ bounds their code
length in bits per dimension ({func}`stepdiff.models.vae.bits_per_dim`), the same convention as
the VAE's bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .models.vae import discretised_gaussian_log_prob
from .parametrize import PREDICTIONS, convert
from .schedules import Schedule

__all__ = ["DiffusionELBO", "diffusion_term", "diffusion_elbo"]

Model = Callable[[Tensor, Tensor], Tensor]


class DiffusionELBO(NamedTuple):
    r"""The terms of a diffusion model's bound per image ``[B]``, in nats (see the module docstring):
    ``prior`` and ``diffusion`` are costs (non-negative), ``reconstruction`` is a log-probability
    (non-positive); ``elbo`` = reconstruction $-$ diffusion $-$ prior."""

    prior: Tensor
    diffusion: Tensor
    reconstruction: Tensor

    @property
    def elbo(self) -> Tensor:
        return self.reconstruction - self.diffusion - self.prior


def _check_common(x0: Tensor, schedule: Schedule, prediction: str, t_min: float, t_max: float) -> tuple[float, float]:
    if not isinstance(x0, Tensor) or not x0.is_floating_point() or x0.ndim < 2:
        desc = f"{x0.dtype} {tuple(x0.shape)}" if isinstance(x0, Tensor) else type(x0).__name__
        raise ValueError(f"x0 must be a floating-point batch [B, ...]; got {desc}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
    if not (0.0 <= t_min < t_max <= 1.0):
        raise ValueError(f"need 0 <= t_min < t_max <= 1; got t_min={t_min!r}, t_max={t_max!r}")
    lam_max = float(schedule.log_snr(torch.tensor(float(t_min), dtype=torch.float64)))
    lam_min = float(schedule.log_snr(torch.tensor(float(t_max), dtype=torch.float64)))
    if not math.isfinite(lam_max):
        raise ValueError(f"t_min={t_min!r} has an infinite log-SNR on {schedule!r}; choose t_min with sigma(t_min) > 0")
    if not math.isfinite(lam_min):
        raise ValueError(f"t_max={t_max!r} has an infinite log-SNR on {schedule!r}; choose t_max with alpha(t_max) > 0")
    return lam_min, lam_max


@torch.no_grad()
def diffusion_term(
    model: Model,
    x0: Tensor,
    schedule: Schedule,
    *,
    prediction: str = "eps",
    t_min: float,
    t_max: float,
    n_lambda: int = 16,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The diffusion term
    $\tfrac12\int_{\lambda_{\min}}^{\lambda_{\max}}\|\varepsilon - \hat\varepsilon(x_\lambda, \lambda)\|^2\,d\lambda$
    per image ``[B]`` (nats), estimated without bias from ``n_lambda`` stratified draws
    $\lambda_k = \lambda_{\min} + \tfrac{k + u_k}{K}(\lambda_{\max} - \lambda_{\min})$, $u_k\sim U(0, 1)$,
    with one $\varepsilon$ each:
    $\tfrac{\lambda_{\max} - \lambda_{\min}}{2K}\sum_k\|\varepsilon_k - \hat\varepsilon_k\|^2$.

    ``model(x, t)`` returns a ``prediction`` for ``x`` at times ``t`` ``[B]``; it is converted to
    $\hat\varepsilon$ with {func}`stepdiff.parametrize.convert`. ``x0`` ``[B, ...]`` need not be
    discrete. $\lambda_{\max} = \lambda(t_{\min})$, $\lambda_{\min} = \lambda(t_{\max})$, both finite.
    """
    lam_min, lam_max = _check_common(x0, schedule, prediction, t_min, t_max)
    if isinstance(n_lambda, bool) or not isinstance(n_lambda, int) or n_lambda < 1:
        raise ValueError(f"n_lambda must be a positive integer; got {n_lambda!r}")
    B = x0.shape[0]
    total = torch.zeros(B, dtype=x0.dtype, device=x0.device)
    for k in range(n_lambda):
        u = (k + torch.rand(B, generator=generator, dtype=torch.float64)) / n_lambda
        lam = lam_min + u * (lam_max - lam_min)
        t = schedule.t_from_log_snr(lam).to(torch.float64)
        a = schedule.alpha(t).to(x0.dtype).to(x0.device)
        s = schedule.sigma(t).to(x0.dtype).to(x0.device)
        shape = (B,) + (1,) * (x0.ndim - 1)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        xt = a.view(shape) * x0 + s.view(shape) * eps
        t_in = t.to(x0.dtype).to(x0.device)
        pred = model(xt, t_in)
        eps_hat = pred if prediction == "eps" else convert(pred, xt, t, schedule, prediction, "eps")
        total = total + (eps - eps_hat.to(x0.dtype)).flatten(1).square().sum(1)
    return 0.5 * (lam_max - lam_min) * total / n_lambda


@torch.no_grad()
def diffusion_elbo(
    model: Model,
    x0: Tensor,
    schedule: Schedule,
    *,
    prediction: str = "eps",
    levels: int,
    t_min: float,
    t_max: float,
    n_lambda: int = 16,
    generator: torch.Generator | None = None,
) -> DiffusionELBO:
    r"""The three terms of the module docstring's bound for images ``x0`` ``[B, ...]`` whose
    values lie on the grid $-1 + 2i/(n-1)$, $n$ = ``levels``.

    - ``prior`` $= \tfrac12\,\mathrm{SNR}(t_{\max})\,\|x_0\|^2$
      ($\mathrm{KL}(\mathcal N(\alpha x_0, \sigma^2 I)\,\|\,\mathcal N(0, \sigma^2 I))$ at $t_{\max}$);
    - ``diffusion``: {func}`stepdiff.elbo.diffusion_term` with ``n_lambda`` draws;
    - ``reconstruction`` $= \log p(x_0\mid x_{t_{\min}})$, the discretised Gaussian of mean
      $\hat x_0(x_{t_{\min}})$ and standard deviation $\sigma(t_{\min})/\alpha(t_{\min})$, one draw.
    """
    _check_common(x0, schedule, prediction, t_min, t_max)
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an integer >= 2; got {levels!r}")
    u = (x0.detach().double() + 1.0) * (levels - 1) / 2.0
    off = float((u - u.round()).abs().max())
    if off > 1e-3 or float(x0.min()) < -1 - 1e-6 or float(x0.max()) > 1 + 1e-6:
        raise ValueError(
            f"x0 must take the {levels} values -1 + 2i/{levels - 1} in [-1, 1] (levels={levels}); its values are up "
            f"to {off:.3g} bins off the grid, in [{float(x0.min()):.4g}, {float(x0.max()):.4g}]"
        )
    B = x0.shape[0]
    t_hi = torch.tensor(float(t_max), dtype=torch.float64)
    prior = 0.5 * float(schedule.snr(t_hi)) * x0.flatten(1).square().sum(1)
    diffusion = diffusion_term(model, x0, schedule, prediction=prediction, t_min=t_min, t_max=t_max,
                               n_lambda=n_lambda, generator=generator)
    t_lo = torch.tensor(float(t_min), dtype=torch.float64)
    a, s = float(schedule.alpha(t_lo)), float(schedule.sigma(t_lo))
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    xt = a * x0 + s * eps
    t_in = torch.full((B,), float(t_min), dtype=x0.dtype, device=x0.device)
    pred = model(xt, t_in)
    x0_hat = pred if prediction == "x0" else convert(pred, xt, t_lo, schedule, prediction, "x0")
    log_std = torch.full_like(x0, math.log(s / a))
    reconstruction = discretised_gaussian_log_prob(x0, x0_hat.to(x0.dtype), log_std, levels).flatten(1).sum(1)
    return DiffusionELBO(prior, diffusion, reconstruction)
