r"""Few-step generation: consistency models and progressive distillation.

A diffusion model samples by integrating the probability-flow ODE over many steps. Both methods
here train a **student** that covers a long stretch of that ODE in one evaluation.

**Consistency models** (Song, Dhariwal, Chen & Sutskever 2023). The ODE's solution map sends every
point $x_t$ of one trajectory to the same end point; a consistency function $f(x_t, t)$ learns
that end point directly. It is parametrised so that the boundary condition
$f(x, t_{\min}) = x$ holds exactly (their eq. 5),

$$f_\theta(x, t) = c_{\rm skip}(t)\,x + c_{\rm out}(t)\,\hat x_\theta(x, t),\qquad
c_{\rm skip}(t) = \frac{\sigma(t_{\min})}{\sigma(t)},\quad
c_{\rm out}(t) = \alpha(t_{\min}) - c_{\rm skip}(t)\,\alpha(t),$$

with $\hat x_\theta$ a network's estimate of $x_0$. This $f_\theta$ is one deterministic DDIM step
from $t$ to $t_{\min}$ taken with the network's $\hat x_\theta$, so $c_{\rm skip}(t_{\min}) = 1$,
$c_{\rm out}(t_{\min}) = 0$ exactly, and a student initialised from a teacher denoiser starts as
the teacher's one-step DDIM ({class}`ConsistencyModel`; Song et al.'s $c_{\rm skip}, c_{\rm out}$ come
from EDM's preconditioning and vanish at the same place). Training (their Algorithms 2 and 3)
takes adjacent times $t_{n+1} > t_n$ of a grid ({func}`consistency_grid`) and asks

$$\min_\theta\ \mathbb E\, \lambda(t_n)\,
d\big(f_\theta(x_{t_{n+1}}, t_{n+1}),\ f_{\theta^-}(\hat x_{t_n}, t_n)\big),\qquad
\theta^- \leftarrow \mu\,\theta^- + (1-\mu)\,\theta,$$

where $x_{t_{n+1}} = \alpha x_0 + \sigma z$ and $\hat x_{t_n}$ is one **ODE-solver step of a
teacher** from $t_{n+1}$ to $t_n$ (consistency *distillation*), or the same $x_0$ and $z$ put at
$t_n$ (consistency *training*, no teacher); $\theta^-$ is a target network, an exponential moving
average of the student ({class}`ConsistencyLoss`). Sampling ({func}`sample_consistency`, their
Algorithm 1) evaluates $f$ once, and for more steps re-noises the result to a smaller time and
evaluates again.

**Progressive distillation** (Salimans & Ho 2022). A student initialised from the teacher learns
to take one DDIM step where the teacher takes two. From $x_t$, two teacher steps
$t \to t' \to s$ land at $\tilde x_s$; the student's single step $x_s = \frac{\sigma_s}{\sigma_t}x_t +
(\alpha_s - \frac{\sigma_s}{\sigma_t}\alpha_t)\,\hat x$ lands there exactly when its estimate of $x_0$ is

$$\tilde x = \frac{\tilde x_s - (\sigma_s/\sigma_t)\,x_t}{\alpha_s - (\sigma_s/\sigma_t)\,\alpha_t}$$

({func}`progressive_target`), the regression target of {func}`progressive_loss`. Repeating halves
the number of steps each round ({func}`progressive_distillation`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .forward import add_noise, transition
from .parametrize import PREDICTIONS, broadcast_to, convert
from .samplers import ddim_coefficients
from .schedules import Schedule, karras_sigmas

__all__ = [
    "consistency_coefficients",
    "ConsistencyModel",
    "consistency_grid",
    "teacher_step",
    "ConsistencyLoss",
    "sample_consistency",
    "progressive_target",
    "progressive_loss",
    "halve_grid",
    "progressive_distillation",
    "METHODS",
    "student_for",
    "distillation_loss_fn",
]

f64 = torch.float64
SOLVERS = ("ddim", "euler", "heun")
DISTANCES = ("l2", "pseudo_huber")


def _check_prediction(prediction: str, name: str = "prediction") -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown {name} {prediction!r}; choose one of {PREDICTIONS}")


def _batch_time(t: Tensor | float, x: Tensor) -> Tensor:
    """``t`` as ``[B]`` on the device of ``x`` (a scalar is broadcast), keeping a tensor's dtype
    (a Python number becomes float64, not the default float32, which would round it)."""
    t = torch.as_tensor(t, device=x.device) if isinstance(t, Tensor) else torch.tensor(float(t), dtype=f64,
                                                                                      device=x.device)
    if not t.is_floating_point():
        t = t.to(f64)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape [{x.shape[0]}]; got {tuple(t.shape)}")
    return t


def _call(model: Callable, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
    out = model(x, t.to(x.dtype)) if y is None else model(x, t.to(x.dtype), y)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the model returned {shape} for x of shape {tuple(x.shape)}; it must match")
    return out


def _x0_hat(model: Callable, x: Tensor, t: Tensor, schedule: Schedule, prediction: str,
            y: Tensor | None = None) -> Tensor:
    """$\\hat x_0$ from ``model``'s ``prediction`` at per-sample float64 times ``t``."""
    out = _call(model, x, t, y)
    return out if prediction == "x0" else convert(out, x, t, schedule, prediction, "x0")


