"""Consistency models and progressive distillation, against exact denoisers as teachers.

On a 2-D Gaussian mixture the teacher's probability-flow map is known to ODE-solver precision
(Heun, 200 steps, from the exact denoiser), so a student's one-step error is measured exactly.
The training tests use fixed seeds; their bounds are factors of the error of the teacher's own
one- or two-step DDIM, set well away from the measured values (stated in each docstring) and far
from what a broken loss gives (a student that learns nothing has about the one-step DDIM error).
"""

import math

import pytest
import torch
from scipy import stats

from stepdiff.denoisers import GaussianMixture, exact_denoiser, gaussian, point_masses
from stepdiff.distill import (
    ConsistencyLoss,
    ConsistencyModel,
    consistency_coefficients,
    consistency_grid,
    halve_grid,
    progressive_distillation,
    progressive_loss,
    progressive_target,
    sample_consistency,
    teacher_step,
)
from stepdiff.models import MLP
from stepdiff.parametrize import convert
from stepdiff.samplers import ddim_coefficients, sample_ddim, sample_euler, sample_heun
from stepdiff.schedules import (
    FlowMatchingSchedule,
    VESchedule,
    VPCosineSchedule,
    VPLinearSchedule,
    karras_sigmas,
    time_grid,
)
from stepdiff.train import train

torch.set_num_threads(1)
f64 = torch.float64
SCHEDULES = [FlowMatchingSchedule(), VPLinearSchedule(), VESchedule(3.0)]
IDS = ["flow", "vp-linear", "ve"]


def _four_modes() -> GaussianMixture:
    return GaussianMixture(torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]]), 0.04)


@pytest.fixture(scope="module")
def flow_problem():
    """The 2-D target, its exact denoiser on the flow path, 1000 noises and their exact ODE end points."""
    schedule = FlowMatchingSchedule()
    target = _four_modes()
    D = exact_denoiser(target, schedule)
    z = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0), dtype=f64)
    ref = sample_heun(D, z, schedule, time_grid(200, "uniform"))
    ref_fine = sample_heun(D, z, schedule, time_grid(400, "uniform"))
    assert float((ref - ref_fine).norm(dim=1).mean()) < 1e-3  # the map is known to solver precision

    def ddim_error(n: int) -> float:
        return float((sample_ddim(D, z, schedule, time_grid(n, "uniform")) - ref).norm(dim=1).mean())

    data = target.sample(4096, generator=1).float()
    return schedule, D, z, ref, ddim_error, data


def _map_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm(dim=1).mean())


# --- the consistency parametrisation -------------------------------------------------------------


def _noisy_mlp(dim: int = 2) -> MLP:
    torch.manual_seed(0)
    net = MLP(dim=dim, hidden=32, n_layers=2)
    with torch.no_grad():
        net.output.weight.mul_(50.0)  # a prediction far from x, so exactness is not an accident
    return net


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_consistency_function_is_exact_at_t_min(schedule, dtype):
    model = ConsistencyModel(_noisy_mlp().to(dtype), schedule, prediction="eps", t_min=0.002)
    x = torch.randn(64, 2, dtype=dtype, generator=torch.Generator().manual_seed(1)) * 3
    assert torch.equal(model(x, 0.002), x)
    t = torch.where(torch.arange(64) % 2 == 0, torch.tensor(0.002, dtype=dtype), torch.tensor(0.5, dtype=dtype))
    out = model(x, t)
    assert torch.equal(out[::2], x[::2]) and not torch.allclose(out[1::2], x[1::2])


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_consistency_function_is_a_ddim_step_to_t_min(schedule):
    """f(x, t) = c_skip x + c_out x0_hat is one deterministic DDIM step from t to t_min with the network's x0."""
    net = _noisy_mlp().double()
    model = ConsistencyModel(net, schedule, prediction="x0", t_min=0.01)
    x = torch.randn(32, 2, dtype=f64, generator=torch.Generator().manual_seed(2))
    t = torch.rand(32, dtype=f64, generator=torch.Generator().manual_seed(3)) * 0.9 + 0.05
    c_x, c_x0, _ = ddim_coefficients(schedule, t, torch.full_like(t, 0.01), 0.0)
    expected = c_x[:, None] * x + c_x0[:, None] * net(x, t)
    torch.testing.assert_close(model(x, t), expected, rtol=1e-12, atol=1e-12)
    c_skip, c_out = consistency_coefficients(schedule, torch.tensor([0.01, 0.3], dtype=f64), 0.01)
    assert c_skip[0] == 1.0 and c_out[0] == 0.0 and 0 < c_skip[1] < 1


