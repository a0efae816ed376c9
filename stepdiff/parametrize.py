r"""What a network predicts: $x_0$, $\varepsilon$, $v$, the score, or the velocity.

On a Gaussian path $x_t = \alpha x_0 + \sigma\varepsilon$ (see {mod}`stepdiff.schedules`) every
common prediction target is a fixed linear combination of $x_0$ and $\varepsilon$:

| name | target | $(A, B)$ in $A x_0 + B\varepsilon$ |
|---|---|---|
| ``"x0"`` | the clean sample | $(1, 0)$ |
| ``"eps"`` | the noise | $(0, 1)$ |
| ``"v"`` | $v = \alpha\varepsilon - \sigma x_0$ (Salimans & Ho 2022) | $(-\sigma, \alpha)$ |
| ``"score"`` | $\nabla_x \log p_t(x_t)$, whose conditional form is $-\varepsilon/\sigma$ | $(0, -1/\sigma)$ |
| ``"velocity"`` | $dx_t/dt = \dot\alpha x_0 + \dot\sigma\varepsilon$ (flow matching) | $(\dot\alpha, \dot\sigma)$ |

A network trained by squared error on any of them predicts the conditional expectation of
that target given $x_t$, and because the map is linear the expectations convert exactly:
knowing $x_t$ and one prediction $p = A_s\hat x_0 + B_s\hat\varepsilon$, the pair
$(\hat x_0, \hat\varepsilon)$ solves

$$\begin{pmatrix} x_t \\ p \end{pmatrix} = \begin{pmatrix} \alpha & \sigma \\ A_s & B_s \end{pmatrix}
\begin{pmatrix} \hat x_0 \\ \hat\varepsilon \end{pmatrix},$$

so every conversion is affine, $p_{\rm dst} = a\, x_t + b\, p_{\rm src}$ with
$a = (A_d B_s - B_d A_s)/\det$, $b = (B_d\alpha - A_d\sigma)/\det$, $\det = \alpha B_s - \sigma A_s$.
The $v$ of Salimans & Ho is defined for variance-preserving paths ($\alpha^2+\sigma^2=1$); the
same formula is used on any path here (the tutorial quotes it in its VE setting, where
$\alpha = 1$ and $v = \varepsilon - \sigma x_0$).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .schedules import Schedule, _as_time

__all__ = ["PREDICTIONS", "target_coefficients", "conversion_coefficients", "convert", "broadcast_to"]

PREDICTIONS = ("x0", "eps", "v", "score", "velocity")


def _check_prediction(name: str, arg: str = "prediction") -> None:
    if name not in PREDICTIONS:
        raise ValueError(f"unknown {arg} {name!r}; choose one of {PREDICTIONS}")


def target_coefficients(schedule: Schedule, t: Tensor | float, prediction: str) -> tuple[Tensor, Tensor]:
    r"""$(A, B)$ with target $= A x_0 + B\varepsilon$ at time(s) ``t`` (see the module table)."""
    _check_prediction(prediction)
    t = _as_time(t)
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    if prediction == "x0":
        return one, zero
    if prediction == "eps":
        return zero, one
    if prediction == "v":
        return -schedule.sigma(t), schedule.alpha(t)
    if prediction == "score":
        return zero, -1.0 / schedule.sigma(t)
    return schedule.d_alpha(t), schedule.d_sigma(t)


def conversion_coefficients(
    schedule: Schedule, t: Tensor | float, src: str, dst: str
) -> tuple[Tensor, Tensor]:
    r"""$(a, b)$ such that a ``dst`` prediction is $a\,x_t + b\,p_{\rm src}$ at time(s) ``t``."""
    _check_prediction(src, "src")
    _check_prediction(dst, "dst")
    t = _as_time(t)
    if src == dst:
        return torch.zeros_like(t), torch.ones_like(t)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    A_s, B_s = target_coefficients(schedule, t, src)
    A_d, B_d = target_coefficients(schedule, t, dst)
    det = alpha * B_s - sigma * A_s
    return (A_d * B_s - B_d * A_s) / det, (B_d * alpha - A_d * sigma) / det


def broadcast_to(c: Tensor, x: Tensor) -> Tensor:
    """Reshape a scalar or per-sample ``[B]`` coefficient to multiply ``x`` of shape ``[B, ...]``."""
    c = torch.as_tensor(c).to(device=x.device, dtype=x.dtype)
    if c.ndim == 0:
        return c
    if c.ndim != 1 or c.shape[0] != x.shape[0]:
        raise ValueError(
            f"a per-sample coefficient must have shape [{x.shape[0]}] (the batch of x); "
            f"got {tuple(c.shape)}"
        )
    return c.reshape(-1, *([1] * (x.ndim - 1)))


def convert(
    pred: Tensor, x: Tensor, t: Tensor | float, schedule: Schedule, src: str, dst: str
) -> Tensor:
    r"""Turn a ``src`` prediction at $x_t$ into a ``dst`` prediction: $a\,x_t + b\,p$.

    ``t`` is a scalar or a per-sample tensor of shape ``[B]``. The arithmetic is done in
    float64 for the coefficients and in the dtype of ``pred`` for the tensors.

    On the tutorial's process at $\sigma(t) = 1$, the clean sample from a noise prediction is
    $\hat x_0 = x_t - \sigma\hat\varepsilon$, and converting there and back is the identity:

    ```python
    >>> import torch
    >>> from stepdiff.schedules import VESchedule
    >>> ve, x = VESchedule(sigma_q=2.0), torch.tensor([[1.0, 0.5]])
    >>> eps = torch.tensor([[0.2, -0.4]])
    >>> convert(eps, x, 0.25, ve, "eps", "x0")
    tensor([[0.8000, 0.9000]])
    >>> convert(convert(eps, x, 0.25, ve, "eps", "v"), x, 0.25, ve, "v", "eps")
    tensor([[ 0.2000, -0.4000]])

    ```
    """
    if pred.shape != x.shape:
        raise ValueError(f"pred and x must have the same shape; got {tuple(pred.shape)} and {tuple(x.shape)}")
    a, b = conversion_coefficients(schedule, _as_time(t).to(torch.float64), src, dst)
    return broadcast_to(a, pred) * x + broadcast_to(b, pred) * pred
