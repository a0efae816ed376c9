r"""Exact log-likelihoods through the probability-flow ODE (the instantaneous change of variables).

A deterministic sampler integrates the probability-flow ODE $dx/dt = u_t(x)$, with
$u_t = \dot\alpha\,\hat x_0 + \dot\sigma\,\hat\varepsilon$ the velocity of the model's prediction
({mod}`stepdiff.parametrize`), whose solutions carry the marginals $p_t$ of the forward process.
Along a solution the log-density changes by minus the divergence of the field: the continuity
equation $\partial_t p_t + \nabla\cdot(p_t u_t) = 0$ gives
$\frac{d}{dt}\log p_t(x_t) = \partial_t\log p_t + u_t\cdot\nabla\log p_t = -\nabla\cdot u_t(x_t)$
(Chen et al. 2018), so

$$\log p_{t_0}(x_{t_0}) = \log p_{t_n}(x_{t_n}) + \int_{t_0}^{t_n}\nabla\cdot u_t(x_t)\,dt .$$

Integrating the ODE *up* from a point $x$ at time $t_0$ to the prior's time $t_n$, while
accumulating the divergence, gives $\log p_{t_0}(x)$ exactly, up to the error of the ODE solver
and of the prior $\log p_{t_n}$. The prior is known in closed form only for special targets; by
default it is $\mathcal N(0, \sigma(t_n)^2 I)$, the law the samplers start from (exact when
$\alpha(t_n) = 0$, e.g. flow matching at $t = 1$).

- {func}`divergence`: $u(x)$ and $\nabla\cdot u(x)$ per sample, either exactly by autograd ($D$
  backward passes for $D$ entries per sample), or by Hutchinson's estimator
  $\nabla\cdot u \approx \frac1K\sum_k z_k^\top\,\frac{\partial u}{\partial x}\,z_k$ with
  $\mathbb E[zz^\top] = I$ (one backward pass per probe; Grathwohl et al. 2019), unbiased.
- {func}`ode_log_likelihood`: the classical fourth-order Runge-Kutta method on the augmented
  state $\big(x,\ \int\nabla\cdot u\,dt\big)$ over a given increasing time grid. With Hutchinson's
  estimator the probes are drawn once per sample and kept for the whole path: the trajectory
  does not depend on them, and the quadrature is linear in the divergence, so the estimate of
  the integral stays unbiased.

Both need a model that is differentiable in $x$ and treats the samples of a batch
independently (an MLP, or ``lambda x, t: mixture.denoise(x, t, schedule)``; note that
{class}`~stepdiff.denoisers.ExactDenoiser` detaches its input, so it cannot be used here).
Times must avoid points where the conversion to a velocity is singular: for an $x_0$- or
$\varepsilon$-prediction that is $\sigma(t) = 0$, so start the grid at a small $t_0 > 0$; the
result is then $\log p_{t_0}(x)$, which differs from $\log p_0(x)$ for a smooth density by terms
of the order of $1 - \alpha(t_0)$ and $\sigma(t_0)^2$.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .parametrize import PREDICTIONS, convert
from .schedules import Schedule

__all__ = ["divergence", "ode_log_likelihood", "LikelihoodResult"]

Field = Callable[[Tensor], Tensor]


def divergence(
    fn: Field,
    x: Tensor,
    *,
    method: str = "exact",
    probes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""$u = $ ``fn(x)`` and its divergence $\nabla\cdot u = \sum_i \partial u_i/\partial x_i$ per sample.

    ``x``: ``[B, ...]``; ``fn`` maps it to the same shape, sample by sample. ``method``:

    - ``"exact"``: one backward pass per entry of a sample ($D$ in all), the trace of the
      Jacobian read off its diagonal;
    - ``"hutchinson"``: $\frac1K\sum_k z_k^\top J z_k$ for the ``probes`` $z$ of shape
      ``[K, B, ...]`` (e.g. Rademacher or standard normal), one backward pass per probe.

    Returns ``(u, div)``, detached, of shapes ``[B, ...]`` and ``[B]``.
    """
    if method not in ("exact", "hutchinson"):
        raise ValueError(f"unknown method {method!r}; choose 'exact' or 'hutchinson'")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise ValueError("x must be a floating-point tensor of shape [B, ...]")
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        u = fn(x)
        if not isinstance(u, Tensor) or u.shape != x.shape:
            shape = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
            raise ValueError(f"the field returned {shape} for x of shape {tuple(x.shape)}; it must match")
        B = x.shape[0]
        u_flat = u.reshape(B, -1)
        if method == "exact":
            D = u_flat.shape[1]
            div = torch.zeros(B, dtype=u.dtype, device=u.device)
            for i in range(D):
                (g,) = torch.autograd.grad(u_flat[:, i].sum(), x, retain_graph=i < D - 1)
                div = div + g.reshape(B, -1)[:, i]
        else:
            if probes is None or probes.ndim != x.ndim + 1 or probes.shape[1:] != x.shape:
                raise ValueError(
                    f"hutchinson needs probes of shape [K, {', '.join(map(str, x.shape))}]; "
                    f"got {None if probes is None else tuple(probes.shape)}"
                )
            K = probes.shape[0]
            div = torch.zeros(B, dtype=u.dtype, device=u.device)
            for k in range(K):
                z = probes[k].to(dtype=u.dtype, device=u.device)
                (jtz,) = torch.autograd.grad((u * z).sum(), x, retain_graph=k < K - 1)
                div = div + (jtz * z).reshape(B, -1).sum(1)
            div = div / K
    return u.detach(), div.detach()


