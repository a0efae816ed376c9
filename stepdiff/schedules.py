r"""Noise schedules: how much signal and how much noise there is at each time.

Every schedule here describes a Gaussian forward process

$$x_t = \alpha(t)\, x_0 + \sigma(t)\, \varepsilon, \qquad \varepsilon \sim \mathcal N(0, I),$$

on the unit interval $t \in [0, 1]$, with **$t = 0$ the data and $t = 1$ the noise**, the
convention of the tutorial (Nakkiran et al. 2024) for diffusion *and* flows. Each schedule
exposes $\alpha(t)$, $\sigma(t)$, their time derivatives, the signal-to-noise ratio
$\mathrm{SNR}(t) = \alpha^2/\sigma^2$, its logarithm $\lambda(t)$, and the inverse map
$\lambda \mapsto t$, all vectorised over a tensor of per-sample times.

The schedules:

- {class}`VESchedule`: the tutorial's own process, $\alpha = 1$, $\sigma = \sigma_q\sqrt t$
  (its eq. 12): variance exploding with a constant rate.
- {class}`VPLinearSchedule`: continuous-time DDPM (Song et al. 2021), $\beta(t)$ linear.
- {class}`VPCosineSchedule`: the cosine schedule of Nichol & Dhariwal (2021).
- {class}`FlowMatchingSchedule`: the linear path $x_t = (1-t)x_0 + t x_1$ of rectified flow.
- {class}`EDMSchedule`: Karras et al. (2022), $\alpha = 1$, $\sigma = \sigma_{\max} t$.
- {class}`DiscreteVPSchedule`: the discrete schedules in the vocabulary of diffusers
  (``num_train_timesteps``, ``beta_schedule``, ``alphas_cumprod``, ``timestep_spacing``).

Time grids for samplers (uniform, quadratic, Karras-$\rho$, uniform in log-SNR, the SD3 time
shift, and the diffusers spacings) come from {func}`time_grid`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

__all__ = [
    "Schedule",
    "VESchedule",
    "VPLinearSchedule",
    "VPCosineSchedule",
    "FlowMatchingSchedule",
    "EDMSchedule",
    "DiscreteVPSchedule",
    "SCHEDULES",
    "get_schedule",
    "time_grid",
    "karras_sigmas",
    "shift_time",
    "rescale_zero_terminal_snr",
    "check_time",
]


def _as_time(t: Tensor | float) -> Tensor:
    """A time as a floating tensor (float64 when given a Python number)."""
    if isinstance(t, Tensor):
        return t if t.is_floating_point() else t.to(torch.float64)
    return torch.tensor(float(t), dtype=torch.float64)


def _capturing() -> bool:
    # A value check reads the tensor on the host, which a CUDA graph capture forbids.
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_time(t: Tensor | float, name: str = "t") -> Tensor:
    """Return ``t`` as a tensor after checking that every entry lies in $[0, 1]$.

    Raises ``ValueError`` naming the argument and the offending range otherwise.
    """
    t = _as_time(t)
    if not _capturing() and t.numel() and (
        bool(torch.isnan(t).any()) or bool((t < 0).any()) or bool((t > 1).any())
    ):
        raise ValueError(
            f"{name} must lie in [0, 1] (0 = data, 1 = noise); got values in "
            f"[{float(t.min()):.6g}, {float(t.max()):.6g}]"
        )
    return t


class Schedule(ABC):
    r"""Base class: a Gaussian path $x_t = \alpha(t) x_0 + \sigma(t)\varepsilon$, $t\in[0,1]$.

    Subclasses implement {meth}`alpha`, {meth}`sigma`, {meth}`d_alpha`, {meth}`d_sigma`
    and {meth}`t_from_log_snr`; the rest follows from them.
    """

    name: ClassVar[str] = "schedule"

    @abstractmethod
    def alpha(self, t: Tensor | float) -> Tensor:
        r"""Signal coefficient $\alpha(t)$."""

    @abstractmethod
    def sigma(self, t: Tensor | float) -> Tensor:
        r"""Noise coefficient $\sigma(t)$."""

    @abstractmethod
    def d_alpha(self, t: Tensor | float) -> Tensor:
        r"""Time derivative $\dot\alpha(t) = d\alpha/dt$."""

    @abstractmethod
    def d_sigma(self, t: Tensor | float) -> Tensor:
        r"""Time derivative $\dot\sigma(t) = d\sigma/dt$."""

    @abstractmethod
    def t_from_log_snr(self, log_snr: Tensor | float) -> Tensor:
        r"""Inverse of {meth}`log_snr`: the time $t$ with $\lambda(t) = $ ``log_snr``."""

    def snr(self, t: Tensor | float) -> Tensor:
        r"""Signal-to-noise ratio $\alpha(t)^2 / \sigma(t)^2$."""
        return self.alpha(t) ** 2 / self.sigma(t) ** 2

    def log_snr(self, t: Tensor | float) -> Tensor:
        r"""$\lambda(t) = \log \mathrm{SNR}(t) = 2\log(\alpha(t)/\sigma(t))$, decreasing in $t$."""
        return 2.0 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def sigma_ve(self, t: Tensor | float) -> Tensor:
        r"""Noise level in variance-exploding units, $\tilde\sigma = \sigma/\alpha = e^{-\lambda/2}$.

        Dividing $x_t$ by $\alpha(t)$ turns every schedule into $x_0 + \tilde\sigma\varepsilon$;
        this is the $\sigma$ of k-diffusion and of Karras et al. (2022).
        """
        return self.sigma(t) / self.alpha(t)

    def t_from_sigma_ve(self, sigma_ve: Tensor | float) -> Tensor:
        r"""The time whose VE noise level is ``sigma_ve``: $t = \lambda^{-1}(-2\log\tilde\sigma)$."""
        return self.t_from_log_snr(-2.0 * torch.log(_as_time(sigma_ve)))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


@dataclass(repr=False)
class VESchedule(Schedule):
    r"""The tutorial's process: $x_t = x_0 + \sigma_q\sqrt t\,\varepsilon$ (its eqs. 11-12).

    $\alpha(t) = 1$ and $\sigma(t) = \sigma_q \sqrt t$, so $\sigma_q^2$ is the terminal variance
    and $\lambda(t) = -\log(\sigma_q^2 t)$, inverted by $t = e^{-\lambda}/\sigma_q^2$.
    A step of size $\Delta t$ adds independent noise of variance $\sigma_q^2 \Delta t$.
    """

    sigma_q: float = 1.0
    name: ClassVar[str] = "ve"

    def __post_init__(self) -> None:
        if not self.sigma_q > 0:
            raise ValueError(f"sigma_q must be positive; got {self.sigma_q}")

    def alpha(self, t):
        return torch.ones_like(_as_time(t))

    def sigma(self, t):
        return self.sigma_q * torch.sqrt(_as_time(t))

    def d_alpha(self, t):
        return torch.zeros_like(_as_time(t))

    def d_sigma(self, t):
        # d/dt sigma_q sqrt(t) = sigma_q / (2 sqrt(t)); infinite at t = 0.
        return self.sigma_q / (2.0 * torch.sqrt(_as_time(t)))

    def t_from_log_snr(self, log_snr):
        return torch.exp(-_as_time(log_snr)) / self.sigma_q**2


@dataclass(repr=False)
class VPLinearSchedule(Schedule):
    r"""Continuous-time DDPM (Song et al. 2021): $\beta(t) = \beta_{\min} + t(\beta_{\max}-\beta_{\min})$.

    $\log\alpha(t) = -\tfrac12\int_0^t\beta = -\tfrac14 t^2(\beta_{\max}-\beta_{\min})
    - \tfrac12 t\beta_{\min}$ and $\sigma = \sqrt{1-\alpha^2}$ (variance preserving).
    With $\beta_{\min} = 0.1$, $\beta_{\max} = 20$ it is the continuous-time limit of the linear
    DDPM schedule of Ho et al. (2020) with $T = 1000$ steps ($\beta_i = \beta(t_i)/T$): the two
    agree to first order in $\beta_i$.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    name: ClassVar[str] = "vp-linear"

    def __post_init__(self) -> None:
        if not 0 <= self.beta_min < self.beta_max:
            raise ValueError(
                f"need 0 <= beta_min < beta_max; got beta_min={self.beta_min}, "
                f"beta_max={self.beta_max}"
            )

    def _log_alpha(self, t: Tensor) -> Tensor:
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def beta(self, t: Tensor | float) -> Tensor:
        r"""The instantaneous rate $\beta(t)$."""
        t = _as_time(t)
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def alpha(self, t):
        return torch.exp(self._log_alpha(_as_time(t)))

    def sigma(self, t):
        # sqrt(1 - exp(2 log alpha)) written with expm1 to keep precision near t = 0.
        return torch.sqrt(-torch.expm1(2.0 * self._log_alpha(_as_time(t))))

    def d_alpha(self, t):
        t = _as_time(t)
        return -0.5 * self.beta(t) * self.alpha(t)

    def d_sigma(self, t):
        # sigma^2 = 1 - alpha^2  =>  sigma' = -alpha alpha' / sigma.
        t = _as_time(t)
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def log_snr(self, t):
        la2 = 2.0 * self._log_alpha(_as_time(t))
        return la2 - torch.log(-torch.expm1(la2))

    def t_from_log_snr(self, log_snr):
        # alpha^2 = sigmoid(lambda)  =>  -log alpha^2 = softplus(-lambda) =: L, and
        # 0.5 (b1 - b0) t^2 + b0 t - L = 0 has the root below.
        L = torch.nn.functional.softplus(-_as_time(log_snr))
        db = self.beta_max - self.beta_min
        return (-self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * db * L)) / db


