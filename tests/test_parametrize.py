"""Parametrizations: every conversion is exact, round trips are the identity."""

import itertools

import pytest
import torch

from stepdiff.denoisers import gaussian
from stepdiff.parametrize import PREDICTIONS, conversion_coefficients, convert, target_coefficients
from stepdiff.schedules import (
    DiscreteVPSchedule,
    EDMSchedule,
    FlowMatchingSchedule,
    VESchedule,
    VPCosineSchedule,
    VPLinearSchedule,
)

f64 = torch.float64
SCHEDULES = [
    VESchedule(3.0),
    VPLinearSchedule(),
    VPCosineSchedule(),
    FlowMatchingSchedule(),
    EDMSchedule(),
    DiscreteVPSchedule(100),
]


def _draw(n=64, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, d, generator=g, dtype=f64)
    eps = torch.randn(n, d, generator=g, dtype=f64)
    t = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=f64)
    return x0, eps, t


def _truth(schedule, x0, eps, t, name):
    A, B = target_coefficients(schedule, t, name)
    return A[:, None] * x0 + B[:, None] * eps


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
def test_every_conversion_is_exact(schedule):
    x0, eps, t = _draw()
    x = schedule.alpha(t)[:, None] * x0 + schedule.sigma(t)[:, None] * eps
    truth = {name: _truth(schedule, x0, eps, t, name) for name in PREDICTIONS}
    for src, dst in itertools.product(PREDICTIONS, PREDICTIONS):
        torch.testing.assert_close(convert(truth[src], x, t, schedule, src, dst), truth[dst], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
def test_round_trips_are_the_identity(schedule):
    _, pred, t = _draw(seed=1)
    x = torch.randn_like(pred)
    for src, dst in itertools.permutations(PREDICTIONS, 2):
        there = convert(pred, x, t, schedule, src, dst)
        torch.testing.assert_close(convert(there, x, t, schedule, dst, src), pred, rtol=1e-9, atol=1e-9)


def test_definitions():
    x0, eps, t = _draw(seed=2)
    vp = VPCosineSchedule()
    a, s = vp.alpha(t)[:, None], vp.sigma(t)[:, None]
    # v-prediction (Salimans & Ho): v = alpha eps - sigma x0, and x0 = alpha x - sigma v on VP paths.
    v = _truth(vp, x0, eps, t, "v")
    torch.testing.assert_close(v, a * eps - s * x0)
    torch.testing.assert_close(a * (a * x0 + s * eps) - s * v, x0)
    # The velocity is the time derivative of the path at fixed (x0, eps).
    h = 1e-6
    for schedule in SCHEDULES:
        path = lambda tt: schedule.alpha(tt)[:, None] * x0 + schedule.sigma(tt)[:, None] * eps  # noqa: B023
        numeric = (path(t + h) - path(t - h)) / (2 * h)
        if isinstance(schedule, DiscreteVPSchedule):
            continue  # piecewise linear: the derivative is one-sided at the knots
        torch.testing.assert_close(_truth(schedule, x0, eps, t, "velocity"), numeric, rtol=1e-5, atol=1e-5)
    # Flow matching: the velocity is x1 - x0 with x1 = eps.
    torch.testing.assert_close(_truth(FlowMatchingSchedule(), x0, eps, t, "velocity"), eps - x0)


def test_score_from_an_exact_denoiser_is_the_true_score():
    # Tweedie: converting the exact E[x0 | x_t] to "score" gives grad log p_t exactly.
    target = gaussian(torch.tensor([0.5, -1.0]), torch.tensor([[1.0, 0.3], [0.3, 0.4]]))
    schedule = VPLinearSchedule()
    x = torch.randn(32, 2, dtype=f64)
    t = torch.full((32,), 0.3, dtype=f64)
    score = convert(target.denoise(x, t, schedule), x, t, schedule, "x0", "score")
    x_req = x.clone().requires_grad_(True)
    target.log_prob(x_req, 0.3, schedule).sum().backward()
    torch.testing.assert_close(score, x_req.grad, rtol=1e-8, atol=1e-10)


def test_same_name_is_identity_and_coefficients_broadcast():
    a, b = conversion_coefficients(VESchedule(), torch.tensor([0.2, 0.4]), "eps", "eps")
    assert a.tolist() == [0.0, 0.0] and b.tolist() == [1.0, 1.0]
    pred = torch.randn(2, 3, 4)
    out = convert(pred, torch.randn(2, 3, 4), torch.tensor([0.2, 0.7]), VPLinearSchedule(), "eps", "x0")
    assert out.shape == pred.shape and out.dtype == pred.dtype


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown src"):
        convert(torch.zeros(2, 2), torch.zeros(2, 2), 0.5, VESchedule(), "noise", "x0")
    with pytest.raises(ValueError, match="unknown dst"):
        conversion_coefficients(VESchedule(), 0.5, "x0", "mean")
    with pytest.raises(ValueError, match="same shape"):
        convert(torch.zeros(2, 2), torch.zeros(2, 3), 0.5, VESchedule(), "eps", "x0")
    with pytest.raises(ValueError, match="per-sample"):
        convert(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([0.1, 0.2, 0.3]), VESchedule(), "eps", "x0")
