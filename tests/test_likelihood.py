"""The probability-flow likelihood against closed forms: Gaussian targets, whose log p_t is known
exactly at every time, and a Gaussian mixture (its log p_t is a log-sum-exp of Gaussians).

Statistical tests (Hutchinson's estimator) use fixed seeds and 4-standard-error bounds, so a
correct estimator fails about once in 15 000 runs of each; the seeds make every run the same.
"""

import math

import pytest
import torch

from stepdiff.denoisers import GaussianMixture, gaussian
from stepdiff.likelihood import divergence, ode_log_likelihood
from stepdiff.parametrize import convert
from stepdiff.schedules import FlowMatchingSchedule, VESchedule, VPLinearSchedule

f64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


GAUSS = gaussian(torch.tensor([0.7, -1.2], dtype=f64), torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=f64))
MIXTURE = GaussianMixture(
    torch.tensor([[-1.5, 0.0], [1.0, 1.0], [0.5, -1.5]], dtype=f64),
    torch.tensor([0.2, 0.1, 0.15], dtype=f64),
    torch.tensor([0.5, 0.3, 0.2], dtype=f64),
)


def denoiser(target, schedule):
    """E[x0 | x_t] as a differentiable function (ExactDenoiser detaches its input)."""
    return lambda x, t: target.denoise(x, t, schedule)


def exact_prior(target, schedule, t=1.0):
    return lambda z: target.log_prob(z, t, schedule)


# --- divergence ------------------------------------------------------------------------------


def test_exact_divergence_of_affine_fields_is_the_trace():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 3, generator=g, dtype=f64)
    b = torch.randn(3, dtype=f64, generator=g)
    x = torch.randn(7, 3, dtype=f64, generator=g)
    u, div = divergence(lambda y: y @ A.T + b, x)
    assert torch.allclose(u, x @ A.T + b)
    assert torch.allclose(div, torch.full((7,), float(torch.trace(A)), dtype=f64), atol=1e-12)
    # Samples of any shape are flattened: a [B, 2, 2] input with a map on the 4 entries.
    A4 = torch.randn(4, 4, generator=g, dtype=f64)
    x4 = torch.randn(5, 2, 2, dtype=f64, generator=g)
    _, div4 = divergence(lambda y: (y.reshape(5, 4) @ A4.T).reshape(5, 2, 2), x4)
    assert torch.allclose(div4, torch.full((5,), float(torch.trace(A4)), dtype=f64), atol=1e-12)