# --- consistency models -------------------------------------------------------------------------


def consistency_coefficients(schedule: Schedule, t: Tensor | float, t_min: float) -> tuple[Tensor, Tensor]:
    r"""$c_{\rm skip}(t) = \sigma(t_{\min})/\sigma(t)$ and
    $c_{\rm out}(t) = \alpha(t_{\min}) - c_{\rm skip}(t)\,\alpha(t)$: one DDIM step from $t$ to $t_{\min}$,
    so that $c_{\rm skip}(t_{\min}) = 1$ and $c_{\rm out}(t_{\min}) = 0$ exactly.

    ``t`` is compared with ``t_min`` as rounded to the dtype of ``t``, so a float32 time equal to
    ``t_min`` hits the boundary exactly. Returns float64 tensors shaped like ``t``.
    """
    t = torch.as_tensor(t)
    dtype = t.dtype if t.is_floating_point() else f64
    t_min64 = torch.tensor(t_min, dtype=dtype).to(f64)
    t64 = t.to(f64)
    if bool((t64 < t_min64).any()):
        raise ValueError(f"t must be >= t_min = {t_min} (the consistency function is defined on [t_min, 1]); "
                         f"got values down to {float(t64.min())}")
    c_skip = schedule.sigma(t_min64) / schedule.sigma(t64)
    return c_skip, schedule.alpha(t_min64) - c_skip * schedule.alpha(t64)


class ConsistencyModel(nn.Module):
    r"""$f_\theta(x, t) = c_{\rm skip}(t)\,x + c_{\rm out}(t)\,\hat x_\theta(x, t)$ (see
    {func}`consistency_coefficients`), with $\hat x_\theta$ the $x_0$ read from ``net``'s ``prediction``.

    ``net(x, t[, y])`` is any denoiser (an {class}`~stepdiff.models.mlp.MLP`, a UNet); a copy of a
    teacher's network makes the student start as the teacher's one-step DDIM to $t_{\min}$.
    ``forward(x, t, y=None)`` returns $f_\theta$, shaped like ``x``, and is exactly ``x`` at
    $t = t_{\min}$. ``t`` below ``t_min`` is an error. Being an estimate of $x_0$, it can also be
    handed to the samplers with ``prediction="x0"``.
    """

    def __init__(self, net: nn.Module, schedule: Schedule, *, prediction: str = "x0", t_min: float = 0.002) -> None:
        super().__init__()
        _check_prediction(prediction)
        if not 0.0 < t_min < 1.0 or not float(schedule.sigma(t_min)) > 0:
            raise ValueError(f"t_min must lie in (0, 1) with sigma(t_min) > 0; got {t_min}")
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.t_min = float(t_min)

    @property
    def null_class(self) -> int | None:
        return getattr(self.net, "null_class", None)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        t = _batch_time(t, x)
        c_skip, c_out = consistency_coefficients(self.schedule, t, self.t_min)
        x0_hat = _x0_hat(self.net, x, t.to(f64), self.schedule, self.prediction, y)
        return broadcast_to(c_skip, x) * x + broadcast_to(c_out, x) * x0_hat


