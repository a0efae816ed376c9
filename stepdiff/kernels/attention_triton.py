r"""FlashAttention in Triton: the forward pass and a deterministic backward pass.

This module is imported lazily by `stepdiff.kernels.attention`, only when the Triton path
is taken, because importing it imports Triton. On a CPU-only machine it must be imported with
``TRITON_INTERPRET=1`` already set (the kernels are then simulated by Triton's interpreter).

The tensors handed to these functions are ``[B, H, L, D]`` *views* with arbitrary strides: the
``[B, L, H, D]`` layout arrives as a transposed view, and nothing is copied. With
$S = c\,QK^\top$ ($c$ the softmax scale), $P = \mathrm{softmax}(S)$ row by row and $O = PV$:

- `attention_forward` returns $O$ and the base-2 log-sum-exp of each row of $S$,
  $\ell_i = \log_2 \sum_j 2^{S_{ij}\log_2 e}$, the one number per row that lets the backward
  pass recompute $P_{ij} = 2^{S_{ij}\log_2 e - \ell_i}$ without storing $P$;
- `attention_backward` returns $dQ = c\,dS\,K$, $dK = c\,dS^\top Q$, $dV = P^\top dO$, with
  $dS = P \circ (dP - \Delta)$, $dP = dO\,V^\top$ and $\Delta_i = \sum_d dO_{id}\,O_{id}$.

Neither pass ever holds an $L_q\times L_k$ matrix: each program keeps one tile of rows in
registers and streams tiles of the other operand past it. The backward pass is two kernels (one
owning a tile of keys, one owning a tile of queries) so that every output element is written by
exactly one program: no atomics, and the result is bitwise reproducible.

Numerics: scores, the running maximum and sum, and every accumulator are fp32. The
probabilities $P$ and $dS$ are cast to the input dtype before they enter a matrix product, so
that the products run on fp16/bf16 tensor cores; fp32 inputs use true fp32 products
(``input_precision="ieee"``), not TF32.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import DirectLaunch

__all__ = ["INTERPRET", "TUNING", "attention_backward", "attention_forward", "configs_for"]

# Whether this module's kernels were built for Triton's interpreter: `triton.jit` decides at
# decoration time, that is when this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e)); exp2 is the native instruction


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(ptrs, offs_l, L, offs_d, HEAD_DIM: tl.constexpr, MASK_L: tl.constexpr,
               EVEN_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile; padded rows (>= L) and padded head-dim columns read 0."""
    if MASK_L:
        if EVEN_D:
            x = tl.load(ptrs, mask=offs_l[:, None] < L, other=0.0)
        else:
            x = tl.load(ptrs, mask=(offs_l[:, None] < L) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _keys_of_batch(KV_LENS, off_b, Lk, HAS_KV_LENS: tl.constexpr):
    """The number of keys batch ``off_b`` attends to: ``KV_LENS[off_b]``, kept within
    ``[1, Lk]`` so that no value can make a kernel read outside the key tensor (the host checks
    the values, except under CUDA-graph capture, where it cannot read them)."""
    if HAS_KV_LENS:
        n = tl.load(KV_LENS + off_b).to(tl.int32)
        return tl.minimum(tl.maximum(n, 1), Lk)
    else:
        return Lk


@triton.jit
def _attn_fwd_inner(acc, m_i, l_i, q, K, V, stride_kl, stride_kd, stride_vl, stride_vd,
                    offs_m, offs_d, lo, hi, Lk, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
                    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Stream key/value tiles ``[lo, hi)`` past one query tile, updating the online softmax.

    ``acc`` holds $\\sum_j 2^{s_{ij} - m_i} v_j$ (unnormalized), ``m_i`` the running maximum of
    the base-2 scores $s_{ij} = c\\log_2(e)\\,q_i\\cdot k_j$, ``l_i`` the running sum
    $\\sum_j 2^{s_{ij} - m_i}$. ``MASKED`` tiles may hold keys past ``Lk`` or, when causal, keys
    after the query; their scores are set to $-\\infty$. Unmasked tiles skip that work.
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        # K is read transposed, as a [BLOCK_D, BLOCK_N] tile, so that q @ k is a plain dot.
        k_ptrs = K + offs_n[None, :] * stride_kl + offs_d[:, None] * stride_kd
        if MASKED:
            if EVEN_D:
                k = tl.load(k_ptrs, mask=offs_n[None, :] < Lk, other=0.0)
            else:
                k = tl.load(k_ptrs, mask=(offs_n[None, :] < Lk) & (offs_d[:, None] < HEAD_DIM),
                            other=0.0)
        else:
            if EVEN_D:
                k = tl.load(k_ptrs)
            else:
                k = tl.load(k_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        s = tl.dot(q, k, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N], fp32
        if MASKED:
            keep = offs_n[None, :] < Lk
            if IS_CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))
        # The online softmax. The new maximum is never -inf: the first tile every program sees
        # holds key 0, which every query may attend to, so exp2(-inf - (-inf)) cannot occur.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was summed under the old maximum
        p = tl.math.exp2(s * qk_scale - m_new[:, None])  # one FMA + exp2 per score
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v_ptrs = V + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd
        v = _load_rows(v_ptrs, offs_n, Lk, offs_d, HEAD_DIM, MASKED, EVEN_D)
        # P is rounded to the input dtype (fp16/bf16) so the product runs on tensor cores.
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, KV_LENS,
              stride_qb, stride_qh, stride_ql, stride_qd,
              stride_kb, stride_kh, stride_kl, stride_kd,
              stride_vb, stride_vh, stride_vl, stride_vd,
              stride_ob, stride_oh, stride_ol, stride_od,
              stride_lb, stride_lh,
              Lq, Lk, qk_scale, LQ_BUCKET, LK_BUCKET,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
              PRECISION: tl.constexpr, HAS_KV_LENS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: one tile of ``BLOCK_M`` queries of one (batch, head); grid
    ``(cdiv(Lq, BLOCK_M), H, B)``. Writes ``O`` for those rows and their base-2 log-sum-exp.

    With ``HAS_KV_LENS`` batch ``b`` has only its first ``KV_LENS[b]`` keys: the key loop stops
    there, so the padding is never read.
    (``LQ_BUCKET`` and ``LK_BUCKET`` are unused by the body: they are the autotuner's key.)
    """
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    start_m = tl.program_id(0) * BLOCK_M
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    Lk = _keys_of_batch(KV_LENS, off_b, Lk, HAS_KV_LENS)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    O += off_b * stride_ob + off_h * stride_oh
    LSE += off_b * stride_lb + off_h * stride_lh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)  # the head dim padded to a power of two, masked to HEAD_DIM
    # The query tile stays in registers for the whole loop; padded rows read 0 and are never
    # stored, and padded head-dim columns read 0 so they add nothing to q . k.
    q = _load_rows(Q + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                   offs_m, Lq, offs_d, HEAD_DIM, True, EVEN_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Split the key range into tiles that need no mask (every key exists and, when causal,
    # precedes every query of the tile) and the few that do: the tail tile past Lk // BLOCK_N,
    # and the tiles crossing the causal diagonal.
    if IS_CAUSAL:
        hi = tl.minimum(Lk, start_m + BLOCK_M)  # keys after the tile's last query are all masked
        mid = tl.minimum((Lk // BLOCK_N) * BLOCK_N, (start_m // BLOCK_N) * BLOCK_N)
    else:
        hi = Lk
        mid = (Lk // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, K, V, stride_kl, stride_kd,
                                    stride_vl, stride_vd, offs_m, offs_d, 0, mid, Lk, qk_scale,
                                    HEAD_DIM, BLOCK_N, EVEN_D, False, IS_CAUSAL, PRECISION)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, K, V, stride_kl, stride_kd,
                                    stride_vl, stride_vd, offs_m, offs_d, mid, hi, Lk, qk_scale,
                                    HEAD_DIM, BLOCK_N, EVEN_D, True, IS_CAUSAL, PRECISION)

    # Epilogue: normalize once, at the end, instead of once per tile.
    o = acc / l_i[:, None]
    lse = m_i + tl.math.log2(l_i)
    row_ok = offs_m < Lq
    tl.store(LSE + offs_m, lse, mask=row_ok)
    o_ptrs = O + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od
    if EVEN_D:
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, o.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_delta(O, DO, DELTA,
                    stride_ob, stride_oh, stride_ol, stride_od,
                    stride_dob, stride_doh, stride_dol, stride_dod,
                    stride_db, stride_dh, Lq,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    r"""$\Delta_i = \sum_d dO_{id} O_{id}$ (which equals $\sum_j P_{ij} dP_{ij}$), fp32,
    for one tile of rows; grid ``(cdiv(Lq, BLOCK_M), H, B)``."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    O += off_b * stride_ob + off_h * stride_oh
    DO += off_b * stride_dob + off_h * stride_doh
    o = _load_rows(O + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od,
                   offs_m, Lq, offs_d, HEAD_DIM, True, EVEN_D)
    do = _load_rows(DO + offs_m[:, None] * stride_dol + offs_d[None, :] * stride_dod,
                    offs_m, Lq, offs_d, HEAD_DIM, True, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + off_b * stride_db + off_h * stride_dh + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA,
                         stride_ql, stride_qd, stride_dol, stride_dod,
                         offs_n, offs_d, lo, hi, Lq, qk_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr,
                         MASK_ROWS: tl.constexpr, CAUSAL_TILE: tl.constexpr,
                         PRECISION: tl.constexpr):
    """Stream query tiles ``[lo, hi)`` past one key tile, accumulating its dK and dV.

    Everything is computed transposed (keys along rows) so that the key tile's gradients are
    plain row sums of products: $dV_j = \\sum_i P_{ij}\\,dO_i$, $dK_j \\propto \\sum_i dS_{ij} Q_i$.
    """
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q = _load_rows(Q + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                       offs_m, Lq, offs_d, HEAD_DIM, MASK_ROWS, EVEN_D)
        do = _load_rows(DO + offs_m[:, None] * stride_dol + offs_d[None, :] * stride_dod,
                        offs_m, Lq, offs_d, HEAD_DIM, MASK_ROWS, EVEN_D)
        if MASK_ROWS:
            # A padded query row gets lse = +inf, hence P = 0: it adds nothing to dK or dV.
            lse = tl.load(LSE + offs_m, mask=offs_m < Lq, other=float("inf"))
            delta = tl.load(DELTA + offs_m, mask=offs_m < Lq, other=0.0)
        else:
            lse = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)
        # Recompute P^T from the saved log-sum-exp: no L x L matrix was ever stored.
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
        if CAUSAL_TILE:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (dO V^T)^T
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KV_LENS,
                   stride_qb, stride_qh, stride_ql, stride_qd,
                   stride_kb, stride_kh, stride_kl, stride_kd,
                   stride_vb, stride_vh, stride_vl, stride_vd,
                   stride_dob, stride_doh, stride_dol, stride_dod,
                   stride_dkb, stride_dkh, stride_dkl, stride_dkd,
                   stride_dvb, stride_dvh, stride_dvl, stride_dvd,
                   stride_lb, stride_lh,
                   Lq, Lk, scale, qk_scale, LQ_BUCKET, LK_BUCKET,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   PRECISION: tl.constexpr, HAS_KV_LENS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program owns ``BLOCK_N`` keys of one (batch, head) and writes their dK and dV;
    grid ``(cdiv(Lk, BLOCK_N), H, B)``. It reads every query tile that attends to its keys.
    Keys past the batch's ``KV_LENS`` get dK = dV = 0, and a tile holding only such keys reads
    no queries at all."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    start_n = tl.program_id(0) * BLOCK_N
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    n_keys = _keys_of_batch(KV_LENS, off_b, Lk, HAS_KV_LENS)
    if HAS_KV_LENS:
        q_end = tl.where(start_n < n_keys, Lq, 0)  # 0: every loop below is empty
    else:
        q_end = Lq
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    DK += off_b * stride_dkb + off_h * stride_dkh
    DV += off_b * stride_dvb + off_h * stride_dvh
    LSE += off_b * stride_lb + off_h * stride_lh
    DELTA += off_b * stride_lb + off_h * stride_lh

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # Keys past the tensor (>= Lk) or past the batch's length read 0; their gradients are
    # computed (each key's row of dK, dV depends on that key alone) and then dropped.
    k = _load_rows(K + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                   offs_n, n_keys, offs_d, HEAD_DIM, True, EVEN_D)
    v = _load_rows(V + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                   offs_n, n_keys, offs_d, HEAD_DIM, True, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query tiles in three runs: those crossing the causal diagonal (masked), the full tiles
    # (no mask at all: the hot loop), and the tail tile past Lq // BLOCK_M (rows masked).
    full = (q_end // BLOCK_M) * BLOCK_M
    if IS_CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M  # query i attends key j only when i >= j
        mid = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M,
                         tl.cdiv(q_end, BLOCK_M) * BLOCK_M)
        mid = tl.maximum(mid, lo)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_ql, stride_qd,
                                      stride_dol, stride_dod, offs_n, offs_d, lo, mid, Lq,
                                      qk_scale, HEAD_DIM, BLOCK_M, EVEN_D, True, True, PRECISION)
        tail = tl.maximum(mid, full)
    else:
        mid = 0
        tail = full
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_ql, stride_qd,
                                  stride_dol, stride_dod, offs_n, offs_d, mid, full, Lq,
                                  qk_scale, HEAD_DIM, BLOCK_M, EVEN_D, False, False, PRECISION)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_ql, stride_qd,
                                  stride_dol, stride_dod, offs_n, offs_d, tail, q_end, Lq,
                                  qk_scale, HEAD_DIM, BLOCK_M, EVEN_D, True, False, PRECISION)

    dk = dk * scale  # S = scale * Q K^T, so dK = scale * dS^T Q
    if HAS_KV_LENS:
        # Padded keys: exactly 0 (their P was computed from zeroed keys, not masked).
        real = offs_n[:, None] < n_keys
        dk = tl.where(real, dk, 0.0)
        dv = tl.where(real, dv, 0.0)
    rows = offs_n[:, None] < Lk
    if not EVEN_D:
        rows = rows & (offs_d[None, :] < HEAD_DIM)
    tl.store(DK + offs_n[:, None] * stride_dkl + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=rows)
    tl.store(DV + offs_n[:, None] * stride_dvl + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=rows)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kl, stride_kd, stride_vl, stride_vd,
                       offs_m, offs_d, lo, hi, Lk, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
                       MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Stream key/value tiles ``[lo, hi)`` past one query tile, accumulating $dS\\,K$."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_rows(K + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                       offs_n, Lk, offs_d, HEAD_DIM, MASKED, EVEN_D)
        v = _load_rows(V + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                       offs_n, Lk, offs_d, HEAD_DIM, MASKED, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            keep = offs_n[None, :] < Lk
            if IS_CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KV_LENS,
                 stride_qb, stride_qh, stride_ql, stride_qd,
                 stride_kb, stride_kh, stride_kl, stride_kd,
                 stride_vb, stride_vh, stride_vl, stride_vd,
                 stride_dob, stride_doh, stride_dol, stride_dod,
                 stride_dqb, stride_dqh, stride_dql, stride_dqd,
                 stride_lb, stride_lh,
                 Lq, Lk, scale, qk_scale, LQ_BUCKET, LK_BUCKET,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 PRECISION: tl.constexpr, HAS_KV_LENS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program owns ``BLOCK_M`` queries of one (batch, head) and writes their dQ;
    grid ``(cdiv(Lq, BLOCK_M), H, B)``. The key loop mirrors the forward's (and so stops at the
    batch's ``KV_LENS``)."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    start_m = tl.program_id(0) * BLOCK_M
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    Lk = _keys_of_batch(KV_LENS, off_b, Lk, HAS_KV_LENS)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    DQ += off_b * stride_dqb + off_h * stride_dqh
    LSE += off_b * stride_lb + off_h * stride_lh
    DELTA += off_b * stride_lb + off_h * stride_lh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                   offs_m, Lq, offs_d, HEAD_DIM, True, EVEN_D)
    do = _load_rows(DO + offs_m[:, None] * stride_dol + offs_d[None, :] * stride_dod,
                    offs_m, Lq, offs_d, HEAD_DIM, True, EVEN_D)
    row_ok = offs_m < Lq
    lse = tl.load(LSE + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if IS_CAUSAL:
        hi = tl.minimum(Lk, start_m + BLOCK_M)
        mid = tl.minimum((Lk // BLOCK_N) * BLOCK_N, (start_m // BLOCK_N) * BLOCK_N)
    else:
        hi = Lk
        mid = (Lk // BLOCK_N) * BLOCK_N
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kl, stride_kd, stride_vl,
                            stride_vd, offs_m, offs_d, 0, mid, Lk, qk_scale, HEAD_DIM, BLOCK_N,
                            EVEN_D, False, IS_CAUSAL, PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kl, stride_kd, stride_vl,
                            stride_vd, offs_m, offs_d, mid, hi, Lk, qk_scale, HEAD_DIM, BLOCK_N,
                            EVEN_D, True, IS_CAUSAL, PRECISION)

    dq = dq * scale  # S = scale * Q K^T, so dQ = scale * dS K
    mask = row_ok[:, None]
    if not EVEN_D:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(DQ + offs_m[:, None] * stride_dql + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------
#
# In the interpreter there is one fixed configuration (autotuning needs a GPU to time with).
# Small tiles there keep each simulated step cheap and make even short test sequences span
# several tiles, so the online-softmax rescaling and the tail masks are exercised.
#
# On a GPU the autotuner times a short list of candidates per kernel and head-dim class (the
# padded width BLOCK_D: 64 or less, 128, 256) once per (head dim, dtype, causal, length
# bucket). The lists were chosen from the machine code Triton generates for an H100 (sm_90,
# tools/gpu_compile_check.py): every candidate compiles without register spills (4-warp tiles
# that hold 128 x 128 fp32 accumulators spill at BLOCK_D 128; so do 64 x 128 dK/dV tiles) and
# fits in shared memory, and the shapes follow what was measured for the Triton tutorial's
# kernels on an H100: 128-row query tiles for the forward; for the backward at head dim 128,
# 8 warps rather than the tutorial's fixed 4. Short lists keep the first call's autotuning to
# about a dozen compilations per head dim and dtype; which candidate wins is for the GPU to say.
# Entries are (BLOCK_M, BLOCK_N, num_warps, num_stages); the dK/dV kernel holds BLOCK_N keys
# and steps through BLOCK_M queries, the forward and dQ kernels hold BLOCK_M queries.
_INTERP_FWD = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
_INTERP_DKDV = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
_INTERP_DQ = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
_DELTA_BLOCK_M = 64

TUNING = {
    "fwd": {
        64: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3)],
        128: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 8, 2)],
        256: [(64, 32, 4, 2), (64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2)],
    },
    "dkdv": {
        64: [(32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3), (32, 128, 8, 3)],
        128: [(32, 64, 4, 3), (32, 64, 8, 3), (64, 64, 8, 3), (32, 128, 8, 3)],
        256: [(16, 32, 4, 2), (32, 32, 8, 2)],
    },
    "dq": {
        64: [(64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 3)],
        128: [(64, 64, 8, 3), (128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3)],
        256: [(32, 32, 4, 2), (64, 32, 8, 2), (32, 32, 8, 2)],
    },
}