@dataclass(repr=False)
class VPCosineSchedule(Schedule):
    r"""The cosine schedule (Nichol & Dhariwal 2021), variance preserving.

    $\alpha(t) = \cos\!\big(\tfrac{t+s}{1+s}\tfrac\pi2\big) / \cos\!\big(\tfrac{s}{1+s}\tfrac\pi2\big)$,
    $\sigma = \sqrt{1-\alpha^2}$, with offset $s = 0.008$. Note $\alpha(1) = 0$: the last time
    is pure noise (zero terminal SNR), so an $\varepsilon$-prediction cannot be turned into
    $x_0$ there; samplers ask the model at $t < 1$ or use $x_0$-, $v$- or velocity output.
    """

    s: float = 0.008
    name: ClassVar[str] = "vp-cosine"

    def __post_init__(self) -> None:
        if not self.s >= 0:
            raise ValueError(f"s must be non-negative; got {self.s}")

    @property
    def _c0(self) -> float:
        return math.cos(self.s / (1 + self.s) * math.pi / 2)

    def _angle(self, t: Tensor) -> Tensor:
        return (t + self.s) / (1 + self.s) * (math.pi / 2)

    def alpha(self, t):
        # Clamp the tiny negative that cos(pi/2) leaves in floating point.
        return (torch.cos(self._angle(_as_time(t))) / self._c0).clamp(min=0.0)

    def sigma(self, t):
        return torch.sqrt((1.0 - self.alpha(t) ** 2).clamp(min=0.0))

    def d_alpha(self, t):
        t = _as_time(t)
        return -torch.sin(self._angle(t)) * (math.pi / 2) / (1 + self.s) / self._c0

    def d_sigma(self, t):
        t = _as_time(t)
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def t_from_log_snr(self, log_snr):
        a = torch.sqrt(torch.sigmoid(_as_time(log_snr)))
        angle = torch.arccos((a * self._c0).clamp(-1.0, 1.0))
        return (angle * 2 / math.pi * (1 + self.s) - self.s).clamp(0.0, 1.0)