def consistency_grid(n_steps: int, schedule: Schedule, *, t_min: float = 0.002, t_max: float = 1.0,
                     sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    r"""The $n + 1$ times $t_{\max} = t_0 > t_1 > \dots > t_n = t_{\min}$ of consistency training,
    spaced as Karras et al.'s noise levels (Song et al. 2023, §5: $N$ = ``n_steps`` intervals):
    $\tilde\sigma_i = \big(\tilde\sigma_{\max}^{1/\rho} + \tfrac in(\tilde\sigma_{\min}^{1/\rho} -
    \tilde\sigma_{\max}^{1/\rho})\big)^\rho$ in the schedule's VE units $\tilde\sigma = \sigma/\alpha$,
    mapped to times, with $\tilde\sigma_{\min} = \tilde\sigma(t_{\min})$ and
    $\tilde\sigma_{\max} = \min(\tilde\sigma(t_{\max}), $ ``sigma_max``$)$ (EDM's 80: a schedule
    that reaches pure noise has $\tilde\sigma(1) = \infty$). The first time is then set to
    ``t_max`` itself, so the first interval runs from ``t_max`` to the second level. Float64, descending.
    """
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer; got {n_steps!r}")
    if not 0.0 < t_min < t_max <= 1.0:
        raise ValueError(f"need 0 < t_min < t_max <= 1; got t_min={t_min}, t_max={t_max}")
    s_min = float(schedule.sigma_ve(t_min))
    s_max = min(float(schedule.sigma_ve(t_max)), float(sigma_max))
    if not 0 < s_min < s_max:
        raise ValueError(f"need 0 < sigma_ve(t_min) < sigma_max; got {s_min} and {s_max}")
    ts = schedule.t_from_sigma_ve(karras_sigmas(n_steps + 1, s_min, s_max, rho)).to(f64)
    ts[0], ts[-1] = t_max, t_min
    if bool((ts[1:] >= ts[:-1]).any()):
        raise ValueError(f"the grid of {n_steps} steps between t_min={t_min} and t_max={t_max} is not strictly "
                         "decreasing; use fewer steps or a wider range")
    return ts


@torch.no_grad()
def teacher_step(
    teacher: Callable, x: Tensor, t: Tensor, s: Tensor, schedule: Schedule, *,
    prediction: str = "x0", solver: str = "heun", y: Tensor | None = None,
) -> Tensor:
    r"""One step of the probability-flow ODE from per-sample times ``t`` to ``s < t`` with ``teacher``.

    - ``"ddim"``: $x_s = \frac{\sigma_s}{\sigma_t}x_t + (\alpha_s - \frac{\sigma_s}{\sigma_t}\alpha_t)\hat x_0$
      (the first-order exponential integrator; exact when $\hat x_0$ is constant along the step);
    - ``"euler"``: $x_s = x_t + (s - t)\,u(x_t, t)$ with $u = dx/dt$ the velocity;
    - ``"heun"``: $\tilde x = x_t + (s-t)u(x_t, t)$, $x_s = x_t + \tfrac{s-t}2\big(u(x_t, t) + u(\tilde x, s)\big)$
      (Song et al. 2023 distil with Heun); needs $s > 0$ where the velocity is finite.

    ``t``, ``s``: float64 ``[B]``. Returns $x_s$ without a graph (the teacher is not trained).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    if solver == "ddim":
        c_x, c_x0, _ = ddim_coefficients(schedule, t, s, 0.0)
        x0_hat = _x0_hat(teacher, x, t, schedule, prediction, y)
        return broadcast_to(c_x, x) * x + broadcast_to(c_x0, x) * x0_hat
    h = broadcast_to(s - t, x)

    def velocity(z: Tensor, tt: Tensor) -> Tensor:
        out = _call(teacher, z, tt, y)
        return out if prediction == "velocity" else convert(out, z, tt, schedule, prediction, "velocity")

    u = velocity(x, t)
    x_euler = x + h * u
    if solver == "euler":
        return x_euler
    return x + 0.5 * h * (u + velocity(x_euler, s))


class ConsistencyLoss:
    r"""Consistency distillation (with ``teacher``) or consistency training (without), as a
    ``loss_fn(model, x0, y, generator)`` for {func}`stepdiff.train.train`.

    Per sample: $n \sim U\{0, \dots, N-1\}$ on the grid $t_0 > \dots > t_N$ of {func}`consistency_grid`
    ($N$ = ``n_steps``), $x_{\rm hi} = \alpha(t_n)x_0 + \sigma(t_n)z$, and $x_{\rm lo}$ at $t_{n+1}$ by
    {func}`teacher_step` (``solver``) or, without a teacher, $\alpha(t_{n+1})x_0 + \sigma(t_{n+1})z$. The loss is
    $\mathbb E\,\lambda\, d\big(f_\theta(x_{\rm hi}, t_n), f_{\theta^-}(x_{\rm lo}, t_{n+1})\big)$ with
    ``distance`` $d$: ``"l2"``, $\tfrac1D\|a - b\|^2$, or ``"pseudo_huber"`` (Song & Dhariwal 2023),
    $\sqrt{\|a - b\|^2 + c^2} - c$ with $c = 0.00054\sqrt D$; $\lambda = 1$, or with
    ``weighting="ict"`` $\lambda = 1/(\tilde\sigma(t_n) - \tilde\sigma(t_{n+1}))$.

    The target network $f_{\theta^-}$ (``self.target``) starts as a copy of ``student`` and follows
    it as $\theta^- \leftarrow \mu\theta^- + (1 - \mu)\theta$, $\mu$ = ``target_decay``, once after
    every optimiser step: a call of the loss notices that the student's parameters changed since
    the previous call (their version counters) and updates the target first, so it works inside
    any training loop, micro-batched or not ({meth}`update_target` does it by hand).
    ``target_decay = 0`` makes the target the student itself without gradient (Song & Dhariwal 2023).
    """

    def __init__(
        self,
        student: ConsistencyModel,
        schedule: Schedule,
        n_steps: int = 18,
        *,
        teacher: Callable | None = None,
        teacher_prediction: str = "x0",
        solver: str = "heun",
        t_max: float = 1.0,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        target_decay: float = 0.95,
        distance: str = "l2",
        weighting: str = "uniform",
    ) -> None:
        if not isinstance(student, ConsistencyModel):
            raise TypeError(f"student must be a ConsistencyModel; got {type(student).__name__}")
        _check_prediction(teacher_prediction, "teacher_prediction")
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; choose one of {DISTANCES}")
        if weighting not in ("uniform", "ict"):
            raise ValueError(f"unknown weighting {weighting!r}; choose 'uniform' or 'ict'")
        if not 0.0 <= target_decay < 1.0:
            raise ValueError(f"target_decay must lie in [0, 1); got {target_decay}")
        self.schedule, self.teacher, self.solver = schedule, teacher, solver
        self.teacher_prediction = teacher_prediction
        self.grid = consistency_grid(n_steps, schedule, t_min=student.t_min, t_max=t_max, sigma_max=sigma_max,
                                     rho=rho)
        self.target_decay, self.distance, self.weighting = float(target_decay), distance, weighting
        self.target = copy.deepcopy(student).eval().requires_grad_(False)
        self._versions = self._version_of(student)

    @staticmethod
    def _version_of(model: nn.Module) -> tuple[int, ...]:
        # An optimiser updates parameters in place, which bumps their version counters.
        return tuple(p._version for p in model.parameters() if p.requires_grad)

    @torch.no_grad()
    def update_target(self, student: nn.Module) -> None:
        r"""$\theta^- \leftarrow \mu\theta^- + (1 - \mu)\theta$ (buffers copied)."""
        for tp, p in zip(self.target.parameters(), student.parameters(), strict=True):
            tp.lerp_(p.detach(), 1.0 - self.target_decay)
        for tb, b in zip(self.target.buffers(), student.buffers(), strict=True):
            tb.copy_(b)
        self._versions = self._version_of(student)

    def _d(self, a: Tensor, b: Tensor) -> Tensor:
        diff2 = (a - b).pow(2).reshape(a.shape[0], -1)
        if self.distance == "l2":
            return diff2.mean(1)
        c = 0.00054 * diff2.shape[1] ** 0.5
        return torch.sqrt(diff2.sum(1) + c * c) - c

    def __call__(self, model: ConsistencyModel, x0: Tensor, y: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        if not isinstance(x0, Tensor) or not x0.is_floating_point() or x0.ndim < 2:
            raise ValueError(f"x0 must be a float batch [B, ...]; got {getattr(x0, 'shape', type(x0).__name__)}")
        if self._version_of(model) != self._versions:
            self.update_target(model)
        B, N = x0.shape[0], self.grid.numel() - 1
        n = torch.randint(0, N, (B,), generator=generator, device=x0.device)
        grid = self.grid.to(x0.device)
        t_hi, t_lo = grid[n], grid[n + 1]
        z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_hi, _ = add_noise(x0, t_hi, self.schedule, noise=z)
        if self.teacher is None:
            x_lo, _ = add_noise(x0, t_lo, self.schedule, noise=z)
        else:
            x_lo = teacher_step(self.teacher, x_hi, t_hi, t_lo, self.schedule, prediction=self.teacher_prediction,
                                solver=self.solver, y=y)
        with torch.no_grad():
            target = self.target(x_lo, t_lo.to(x0.dtype), y)
        d = self._d(model(x_hi, t_hi.to(x0.dtype), y), target)
        if self.weighting == "ict":
            d = d / (self.schedule.sigma_ve(t_hi) - self.schedule.sigma_ve(t_lo)).to(d.dtype)
        return d.mean()


@torch.no_grad()
def sample_consistency(
    model: Callable, x: Tensor, schedule: Schedule, ts: Tensor | list[float], *, t_min: float | None = None,
    generator: torch.Generator | int | None = None,
) -> Tensor:
    r"""Multistep consistency sampling (Song et al. 2023, Algorithm 1).

    ``x`` is the state at ``ts[0]`` (e.g. $\sigma(1)z$). Then $\hat x \leftarrow f(x, \tau_0)$, and for each
    further time $\tau_k$ of the descending ``ts`` (all above $t_{\min}$): re-noise from $t_{\min}$ with the
    forward transition, $x_{\tau_k} = \frac{\alpha(\tau_k)}{\alpha(t_{\min})}\hat x +
    \sqrt{\sigma(\tau_k)^2 - \frac{\alpha(\tau_k)^2}{\alpha(t_{\min})^2}\sigma(t_{\min})^2}\;z$, and
    $\hat x \leftarrow f(x_{\tau_k}, \tau_k)$. One evaluation per entry of ``ts``. ``t_min``: by
    default ``model.t_min``. Returns $\hat x$.
    """
    ts = torch.as_tensor(ts, dtype=f64).reshape(-1)
    t_min = getattr(model, "t_min", None) if t_min is None else t_min
    if t_min is None:
        raise ValueError("pass t_min (the model has no t_min attribute)")
    if ts.numel() < 1 or bool((ts[1:] >= ts[:-1]).any()) or float(ts[-1]) <= t_min or float(ts[0]) > 1:
        raise ValueError(f"ts must be descending times in (t_min, 1] = ({t_min}, 1]; got {ts.tolist()}")
    if isinstance(generator, int):
        generator = torch.Generator(device=x.device).manual_seed(generator)
    out = model(x, torch.full((x.shape[0],), float(ts[0]), device=x.device, dtype=x.dtype))
    for tau in ts[1:].tolist():
        x_tau = transition(out, t_min, tau, schedule, generator=generator)
        out = model(x_tau, torch.full((x.shape[0],), tau, device=x.device, dtype=x.dtype))
    return out


# --- progressive distillation ------------------------------------------------------------------


@torch.no_grad()
def progressive_target(
    teacher: Callable, x_t: Tensor, t: Tensor | float, s: Tensor | float, schedule: Schedule, *,
    t_mid: Tensor | float | None = None, prediction: str = "x0", y: Tensor | None = None,
) -> Tensor:
    r"""The $x_0$ target $\tilde x$ of progressive distillation (Salimans & Ho 2022, Algorithm 2).

    Two deterministic DDIM steps of ``teacher`` from $t$ to $t'$ = ``t_mid`` (default $(t+s)/2$) and
    on to $s$ give $\tilde x_s$; then
    $\tilde x = \big(\tilde x_s - \tfrac{\sigma_s}{\sigma_t}x_t\big)\big/
    \big(\alpha_s - \tfrac{\sigma_s}{\sigma_t}\alpha_t\big)$,
    so that one DDIM step from $t$ to $s$ with $\hat x_0 = \tilde x$ lands on $\tilde x_s$.
    ``t``, ``s``, ``t_mid``: scalars or ``[B]``.
    """
    t, s = _batch_time(t, x_t).to(f64), _batch_time(s, x_t).to(f64)
    t_mid = (t + s) / 2 if t_mid is None else _batch_time(t_mid, x_t).to(f64)
    if bool((s >= t_mid).any()) or bool((t_mid >= t).any()):
        raise ValueError("need s < t_mid < t for every sample")
    x_mid = teacher_step(teacher, x_t, t, t_mid, schedule, prediction=prediction, solver="ddim", y=y)
    x_s = teacher_step(teacher, x_mid, t_mid, s, schedule, prediction=prediction, solver="ddim", y=y)
    ratio = schedule.sigma(s) / schedule.sigma(t)
    denom = schedule.alpha(s) - ratio * schedule.alpha(t)
    return (x_s - broadcast_to(ratio, x_t) * x_t) / broadcast_to(denom, x_t)


def halve_grid(ts: Tensor) -> Tensor:
    r"""Every other time of a descending grid with an even number $2N$ of steps, $(t_0, t_2, \dots, t_{2N})$:
    the student's grid."""
    ts = torch.as_tensor(ts, dtype=f64).reshape(-1)
    if (ts.numel() - 1) % 2 or ts.numel() < 3:
        raise ValueError(f"the teacher's grid must have an even number of steps (>= 2); got {ts.numel() - 1}")
    return ts[::2].clone()


def progressive_loss(
    student: Callable, teacher: Callable, x0: Tensor, schedule: Schedule, ts_teacher: Tensor, *,
    student_prediction: str = "x0", teacher_prediction: str = "x0", weighting: str = "truncated_snr",
    y: Tensor | None = None, generator: torch.Generator | None = None,
) -> Tensor:
    r"""The loss of one round of progressive distillation on the teacher's grid ``ts_teacher`` ($2N$ steps).

    Per sample a student step $i \sim U\{0..N-1\}$ from $t = $ ``ts_teacher[2i]`` to
    $s$ = ``ts_teacher[2i+2]`` (the teacher's midpoint $t'$ = ``ts_teacher[2i+1]``),
    $x_t = \alpha_tx_0 + \sigma_t\varepsilon$, and

    $$L = \mathbb E\,w(t)\,\tfrac1D\big\|\hat x_\eta(x_t, t) - \tilde x\big\|^2,\qquad w(t) = \max(\mathrm{SNR}(t), 1)$$

    (``weighting="truncated_snr"``, Salimans & Ho's choice; ``"snr"`` is $\mathrm{SNR}(t)$, which is
    the $\varepsilon$-loss; ``"uniform"`` is 1), with $\tilde x$ from {func}`progressive_target` and
    $\hat x_\eta$ the student's $x_0$ read from its ``student_prediction``.
    """
    _check_prediction(student_prediction, "student_prediction")
    if weighting not in ("truncated_snr", "snr", "uniform"):
        raise ValueError(f"unknown weighting {weighting!r}; choose 'truncated_snr', 'snr' or 'uniform'")
    grid = torch.as_tensor(ts_teacher, dtype=f64).reshape(-1)
    halve_grid(grid)  # checks the number of steps
    if bool((grid[1:] >= grid[:-1]).any()) or float(grid[-1]) != 0.0:
        raise ValueError("ts_teacher must be strictly decreasing and end at t = 0")
    B, N = x0.shape[0], (grid.numel() - 1) // 2
    i = torch.randint(0, N, (B,), generator=generator, device=x0.device)
    grid = grid.to(x0.device)
    t, t_mid, s = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
    x_t, _ = add_noise(x0, t, schedule, generator=generator)
    x_tilde = progressive_target(teacher, x_t, t, s, schedule, t_mid=t_mid, prediction=teacher_prediction, y=y)
    x0_hat = _x0_hat(student, x_t, t, schedule, student_prediction, y)
    per_sample = (x0_hat - x_tilde).pow(2).reshape(B, -1).mean(1)
    if weighting != "uniform":
        snr = schedule.snr(t)
        w = snr.clamp(min=1.0) if weighting == "truncated_snr" else snr
        per_sample = w.to(per_sample.dtype) * per_sample
    return per_sample.mean()


def progressive_distillation(
    teacher: nn.Module, data: Tensor, schedule: Schedule, ts: Tensor, rounds: int, *,
    prediction: str = "x0", steps: int = 1000, **train_kwargs,
) -> list[tuple[nn.Module, Tensor]]:
    r"""Salimans & Ho's Algorithm 2: ``rounds`` rounds, each a student (a copy of the current teacher)
    trained by {func}`progressive_loss` for ``steps`` steps with {func}`stepdiff.train.train`
    (``train_kwargs``: ``batch_size``, ``lr``, ``seed``, ...), whose EMA weights become the next
    teacher; the grid halves each round, $2^r N \to 2^{r-1}N$. ``teacher`` predicts ``prediction``
    (so do the students). Returns ``[(student, grid), ...]`` with each student's grid (ending at 0).
    A teacher that is no ``nn.Module`` (an exact denoiser) needs a first student built by hand.
    """
    from .train import train

    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer; got {rounds!r}")
    if not isinstance(teacher, nn.Module):
        raise TypeError("progressive_distillation copies the teacher into the first student: pass an nn.Module")
    grid = torch.as_tensor(ts, dtype=f64)
    out = []
    for _ in range(rounds):
        student_grid = halve_grid(grid)
        student = copy.deepcopy(teacher).train().requires_grad_(True)
        frozen = teacher.eval()

        def loss_fn(model, x0, y, g, frozen=frozen, grid=grid):
            return progressive_loss(model, frozen, x0, schedule, grid, student_prediction=prediction,
                                    teacher_prediction=prediction, y=y, generator=g)

        result = train(student, data, loss_fn=loss_fn, steps=steps, **train_kwargs)
        teacher = result.ema.model
        out.append((teacher, student_grid))
        grid = student_grid
    return out


# --- a distillation run of the stepdiff command ------------------------------------------------

METHODS = ("progressive", "consistency")


def student_for(teacher: nn.Module, method: str, schedule: Schedule, prediction: str, *,
                t_min: float = 0.002) -> nn.Module:
    r"""The student that a distillation run starts from: a trainable copy of ``teacher`` (progressive
    distillation), or the copy wrapped as a {class}`ConsistencyModel`, $f = c_{\rm skip}x + c_{\rm out}\hat x$,
    which starts as the teacher's one-step DDIM to $t_{\min}$ (consistency distillation)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    if method == "progressive":
        return student
    return ConsistencyModel(student, schedule, prediction=prediction, t_min=t_min)


def distillation_loss_fn(
    method: str, teacher: Callable, student: nn.Module, schedule: Schedule, prediction: str, ts_teacher: Tensor, *,
    solver: str = "heun", target_decay: float = 0.95,
) -> Callable:
    r"""A ``loss_fn(model, x0, y, generator)`` for {func}`stepdiff.train.train`: {func}`progressive_loss` on
    the teacher's grid ``ts_teacher`` ($2N$ steps; the student learns $N$), or {class}`ConsistencyLoss`
    with the teacher's ``solver`` steps on the $N$ = ``len(ts_teacher) - 1`` intervals of
    {func}`consistency_grid` (then ``ts_teacher`` only gives $N$). Labels ``y`` reach teacher and student."""
    if method == "progressive":
        grid = torch.as_tensor(ts_teacher, dtype=f64)
        halve_grid(grid)

        def loss_fn(model, x0, y, generator):
            return progressive_loss(model, teacher, x0, schedule, grid, student_prediction=prediction,
                                    teacher_prediction=prediction, y=y, generator=generator)

        return loss_fn
    if method != "consistency":
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    return ConsistencyLoss(student, schedule, len(ts_teacher) - 1, teacher=teacher, teacher_prediction=prediction,
                           solver=solver, target_decay=target_decay)