def _head_dim_class(block_d: int) -> int:
    return 64 if block_d <= 64 else block_d


def configs_for(which: str, block_d: int) -> list[dict]:
    r"""The autotuning candidates of kernel ``which`` (``"fwd"``, ``"dkdv"``, ``"dq"``) for tile
    width ``block_d``, as dicts of ``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``num_stages``: each
    candidate cuts $S = c\,QK^\top$ into tiles of $B_M$ query rows by $B_N$ key columns (``BLOCK_M``
    by ``BLOCK_N``): a ``"fwd"`` or ``"dq"`` program holds $B_M$ queries and streams up to
    $\lceil L_k/B_N\rceil$ key tiles past them, a ``"dkdv"`` program holds $B_N$ keys and streams up to
    $\lceil L_q/B_M\rceil$ query tiles."""
    return [{"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": st}
            for m, n, w, st in TUNING[which][_head_dim_class(block_d)]]


def _prune(which: str):
    """Keep the candidates listed for this launch's head-dim class."""
    def prune(configs, named_args, **kwargs):
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        wanted = set(TUNING[which][_head_dim_class(block_d)])
        kept = [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]
        return kept or configs[:1]

    return prune


_KEY = ["LQ_BUCKET", "LK_BUCKET", "HEAD_DIM", "IS_CAUSAL", "PRECISION", "HAS_KV_LENS"]


