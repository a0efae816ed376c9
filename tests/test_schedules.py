"""Schedules: closed forms, derivatives, inverses, the diffusers vocabulary, time grids."""

import math

import pytest
import torch

from stepdiff.schedules import (
    SCHEDULES,
    DiscreteVPSchedule,
    EDMSchedule,
    FlowMatchingSchedule,
    VESchedule,
    VPCosineSchedule,
    VPLinearSchedule,
    check_time,
    get_schedule,
    karras_sigmas,
    rescale_zero_terminal_snr,
    shift_time,
    time_grid,
)

f64 = torch.float64
ALL = [
    VESchedule(sigma_q=2.5),
    VPLinearSchedule(),
    VPCosineSchedule(),
    FlowMatchingSchedule(),
    EDMSchedule(sigma_max=80.0),
    DiscreteVPSchedule(1000, "linear"),
    DiscreteVPSchedule(1000, "scaled_linear", 0.00085, 0.012),
    DiscreteVPSchedule(37, "squaredcos_cap_v2"),
]
IDS = [repr(s)[:40] for s in ALL]


@pytest.fixture
def times():
    # Random interior times, away from the endpoints where some derivatives blow up.
    return 0.02 + 0.96 * torch.rand(257, generator=torch.Generator().manual_seed(0), dtype=f64)


def test_closed_forms(times):
    t = times
    torch.testing.assert_close(VESchedule(2.5).sigma(t), 2.5 * t.sqrt())
    torch.testing.assert_close(VESchedule(2.5).alpha(t), torch.ones_like(t))
    torch.testing.assert_close(FlowMatchingSchedule().alpha(t), 1 - t)
    torch.testing.assert_close(FlowMatchingSchedule().sigma(t), t)
    torch.testing.assert_close(EDMSchedule(80.0).sigma(t), 80 * t)
    lin = VPLinearSchedule(0.1, 20.0)
    torch.testing.assert_close(lin.alpha(t), torch.exp(-0.25 * t**2 * 19.9 - 0.05 * t))
    cos = VPCosineSchedule(0.008)
    expected = torch.cos((t + 0.008) / 1.008 * math.pi / 2) / math.cos(0.008 / 1.008 * math.pi / 2)
    torch.testing.assert_close(cos.alpha(t), expected)


@pytest.mark.parametrize("schedule", [s for s in ALL if s.name in ("vp-linear", "vp-cosine", "discrete-vp")], ids=str)
def test_variance_preserving(schedule, times):
    torch.testing.assert_close(schedule.alpha(times) ** 2 + schedule.sigma(times) ** 2, torch.ones_like(times))


