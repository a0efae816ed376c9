r"""Samplers: plain functions of (model, initial noise, schedule, time grid, generator).

Every sampler walks a descending time grid $t_0 > t_1 > \dots > t_n = 0$ (see
{func}`stepdiff.schedules.time_grid`) and asks the model once or twice per step. The model is
any callable ``model(x, t) -> prediction`` with ``x`` of shape ``[B, ...]`` and ``t`` of shape
``[B]``; ``prediction`` names what it returns (``"x0"``, ``"eps"``, ``"v"``, ``"score"``,
``"velocity"``, see {mod}`stepdiff.parametrize`). An exact denoiser returns ``"x0"``.

Each update is an affine map $x' = c_x x + c_{\rm pred}\,p + c_{\rm noise}z$ whose coefficients
depend only on the grid, so they are computed for all steps up front (one function per family,
``*_coefficients`` below) and applied by {func}`stepdiff.kernels.fused.affine_step`, a single fused
kernel on the GPU. A model that predicts something other than $x_0$ is folded into the same
step: with $\hat x_0 = a\,x + b\,p$, the step becomes $(c_x + c_{x_0}a)\,x + c_{x_0}b\,p + \dots$.

The families:

- the tutorial's own samplers on its VE process: {func}`sample_ddpm_tutorial` (its
  Algorithm 1, Pseudocodes 2 and 7) and {func}`sample_ddim_tutorial` (Algorithm 2,
  Pseudocode 3);
- {func}`sample_ddpm` (ancestral sampling from the true posterior, Ho et al. 2020) and
  {func}`sample_ddim` (Song et al. 2021, any $\eta$), on any schedule;
- ODE solvers for the probability-flow ODE / flow matching, $dx/dt = \dot\alpha\hat x_0 +
  \dot\sigma\hat\varepsilon$: {func}`sample_euler`, {func}`sample_midpoint`, {func}`sample_heun`;
- {func}`sample_dpmpp_2m`, DPM-Solver++(2M) (Lu et al. 2022), and the multistep exponential
  integrators that need fewer steps: {func}`sample_dpmpp_3m` (DPM-Solver++(3M)),
  {func}`sample_unipc` (UniPC, Zhao et al. 2023) and {func}`sample_deis` (DEIS, Zhang & Chen
  2023), with the lower-order rule of {func}`multistep_orders`;
- {func}`sample`: any of them by name, or ``sample(model, x, schedule, nfe=10)``, the default
  solver and grid chosen on the exact-denoiser benchmark.

A caution on parametrizations near pure noise: turning an $\varepsilon$-prediction into
$\hat x_0 = (x_t - \sigma\hat\varepsilon)/\alpha$ divides by $\alpha(t)$, which is tiny at the start
of a variance-preserving schedule (0.0064 for DDPM's linear $\beta$ at $t = 1$, exactly 0 for
the cosine schedule), so any error of the network is amplified by $1/\alpha$ in the first
deterministic steps. Start such samplers a little below $t = 1$, or use a model that predicts
$x_0$, $v$ or the velocity, which stay bounded there.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .kernels import affine_step
from .parametrize import PREDICTIONS, conversion_coefficients, convert
from .schedules import Schedule, _capturing, time_grid

__all__ = [
    "Model",
    "ddim_coefficients",
    "posterior_coefficients",
    "DDPM_VARIANCES",
    "ddpm_coefficients",
    "tutorial_ddpm_coefficients",
    "tutorial_ddim_coefficients",
    "euler_coefficients",
    "sample_ddpm_tutorial",
    "sample_ddim_tutorial",
    "sample_ddpm",
    "sample_ddim",
    "sample_euler",
    "sample_midpoint",
    "sample_heun",
    "sample_dpmpp_2m",
    "exponential_moments",
    "multistep_orders",
    "dpmpp_multistep_coefficients",
    "unipc_coefficients",
    "deis_coefficients",
    "sample_dpmpp_3m",
    "sample_unipc",
    "sample_deis",
    "ddim_inversion",
    "SAMPLERS",
    "DEFAULT_SAMPLER",
    "DEFAULT_SPACING",
    "model_calls",
    "steps_for_nfe",
    "sample",
]

Model = Callable[[Tensor, Tensor], Tensor]
"""A network or denoiser called as ``model(x, t)``: ``x`` is ``[B, ...]``, ``t`` is ``[B]``."""
f64 = torch.float64


# --- step coefficients: one function per family, vectorised over the steps -------------------


def ddim_coefficients(schedule: Schedule, t: Tensor, s: Tensor, eta: float = 0.0):
    r"""DDIM from $t$ to $s < t$ (Song et al. 2021, eq. 12), in terms of $\hat x_0$:

    $$x_s = \alpha_s\hat x_0 + \sqrt{\sigma_s^2 - c^2}\;\hat\varepsilon + c\,z, \qquad
    \hat\varepsilon = \frac{x_t - \alpha_t\hat x_0}{\sigma_t},\qquad
    c^2 = \eta^2\,\frac{\sigma_s^2}{\sigma_t^2}\Big(\sigma_t^2 - \frac{\alpha_t^2}{\alpha_s^2}\sigma_s^2\Big).$$

    $\eta = 0$ is deterministic; $\eta = 1$ makes $c^2$ the variance of the true posterior
    $q(x_s\mid x_t, x_0)$, i.e. DDPM. Returns $(c_x, c_{x_0}, c_{\rm noise})$ with
    $c_x = \sqrt{\sigma_s^2-c^2}/\sigma_t$ and $c_{x_0} = \alpha_s - c_x\alpha_t$.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0; got {eta}")
    a_t, a_s = schedule.alpha(t), schedule.alpha(s)
    s_t, s_s = schedule.sigma(t), schedule.sigma(s)
    c2 = eta**2 * s_s**2 / s_t**2 * (s_t**2 - (a_t / a_s) ** 2 * s_s**2)
    c2 = c2.clamp(min=0.0)
    c_x = torch.sqrt((s_s**2 - c2).clamp(min=0.0)) / s_t
    return c_x, a_s - c_x * a_t, torch.sqrt(c2)


def posterior_coefficients(schedule: Schedule, t: Tensor, s: Tensor):
    r"""The true posterior $q(x_s \mid x_t, x_0)$ of the forward process, $s < t$:

    $$\mathbb E[x_s\mid x_t,x_0] = \frac{\alpha_{t|s}\sigma_s^2}{\sigma_t^2}x_t +
    \frac{\alpha_s\sigma_{t|s}^2}{\sigma_t^2}x_0,\qquad
    \mathrm{Var} = \frac{\sigma_{t|s}^2\sigma_s^2}{\sigma_t^2},$$

    with $\alpha_{t|s} = \alpha_t/\alpha_s$ and $\sigma_{t|s}^2 = \sigma_t^2 - \alpha_{t|s}^2\sigma_s^2$
    (Ho et al. 2020, eqs. 6-7, for any pair of times). Returns $(c_x, c_{x_0}, c_{\rm noise})$.
    """
    a_ts = schedule.alpha(t) / schedule.alpha(s)
    s_t2, s_s2 = schedule.sigma(t) ** 2, schedule.sigma(s) ** 2
    s_ts2 = (s_t2 - a_ts**2 * s_s2).clamp(min=0.0)
    return a_ts * s_s2 / s_t2, schedule.alpha(s) * s_ts2 / s_t2, torch.sqrt(s_ts2 * s_s2 / s_t2)


