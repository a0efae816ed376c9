r"""PyTorch references for the fused elementwise kernels: written for clarity, not speed.

These define what the Triton kernels compute; the tests compare the two, and CPU tensors
run these. All arithmetic is in float32 (or float64 for float64 inputs) and the result is
cast back to the input dtype, as the kernels do.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["affine_step_reference", "noise_add_reference"]


def _per_sample(c: Tensor | float | None, x: Tensor, compute: torch.dtype) -> Tensor:
    """A scalar or ``[B]`` coefficient shaped to broadcast over ``x`` of shape ``[B, ...]``."""
    if c is None:
        return torch.zeros((), device=x.device, dtype=compute)
    c = torch.as_tensor(c, device=x.device).to(compute)
    return c.reshape(-1, *([1] * (x.ndim - 1))) if c.ndim == 1 else c


def affine_step_reference(
    x: Tensor,
    pred: Tensor,
    c_x: Tensor | float,
    c_pred: Tensor | float,
    c_noise: Tensor | float | None = None,
    noise: Tensor | None = None,
    clamp: float | None = None,
) -> Tensor:
    r"""$x' = c_x\,x + c_{\rm pred}\,\mathrm{clamp}(p) + c_{\rm noise}\,z$, coefficients per sample.

    ``noise`` is the standard normal $z$ (required when ``c_noise`` is given); ``clamp``
    clips the prediction to $[-c, c]$ first (the ``clip_sample`` of DDPM/DDIM on pixels).
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    p = pred.to(compute)
    if clamp is not None:
        p = p.clamp(-clamp, clamp)
    out = _per_sample(c_x, x, compute) * x.to(compute) + _per_sample(c_pred, x, compute) * p
    if c_noise is not None:
        out = out + _per_sample(c_noise, x, compute) * noise.to(compute)
    return out.to(x.dtype)


def noise_add_reference(
    x0: Tensor,
    a: Tensor | float,
    s: Tensor | float,
    noise: Tensor,
    c0: Tensor | float | None = None,
    c1: Tensor | float | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The forward process and a regression target from the same noise $\varepsilon$:

    $x_t = a\,x_0 + s\,\varepsilon$ and target $= c_0 x_0 + c_1\varepsilon$ (per sample; by
    default $c_0 = 0$, $c_1 = 1$, the noise itself). With $(c_0, c_1) = (-s, a)$ the target is
    $v$, with $(\dot a, \dot s)$ the velocity, with $(1, 0)$ the clean sample.
    """
    compute = torch.float64 if x0.dtype == torch.float64 else torch.float32
    x = x0.to(compute)
    eps = noise.to(compute)
    x_t = _per_sample(a, x0, compute) * x + _per_sample(s, x0, compute) * eps
    if c0 is None and c1 is None:
        target = eps
    else:
        target = _per_sample(c0, x0, compute) * x + _per_sample(c1, x0, compute) * eps
    return x_t.to(x0.dtype), target.to(x0.dtype)
