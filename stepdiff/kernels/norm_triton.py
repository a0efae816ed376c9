r"""Triton kernels for the normalizations of the UNet and the DiT, forward and backward.

This module imports Triton; {py:mod}`stepdiff.kernels.norm` imports it only when a Triton path
is taken. All arithmetic is float32 whatever the storage dtype; results are rounded once, on
the store.

**GroupNorm + SiLU** (`group_norm_silu_forward`, `group_norm_silu_backward`). For sample $n$
and group $g$ of $C/G$ channels, with $S$ spatial positions, $\mu, \sigma^2$ the mean and
(biased) variance of the group's $(C/G)S$ values and $r = (\sigma^2 + \epsilon)^{-1/2}$:

$$\hat x = (x - \mu)\,r,\qquad z = w_c \hat x + b_c,\qquad y = z\,\mathrm{sigmoid}(z).$$

One program per (sample, group) streams the group in tiles of (channels x positions) read
through the tensor's strides (NCHW or channels-last alike). The statistics are merged tile by
tile with Chan's formula (each tile's own mean and sum of squared deviations), which keeps
the variance accurate when the mean is large against the spread. The backward, with
$\delta = dy\,\mathrm{sigmoid}(z)(1 + z(1 - \mathrm{sigmoid}(z)))$ and $d\hat x = \delta w_c$:

$$dx = r\,\big(d\hat x - \overline{d\hat x} - \hat x\,\overline{d\hat x\,\hat x}\big),\qquad
dw_c = \sum_{n,s} \delta\,\hat x,\qquad db_c = \sum_{n,s}\delta,$$

bars being means over the group. Each program writes its samples' per-channel partial sums of
$dw, db$; they are added over the batch afterwards (no atomics: deterministic).

**adaLN modulate** (`adaln_forward`, `adaln_backward`). For a token $x \in \R^D$ of sample $b$:
$y = \hat x\,(1 + s_b) + h_b$ with $\hat x$ the LayerNorm of $x$ without affine parameters,
$s_b$ (scale) and $h_b$ (shift) in $\R^D$. One program handles ``ROWS`` tokens of one sample with
the whole row in registers. Backward: $d\hat x = dy\,(1 + s_b)$,
$dx = r(d\hat x - \overline{d\hat x} - \hat x\,\overline{d\hat x\,\hat x})$ (means over $D$),
$ds_b = \sum_l dy\,\hat x$, $dh_b = \sum_l dy$, the sums over tokens taken per program and
then over programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import INTERPRETED, DirectLaunch

__all__ = ["adaln_backward", "adaln_forward", "group_norm_silu_backward", "group_norm_silu_forward"]

# Elements per tile (channels x positions); a group of C/G channels spans BLOCK_C = C/G rounded
# up to a power of two (tiles over channels too when that is larger than the tile).
_TILE = 4096 if not INTERPRETED else 1024
_MAX_BLOCK_C = 64


@triton.jit
def _tile_offsets(c0, s0, Cg, S, stride_c, stride_s, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    cs = c0 + tl.arange(0, BLOCK_C)
    ss = s0 + tl.arange(0, BLOCK_S)
    mask = (cs[:, None] < Cg) & (ss[None, :] < S)
    offsets = cs[:, None].to(tl.int64) * stride_c + ss[None, :].to(tl.int64) * stride_s
    return cs, offsets, mask


@triton.jit
def _channel_affine(W, B, channels, ok, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """The per-channel weight and bias (1 and 0 where absent), float32."""
    if HAS_W:
        w = tl.load(W + channels, mask=ok, other=0.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_B:
        b = tl.load(B + channels, mask=ok, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BLOCK_C], tl.float32)
    return w, b


@triton.jit
def _gn_silu_fwd(X, Y, W, B, MEAN, RSTD,
                 stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys,
                 C, S, G, eps,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program per (sample n, group g); grid ``(G, N)``. Writes y and the group's mean and
    1/std (kept for the backward pass)."""
    g = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    Cg = C // G
    X += n * stride_xn + (g * Cg).to(tl.int64) * stride_xc
    Y += n * stride_yn + (g * Cg).to(tl.int64) * stride_yc
    # Pass 1: the group's mean and sum of squared deviations, merged tile by tile (Chan et al.).
    mean = 0.0
    m2 = 0.0
    count = 0.0
    for c0 in range(0, Cg, BLOCK_C):
        for s0 in range(0, S, BLOCK_S):
            cs, offsets, mask = _tile_offsets(c0, s0, Cg, S, stride_xc, stride_xs, BLOCK_C, BLOCK_S)
            x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
            k = (tl.minimum(Cg - c0, BLOCK_C) * tl.minimum(S - s0, BLOCK_S)).to(tl.float32)
            tile_mean = tl.sum(tl.sum(x, 1), 0) / k
            d = tl.where(mask, x - tile_mean, 0.0)
            tile_m2 = tl.sum(tl.sum(d * d, 1), 0)
            total = count + k
            delta = tile_mean - mean
            mean += delta * (k / total)
            m2 += tile_m2 + delta * delta * (count * k / total)
            count = total
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    tl.store(MEAN + n * G + g, mean)
    tl.store(RSTD + n * G + g, rstd)
    # Pass 2: normalize, scale and shift per channel, SiLU.
    for c0 in range(0, Cg, BLOCK_C):
        for s0 in range(0, S, BLOCK_S):
            cs, offsets, mask = _tile_offsets(c0, s0, Cg, S, stride_xc, stride_xs, BLOCK_C, BLOCK_S)
            x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
            w, b = _channel_affine(W, B, g * Cg + cs, cs < Cg, HAS_W, HAS_B, BLOCK_C)
            z = (x - mean) * rstd * w[:, None] + b[:, None]
            y = z / (1.0 + tl.exp(-z))
            _, y_offsets, _ = _tile_offsets(c0, s0, Cg, S, stride_yc, stride_ys, BLOCK_C, BLOCK_S)
            tl.store(Y + y_offsets, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gn_silu_bwd(X, DY, DX, W, B, MEAN, RSTD, DW_PART, DB_PART,
                 stride_xn, stride_xc, stride_xs, stride_dyn, stride_dyc, stride_dys,
                 stride_dxn, stride_dxc, stride_dxs,
                 C, S, G,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program per (sample n, group g); grid ``(G, N)``. Writes dx for the group and the
    per-channel sums of $\\delta\\hat x$ and $\\delta$ over the sample's positions into
    ``DW_PART[n, c]`` and ``DB_PART[n, c]``."""
    g = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    Cg = C // G
    X += n * stride_xn + (g * Cg).to(tl.int64) * stride_xc
    DY += n * stride_dyn + (g * Cg).to(tl.int64) * stride_dyc
    DX += n * stride_dxn + (g * Cg).to(tl.int64) * stride_dxc
    mean = tl.load(MEAN + n * G + g)
    rstd = tl.load(RSTD + n * G + g)
    # Pass 1: the group's sums of dxhat and dxhat * xhat, and the per-channel partial sums.
    sum_dxhat = 0.0
    sum_dxhat_xhat = 0.0
    for c0 in range(0, Cg, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_ok = cs < Cg
        w, b = _channel_affine(W, B, g * Cg + cs, c_ok, HAS_W, HAS_B, BLOCK_C)
        dw_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            _, offsets, mask = _tile_offsets(c0, s0, Cg, S, stride_xc, stride_xs, BLOCK_C, BLOCK_S)
            _, dy_offsets, _ = _tile_offsets(c0, s0, Cg, S, stride_dyc, stride_dys, BLOCK_C, BLOCK_S)
            x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + dy_offsets, mask=mask, other=0.0).to(tl.float32)
            xhat = (x - mean) * rstd
            z = xhat * w[:, None] + b[:, None]
            sig = 1.0 / (1.0 + tl.exp(-z))
            delta = tl.where(mask, dy * sig * (1.0 + z * (1.0 - sig)), 0.0)
            dw_acc += tl.sum(delta * xhat, 1)
            db_acc += tl.sum(delta, 1)
            dxhat = delta * w[:, None]
            sum_dxhat += tl.sum(tl.sum(dxhat, 1), 0)
            sum_dxhat_xhat += tl.sum(tl.sum(tl.where(mask, dxhat * xhat, 0.0), 1), 0)
        tl.store(DW_PART + n * C + g * Cg + cs, dw_acc, mask=c_ok)
        tl.store(DB_PART + n * C + g * Cg + cs, db_acc, mask=c_ok)
    count = (Cg * S).to(tl.float32)
    mean_dxhat = sum_dxhat / count
    mean_dxhat_xhat = sum_dxhat_xhat / count
    # Pass 2: dx.
    for c0 in range(0, Cg, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_ok = cs < Cg
        w, b = _channel_affine(W, B, g * Cg + cs, c_ok, HAS_W, HAS_B, BLOCK_C)
        for s0 in range(0, S, BLOCK_S):
            _, offsets, mask = _tile_offsets(c0, s0, Cg, S, stride_xc, stride_xs, BLOCK_C, BLOCK_S)
            _, dy_offsets, _ = _tile_offsets(c0, s0, Cg, S, stride_dyc, stride_dys, BLOCK_C, BLOCK_S)
            _, dx_offsets, _ = _tile_offsets(c0, s0, Cg, S, stride_dxc, stride_dxs, BLOCK_C, BLOCK_S)
            x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + dy_offsets, mask=mask, other=0.0).to(tl.float32)
            xhat = (x - mean) * rstd
            z = xhat * w[:, None] + b[:, None]
            sig = 1.0 / (1.0 + tl.exp(-z))
            dxhat = dy * sig * (1.0 + z * (1.0 - sig)) * w[:, None]
            dx = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
            tl.store(DX + dx_offsets, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _adaln_fwd(X, Y, SHIFT, SCALE, MEAN, RSTD,
               stride_xb, stride_xl, stride_yb, stride_yl, stride_hb, stride_sb,
               L, D, eps,
               ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """``ROWS`` tokens of sample b per program; grid ``(cdiv(L, ROWS), B)``. The feature dim is
    contiguous (stride 1) in x, y, shift and scale."""
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    mask = (rows[:, None] < L) & col_ok[None, :]
    x = tl.load(X + b * stride_xb + rows[:, None].to(tl.int64) * stride_xl + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / D
    d = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / D + eps)
    scale = tl.load(SCALE + b * stride_sb + cols, mask=col_ok, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + b * stride_hb + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = d * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(Y + b * stride_yb + rows[:, None].to(tl.int64) * stride_yl + cols[None, :], y.to(Y.dtype.element_ty),
             mask=mask)
    row_ok = rows < L
    tl.store(MEAN + b * L + rows, mean, mask=row_ok)
    tl.store(RSTD + b * L + rows, rstd, mask=row_ok)


@triton.jit
def _adaln_bwd(X, DY, DX, SCALE, MEAN, RSTD, DSCALE_PART, DSHIFT_PART,
               stride_xb, stride_xl, stride_dyb, stride_dyl, stride_dxb, stride_dxl, stride_sb,
               L, D, n_blocks,
               ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """As the forward's grid; writes dx for its tokens and its partial sums over them of
    $dy\\,\\hat x$ and $dy$ into ``DSCALE_PART[b, block]`` and ``DSHIFT_PART[b, block]``."""
    b = tl.program_id(1).to(tl.int64)
    block = tl.program_id(0)
    rows = block * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    row_ok = rows < L
    mask = row_ok[:, None] & col_ok[None, :]
    r64 = rows[:, None].to(tl.int64)
    x = tl.load(X + b * stride_xb + r64 * stride_xl + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + b * stride_dyb + r64 * stride_dyl + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + b * L + rows, mask=row_ok, other=0.0)
    rstd = tl.load(RSTD + b * L + rows, mask=row_ok, other=0.0)
    scale = tl.load(SCALE + b * stride_sb + cols, mask=col_ok, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    dxhat = dy * (1.0 + scale[None, :])
    mean_dxhat = tl.sum(dxhat, 1) / D
    mean_dxhat_xhat = tl.sum(dxhat * xhat, 1) / D
    dx = rstd[:, None] * (dxhat - mean_dxhat[:, None] - xhat * mean_dxhat_xhat[:, None])
    tl.store(DX + b * stride_dxb + r64 * stride_dxl + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    part = (b * n_blocks + block) * D + cols
    tl.store(DSCALE_PART + part, tl.sum(dy * xhat, 0), mask=col_ok)
    tl.store(DSHIFT_PART + part, tl.sum(dy, 0), mask=col_ok)


# --- launchers ---------------------------------------------------------------------------------


def _gn_blocks(Cg: int, S: int) -> tuple[int, int]:
    block_c = min(triton.next_power_of_2(Cg), _MAX_BLOCK_C)
    block_s = min(triton.next_power_of_2(S), max(1, _TILE // block_c))
    return block_c, block_s


def _like(x: Tensor) -> Tensor:
    """An empty tensor like ``x``, channels-last if ``x`` is, else contiguous: either way its
    spatial dims flatten to one stride, so the kernels can write it through `_flat`."""
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.empty_like(x, memory_format=torch.channels_last)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _sig(*tensors) -> tuple:
    """What Triton specializes on, for a plan key: dtype, shape, strides, 16-byte alignment."""
    return tuple(None if t is None else (t.dtype, t.shape, t.stride(), t.data_ptr() % 16 == 0) for t in tensors)


def _flat(t: Tensor) -> Tensor:
    """``[N, C, *spatial]`` as ``[N, C, S]`` without a copy where the spatial dims flatten to one
    stride (NCHW and channels-last alike), else a contiguous copy."""
    if t.ndim == 2:
        return t.unsqueeze(-1)
    try:
        return t.view(t.shape[0], t.shape[1], -1)
    except RuntimeError:
        pass
    return t.flatten(2)  # strides that do not merge: a copy (inputs only; outputs come from _like)


_PLANS: dict = {}


def _device(t: Tensor):
    return t.device.index if t.is_cuda else None


def group_norm_silu_forward(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
                            eps: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(y, mean, rstd)``: $y = z\,\mathrm{sigmoid}(z)$ with $z = w_c (x - \mu) r + b_c$, shaped and strided
    like ``x``; ``mean`` $\mu$ and ``rstd`` $r = (\sigma^2 + \epsilon)^{-1/2}$ (biased variance over each
    group's $(C/G)S$ values) are float32 ``[N, G]``. Inputs are assumed checked by the caller."""
    y = _like(x)
    x3, y3 = _flat(x), _flat(y)
    N, C, S = x3.shape
    mean = torch.empty((N, num_groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if x.numel() == 0:
        return y, mean, rstd
    block_c, block_s = _gn_blocks(C // num_groups, S)
    key = ("gn_fwd", _sig(x3, y3, weight, bias), num_groups, _device(x))
    launch = _PLANS.get(key)
    if launch is None:
        launch = _PLANS[key] = DirectLaunch(_gn_silu_fwd, {"num_warps": 4}, _device(x))
    launch((num_groups, N, 1), (x3, y3, x3 if weight is None else weight, x3 if bias is None else bias, mean, rstd,
                                *x3.stride(), *y3.stride(), C, S, num_groups, float(eps), weight is not None,
                                bias is not None, block_c, block_s))
    return y, mean, rstd


def group_norm_silu_backward(dy: Tensor, x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
                             mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
    r"""``(dx, dweight, dbias)`` (``None`` where the parameter is ``None``): with $\delta =
    dy\,\mathrm{sigmoid}(z)\big(1 + z(1 - \mathrm{sigmoid}(z))\big)$ and $d\hat x = \delta w_c$,
    $dx = r\,(d\hat x - \overline{d\hat x} - \hat x\,\overline{d\hat x\,\hat x})$ (means over the group),
    $dw_c = \sum_{n,s} \delta\,\hat x$ and $db_c = \sum_{n,s} \delta$."""
    dx = _like(x)
    x3, dy3, dx3 = _flat(x), _flat(dy), _flat(dx)
    N, C, S = x3.shape
    dw_part = torch.empty((N, C), device=x.device, dtype=torch.float32)
    db_part = torch.empty_like(dw_part)
    if x.numel() == 0:
        dw_part.zero_()
        db_part.zero_()
    else:
        block_c, block_s = _gn_blocks(C // num_groups, S)
        key = ("gn_bwd", _sig(x3, dy3, dx3, weight, bias), num_groups, _device(x))
        launch = _PLANS.get(key)
        if launch is None:
            launch = _PLANS[key] = DirectLaunch(_gn_silu_bwd, {"num_warps": 4}, _device(x))
        launch((num_groups, N, 1), (x3, dy3, dx3, x3 if weight is None else weight, x3 if bias is None else bias,
                                    mean, rstd, dw_part, db_part, *x3.stride(), *dy3.stride(), *dx3.stride(),
                                    C, S, num_groups, weight is not None, bias is not None, block_c, block_s))
    dw = None if weight is None else dw_part.sum(0).to(weight.dtype)
    db = None if bias is None else db_part.sum(0).to(bias.dtype)
    return dx, dw, db


def _adaln_rows(D: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(D)
    rows = max(1, min(16, (_TILE // 2) // block_d))
    return rows, block_d


def adaln_forward(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(y, mean, rstd)`` for ``x [B, L, D]`` (feature dim contiguous), ``shift, scale [B, D]``
    (feature dim contiguous): $y = \hat x\,(1 + s_b) + h_b$ with $\hat x = (x - \mu)\,r$ the LayerNorm of
    each token, $r = (\sigma^2 + \epsilon)^{-1/2}$; ``mean`` $\mu$, ``rstd`` $r$ float32 ``[B, L]``."""
    B, L, D = x.shape
    y = torch.empty_like(x)
    mean = torch.empty((B, L), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if x.numel() == 0:
        return y, mean, rstd
    rows, block_d = _adaln_rows(D)
    key = ("adaln_fwd", _sig(x, y, shift, scale), _device(x))
    launch = _PLANS.get(key)
    if launch is None:
        launch = _PLANS[key] = DirectLaunch(_adaln_fwd, {"num_warps": 4 if block_d <= 2048 else 8}, _device(x))
    launch((triton.cdiv(L, rows), B, 1), (x, y, shift, scale, mean, rstd, x.stride(0), x.stride(1), y.stride(0),
                                          y.stride(1), shift.stride(0), scale.stride(0), L, D, float(eps), rows,
                                          block_d))
    return y, mean, rstd


def adaln_backward(dy: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(dx, dshift, dscale)``; ``dy`` with a contiguous feature dim: $d\hat x = dy\,(1 + s_b)$,
    $dx = r\,(d\hat x - \overline{d\hat x} - \hat x\,\overline{d\hat x\,\hat x})$ (means over $D$),
    $dh_b = \sum_l dy$ and $ds_b = \sum_l dy\,\hat x$ (sums over the sample's tokens)."""
    B, L, D = x.shape
    dx = torch.empty_like(x)
    rows, block_d = _adaln_rows(D)
    n_blocks = triton.cdiv(L, rows) if L else 0
    dscale_part = torch.zeros((B, max(n_blocks, 1), D), device=x.device, dtype=torch.float32)
    dshift_part = torch.zeros_like(dscale_part)
    if x.numel():
        key = ("adaln_bwd", _sig(x, dy, dx, scale), _device(x))
        launch = _PLANS.get(key)
        if launch is None:
            launch = _PLANS[key] = DirectLaunch(_adaln_bwd, {"num_warps": 4 if block_d <= 2048 else 8}, _device(x))
        launch((n_blocks, B, 1), (x, dy, dx, scale, mean, rstd, dscale_part, dshift_part, x.stride(0), x.stride(1),
                                  dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1), scale.stride(0), L, D,
                                  n_blocks, rows, block_d))
    return dx, dshift_part.sum(1), dscale_part.sum(1)