def test_consistency_bad_input():
    schedule = FlowMatchingSchedule()
    model = ConsistencyModel(_noisy_mlp(), schedule, t_min=0.01)
    with pytest.raises(ValueError, match="t must be >= t_min"):
        model(torch.zeros(3, 2), 0.005)
    with pytest.raises(ValueError, match="t_min"):
        ConsistencyModel(_noisy_mlp(), schedule, t_min=0.0)
    with pytest.raises(ValueError, match="prediction"):
        ConsistencyModel(_noisy_mlp(), schedule, prediction="noise")
    with pytest.raises(TypeError, match="ConsistencyModel"):
        ConsistencyLoss(_noisy_mlp(), schedule)
    with pytest.raises(ValueError, match="solver"):
        ConsistencyLoss(model, schedule, solver="rk4")
    with pytest.raises(ValueError, match="target_decay"):
        ConsistencyLoss(model, schedule, target_decay=1.0)
    with pytest.raises(ValueError, match="n_steps"):
        consistency_grid(0, schedule)
    with pytest.raises(ValueError, match="ts must be descending"):
        sample_consistency(model, torch.zeros(3, 2), schedule, [0.5, 0.8])


@pytest.mark.parametrize("schedule", [FlowMatchingSchedule(), VPCosineSchedule(), VESchedule(2.0)], ids=IDS)
def test_consistency_grid_is_karras_spaced(schedule):
    ts = consistency_grid(10, schedule, t_min=0.002, t_max=1.0, sigma_max=40.0)
    assert ts.shape == (11,) and ts[0] == 1.0 and ts[-1] == 0.002 and bool((ts[1:] < ts[:-1]).all())
    s_max = min(40.0, float(schedule.sigma_ve(1.0)))
    levels = karras_sigmas(11, float(schedule.sigma_ve(0.002)), s_max)
    torch.testing.assert_close(schedule.sigma_ve(ts[1:-1]), levels[1:-1], rtol=1e-6, atol=0)


# --- the teacher's solver step, against the samplers -----------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
@pytest.mark.parametrize("solver, sampler", [("ddim", sample_ddim), ("euler", sample_euler), ("heun", sample_heun)])
@pytest.mark.parametrize("prediction", ["x0", "eps", "velocity"])
def test_teacher_step_is_one_step_of_the_sampler(schedule, solver, sampler, prediction):
    D = exact_denoiser(GaussianMixture(torch.tensor([[1.0, 0.5], [-1.0, 0.0]]), 0.1), schedule)

    def teacher(x, t):  # the exact denoiser, as a network of the given parametrisation would predict
        return _convert(D(x, t), x, t, schedule, prediction)

    x = torch.randn(40, 2, dtype=f64, generator=torch.Generator().manual_seed(0))
    t, s = 0.7, 0.3
    ours = teacher_step(teacher, x, torch.full((40,), t, dtype=f64), torch.full((40,), s, dtype=f64), schedule,
                        prediction=prediction, solver=solver)
    ref = sampler(teacher, x, schedule, torch.tensor([t, s, 0.0], dtype=f64), prediction=prediction,
                  return_trajectory=True)[1]
    # sample_heun's Euler predictor passes its step h to affine_step as a Python float, which the float64
    # reference path rounds to float32 (torch.as_tensor of a float): its result carries ~1e-7 relative error.
    tol = 1e-6 if solver == "heun" else 1e-10
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