def test_exact_divergence_of_a_nonlinear_field():
    """u(x) = tanh(x) * x[:, ::-1]: div = sum_i (1 - tanh^2 x_i) x_{d-1-i} (+ the cross term at the centre)."""
    x = torch.tensor([[0.3, -1.2], [2.0, 0.5]], dtype=f64)
    _, div = divergence(lambda y: torch.tanh(y) * y.flip(1), x)
    expected = ((1 - torch.tanh(x) ** 2) * x.flip(1)).sum(1)
    assert torch.allclose(div, expected, atol=1e-12)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(kind):
    """Mean of B = 2000 one-probe estimates within 4 standard errors of tr(A)."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(3, 3, generator=g, dtype=f64)
    B = 2000
    x = torch.zeros(B, 3, dtype=f64)
    if kind == "rademacher":
        z = torch.randint(0, 2, (1, B, 3), generator=g).to(f64) * 2 - 1
    else:
        z = torch.randn(1, B, 3, generator=g, dtype=f64)
    _, est = divergence(lambda y: y @ A.T, x, method="hutchinson", probes=z)
    se = float(est.std()) / math.sqrt(B)
    assert abs(float(est.mean()) - float(torch.trace(A))) < 4 * se
    if kind == "rademacher":
        # z^T A z = tr(A) + sum_{i != j} A_ij z_i z_j: only the off-diagonal part is random.
        assert se > 0


# --- likelihood against closed forms ----------------------------------------------------------


@pytest.mark.parametrize("schedule", [FlowMatchingSchedule(), VPLinearSchedule()], ids=lambda s: s.name)
def test_gaussian_target_log_prob_is_exact(schedule):
    """For N(m, C) the ODE likelihood at t0 matches the closed-form log p_{t0} to 1e-5 at 64 RK4
    steps (measured: 8e-9 for flow matching, 1.3e-6 for VP-linear, falling 16-fold per halving)."""
    x = GAUSS.sample(50, 2)
    t0 = 1e-3
    ts = torch.linspace(t0, 1.0, 65, dtype=f64)
    res = ode_log_likelihood(denoiser(GAUSS, schedule), x, schedule, ts, prior_log_prob=exact_prior(GAUSS, schedule))
    exact = GAUSS.log_prob(x, t0, schedule)
    assert (res.log_prob - exact).abs().max() < 1e-5
    assert torch.allclose(res.log_prob, res.prior_log_prob + res.delta)


def test_default_prior_is_exact_for_flow_matching():
    """alpha(1) = 0 on the linear path: p_1 = N(0, I) whatever the data, so the default prior is exact."""
    schedule = FlowMatchingSchedule()
    x = MIXTURE.sample(20, 3)
    ts = torch.linspace(1e-3, 1.0, 17, dtype=f64)
    default = ode_log_likelihood(denoiser(MIXTURE, schedule), x, schedule, ts)
    exact = ode_log_likelihood(
        denoiser(MIXTURE, schedule), x, schedule, ts, prior_log_prob=exact_prior(MIXTURE, schedule)
    )
    assert torch.allclose(default.log_prob, exact.log_prob, atol=1e-12)


def test_fourth_order_convergence():
    """RK4: each halving of the step divides the error by about 16; we ask for at least 10
    (measured: 1.8e-4, 7.4e-6, 5.0e-7 at 32, 64, 128 steps)."""
    schedule = VPLinearSchedule()
    x = MIXTURE.sample(40, 4)
    t0 = 1e-3
    exact = MIXTURE.log_prob(x, t0, schedule)
    errs = []
    for n in (32, 64, 128):
        ts = torch.linspace(t0, 1.0, n + 1, dtype=f64)
        res = ode_log_likelihood(
            denoiser(MIXTURE, schedule), x, schedule, ts, prior_log_prob=exact_prior(MIXTURE, schedule)
        )
        errs.append(float((res.log_prob - exact).abs().max()))
    assert errs[0] / errs[1] > 10 and errs[1] / errs[2] > 10, errs
    assert errs[-1] < 5e-6, errs


def test_mixture_on_the_ve_process():
    """The tutorial's process (sigma = sigma_q sqrt(t)); the prior is the exact p_1 (measured
    error 6e-7 at 128 steps)."""
    schedule = VESchedule(2.0)
    x = MIXTURE.sample(30, 5)
    t0 = 1e-3
    ts = t0 + (1 - t0) * torch.linspace(0, 1, 129, dtype=f64) ** 2  # finer near t0, where sigma changes fast
    res = ode_log_likelihood(
        denoiser(MIXTURE, schedule), x, schedule, ts, prior_log_prob=exact_prior(MIXTURE, schedule)
    )
    assert (res.log_prob - MIXTURE.log_prob(x, t0, schedule)).abs().max() < 1e-5


@pytest.mark.parametrize("prediction", ["eps", "v", "score", "velocity"])
def test_any_parametrization_gives_the_same_likelihood(prediction):
    """The conversions are exact, so a model predicting eps, v, the score or the velocity gives
    the likelihood of the x0-predictor to rounding."""
    schedule = VPLinearSchedule()
    x = MIXTURE.sample(10, 6)
    ts = torch.linspace(1e-2, 1.0, 9, dtype=f64)
    D = denoiser(MIXTURE, schedule)

    def model(y, t):
        return convert(D(y, t), y, t, schedule, "x0", prediction)

    ref = ode_log_likelihood(D, x, schedule, ts)
    other = ode_log_likelihood(model, x, schedule, ts, prediction=prediction)
    assert torch.allclose(ref.log_prob, other.log_prob, atol=1e-9)


def test_hutchinson_likelihood_is_unbiased():
    """One Rademacher probe per point: the mean difference from the exact-divergence result is
    within 4 standard errors of 0 (400 points), and the estimate is not identical to it."""
    schedule = FlowMatchingSchedule()
    x = MIXTURE.sample(400, 7)
    ts = torch.linspace(1e-3, 1.0, 9, dtype=f64)
    D = denoiser(MIXTURE, schedule)
    exact = ode_log_likelihood(D, x, schedule, ts)
    hutch = ode_log_likelihood(D, x, schedule, ts, method="hutchinson", generator=8)
    diff = hutch.log_prob - exact.log_prob
    assert float(diff.abs().max()) > 1e-6
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(len(diff))
    # The trajectory does not depend on the probes.
    assert torch.allclose(hutch.x_T, exact.x_T)


def test_bad_inputs():
    schedule = FlowMatchingSchedule()
    D = denoiser(MIXTURE, schedule)
    x = MIXTURE.sample(4, 0)
    good = torch.linspace(0.01, 1.0, 3, dtype=f64)
    with pytest.raises(ValueError, match="increasing"):
        ode_log_likelihood(D, x, schedule, good.flip(0))
    with pytest.raises(ValueError, match="at least 2"):
        ode_log_likelihood(D, x, schedule, good[:1])
    with pytest.raises(ValueError, match="prediction"):
        ode_log_likelihood(D, x, schedule, good, prediction="noise")
    with pytest.raises(ValueError, match="method"):
        ode_log_likelihood(D, x, schedule, good, method="trace")
    with pytest.raises(ValueError, match="must match"):
        ode_log_likelihood(lambda y, t: y[:, :1], x, schedule, good)
    with pytest.raises(ValueError, match="probes"):
        divergence(lambda y: y, x, method="hutchinson")
    with pytest.raises(ValueError, match="shape"):
        ode_log_likelihood(D, x, schedule, good, prior_log_prob=lambda z: z.sum())