@functools.cache
def _tuned(which: str):
    """The autotuned launcher of one kernel (built on first use, GPU only)."""
    kernel = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}[which]
    candidates = sorted({c for by_class in TUNING[which].values() for c in by_class})
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
               for m, n, w, st in candidates]
    return triton.autotune(configs=configs, key=_KEY,
                           prune_configs_by={"early_config_prune": _prune(which)})(kernel)


def _launch(which: str, grid_rows: int, B: int, H: int, args: tuple, meta: dict,
            config: dict | None):
    """Launch one kernel through Triton with a fixed config (interpreter, or ``config`` given),
    or autotuned; return the compiled kernel (``None`` in the interpreter) and the config used."""
    jit = _KERNELS[which]
    held = "BLOCK_N" if which == "dkdv" else "BLOCK_M"
    if config is None and INTERPRET:
        config = {"fwd": _INTERP_FWD, "dkdv": _INTERP_DKDV, "dq": _INTERP_DQ}[which]
    if config is not None:
        cfg = dict(config)
        grid = (triton.cdiv(grid_rows, cfg[held]), H, B)
        compiled = jit[grid](*args, **meta, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                             num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    else:
        tuner = _tuned(which)
        grid = lambda m: (triton.cdiv(grid_rows, m[held]), H, B)
        compiled = tuner[grid](*args, **meta)
        best = tuner.best_config  # the configuration the autotuner chose for this key
        cfg = {"BLOCK_M": best.kwargs["BLOCK_M"], "BLOCK_N": best.kwargs["BLOCK_N"],
               "num_warps": best.num_warps, "num_stages": best.num_stages}
    return compiled, cfg


_KERNELS = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}


