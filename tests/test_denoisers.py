"""Exact denoisers: closed forms, and the defining property of a conditional expectation."""

import math

import pytest
import torch

from stepdiff.denoisers import (
    GaussianMixture,
    exact_denoiser,
    gaussian,
    isotropic_gaussian,
    point_masses,
)
from stepdiff.forward import add_noise
from stepdiff.schedules import FlowMatchingSchedule, VESchedule, VPCosineSchedule, VPLinearSchedule

f64 = torch.float64
SCHEDULES = [VESchedule(2.0), VPLinearSchedule(), VPCosineSchedule(), FlowMatchingSchedule()]


def _mixture():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 2, generator=g, dtype=f64) * 2
    A = torch.randn(3, 2, 2, generator=g, dtype=f64) * 0.5
    covs = A @ A.transpose(-1, -2) + 0.05 * torch.eye(2, dtype=f64)
    return GaussianMixture(means, covs, torch.tensor([0.5, 0.3, 0.2]))


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
def test_gaussian_denoiser_is_the_linear_formula(schedule):
    m = torch.tensor([1.0, -0.5], dtype=f64)
    C = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=f64)
    target = gaussian(m, C)
    x = torch.randn(50, 2, dtype=f64)
    t = torch.rand(50, dtype=f64) * 0.9 + 0.05
    got = target.denoise(x, t, schedule)
    for i in range(0, 50, 7):
        a, s = schedule.alpha(t[i]), schedule.sigma(t[i])
        want = m + a * C @ torch.linalg.solve(a**2 * C + s**2 * torch.eye(2, dtype=f64), x[i] - a * m)
        torch.testing.assert_close(got[i], want, rtol=1e-10, atol=1e-10)


def test_points():
    a = torch.tensor([[1.5, -2.0]], dtype=f64)
    x = torch.randn(10, 2, dtype=f64) * 5
    torch.testing.assert_close(point_masses(a).denoise(x, 0.7, VESchedule(3.0)), a.expand(10, 2))
    # Two points: the posterior weight is a logistic function of the distance difference.
    pts = torch.tensor([[-1.0], [2.0]], dtype=f64)
    two = point_masses(pts, torch.tensor([0.25, 0.75]))
    sched, t = VESchedule(1.0), 0.49
    xs = torch.linspace(-3, 4, 15, dtype=f64)[:, None]
    logits = torch.log(torch.tensor([0.25, 0.75], dtype=f64)) - (xs - pts.T) ** 2 / (2 * 0.49)
    want = (torch.softmax(logits, -1) * pts.T).sum(-1, keepdim=True)
    torch.testing.assert_close(two.denoise(xs, t, sched), want)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
def test_denoiser_is_the_conditional_expectation(schedule):
    """E[(x0 - D(x_t)) g(x_t)] = 0 for every test function g: the orthogonality that defines
    E[x0 | x_t]. n = 100 000 pairs, 5 standard errors per check (false alarm ~1e-6 each);
    a denoiser off by 2 % of its shrinkage fails it."""
    target = _mixture()
    n = 100_000
    g = torch.Generator().manual_seed(1)
    x0 = target.sample(n, g)
    t = torch.rand(n, generator=g, dtype=f64) * 0.8 + 0.1
    x_t, _ = add_noise(x0, t, schedule, generator=g)
    resid = x0 - target.denoise(x_t, t, schedule)
    for gfun in [torch.ones_like(x_t[:, :1]), x_t[:, :1], torch.sin(x_t[:, 1:]), x_t[:, :1] * x_t[:, 1:]]:
        prod = resid * gfun
        se = prod.std(0) / math.sqrt(n)
        assert bool((prod.mean(0).abs() < 5 * se).all()), (prod.mean(0), se)
    # The same test catches a slightly wrong denoiser.
    wrong = x0 - 1.05 * target.denoise(x_t, t, schedule)
    prod = wrong * x_t[:, :1]
    assert bool((prod.mean(0).abs() > 5 * prod.std(0) / math.sqrt(n)).any())


def test_log_prob_normalises_and_matches_the_marginal():
    target = _mixture()
    sched = VPLinearSchedule()
    u = torch.linspace(-9, 9, 361, dtype=f64)
    grid = torch.cartesian_prod(u, u)
    cell = float(u[1] - u[0]) ** 2
    for t in [0.0, 0.3, 0.8]:
        p = target.log_prob(grid, t, sched).exp()
        assert float(p.sum() * cell) == pytest.approx(1.0, abs=2e-4)
        if t > 0:
            torch.testing.assert_close(target.marginal(t, sched).log_prob(grid), target.log_prob(grid, t, sched))


def test_score_is_the_gradient_of_log_prob():
    target = _mixture()
    sched = VESchedule(2.0)
    x = torch.randn(20, 2, dtype=f64).requires_grad_(True)
    target.log_prob(x, 0.4, sched).sum().backward()
    torch.testing.assert_close(target.score(x.detach(), 0.4, sched), x.grad, rtol=1e-8, atol=1e-10)


def test_sampling_moments():
    """Sample mean and covariance of 200 000 draws within 5 standard errors of mean()/covariance()."""
    target = _mixture()
    x = target.sample(200_000, 0)
    sd = target.covariance().diagonal().sqrt()
    assert bool(((x.mean(0) - target.mean()).abs() < 5 * sd / math.sqrt(2e5)).all())
    torch.testing.assert_close(torch.cov(x.T), target.covariance(), rtol=0.03, atol=0.03)
    x, labels = target.sample(1000, 1, return_labels=True)
    assert labels.shape == (1000,) and int(labels.max()) <= 2


def test_exact_denoiser_callable_keeps_dtype_and_device():
    D = exact_denoiser(isotropic_gaussian(torch.zeros(3), 0.5), VESchedule(2.0))
    x = torch.randn(8, 3, dtype=torch.float32)
    out = D(x, torch.full((8,), 0.5))
    assert out.dtype == torch.float32 and out.shape == x.shape
    # N(0, s^2): E[x0 | x_t] = s^2 / (s^2 + sigma^2) x_t.
    torch.testing.assert_close(out, 0.25 / (0.25 + 2.0) * x)


def test_bad_inputs():
    with pytest.raises(ValueError, match="means"):
        GaussianMixture(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="covs"):
        GaussianMixture(torch.zeros(3, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="symmetric"):
        GaussianMixture(torch.zeros(1, 2), torch.tensor([[[1.0, 0.5], [0.0, 1.0]]]))
    with pytest.raises(ValueError, match="semi-definite"):
        GaussianMixture(torch.zeros(1, 2), torch.tensor([[[1.0, 0.0], [0.0, -1.0]]]))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.zeros(2, 1), None, torch.tensor([1.0, -1.0]))
    target = isotropic_gaussian(torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match=r"x must have shape \[n, 2\]"):
        target.denoise(torch.zeros(4, 3), 0.5, VESchedule())
    with pytest.raises(ValueError, match="t must"):
        target.denoise(torch.zeros(4, 2), torch.full((3,), 0.5), VESchedule())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        target.denoise(torch.zeros(4, 2), 2.0, VESchedule())
