r"""Samplers: plain functions of (model, initial noise, schedule, time grid, generator).

Every sampler walks a descending time grid $t_0 > t_1 > \dots > t_n = 0$ (see
:func:`stepdiff.schedules.time_grid`) and asks the model once or twice per step. The model is
any callable ``model(x, t) -> prediction`` with ``x`` of shape ``[B, ...]`` and ``t`` of shape
``[B]``; ``prediction`` names what it returns (``"x0"``, ``"eps"``, ``"v"``, ``"score"``,
``"velocity"``, see :mod:`stepdiff.parametrize`). An exact denoiser returns ``"x0"``.

Each update is an affine map $x' = c_x x + c_{\rm pred}\,p + c_{\rm noise}z$ whose coefficients
depend only on the grid, so they are computed for all steps up front (one function per family,
``*_coefficients`` below) and applied by :func:`stepdiff.kernels.affine_step`, a single fused
kernel on the GPU. A model that predicts something other than $x_0$ is folded into the same
step: with $\hat x_0 = a\,x + b\,p$, the step becomes $(c_x + c_{x_0}a)\,x + c_{x_0}b\,p + \dots$.

The families:

- the tutorial's own samplers on its VE process: :func:`sample_ddpm_tutorial` (its
  Algorithm 1, Pseudocodes 2 and 7) and :func:`sample_ddim_tutorial` (Algorithm 2,
  Pseudocode 3);
- :func:`sample_ddpm` (ancestral sampling from the true posterior, Ho et al. 2020) and
  :func:`sample_ddim` (Song et al. 2021, any $\eta$), on any schedule;
- ODE solvers for the probability-flow ODE / flow matching, $dx/dt = \dot\alpha\hat x_0 +
  \dot\sigma\hat\varepsilon$: :func:`sample_euler`, :func:`sample_midpoint`, :func:`sample_heun`;
- :func:`sample_dpmpp_2m`, DPM-Solver++(2M) (Lu et al. 2022).

A caution on parametrizations near pure noise: turning an $\varepsilon$-prediction into
$\hat x_0 = (x_t - \sigma\hat\varepsilon)/\alpha$ divides by $\alpha(t)$, which is tiny at the start
of a variance-preserving schedule (0.0064 for DDPM's linear $\beta$ at $t = 1$, exactly 0 for
the cosine schedule), so any error of the network is amplified by $1/\alpha$ in the first
deterministic steps. Start such samplers a little below $t = 1$, or use a model that predicts
$x_0$, $v$ or the velocity, which stay bounded there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .kernels import affine_step
from .parametrize import PREDICTIONS, conversion_coefficients, convert
from .schedules import Schedule, _capturing

__all__ = [
    "Model",
    "ddim_coefficients",
    "posterior_coefficients",
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
    "ddim_inversion",
    "SAMPLERS",
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

    with $\mathbb E[x_s\mid x_t]$ from Claim 2 as in :func:`tutorial_ddpm_coefficients`. It
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
    generator: torch.Generator | int | None = None,
    clip_x0: float | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
) -> Tensor:
    r"""Ancestral sampling (Ho et al. 2020, Algorithm 2): $x_s \sim q(x_s\mid x_t, x_0 = \hat x_0)$.

    The step uses the true posterior of :func:`posterior_coefficients`; on a
    :class:`~stepdiff.schedules.DiscreteVPSchedule` with consecutive levels this is Ho et al.'s
    eq. 11 with the posterior variance $\tilde\beta_t$. It equals DDIM with $\eta = 1$.
    ``clip_x0`` clamps $\hat x_0$ to $[-c, c]$ (the ``clip_sample`` of diffusers).
    """
    run = _Run(model, x, schedule, ts, prediction, generator, return_trajectory, progress, "ddpm")
    coefficients = posterior_coefficients(schedule, run.ts[:-1], run.ts[1:])
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
    r"""DDIM (Song et al. 2021, eq. 12) with stochasticity $\eta$; see :func:`ddim_coefficients`.

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
    r"""Euler's method on the probability-flow ODE / flow-matching ODE (see :func:`euler_coefficients`).

    For flow matching, use :class:`~stepdiff.schedules.FlowMatchingSchedule` and
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
    x0_prev = None
    for i in run.steps():
        x0_hat = run.x0_hat(run.predict(x, i), x, i)
        if x0_prev is None or i == run.n - 1:
            d = x0_hat
        else:
            d = x0_hat + (x0_hat - x0_prev) / (2 * r[i - 1])
        x = run.step(x, d, i, c_x, c_d)
        x0_prev = x0_hat
    return run.result(x)


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
}


def sample(name: str, model: Model, x: Tensor, schedule: Schedule, ts: Tensor, **kwargs) -> Tensor:
    """Run the sampler called ``name`` (a key of :data:`SAMPLERS`) with ``kwargs``."""
    try:
        fn = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None
    return fn(model, x, schedule, ts, **kwargs)