def _convert(x0, x, t, schedule, dst):
    return x0 if dst == "x0" else convert(x0, x, t, schedule, "x0", dst)


# --- consistency distillation and training on the 2-D target ----------------------------------------


def test_consistency_distillation_gets_close_to_the_teacher_map(flow_problem):
    """300 steps of CD (Heun teacher steps of the exact denoiser, N = 6): the one-step error is about 0.2 (measured
    0.19-0.21 over three seeds) against 2.0 for the teacher's one-step DDIM and 0.75 for its two-step DDIM."""
    schedule, D, z, ref, ddim_error, data = flow_problem
    torch.manual_seed(0)
    student = ConsistencyModel(MLP(dim=2, hidden=64, n_layers=3), schedule, t_min=0.002)
    loss = ConsistencyLoss(student, schedule, n_steps=6, teacher=D, solver="heun", target_decay=0.9)
    result = train(student, data, loss_fn=loss, steps=300, batch_size=128, lr=3e-3, seed=0)
    with torch.no_grad():
        err = _map_error(sample_consistency(student, z.float(), schedule, [1.0]), ref)
    assert err < 0.25 * ddim_error(1), (err, ddim_error(1))
    assert err < 0.5 * ddim_error(2), (err, ddim_error(2))
    assert result.losses[-1] < result.losses[0]


def test_consistency_training_without_a_teacher_learns_the_map(flow_problem):
    """600 steps of CT (N = 18): one-step error 0.62-0.70 measured (three seeds), against 2.0 for the one-step DDIM
    of the exact denoiser: slower than distillation, which is told the map by the teacher."""
    schedule, D, z, ref, ddim_error, data = flow_problem
    torch.manual_seed(0)
    student = ConsistencyModel(MLP(dim=2, hidden=64, n_layers=3), schedule, t_min=0.002)
    loss = ConsistencyLoss(student, schedule, n_steps=18, target_decay=0.9)
    train(student, data, loss_fn=loss, steps=600, batch_size=128, lr=3e-3, seed=0)
    with torch.no_grad():
        err = _map_error(sample_consistency(student, z.float(), schedule, [1.0]), ref)
    assert err < 0.5 * ddim_error(1), (err, ddim_error(1))


@pytest.mark.parametrize("schedule", [FlowMatchingSchedule(), VPLinearSchedule()], ids=["flow", "vp-linear"])
def test_consistency_training_is_distillation_with_the_one_sample_teacher(schedule):
    """CT's x_lo = alpha_lo x0 + sigma_lo z is exactly a DDIM step from x_hi taken with the true x0: the CT loss
    equals the CD loss whose teacher returns the batch's own x0 (same draws)."""
    torch.manual_seed(0)
    student = ConsistencyModel(MLP(dim=2, hidden=32, n_layers=2).double(), schedule, t_min=0.002)
    x0 = torch.randn(64, 2, dtype=f64, generator=torch.Generator().manual_seed(1))

    def oracle(x, t):
        return x0

    ct = ConsistencyLoss(student, schedule, n_steps=10)
    cd = ConsistencyLoss(student, schedule, n_steps=10, teacher=oracle, solver="ddim")
    a = ct(student, x0, None, torch.Generator().manual_seed(5))
    b = cd(student, x0, None, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_the_target_network_follows_the_student_once_per_optimiser_step():
    schedule = FlowMatchingSchedule()
    student = ConsistencyModel(MLP(dim=2, hidden=16, n_layers=1), schedule)
    loss = ConsistencyLoss(student, schedule, n_steps=4, target_decay=0.75)
    theta0 = [p.detach().clone() for p in student.parameters()]
    x0 = torch.randn(8, 2)
    loss(student, x0, None, torch.Generator().manual_seed(0))
    loss(student, x0, None, torch.Generator().manual_seed(1))  # no step in between: the target stays
    assert all(torch.equal(a, b) for a, b in zip(loss.target.parameters(), theta0))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)  # an optimiser step
    loss(student, x0, None, torch.Generator().manual_seed(2))
    loss(student, x0, None, torch.Generator().manual_seed(3))  # a second micro-batch of the same step
    for target, before in zip(loss.target.parameters(), theta0):
        torch.testing.assert_close(target, before + 0.25)
    assert all(not p.requires_grad for p in loss.target.parameters())