@pytest.mark.parametrize("schedule", ALL, ids=IDS)
def test_derivatives_match_finite_differences(schedule, times):
    h = 1e-6
    if isinstance(schedule, DiscreteVPSchedule):
        # Piecewise linear: difference inside the segment below t, as the docstring promises.
        T = schedule.num_train_timesteps
        times = (torch.floor(times * T) + 0.5) / T
    for f, df in [(schedule.alpha, schedule.d_alpha), (schedule.sigma, schedule.d_sigma)]:
        numeric = (f(times + h) - f(times - h)) / (2 * h)
        torch.testing.assert_close(df(times), numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", ALL, ids=IDS)
def test_log_snr_is_decreasing_and_inverted(schedule, times):
    t = times.sort().values
    lam = schedule.log_snr(t)
    assert bool((lam[1:] < lam[:-1]).all())
    torch.testing.assert_close(lam, 2 * torch.log(schedule.alpha(t) / schedule.sigma(t)))
    torch.testing.assert_close(schedule.t_from_log_snr(lam), t, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(schedule.t_from_sigma_ve(schedule.sigma_ve(t)), t, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(schedule.snr(t), lam.exp())


def test_vectorised_over_per_sample_times():
    t = torch.tensor([[0.1, 0.2], [0.3, 0.9]], dtype=torch.float32)
    for schedule in ALL:
        out = schedule.sigma(t)
        assert out.shape == t.shape and out.dtype == torch.float32
        assert float(schedule.sigma(0.3)) == pytest.approx(float(out[1, 0]), rel=1e-6)


def test_discrete_linear_matches_known_values():
    # Ho et al.'s schedule: sqrt(alpha_bar_T) = 0.0064 (diffusers DDPM defaults, T = 1000).
    ddpm = DiscreteVPSchedule(1000, "linear", 1e-4, 0.02)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=f64)
    torch.testing.assert_close(ddpm.alphas_cumprod, torch.cumprod(1 - betas, 0))
    assert float(ddpm.alphas_cumprod[-1].sqrt()) == pytest.approx(0.0064, rel=0.02)
    sd = DiscreteVPSchedule(1000, "scaled_linear", 0.00085, 0.012)
    assert float(sd.alphas_cumprod[-1].sqrt()) == pytest.approx(0.0683, rel=0.01)
    assert float(sd.betas[0]) == pytest.approx(0.00085) and float(sd.betas[-1]) == pytest.approx(0.012)
    cos = DiscreteVPSchedule(1000, "squaredcos_cap_v2")
    assert float(cos.betas.max()) == pytest.approx(0.999)
    assert float(cos.alphas_cumprod[-1].sqrt()) < 1e-3


def test_discrete_continuous_view_hits_the_knots():
    s = DiscreteVPSchedule(50, "linear", 1e-3, 0.2)
    k = torch.arange(50)
    torch.testing.assert_close(s.alpha(s.t_of_index(k)), s.alphas_cumprod.sqrt())
    assert float(s.alpha(0.0)) == 1.0 and float(s.sigma(0.0)) == 0.0


def test_continuous_vp_linear_is_the_limit_of_discrete_ddpm():
    # With beta_i = beta(t_i) / T: log alpha_bar = sum log(1 - beta_i), while the continuous
    # schedule has -int beta. They differ by the second-order terms, at most sum beta_i^2
    # (log(1 - b) >= -b - b^2 for b < 1/2), plus a Riemann-sum error of O(1/T).
    T = 1000
    cont = VPLinearSchedule(0.1, 20.0)
    disc = DiscreteVPSchedule(T, "linear", 0.1 / T, 20.0 / T)
    k = torch.arange(49, 999, 50)
    t = disc.t_of_index(k)
    gap = (torch.log(disc.alphas_cumprod[k]) - 2 * torch.log(cont.alpha(t))).abs()
    bound = torch.cumsum(disc.betas**2, 0)[k] + 20.0 / T  # Riemann error < beta_max / T
    assert bool((gap <= bound).all()), (gap, bound)
    assert float(gap.max()) > 0  # they are different schedules, not the same numbers


def test_zero_terminal_snr_rescale():
    s = DiscreteVPSchedule(1000, "scaled_linear", 0.00085, 0.012, rescale_betas_zero_snr=True)
    plain = DiscreteVPSchedule(1000, "scaled_linear", 0.00085, 0.012)
    assert float(s.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-12)
    assert float(s.alphas_cumprod[0]) == pytest.approx(float(plain.alphas_cumprod[0]), rel=1e-9)
    assert float(s.alpha(1.0)) == pytest.approx(0.0, abs=1e-6) and float(s.sigma(1.0)) == pytest.approx(1.0)


@pytest.mark.parametrize("T", [2, 7, 37, 1000])
def test_rescale_zero_terminal_snr_is_the_affine_map_of_sqrt_alphabar(T):
    """Lin et al.'s Algorithm 1: sqrt(alphabar') = a sqrt(alphabar) + b with the first level kept and
    the last sent to 0; checked against that closed form in NumPy on random schedules of odd lengths."""
    import numpy as np

    g = torch.Generator().manual_seed(T)
    betas = torch.sort(torch.rand(T, generator=g, dtype=f64) * 0.05 + 1e-4).values
    out = rescale_zero_terminal_snr(betas)
    assert out.dtype == f64 and out.shape == (T,)
    root = np.sqrt(np.cumprod(1.0 - betas.numpy()))
    expected = (root - root[-1]) * root[0] / (root[0] - root[-1])
    got = np.sqrt(np.cumprod(1.0 - out.numpy()))
    np.testing.assert_allclose(got[:-1], expected[:-1], rtol=1e-10)
    assert float(out[-1]) == 1.0 and got[-1] == 0.0
    assert float(out[0]) == pytest.approx(float(betas[0]), rel=1e-10)
    assert bool(((out[:-1] > 0) & (out[:-1] < 1)).all())
    # float32 input is computed in float64
    b32 = betas.float()
    torch.testing.assert_close(rescale_zero_terminal_snr(b32), rescale_zero_terminal_snr(b32.double()))


def test_rescale_zero_terminal_snr_is_what_the_discrete_schedule_uses():
    plain = DiscreteVPSchedule(1000, "scaled_linear", 0.00085, 0.012)
    rescaled = DiscreteVPSchedule(1000, "scaled_linear", 0.00085, 0.012, rescale_betas_zero_snr=True)
    torch.testing.assert_close(rescaled.betas, rescale_zero_terminal_snr(plain.betas), rtol=0, atol=0)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.tensor([0.01]), "at least 2"),
        (torch.full((2, 3), 0.01), "1-D"),
        (torch.tensor([1, 2]), "floating"),
        (torch.tensor([0.01, 0.0, 0.02]), r"\(0, 1\)"),
        (torch.tensor([0.01, 1.0]), r"\(0, 1\)"),
        (torch.tensor([-0.1, 0.5]), r"\(0, 1\)"),
        (torch.tensor([0.01, float("nan")]), r"\(0, 1\)"),
    ],
)
def test_rescale_zero_terminal_snr_refuses_bad_betas(bad, match):
    with pytest.raises(ValueError, match=match):
        rescale_zero_terminal_snr(bad)


