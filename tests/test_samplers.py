"""Samplers against exact denoisers, whose answers are known in closed form.

Statistical tests use fixed seeds (so they are deterministic) and thresholds whose false-alarm
rate for a correct sampler is stated in each docstring.
"""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from stepdiff.denoisers import GaussianMixture, exact_denoiser, isotropic_gaussian, point_masses
from stepdiff.metrics import sliced_wasserstein
from stepdiff.parametrize import conversion_coefficients, convert
from stepdiff.samplers import (
    SAMPLERS,
    ddim_coefficients,
    ddim_inversion,
    ddpm_coefficients,
    deis_coefficients,
    dpmpp_multistep_coefficients,
    exponential_moments,
    model_calls,
    multistep_orders,
    posterior_coefficients,
    sample,
    sample_ddim,
    sample_ddim_tutorial,
    sample_ddpm,
    sample_ddpm_tutorial,
    sample_deis,
    sample_dpmpp_2m,
    sample_dpmpp_3m,
    sample_heun,
    sample_unipc,
    steps_for_nfe,
    tutorial_ddpm_coefficients,
    unipc_coefficients,
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


def test_ddpm_forward_variance_is_ho_et_al_beta():
    """variance="forward": between consecutive levels the noise variance is beta_k (Ho et al.'s
    sigma_t^2 = beta_t), the mean is the posterior's, beta_tilde_k / beta_k = (1 - abar_{k-1}) / (1 - abar_k),
    and the step that lands on the data adds no noise."""
    s = DiscreteVPSchedule(1000, "linear")
    k = torch.tensor([1, 7, 250, 500, 999])
    t, t_prev = s.t_of_index(k), s.t_of_index(k - 1)
    c_x, c_x0, c_beta = ddpm_coefficients(s, t, t_prev, "forward")
    post = posterior_coefficients(s, t, t_prev)
    torch.testing.assert_close(c_beta**2, s.betas[k])
    torch.testing.assert_close(c_x, post[0])
    torch.testing.assert_close(c_x0, post[1])
    torch.testing.assert_close(post[2] ** 2 / c_beta**2, (1 - s.alphas_cumprod[k - 1]) / (1 - s.alphas_cumprod[k]))
    for got, want in zip(ddpm_coefficients(s, t, t_prev), post):  # the default is the posterior's
        torch.testing.assert_close(got, want)
    # Any pair of times, a jump of many levels included; the last step is noiseless.
    ts = time_grid(7, "uniform")
    _, _, c_noise = ddpm_coefficients(VPCosineSchedule(), ts[:-1], ts[1:], "forward")
    assert float(c_noise[-1]) == 0.0 and bool((c_noise[:-1] > 0).all())
    with pytest.raises(ValueError, match="unknown DDPM variance 'beta'"):
        ddpm_coefficients(s, t, t_prev, "beta")


@pytest.mark.parametrize("n_steps", [4, 25])
def test_ddpm_variances_are_exact_at_their_two_extremes(n_steps):
    """Ho et al.'s two variances are the exact reverse variance at two extremes, at any number of steps
    (with the exact denoiser). For x0 ~ N(0, 1) on a VP schedule, p(x_s | x_t) = N(alpha_{t|s} x_t, beta),
    so with variance="forward" every state of the chain is N(0, 1), while beta_tilde < beta loses
    variance; for a point x0 = a, q(x_s | x_t, a) is the reverse step, so with "posterior" every state
    is N(alpha_s a, sigma_s^2), while beta adds too much. 40,000 one-dimensional chains: the sample
    variance's standard error is 0.7 %, and the tolerance 4 %, so a correct sampler fails with
    probability below 1e-6. The wrong variance ends far outside it (measured: the Gaussian's variance
    falls to 0.52 at 4 steps and 0.85 at 25 with beta_tilde; the point's grows to 2.9 times sigma_s^2
    with beta at both), so the bounds 0.9 and 1.5 separate the two by many standard errors."""
    schedule = VPCosineSchedule()
    ts = time_grid(n_steps, "uniform", t_max=0.99)
    n = 40_000
    gauss = isotropic_gaussian(torch.zeros(1), 1.0)
    x = torch.randn(n, 1, dtype=f64, generator=torch.Generator().manual_seed(0))
    x = x * torch.sqrt(schedule.alpha(ts[0]) ** 2 + schedule.sigma(ts[0]) ** 2)
    D = exact_denoiser(gauss, schedule)
    tol = 0.04
    right = sample_ddpm(D, x, schedule, ts, variance="forward", generator=1, return_trajectory=True)
    wrong = sample_ddpm(D, x, schedule, ts, variance="posterior", generator=1, return_trajectory=True)
    var_right = right[1:-1].var(dim=1).squeeze(-1)  # every intermediate state; the last step is noiseless
    var_wrong = wrong[1:-1].var(dim=1).squeeze(-1)
    assert bool(((var_right - 1).abs() < tol).all()), var_right
    assert float(var_wrong.min()) < 0.9, var_wrong
    a = 0.7
    point = exact_denoiser(point_masses(torch.tensor([[a]], dtype=f64)), schedule)
    x = a * schedule.alpha(ts[0]) + schedule.sigma(ts[0]) * x / torch.sqrt(x.var())
    right = sample_ddpm(point, x, schedule, ts, variance="posterior", generator=2, return_trajectory=True)
    wrong = sample_ddpm(point, x, schedule, ts, variance="forward", generator=2, return_trajectory=True)
    want_var = schedule.sigma(ts[1:-1]) ** 2
    torch.testing.assert_close(right[1:-1].mean(dim=1).squeeze(-1), a * schedule.alpha(ts[1:-1]), atol=0.02, rtol=0)
    assert bool(((right[1:-1].var(dim=1).squeeze(-1) / want_var - 1).abs() < tol).all())
    assert float((wrong[1:-1].var(dim=1).squeeze(-1) / want_var).max()) > 1.5
    torch.testing.assert_close(right[-1], torch.full_like(x, a))  # the point itself, exactly


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
    ("dpmpp_3m", VPLinearSchedule(), time_grid(20, "cosine", VPLinearSchedule()), {}),
    ("unipc", VPCosineSchedule(), time_grid(20, "cosine", VPCosineSchedule()), {}),
    ("unipc", DiscreteVPSchedule(1000), time_grid(15, "logsnr", DiscreteVPSchedule(1000), sigma_min=0.01), {}),
    ("deis", VPLinearSchedule(), time_grid(30, "cosine", VPLinearSchedule()), {}),
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


# --- the multistep solvers: DPM-Solver++(3M), UniPC, DEIS ------------------------------------------

MULTISTEP = [
    ("dpmpp_3m", {}, 3),
    ("unipc", {"order": 1}, 2),  # UniP-p with UniC is of order p + 1
    ("unipc", {"order": 2}, 3),
    ("unipc", {"order": 3}, 4),
    ("unipc", {"order": 2, "corrector": False}, 2),
    ("deis", {"order": 1}, 1),
    ("deis", {"order": 2}, 2),
    ("deis", {"order": 3}, 3),
]
MULTISTEP_IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for n, kw, _ in MULTISTEP]