@pytest.mark.parametrize("n_steps", [1, 2, 4])
def test_multistep_consistency_sampling_keeps_the_law_with_the_exact_consistency_function(n_steps):
    """For a Gaussian target the probability-flow map is linear, so the exact consistency function is known:
    f*(x, t) = a_min m + sqrt(v_min / v_t) (x - a_t m), v_t = a_t^2 c + s_t^2. Each re-noising then draws exactly
    from p_tau and f* maps it back to p_{t_min}: the output is N(a_min m, v_min) after any number of steps
    (KS test, false alarm 1e-3); a re-noising that forgot the alpha ratio would fail."""
    schedule, m, c, t_min = VPLinearSchedule(), 0.7, 0.3, 0.05

    def a(t):
        return float(schedule.alpha(t))

    def v(t):
        return a(t) ** 2 * c + float(schedule.sigma(t)) ** 2

    def f_star(x, t):
        t = float(t[0])
        return a(t_min) * m + math.sqrt(v(t_min) / v(t)) * (x - a(t) * m)

    x = math.sqrt(v(1.0)) * torch.randn(4000, 1, dtype=f64, generator=torch.Generator().manual_seed(0)) + a(1.0) * m
    ts = [1.0, 0.6, 0.35, 0.15][:n_steps]
    out = sample_consistency(f_star, x, schedule, ts, t_min=t_min, generator=3)
    assert stats.kstest(out[:, 0].numpy(), "norm", args=(a(t_min) * m, math.sqrt(v(t_min)))).pvalue > 1e-3


# --- progressive distillation ------------------------------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
def test_progressive_target_is_two_ddim_steps_of_the_teacher(schedule, prediction):
    """One student DDIM step t -> s with x0 = the target lands where the sampler's two teacher DDIM steps
    t -> t' -> s land (both run through sample_ddim), for per-sample times too."""
    D = exact_denoiser(GaussianMixture(torch.tensor([[1.0, 0.5], [-1.0, 0.0]]), 0.1), schedule)

    def teacher(x, t):
        return _convert(D(x, t), x, t, schedule, prediction)

    x = torch.randn(30, 2, dtype=f64, generator=torch.Generator().manual_seed(0))
    t, t_mid, s = 0.8, 0.55, 0.3
    x_tilde = progressive_target(teacher, x, t, s, schedule, t_mid=t_mid, prediction=prediction)
    two = sample_ddim(teacher, x, schedule, torch.tensor([t, t_mid, s, 0.0], dtype=f64), prediction=prediction,
                      return_trajectory=True)[2]
    one = sample_ddim(lambda z, tt: x_tilde, x, schedule, torch.tensor([t, s, 0.0], dtype=f64),
                      return_trajectory=True)[1]
    torch.testing.assert_close(one, two, rtol=1e-10, atol=1e-10)
    # To t = 0 the target is the teacher's two-step output itself.
    x_end = progressive_target(teacher, x, 0.4, 0.0, schedule, prediction=prediction)
    ref = sample_ddim(teacher, x, schedule, torch.tensor([0.4, 0.2, 0.0], dtype=f64), prediction=prediction)
    torch.testing.assert_close(x_end, ref, rtol=1e-10, atol=1e-10)
    # Per-sample times.
    tt = torch.tensor([0.8, 0.6] * 15, dtype=f64)
    per = progressive_target(teacher, x, tt, tt - 0.4, schedule, prediction=prediction)
    first = progressive_target(teacher, x[::2], 0.8, 0.4, schedule, prediction=prediction)
    torch.testing.assert_close(per[::2], first, rtol=1e-12, atol=1e-12)