DDPM_VARIANCES = ("posterior", "forward")
"""The two classic choices of the DDPM step's noise variance (Ho et al. 2020, §3.2): see {func}`ddpm_coefficients`."""


def ddpm_coefficients(schedule: Schedule, t: Tensor, s: Tensor, variance: str = "posterior"):
    r"""The ancestral step from $t$ to $s < t$: the posterior mean, and one of two noise variances.

    The mean is always that of {func}`posterior_coefficients`,
    $\tilde\mu = \frac{\alpha_{t|s}\sigma_s^2}{\sigma_t^2}x_t + \frac{\alpha_s\sigma_{t|s}^2}{\sigma_t^2}\hat x_0$.
    The variance is

    - ``"posterior"``: $\tilde\beta = \sigma_{t|s}^2\sigma_s^2/\sigma_t^2$, the variance of the
      true posterior $q(x_s\mid x_t, x_0)$ (Ho et al.'s $\sigma_t^2 = \tilde\beta_t$): exact
      when the data are one point, $x_0$ deterministic;
    - ``"forward"``: $\beta = \sigma_{t|s}^2 = \sigma_t^2 - \alpha_{t|s}^2\sigma_s^2$, the variance
      of the forward transition $q(x_t\mid x_s)$ (Ho et al.'s $\sigma_t^2 = \beta_t$ between
      consecutive levels): exact when $x_0\sim\mathcal N(0, I)$ on a variance-preserving
      schedule, where $p(x_s\mid x_t) = \mathcal N(\alpha_{t|s}x_t, \beta)$. The step that
      lands on $t = 0$ adds no noise, as in Ho et al.'s Algorithm 2 ($z = 0$ at the last step):
      there $\beta = \sigma_t^2$ would put the whole noise level back on the output.

    Ho et al. call the two the upper and lower bounds on the reverse process entropy, and found
    them about equally good at 1000 steps. $\tilde\beta \le \beta$ always (their ratio is
    $\sigma_s^2/\sigma_t^2$). Returns $(c_x, c_{x_0}, c_{\rm noise})$.
    """
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"unknown DDPM variance {variance!r}; choose one of {DDPM_VARIANCES}")
    c_x, c_x0, c_noise = posterior_coefficients(schedule, t, s)
    if variance == "forward":
        a_ts = schedule.alpha(t) / schedule.alpha(s)
        beta = (schedule.sigma(t) ** 2 - a_ts**2 * schedule.sigma(s) ** 2).clamp(min=0.0)
        c_noise = torch.where(torch.as_tensor(s) > 0, torch.sqrt(beta), torch.zeros_like(beta))
    return c_x, c_x0, c_noise


def _check_ve(schedule: Schedule, ts: Tensor, who: str) -> None:
    if not torch.allclose(schedule.alpha(ts), torch.ones_like(ts)):
        raise ValueError(
            f"{who} implements the tutorial's variance-exploding process (alpha(t) = 1); "
            f"got {schedule!r}. Use sample_ddpm / sample_ddim for other schedules."
        )


def tutorial_ddpm_coefficients(schedule: Schedule, t: Tensor, s: Tensor):
    r"""The tutorial's DDPM step from $t$ to $s = t - \Delta t$ with an $x_0$-predictor (Pseudocode 7):

    $$x_s = \mathbb E[x_s\mid x_t] + \mathcal N(0, \sigma_t^2 - \sigma_s^2), \qquad
    \mathbb E[x_s\mid x_t] = \frac{\sigma_s^2}{\sigma_t^2}x_t + \Big(1 - \frac{\sigma_s^2}{\sigma_t^2}\Big)\hat x_0,$$

    the mean by its Claim 2 (eq. 24: on a uniform grid $\sigma_s^2/\sigma_t^2 = 1 - \Delta t/t$)
    and the variance that of one forward increment, $\sigma_q^2\Delta t$ (Algorithm 1, eq. 15).
    """
    ratio = schedule.sigma(s) ** 2 / schedule.sigma(t) ** 2
    return ratio, 1.0 - ratio, torch.sqrt(schedule.sigma(t) ** 2 - schedule.sigma(s) ** 2)


def tutorial_ddim_coefficients(schedule: Schedule, t: Tensor, s: Tensor):
    r"""The tutorial's DDIM step (Algorithm 2, eq. 33) in terms of $\hat x_0$:

    $$x_s = x_t + \lambda\big(\mathbb E[x_s\mid x_t] - x_t\big),\qquad \lambda = \frac{\sigma_t}{\sigma_s + \sigma_t},$$

    with $\mathbb E[x_s\mid x_t]$ from Claim 2 as in {func}`tutorial_ddpm_coefficients`. It
    simplifies to $x_s = \hat x_0 + \frac{\sigma_s}{\sigma_t}(x_t - \hat x_0)$ exactly.
    """
    lam = schedule.sigma(t) / (schedule.sigma(s) + schedule.sigma(t))
    m_x, m_x0, _ = tutorial_ddpm_coefficients(schedule, t, s)
    return 1.0 - lam + lam * m_x, lam * m_x0, torch.zeros_like(lam)


def euler_coefficients(schedule: Schedule, t: Tensor, s: Tensor):
    r"""One Euler step of the probability-flow ODE $dx/dt = \dot\alpha\hat x_0 + \dot\sigma\hat\varepsilon$:

    $$x_s = x_t + (s - t)\Big(\dot\alpha_t\hat x_0 + \dot\sigma_t\frac{x_t - \alpha_t\hat x_0}{\sigma_t}\Big).$$

    For flow matching's linear path this is $x_s = x_t + (s-t)\,\hat u$ with $\hat u = x_1 - x_0$
    the predicted velocity; for the tutorial's process it is its §3.5 discretisation,
    $x_{t-\Delta t} = x_t + \frac{\Delta t}{2t}(\hat x_0 - x_t)$.
    """
    h = s - t
    ds_over_s = schedule.d_sigma(t) / schedule.sigma(t)
    return 1.0 + h * ds_over_s, h * (schedule.d_alpha(t) - ds_over_s * schedule.alpha(t)), torch.zeros_like(h)


# --- the shared machinery of a sampling run ----------------------------------------------------


def _as_generator(generator: torch.Generator | int | None, device: torch.device) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but x is on {device}")
        return generator
    if isinstance(generator, int):
        return torch.Generator(device=device).manual_seed(generator)
    raise TypeError(f"generator must be a torch.Generator, an int seed or None; got {type(generator).__name__}")


def _check_grid(ts: Tensor | list) -> Tensor:
    ts = torch.as_tensor(ts).to(f64)
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(
            f"the time grid must be 1-D with at least 2 entries (n_steps >= 1); got shape {tuple(ts.shape)}"
        )
    if not _capturing():
        if bool((ts < 0).any()) or bool((ts > 1).any()):
            raise ValueError(f"grid times must lie in [0, 1]; got [{float(ts.min())}, {float(ts.max())}]")
        if bool((ts[1:] >= ts[:-1]).any()):
            raise ValueError("the time grid must be strictly decreasing (from noise to data)")
        if float(ts[-1]) != 0.0:
            raise ValueError(f"the time grid must end at t = 0 (the data); it ends at {float(ts[-1])}")
    return ts