def _lambda_grid(schedule, lams):
    """The times at half log-SNRs ``lams`` (= log(alpha/sigma)), then t = 0."""
    ts = schedule.t_from_log_snr(2 * torch.tensor(lams, dtype=f64))
    return torch.cat([ts, torch.zeros(1, dtype=f64)])


def _one_step(name, kwargs, schedule, ts, i):
    """Step i of the solver's update started from the exact trajectory (exact x and stored
    outputs at t_0..t_i, and at t_{i+1} for UniPC's corrector): its error is the local one."""
    D = exact_denoiser(GAUSS, schedule)
    noise = torch.randn(50, 2, dtype=f64, generator=torch.Generator().manual_seed(0))
    x_T = schedule.alpha(1.0) * M + schedule.sigma(1.0) * noise
    xs = [_exact_flow(schedule, x_T, torch.tensor(1.0, dtype=f64), t) for t in ts[:-1]]
    m = [D(x, t) for x, t in zip(xs, ts[:-1])]
    order = kwargs.get("order", 3)
    if name == "dpmpp_3m":
        c_x, c_d, weights, orders = dpmpp_multistep_coefficients(schedule, ts, 3, lower_order_final=False)
        d = sum(w * m[i - j] for j, w in enumerate(weights[i]))
    elif name == "unipc":
        c_x, c_d, predictor, corrector, orders = unipc_coefficients(schedule, ts, order, lower_order_final=False)
        if kwargs.get("corrector", True):
            d = sum(w * out for w, out in zip(corrector[i], [m[i + 1], *m[i::-1]]))
        else:
            d = sum(w * m[i - j] for j, w in enumerate(predictor[i]))
    else:
        c_x, c_d, weights, orders = deis_coefficients(schedule, ts, order, lower_order_final=False)
        eps = [(x - schedule.alpha(t) * mm) / schedule.sigma(t) for x, mm, t in zip(xs, m, ts)]
        d = sum(w * eps[i - j] for j, w in enumerate(weights[i]))
    assert orders[i] == order
    return float((c_x[i] * xs[i] + c_d[i] * d - xs[i + 1]).abs().max())


