"""The forward process: one jump, one Markov step, and the whole chain agree in law."""

import math

import pytest
import torch

from stepdiff.forward import add_noise, simulate_forward, transition
from stepdiff.parametrize import target_coefficients
from stepdiff.schedules import FlowMatchingSchedule, VESchedule, VPCosineSchedule, VPLinearSchedule, time_grid


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "velocity", "score"])
def test_add_noise_with_given_noise_is_exact(prediction):
    schedule = VPCosineSchedule()
    x0 = torch.randn(5, 3, 7, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    x_t, target = add_noise(x0, t, schedule, prediction=prediction, noise=eps)
    a, s = schedule.alpha(t).view(-1, 1, 1), schedule.sigma(t).view(-1, 1, 1)
    torch.testing.assert_close(x_t, a * x0 + s * eps)
    A, B = (c.view(-1, 1, 1) for c in target_coefficients(schedule, t, prediction))
    torch.testing.assert_close(target, A * x0 + B * eps, rtol=1e-6, atol=1e-6)


def test_add_noise_statistics():
    """x_t given x0 is N(alpha x0, sigma^2): n = 200 000 draws, checks at 5 standard errors
    (false alarm about 1e-6 per check)."""
    schedule = VPLinearSchedule()
    n, t = 200_000, 0.4
    x0 = torch.full((n, 1), 2.0)
    x_t, eps = add_noise(x0, t, schedule, generator=torch.Generator().manual_seed(0))
    a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
    assert abs(float(x_t.mean()) - 2 * a) < 5 * s / math.sqrt(n)
    assert abs(float(x_t.var()) / s**2 - 1) < 5 * math.sqrt(2 / n)
    torch.testing.assert_close(x_t, a * x0 + s * eps, rtol=1e-5, atol=1e-5)


def test_seeded_noise_is_reproducible():
    x0 = torch.randn(4, 2)
    first = add_noise(x0, 0.5, VESchedule(), generator=torch.Generator().manual_seed(3))
    again = add_noise(x0, 0.5, VESchedule(), generator=torch.Generator().manual_seed(3))
    other = add_noise(x0, 0.5, VESchedule(), generator=torch.Generator().manual_seed(4))
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], other[0])


@pytest.mark.parametrize(
    "schedule", [VESchedule(2.0), VPLinearSchedule(), FlowMatchingSchedule()], ids=lambda s: s.name
)
def test_chain_has_the_one_jump_marginals(schedule):
    """Many Markov steps land where one jump does: Var(x_t - alpha x0) = sigma_t^2 at every t.
    n = 20 000 draws, 6 standard errors of a variance (false alarm < 1e-8 per check)."""
    n = 20_000
    x0 = torch.randn(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ts = time_grid(25, "uniform", t_max=0.99).flip(0)
    path = simulate_forward(x0, schedule, ts, generator=torch.Generator().manual_seed(1))
    assert path.shape == (26, n, 1)
    torch.testing.assert_close(path[0], x0)
    for i in [5, 12, 25]:
        t = ts[i]
        resid = path[i] - schedule.alpha(t) * x0
        assert abs(float(resid.var()) / float(schedule.sigma(t)) ** 2 - 1) < 6 * math.sqrt(2 / n)


def test_transition_is_the_forward_kernel():
    schedule = VPLinearSchedule()
    x = torch.randn(3, 2, dtype=torch.float64)
    z = torch.randn_like(x)
    out = transition(x, 0.2, 0.5, schedule, noise=z)
    ratio = schedule.alpha(0.5) / schedule.alpha(0.2)
    var = schedule.sigma(0.5) ** 2 - ratio**2 * schedule.sigma(0.2) ** 2
    torch.testing.assert_close(out, ratio * x + var.sqrt() * z)


def test_bad_inputs():
    x0 = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="one entry per sample"):
        add_noise(x0, torch.full((3,), 0.5), VESchedule())
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        add_noise(x0, 1.5, VESchedule())
    with pytest.raises(ValueError, match="unknown prediction"):
        add_noise(x0, 0.5, VESchedule(), prediction="noise")
    with pytest.raises(ValueError, match="forward in time"):
        transition(x0, 0.5, 0.2, VESchedule())
    with pytest.raises(ValueError, match="strictly increasing"):
        simulate_forward(x0, VESchedule(), torch.tensor([0.0, 0.5, 0.5]))
