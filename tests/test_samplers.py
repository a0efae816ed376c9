"""Samplers against exact denoisers, whose answers are known in closed form.

Statistical tests use fixed seeds (so they are deterministic) and thresholds whose false-alarm
rate for a correct sampler is stated in each docstring.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from stepdiff.denoisers import GaussianMixture, exact_denoiser, point_masses
from stepdiff.parametrize import conversion_coefficients, convert
from stepdiff.samplers import (
    SAMPLERS,
    ddim_coefficients,
    ddim_inversion,
    posterior_coefficients,
    sample,
    sample_ddim,
    sample_ddim_tutorial,
    sample_ddpm,
    sample_ddpm_tutorial,
    tutorial_ddpm_coefficients,
)
from stepdiff.schedules import (
    DiscreteVPSchedule,
    FlowMatchingSchedule,
    VESchedule,
    VPCosineSchedule,
    VPLinearSchedule,
    time_grid,
)

f64 = torch.float64


# --- the tutorial's closed-form cases -------------------------------------------------------


def test_case1_single_point_ddim_is_exact_scaling():
    """Claim 3 / Claim 5: for p0 = delta_a, every DDIM step is x -> a + (sigma_s/sigma_t)(x - a),
    exactly, for any step size; so the whole trajectory is x_t = a + (sigma_t/sigma_1)(x_1 - a)."""
    schedule = VESchedule(sigma_q=2.0)
    a = torch.tensor([[0.7, -1.3]], dtype=f64)
    D = exact_denoiser(point_masses(a), schedule)
    x1 = a + 2.0 * torch.randn(64, 2, dtype=f64, generator=torch.Generator().manual_seed(0))
    ts = time_grid(7, "uniform")  # large steps: the identity must still hold exactly
    traj = sample_ddim_tutorial(D, x1, schedule, ts, return_trajectory=True)
    assert traj.shape == (8, 64, 2)
    for i, t in enumerate(ts):
        expected = a + schedule.sigma(t) / schedule.sigma(1.0) * (x1 - a)
        torch.testing.assert_close(traj[i], expected, rtol=1e-12, atol=1e-12)


def test_tutorial_ddim_is_ddim_eta0_on_the_ve_process():
    """Algorithm 2 with lambda = sigma_t / (sigma_s + sigma_t) equals DDIM(eta=0) exactly (any denoiser)."""
    schedule = VESchedule(sigma_q=3.0)
    model = lambda x, t: torch.tanh(x) * (1 + t[:, None])  # an arbitrary, nonlinear "denoiser"
    x1 = 3.0 * torch.randn(32, 3, dtype=f64)
    for ts in [time_grid(5, "uniform"), time_grid(9, "quadratic"), time_grid(6, "karras", schedule)]:
        a = sample_ddim_tutorial(model, x1, schedule, ts)
        b = sample_ddim(model, x1, schedule, ts, eta=0.0)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_tutorial_ddim_with_mean_predictor():
    """Pseudocode 3 with f = E[x_{t-dt} | x_t] equals Algorithm 2 fed the same mean through Claim 2."""
    schedule = VESchedule(1.5)
    D = exact_denoiser(point_masses(torch.tensor([[0.0], [2.0]])), schedule)
    ts = time_grid(20, "uniform")
    dt = 1 / 20

    def mean_model(x, t):  # eq. 137: f = (dt / t) g + (1 - dt / t) x, with g the x0-predictor
        r = (dt / t)[:, None].to(x.dtype)
        return r * D(x, t) + (1 - r) * x

    x1 = 1.5 * torch.randn(100, 1, dtype=f64)
    torch.testing.assert_close(
        sample_ddim_tutorial(mean_model, x1, schedule, ts, prediction="mean"),
        sample_ddim_tutorial(D, x1, schedule, ts),
        rtol=1e-10,
        atol=1e-10,
    )


def test_case2_two_points_velocity_is_the_posterior_weighted_average():
    """Eqs. 48-49: the DDIM update for 1/2 delta_a + 1/2 delta_b is the per-point updates
    weighted by p(x0 = a | x_t) and p(x0 = b | x_t) (not the plain average)."""
    schedule = VESchedule(1.0)
    pts = torch.tensor([[-1.0], [1.5]], dtype=f64)
    two = point_masses(pts)
    t, s = 0.5, 0.2
    x = torch.linspace(-3, 3, 61, dtype=f64)[:, None]
    step = sample_ddim_tutorial(
        exact_denoiser(two, schedule), x, schedule, torch.tensor([t, s, 0.0], dtype=f64), return_trajectory=True
    )[1]
    ratio = float(schedule.sigma(s) / schedule.sigma(t))
    per_point = [p + ratio * (x - p) for p in pts]  # the single-point maps G_t[a], G_t[b]
    w = two.posterior_weights(x, t, schedule)
    torch.testing.assert_close(step, w[:, :1] * per_point[0] + w[:, 1:] * per_point[1], rtol=1e-12, atol=1e-12)
    assert float((step - 0.5 * (per_point[0] + per_point[1])).abs().max()) > 0.1


def test_case2_two_points_ddim_preserves_the_marginals():
    """Ideal DDIM transports p_t to p_s: samples at every grid time pass a KS test against
    1/2 N(a, sigma_t^2) + 1/2 N(b, sigma_t^2), and the end lands on the two points with weight 1/2.
    n = 20 000; KS threshold p > 1e-4 at 4 times (false alarm < 1e-3 in all)."""
    schedule = VESchedule(2.0)
    pts = torch.tensor([[-1.0], [1.0]], dtype=f64)
    two = point_masses(pts)
    n = 20_000
    x1 = two.marginal(1.0, schedule).sample(n, 0)
    ts = time_grid(400, "uniform")
    traj = sample_ddim_tutorial(exact_denoiser(two, schedule), x1, schedule, ts, return_trajectory=True)
    for i in [100, 200, 300, 390]:
        sd = float(schedule.sigma(ts[i]))
        cdf = lambda v, sd=sd: 0.5 * stats.norm.cdf(v, -1, sd) + 0.5 * stats.norm.cdf(v, 1, sd)
        assert stats.kstest(traj[i][:, 0].numpy(), cdf).pvalue > 1e-4
    end = traj[-1][:, 0]
    assert float((end.abs() - 1).abs().max()) < 0.05  # every sample on a point
    frac = float((end > 0).double().mean())
    assert abs(frac - 0.5) < 4 * math.sqrt(0.25 / n)


# --- the standard formulas ------------------------------------------------------------------


def test_ddpm_step_is_ho_et_al_eq11():
    """On the linear-beta schedule, from level k to k-1 with an eps-model, the step is
    x_{k-1} = (x_k - beta_k / sqrt(1 - abar_k) eps) / sqrt(alpha_k) + sqrt(beta_tilde_k) z."""
    s = DiscreteVPSchedule(1000, "linear")
    k = torch.tensor([1, 10, 250, 500, 999])
    t, t_prev = s.t_of_index(k), s.t_of_index(k - 1)
    c_x, c_x0, c_noise = posterior_coefficients(s, t, t_prev)
    a, b = conversion_coefficients(s, t, "eps", "x0")
    beta, abar, abar_prev = s.betas[k], s.alphas_cumprod[k], s.alphas_cumprod[k - 1]
    torch.testing.assert_close(c_x + c_x0 * a, 1 / torch.sqrt(1 - beta))
    torch.testing.assert_close(c_x0 * b, -beta / torch.sqrt(1 - beta) / torch.sqrt(1 - abar))
    torch.testing.assert_close(c_noise, torch.sqrt((1 - abar_prev) / (1 - abar) * beta))
    # The last step (to t = 0, i.e. abar = 1) is noiseless and returns x0_hat.
    last = posterior_coefficients(s, s.t_of_index(torch.tensor([0])), torch.zeros(1, dtype=f64))
    torch.testing.assert_close(torch.stack(last).squeeze(), torch.tensor([0.0, 1.0, 0.0], dtype=f64))


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_ddim_step_is_song_et_al_eq12(eta):
    """x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1} - s^2) eps + s z with
    s = eta sqrt((1 - abar_{t-1})/(1 - abar_t)) sqrt(1 - abar_t / abar_{t-1})."""
    s = DiscreteVPSchedule(1000, "scaled_linear", 0.00085, 0.012)
    k = s.timesteps(20, "trailing")
    t = s.t_of_index(k)
    t_prev = torch.cat([t[1:], torch.zeros(1, dtype=f64)])
    c_x, c_x0, c_noise = ddim_coefficients(s, t, t_prev, eta)
    abar = s.alpha(t) ** 2
    abar_prev = s.alpha(t_prev) ** 2
    sig = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
    torch.testing.assert_close(c_noise, sig)
    # x = sqrt(abar) x0 + sqrt(1 - abar) eps  =>  eps coefficient on x is 1 / sqrt(1 - abar).
    c_eps = torch.sqrt((1 - abar_prev - sig**2).clamp(min=0))
    torch.testing.assert_close(c_x, c_eps / torch.sqrt(1 - abar))
    torch.testing.assert_close(c_x0, torch.sqrt(abar_prev) - c_eps * torch.sqrt(abar) / torch.sqrt(1 - abar))
    if eta == 1.0:
        for got, want in zip((c_x, c_x0, c_noise), posterior_coefficients(s, t, t_prev)):
            torch.testing.assert_close(got, want)


def test_tutorial_ddpm_is_pseudocode_7():
    """x_{t-dt} = x_t + (dt/t)(x0_hat - x_t) + N(0, sigma_q^2 dt) on the uniform grid."""
    schedule = VESchedule(2.0)
    ts = time_grid(10, "uniform")
    c_x, c_x0, c_noise = tutorial_ddpm_coefficients(schedule, ts[:-1], ts[1:])
    torch.testing.assert_close(c_x0, 0.1 / ts[:-1])
    torch.testing.assert_close(c_x, 1 - 0.1 / ts[:-1])
    torch.testing.assert_close(c_noise, torch.full((10,), 2.0 * math.sqrt(0.1), dtype=f64))


# --- every sampler reproduces the target ------------------------------------------------------

M = torch.tensor([1.0, -2.0], dtype=f64)
C = torch.tensor([1.0, 0.25], dtype=f64)
GAUSS = GaussianMixture(M[None], C[None])


def _exact_flow(schedule, x_T, t_max, t):
    """The probability-flow ODE's exact solution for N(m, diag(c)): each coordinate is
    standardised at t_max and de-standardised at t (the flow is affine and keeps the marginals)."""
    a, s = schedule.alpha(t), schedule.sigma(t)
    aT, sT = schedule.alpha(t_max), schedule.sigma(t_max)
    return a * M + torch.sqrt(a**2 * C + s**2) / torch.sqrt(aT**2 * C + sT**2) * (x_T - aT * M)


@pytest.mark.parametrize(
    "schedule", [FlowMatchingSchedule(), VPLinearSchedule(), VPCosineSchedule()], ids=lambda s: s.name
)
@pytest.mark.parametrize("name, order", [("euler", 1), ("ddim", 1), ("heun", 2), ("midpoint", 2), ("dpmpp_2m", 1.5)])
def test_deterministic_samplers_converge_at_their_order(schedule, name, order):
    """Against the closed-form ODE solution, the error falls like N^-order (fitted on N = 40..160)."""
    t_max = 0.99 if schedule.name == "vp-cosine" else 1.0
    x_T = schedule.alpha(t_max) * M + schedule.sigma(t_max) * torch.randn(
        200, 2, dtype=f64, generator=torch.Generator().manual_seed(0)
    )
    exact = _exact_flow(schedule, x_T, t_max, torch.tensor(0.0, dtype=f64))
    D = exact_denoiser(GAUSS, schedule)
    Ns = [40, 80, 160]
    errs = [
        float((sample(name, D, x_T, schedule, time_grid(N, "uniform", t_max=t_max)) - exact).abs().max()) for N in Ns
    ]
    slope = -np.polyfit(np.log(Ns), np.log(errs), 1)[0]
    assert slope > order - 0.2, (errs, slope)
    assert errs[-1] < 0.05


STOCHASTIC_CASES = [
    ("ddpm", VPCosineSchedule(), time_grid(200, "uniform", t_max=0.995), {}),
    ("ddim", VPLinearSchedule(), time_grid(200, "uniform"), {"eta": 0.5}),
    ("ddim", VPLinearSchedule(), time_grid(100, "uniform"), {}),
    ("euler", FlowMatchingSchedule(), time_grid(200, "uniform"), {}),
    ("heun", VESchedule(4.0), time_grid(40, "karras", VESchedule(4.0)), {}),
    ("dpmpp_2m", VESchedule(4.0), time_grid(40, "karras", VESchedule(4.0)), {}),
    # The tutorial's uniform grid on its sqrt(t) process needs many steps: the last one jumps
    # from sigma_q sqrt(dt) straight to the data.
    ("ddpm_tutorial", VESchedule(2.0), time_grid(400, "uniform"), {}),
    ("ddim_tutorial", VESchedule(2.0), time_grid(400, "uniform"), {}),
]


def _mixture_2d():
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=f64)
    covs = torch.tensor([[[0.3, 0.1], [0.1, 0.2]], [[0.2, 0.0], [0.0, 0.4]], [[0.15, -0.05], [-0.05, 0.1]]], dtype=f64)
    return GaussianMixture(means, covs, torch.tensor([0.5, 0.3, 0.2], dtype=f64))


def _projected_ks(samples, target, n_dirs=4):
    """Max KS statistic and min p-value over fixed 1-D projections, against the exact projected
    mixture (a 1-D Gaussian mixture, so its CDF is exact)."""
    angles = torch.arange(n_dirs, dtype=f64) * math.pi / n_dirs + 0.3
    worst_stat, worst_p = 0.0, 1.0
    covs = target.covariances()
    for ang in angles:
        u = torch.stack([torch.cos(ang), torch.sin(ang)])
        mu = (target.means @ u).numpy()
        sd = torch.sqrt(torch.einsum("i,kij,j->k", u, covs, u)).numpy()
        w = target.weights.numpy()
        def cdf(v, w=w, mu=mu, sd=sd):
            return (w * stats.norm.cdf(v[:, None], mu, sd)).sum(-1)

        res = stats.kstest((samples.double() @ u).numpy(), cdf)
        worst_stat, worst_p = max(worst_stat, res.statistic), min(worst_p, res.pvalue)
    return worst_stat, worst_p


@pytest.mark.parametrize(
    "name, schedule, ts, kwargs",
    STOCHASTIC_CASES,
    ids=[f"{c[0]}-{c[1].name}{'-eta' if c[3] else ''}" for c in STOCHASTIC_CASES],
)
def test_samplers_reproduce_a_gaussian_mixture(name, schedule, ts, kwargs):
    """Driven by the exact denoiser from the exact p_{t_max}, each sampler's output matches the
    2-D mixture: KS on 4 projections (p > 1e-4 each) and the mode weights within 4 standard
    errors. n = 10 000 samples; for a correct sampler the false-alarm rate is about 1e-3 per test
    (the fixed seeds make each run deterministic)."""
    target = _mixture_2d()
    n = 10_000
    t_max = float(ts[0])
    x_T = target.marginal(t_max, schedule).sample(n, 1).float()
    if name in ("ddpm", "ddpm_tutorial") or kwargs.get("eta"):
        kwargs = {**kwargs, "generator": torch.Generator().manual_seed(2)}
    out = sample(name, exact_denoiser(target, schedule), x_T, schedule, ts, **kwargs)
    assert out.dtype == torch.float32 and out.shape == (n, 2)
    stat, p = _projected_ks(out, target)
    assert p > 1e-4, (stat, p)
    nearest = torch.cdist(out.double(), target.means).argmin(1)
    frac = torch.bincount(nearest, minlength=3).double() / n
    assert bool(((frac - target.weights).abs() < 4 * torch.sqrt(target.weights * (1 - target.weights) / n)).all()), frac


def test_error_shrinks_with_steps():
    """The KS distance to the target falls as the step count grows (DDIM on the tutorial's process)."""
    target = _mixture_2d()
    schedule = VESchedule(2.0)
    x_T = target.marginal(1.0, schedule).sample(10_000, 3).float()
    D = exact_denoiser(target, schedule)
    dist = [_projected_ks(sample_ddim(D, x_T, schedule, time_grid(n, "uniform")), target)[0] for n in (10, 40, 160)]
    assert dist[0] > dist[1] > dist[2], dist
    assert dist[0] > 0.05 and dist[2] < 0.025, dist


# --- determinism, reproducibility, inversion ---------------------------------------------------


def test_reproducibility():
    schedule = VPLinearSchedule()
    D = exact_denoiser(_mixture_2d(), schedule)
    x = torch.randn(100, 2)
    ts = time_grid(20)
    assert torch.equal(sample_ddim(D, x, schedule, ts), sample_ddim(D, x, schedule, ts))
    a = sample_ddpm(D, x, schedule, ts, generator=7)
    b = sample_ddpm(D, x, schedule, ts, generator=torch.Generator().manual_seed(7))
    c = sample_ddpm(D, x, schedule, ts, generator=8)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # DDIM with eta = 1 draws the same noise as DDPM and takes the same (posterior) step.
    torch.testing.assert_close(sample_ddim(D, x, schedule, ts, eta=1.0, generator=7), a, rtol=1e-5, atol=1e-5)


def test_ddim_inversion_round_trip():
    """DDIM is invertible up to discretisation error: the round trip error falls with the steps."""
    schedule = VPLinearSchedule()
    target = _mixture_2d()
    D = exact_denoiser(target, schedule)
    x_T = target.marginal(1.0, schedule).sample(500, 4)
    errors = []
    for n in (25, 100, 400):
        ts = time_grid(n, "uniform")
        x0 = sample_ddim(D, x_T, schedule, ts)
        errors.append(float((ddim_inversion(D, x0, schedule, ts) - x_T).abs().median()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05, errors


# --- parametrizations, clipping, trajectories --------------------------------------------------


@pytest.mark.parametrize("prediction", ["eps", "v", "velocity", "score"])
@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler", "heun", "midpoint", "dpmpp_2m"])
def test_any_parametrization_gives_the_same_samples(name, prediction):
    schedule = VPCosineSchedule()
    D = exact_denoiser(_mixture_2d(), schedule)
    model = lambda x, t: convert(D(x, t), x, t, schedule, "x0", prediction)
    x = torch.randn(64, 2, dtype=f64)
    ts = time_grid(15, "uniform", t_max=0.98)
    kw = {"generator": 5} if name == "ddpm" else {}
    torch.testing.assert_close(
        sample(name, model, x, schedule, ts, prediction=prediction, **kw),
        sample(name, D, x, schedule, ts, **kw),
        rtol=1e-7,
        atol=1e-7,
    )


def test_clipping_and_trajectories():
    schedule = VPLinearSchedule()
    far = exact_denoiser(point_masses(torch.tensor([[3.0, -3.0]])), schedule)
    x = torch.randn(16, 2)
    out = sample_ddpm(far, x, schedule, time_grid(10), clip_x0=1.0, generator=0)
    assert float(out.abs().max()) <= 1.0 + 1e-6
    traj = sample_ddpm_tutorial(far, x, VESchedule(), time_grid(10), generator=0, return_trajectory=True)
    assert traj.shape == (11, 16, 2) and torch.equal(traj[0], x)


# --- bad input -----------------------------------------------------------------------------------


def test_bad_inputs():
    schedule = VESchedule()
    D = exact_denoiser(point_masses(torch.zeros(1, 2)), schedule)
    x = torch.randn(8, 2)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample("ddpm2", D, x, schedule, time_grid(5))
    with pytest.raises(ValueError, match="n_steps >= 1"):
        sample_ddim(D, x, schedule, torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sample_ddim(D, x, schedule, torch.tensor([1.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_ddim(D, x, schedule, torch.tensor([0.2, 0.5, 0.0]))
    with pytest.raises(ValueError, match="end at t = 0"):
        sample_ddim(D, x, schedule, torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="the model returned"):
        sample_ddim(lambda x, t: x[:, :1], x, schedule, time_grid(3))
    with pytest.raises(ValueError, match="unknown prediction"):
        sample_ddim(D, x, schedule, time_grid(3), prediction="noise")
    with pytest.raises(ValueError, match="variance-exploding"):
        sample_ddpm_tutorial(D, x, VPLinearSchedule(), time_grid(3))
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(D, x, schedule, time_grid(3), eta=-1.0)
    with pytest.raises(TypeError, match="generator"):
        sample_ddpm(D, x, schedule, time_grid(3), generator="seed")
    with pytest.raises(TypeError, match="callable"):
        sample_ddim("model", x, schedule, time_grid(3))
    assert set(SAMPLERS) == {"ddpm_tutorial", "ddim_tutorial", "ddpm", "ddim", "euler", "midpoint", "heun", "dpmpp_2m"}
