r"""What the image networks share: the sinusoidal time embedding and the checks of their inputs.

Every image denoiser of the package ({class}`~stepdiff.models.unet.UNet`,
{class}`~stepdiff.models.dit.DiT`) is called as ``model(x, t, y=None, context=None,
context_mask=None)``:

- ``x`` ``[B, C, H, W]``, ``t`` a float or ``[B]`` in $[0, 1]$;
- ``y`` ``[B]`` class ids in $0..K$, where $K$ = ``n_classes`` is the null class ("no label");
- ``context`` ``[B, L, D_c]`` (text tokens) with ``context_mask`` ``[B, L]`` (``True`` for a
  real token, padding on the right).

The helpers here check those arguments once per call, with errors that name the argument and
the offending value, so that a wrong input never fails deep inside a convolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["timestep_embedding", "TimestepEmbedder", "PooledContext", "zero_", "batch_time", "check_labels",
           "check_context", "check_backend", "check_text_routes"]

KERNEL_BACKENDS = (None, "auto", "triton", "torch")


def _capturing() -> bool:
    """Whether a CUDA graph is being captured: values on the device cannot be read then."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_backend(name: str, value, attention: bool = False) -> None:
    """Check a model's kernel backend setting: ``None`` (by device), ``"auto"``, ``"triton"`` or
    ``"torch"`` (see {mod}`stepdiff.kernels`); for attention also ``"sdpa"``, PyTorch's
    ``scaled_dot_product_attention`` (the baseline a plain PyTorch model would use)."""
    allowed = KERNEL_BACKENDS + (("sdpa",) if attention else ())
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}")


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, time_scale: float = 1000.0) -> Tensor:
    r"""Sinusoidal features of the time, as in the Transformer and DDPM: ``[B]`` to ``[B, dim]``.

    $$\gamma(t) = \big(\cos(s t\,\omega_k),\ \sin(s t\,\omega_k)\big)_{k < \mathrm{dim}/2},\qquad
    \omega_k = P^{-k/(\mathrm{dim}/2)},$$

    with $P$ = ``max_period`` and $s$ = ``time_scale``. DDPM and DiT embed an integer step
    $0..999$; the package's continuous $t\in[0,1]$ is scaled by $s = 1000$ so that the same
    frequencies see the same spacing of noise levels. Computed in float32 whatever the input
    dtype (a bfloat16 $t$ would round $1000t$ to steps of up to 4). An odd ``dim`` gets one zero
    feature at the end.
    """
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * k / half)
    angles = (time_scale * t.float())[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


class TimestepEmbedder(nn.Module):
    r"""$e(t) = W_2\,\mathrm{SiLU}(W_1\gamma(t) + b_1) + b_2$: sinusoidal features, then a 2-layer MLP.

    ``freq_dim`` features of {func}`timestep_embedding` to ``dim`` outputs (DDPM: the base
    width to 4x it; DiT: 256 to the hidden width).
    """

    def __init__(self, freq_dim: int, dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_embedding(t, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class PooledContext(nn.Module):
    r"""The caption as one vector, for the time embedding: $W\bar c + b$ with
    $\bar c = \sum_l m_l c_l / \sum_l m_l$ the mean of the real tokens of ``context`` ``[B, L, D_c]``
    (``context_mask`` ``[B, L]``, ``True`` for a real token; ``None``: all real).

    A model adds it to $e(t)$ (SDXL adds its text encoder's pooled vector to the time embedding
    the same way, Podell et al. 2023), so the caption reaches every block that the time
    reaches, not only the cross-attention layers. $W$ and $b$ start at zero: the new path is
    switched off at initialisation, and the model computes exactly what it did without it.
    The parameters are made as zeros, not by an initialiser, so that building the layer draws no
    random numbers: a model seeded alike gets the same other weights with or without it. The mean is
    taken in float32 (a bf16 sum over tokens would round).

    ``gain`` $g > 0$ starts the layer switched *on* instead: $W_{ij} \sim \mathcal N(0, g^2/D_c)$, so
    token vectors of unit variance move each coordinate of $e$ by about $g$ from the first step, as
    a class embedding drawn from $\mathcal N(0, 1)$ does (that draw does use the random stream).
    """

    def __init__(self, context_dim: int, dim: int, gain: float = 0.0) -> None:
        super().__init__()
        if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not gain >= 0:
            raise ValueError(f"gain must be a number >= 0; got {gain!r}")
        self.weight = nn.Parameter(torch.zeros(dim, context_dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        if gain > 0:
            with torch.no_grad():
                self.weight.normal_(0.0, gain / context_dim**0.5)

    def forward(self, context: Tensor, context_mask: Tensor | None) -> Tensor:
        c = context.float()
        if context_mask is None:
            pooled = c.mean(1)
        else:
            m = context_mask.to(c.dtype)[..., None]  # [B, L, 1]
            pooled = (c * m).sum(1) / m.sum(1).clamp_min(1.0)  # a row with no real token pools to 0
        return F.linear(pooled.to(self.weight.dtype), self.weight, self.bias)


def zero_(module: nn.Module) -> nn.Module:
    r"""Set every parameter of ``module`` to zero, $\theta \leftarrow 0$, and return it: a residual branch
    $x + f_\theta(x)$ whose last layer is zeroed starts as the identity $x$ (switched off)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def batch_time(t: Tensor | float, batch: int, device: torch.device) -> Tensor:
    r"""``t`` as a float32 tensor ``[B]``: a scalar $t$ becomes $(t, \dots, t) \in \mathbb R^B$, a ``[B]``
    tensor is kept; any other shape, or a ``t`` neither floating-point nor int32/int64, is an error."""
    t = torch.as_tensor(t, device=device)
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"t must be a real number or a float tensor; got dtype {t.dtype}")
    t = t.float()
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or have shape [{batch}] (one per sample); got {tuple(t.shape)}")
    return t


def check_labels(y: Tensor | None, n_classes: int, batch: int, device: torch.device) -> Tensor | None:
    """Labels ``[B]`` in $0..K$ ($K$ = ``n_classes``, the null class); ``None`` becomes all-null for a
    conditional model and stays ``None`` for an unconditional one."""
    if y is None:
        return torch.full((batch,), n_classes, device=device, dtype=torch.long) if n_classes > 0 else None
    if n_classes == 0:
        raise ValueError("this model is unconditional (n_classes = 0) but got labels y")
    if not isinstance(y, Tensor) or y.shape != (batch,) or y.dtype not in (torch.int32, torch.int64):
        desc = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"y must be integer labels of shape [{batch}]; got {desc}")
    # Reading the values synchronises with the device, which a CUDA graph capture forbids: there
    # they are the ones checked when the sampler was warmed up (stepdiff.fast).
    if y.numel() and not (y.is_cuda and _capturing()) and (int(y.min()) < 0 or int(y.max()) > n_classes):
        raise ValueError(
            f"y must lie in 0..{n_classes} (the last is the null class); got values in [{int(y.min())}, {int(y.max())}]"
        )
    return y.to(device=device, dtype=torch.long)


def check_text_routes(context_dim: int, pooled_context, pooled_gain, cross_attention) -> None:
    r"""Check the options of how a context reaches a model (its {class}`~stepdiff.models.unet.UNetConfig`
    or {class}`~stepdiff.models.dit.DiTConfig` fields): ``pooled_context`` and ``cross_attention``
    booleans, ``pooled_gain`` a number $\ge 0$ that needs the pool, no model without cross-attention
    unless it pools, and no pool without a context (``context_dim > 0``). Errors name the option."""
    if not isinstance(pooled_context, bool):
        raise ValueError(f"pooled_context must be True or False; got {pooled_context!r}")
    if isinstance(pooled_gain, bool) or not isinstance(pooled_gain, (int, float)) or not pooled_gain >= 0:
        raise ValueError(f"pooled_gain must be a number >= 0; got {pooled_gain!r}")
    if not isinstance(cross_attention, bool):
        raise ValueError(f"cross_attention must be True or False; got {cross_attention!r}")
    if not cross_attention and not pooled_context:
        raise ValueError("cross_attention = False leaves the context only the pool: it needs pooled_context = True")
    if pooled_gain and not pooled_context:
        raise ValueError("pooled_gain sets how the pool starts: it needs pooled_context = True")
    if pooled_context and not context_dim:
        raise ValueError("pooled_context = True pools the context: it needs context_dim > 0 (a text-conditioned model)")


def check_context(
    context: Tensor | None, context_mask: Tensor | None, context_dim: int, batch: int
) -> tuple[Tensor | None, Tensor | None]:
    r"""Check a context ``[B, L, D_c]`` against the model's ``context_dim`` (0: no cross-attention) and
    its mask ``[B, L]`` (bool); returns them unchanged. Accepted: a float context in
    $\mathbb R^{B \times L \times D_c}$ with $B$ the batch of ``x``, $L \ge 1$ and $D_c$ = ``context_dim`` $> 0$,
    and a mask of shape $B \times L$ or none; no context (and no mask) exactly when ``context_dim`` $= 0$.
    Whether the mask is a right-padding mask is checked by {class}`~stepdiff.models.attention.Attention`."""
    if context is None:
        if context_mask is not None:
            raise ValueError("context_mask was given without a context")
        if context_dim > 0:
            raise ValueError(
                f"this model attends to a context of width {context_dim} (context_dim) and needs one: "
                "pass context [B, L, context_dim] (a guidance or text wrapper supplies it for sampling)"
            )
        return None, None
    if context_dim == 0:
        raise ValueError("this model has no cross-attention (context_dim = 0) but got a context")
    if not isinstance(context, Tensor) or context.ndim != 3 or not context.is_floating_point():
        desc = f"{context.dtype} {tuple(context.shape)}" if isinstance(context, Tensor) else type(context).__name__
        raise ValueError(f"context must be a float tensor [B, L, {context_dim}]; got {desc}")
    if context.shape[0] != batch or context.shape[2] != context_dim or context.shape[1] < 1:
        raise ValueError(
            f"context must have shape [{batch}, L, {context_dim}] (batch of x, L >= 1, the model's "
            f"context_dim); got {tuple(context.shape)}"
        )
    if context_mask is not None and (
        not isinstance(context_mask, Tensor) or context_mask.shape != context.shape[:2]
    ):
        shape = tuple(context_mask.shape) if isinstance(context_mask, Tensor) else type(context_mask).__name__
        raise ValueError(f"context_mask must have shape {list(context.shape[:2])} (one per context token); got {shape}")
    return context, context_mask