def test_progressive_distillation_gets_close_to_the_teacher_map(flow_problem):
    """Two rounds, 4 -> 2 -> 1 steps, 300 Adam steps each, the first teacher the exact denoiser: the one-step
    student's error is 0.26-0.29 measured (three seeds), against 2.0 (one-step DDIM) and 0.75 (two-step DDIM)
    of the teacher."""
    schedule, D, z, ref, ddim_error, data = flow_problem
    torch.manual_seed(0)
    student = MLP(dim=2, hidden=64, n_layers=3)
    teacher, grid = D, time_grid(4, "uniform")
    for _ in range(2):
        def loss_fn(m, x0, y, g, teacher=teacher, grid=grid):
            return progressive_loss(m, teacher, x0, schedule, grid, generator=g)

        train(student, data, loss_fn=loss_fn, steps=300, batch_size=128, lr=2e-3, seed=0)
        teacher = MLP(dim=2, hidden=64, n_layers=3)
        teacher.load_state_dict(student.state_dict())
        teacher.requires_grad_(False)
        grid = halve_grid(grid)
    assert grid.tolist() == [1.0, 0.0]
    with torch.no_grad():
        err = _map_error(sample_ddim(student, z.float(), schedule, grid), ref)
    assert err < 0.25 * ddim_error(1), (err, ddim_error(1))
    assert err < 0.6 * ddim_error(2), (err, ddim_error(2))


def test_progressive_distillation_rounds_halve_the_grid():
    schedule = VPCosineSchedule()
    torch.manual_seed(0)
    teacher = MLP(dim=2, hidden=16, n_layers=1)
    data = gaussian(torch.zeros(2), torch.eye(2)).sample(256, generator=0).float()
    out = progressive_distillation(teacher, data, schedule, time_grid(8, "uniform", t_max=0.99), rounds=2,
                                   steps=5, batch_size=64, seed=0)
    assert [g.numel() - 1 for _, g in out] == [4, 2]
    assert out[1][1].tolist() == time_grid(8, "uniform", t_max=0.99)[::4].tolist()
    assert not torch.equal(out[0][0].output.weight, teacher.output.weight)
    assert all(p.requires_grad for p in teacher.parameters())  # the caller's teacher is left as it was


def test_progressive_loss_weighting_and_bad_input():
    """With a student that already predicts the target, the loss is 0; weights max(SNR, 1) otherwise."""
    schedule = VPCosineSchedule()
    D = exact_denoiser(point_masses(torch.tensor([[0.5, -0.5]])), schedule)
    x0 = torch.tensor([[0.5, -0.5]], dtype=f64).expand(16, 2)
    grid = time_grid(4, "uniform", t_max=0.99)
    # For a point mass every DDIM step is exact, so the target is the point and D itself has zero loss.
    assert float(progressive_loss(D, D, x0, schedule, grid, generator=torch.Generator().manual_seed(0))) < 1e-20
    off = float(progressive_loss(lambda x, t: D(x, t) + 0.1, D, x0, schedule, grid, weighting="uniform",
                                 generator=torch.Generator().manual_seed(0)))
    assert off == pytest.approx(0.01, rel=1e-9)
    with pytest.raises(ValueError, match="even number of steps"):
        halve_grid(time_grid(3))
    with pytest.raises(ValueError, match="even number of steps"):
        progressive_loss(D, D, x0, schedule, time_grid(3), generator=None)
    with pytest.raises(ValueError, match="weighting"):
        progressive_loss(D, D, x0, schedule, grid, weighting="min_snr")
    with pytest.raises(ValueError, match="s < t_mid < t"):
        progressive_target(D, x0, 0.5, 0.6, schedule)
    with pytest.raises(TypeError, match="nn.Module"):
        progressive_distillation(D, x0.float(), schedule, grid, rounds=1)


# --- a distillation run of the stepdiff command ------------------------------------------------------

TINY_UNET = {"arch": "unet", "preset": "tiny", "channels": 8, "channel_mult": [1, 2], "attn_levels": [1], "heads": 2,
             "norm_groups": 4}
DIGITS8 = {"name": "digits", "size": 8, "condition": "class"}


