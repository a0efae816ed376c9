r"""Fused normalizations for the UNet and the DiT, each beside its PyTorch reference.

- `group_norm_silu`: $\mathrm{SiLU}(\mathrm{GroupNorm}(x))$, the pair that opens every residual
  block of a UNet, in one pass over memory instead of two (and no normalized tensor stored for
  the backward pass: it is recomputed from $x$ and two numbers per group);
- `adaln_modulate`: $\mathrm{LayerNorm}(x)\,(1 + \text{scale}) + \text{shift}$ with per-sample
  scale and shift, the adaptive LayerNorm of DiT blocks (Peebles & Xie 2023), likewise one pass.

**Backends**, as for the other kernels: CUDA tensors in float32, float16 or bfloat16 take the
Triton kernels of {py:mod}`stepdiff.kernels.norm_triton` (forward and backward, through a
``torch.autograd.Function``); everything else takes the references below. ``backend="triton"``
(or ``STEPDIFF_BACKEND=triton``) asks for the kernels on the CPU too, through Triton's
interpreter (float32 and float16 there); ``backend="torch"`` asks for the references.

Importing this module does not import Triton.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["adaln_modulate", "adaln_modulate_reference", "group_norm_silu", "group_norm_silu_reference"]

_BACKENDS = ("auto", "triton", "torch")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def group_norm_silu_reference(x: Tensor, num_groups: int, weight: Tensor | None = None,
                              bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    r"""$y = \mathrm{SiLU}(\mathrm{GroupNorm}_G(x; w, b))$ in plain PyTorch, computed in float32
    (float64 for float64 inputs) and returned in the dtype of ``x``. Differentiable."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = None if weight is None else weight.to(compute)
    b = None if bias is None else bias.to(compute)
    return F.silu(F.group_norm(x.to(compute), num_groups, w, b, eps)).to(x.dtype)