def test_timestep_spacings_match_diffusers():
    s = DiscreteVPSchedule(1000)
    assert s.timesteps(10, "leading").tolist() == list(range(900, -1, -100))
    assert s.timesteps(10, "leading", steps_offset=1).tolist() == list(range(901, 0, -100))
    assert s.timesteps(10, "trailing").tolist() == list(range(999, 0, -100))
    assert s.timesteps(10, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    # 13 steps: the level after 999 is 922 (diffusers' fixed stride would give 923).
    assert s.timesteps(13, "trailing")[:2].tolist() == [999, 922]
    grid = s.time_grid(10, "trailing")
    assert grid[-1] == 0 and grid[0] == pytest.approx(1.0) and grid.numel() == 11


def test_time_grids():
    for spacing in ["uniform", "quadratic"]:
        ts = time_grid(7, spacing)
        assert ts.numel() == 8 and ts[0] == 1.0 and ts[-1] == 0.0 and bool((ts.diff() < 0).all())
    torch.testing.assert_close(time_grid(4, "uniform"), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=f64))
    edm = EDMSchedule(80.0)
    ts = time_grid(10, "karras", edm, sigma_min=0.002)
    sig = edm.sigma_ve(ts[:-1])
    torch.testing.assert_close(sig, karras_sigmas(10, 0.002, 80.0, 7.0))
    assert float(sig[0]) == pytest.approx(80.0) and float(sig[-1]) == pytest.approx(0.002)
    # rho-spacing: sigma^(1/rho) is evenly spaced.
    torch.testing.assert_close(sig ** (1 / 7), torch.linspace(80 ** (1 / 7), 0.002 ** (1 / 7), 10, dtype=f64))
    vp = VPLinearSchedule()
    ts = time_grid(12, "karras", vp, sigma_min=0.01)
    assert float(vp.sigma_ve(ts[0])) == pytest.approx(float(vp.sigma_ve(1.0)), rel=1e-9)
    disc = DiscreteVPSchedule(1000)
    torch.testing.assert_close(time_grid(10, "trailing", disc), disc.time_grid(10, "trailing"))


@pytest.mark.parametrize("schedule", ALL, ids=IDS)
@pytest.mark.parametrize("n", [1, 2, 7, 40])
def test_logsnr_grid_is_uniform_in_log_snr_and_hits_the_ends(schedule, n):
    """lambda(t_i) is evenly spaced from lambda(t_max) to -2 log sigma_min, then t = 0; with
    sigma_max given, from -2 log sigma_max. Checked through the schedule's own lambda."""
    t_max = 0.9 if schedule.name in ("vp-cosine", "flow") else 1.0  # lambda(1) is -inf for these
    sigma_min = 0.02 if schedule.name == "discrete-vp" else 0.005
    ts = time_grid(n, "logsnr", schedule, t_max=t_max, sigma_min=sigma_min)
    assert ts.numel() == n + 1 and ts.dtype == f64 and ts[0] == t_max and ts[-1] == 0.0
    assert bool((ts.diff() < 0).all())
    lam = schedule.log_snr(ts[:-1])
    lam_ends = (float(schedule.log_snr(t_max)), -2 * math.log(sigma_min))
    if n == 1:  # one step: from t_max straight to the data
        assert float(lam[0]) == pytest.approx(lam_ends[0], rel=1e-9)
        return
    torch.testing.assert_close(lam, torch.linspace(*lam_ends, n, dtype=f64), rtol=1e-7, atol=1e-7)
    top = 0.5 * float(schedule.sigma_ve(t_max))
    ts = time_grid(n, "logsnr", schedule, sigma_min=sigma_min, sigma_max=top)
    torch.testing.assert_close(
        schedule.log_snr(ts[:-1]), torch.linspace(-2 * math.log(top), lam_ends[1], n, dtype=f64), rtol=1e-7, atol=1e-7
    )