@dataclass
class LikelihoodResult:
    r"""What {func}`ode_log_likelihood` returns, per sample (all ``[B]`` but ``x_T``).

    ``log_prob`` $= \log p_{t_0}(x)$ $=$ ``prior_log_prob`` $+$ ``delta``, where
    ``delta`` $= \int_{t_0}^{t_n}\nabla\cdot u_t(x_t)\,dt$ and ``x_T`` $= x_{t_n}$ is where the
    ODE carried the point (``[B, ...]``).
    """

    log_prob: Tensor
    prior_log_prob: Tensor
    delta: Tensor
    x_T: Tensor


def _check_grid(ts: Tensor) -> Tensor:
    ts = torch.as_tensor(ts, dtype=torch.float64)
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(f"ts must be 1-D with at least 2 times; got shape {tuple(ts.shape)}")
    if bool((ts[1:] <= ts[:-1]).any()):
        raise ValueError("ts must be strictly increasing: from the time of the data up to the prior's time")
    if float(ts[0]) < 0 or float(ts[-1]) > 1:
        raise ValueError(f"ts must lie in [0, 1]; got [{float(ts[0])}, {float(ts[-1])}]")
    return ts


def _gaussian_prior(sigma: float) -> Callable[[Tensor], Tensor]:
    def log_prob(x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        D = flat.shape[1]
        return -0.5 * (flat**2).sum(1) / sigma**2 - 0.5 * D * math.log(2 * math.pi * sigma**2)

    return log_prob


def ode_log_likelihood(
    model: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    prediction: str = "x0",
    prior_log_prob: Callable[[Tensor], Tensor] | None = None,
    method: str = "exact",
    n_probes: int = 1,
    probe: str = "rademacher",
    generator: torch.Generator | int | None = None,
) -> LikelihoodResult:
    r"""$\log p_{t_0}(x)$ by integrating the probability-flow ODE from $t_0$ up to $t_n$ (RK4).

    ``model(x, t)`` returns a ``prediction`` (``"x0"``, ``"eps"``, ``"v"``, ``"score"`` or
    ``"velocity"``) for ``x`` ``[B, ...]`` at times ``t`` ``[B]``; it is turned into the velocity
    $u_t$ with {func}`~stepdiff.parametrize.convert`. ``ts``: an increasing grid
    $t_0 < t_1 < \dots < t_n$ in $[0, 1]$; ``x`` is taken to be a point at time $t_0$. Each step
    $h = t_{i+1} - t_i$ is one classical Runge-Kutta step (four velocity and divergence
    evaluations; global error $O(h^4)$) for

    $$\frac{dx}{dt} = u_t(x),\qquad \frac{d\ell}{dt} = \nabla\cdot u_t(x),\qquad \ell(t_0) = 0,$$

    and the result is $\log p_{t_0}(x) = \log p_{t_n}(x_{t_n}) + \ell(t_n)$ with $\log p_{t_n}$ =
    ``prior_log_prob`` (a function of ``[B, ...]`` returning ``[B]``), by default that of
    $\mathcal N(0, \sigma(t_n)^2 I)$. ``method``: ``"exact"`` or ``"hutchinson"`` divergence (see
    {func}`divergence`), the latter with ``n_probes`` probes per sample, ``"rademacher"`` ($\pm1$)
    or ``"gaussian"``, drawn once from ``generator``. The arithmetic follows the dtype of ``x``
    (use float64 for likelihoods to many digits).
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
    if probe not in ("rademacher", "gaussian"):
        raise ValueError(f"unknown probe {probe!r}; choose 'rademacher' or 'gaussian'")
    if method not in ("exact", "hutchinson"):
        raise ValueError(f"unknown method {method!r}; choose 'exact' or 'hutchinson'")
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive integer; got {n_probes!r}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise ValueError("x must be a floating-point tensor of shape [B, ...]")
    ts = _check_grid(ts)
    B = x.shape[0]

    probes = None
    if method == "hutchinson":
        g = torch.Generator().manual_seed(generator) if isinstance(generator, int) else generator
        shape = (n_probes, *x.shape)
        if probe == "rademacher":
            probes = torch.randint(0, 2, shape, generator=g, dtype=torch.int64).to(x.dtype) * 2 - 1
        else:
            probes = torch.randn(shape, generator=g, dtype=x.dtype)
        probes = probes.to(x.device)

    def velocity_and_div(x_: Tensor, t: float) -> tuple[Tensor, Tensor]:
        t_batch = torch.full((B,), t, dtype=x_.dtype, device=x_.device)

        def field(y: Tensor) -> Tensor:
            pred = model(y, t_batch)
            if not isinstance(pred, Tensor) or pred.shape != y.shape:
                shape = tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
                raise ValueError(f"the model returned {shape} for x of shape {tuple(y.shape)}; it must match")
            if prediction == "velocity":
                return pred
            return convert(pred, y, t, schedule, prediction, "velocity")

        return divergence(field, x_, method=method, probes=probes)

    state, ell = x.detach(), torch.zeros(B, dtype=x.dtype, device=x.device)
    for i in range(ts.numel() - 1):
        t, t_next = float(ts[i]), float(ts[i + 1])
        h, t_mid = t_next - t, 0.5 * (t + t_next)
        k1, d1 = velocity_and_div(state, t)
        k2, d2 = velocity_and_div(state + 0.5 * h * k1, t_mid)
        k3, d3 = velocity_and_div(state + 0.5 * h * k2, t_mid)
        k4, d4 = velocity_and_div(state + h * k3, t_next)
        state = state + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        ell = ell + (h / 6.0) * (d1 + 2.0 * d2 + 2.0 * d3 + d4)
    if prior_log_prob is None:
        prior_log_prob = _gaussian_prior(float(schedule.sigma(float(ts[-1]))))
    prior = prior_log_prob(state)
    if not isinstance(prior, Tensor) or prior.shape != (B,):
        raise ValueError(f"prior_log_prob must return shape [{B}]; got {getattr(prior, 'shape', type(prior))}")
    prior = prior.to(dtype=x.dtype, device=x.device)
    return LikelihoodResult(prior + ell, prior, ell, state)