def adaln_modulate_reference(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    r"""$y = \mathrm{LN}(x)\,(1 + \text{scale}) + \text{shift}$ in plain PyTorch: ``x [B, L, D]``,
    ``shift, scale [B, D]`` (one per sample, the same for every token), LayerNorm over $D$
    without affine parameters. Computed in float32 (float64 for float64) and returned in the
    dtype of ``x``. Differentiable."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xn = F.layer_norm(x.to(compute), x.shape[-1:], eps=eps)
    return (xn * (1 + scale.to(compute)[:, None, :]) + shift.to(compute)[:, None, :]).to(x.dtype)


def _triton_module():
    from . import norm_triton

    return norm_triton


def _use_triton(x: Tensor, backend: str | None) -> bool:
    backend = backend or os.environ.get("STEPDIFF_BACKEND") or "auto"
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS} (or None); got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return x.is_cuda and x.dtype in _TRITON_DTYPES and importlib.util.find_spec("triton") is not None
    if x.dtype not in _TRITON_DTYPES:
        raise TypeError(f"the Triton kernels take float32, float16 or bfloat16; got {x.dtype}")
    if x.is_cuda:
        return True
    if x.device.type != "cpu":
        raise ValueError(f"the Triton kernels run on CUDA tensors (or CPU in the interpreter); got {x.device}")
    if x.dtype == torch.bfloat16:
        raise TypeError("bfloat16 is not supported by Triton's CPU interpreter; use float16/float32 on the CPU")
    loaded = sys.modules.get(f"{__package__}.launch")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" if loaded is None else loaded.INTERPRETED
    if not interpreted:
        raise RuntimeError("backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before the first Triton call")
    return True


def _check_tensor(name: str, t, x: Tensor | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {t.dtype}")
    if x is not None and t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_eps(eps) -> float:
    eps = float(eps)
    if not eps > 0:
        raise ValueError(f"eps must be positive; got {eps}")
    return eps


# --- GroupNorm + SiLU ------------------------------------------------------------------------------


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps):
        y, mean, rstd = _triton_module().group_norm_silu_forward(x, num_groups, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups = num_groups
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = _triton_module().group_norm_silu_backward(dy, x, ctx.num_groups, weight, bias, mean, rstd)
        return dx, dw, db, None, None


def group_norm_silu(x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
                    eps: float = 1e-5, *, backend: str | None = None) -> Tensor:
    r"""$y = \mathrm{SiLU}(\mathrm{GroupNorm}_G(x; w, b))$, one pass over memory, differentiable.

    ``x [N, C, *spatial]`` (any number of spatial dims, NCHW or channels-last), ``num_groups``
    $G$ dividing $C$, optional ``weight``, ``bias`` ``[C]``; the same arguments and result as
    ``F.silu(F.group_norm(x, num_groups, weight, bias, eps))``. Statistics per (sample, group)
    over $C/G$ channels and all positions, biased variance, float32 arithmetic, result in the
    dtype of ``x`` (channels-last if ``x`` is). ``backend`` as in the module docstring.
    """
    _check_tensor("x", x)
    if x.ndim < 2:
        raise ValueError(f"x must be [N, C, *spatial]; got shape {tuple(x.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int; got {num_groups!r}")
    C = x.shape[1]
    if C % num_groups:
        raise ValueError(f"num_groups {num_groups} must divide the {C} channels of x")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check_tensor(name, t, x)
            if t.shape != (C,):
                raise ValueError(f"{name} must have shape [C] = [{C}]; got {list(t.shape)}")
    eps = _check_eps(eps)
    if not _use_triton(x, backend):
        return group_norm_silu_reference(x, num_groups, weight, bias, eps)
    if weight is not None and not weight.is_contiguous():
        weight = weight.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _GroupNormSiLU.apply(x, weight, bias, num_groups, eps)
    return _triton_module().group_norm_silu_forward(x, num_groups, weight, bias, eps)[0]


# --- adaLN modulate --------------------------------------------------------------------------------


class _AdaLN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        y, mean, rstd = _triton_module().adaln_forward(x, shift, scale, eps)
        ctx.save_for_backward(x, scale, mean, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, scale, mean, rstd = ctx.saved_tensors
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        dx, dshift, dscale = _triton_module().adaln_backward(dy, x, scale, mean, rstd)
        return dx, dshift.to(scale.dtype), dscale.to(scale.dtype), None


def adaln_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, *,
                   backend: str | None = None) -> Tensor:
    r"""$y = \mathrm{LN}(x)\,(1 + \text{scale}) + \text{shift}$, one pass over memory, differentiable.

    ``x [B, L, D]`` tokens; ``shift``, ``scale`` ``[B, D]`` per sample (a DiT block's adaLN
    output, the same for all tokens of a sample); LayerNorm over $D$ without affine parameters
    (mean, biased variance, ``eps`` as in DiT: ``1e-6``). Float32 arithmetic, result in the
    dtype of ``x``. ``backend`` as in the module docstring. The Triton path holds a whole token
    in registers: $D \le 16384$.
    """
    _check_tensor("x", x)
    if x.ndim != 3:
        raise ValueError(f"x must be [B, L, D]; got shape {tuple(x.shape)}")
    B, _, D = x.shape
    for name, t in (("shift", shift), ("scale", scale)):
        _check_tensor(name, t, x)
        if t.shape != (B, D):
            raise ValueError(f"{name} must have shape [B, D] = [{B}, {D}]; got {list(t.shape)}")
    eps = _check_eps(eps)
    if not _use_triton(x, backend):
        return adaln_modulate_reference(x, shift, scale, eps)
    if D > 16384:
        raise ValueError(f"the Triton adaLN kernel holds a token in registers: D must be at most 16384; got {D}")
    x, shift, scale = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, shift, scale))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, shift, scale)):
        return _AdaLN.apply(x, shift, scale, eps)
    return _triton_module().adaln_forward(x, shift, scale, eps)[0]