class _Run:
    """What every sampler shares: argument checks, the model call, progress, trajectories."""

    def __init__(self, model, x, schedule, ts, prediction, generator, return_trajectory, progress, who):
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, t); got {type(model).__name__}")
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 1:
            raise TypeError("x must be a floating-point tensor of shape [B, ...]")
        if prediction not in PREDICTIONS and not (prediction == "mean" and "tutorial" in who):
            allowed = PREDICTIONS + (("mean",) if "tutorial" in who else ())
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {allowed}")
        self.model, self.schedule, self.prediction, self.who = model, schedule, prediction, who
        self.ts = _check_grid(ts)
        self.t_model = self.ts.to(device=x.device, dtype=x.dtype)
        self.generator = _as_generator(generator, x.device)
        self.trajectory = [x] if return_trajectory else None
        self.progress = progress
        self.n = self.ts.numel() - 1

    def steps(self):
        if self.progress:
            from tqdm.auto import tqdm

            return tqdm(range(self.n), desc=self.who, leave=False)
        return range(self.n)

    def predict(self, x: Tensor, i: int, t: Tensor | None = None) -> Tensor:
        """The model's prediction at grid time ``ts[i]`` (or at ``t``), checked for shape."""
        t = self.t_model[i] if t is None else t
        out = self.model(x, t.expand(x.shape[0]))
        if not isinstance(out, Tensor) or out.shape != x.shape:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the model returned {shape} for x of shape {tuple(x.shape)}; it must match")
        # The fused step reads flat memory: a channels-last or sliced output is made dense.
        return out.to(x.dtype).contiguous()

    def x0_hat(self, pred: Tensor, x: Tensor, i: int) -> Tensor:
        """$\\hat x_0$ from the model's prediction at step ``i``."""
        if self.prediction == "x0":
            return pred
        return convert(pred, x, self.ts[i].to(x.device), self.schedule, self.prediction, "x0")

    def table(self, c: Tensor, x: Tensor) -> Tensor:
        return c.to(device=x.device, dtype=torch.float32 if x.dtype != f64 else f64)

    def fold(self, c_x: Tensor, c_x0: Tensor) -> tuple[Tensor, Tensor]:
        """Rewrite coefficients of $(x, \\hat x_0)$ as coefficients of $(x, p)$ for the model's $p$."""
        if self.prediction in ("x0", "mean"):
            return c_x, c_x0
        a, b = conversion_coefficients(self.schedule, self.ts[:-1], self.prediction, "x0")
        return c_x + c_x0 * a, c_x0 * b

    def step(self, x, pred, i, c_x, c_pred, c_noise=None, clamp=None):
        noise = None if c_noise is None else c_noise[i]
        x = affine_step(x, pred, c_x[i], c_pred[i], noise, generator=self.generator, clamp=clamp)
        if self.trajectory is not None:
            self.trajectory.append(x)
        return x

    def result(self, x: Tensor) -> Tensor:
        return torch.stack(self.trajectory) if self.trajectory is not None else x


def _affine_sampler(run: _Run, x: Tensor, coefficients, clip_x0: float | None, noisy: bool) -> Tensor:
    """The loop of every one-evaluation-per-step sampler: predict, then one affine step."""
    c_x, c_x0, c_noise = coefficients
    c_pred = c_x0
    if clip_x0 is None:
        # Fold the model's parametrization into the step, so each step is one fused update;
        # clipping acts on x0 itself, so then the prediction is converted instead.
        c_x, c_pred = run.fold(c_x, c_x0)
    c_x, c_pred, c_noise = (run.table(c, x) for c in (c_x, c_pred, c_noise))
    for i in run.steps():
        pred = run.predict(x, i)
        if clip_x0 is not None:
            pred = run.x0_hat(pred, x, i)
        x = run.step(x, pred, i, c_x, c_pred, c_noise if noisy else None, clamp=clip_x0)
    return run.result(x)


# --- the samplers ------------------------------------------------------------------------------


def sample_ddpm_tutorial(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    prediction: str = "x0",
    generator: torch.Generator | int | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
) -> Tensor:
    r"""The tutorial's stochastic sampler (Algorithm 1; Pseudocode 2, and 7 for $x_0$-prediction).

    From $x_1 \sim \mathcal N(0,\sigma_q^2)$, for $t = 1, 1-\Delta t, \dots, \Delta t$:
    $\hat x_{t-\Delta t} \leftarrow \mu_{t-\Delta t}(x_t) + \mathcal N(0, \sigma_q^2\Delta t)$.
    With ``prediction="mean"`` the model is the tutorial's $f_\theta(x, t) \approx
    \mathbb E[x_{t-\Delta t}\mid x_t]$ (Pseudocode 2); otherwise $\mu$ comes from Claim 2 and the
    model's $\hat x_0$ (Pseudocode 7). As printed, noise is added at the last step too, so
    the output carries noise of variance $\sigma_q^2\Delta t$.
    """
    run = _Run(model, x, schedule, ts, prediction, generator, return_trajectory, progress, "ddpm_tutorial")
    _check_ve(schedule, run.ts, "sample_ddpm_tutorial")
    t, s = run.ts[:-1], run.ts[1:]
    c_x, c_x0, c_noise = tutorial_ddpm_coefficients(schedule, t, s)
    if prediction == "mean":
        c_x, c_x0 = torch.zeros_like(c_x), torch.ones_like(c_x0)
    return _affine_sampler(run, x, (c_x, c_x0, c_noise), None, noisy=True)


def sample_ddim_tutorial(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    prediction: str = "x0",
    return_trajectory: bool = False,
    progress: bool = False,
) -> Tensor:
    r"""The tutorial's deterministic sampler (Algorithm 2, Pseudocode 3).

    For $t = 1, 1 - \Delta t, \dots, \Delta t$ (the printed loop's extra $t = 0$ is dropped: its
    $\sqrt{t-\Delta t}$ is undefined): $\lambda \leftarrow \sigma_t/(\sigma_{t-\Delta t} + \sigma_t)$,
    $x_{t-\Delta t} \leftarrow x_t + \lambda(\mu_{t-\Delta t}(x_t) - x_t)$. With
    ``prediction="mean"`` the model returns $\mu$ directly (Pseudocode 3's $f_\theta$).
    """
    run = _Run(model, x, schedule, ts, prediction, None, return_trajectory, progress, "ddim_tutorial")
    _check_ve(schedule, run.ts, "sample_ddim_tutorial")
    t, s = run.ts[:-1], run.ts[1:]
    coefficients = tutorial_ddim_coefficients(schedule, t, s)
    if prediction == "mean":
        lam = schedule.sigma(t) / (schedule.sigma(s) + schedule.sigma(t))
        coefficients = (1.0 - lam, lam, torch.zeros_like(lam))
    return _affine_sampler(run, x, coefficients, None, noisy=False)