@dataclass(repr=False)
class FlowMatchingSchedule(Schedule):
    r"""The linear (rectified-flow) path $x_t = (1-t)\,x_0 + t\,x_1$, $x_1 \sim \mathcal N(0, I)$.

    $\alpha(t) = 1 - t$, $\sigma(t) = t$: data at $t = 0$ and pure noise at $t = 1$, as in the
    tutorial (its eq. 66) and in diffusers' ``FlowMatchEulerDiscreteScheduler`` (where
    $t$ is called $\sigma$). Most flow-matching papers run time the other way
    ($t = 1$ data); the velocity here is $dx_t/dt = x_1 - x_0$. The tutorial's pointwise
    flow $v^{[x_1,x_0]} = x_0 - x_1$ (its eq. 65) is the same field with the sign of its
    convention $dx_t/dt = -v_t$. $\lambda = 2\log\frac{1-t}{t}$ is inverted by
    $t = \mathrm{sigmoid}(-\lambda/2)$.
    """

    name: ClassVar[str] = "flow"

    def alpha(self, t):
        return 1.0 - _as_time(t)

    def sigma(self, t):
        return _as_time(t).clone()

    def d_alpha(self, t):
        return -torch.ones_like(_as_time(t))

    def d_sigma(self, t):
        return torch.ones_like(_as_time(t))

    def t_from_log_snr(self, log_snr):
        return torch.sigmoid(-0.5 * _as_time(log_snr))