@pytest.mark.parametrize("name, kwargs, order", MULTISTEP, ids=MULTISTEP_IDS)
def test_multistep_local_error_has_the_solvers_order(name, kwargs, order):
    """One step from the exact trajectory, with exact stored outputs, on steps h, h/2, h/4, h/8 in
    lambda with unequal ratios (0.8 and 1.2) behind it: the local error falls like h^(order + 1).
    A formula of one order lower would show a slope one lower; the tolerance is 0.25."""
    schedule = VPLinearSchedule()
    p = order - 1 if name == "unipc" and kwargs.get("corrector", True) else order
    hs = [0.2, 0.1, 0.05, 0.025]
    errors = []
    for h in hs:
        back = [0.5 - 2.0 * h, 0.5 - 0.8 * h][3 - p :]  # lambda of the p - 1 stored outputs before t_i
        ts = _lambda_grid(schedule, [*back, 0.5, 0.5 + h, 0.5 + 2 * h])
        errors.append(_one_step(name, kwargs, schedule, ts, len(back)))
    slope = np.polyfit(np.log(hs), np.log(errors), 1)[0]
    assert abs(slope - (order + 1)) < 0.25, (errors, slope)


@pytest.mark.parametrize("schedule", [VPLinearSchedule(), VPCosineSchedule()], ids=lambda s: s.name)
@pytest.mark.parametrize("name, kwargs, order", MULTISTEP, ids=MULTISTEP_IDS)
def test_multistep_solvers_converge_at_their_order(schedule, name, kwargs, order):
    """Global error against the closed-form flow of N(m, diag(c)) at the grid's last noisy time
    (the final step, to t = 0, only denoises), on log-SNR grids of N = 80, 160, 320 steps down to
    sigma = 0.05. The slope must reach order - 0.25 (a method one order lower fails); it may
    exceed the order while the start-up (lower-order first steps at high noise, where the
    denoiser barely changes) is still invisible."""
    t_max = 0.99 if schedule.name == "vp-cosine" else 1.0
    x_T = schedule.alpha(t_max) * M + schedule.sigma(t_max) * torch.randn(
        100, 2, dtype=f64, generator=torch.Generator().manual_seed(0)
    )
    D = exact_denoiser(GAUSS, schedule)
    Ns, errors = [80, 160, 320], []
    for N in Ns:
        ts = time_grid(N, "logsnr", schedule, t_max=t_max, sigma_min=0.05)
        traj = sample(name, D, x_T, schedule, ts, return_trajectory=True, **kwargs)
        exact = _exact_flow(schedule, x_T, torch.tensor(t_max, dtype=f64), ts[-2])
        errors.append(float((traj[-2] - exact).abs().max()))
    slope = -np.polyfit(np.log(Ns), np.log(errors), 1)[0]
    assert order - 0.25 < slope < order + 1.0, (errors, slope)