def sample_ddpm(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    prediction: str = "x0",
    variance: str = "posterior",
    generator: torch.Generator | int | None = None,
    clip_x0: float | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
) -> Tensor:
    r"""Ancestral sampling (Ho et al. 2020, Algorithm 2): $x_s \sim q(x_s\mid x_t, x_0 = \hat x_0)$.

    The step uses the true posterior of {func}`posterior_coefficients`; on a
    {class}`~stepdiff.schedules.DiscreteVPSchedule` with consecutive levels this is Ho et al.'s
    eq. 11 with the posterior variance $\tilde\beta_t$. It equals DDIM with $\eta = 1$.
    ``variance="forward"`` keeps the mean and takes Ho et al.'s other choice, $\beta_t$, the
    variance of the forward step ({func}`ddpm_coefficients`).
    ``clip_x0`` clamps $\hat x_0$ to $[-c, c]$ (the ``clip_sample`` of diffusers).
    """
    run = _Run(model, x, schedule, ts, prediction, generator, return_trajectory, progress, "ddpm")
    coefficients = ddpm_coefficients(schedule, run.ts[:-1], run.ts[1:], variance)
    return _affine_sampler(run, x, coefficients, clip_x0, noisy=True)


def sample_ddim(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    eta: float = 0.0,
    prediction: str = "x0",
    generator: torch.Generator | int | None = None,
    clip_x0: float | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
) -> Tensor:
    r"""DDIM (Song et al. 2021, eq. 12) with stochasticity $\eta$; see {func}`ddim_coefficients`.

    $\eta = 0$: deterministic, the first-order exponential integrator of the probability-flow
    ODE (on the tutorial's process, exactly its Algorithm 2). $\eta = 1$: DDPM.
    """
    run = _Run(model, x, schedule, ts, prediction, generator, return_trajectory, progress, "ddim")
    coefficients = ddim_coefficients(schedule, run.ts[:-1], run.ts[1:], eta)
    return _affine_sampler(run, x, coefficients, clip_x0, noisy=eta > 0)


def sample_euler(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    prediction: str = "x0",
    return_trajectory: bool = False,
    progress: bool = False,
) -> Tensor:
    r"""Euler's method on the probability-flow ODE / flow-matching ODE (see {func}`euler_coefficients`).

    For flow matching, use {class}`~stepdiff.schedules.FlowMatchingSchedule` and
    ``prediction="velocity"``: $x_{t_{i+1}} = x_{t_i} + (t_{i+1} - t_i)\,f_\theta(x_{t_i}, t_i)$,
    the tutorial's Pseudocode 5 with its sign convention turned round ($dx/dt = -v$ there).
    """
    run = _Run(model, x, schedule, ts, prediction, None, return_trajectory, progress, "euler")
    coefficients = euler_coefficients(schedule, run.ts[:-1], run.ts[1:])
    return _affine_sampler(run, x, coefficients, None, noisy=False)


def _velocity(run: _Run, pred: Tensor, x: Tensor, t: Tensor) -> Tensor:
    """$dx/dt$ at time ``t`` (a float64 scalar tensor) from the model's prediction."""
    if run.prediction == "velocity":
        return pred
    return convert(pred, x, t.to(x.device), run.schedule, run.prediction, "velocity")


def sample_midpoint(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    prediction: str = "x0",
    return_trajectory: bool = False,
    progress: bool = False,
) -> Tensor:
    r"""The explicit midpoint method (second order, two model calls per step):

    $x_m = x_t + \tfrac h2\,u(x_t, t)$, then $x_s = x_t + h\,u(x_m, t + \tfrac h2)$ with $h = s - t$
    and $u = dx/dt$ the velocity.
    """
    run = _Run(model, x, schedule, ts, prediction, None, return_trajectory, progress, "midpoint")
    for i in run.steps():
        t, s = run.ts[i], run.ts[i + 1]
        h = float(s - t)
        u = _velocity(run, run.predict(x, i), x, t)
        x_mid = affine_step(x, u, 1.0, h / 2)
        t_mid = t + h / 2
        u_mid = _velocity(run, run.predict(x_mid, i, t_mid.to(device=x.device, dtype=x.dtype)), x_mid, t_mid)
        x = run.step(x, u_mid, i, torch.ones(run.n), torch.full((run.n,), h))
    return run.result(x)


def sample_heun(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    prediction: str = "x0",
    return_trajectory: bool = False,
    progress: bool = False,
) -> Tensor:
    r"""Heun's method (Karras et al. 2022, Algorithm 1 without churn): second order.

    $\tilde x = x_t + h\,u(x_t, t)$, then $x_s = x_t + \tfrac h2\big(u(x_t, t) + u(\tilde x, s)\big)$;
    the last step, which ends at $t = 0$ where the velocity is singular, stays an Euler step.
    Costs $2n - 1$ model calls.
    """
    run = _Run(model, x, schedule, ts, prediction, None, return_trajectory, progress, "heun")
    ones = torch.ones(run.n)
    hs = run.ts[1:] - run.ts[:-1]
    for i in run.steps():
        t, s = run.ts[i], run.ts[i + 1]
        u = _velocity(run, run.predict(x, i), x, t)
        if i == run.n - 1:
            x = run.step(x, u, i, ones, hs)
            continue
        x_euler = affine_step(x, u, 1.0, float(hs[i]))
        u_next = _velocity(run, run.predict(x_euler, i + 1), x_euler, s)
        x = run.step(x, 0.5 * (u + u_next), i, ones, hs)
    return run.result(x)


def sample_dpmpp_2m(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    prediction: str = "x0",
    lower_order_final: bool = False,
    return_trajectory: bool = False,
    progress: bool = False,
) -> Tensor:
    r"""DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), multistep second order in $\lambda/2 = \log(\alpha/\sigma)$.

    Here $\lambda = \log(\alpha^2/\sigma^2)$ is the log-SNR (``schedule.log_snr``), as in the book;
    Lu et al. write $\lambda$ for its half. With $h_i = \tfrac12(\lambda_{t_{i+1}} - \lambda_{t_i})$ and
    $r_i = h_{i-1}/h_i$:
    $$x_{t_{i+1}} = \frac{\sigma_{t_{i+1}}}{\sigma_{t_i}}x_{t_i} + \alpha_{t_{i+1}}\big(1 - e^{-h_i}\big)D_i,
    \qquad D_i = \Big(1 + \frac1{2r_i}\Big)\hat x_0^{(i)} - \frac1{2r_i}\hat x_0^{(i-1)},$$
    with $D_i = \hat x_0^{(i)}$ at the first step and at the last (which lands on $x_0 = D$).
    ``lower_order_final=True`` also takes $D_i = \hat x_0^{(i)}$ (a DDIM step) where the step
    is more than twice as long as the one before ($r_i < 1/2$, see {func}`multistep_orders`);
    the default keeps the published rule.
    """
    run = _Run(model, x, schedule, ts, prediction, None, return_trajectory, progress, "dpmpp_2m")
    t, s = run.ts[:-1], run.ts[1:]
    # e^{-h} = sigma_ve(s) / sigma_ve(t), which is 0 (not NaN) at s = 0.
    exp_neg_h = schedule.sigma_ve(s) / schedule.sigma_ve(t)
    c_x = schedule.sigma(s) / schedule.sigma(t)
    c_d = schedule.alpha(s) * (1.0 - exp_neg_h)
    h = schedule.log_snr(s) / 2 - schedule.log_snr(t) / 2
    c_x, c_d = run.table(c_x, x), run.table(c_d, x)
    r = (h[:-1] / h[1:]).tolist()
    first_order = [q == 1 for q in multistep_orders(h, 2)] if lower_order_final else [False] * run.n
    x0_prev = None
    for i in run.steps():
        x0_hat = run.x0_hat(run.predict(x, i), x, i)
        if x0_prev is None or i == run.n - 1 or first_order[i]:
            d = x0_hat
        else:
            d = x0_hat + (x0_hat - x0_prev) / (2 * r[i - 1])
        x = run.step(x, d, i, c_x, c_d)
        x0_prev = x0_hat
    return run.result(x)