@dataclass(repr=False)
class EDMSchedule(Schedule):
    r"""Karras et al. (2022): no scaling, noise level linear in time.

    $\alpha(t) = 1$, $\sigma(t) = \sigma_{\max}\, t$ (their $s(t) = 1$, $\sigma(t) = t$ with time
    rescaled onto $[0, 1]$). Pair it with ``time_grid(..., spacing="karras")`` for their
    $\rho$-spaced noise levels.
    """

    sigma_max: float = 80.0
    name: ClassVar[str] = "edm"

    def __post_init__(self) -> None:
        if not self.sigma_max > 0:
            raise ValueError(f"sigma_max must be positive; got {self.sigma_max}")

    def alpha(self, t):
        return torch.ones_like(_as_time(t))

    def sigma(self, t):
        return self.sigma_max * _as_time(t)

    def d_alpha(self, t):
        return torch.zeros_like(_as_time(t))

    def d_sigma(self, t):
        return torch.full_like(_as_time(t), self.sigma_max)

    def t_from_log_snr(self, log_snr):
        return torch.exp(-0.5 * _as_time(log_snr)) / self.sigma_max


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


class DiscreteVPSchedule(Schedule):
    r"""A discrete variance-preserving schedule, in the vocabulary of diffusers.

    There are $T$ = ``num_train_timesteps`` noise levels. The diffusers index $k \in
    \{0,\dots,T-1\}$ is Ho et al.'s step $k+1$: $\bar\alpha_k = \prod_{i \le k}(1-\beta_i)$
    (``alphas_cumprod``) and $x_k = \sqrt{\bar\alpha_k}\,x_0 + \sqrt{1-\bar\alpha_k}\,\varepsilon$.
    On the unit interval, index $k$ sits at $t_k = (k+1)/T$ and $t = 0$ is the clean data
    ($\bar\alpha = 1$). Between these knots $\alpha = \sqrt{\bar\alpha}$ is interpolated
    linearly, so the continuous-time samplers see exactly the discrete values on the grid
    and a well-defined (piecewise) derivative in between; at a knot the derivative is that
    of the segment below it, the one a sampler stepping towards $t = 0$ crosses.

    ``beta_schedule``:

    - ``"linear"``: $\beta_i$ evenly spaced from ``beta_start`` to ``beta_end`` (Ho et al.).
    - ``"scaled_linear"``: $\sqrt{\beta_i}$ evenly spaced (Latent/Stable Diffusion; use
      ``beta_start=0.00085``, ``beta_end=0.012``).
    - ``"squaredcos_cap_v2"``: $\beta_i = \min(1 - \bar\alpha(\tfrac{i+1}T)/\bar\alpha(\tfrac iT), 0.999)$
      with the cosine $\bar\alpha$ of Nichol & Dhariwal.

    ``rescale_betas_zero_snr`` applies Lin et al. (2024, Alg. 1): shift and scale
    $\sqrt{\bar\alpha}$ so that the last level is pure noise.
    """

    name = "discrete-vp"

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(
                f"num_train_timesteps must be a positive integer; got {num_train_timesteps!r}"
            )
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(
                f"unknown beta_schedule {beta_schedule!r}; choose one of {BETA_SCHEDULES}"
            )
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.rescale_betas_zero_snr = rescale_betas_zero_snr
        T = num_train_timesteps
        f64 = torch.float64
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=f64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=f64) ** 2
        else:
            i = torch.arange(T, dtype=f64)

            def abar(u: Tensor) -> Tensor:
                return torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = (1 - abar((i + 1) / T) / abar(i / T)).clamp(max=0.999)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # Knots of the continuous view: t = 0 (clean) followed by t_k = (k + 1) / T.
        self._knots_t = torch.arange(T + 1, dtype=f64) / T
        self._knots_alpha = torch.cat([torch.ones(1, dtype=f64), self.alphas_cumprod.sqrt()])

    def __repr__(self) -> str:
        return (
            f"DiscreteVPSchedule(num_train_timesteps={self.num_train_timesteps}, "
            f"beta_schedule={self.beta_schedule!r}, beta_start={self.beta_start}, "
            f"beta_end={self.beta_end}, rescale_betas_zero_snr={self.rescale_betas_zero_snr})"
        )

    def t_of_index(self, k: Tensor | int) -> Tensor:
        r"""The time $t_k = (k+1)/T$ of diffusers index $k$."""
        k = torch.as_tensor(k)
        return (k.to(torch.float64) + 1.0) / self.num_train_timesteps

    def _segment(self, t: Tensor) -> tuple[Tensor, Tensor]:
        # Segment j covers (t_j, t_{j+1}]; t = 0 belongs to segment 0.
        T = self.num_train_timesteps
        j = (torch.ceil(t * T) - 1).clamp(0, T - 1).long()
        return j, t * T - j.to(t.dtype)

    def alpha(self, t):
        t = _as_time(t)
        knots = self._knots_alpha.to(device=t.device, dtype=t.dtype)
        j, frac = self._segment(t)
        return knots[j] + frac * (knots[j + 1] - knots[j])

    def sigma(self, t):
        return torch.sqrt((1.0 - self.alpha(t) ** 2).clamp(min=0.0))

    def d_alpha(self, t):
        t = _as_time(t)
        knots = self._knots_alpha.to(device=t.device, dtype=t.dtype)
        j, _ = self._segment(t)
        return (knots[j + 1] - knots[j]) * self.num_train_timesteps

    def d_sigma(self, t):
        t = _as_time(t)
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def t_from_log_snr(self, log_snr):
        lam = _as_time(log_snr)
        a = torch.sqrt(torch.sigmoid(lam))
        knots = self._knots_alpha.to(device=lam.device, dtype=lam.dtype)
        # alpha decreases along the knots; search on -alpha, which increases.
        j = torch.searchsorted(-knots, -a.reshape(-1).contiguous()).reshape(a.shape) - 1
        j = j.clamp(0, self.num_train_timesteps - 1)
        frac = (a - knots[j]) / (knots[j + 1] - knots[j])
        return ((j.to(lam.dtype) + frac) / self.num_train_timesteps).clamp(0.0, 1.0)

    def timesteps(self, n_steps: int, spacing: str = "leading", steps_offset: int = 0) -> Tensor:
        r"""The inference timesteps (diffusers indices, descending) for ``n_steps`` steps.

        With $T$ training steps and $n$ inference steps (as in diffusers' ``set_timesteps``):

        - ``"leading"``: $k_i = i\lfloor T/n\rfloor$ + ``steps_offset``, never reaching $T-1$;
        - ``"trailing"``: $k_i = \mathrm{round}(T - iT/n) - 1$, starting at $T-1$ (Lin et al.);
        - ``"linspace"``: $n$ points evenly spaced from $0$ to $T-1$, rounded.

        The sampler's previous level is always the next entry of this list (and $t=0$ after
        the last), never ``k - T // n``: that hard-coded stride of diffusers' DDIM is wrong
        for ``linspace``, and for ``trailing`` when $n$ does not divide $T$.
        """
        T = self.num_train_timesteps
        _check_steps(n_steps)
        if n_steps > T:
            raise ValueError(f"n_steps={n_steps} exceeds num_train_timesteps={T}")
        if spacing == "leading":
            k = torch.arange(n_steps, dtype=torch.float64) * (T // n_steps) + steps_offset
            k = torch.flip(k.round().long(), [0])
        elif spacing == "trailing":
            k = torch.round(torch.arange(T, 0, -T / n_steps, dtype=torch.float64)).long() - 1
        elif spacing == "linspace":
            k = torch.flip(torch.linspace(0, T - 1, n_steps, dtype=torch.float64).round().long(), [0])
        else:
            raise ValueError(f"unknown timestep_spacing {spacing!r}; choose one of {TIMESTEP_SPACINGS}")
        if int(k.max()) > T - 1 or int(k.min()) < 0:
            raise ValueError(f"steps_offset={steps_offset} moves a timestep outside [0, {T - 1}]")
        return k

    def time_grid(self, n_steps: int, spacing: str = "leading", steps_offset: int = 0) -> Tensor:
        """The sampler's time grid: {meth}`timesteps` mapped to $t_k$, followed by $t = 0$."""
        k = self.timesteps(n_steps, spacing, steps_offset)
        return torch.cat([self.t_of_index(k), torch.zeros(1, dtype=torch.float64)])


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    r"""Lin et al. (2024), Algorithm 1: rescale a discrete schedule to zero terminal SNR.

    With $\sqrt{\bar\alpha_k}$ the signal coefficients of ``betas`` ($\bar\alpha_k = \prod_{i\le k}(1-\beta_i)$,
    $k = 0, \dots, T-1$), the rescaled coefficients are the affine map that keeps the first and
    sends the last to zero,

    $$\sqrt{\bar\alpha'_k} = \big(\sqrt{\bar\alpha_k} - \sqrt{\bar\alpha_{T-1}}\big)\,
    \frac{\sqrt{\bar\alpha_0}}{\sqrt{\bar\alpha_0} - \sqrt{\bar\alpha_{T-1}}},$$

    and the returned betas are $\beta'_k = 1 - \bar\alpha'_k/\bar\alpha'_{k-1}$ ($\beta'_0 = 1 - \bar\alpha'_0
    = \beta_0$). The last one is exactly 1: the last level is pure noise, $\mathrm{SNR}_{T-1} = 0$.
    ``betas``: 1-D, at least 2 entries, each in $(0, 1)$. Returns float64.

    ```python
    >>> import torch
    >>> b = rescale_zero_terminal_snr(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    >>> round(float(b[0]), 12), float(b[-1])  # the first level kept (to rounding), the last pure noise
    (0.0001, 1.0)

    ```
    """
    betas = torch.as_tensor(betas)
    if not betas.is_floating_point() or betas.ndim != 1 or betas.numel() < 2:
        raise ValueError(f"betas must be a 1-D floating tensor with at least 2 entries; got {tuple(betas.shape)} "
                         f"of {betas.dtype}")
    if bool(((betas <= 0) | (betas >= 1) | betas.isnan()).any()):
        lo, hi = float(betas.min()), float(betas.max())
        raise ValueError(f"betas must lie in (0, 1); got values in [{lo:.6g}, {hi:.6g}]")
    betas = betas.to(torch.float64)
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


SCHEDULES: dict[str, type[Schedule]] = {
    "ve": VESchedule,
    "vp-linear": VPLinearSchedule,
    "vp-cosine": VPCosineSchedule,
    "flow": FlowMatchingSchedule,
    "edm": EDMSchedule,
    "discrete-vp": DiscreteVPSchedule,
}


def get_schedule(name: str, **kwargs) -> Schedule:
    """The schedule called ``name`` (a key of {data}`SCHEDULES`), built with ``kwargs``."""
    try:
        cls = SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}") from None
    return cls(**kwargs)