@pytest.mark.parametrize("schedule", ALL, ids=IDS)
@pytest.mark.parametrize("n", [1, 2, 9, 40])
def test_cosine_grid(schedule, n):
    """The VE noise levels are tan(pi/2 u0 (1 - i/n)) with u0 = 2/pi arctan sigma_ve(t_max): the
    uniform grid of the offset-free cosine schedule, from t_max exactly down to t = 0."""
    for t_max in (1.0, 0.6):
        ts = time_grid(n, "cosine", schedule, t_max=t_max)
        assert ts.numel() == n + 1 and ts[0] == t_max and ts[-1] == 0.0 and bool((ts.diff() < 0).all())
        u0 = 2 / math.pi * math.atan(float(schedule.sigma_ve(t_max)))
        u = u0 * (1 - torch.arange(1, n, dtype=f64) / n)
        torch.testing.assert_close(schedule.sigma_ve(ts[1:-1]), torch.tan(math.pi / 2 * u), rtol=1e-7, atol=1e-9)


def test_cosine_grid_is_symmetric_in_log_snr():
    """From lambda = -inf (flow matching at t = 1), lambda_i = 2 log tan(pi i / 2n): lambda_{n-i} = -lambda_i;
    on the continuous cosine schedule it is nearly its own uniform grid (the offset s = 0.008 aside)."""
    fm = FlowMatchingSchedule()
    lam = fm.log_snr(time_grid(10, "cosine", fm)[1:-1])
    torch.testing.assert_close(lam, 2 * torch.log(torch.tan(math.pi * torch.arange(1, 10, dtype=f64) / 20)))
    torch.testing.assert_close(lam, -lam.flip(0))
    cos = VPCosineSchedule()
    assert float((time_grid(10, "cosine", cos) - time_grid(10, "uniform")).abs().max()) < 0.01


def test_logsnr_grid_is_the_karras_limit():
    """Karras' rho-spacing tends to log-spacing of sigma (uniform log-SNR) as rho grows, like 1/rho."""
    vp = VPLinearSchedule()
    log_grid = time_grid(12, "logsnr", vp, sigma_min=0.01)
    karras = [time_grid(12, "karras", vp, sigma_min=0.01, rho=rho) for rho in (7, 70, 700)]
    gaps = [float((grid - log_grid).abs().max()) for grid in karras]
    assert gaps[0] > 0.2 and 8 < gaps[0] / gaps[1] < 12 and 8 < gaps[1] / gaps[2] < 12, gaps


def test_shift_time():
    assert float(shift_time(0.5, 3.0)) == pytest.approx(0.75)
    t = torch.linspace(0, 1, 11, dtype=f64)
    shifted = shift_time(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and bool((shifted >= t).all())
    ts = time_grid(4, "uniform", shift=3.0)
    torch.testing.assert_close(ts[:-1], shift_time(time_grid(4, "uniform")[:-1], 3.0))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_bad_step_counts(bad):
    with pytest.raises(ValueError, match="n_steps"):
        time_grid(bad)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown schedule"):
        get_schedule("linear-ish")
    with pytest.raises(ValueError, match="unknown spacing"):
        time_grid(5, "geometric")
    with pytest.raises(ValueError, match="karras"):
        time_grid(5, "karras")
    with pytest.raises(ValueError, match="infinite"):
        time_grid(5, "karras", FlowMatchingSchedule())
    with pytest.raises(ValueError, match="logsnr.*needs the schedule"):
        time_grid(5, "logsnr")
    with pytest.raises(ValueError, match="infinite.*spacing='logsnr'"):
        time_grid(5, "logsnr", FlowMatchingSchedule())
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        time_grid(5, "logsnr", VPLinearSchedule(), sigma_min=500.0)
    with pytest.raises(ValueError, match="sigma_max must be a positive finite"):
        time_grid(5, "logsnr", VPLinearSchedule(), sigma_max=-1.0)
    with pytest.raises(ValueError, match="cosine.*needs the schedule"):
        time_grid(5, "cosine")
    with pytest.raises(ValueError, match="above the schedule's largest noise level"):
        time_grid(5, "logsnr", VESchedule(2.5), sigma_max=3.0)
    with pytest.raises(ValueError, match="DiscreteVPSchedule"):
        time_grid(5, "trailing", VPLinearSchedule())
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        check_time(torch.tensor([0.5, 1.2]))
    with pytest.raises(ValueError, match="must lie in"):
        check_time(-0.1)
    with pytest.raises(ValueError, match="beta_schedule"):
        DiscreteVPSchedule(1000, "sigmoidish")
    with pytest.raises(ValueError, match="sigma_q"):
        VESchedule(0.0)
    with pytest.raises(ValueError, match="exceeds"):
        DiscreteVPSchedule(10).timesteps(11)
    assert set(SCHEDULES) == {"ve", "vp-linear", "vp-cosine", "flow", "edm", "discrete-vp"}
    assert isinstance(get_schedule("ve", sigma_q=2.0), VESchedule)
