r"""The fused elementwise updates of diffusion: the forward noising and the sampler step.

Public functions (each dispatches on the device of its inputs):

- :func:`affine_step`: $x' = c_x x + c_{\rm pred}\,\mathrm{clamp}(p) + c_{\rm noise} z$, the form of
  every DDPM, DDIM, $x_0$-parametrized and Euler update;
- :func:`noise_add`: $x_t = a x_0 + s\varepsilon$ together with a target $c_0x_0 + c_1\varepsilon$.

Noise comes from ``noise`` when given, else from ``generator`` (a ``torch.Generator`` on the
device of the data, or ``None`` for the global one).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import affine_step_reference, noise_add_reference

__all__ = ["affine_step", "noise_add"]


def _check_tensor(name: str, t: Tensor, like: Tensor | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {t.dtype}")
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(f"{name} must have the shape of x, {tuple(like.shape)}; got {tuple(t.shape)}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but x is on {like.device}")


def _check_coefficient(name: str, c, x: Tensor) -> None:
    if c is None or not isinstance(c, Tensor):
        return
    if c.ndim > 1 or (c.ndim == 1 and c.shape[0] != x.shape[0]):
        raise ValueError(
            f"{name} must be a scalar or have shape [{x.shape[0]}] (one per sample); got {tuple(c.shape)}"
        )
    if c.device != x.device:
        raise ValueError(f"{name} is on {c.device} but x is on {x.device}")


def _draw_noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def affine_step(
    x: Tensor,
    pred: Tensor,
    c_x: Tensor | float,
    c_pred: Tensor | float,
    c_noise: Tensor | float | None = None,
    *,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    clamp: float | None = None,
) -> Tensor:
    r"""One sampler update $x' = c_x\,x + c_{\rm pred}\,\mathrm{clamp}(p) + c_{\rm noise}\,z$.

    ``x`` and ``pred`` have shape ``[B, ...]``; each coefficient is a scalar or a ``[B]``
    tensor (one value per sample). ``c_noise=None`` means a deterministic step.
    """
    _check_tensor("x", x)
    _check_tensor("pred", pred, x)
    for name, c in (("c_x", c_x), ("c_pred", c_pred), ("c_noise", c_noise)):
        _check_coefficient(name, c, x)
    if c_noise is not None:
        if noise is None:
            noise = _draw_noise(x, generator)
        else:
            _check_tensor("noise", noise, x)
    return affine_step_reference(x, pred, c_x, c_pred, c_noise, noise, clamp)


def noise_add(
    x0: Tensor,
    a: Tensor | float,
    s: Tensor | float,
    c0: Tensor | float | None = None,
    c1: Tensor | float | None = None,
    *,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""$x_t = a\,x_0 + s\,\varepsilon$ and the target $c_0x_0 + c_1\varepsilon$ (default: $\varepsilon$)."""
    _check_tensor("x0", x0)
    for name, c in (("a", a), ("s", s), ("c0", c0), ("c1", c1)):
        _check_coefficient(name, c, x0)
    if noise is None:
        noise = _draw_noise(x0, generator)
    else:
        _check_tensor("noise", noise, x0)
    return noise_add_reference(x0, a, s, noise, c0, c1)