class _KernelPlan:
    """One kernel of one planned call: its first launch goes through `_launch` (autotuning
    there when no config is given), every later one straight to the compiled kernel of the
    chosen configuration (`stepdiff.kernels.launch.DirectLaunch`): the autotuner's per-call
    dispatch (binding, key, cache lookup) is skipped once a configuration is chosen."""

    __slots__ = ("which", "grid_rows", "B", "H", "meta", "config", "device", "direct", "grid", "tail")

    def __init__(self, which, grid_rows, B, H, meta, config, device):
        self.which, self.grid_rows, self.B, self.H = which, grid_rows, B, H
        self.meta, self.config, self.device = meta, config, device
        self.direct = None

    def __call__(self, args: tuple) -> None:
        if self.direct is not None:
            self.direct(self.grid, args + self.tail)
            return
        compiled, cfg = _launch(self.which, self.grid_rows, self.B, self.H, args, self.meta,
                                self.config)
        if compiled is None or INTERPRET:
            return
        jit = _KERNELS[self.which]
        names = [*self.meta, "BLOCK_M", "BLOCK_N"]
        if list(jit.arg_names[len(args):]) != names:  # the direct call passes every parameter
            raise RuntimeError(f"{jit.__name__}: parameters {jit.arg_names[len(args):]} != {names}")
        held = "BLOCK_N" if self.which == "dkdv" else "BLOCK_M"
        self.grid = (triton.cdiv(self.grid_rows, cfg[held]), self.H, self.B)
        self.tail = (*self.meta.values(), cfg["BLOCK_M"], cfg["BLOCK_N"])
        direct = DirectLaunch(jit, {}, self.device)
        direct.bind(compiled)
        self.direct = direct