# --- multistep exponential integrators: DPM-Solver++(3M), UniPC, DEIS ----------------------------
#
# All three integrate the probability-flow ODE written in a variable where its linear part is
# exact, and replace the model's output over a step by the polynomial through the last few
# outputs. In $\lambda = \log(\alpha/\sigma)$ (half the log-SNR) with data prediction
# (Lu et al. 2022b, DPM-Solver++), the exact step from $t$ to $s$, $h = \lambda_s - \lambda_t$, is
#
# $$x_s = \frac{\sigma_s}{\sigma_t}x_t + \alpha_s\int_0^h e^{\tau - h}\,\hat x_0(\lambda_t + \tau)\,d\tau,$$
#
# so a polynomial $\hat x_0(\lambda_t + \tau) \approx \sum_k D_k(\tau/h)^k$ integrates exactly
# against the moments $I_k(h) = \int_0^h e^{\tau-h}(\tau/h)^k d\tau$ ({func}`exponential_moments`).


def exponential_moments(h: float, k: int) -> list[float]:
    r"""$I_j(h) = \int_0^h e^{\tau - h}(\tau/h)^j\,d\tau = j!\,h\,\varphi_{j+1}(-h)$ for $j = 0, \dots, k-1$.

    $I_0 = 1 - e^{-h}$ and, by parts, $I_j = 1 - \frac jh I_{j-1}$. For $h < 1$ the recursion
    cancels digits, so the series $I_j = h\,j!\sum_{n \ge 0}(-h)^n/(n+j+1)!$ is summed instead
    (40 terms: below $10^{-40}$ relative). At $h = \infty$ (a step to $t = 0$) every $I_j = 1$.
    """
    if not h > 0:
        raise ValueError(f"h must be positive; got {h}")
    if h < 1.0:
        return [h * sum((-h) ** n * math.factorial(j) / math.factorial(n + j + 1) for n in range(40)) for j in range(k)]
    moments = [-math.expm1(-h)]
    for j in range(1, k):
        moments.append(1.0 - j / h * moments[-1])
    return moments


def _integration_weights(nodes: list[float], moments: list[float]) -> list[float]:
    r"""Weights $w$ of $\sum_j w_j m_j$, the integral of the polynomial through $(r_j, m_j)$.

    With $P(r) = \sum_j L_j(r)\,m_j$ (Lagrange basis on the nodes) and moments
    $I_k = \int r^k\,d\mu$, the integral is $\sum_j w_j m_j$ where $w$ solves the transposed
    Vandermonde system $\sum_j w_j r_j^k = I_k$, $k = 0, \dots, q-1$.
    """
    q = len(nodes)
    vandermonde = torch.tensor([[r**k for k in range(q)] for r in nodes], dtype=f64)
    return torch.linalg.solve(vandermonde.T, torch.tensor(moments[:q], dtype=f64)).tolist()


def _check_order(order: int, who: str, allowed: tuple[int, ...]) -> None:
    if isinstance(order, bool) or not isinstance(order, int) or order not in allowed:
        raise ValueError(f"{who}: order must be one of {allowed}; got {order!r}")


def multistep_orders(
    h: Tensor, order: int, lower_order_final: bool = True, min_ratio: float = 0.5, max_h: float = 1.0
) -> list[int]:
    r"""The order of each step of a multistep solver whose steps have sizes ``h``.

    Step $i$ of order $q$ uses the outputs stored at the $q$ grid times up to $t_i$. It can use
    at most $i + 1$ (the warm-up) and only behind steps of finite size (a step from
    $\alpha = 0$ has $h = \infty$ in $\lambda$); a step of infinite size, the step to $t = 0$
    in $\lambda$, is first order: it lands on $\hat x_0$ itself.

    With ``lower_order_final`` (the name of the DPM-Solver++ option whose purpose this serves,
    a rule of its own) two more conditions keep the multistep correction from doing harm where
    it extrapolates too far:

    - order $q \ge 2$ needs each of the $q - 1$ steps it reaches back over to be at least
      ``min_ratio`` times as long as the new one, $h_{i-j} \ge r_{\min}h_i$. The correction
      extrapolates the last outputs over the new step; the second-order one multiplies their
      difference by $1/(2r)$, $r = h_{i-1}/h_i$, so a step much longer than the one behind it
      (the step to the first training level on the ``"linspace"`` grid has $r \approx 0.21$
      at 10 steps) amplifies their error, and a DDIM step is safer;
    - order $q \ge 3$ needs $h_i \le$ ``max_h``: a parabola through outputs one $h$ apart is
      trusted over at most $h = 1$ in $\lambda = \log(\alpha/\sigma)$, a factor $e$ in noise
      level, about the range over which a denoiser's output turns from one scale of the data
      to the next (a component's posterior, a mode's weight). Second-order steps weight the
      difference by $1/(2r)$ at any $h$ (they extrapolate to the middle of the step, not its end),
      and are kept.

    Both bounds were chosen on the exact-denoiser benchmark (``benchmarks/bench_samplers.py``):
    with them no multistep solver there is worse than DDIM on the same grid at 5 or 10 calls;
    without the second, DPM-Solver++(3M) was worse on the log-SNR grid at 5 calls and on the
    Karras grid at 10 (also with ``max_h`` = 1.5). Steps in $\rho$ (DEIS) pass ``max_h=inf``.
    """
    h = [float(v) for v in h]
    orders = []
    for i, h_i in enumerate(h):
        q = 1 if not math.isfinite(h_i) else min(order, i + 1)
        while q > 1 and not all(math.isfinite(h[i - j]) for j in range(1, q)):
            q -= 1
        if lower_order_final:
            while q > 1 and min(h[i - j] for j in range(1, q)) < min_ratio * h_i:
                q -= 1
            if q > 2 and h_i > max_h:
                q = 2
        orders.append(q)
    return orders


def _combine(outputs: list[Tensor], weights: list[float]) -> Tensor:
    """$\\sum_j w_j\\,m_j$ for stored outputs ``outputs[j]`` (newest first); one weight is a copy-free pass."""
    if len(weights) == 1 and weights[0] == 1.0:
        return outputs[0]
    out = outputs[0] * weights[0]
    for m, w in zip(outputs[1:], weights[1:]):
        out.add_(m, alpha=w)
    return out