@pytest.fixture(scope="module")
def digits_base(tmp_path_factory):
    from stepdiff.runs import train_run

    out = tmp_path_factory.mktemp("base") / "base.pt"
    train_run({"name": "base", "data": DIGITS8, "model": TINY_UNET,
               "train": {"steps": 3, "batch_size": 16, "threads": 1, "label_dropout": 0.2}}, out)
    return out


@pytest.mark.parametrize("method", ["progressive", "consistency"])
def test_distill_runs_through_the_command(digits_base, tmp_path, method):
    from stepdiff import checkpoints
    from stepdiff.runs import train_run

    cfg = {"kind": "distill", "name": f"student-{method}", "base": {"model": str(digits_base)}, "data": DIGITS8,
           "distill": {"method": method, "teacher_steps": 4, "solver": "ddim"},
           "train": {"steps": 3, "batch_size": 16, "threads": 1, "label_dropout": 0.2}}
    result = train_run(cfg, tmp_path / "s.pt")
    assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses)
    student, record = checkpoints.load(tmp_path / "s.pt")
    teacher, _ = checkpoints.load(digits_base)
    assert record["kind"] == "distill" and record["config"]["base"]["model"] == str(digits_base)
    net = student.net if method == "consistency" else student
    assert isinstance(student, ConsistencyModel) == (method == "consistency")
    assert net.state_dict().keys() == teacher.state_dict().keys()
    assert any(not torch.equal(a, b) for a, b in zip(net.state_dict().values(), teacher.state_dict().values()))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert student(x, torch.full((2,), 0.5), torch.tensor([1, 2])).shape == x.shape


def test_a_second_round_distils_the_first_student(digits_base, tmp_path):
    """Round 2's [base] is round 1's student (a distill run): it keeps the first teacher's objective."""
    from stepdiff import checkpoints
    from stepdiff.runs import train_run

    def cfg(base, steps):
        return {"kind": "distill", "base": {"model": str(base)}, "data": DIGITS8,
                "distill": {"method": "progressive", "teacher_steps": steps},
                "train": {"steps": 2, "batch_size": 16, "threads": 1}}

    train_run(cfg(digits_base, 8), tmp_path / "r1.pt")
    train_run(cfg(tmp_path / "r1.pt", 4), tmp_path / "r2.pt")
    student, _ = checkpoints.load(tmp_path / "r2.pt")
    first, _ = checkpoints.load(tmp_path / "r1.pt")
    assert student.state_dict().keys() == first.state_dict().keys()
    consistency = {"kind": "distill", "base": {"model": str(tmp_path / "r1.pt")}, "data": DIGITS8,
                   "distill": {"method": "consistency", "teacher_steps": 4, "solver": "ddim"},
                   "train": {"steps": 1, "batch_size": 16, "threads": 1}}
    train_run(consistency, tmp_path / "c.pt")
    with pytest.raises(Exception, match="not a diffusion model"):
        train_run({**cfg(tmp_path / "c.pt", 4)}, tmp_path / "r3.pt")


def test_distill_configuration_errors(digits_base, tmp_path):
    from stepdiff.config import ConfigError, resolve
    from stepdiff.runs import train_run

    def cfg(**distill):
        return {"kind": "distill", "base": {"model": str(digits_base)}, "data": DIGITS8, "distill": distill}

    with pytest.raises(ConfigError, match="method"):
        resolve(cfg(method="reflow"))
    with pytest.raises(ConfigError, match="teacher_steps must be even"):
        resolve(cfg(teacher_steps=5))
    with pytest.raises(ConfigError, match="solver"):
        resolve(cfg(method="consistency", solver="rk45"))
    with pytest.raises(ConfigError, match=r"\[base\] model"):
        resolve({"kind": "distill", "data": DIGITS8})
    with pytest.raises(ConfigError, match=r"\[data\] must be the data of the base model"):
        train_run({**cfg(), "data": {**DIGITS8, "size": 16}, "train": {"steps": 1, "threads": 1}}, tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_run({**cfg(), "base": {"model": str(tmp_path / "none.pt")}, "train": {"steps": 1}}, tmp_path / "y.pt")
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "y.pt").exists()