# --------------------------------------------------------------------------------------------
# Host wrappers
# --------------------------------------------------------------------------------------------


def _bucket(n: int) -> int:
    """Autotuning key for a length: the next power of two (at least 16)."""
    return max(16, triton.next_power_of_2(n))


def _check_launchable(*tensors: Tensor) -> None:
    """The kernels index a head's rows with int32 offsets and put heads and batch on grid axes
    1 and 2 (at most 65535 each): refuse what would overflow either, instead of reading wrong
    memory."""
    for t in tensors:
        B, H, L, D = t.shape
        span = sum((n - 1) * abs(st) for n, st in zip((L, D), t.stride()[2:], strict=True))
        if span >= 2**31:
            raise ValueError(f"one head of a tensor of shape {tuple(t.shape)} and strides "
                             f"{t.stride()} spans {span} elements, beyond int32 offsets")
        if B > 65535 or H > 65535:
            raise ValueError(f"batch {B} and heads {H} must each be at most 65535 (grid limits)")


def _meta(q: Tensor, causal: bool, has_kv_lens: bool = False) -> dict:
    D = q.shape[-1]
    return {
        "HEAD_DIM": D,
        # tl.arange needs a power of two and tl.dot needs at least 16 along the reduction.
        "BLOCK_D": max(16, triton.next_power_of_2(D)),
        "IS_CAUSAL": bool(causal),
        # Exact fp32 products for fp32 inputs (a GPU would otherwise use TF32); fp16/bf16
        # products are exact on tensor cores and take the default.
        "PRECISION": "ieee" if q.dtype == torch.float32 else None,
        "HAS_KV_LENS": bool(has_kv_lens),
    }


