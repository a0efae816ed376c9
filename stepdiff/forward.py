r"""The forward (noising) process: from data to noise, in one jump or step by step.

In one jump, $x_t = \alpha(t)\,x_0 + \sigma(t)\,\varepsilon$ ({func}`add_noise`), which is how
training draws $x_t$ without simulating the steps before it. Step by step, the same
marginals come from the Markov chain ({func}`transition`)

$$x_s = \frac{\alpha_s}{\alpha_t} x_t + \sqrt{\sigma_s^2 - \frac{\alpha_s^2}{\alpha_t^2}\sigma_t^2}\;\eta,
\qquad s > t,\ \eta\sim\mathcal N(0, I),$$

which for the tutorial's process ($\alpha = 1$, $\sigma_t^2 = \sigma_q^2 t$) is its eq. 11,
$x_{t+\Delta t} = x_t + \mathcal N(0, \sigma_q^2\Delta t)$.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import noise_add
from .parametrize import target_coefficients
from .schedules import Schedule, _as_time, check_time

__all__ = ["add_noise", "transition", "simulate_forward"]


def _per_sample_time(t: Tensor | float, x: Tensor, name: str = "t") -> Tensor:
    """``t`` as float64 on the device of ``x``: a scalar, or ``[B]`` matching the batch."""
    t = check_time(t, name).to(device=x.device, dtype=torch.float64)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x.shape[0]):
        raise ValueError(
            f"{name} must be a scalar or have one entry per sample, shape [{x.shape[0]}]; "
            f"got shape {tuple(t.shape)} for x of shape {tuple(x.shape)}"
        )
    return t


def add_noise(
    x0: Tensor,
    t: Tensor | float,
    schedule: Schedule,
    *,
    prediction: str = "eps",
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Draw $x_t = \alpha(t)x_0 + \sigma(t)\varepsilon$ and the regression target for ``prediction``.

    ``t`` is a scalar or per-sample ``[B]``. Returns ``(x_t, target)`` where the target is
    $A x_0 + B\varepsilon$ with the coefficients of {func}`stepdiff.parametrize.target_coefficients`
    (``"eps"``: the noise; ``"x0"``: the clean sample; ``"v"``; ``"velocity"``: $dx_t/dt$).
    On CUDA this is one fused kernel that draws $\varepsilon$ itself.

    On the tutorial's process ($\alpha = 1$, $\sigma(t) = \sigma_q\sqrt t$, so $\sigma(0.25) = 1$
    for $\sigma_q = 2$), with the noise given:

    ```python
    >>> import torch
    >>> from stepdiff.schedules import VESchedule
    >>> x0, eps = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 0.5]])
    >>> x_t, target = add_noise(x0, 0.25, VESchedule(sigma_q=2.0), noise=eps)
    >>> x_t, target  # x0 + 1 * eps, and the "eps" target is the noise
    (tensor([[ 1.5000, -1.5000]]), tensor([[0.5000, 0.5000]]))

    ```
    """
    t = _per_sample_time(t, x0)
    A, B = target_coefficients(schedule, t, prediction)
    a, s = schedule.alpha(t), schedule.sigma(t)
    # The kernels compute in float32; float64 data keep float64 coefficients (the reference path).
    cdtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    return noise_add(
        x0, a.to(cdtype), s.to(cdtype), A.to(cdtype), B.to(cdtype), noise=noise, generator=generator
    )


def transition(
    x_t: Tensor,
    t: Tensor | float,
    s: Tensor | float,
    schedule: Schedule,
    *,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""One forward Markov step from time $t$ to a later time $s > t$ (see the module docstring)."""
    t, s = _per_sample_time(t, x_t, "t"), _per_sample_time(s, x_t, "s")
    if bool((s < t).any()):
        raise ValueError("transition goes forward in time: need s >= t")
    ratio = schedule.alpha(s) / schedule.alpha(t)
    var = (schedule.sigma(s) ** 2 - ratio**2 * schedule.sigma(t) ** 2).clamp(min=0.0)
    x_s, _ = noise_add(x_t, ratio, var.sqrt(), noise=noise, generator=generator)
    return x_s


def simulate_forward(
    x0: Tensor, schedule: Schedule, ts: Tensor, *, generator: torch.Generator | None = None
) -> Tensor:
    r"""Run the forward chain through the increasing times ``ts`` (``ts[0]`` may be 0).

    Returns the trajectory, shape ``[len(ts), *x0.shape]``; entry $i$ is distributed as
    $x_{t_i}$ given $x_0$, whatever the step sizes.
    """
    ts = check_time(_as_time(ts), "ts").reshape(-1)
    if bool((ts[1:] <= ts[:-1]).any()):
        raise ValueError("ts must be strictly increasing")
    x = add_noise(x0, ts[0], schedule, generator=generator)[0] if ts[0] > 0 else x0.clone()
    out = [x]
    for t, s in zip(ts[:-1], ts[1:]):
        x = transition(x, t, s, schedule, generator=generator)
        out.append(x)
    return torch.stack(out)