def test_dpmpp_3m_is_lu_et_al_with_the_second_difference_weighted_by_I2():
    """The third-order weights are Lu et al.'s D0, D1, D2 form with I_2 on D2. The reference
    implementations' I_2 / 2 is one order lower: its local error falls like h^3, not h^4."""
    schedule = VPLinearSchedule()
    errors = {"I2": [], "I2/2": []}
    hs = [0.2, 0.1, 0.05, 0.025]
    for h in hs:
        ts = _lambda_grid(schedule, [0.5 - 2 * h, 0.5 - h * 0.9, 0.5, 0.5 + h, 0.5 + 2 * h])
        lam = schedule.log_snr(ts[:3]) / 2
        h0, h1 = float(lam[2] - lam[1]), float(lam[1] - lam[0])
        r0, r1 = h0 / h, h1 / h
        I0, I1, I2 = exponential_moments(h, 3)
        # D1 = D10 + r0/(r0+r1)(D10 - D11), D2 = (D10 - D11)/(r0+r1), D10 = (m0-m1)/r0, D11 = (m1-m2)/r1,
        # written as weights on (m0, m1, m2):
        d10 = torch.tensor([1 / r0, -1 / r0, 0.0], dtype=f64)
        d11 = torch.tensor([0.0, 1 / r1, -1 / r1], dtype=f64)
        d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
        d2 = (d10 - d11) / (r0 + r1)
        for key, c2 in (("I2", I2), ("I2/2", I2 / 2)):
            w = (I0 * torch.tensor([1.0, 0.0, 0.0], dtype=f64) + I1 * d1 + c2 * d2) / I0
            if key == "I2":
                weights = dpmpp_multistep_coefficients(schedule, ts, 3, lower_order_final=False)[2]
                torch.testing.assert_close(
                    torch.tensor(weights[2], dtype=f64),
                    w,
                    rtol=1e-9,
                    atol=1e-9,
                )
            D = exact_denoiser(GAUSS, schedule)
            x_T = schedule.alpha(1.0) * M + schedule.sigma(1.0) * torch.ones(1, 2, dtype=f64)
            xs = [_exact_flow(schedule, x_T, torch.tensor(1.0, dtype=f64), t) for t in ts[:4]]
            m = [D(x, t) for x, t in zip(xs[:3], ts[:3])]
            c_x, c_d = schedule.sigma(ts[3]) / schedule.sigma(ts[2]), schedule.alpha(ts[3]) * I0
            step = c_x * xs[2] + c_d * (w[0] * m[2] + w[1] * m[1] + w[2] * m[0])
            errors[key].append(float((step - xs[3]).abs().max()))
    slopes = {k: np.polyfit(np.log(hs), np.log(v), 1)[0] for k, v in errors.items()}
    assert abs(slopes["I2"] - 4) < 0.25 and abs(slopes["I2/2"] - 3) < 0.25, (errors, slopes)


@pytest.mark.parametrize(
    "schedule", [VPLinearSchedule(), VESchedule(3.0), FlowMatchingSchedule(), DiscreteVPSchedule(1000)],
    ids=lambda s: s.name,
)
@pytest.mark.parametrize("spacing", ["quadratic", "cosine"])
def test_multistep_solvers_are_exact_for_a_point_mass(schedule, spacing):
    """For p0 = delta_a the denoiser is constant (a) and the noise prediction constant along the
    flow, x_t = alpha_t a + sigma_t eps: every DPM-Solver++, UniPC (both B(h), with or without
    the corrector) and DEIS step reproduces it to rounding, at any step size, because their
    weights sum to one. (For a Gaussian no solver here is exact: x0_hat(lambda) is not a polynomial.)"""
    t_max = 0.97 if schedule.name == "flow" else 1.0
    a = torch.tensor([[0.7, -1.3]], dtype=f64)
    D = exact_denoiser(point_masses(a), schedule)
    noise = torch.randn(64, 2, dtype=f64, generator=torch.Generator().manual_seed(1))
    x = schedule.alpha(t_max) * a + schedule.sigma(t_max) * noise
    eps = (x - schedule.alpha(t_max) * a) / schedule.sigma(t_max)
    ts = time_grid(7, spacing, schedule, t_max=t_max)
    expected = torch.stack([schedule.alpha(t) * a + schedule.sigma(t) * eps for t in ts])
    configs = [("dpmpp_3m", {}), ("dpmpp_2m", {"lower_order_final": True}), ("deis", {"order": 3})]
    configs += [("unipc", {"order": p, "variant": v}) for p in (1, 2, 3) for v in ("bh1", "bh2")]
    for name, kwargs in configs:
        traj = sample(name, D, x, schedule, ts, return_trajectory=True, **kwargs)
        torch.testing.assert_close(traj, expected, rtol=1e-12, atol=1e-12, msg=f"{name} {kwargs}")


@pytest.mark.parametrize("spacing", ["uniform", "linspace", "karras", "cosine"])
def test_lower_orders_reduce_to_known_samplers(spacing):
    """First order, DEIS and UniP are DDIM; UniP-2 with bh2 is DPM-Solver++(2M); the published 2M
    and its lower_order_final version differ only where a step is over twice the one before
    (here the linspace grid's step to the first training level)."""
    schedule = DiscreteVPSchedule(1000)
    D = exact_denoiser(_mixture_2d(), schedule)
    ts = time_grid(10, spacing, schedule)
    x = torch.randn(200, 2, dtype=f64, generator=torch.Generator().manual_seed(2))  # about p_1
    ddim = sample_ddim(D, x, schedule, ts)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)  # noqa: E731
    close(sample_deis(D, x, schedule, ts, order=1), ddim)
    close(sample_unipc(D, x, schedule, ts, order=1, corrector=False), ddim)
    lof = sample_dpmpp_2m(D, x, schedule, ts, lower_order_final=True)
    close(sample_unipc(D, x, schedule, ts, order=2, corrector=False), lof)
    published = sample_dpmpp_2m(D, x, schedule, ts)
    if spacing == "linspace":
        assert float((published - lof).abs().max()) > 0.05
    else:
        close(published, lof)