# Plans, one per specialization (stepdiff/kernels/launch.py): the key holds each tensor's shape,
# strides, dtype, device and 16-byte alignment (Triton specializes on strides equal to 1 or
# divisible by 16, and on aligned pointers), causality, key padding and the configs asked for.
# A new key runs the checks and builds the plan; a known key allocates the outputs and launches.
_PLANS: dict = {}


def _signature(t: Tensor | None):
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0)


def _config_key(config: dict | None):
    return None if config is None else tuple(sorted(config.items()))


def _device_index(t: Tensor):
    return t.device.index if t.is_cuda else None


def _bhld(t: Tensor, layout: str) -> tuple[tuple, tuple]:
    """Shape and strides of ``t`` as ``[B, H, L, D]`` (a ``[B, L, H, D]`` tensor permuted)."""
    if layout == "bhld":
        return tuple(t.shape), t.stride()
    (B, L, H, D), (sb, sl, sh, sd) = t.shape, t.stride()
    return (B, H, L, D), (sb, sh, sl, sd)


def _forward_plan(q: Tensor, k: Tensor, v: Tensor, causal: bool, config, kv_lens, layout: str):
    views = [t if layout == "bhld" else t.transpose(1, 2) for t in (q, k, v)]
    _check_launchable(*views)
    (B, H, Lq, D), q_strides = _bhld(q, layout)
    (_, _, Lk, _), k_strides = _bhld(k, layout)
    _, v_strides = _bhld(v, layout)
    _, o_strides = _bhld(torch.empty_like(q), layout)
    kernel = _KernelPlan("fwd", Lq, B, H, _meta(views[0], causal, kv_lens is not None), config,
                         _device_index(q))
    strides = (*q_strides, *k_strides, *v_strides, *o_strides, H * Lq, Lq)
    sizes = (Lq, Lk)
    buckets = (_bucket(Lq), _bucket(Lk))

    def run(q, k, v, scale, kv_lens):
        o = torch.empty_like(q)  # in q's layout, written through the permuted strides
        lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
        kernel((q, k, v, o, lse, q if kv_lens is None else kv_lens, *strides, *sizes,
                scale * LOG2E, *buckets))
        return o, lse

    return run