def _half_log_snr_steps(schedule: Schedule, ts: Tensor) -> tuple[Tensor, Tensor]:
    r"""$\lambda = \log(\alpha/\sigma)$ on the grid and the steps $h_i = \lambda_{i+1} - \lambda_i$.

    $h = \infty$ for the step to $t = 0$ and for a step from $\alpha = 0$.
    """
    lam = schedule.log_snr(ts) / 2
    return lam, lam[1:] - lam[:-1]


def _exponential_step(schedule: Schedule, ts: Tensor) -> tuple[Tensor, Tensor]:
    r"""$c_x = \sigma_s/\sigma_t$ and $c_D = \alpha_s(1 - e^{-h})$ of every step: $x_s = c_x x_t + c_D D$."""
    t, s = ts[:-1], ts[1:]
    # e^{-h} = sigma_ve(s) / sigma_ve(t): 0 (not NaN) at s = 0 and when alpha(t) = 0.
    exp_neg_h = schedule.sigma_ve(s) / schedule.sigma_ve(t)
    return schedule.sigma(s) / schedule.sigma(t), schedule.alpha(s) * (1.0 - exp_neg_h)


def dpmpp_multistep_coefficients(schedule: Schedule, ts: Tensor, order: int = 3, lower_order_final: bool = True):
    r"""DPM-Solver++($k$M) (Lu et al. 2022b): every step as $x_{i+1} = c_x x_i + c_D\sum_j w_{ij}\hat x_0^{(i-j)}$.

    With $h = \lambda_{i+1} - \lambda_i$, $r_0 = h_{i-1}/h$, $r_1 = h_{i-2}/h$ and the stored
    predictions $m_j = \hat x_0^{(i-j)}$, the third-order step is

    $$x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}x_i + \alpha_{i+1}\big(I_0D_0 + I_1D_1 + I_2D_2\big),
    \quad D_0 = m_0,\ D_1 = D_{1,0} + \frac{r_0}{r_0 + r_1}(D_{1,0} - D_{1,1}),\
    D_2 = \frac{D_{1,0} - D_{1,1}}{r_0 + r_1},$$

    $D_{1,0} = (m_0 - m_1)/r_0$, $D_{1,1} = (m_1 - m_2)/r_1$: $D_0 + D_1(\tau/h) + D_2(\tau/h)^2$
    is the parabola through the three predictions, and $I_0 = 1 - e^{-h}$, $I_1 = 1 - I_0/h$,
    $I_2 = 1 - 2I_1/h$ its exact integrals ({func}`exponential_moments`). The second-order
    step is DPM-Solver++(2M)'s, $I_0(D_0 + D_{1,0}/2)$ (as in the reference implementations:
    $I_1 \approx I_0/2$ is enough for order 2, and extrapolates only to the middle of a long
    step), and the first-order step is $I_0D_0$ (DDIM). Note the reference implementations
    (DPM-Solver's ``multistep_dpm_solver_third_update``, diffusers'
    ``multistep_dpm_solver_third_order_update``) weight $D_2$ by $I_2/2$, which leaves the
    method of order 2 (measured in ``tests/test_samplers.py``); $I_2$ makes it order 3.

    The orders come from {func}`multistep_orders`. Returns ``(c_x, c_d, weights, orders)``:
    ``c_x``, ``c_d`` of shape ``[n]`` and ``weights[i]`` the $w_{ij}$, summing to 1.
    """
    _check_order(order, "dpmpp_multistep_coefficients", (1, 2, 3))
    lam, h = _half_log_snr_steps(schedule, ts)
    orders = multistep_orders(h, order, lower_order_final)
    weights = []
    for i, q in enumerate(orders):
        if q == 1:
            weights.append([1.0])
            continue
        if q == 2:  # the second-order step of DPM-Solver++(2M): D = m_0 + (m_0 - m_1) / (2 r_0)
            half_over_r = float(h[i] / h[i - 1]) / 2
            weights.append([1.0 + half_over_r, -half_over_r])
            continue
        moments = exponential_moments(float(h[i]), q)
        nodes = [float((lam[i - j] - lam[i]) / h[i]) for j in range(q)]  # 0, -r_0, -(r_0 + r_1)
        weights.append([w / moments[0] for w in _integration_weights(nodes, moments)])
    c_x, c_d = _exponential_step(schedule, ts)
    return c_x, c_d, weights, orders


def _multistep_loop(run: _Run, x: Tensor, c_x: Tensor, c_d: Tensor, weights: list[list[float]], stored) -> Tensor:
    """Predict, store, combine the stored outputs with the step's weights, one affine step."""
    c_x, c_d = run.table(c_x, x), run.table(c_d, x)
    history: list[Tensor] = []
    depth = max(len(w) for w in weights)
    for i in run.steps():
        history = [stored(run.predict(x, i), x, i), *history][:depth]
        x = run.step(x, _combine(history, weights[i]), i, c_x, c_d)
    return run.result(x)


def sample_dpmpp_3m(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    prediction: str = "x0",
    lower_order_final: bool = True,
    return_trajectory: bool = False,
    progress: bool = False,
) -> Tensor:
    r"""DPM-Solver++(3M) (Lu et al. 2022b, multistep, third order, data prediction): one model call per step.

    Each step integrates the parabola through the last three $\hat x_0$ exactly in
    $\lambda = \log(\alpha/\sigma)$; see {func}`dpmpp_multistep_coefficients` for the update.
    The first two steps warm up at orders 1 and 2, the step to $t = 0$ is first order, and
    ``lower_order_final`` lowers the order of a step much longer than those before it
    ({func}`multistep_orders`).
    """
    run = _Run(model, x, schedule, ts, prediction, None, return_trajectory, progress, "dpmpp_3m")
    c_x, c_d, weights, _ = dpmpp_multistep_coefficients(schedule, run.ts, 3, lower_order_final)
    return _multistep_loop(run, x, c_x, c_d, weights, lambda p, x_, i: run.x0_hat(p, x_, i))


UNIPC_VARIANTS = ("bh1", "bh2")