def _check_steps(n_steps: int) -> None:
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1; got {n_steps!r}")


def shift_time(t: Tensor | float, shift: float) -> Tensor:
    r"""The time shift of Stable Diffusion 3 (Esser et al. 2024): $t' = \frac{s t}{1 + (s-1)t}$.

    A shift $s > 1$ spends more of the grid at high noise, which higher resolutions need.
    Apply it once: diffusers' ``FlowMatchEulerDiscreteScheduler`` applies it twice when
    both ``shift`` and ``set_timesteps`` act (its issue 13243); here it is one function.
    """
    if not shift > 0:
        raise ValueError(f"shift must be positive; got {shift}")
    t = _as_time(t)
    return shift * t / (1.0 + (shift - 1.0) * t)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    r"""Karras et al. (2022, eq. 5): $n$ noise levels from $\sigma_{\max}$ down to $\sigma_{\min}$,

    $\sigma_i = \big(\sigma_{\max}^{1/\rho} + \tfrac{i}{n-1}(\sigma_{\min}^{1/\rho}
    - \sigma_{\max}^{1/\rho})\big)^\rho$, $i = 0, \dots, n-1$ (float64, descending).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


SPACINGS = ("uniform", "quadratic", "karras", "logsnr", "cosine", *TIMESTEP_SPACINGS)


def _top_noise_level(schedule: Schedule, t_max: float, sigma_max: float | None, spacing: str) -> float:
    """The VE noise level a grid starts from: ``sigma_max``, else the schedule's level at ``t_max``."""
    if sigma_max is not None:
        if not (math.isfinite(sigma_max) and sigma_max > 0):
            raise ValueError(f"sigma_max must be a positive finite number; got {sigma_max}")
        return float(sigma_max)
    s_max = float(schedule.sigma_ve(t_max))
    if not math.isfinite(s_max):
        raise ValueError(
            f"the schedule's noise level at t_max={t_max} is infinite; pass sigma_max "
            f"or a smaller t_max for spacing={spacing!r}"
        )
    return s_max


