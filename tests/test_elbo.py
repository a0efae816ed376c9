"""The diffusion ELBO against closed forms.

- A point mass: the exact denoiser predicts the noise exactly, so the diffusion term is zero, and
  the prior and reconstruction terms have closed forms (a Gaussian's mass on a bin).
- A Gaussian N(0, s^2 I): the exact denoiser's expected squared noise error at log-SNR lambda is
  D s^2 / (1 + s^2 e^lambda) (times e^lambda in x0 units); integrated over lambda, the diffusion term's mean is
  (D/2) log((1 + s^2 SNR_max) / (1 + s^2 SNR_min)), checked by Monte Carlo within 4 standard errors.
- The same denoiser given as x0, eps or v predictions gives the same terms.
"""

import math

import pytest
import torch
from scipy.stats import norm

from stepdiff.elbo import diffusion_elbo, diffusion_term
from stepdiff.parametrize import convert
from stepdiff.schedules import VESchedule, VPCosineSchedule, VPLinearSchedule

f64 = torch.float64
LEVELS = 17


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def grid_images(B, shape, levels, seed):
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, levels, (B, *shape), generator=g)
    return (-1.0 + 2.0 * i / (levels - 1)).to(f64)


def point_mass_model(point, schedule, prediction):
    """E[x0 | x_t] = point for every x_t, as a `prediction`."""

    def model(x, t):
        x0_hat = point.expand_as(x)
        return x0_hat if prediction == "x0" else convert(x0_hat, x, t.to(f64), schedule, "x0", prediction)

    return model


def gaussian_model(s2, schedule, prediction):
    """E[x0 | x_t] = alpha s^2 x_t / (alpha^2 s^2 + sigma^2) for x0 ~ N(0, s^2 I)."""

    def model(x, t):
        t = t.to(f64)
        a = schedule.alpha(t).view(-1, *([1] * (x.ndim - 1)))
        s = schedule.sigma(t).view(-1, *([1] * (x.ndim - 1)))
        x0_hat = a * s2 * x / (a**2 * s2 + s**2)
        return x0_hat if prediction == "x0" else convert(x0_hat, x, t, schedule, "x0", prediction)

    return model


@pytest.mark.parametrize("schedule", [VPCosineSchedule(), VPLinearSchedule(), VESchedule(sigma_q=3.0)])
@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
def test_point_mass_terms_are_the_closed_forms(schedule, prediction):
    point = grid_images(1, (1, 3, 5), LEVELS, seed=1)  # odd sizes, edge values included
    point[0, 0, 0, 0], point[0, 0, 0, 1] = -1.0, 1.0
    x0 = point.expand(6, -1, -1, -1).clone()
    t_min, t_max = 0.02, 0.9
    g = torch.Generator().manual_seed(0)
    terms = diffusion_elbo(point_mass_model(point, schedule, prediction), x0, schedule, prediction=prediction,
                           levels=LEVELS, t_min=t_min, t_max=t_max, n_lambda=5, generator=g)
    assert torch.allclose(terms.diffusion, torch.zeros(6, dtype=f64), atol=1e-9)
    snr_max_t = float(schedule.snr(torch.tensor(t_max, dtype=f64)))
    prior = 0.5 * snr_max_t * float(point.square().sum())
    assert torch.allclose(terms.prior, torch.full((6,), prior, dtype=f64), rtol=1e-12)
    # Every pixel's decoder is centred on its value with std sigma/alpha at t_min: an interior bin
    # holds 2 Phi(h) - 1 of the mass, an end bin Phi(h) (it runs to infinity), h = (Delta/2) / std.
    t_lo = torch.tensor(t_min, dtype=f64)
    std = float(schedule.sigma(t_lo) / schedule.alpha(t_lo))
    h = (1.0 / (LEVELS - 1)) / std
    edge = (point.abs() == 1.0).sum().item()
    inner = point.numel() - edge
    expected = inner * math.log(2 * norm.cdf(h) - 1) + edge * math.log(norm.cdf(h))
    assert torch.allclose(terms.reconstruction, torch.full((6,), expected, dtype=f64), rtol=1e-9, atol=1e-12)
    assert torch.allclose(terms.elbo, terms.reconstruction - terms.diffusion - terms.prior)