def unipc_coefficients(
    schedule: Schedule, ts: Tensor, order: int = 2, variant: str = "bh2", lower_order_final: bool = True
):
    r"""UniPC (Zhao et al. 2023), data prediction: the predictor UniP-$p$ and the corrector UniC.

    With $h = \lambda_t - \lambda_s$, stored predictions $m_0$ (at $s$) and $m_k$ at
    $\lambda_{s_k}$, $r_k = (\lambda_{s_k} - \lambda_s)/h$ and $D_k = m_k - m_0$, the predictor is

    $$\tilde x_t = \frac{\sigma_t}{\sigma_s}x_s + \alpha_t(1 - e^{-h})\,m_0
    + \alpha_t B(h)\sum_{k=1}^{p-1} a_k\frac{D_k}{r_k},$$

    and the corrector, once the model has been called at $\tilde x_t$ (giving $m_t$, node
    $r_p = 1$), replaces $\tilde x_t$ by the same formula with the sum running to $p$ and
    $D_p = m_t - m_0$. The $a_k$ solve $\sum_k a_k r_k^{j-1} = I_j(h)/B(h)$, $j = 1, \dots$
    ({func}`exponential_moments`), which makes UniP-$p$ of order $p$ and UniC of order
    $p + 1$; with one unknown the paper's $a_1 = 1/2$ is used, where the choice of
    $B(h)$ matters: ``"bh1"`` $B(h) = h$, ``"bh2"`` $B(h) = e^h - 1$ (written for
    $\lambda$ increasing as $1 - e^{-h}$). With ``"bh2"`` the second-order predictor is
    DPM-Solver++(2M).

    Returns ``(c_x, c_d, predictor, corrector, orders)``: step $i$ is
    $x_{i+1} = c_x x_i + c_D\sum_j w_{ij}m_j$ with ``predictor[i]`` the $w_{ij}$ over
    $(m_i, m_{i-1}, \dots)$; ``corrector[i]`` (``None`` where it is not applied) the
    weights over $(m_{i+1}, m_i, m_{i-1}, \dots)$ of the corrected $x_{i+1}$.
    """
    _check_order(order, "unipc", (1, 2, 3))
    if variant not in UNIPC_VARIANTS:
        raise ValueError(f"unknown UniPC variant {variant!r}; choose one of {UNIPC_VARIANTS}")
    lam, h = _half_log_snr_steps(schedule, ts)
    orders = multistep_orders(h, order, lower_order_final)
    predictor, corrector = [], []
    for i, p in enumerate(orders):
        h_i = float(h[i])
        history = [float((lam[i - k] - lam[i]) / h[i]) for k in range(1, p)]
        predictor.append(_unipc_weights(history, h_i, variant))
        last = i == len(orders) - 1
        if last or not math.isfinite(h_i):
            corrector.append(None)
        else:
            w_0, w_new, *w_history = _unipc_weights([1.0, *history], h_i, variant)
            corrector.append([w_new, w_0, *w_history])
    c_x, c_d = _exponential_step(schedule, ts)
    return c_x, c_d, predictor, corrector, orders


def _unipc_weights(nodes: list[float], h: float, variant: str) -> list[float]:
    r"""Weights over $(m_0, m_1, \dots)$ of $m_0 + \frac{B(h)}{I_0}\sum_k a_k D_k/r_k$, $r_k$ = ``nodes``.

    See {func}`unipc_coefficients`; the result sums to 1.
    """
    if not nodes:
        return [1.0]
    moments = exponential_moments(h, len(nodes) + 1)
    b_h = h if variant == "bh1" else moments[0]
    if len(nodes) == 1:
        a = [0.5]
    else:
        rows = torch.tensor([[r**j for r in nodes] for j in range(len(nodes))], dtype=f64)
        a = torch.linalg.solve(rows, torch.tensor(moments[1:], dtype=f64) / b_h).tolist()
    scaled = [b_h / moments[0] * a_k / r_k for a_k, r_k in zip(a, nodes)]
    return [1.0 - sum(scaled), *scaled]


def sample_unipc(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    order: int = 2,
    variant: str = "bh2",
    corrector: bool = True,
    prediction: str = "x0",
    lower_order_final: bool = True,
    return_trajectory: bool = False,
    progress: bool = False,
) -> Tensor:
    r"""UniPC (Zhao et al. 2023): the predictor UniP-``order`` and the corrector UniC, one model call per step.

    At each grid time the model is called once, at the predicted $\tilde x_{t_i}$. That output
    first corrects the point (UniC: $x_{t_i}$ recomputed from $x_{t_{i-1}}$ with the new
    output as one more node, raising the order by one), then drives the next predictor step
    from the corrected point, so the corrector costs no extra call; the final step, to
    $t = 0$, is not corrected (nothing is evaluated after it). Orders: UniP-$p$ is order $p$
    and UniPC order $p + 1$ (``corrector=False`` gives UniP alone). See
    {func}`unipc_coefficients` for the update and ``variant`` ($B(h)$).
    """
    run = _Run(model, x, schedule, ts, prediction, None, return_trajectory, progress, "unipc")
    c_x, c_d, predictor, correctors, _ = unipc_coefficients(schedule, run.ts, order, variant, lower_order_final)
    c_x, c_d = run.table(c_x, x), run.table(c_d, x)
    history: list[Tensor] = []
    x_prev = x
    for i in run.steps():
        m = run.x0_hat(run.predict(x, i), x, i)
        if corrector and i > 0 and correctors[i - 1] is not None:
            x = affine_step(x_prev, _combine([m, *history], correctors[i - 1]), c_x[i - 1], c_d[i - 1])
            if run.trajectory is not None:
                run.trajectory[-1] = x
        history = [m, *history][:order]
        x_prev = x
        x = run.step(x, _combine(history, predictor[i]), i, c_x, c_d)
    return run.result(x)


def deis_coefficients(schedule: Schedule, ts: Tensor, order: int = 3, lower_order_final: bool = True):
    r"""$\rho$AB-DEIS (Zhang & Chen 2023): Adams-Bashforth on $\hat\varepsilon$ in $\rho = \sigma/\alpha$.

    In $y = x/\alpha$ the probability-flow ODE is $dy/d\rho = \hat\varepsilon(y, \rho)$, with no
    linear part. DEIS replaces $\hat\varepsilon$ over the step $[\rho_i, \rho_{i+1}]$ by the
    polynomial in $\rho$ through the last $q$ outputs and integrates it exactly:

    $$x_{i+1} = \frac{\alpha_{i+1}}{\alpha_i}x_i + \alpha_{i+1}\sum_{j<q} C_{ij}\,\hat\varepsilon^{(i-j)},
    \qquad C_{ij} = \int_{\rho_i}^{\rho_{i+1}}\prod_{k \ne j}\frac{\rho - \rho_{i-k}}{\rho_{i-j} - \rho_{i-k}}\,d\rho.$$

    $q = 1$ is DDIM. Unlike $\lambda$, $\rho$ stays finite at $t = 0$, so the last step can keep
    its order. Returns ``(c_x, c_e, weights, orders)``: $x_{i+1} = c_x x_i + c_e\sum_j w_{ij}
    \hat\varepsilon^{(i-j)}$ with $c_e = \alpha_{i+1}(\rho_{i+1} - \rho_i)$ and the $w_{ij} =
    C_{ij}/(\rho_{i+1} - \rho_i)$ summing to 1.
    """
    _check_order(order, "deis", (1, 2, 3))
    rho = schedule.sigma_ve(ts)
    if not math.isfinite(float(rho[0])):
        raise ValueError(
            f"DEIS steps in rho = sigma/alpha, which is infinite at t = {float(ts[0])} for {schedule!r}; "
            "start the grid a little below (t_max < 1)"
        )
    d_rho = rho[1:] - rho[:-1]
    orders = multistep_orders(-d_rho, order, lower_order_final, max_h=math.inf)
    weights = []
    for i, q in enumerate(orders):
        nodes = [float((rho[i - j] - rho[i]) / d_rho[i]) for j in range(q)]
        weights.append(_integration_weights(nodes, [1.0 / (k + 1) for k in range(q)]))
    alpha = schedule.alpha(ts)
    return alpha[1:] / alpha[:-1], alpha[1:] * d_rho, weights, orders


