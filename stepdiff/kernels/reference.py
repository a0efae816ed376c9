r"""PyTorch references for the fused elementwise kernels: written for clarity, not speed.

These define what the Triton kernels compute; the tests compare the two, and CPU tensors
run these. All arithmetic is in float32 (or float64 for float64 inputs) and the result is
cast back to the input dtype, as the kernels do.

{py:func}`philox_normal_reference` is the kernels' in-kernel noise computed with NumPy: the
Philox-4x32-10 counter generator in exact 64-bit integer arithmetic, then the Box-Muller
transform in float64, so a seed gives the same noise on every backend.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["affine_step_reference", "noise_add_reference", "philox4x32", "philox_normal_reference"]

# Philox-4x32 constants (Salmon et al. 2011): round multipliers and the key increments
# (the golden ratio and sqrt(3) - 1, as 32-bit fractions).
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = np.uint64(0xFFFFFFFF)
RUN = 32  # elements per run: four runs of 32 share the 32 Philox calls of a group


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


def philox4x32(counter, key: int, rounds: int = 10) -> tuple[np.ndarray, ...]:
    r"""The Philox-4x32 block function: four 32-bit counter words to four random words.

    ``counter`` is four arrays (broadcast together) of integers below $2^{32}$; ``key`` is
    a 64-bit integer split into two 32-bit words. Each round multiplies two words by the
    constants, keeps the high and low halves of the 64-bit products, and mixes in the other
    words and the key; the key is bumped by constants between rounds. Products of two 32-bit
    numbers fit exactly in NumPy's uint64.
    """
    c0, c1, c2, c3 = np.broadcast_arrays(*(np.asarray(c, dtype=np.uint64) for c in counter))
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64((key >> 32) & 0xFFFFFFFF)
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    for _ in range(rounds):
        p0, p1 = m0 * c0, m1 * c2
        c0, c1, c2, c3 = (
            (p1 >> np.uint64(32)) ^ c1 ^ k0,
            p1 & _MASK32,
            (p0 >> np.uint64(32)) ^ c3 ^ k1,
            p0 & _MASK32,
        )
        k0 = (k0 + np.uint64(PHILOX_W0)) & _MASK32
        k1 = (k1 + np.uint64(PHILOX_W1)) & _MASK32
    return c0, c1, c2, c3


def _box_muller(w_radius: np.ndarray, w_angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two normals per pair of words, in float64, from the same uniforms as the kernels."""
    # u = (w + 1/2) / 2**32, rounded to float32 exactly as in the kernel.
    u = w_radius.astype(np.float32) * np.float32(2.0**-32) + np.float32(2.0**-33)
    r = np.sqrt(-2.0 * np.log(u.astype(np.float64)))
    quadrant = (w_angle >> np.uint64(30)).astype(np.float64)
    low = (w_angle & np.uint64(0x3FFFFFFF)).astype(np.float32).astype(np.float64)
    theta = (math.pi / 2) * (quadrant + low * 2.0**-30 - 0.5)
    return r * np.cos(theta), r * np.sin(theta)


def philox_normal_reference(
    shape: tuple[int, ...] | torch.Size,
    seed: int,
    offset: int = 0,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    r"""The noise the Triton kernels draw for ``seed`` and ``offset``, computed with NumPy.

    Element $e$ of the flattened tensor is output $k = \lfloor e/32\rfloor \bmod 4$ of a
    Philox-4x32-10 call with key ``seed`` and the 128-bit counter
    $C + 2^{64}\,\text{offset}$, where $C = 32\lfloor e/128\rfloor + (e \bmod 32)$. Outputs
    $(0, 1)$ and $(2, 3)$ are the Box-Muller pairs $(r\cos\theta, r\sin\theta)$ of words
    $(w_0, w_1)$ and $(w_2, w_3)$: radius $r = \sqrt{-2\ln u}$ with $u = (w_0 + \tfrac12)/2^{32}$
    (rounded to float32), angle $\theta = \tfrac\pi2\,(q + \ell/2^{30} - \tfrac12)$ with $q$ the
    top two bits of $w_1$ and $\ell$ the other thirty. So the noise depends on the element's
    position only, not on the shape or on how a kernel tiles it. The kernels compute the
    same with float32 polynomials, to about $10^{-6}$.
    """
    shape = tuple(shape)
    if not 0 <= seed < 2**63 or not 0 <= offset < 2**63:
        raise ValueError(f"seed and offset must lie in [0, 2**63); got {seed}, {offset}")
    total = math.prod(shape)
    groups = -(-total // (4 * RUN))
    g = np.arange(groups, dtype=np.uint64)[:, None]
    m = np.arange(RUN, dtype=np.uint64)[None, :]
    counter = RUN * g + m  # [groups, 32]
    words = (counter & _MASK32, counter >> np.uint64(32), offset & 0xFFFFFFFF, offset >> 32)
    w = philox4x32(words, seed)
    z01 = _box_muller(w[0], w[1])
    z23 = _box_muller(w[2], w[3])
    # [groups, 4 runs, 32]: run k of group g holds elements 128 g + 32 k + m.
    z = np.stack([z01[0], z01[1], z23[0], z23[1]], axis=1).reshape(-1)[:total]
    return torch.from_numpy(np.ascontiguousarray(z)).to(device=device, dtype=dtype).reshape(shape)