def forward_key(q: Tensor, k: Tensor, v: Tensor, kv_lens: Tensor | None, causal: bool,
                config: dict | None = None, layout: str = "bhld") -> tuple:
    """The plan key of an `attention_forward` call."""
    return ("fwd", layout, _signature(q), _signature(k), _signature(v), _signature(kv_lens),
            bool(causal), _config_key(config))


def attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = False,
                      config: dict | None = None, *, kv_lens: Tensor | None = None,
                      layout: str = "bhld", key: tuple | None = None) -> tuple[Tensor, Tensor]:
    r"""$O = \mathrm{softmax}(c\,QK^\top)V$ and the base-2 log-sum-exp of each row.

    ``q [B, H, Lq, D]``, ``k, v [B, H, Lk, D]`` (any strides; with ``layout="blhd"`` each is
    ``[B, L, H, D]`` and read through permuted strides) give ``o`` shaped and strided like
    ``q`` and ``lse [B, H, Lq]`` (fp32, contiguous) with
    ``lse * ln 2 = logsumexp(scale * q @ k^T, -1)``. ``kv_lens`` (int64 ``[B]`` on the device of
    ``q``, or ``None``): batch ``b`` attends to its first ``kv_lens[b]`` keys only. Inputs are
    assumed checked by the caller. ``config`` fixes ``BLOCK_M``, ``BLOCK_N``, ``num_warps``,
    ``num_stages`` (tests use it to check that the result does not depend on the tiling);
    otherwise the GPU autotunes, once per plan (a repeated call with the same shapes, strides
    and dtypes launches the chosen kernel directly). ``key``: `forward_key` of this call, if
    the caller has it.
    """
    if key is None:
        key = forward_key(q, k, v, kv_lens, causal, config, layout)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _forward_plan(q, k, v, causal, config, kv_lens, layout)
    return plan(q, k, v, scale, kv_lens)