def test_multistep_orders():
    """The warm-up, the first-order step to t = 0 (h = inf), the step-ratio rule and the bound on h."""
    inf = math.inf
    assert multistep_orders(torch.tensor([0.5] * 5 + [inf]), 3) == [1, 2, 3, 3, 3, 1]
    assert multistep_orders(torch.tensor([inf, 0.5, 0.5, 0.5, inf]), 3) == [1, 1, 2, 3, 1]  # from alpha = 0
    # linspace-like: a short step before a long one drops to first order, then recovers.
    assert multistep_orders(torch.tensor([0.5, 0.5, 0.2, 0.8, 0.8, 0.8, inf]), 3) == [1, 2, 3, 1, 2, 3, 1]
    assert multistep_orders(torch.tensor([0.5, 0.5, 0.2, 0.8, inf]), 3, lower_order_final=False) == [1, 2, 3, 3, 1]
    # third order only while h <= max_h (1 by default); second order at any h.
    assert multistep_orders(torch.tensor([2.0, 2.0, 2.0, 0.9, inf]), 3) == [1, 2, 2, 3, 1]
    assert multistep_orders(torch.tensor([1.0, 1.0, 1.0, 1.0, inf]), 3) == [1, 2, 3, 3, 1]


def test_exponential_moments():
    """I_j(h) = int_0^h e^(tau - h) (tau / h)^j dtau against quadrature, both branches (h < 1 and h >= 1)."""
    for h in [1e-4, 0.3, 0.99, 1.0, 2.5, 12.0]:
        tau = torch.linspace(0, h, 200_001, dtype=f64)
        for j, got in enumerate(exponential_moments(h, 4)):
            want = float(torch.trapezoid(torch.exp(tau - h) * (tau / h) ** j, tau))
            assert got == pytest.approx(want, rel=1e-8), (h, j)
    assert exponential_moments(math.inf, 3) == [1.0, 1.0, 1.0]