@pytest.mark.parametrize("schedule", [VPCosineSchedule(), VPLinearSchedule()])
def test_gaussian_diffusion_term_matches_its_closed_form(schedule):
    s2, D, B = 0.6, 5, 4000
    g = torch.Generator().manual_seed(3)
    x0 = math.sqrt(s2) * torch.randn(B, D, generator=g, dtype=f64)
    t_min, t_max = 0.01, 0.95
    term = diffusion_term(gaussian_model(s2, schedule, "x0"), x0, schedule, prediction="x0", t_min=t_min,
                          t_max=t_max, n_lambda=3, generator=g)
    snr = [float(schedule.snr(torch.tensor(t, dtype=f64))) for t in (t_min, t_max)]
    expected = 0.5 * D * math.log((1 + s2 * snr[0]) / (1 + s2 * snr[1]))
    se = float(term.std()) / math.sqrt(B)
    assert abs(float(term.mean()) - expected) < 4 * se, (float(term.mean()), expected, se)
    assert se < 0.05 * expected  # the test can tell a wrong weighting (e.g. uniform in t) apart


def test_predictions_give_the_same_terms():
    schedule, s2 = VPCosineSchedule(), 0.4
    x0 = grid_images(8, (1, 4, 4), LEVELS, seed=5)
    out = {}
    for prediction in ("x0", "eps", "v"):
        g = torch.Generator().manual_seed(11)
        out[prediction] = diffusion_elbo(gaussian_model(s2, schedule, prediction), x0, schedule,
                                         prediction=prediction, levels=LEVELS, t_min=0.03, t_max=0.97, n_lambda=4,
                                         generator=g)
    for prediction in ("eps", "v"):
        for a, b in zip(out["x0"], out[prediction]):
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-8)


def test_more_lambda_draws_estimate_the_same_integral():
    """Stratification changes the variance, not the mean: 1 and 8 draws agree within their errors."""
    schedule, s2, B = VPCosineSchedule(), 0.5, 3000
    g = torch.Generator().manual_seed(2)
    x0 = math.sqrt(s2) * torch.randn(B, 3, generator=g, dtype=f64)
    model = gaussian_model(s2, schedule, "eps")
    one = diffusion_term(model, x0, schedule, t_min=0.02, t_max=0.9, n_lambda=1, generator=g)
    eight = diffusion_term(model, x0, schedule, t_min=0.02, t_max=0.9, n_lambda=8, generator=g)
    se = math.sqrt(float(one.var()) / B + float(eight.var()) / B)
    assert abs(float(one.mean()) - float(eight.mean())) < 4 * se
    assert float(eight.var()) < float(one.var())


def test_bad_arguments_are_named():
    schedule = VPCosineSchedule()
    x0 = grid_images(2, (1, 2, 2), LEVELS, seed=0)
    model = point_mass_model(x0[:1], schedule, "eps")
    kw = dict(levels=LEVELS, t_min=0.02, t_max=0.9)
    with pytest.raises(ValueError, match="t_min"):
        diffusion_elbo(model, x0, schedule, **{**kw, "t_min": 0.95})
    with pytest.raises(ValueError, match="t_min=0.0"):
        diffusion_elbo(model, x0, schedule, **{**kw, "t_min": 0.0})  # sigma(0) = 0: lambda infinite
    with pytest.raises(ValueError, match="t_max=1.5"):
        diffusion_elbo(model, x0, schedule, **{**kw, "t_max": 1.5})
    with pytest.raises(ValueError, match="levels"):
        diffusion_elbo(model, x0, schedule, **{**kw, "levels": 1})
    with pytest.raises(ValueError, match="x0 must take the 17 values"):
        diffusion_elbo(model, x0 + 0.01, schedule, **kw)
    with pytest.raises(ValueError, match="prediction"):
        diffusion_elbo(model, x0, schedule, prediction="noise", **kw)
    with pytest.raises(ValueError, match="n_lambda"):
        diffusion_term(model, x0, schedule, t_min=0.02, t_max=0.9, n_lambda=0)
    with pytest.raises(ValueError, match="x0 must be"):
        diffusion_term(model, x0.long(), schedule, t_min=0.02, t_max=0.9)