def time_grid(
    n_steps: int,
    spacing: str = "uniform",
    schedule: Schedule | None = None,
    *,
    t_max: float = 1.0,
    sigma_min: float = 0.002,
    sigma_max: float | None = None,
    rho: float = 7.0,
    shift: float | None = None,
    steps_offset: int = 0,
) -> Tensor:
    r"""A descending grid $t_0 = t_{\max} > t_1 > \dots > t_n = 0$ for an $n$-step sampler.

    ``spacing``:

    - ``"uniform"``: $t_i = t_{\max}(1 - i/n)$; with $t_{\max}=1$ this is the tutorial's
      $1, 1-\Delta t, \dots, \Delta t, 0$ with $\Delta t = 1/n$.
    - ``"quadratic"``: $t_i = t_{\max}(1 - i/n)^2$, finer near the data (Song et al. 2021).
    - ``"karras"``: the $\rho$-spaced VE noise levels of {func}`karras_sigmas` between
      ``sigma_min`` and ``sigma_max`` (default: the schedule's level at $t_{\max}$), mapped to
      times through the schedule's $\lambda^{-1}$, then $t = 0$. Needs ``schedule``.
    - ``"logsnr"``: $n$ times evenly spaced in $\lambda(t) = \log(\alpha^2/\sigma^2)$, from
      $\lambda_0 = \lambda(t_{\max})$ (or $-2\log$ ``sigma_max`` when given) up to
      $\lambda_{n-1} = -2\log$ ``sigma_min``, then $t = 0$:
      $t_i = \lambda^{-1}\big(\lambda_0 + \tfrac{i}{n-1}(\lambda_{n-1} - \lambda_0)\big)$,
      $i = 0, \dots, n-1$. Every step but the last (which denoises, $\lambda = \infty$) then
      has the same $h = \Delta\lambda/2$ of the exponential integrators (DPM-Solver, UniPC);
      it is Karras' grid in the limit $\rho \to \infty$ ("exponential" in k-diffusion) and
      works for any schedule. Needs ``schedule``.
    - ``"cosine"``: the uniform grid of the cosine schedule (Nichol & Dhariwal 2021, offset 0),
      carried to any schedule through $\lambda$: the VE noise levels
      $\tilde\sigma_i = \tan\big(\tfrac\pi2u_0(1 - i/n)\big)$, $i = 0, \dots, n$, with
      $u_0 = \tfrac2\pi\arctan\tilde\sigma(t_{\max})$ so that $t_0 = t_{\max}$ (and $u_0 = 1$ when
      $\tilde\sigma(t_{\max}) = \infty$, as for flow matching at $t = 1$). In log-SNR,
      $\lambda_i = 2\log\tan\frac{\pi i}{2n}$ when $u_0 = 1$: symmetric about $\lambda = 0$
      (SNR 1, the scale of unit-variance data), dense there and sparse at both ends. It is the
      default grid of {func}`stepdiff.samplers.sample`. Needs ``schedule``.
    - ``"leading"``, ``"trailing"``, ``"linspace"``: the diffusers spacings of a
      {class}`DiscreteVPSchedule` (see {meth}`DiscreteVPSchedule.timesteps`).

    ``shift`` applies {func}`shift_time` to the grid (Stable Diffusion 3).
    The grid is float64 on the CPU.
    """
    _check_steps(n_steps)
    if not 0 < t_max <= 1:
        raise ValueError(f"t_max must lie in (0, 1]; got {t_max}")
    i = torch.arange(n_steps + 1, dtype=torch.float64)
    if spacing == "uniform":
        ts = t_max * (1 - i / n_steps)
    elif spacing == "quadratic":
        ts = t_max * (1 - i / n_steps) ** 2
    elif spacing in ("karras", "logsnr"):
        if schedule is None:
            raise ValueError(f"spacing={spacing!r} needs the schedule (to map noise levels to times)")
        s_max = _top_noise_level(schedule, t_max, sigma_max, spacing)
        if spacing == "karras":
            sig = karras_sigmas(n_steps, sigma_min, s_max, rho)
            ts = schedule.t_from_sigma_ve(sig)
        else:
            if not 0 < sigma_min < s_max:
                raise ValueError(f"need 0 < sigma_min < sigma_max; got {sigma_min}, {s_max}")
            if sigma_max is not None and sigma_max > float(schedule.sigma_ve(1.0)) * (1 + 1e-9):
                raise ValueError(
                    f"sigma_max={sigma_max} is above the schedule's largest noise level "
                    f"{float(schedule.sigma_ve(1.0)):.6g} (at t = 1)"
                )
            # The ends in log-SNR: lambda = -2 log sigma_ve. With sigma_max from the schedule,
            # the first time is t_max itself, not its round trip through lambda^-1.
            ramp = torch.linspace(0, 1, n_steps, dtype=torch.float64)
            lam = -2.0 * math.log(s_max) + ramp * (2.0 * math.log(s_max) - 2.0 * math.log(sigma_min))
            ts = schedule.t_from_log_snr(lam)
            if sigma_max is None:
                ts[0] = t_max
        ts = torch.cat([ts.clamp(0.0, 1.0), torch.zeros(1, dtype=torch.float64)])
    elif spacing == "cosine":
        if schedule is None:
            raise ValueError("spacing='cosine' needs the schedule (to map noise levels to times)")
        u0 = 2.0 / math.pi * math.atan(float(schedule.sigma_ve(t_max)))  # atan(inf) = pi / 2
        ts = schedule.t_from_sigma_ve(torch.tan(math.pi / 2 * u0 * (1 - i[1:-1] / n_steps))).clamp(0.0, 1.0)
        ts = torch.cat([torch.full((1,), float(t_max), dtype=torch.float64), ts, torch.zeros(1, dtype=torch.float64)])
    elif spacing in TIMESTEP_SPACINGS:
        if not isinstance(schedule, DiscreteVPSchedule):
            raise ValueError(f"spacing={spacing!r} needs a DiscreteVPSchedule")
        ts = schedule.time_grid(n_steps, spacing, steps_offset)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
    if shift is not None:
        ts = shift_time(ts, shift)
    ts[-1] = 0.0
    return ts