def sample_deis(
    model: Model,
    x: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    order: int = 3,
    prediction: str = "x0",
    lower_order_final: bool = True,
    return_trajectory: bool = False,
    progress: bool = False,
) -> Tensor:
    r"""DEIS (Zhang & Chen 2023), $\rho$AB-DEIS of order ``order``: one model call per step.

    The exponential integrator of the probability-flow ODE with $\hat\varepsilon$
    extrapolated by a polynomial in $\rho = \sigma/\alpha$ (see {func}`deis_coefficients`).
    Warm-up and ``lower_order_final`` as in {func}`multistep_orders`.
    """
    run = _Run(model, x, schedule, ts, prediction, None, return_trajectory, progress, "deis")
    c_x, c_e, weights, _ = deis_coefficients(schedule, run.ts, order, lower_order_final)

    def eps(pred: Tensor, x_: Tensor, i: int) -> Tensor:
        if run.prediction == "eps":
            return pred
        return convert(pred, x_, run.ts[i].to(x_.device), schedule, run.prediction, "eps")

    return _multistep_loop(run, x, c_x, c_e, weights, eps)


def ddim_inversion(
    model: Model,
    x0: Tensor,
    schedule: Schedule,
    ts: Tensor,
    *,
    prediction: str = "x0",
    return_trajectory: bool = False,
    progress: bool = False,
) -> Tensor:
    r"""Run deterministic DDIM backwards: from data at $t=0$ up the grid ``ts`` (given descending).

    Each step $t \to s > t$ uses $x_s = \alpha_s\hat x_0 + \sigma_s\hat\varepsilon$ with the prediction
    made at $(x_t, t)$; the first step, from $t = 0$ where nothing can be predicted, uses the
    prediction at the first positive time. Then ``sample_ddim(model, ddim_inversion(...), ...)``
    returns to ``x0`` up to discretisation error.
    """
    ts = _check_grid(ts)
    up = torch.flip(ts, [0])
    run = _Run(model, x0, schedule, ts, prediction, None, return_trajectory, progress, "ddim_inversion")
    x = x0
    for i in run.steps():
        t_pred = up[max(i, 1)]
        t_next = up[i + 1]
        t_model = t_pred.to(device=x.device, dtype=x.dtype)
        x0_hat = run.model(x, t_model.expand(x.shape[0])).to(x.dtype)
        if x0_hat.shape != x.shape:
            raise ValueError(f"the model returned {tuple(x0_hat.shape)} for x of shape {tuple(x.shape)}")
        if prediction != "x0":
            x0_hat = convert(x0_hat, x, t_pred, schedule, prediction, "x0")
        eps_hat = convert(x0_hat, x, t_pred, schedule, "x0", "eps")
        a, s = float(schedule.alpha(t_next)), float(schedule.sigma(t_next))
        x = affine_step(x0_hat, eps_hat, a, s)
        if run.trajectory is not None:
            run.trajectory.append(x)
    return run.result(x)


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm_tutorial": sample_ddpm_tutorial,
    "ddim_tutorial": sample_ddim_tutorial,
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "midpoint": sample_midpoint,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "unipc": sample_unipc,
    "deis": sample_deis,
}


DEFAULT_SAMPLER = "unipc"
"""The sampler {func}`sample` runs when given no name (see its docstring for the measurements)."""
DEFAULT_SPACING = "cosine"
"""The grid {func}`sample` builds when given ``nfe`` instead of a grid."""


def model_calls(name: str, n_steps: int) -> int:
    """The number of model evaluations the sampler ``name`` makes on a grid of ``n_steps`` steps.

    Heun makes two per step except the last (an Euler step), $2n - 1$; midpoint two per step,
    $2n$; every other sampler one per step (UniPC's corrector reuses the next step's call).
    """
    _sampler(name)
    if name == "heun":
        return 2 * n_steps - 1
    return 2 * n_steps if name == "midpoint" else n_steps


def steps_for_nfe(name: str, nfe: int) -> int:
    r"""The largest number of steps $n$ of sampler ``name`` whose {func}`model_calls` is at most ``nfe``:
    $n = \lfloor(\mathrm{nfe} + 1)/2\rfloor$ for Heun, $\lfloor\mathrm{nfe}/2\rfloor$ for midpoint, $\mathrm{nfe}$
    for every other sampler. Fewer calls than one step needs is an error."""
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer; got {nfe!r}")
    n = (nfe + 1) // 2 if name == "heun" else nfe // 2 if name == "midpoint" else nfe
    if n < 1:
        raise ValueError(f"{name} makes 2 model calls per step; nfe={nfe} is too few for one step")
    _sampler(name)
    return n


def _sampler(name: str) -> Callable[..., Tensor]:
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None


def sample(name_or_model: str | Model, *args, nfe: int | None = None, t_max: float = 1.0, **kwargs) -> Tensor:
    r"""Run a sampler by name on a given grid, or the default sampler on its default grid.

    - ``sample(name, model, x, schedule, ts, **kwargs)``: the sampler called ``name`` (a key of
      {data}`SAMPLERS`) on the grid ``ts``, with its keyword arguments.
    - ``sample(model, x, schedule, nfe=10)``: the default, UniPC with its corrector
      ({func}`sample_unipc`: predictor order 2, $B(h)$ = bh2, third order in all) on the
      ``"cosine"`` grid of {func}`~stepdiff.schedules.time_grid` from ``t_max`` (default 1),
      ``nfe`` model calls. ``x`` is a draw of $p_{t_{\max}}$ (for most schedules at
      $t = 1$, standard noise).
    - ``sample(name, model, x, schedule, nfe=10)``: the sampler ``name`` on that grid, with as
      many steps as ``nfe`` calls allow ({func}`steps_for_nfe`).

    Why this default: it was the best solver and grid at 5 and 10 calls, on DDPM's linear and
    on the cosine schedule, on the exact-denoiser benchmark (``benchmarks/bench_samplers.py``: a
    2-D mixture of five unequal Gaussians, 20,000 samples, sliced Wasserstein distance to fresh
    target samples; every solver here on every grid of {func}`~stepdiff.schedules.time_grid`).
    The numbers are in ``stepdiff/results/samplers_exact_denoiser.json`` (installed with the package).
    """
    if isinstance(name_or_model, str):
        name, rest = name_or_model, args
    elif callable(name_or_model):
        name, rest = DEFAULT_SAMPLER, (name_or_model, *args)
    else:
        raise TypeError(
            f"sample takes a sampler name or a model first; got {type(name_or_model).__name__}"
        )
    fn = _sampler(name)
    if nfe is None:
        if len(rest) != 4:
            raise TypeError("sample needs (model, x, schedule, ts) after the name, or nfe= instead of ts")
        if t_max != 1.0:
            raise TypeError("t_max only applies with nfe= (a given grid ts starts where it starts)")
        return fn(*rest, **kwargs)
    if len(rest) != 3:
        raise TypeError("with nfe=, pass (model, x, schedule) and no grid: the grid comes from nfe")
    model, x, schedule = rest
    ts = time_grid(steps_for_nfe(name, nfe), DEFAULT_SPACING, schedule, t_max=t_max)
    return fn(model, x, schedule, ts, **kwargs)