def _backward_plan(do, q, k, v, o, lse, causal, configs, kv_lens):
    _check_launchable(do, q, k, v, o)
    B, H, Lq, D = q.shape
    if lse.shape != (B, H, Lq) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be the forward's contiguous float32 [B, H, Lq] = {[B, H, Lq]}; "
                         f"got {lse.dtype} {list(lse.shape)} strides {lse.stride()}")
    Lk = k.shape[2]
    meta = _meta(q, causal, kv_lens is not None)
    device = _device_index(q)
    delta_grid = (triton.cdiv(Lq, _DELTA_BLOCK_M), H, B)
    delta_tail = (H * Lq, Lq, Lq, D, meta["BLOCK_D"], _DELTA_BLOCK_M)
    delta_kernel = DirectLaunch(_attn_bwd_delta, {}, device)
    dkdv = _KernelPlan("dkdv", Lk, B, H, meta, configs[0], device)
    dq_kernel = _KernelPlan("dq", Lq, B, H, meta, configs[1], device)
    dq_strides, dk_strides, dv_strides = (torch.empty_like(t).stride() for t in (q, k, v))
    common = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    tail = (H * Lq, Lq, Lq, Lk)
    buckets = (_bucket(Lq), _bucket(Lk))
    o_strides, do_strides = o.stride(), do.stride()

    def run(do, q, k, v, o, lse, scale, kv_lens):
        delta = torch.empty_like(lse)
        delta_kernel(delta_grid, (o, do, delta, *o_strides, *do_strides, *delta_tail))
        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        lens = q if kv_lens is None else kv_lens
        end = (*tail, scale, scale * LOG2E, *buckets)
        dkdv((q, k, v, do, lse, delta, dk, dv, lens, *common, *dk_strides, *dv_strides, *end))
        dq_kernel((q, k, v, do, lse, delta, dq, lens, *common, *dq_strides, *end))
        return dq, dk, dv

    return run


def attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                       scale: float, causal: bool = False,
                       configs: tuple[dict | None, dict | None] = (None, None), *,
                       kv_lens: Tensor | None = None, forward_key: tuple | None = None,
                       ) -> tuple[Tensor, Tensor, Tensor]:
    r"""$dQ, dK, dV$ of $O = \mathrm{softmax}(c\,QK^\top)V$ given $dO$; $P$ is recomputed.

    Three launches: $\Delta = \mathrm{rowsum}(dO\circ O)$; then one program per key tile for
    $dK, dV$; then one program per query tile for $dQ$. ``configs`` = (dK/dV config, dQ config),
    each as in `attention_forward`; ``kv_lens`` as there (the padded keys' dK and dV are 0).
    ``o`` and ``lse`` are the forward's (``lse`` contiguous ``[B, H, Lq]``, fp32).
    ``forward_key``: the key of the forward call that made ``o`` and ``lse`` from these ``q``,
    ``k``, ``v`` (it fixes their layouts, so only ``do``'s is looked at).
    """
    if forward_key is not None:
        key = ("bwd", forward_key, _signature(do), _config_key(configs[0]), _config_key(configs[1]))
    else:
        key = ("bwd", _signature(do), _signature(q), _signature(k), _signature(v), _signature(o),
               _signature(lse), _signature(kv_lens), bool(causal), _config_key(configs[0]),
               _config_key(configs[1]))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _backward_plan(do, q, k, v, o, lse, causal, configs, kv_lens)
    return plan(do, q, k, v, o, lse, scale, kv_lens)