def _bench_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_samplers.py"
    spec = importlib.util.spec_from_file_location("bench_samplers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_lower_order_final_is_never_worse_than_ddim_on_the_benchmark_grids(schedule_name):
    """A small version of benchmarks/bench_samplers.py: its target, schedule and every grid, at 5
    and 10 model calls. Each multistep solver (with its lower-order rule on, the default) lands at
    a sliced Wasserstein distance to the target at most 1% above DDIM's on the same grid. The
    distance is taken to the exact flow's outputs from the same 2000 starts (their law is the
    target's; the pairing removes the sampling noise, so 2000 points resolve the differences);
    the 1% absorbs ties, where the rule has made a solver DDIM for all but a step or two.
    The published DPM-Solver++(2M) fails it on the linspace grid (the issue this rule fixes)."""
    bench = _bench_module()
    schedule = bench.SCHEDULES[schedule_name]()
    target = bench.target()
    D = exact_denoiser(target, schedule)
    x_T = target.marginal(1.0, schedule).sample(2000, 0)
    reference = sample_unipc(D, x_T, schedule, time_grid(120, "logsnr", schedule, sigma_min=1e-4), order=3)
    coarser = sample_unipc(D, x_T, schedule, time_grid(60, "logsnr", schedule, sigma_min=1e-4), order=3)
    # The reference has converged: halving its steps moves its law by under 0.01, against DDIM's
    # distances of 0.15 and more here (a few points on a boundary between modes may switch mode).
    assert float(sliced_wasserstein(coarser, reference, 64, generator=0)) < 0.01
    solvers = [
        ("dpmpp_2m", {"lower_order_final": True}),
        ("dpmpp_3m", {}),
        ("unipc", {"order": 2}),
        ("unipc", {"order": 3}),
        ("deis", {"order": 3}),
    ]
    distance = lambda out: float(sliced_wasserstein(out, reference, 64, generator=0))  # noqa: E731
    worse_published = []
    for spacing, make_grid in bench.GRIDS.items():
        for nfe in (5, 10):
            ts = make_grid(nfe, schedule)
            assert abs(float(ts[0]) - 1.0) < 1e-6
            ts[0] = 1.0
            ddim = distance(sample_ddim(D, x_T, schedule, ts))
            for name, kwargs in solvers:
                d = distance(sample(name, D, x_T, schedule, ts, **kwargs))
                assert d <= 1.01 * ddim, (spacing, nfe, name, kwargs, d, ddim)
            if spacing == "linspace" and distance(sample_dpmpp_2m(D, x_T, schedule, ts)) > 1.01 * ddim:
                worse_published.append(nfe)
    assert 5 in worse_published, worse_published


# --- the default: sample(model, x, schedule, nfe=...) ---------------------------------------------


def test_sample_with_nfe_runs_the_default_on_its_grid():
    schedule = VPLinearSchedule()
    D = exact_denoiser(_mixture_2d(), schedule)
    x = torch.randn(100, 2, dtype=f64, generator=torch.Generator().manual_seed(3))
    ts = time_grid(10, "cosine", schedule)
    torch.testing.assert_close(sample(D, x, schedule, nfe=10), sample_unipc(D, x, schedule, ts), rtol=0, atol=0)
    heun = sample_heun(D, x, schedule, time_grid(5, "cosine", schedule))
    torch.testing.assert_close(sample("heun", D, x, schedule, nfe=10), heun)
    assert [model_calls(n, steps_for_nfe(n, 10)) for n in ("heun", "midpoint", "ddim")] == [9, 10, 10]
    # the calls really made
    calls = []
    counting = lambda x, t: calls.append(1) or D(x, t)  # noqa: E731
    for name, nfe in [("unipc", 7), ("heun", 7), ("midpoint", 7), ("dpmpp_3m", 5)]:
        calls.clear()
        sample(name, counting, x, schedule, nfe=nfe)
        assert len(calls) == model_calls(name, steps_for_nfe(name, nfe)) <= nfe, (name, len(calls))
    # flow matching from t = 1 (alpha = 0): the cosine grid's first step is finite.
    fm = FlowMatchingSchedule()
    out = sample(exact_denoiser(_mixture_2d(), fm), torch.randn(50, 2, dtype=f64), fm, nfe=8)
    assert bool(torch.isfinite(out).all())


def test_new_sampler_bad_inputs():
    schedule = VPLinearSchedule()
    D = exact_denoiser(point_masses(torch.zeros(1, 2)), schedule)
    x = torch.randn(8, 2)
    ts = time_grid(5, "cosine", schedule)
    with pytest.raises(ValueError, match="order must be one of"):
        sample_deis(D, x, schedule, ts, order=4)
    with pytest.raises(ValueError, match="order must be one of"):
        sample_unipc(D, x, schedule, ts, order=0)
    with pytest.raises(ValueError, match="unknown UniPC variant 'bh3'"):
        sample_unipc(D, x, schedule, ts, variant="bh3")
    with pytest.raises(ValueError, match="rho = sigma/alpha.*infinite"):
        sample_deis(D, x, FlowMatchingSchedule(), time_grid(5, "uniform"))
    with pytest.raises(ValueError, match="nfe must be a positive integer"):
        sample(D, x, schedule, nfe=0)
    with pytest.raises(ValueError, match="midpoint makes 2 model calls per step; nfe=1"):
        sample("midpoint", D, x, schedule, nfe=1)
    with pytest.raises(ValueError, match="unknown sampler 'dpmpp_4m'"):
        sample("dpmpp_4m", D, x, schedule, nfe=5)
    with pytest.raises(TypeError, match="or nfe= instead of ts"):
        sample("ddim", D, x, schedule)
    with pytest.raises(TypeError, match="no grid"):
        sample(D, x, schedule, ts, nfe=5)
    with pytest.raises(TypeError, match="a sampler name or a model"):
        sample(3, D, x, schedule, ts)
    with pytest.raises(ValueError, match="unknown spacing 'cosin'"):
        time_grid(5, "cosin", schedule)
    # A third-order solver needs no minimum number of steps: the warm-up lowers the order, so
    # one step is a DDIM step (and two are DDIM then 2M).
    one = time_grid(1, "uniform")
    torch.testing.assert_close(sample_dpmpp_3m(D, x, schedule, one), sample_ddim(D, x, schedule, one))


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
@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler", "heun", "midpoint", "dpmpp_2m", "dpmpp_3m", "unipc", "deis"])
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
    assert set(SAMPLERS) == {
        "ddpm_tutorial", "ddim_tutorial", "ddpm", "ddim", "euler", "midpoint", "heun", "dpmpp_2m", "dpmpp_3m", "unipc",
        "deis",
    }
