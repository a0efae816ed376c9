r"""Triton kernels for the two elementwise hot paths of diffusion, with their launchers.

- {py:obj}`~stepdiff.kernels.fused_triton.affine_step_kernel`:
  $x' = c_x\,x + c_{\rm pred}\,\mathrm{clamp}(p) + c_{\rm noise}\,z$, the update of every DDPM,
  DDIM, $x_0$-parametrized and Euler step;
- {py:obj}`~stepdiff.kernels.fused_triton.noise_add_kernel`: $x_t = a\,x_0 + s\,\varepsilon$ and
  the target $c_0x_0 + c_1\varepsilon$, from one $\varepsilon$.

Each program handles one tile of ``BLOCK`` consecutive elements of the flattened data; a
per-sample coefficient is found per tile (one sample when the sample size is a multiple of
``BLOCK``, the case of images, else at most two, else one division per element). Loads are
upcast to float32 at once and the result is rounded once, on the store: the math is float32
for fp32, fp16 and bf16 data alike.

**The noise.** $z$ (or $\varepsilon$) is drawn inside the kernel, so it costs no memory traffic.
It is a pure function of the seed, the offset and the element's index $e$ in the flattened
tensor, so it does not depend on the block size, the launch grid or the shape:

- element $e$ lies in group $g = \lfloor e/128\rfloor$, run $k = \lfloor e/32\rfloor \bmod 4$,
  place $m = e \bmod 32$;
- one Philox-4x32-10 call with key = seed and 128-bit counter $(32g + m) + 2^{64}\,$offset
  gives four 32-bit words; two Box-Muller pairs turn them into four normals, and run $k$
  takes the $k$-th. So each Philox call feeds four elements, 32 apart, and every run of 32
  elements is contiguous in memory, which keeps loads and stores wide.

The Box-Muller transform is written out with a logarithm from the float's exponent plus a
short series, and sine and cosine as polynomials on a quarter turn whose quadrant comes
from two random bits: cheaper than the library's accurate `log`, `sin` and `cos`, and the
same in Triton's interpreter as on the GPU.
{py:obj}`stepdiff.kernels.reference.philox_normal_reference` computes the same numbers with NumPy.

This module imports Triton; {py:mod}`stepdiff.kernels.fused` imports it only when a Triton path
is taken, so `TRITON_INTERPRET=1` may be set any time before the first such call.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import DirectLaunch

__all__ = [
    "INTERPRETED",
    "RUN",
    "SUPPORTED_DTYPES",
    "affine_step_kernel",
    "noise_add_kernel",
    "philox_normal_kernel",
    "affine_step_triton",
    "affine_step_key",
    "affine_step_plan",
    "noise_add_triton",
    "noise_add_key",
    "noise_add_plan",
    "philox_normal_triton",
    "launch_config",
]

#: Whether the kernels below were built for Triton's interpreter (``TRITON_INTERPRET=1``
#: when this module was imported); then they run on CPU tensors, one program at a time.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Elements per run: part of the definition of the noise (changing it changes every draw).
RUN = tl.constexpr(32)

#: Data types the kernels read and write (the arithmetic is float32 for all of them).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# How noise enters a kernel (a compile-time switch).
NO_NOISE = tl.constexpr(0)
NOISE_FROM_MEMORY = tl.constexpr(1)
NOISE_FROM_PHILOX = tl.constexpr(2)


# --- noise: Philox words to four standard normals ---------------------------------------------


@triton.jit
def _log_unit(u):
    r"""$\ln u$ for float32 $u \in (0, 1]$: exponent plus an atanh series on the mantissa.

    With $u = 2^e m$, $m \in [\sqrt{1/2}, \sqrt 2)$ and $s = (m-1)/(m+1)$,
    $\ln u = e\ln 2 + 2(s + s^3/3 + s^5/5 + s^7/7 + s^9/9)$; $|s| \le 0.172$, so the first
    omitted term is below $10^{-9}$.
    """
    bits = u.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127  # u >= 2**-33 is a normal float: no subnormal case
    m = ((bits & 0x007FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)  # mantissa in [1, 2)
    big = m > 1.4142135623730951
    m = tl.where(big, 0.5 * m, m)
    e = tl.where(big, e + 1, e)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    # Explicit FMAs: the kernels compile without contraction (see _launch), so every
    # rounding is fixed by this code, whatever else the kernel does.
    series = tl.fma(s2, 0.1111111111111111, 0.14285714285714285)
    series = tl.fma(s2, series, 0.2)
    series = tl.fma(s2, series, 0.3333333333333333)
    series = tl.fma(s2, series, 1.0)
    return tl.fma(e.to(tl.float32), 0.6931471805599453, 2.0 * s * series)


@triton.jit
def _box_muller(w_radius, w_angle):
    r"""Two independent standard normals $(r\cos\theta, r\sin\theta)$ from two uint32 words.

    Radius: $u = (w + \tfrac12)/2^{32} \in (0, 1]$ (rounded to float32) and
    $r = \sqrt{-2\ln u}$, so $|z| \le \sqrt{66\ln 2} \approx 6.8$. Angle:
    $\theta = \tfrac\pi2 q + \varphi$ with quadrant $q$ the top two bits of the word and
    $\varphi \in [-\pi/4, \pi/4)$ from the other 30; $\cos\varphi$ and $\sin\varphi$ are their
    Taylor polynomials to degree 8 and 9 (errors below $3\cdot 10^{-8}$), and the quadrant
    is a swap and two sign flips.
    """
    # 2**-32 and 2**-33: the product is exact, so u is the same with or without an FMA.
    u = tl.fma(w_radius.to(tl.float32), 2.3283064365386963e-10, 1.1641532182693481e-10)
    r = tl.sqrt(tl.maximum(-2.0 * _log_unit(u), 0.0))
    q = (w_angle >> 30).to(tl.int32)
    # phi = (pi/2) * (l / 2**30 - 1/2) for the low 30 bits l.
    phi = tl.fma((w_angle & 0x3FFFFFFF).to(tl.float32), 1.4629180792671596e-09, -0.7853981633974483)
    p = phi * phi
    # Horner forms of the Taylor series, coefficients (-1)^k / (2k+1)! and (-1)^k / (2k)!,
    # as explicit FMAs (see _log_unit).
    sin = tl.fma(p, 2.7557319223985893e-06, -0.0001984126984126984)
    sin = tl.fma(p, sin, 0.008333333333333333)
    sin = tl.fma(p, sin, -0.16666666666666666)
    sin = phi * tl.fma(p, sin, 1.0)
    cos = tl.fma(p, 2.48015873015873e-05, -0.001388888888888889)
    cos = tl.fma(p, cos, 0.041666666666666664)
    cos = tl.fma(p, cos, -0.5)
    cos = tl.fma(p, cos, 1.0)
    # (cos, sin) of theta = q pi/2 + phi: q = 0: (c, s); 1: (-s, c); 2: (-c, -s); 3: (s, -c).
    swap = (q & 1) != 0
    a = tl.where(swap, sin, cos)
    b = tl.where(swap, cos, sin)
    a = tl.where(((q + 1) & 2) != 0, -a, a)
    b = tl.where((q & 2) != 0, -b, b)
    return r * a, r * b


@triton.jit
def _tile_noise(seed_ptr, seed, offset, pid, SEED_IN_MEMORY: tl.constexpr, BLOCK: tl.constexpr):
    """The noise of tile ``pid``: four ``[BLOCK // 128, 32]`` blocks, one per run.

    Entry ``(g, m)`` of block ``k`` is element ``pid * BLOCK + 128 g + 32 k + m``, and all
    four come from one Philox-4x32-10 call: key ``seed``, counter ``(pid * BLOCK // 4 + 32 g
    + m, offset)``. The seed and offset are launch arguments, or are read from a device
    tensor ``[seed, offset]`` at run time, so a CUDA-graph replay sees their current values.
    """
    if SEED_IN_MEMORY:
        seed = tl.load(seed_ptr)
        offset = tl.load(seed_ptr + 1)
    offset = offset.to(tl.int64)
    first = pid.to(tl.int64) * (BLOCK // 4)
    rows = tl.arange(0, BLOCK // (4 * RUN))[:, None]
    cols = tl.arange(0, RUN)[None, :]
    # first is a multiple of BLOCK // 4, a power of two: adding the tile's share cannot carry.
    counter_lo = (first & 0xFFFFFFFF).to(tl.uint32) + (rows * RUN + cols).to(tl.uint32)
    # The other three counter words are the same for the whole tile; they are passed as
    # blocks, as in Triton's own randint4x.
    zero = counter_lo * 0
    counter_hi = zero + (first >> 32).to(tl.uint32)
    offset_lo = zero + (offset & 0xFFFFFFFF).to(tl.uint32)
    offset_hi = zero + (offset >> 32).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, counter_lo, counter_hi, offset_lo, offset_hi)
    z0, z1 = _box_muller(w0, w1)
    z2, z3 = _box_muller(w2, w3)
    return z0, z1, z2, z3


@triton.jit
def _pick(k: tl.constexpr, z0, z1, z2, z3):
    """Block ``k`` of four (``k`` is known at compile time, so this costs nothing)."""
    if k == 0:
        return z0
    elif k == 1:
        return z1
    elif k == 2:
        return z2
    else:
        return z3


@triton.jit
def _run_index(k: tl.constexpr, BLOCK: tl.constexpr):
    """Index within the tile of the elements of run ``k``: ``128 g + 32 k + m``, shape
    ``[BLOCK // 128, 32]``."""
    rows = tl.arange(0, BLOCK // (4 * RUN))[:, None]
    cols = tl.arange(0, RUN)[None, :]
    return rows * (4 * RUN) + k * RUN + cols


# Where a tile's per-sample coefficients come from (a compile-time switch).
NO_SAMPLE = tl.constexpr(0)  # no coefficient is per sample
ONE_SAMPLE = tl.constexpr(1)  # n % BLOCK == 0: the tile lies in one sample
TWO_SAMPLES = tl.constexpr(2)  # n >= BLOCK: the tile meets at most two samples
MANY_SAMPLES = tl.constexpr(3)  # n < BLOCK: one division per element

# How a coefficient is passed.
BY_VALUE = tl.constexpr(0)  # a Python float, passed with the launch
ONE_IN_MEMORY = tl.constexpr(1)  # a 0-d tensor, read at run time
PER_SAMPLE = tl.constexpr(2)  # a [B] tensor, read at run time


@triton.jit
def _samples(start, local, n, batch, SAMPLES: tl.constexpr):
    """Which sample each element of a run belongs to, as ``(b0, b1, second)``: for the ONE
    and TWO cases the tile's first and next sample and a mask of the elements in the next;
    for MANY the sample of every element (in ``b0``)."""
    if SAMPLES == NO_SAMPLE:
        return 0, 0, local < 0  # unused
    elif SAMPLES == MANY_SAMPLES:
        b = tl.minimum((start + local) // n, batch - 1)  # masked tail elements stay in range
        return b, b, local < 0
    else:
        b0 = start // n
        b1 = tl.minimum(b0 + 1, batch - 1)
        # Index in the tile where sample b0 + 1 begins (past BLOCK: not in this tile).
        boundary = tl.minimum((b0 + 1) * n - start, 1 << 30).to(tl.int32)
        return b0, b1, local >= boundary


@triton.jit
def _coefficient(ptr, value, stride, b0, b1, second, KIND: tl.constexpr, SAMPLES: tl.constexpr):
    """A coefficient for the elements of one run, in float32: a scalar, or a block when the
    run meets several samples."""
    if KIND == BY_VALUE:
        return value
    elif KIND == ONE_IN_MEMORY:
        return tl.load(ptr).to(tl.float32)
    elif SAMPLES == TWO_SAMPLES:
        first = tl.load(ptr + b0 * stride).to(tl.float32)
        later = tl.load(ptr + b1 * stride).to(tl.float32)
        return tl.where(second, later, first)
    else:  # ONE_SAMPLE: b0 is the tile's sample; MANY_SAMPLES: b0 is per element
        return tl.load(ptr + b0 * stride).to(tl.float32)


# --- the kernels -------------------------------------------------------------------------------


# Pointers that only feed scalar loads are not specialized on alignment: the samplers pass
# views c[i] whose alignment changes from step to step, which would compile twice.
@triton.jit(do_not_specialize=["cx_ptr", "cp_ptr", "cz_ptr", "seed_ptr", "seed", "offset"])
def affine_step_kernel(
    x_ptr, pred_ptr, noise_ptr, out_ptr,
    cx_ptr, cx_value, cx_stride,
    cp_ptr, cp_value, cp_stride,
    cz_ptr, cz_value, cz_stride,
    seed_ptr, seed, offset, clamp,
    total, n, batch,
    CX: tl.constexpr, CP: tl.constexpr, CZ: tl.constexpr, SAMPLES: tl.constexpr,
    NOISE: tl.constexpr, SEED_IN_MEMORY: tl.constexpr, CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    r"""$x' = c_x[b]\,x + c_{\rm pred}[b]\,\mathrm{clamp}(p, -c, c) + c_{\rm noise}[b]\,z$.

    The data are ``total = batch * n`` contiguous elements, ``n`` per sample; program ``pid``
    handles elements ``[pid * BLOCK, (pid + 1) * BLOCK)`` as four runs. Each coefficient is a
    launch argument, a 0-d tensor or a ``[B]`` tensor (``CX``, ``CP``, ``CZ``); ``z`` is read
    from ``noise_ptr`` or drawn by Philox (``NOISE``).
    """
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK  # int64: a tensor may hold more than 2**31 elements
    # Elements left from this tile on; "local < remaining" is the tail mask. Kept as the plain
    # difference so that Triton sees it is a multiple of 16 when total is, and vectorizes.
    remaining = total - start
    if NOISE == NOISE_FROM_PHILOX:
        z0, z1, z2, z3 = _tile_noise(seed_ptr, seed, offset, pid, SEED_IN_MEMORY, BLOCK)
    for k in tl.static_range(4):
        local = _run_index(k, BLOCK)
        mask = local < remaining
        b0, b1, second = _samples(start, local, n, batch, SAMPLES)
        c_x = _coefficient(cx_ptr, cx_value, cx_stride, b0, b1, second, CX, SAMPLES)
        c_pred = _coefficient(cp_ptr, cp_value, cp_stride, b0, b1, second, CP, SAMPLES)
        x = tl.load(x_ptr + start + local, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(pred_ptr + start + local, mask=mask, other=0.0).to(tl.float32)
        if CLAMP:  # NaN stays NaN, as in torch.clamp
            p = tl.clamp(p, -clamp, clamp, propagate_nan=tl.PropagateNan.ALL)
        y = c_x * x + c_pred * p
        if NOISE != NO_NOISE:
            c_noise = _coefficient(cz_ptr, cz_value, cz_stride, b0, b1, second, CZ, SAMPLES)
            if NOISE == NOISE_FROM_MEMORY:
                z = tl.load(noise_ptr + start + local, mask=mask, other=0.0).to(tl.float32)
            else:
                z = _pick(k, z0, z1, z2, z3)
            y += c_noise * z
        tl.store(out_ptr + start + local, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["a_ptr", "s_ptr", "c0_ptr", "c1_ptr", "seed_ptr", "seed", "offset"])
def noise_add_kernel(
    x0_ptr, noise_ptr, xt_ptr, target_ptr,
    a_ptr, a_value, a_stride,
    s_ptr, s_value, s_stride,
    c0_ptr, c0_value, c0_stride,
    c1_ptr, c1_value, c1_stride,
    seed_ptr, seed, offset,
    total, n, batch,
    A: tl.constexpr, S: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, SAMPLES: tl.constexpr,
    NOISE: tl.constexpr, SEED_IN_MEMORY: tl.constexpr, TARGET_IS_EPS: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    r"""$x_t = a[b]\,x_0 + s[b]\,\varepsilon$ and the target $c_0[b]\,x_0 + c_1[b]\,\varepsilon$.

    Laid out as {py:obj}`~stepdiff.kernels.fused_triton.affine_step_kernel`, whose noise it
    shares: equal seeds and offsets give equal $\varepsilon$ in both. With ``TARGET_IS_EPS``
    the target is $\varepsilon$ itself and ``c0``, ``c1`` are not read.
    """
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK
    remaining = total - start
    if NOISE == NOISE_FROM_PHILOX:
        e0, e1, e2, e3 = _tile_noise(seed_ptr, seed, offset, pid, SEED_IN_MEMORY, BLOCK)
    for k in tl.static_range(4):
        local = _run_index(k, BLOCK)
        mask = local < remaining
        b0, b1, second = _samples(start, local, n, batch, SAMPLES)
        a = _coefficient(a_ptr, a_value, a_stride, b0, b1, second, A, SAMPLES)
        s = _coefficient(s_ptr, s_value, s_stride, b0, b1, second, S, SAMPLES)
        x0 = tl.load(x0_ptr + start + local, mask=mask, other=0.0).to(tl.float32)
        if NOISE == NOISE_FROM_MEMORY:
            eps = tl.load(noise_ptr + start + local, mask=mask, other=0.0).to(tl.float32)
        else:
            eps = _pick(k, e0, e1, e2, e3)
        tl.store(xt_ptr + start + local, (a * x0 + s * eps).to(xt_ptr.dtype.element_ty), mask=mask)
        if TARGET_IS_EPS:
            target = eps
        else:
            c0 = _coefficient(c0_ptr, c0_value, c0_stride, b0, b1, second, C0, SAMPLES)
            c1 = _coefficient(c1_ptr, c1_value, c1_stride, b0, b1, second, C1, SAMPLES)
            target = c0 * x0 + c1 * eps
        tl.store(target_ptr + start + local, target.to(target_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed_ptr", "seed", "offset"])
def philox_normal_kernel(out_ptr, seed_ptr, seed, offset, total, SEED_IN_MEMORY: tl.constexpr, BLOCK: tl.constexpr):
    r"""The noise alone: ``total`` standard normals $z_0, \dots, z_{\mathrm{total}-1}$, as the two kernels
    above draw them: $z_e$ is the $k$-th of the four Box-Muller normals of one Philox-4x32-10 call with
    key seed and counter $32\lfloor e/128\rfloor + (e \bmod 32) + 2^{64}\,\mathrm{offset}$, where
    $k = \lfloor e/32\rfloor \bmod 4$ (see the module docstring)."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK
    remaining = total - start
    z0, z1, z2, z3 = _tile_noise(seed_ptr, seed, offset, pid, SEED_IN_MEMORY, BLOCK)
    for k in tl.static_range(4):
        local = _run_index(k, BLOCK)
        z = _pick(k, z0, z1, z2, z3)
        tl.store(out_ptr + start + local, z.to(out_ptr.dtype.element_ty), mask=local < remaining)


# --- launchers ---------------------------------------------------------------------------------

_MAX_SEED = 2**63 - 1
_DEFAULT_BLOCK = {torch.float32: 2048, torch.float16: 1024, torch.bfloat16: 1024}


def launch_config(total: int, dtype: torch.dtype, block: int | None = None, num_warps: int | None = None):
    r"""``(BLOCK, num_warps)`` for ``total`` elements of ``dtype``: by default
    $\mathrm{BLOCK} = \min\big(B_0, \max(128, 2^{\lceil \log_2 \mathrm{total} \rceil})\big)$ with $B_0$ = 2048
    (fp32) or 1024 (fp16/bf16), and $\mathrm{num\_warps} = \max(1, \min(4, \lfloor\mathrm{BLOCK}/512\rfloor))$.

    By default each thread handles 16 elements, a tile of 2048 (fp32, 4 warps) or 1024
    (fp16/bf16, 2 warps), and smaller tiles for small tensors. These are what an H100 measured
    fastest (benchmarks/sweep_fused.py, CUDA-graph replays at 256x4x128x128): in bf16, 1024
    elements on 2 warps reached 92% of copy bandwidth without noise and 82% with it, against
    87% and 83% for 4096 on 4 warps, and noise_add 76% against 71%; in fp32, 2048 on 4 warps
    was within a point or two of the best setting for every kernel. A ``block`` must be a
    power of two, at least 128 (one group of four runs).
    """
    if block is None:
        block = _DEFAULT_BLOCK.get(dtype, 2048)
        block = min(block, max(4 * RUN.value, triton.next_power_of_2(max(total, 1))))
    if block < 4 * RUN.value or block & (block - 1):
        raise ValueError(f"block must be a power of two >= {4 * RUN.value}; got {block}")
    if num_warps is None:
        num_warps = max(1, min(4, block // 512))
    return block, num_warps


def _shape(x: Tensor) -> tuple[int, int, int]:
    """``(total, B, n)``: elements, batch size and elements per sample of batch-first data."""
    batch = x.shape[0] if x.ndim else 1
    total = x.numel()
    return total, batch, (total // batch if batch else 0)


def _samples_mode(coefficients, n: int, block: int):
    """How the kernel finds a tile's per-sample coefficients (see ``ONE_SAMPLE`` etc.)."""
    if not any(kind == PER_SAMPLE.value for kind in coefficients):
        return NO_SAMPLE.value
    if n % block == 0:
        return ONE_SAMPLE.value
    return TWO_SAMPLES.value if n >= block else MANY_SAMPLES.value


def _check_data(name: str, t: Tensor, like: Tensor | None) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton kernels take float32, float16 or bfloat16; {name} is {t.dtype}")
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(f"{name} must have shape {tuple(like.shape)}; got {tuple(t.shape)}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but the data are on {like.device}")
    if not t.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous (strides {t.stride()} for shape {tuple(t.shape)}); pass {name}.contiguous()"
        )


def _coefficient_args(name: str, c, x: Tensor, batch: int):
    """``(getter, stride, kind)`` for a float, a 0-d tensor or a ``[B]`` tensor: ``getter(c, x)``
    gives the kernel's ``(pointer, value)`` for this call's coefficient."""
    if isinstance(c, Tensor):
        if c.ndim > 1 or (c.ndim == 1 and c.shape[0] != batch):
            raise ValueError(f"{name} must be a scalar or have shape [{batch}]; got {tuple(c.shape)}")
        if not c.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got {c.dtype}")
        if c.device != x.device:
            if c.ndim == 0 and c.device.type == "cpu":
                return _host_scalar, 0, BY_VALUE.value  # read on the host: no device sync
            raise ValueError(f"{name} is on {c.device} but the data are on {x.device}")
        if c.ndim == 0:
            return _in_memory, 0, ONE_IN_MEMORY.value
        return _in_memory, c.stride(0), PER_SAMPLE.value
    if isinstance(c, bool) or not isinstance(c, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor; got {type(c).__name__}")
    return _host_scalar, 0, BY_VALUE.value


def _host_scalar(c, x):
    return x, float(c)


def _in_memory(c, x):
    return c, 0.0


def _seed_args(seed, offset: int, x: Tensor):
    """``(seed_ptr, seed, offset, SEED_IN_MEMORY)`` for an int seed or an int64 state tensor."""
    from .fused import _check_seed  # one set of rules for the dispatcher and the launchers

    _check_seed(seed, offset, x)
    if isinstance(seed, Tensor):
        return seed, 0, 0, True
    return x, seed, offset, False


def _check_device(x: Tensor) -> None:
    if x.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "CPU tensors run the Triton kernels only in Triton's interpreter: set "
            "TRITON_INTERPRET=1 before the first Triton call (or use CUDA tensors)"
        )


# No floating-point contraction on the GPU: with it, the compiler (LLVM, then ptxas) fuses
# multiply-adds where its instruction schedule suggests, which differs between variants of a
# kernel, so the same seed gave noise differing in the last bit in about 1% of elements
# depending on whether the seed was passed by value or read from memory (measured on an H100).
# The noise code writes its FMAs explicitly; everything else rounds exactly as written.
_OPTIONS = {} if INTERPRETED else {"enable_fp_fusion": False}


def _launch(kernel, grid, x: Tensor, args, num_warps: int) -> None:
    # Triton launches on the current device; follow the data if they live elsewhere.
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):
            kernel[grid](*args, num_warps=num_warps, **_OPTIONS)
    else:
        kernel[grid](*args, num_warps=num_warps, **_OPTIONS)


# --- plans: one per specialization, so that a repeated call skips every check ------------------
#
# A call's key holds everything the checks and Triton's specialization depend on (see
# stepdiff/kernels/launch.py): each tensor's dtype, shape, device, contiguity and 16-byte
# alignment, each coefficient's kind (and a tensor's stride and alignment), how the noise is given, whether an
# int seed or offset needs 64 bits, the clamp's presence and the launch settings. A new key runs
# every check, then builds the plan: the launch settings, the grid, the constant arguments and
# the compiled kernel, launched directly from then on. What the key cannot hold, because it
# changes from call to call, is checked on each call: the seed's and clamp's values.

_PLANS: dict = {}
_INT32_END = 2**31


def _tensor_key(t):
    if t is None:
        return None
    return (t.dtype, t.shape, t.device, t.is_contiguous(), t.data_ptr() % 16 == 0)


def _coefficient_key(c):
    if isinstance(c, Tensor):
        # Triton specialises a pointer on its 16-byte alignment: a coefficient row c[i] of a
        # table is aligned only for some i, so alignment is part of the key like the data's.
        return (c.dtype, c.shape, c.device, c.stride(), c.data_ptr() % 16 == 0)
    return type(c)


def _seed_key(seed, offset):
    if isinstance(seed, Tensor):
        return (seed.dtype, seed.shape, seed.device, seed.data_ptr() % 16 == 0, offset)
    if type(seed) is int and type(offset) is int:
        # Triton passes an int below 2**31 as int32, else as int64: part of the specialization.
        return (seed < _INT32_END, offset < _INT32_END)
    return (type(seed), type(offset))  # refused when the plan is built


def _noise_key(c_noise, noise, seed, offset):
    if c_noise is None:
        return None
    return ("given", _tensor_key(noise)) if noise is not None else ("seed", _seed_key(seed, offset))


def _device_index(x: Tensor):
    return x.device.index if x.is_cuda else None


def _guarded(launch, device):
    """``launch`` run with ``device`` current (Triton launches on the current device)."""
    if device is None:
        return launch

    def run(grid, args):
        if torch.cuda.current_device() != device:
            with torch.cuda.device(device):
                launch(grid, args)
        else:
            launch(grid, args)

    return run


def _check_seed_value(seed, offset) -> None:
    """The per-call part of the seed checks (its type and tensor layout are in the key)."""
    if not isinstance(seed, Tensor) and not (0 <= seed <= _MAX_SEED and 0 <= offset <= _MAX_SEED):
        raise ValueError(f"seed and offset must lie in [0, 2**63 - 1]; got {seed}, {offset}")


def affine_step_key(x, pred, c_x, c_pred, c_noise, noise, seed, offset, clamp, out, block, num_warps) -> tuple:
    """The plan key of an ``affine_step_triton`` call (see the comment above ``_PLANS``)."""
    return (
        "affine_step",
        _tensor_key(x),
        _tensor_key(pred),
        _tensor_key(out),
        _coefficient_key(c_x),
        _coefficient_key(c_pred),
        _coefficient_key(c_noise),
        _noise_key(c_noise, noise, seed, offset),
        clamp is None,
        block,
        num_warps,
    )


def affine_step_plan(x, pred, c_x, c_pred, c_noise, noise, seed, offset, clamp, out, block, num_warps):
    r"""Check an ``affine_step_triton`` call and build its plan: a function of the call's
    arguments ``(x, pred, c_x, c_pred, c_noise, noise, seed, offset, clamp, out)`` that launches
    the kernel, $x' = c_x x + c_{\rm pred}\,\mathrm{clamp}(p) + c_{\rm noise} z$ into ``out``, and returns
    ``out``, valid for every call with the same key."""
    _check_device(x)
    _check_data("x", x, None)
    _check_data("pred", pred, x)
    if out is not None:
        _check_data("out", out, x)
        if out.dtype != x.dtype:
            raise TypeError(f"out must have the dtype of x, {x.dtype}; got {out.dtype}")
    total, batch, n = _shape(x)
    if c_noise is None:
        mode, seed_in_memory = NO_NOISE.value, False
    elif noise is not None:
        _check_data("noise", noise, x)
        mode, seed_in_memory = NOISE_FROM_MEMORY.value, False
    elif seed is None:
        raise ValueError("c_noise needs noise, or a seed to draw it from")
    else:
        mode, seed_in_memory = NOISE_FROM_PHILOX.value, _seed_args(seed, offset, x)[3]
    if clamp is not None and not clamp >= 0:
        raise ValueError(f"clamp must be a non-negative number; got {clamp}")
    gx, sx, kx = _coefficient_args("c_x", c_x, x, batch)
    gp, sp, kp = _coefficient_args("c_pred", c_pred, x, batch)
    gz, sz, kz = _coefficient_args("c_noise", 0.0 if c_noise is None else c_noise, x, batch)
    block, num_warps = launch_config(total, x.dtype, block, num_warps)
    samples = _samples_mode((kx, kp, kz), n, block)
    grid = (triton.cdiv(total, block), 1, 1)  # three entries: the launcher's form
    tail = (total, n, batch, kx, kp, kz, samples, mode, seed_in_memory, clamp is not None, block)
    device = _device_index(x)
    direct = DirectLaunch(affine_step_kernel, {"num_warps": num_warps, **_OPTIONS}, device)
    launch = _guarded(direct, device)
    philox = mode == NOISE_FROM_PHILOX.value
    given = mode == NOISE_FROM_MEMORY.value
    empty = total == 0

    def run(x, pred, c_x, c_pred, c_noise, noise, seed, offset, clamp, out):
        if out is None:
            out = torch.empty_like(x)
        if empty:
            return out
        if philox:
            _check_seed_value(seed, offset)
            seed_args = (seed, 0, 0) if seed_in_memory else (x, seed, offset)
        else:
            seed_args = (x, 0, 0)
        if clamp is None:
            clamp = 0.0
        elif not clamp >= 0:
            raise ValueError(f"clamp must be a non-negative number; got {clamp}")
        cx_ptr, cx_value = gx(c_x, x)
        cp_ptr, cp_value = gp(c_pred, x)
        cz_ptr, cz_value = gz(c_noise, x) if c_noise is not None else (x, 0.0)
        args = (x, pred, noise if given else x, out, cx_ptr, cx_value, sx, cp_ptr, cp_value, sp,
                cz_ptr, cz_value, sz, *seed_args, float(clamp), *tail)
        launch(grid, args)
        return out

    def warm(x, pred, c_x, c_pred, c_noise, noise, seed, offset, clamp, out):
        """Compile this plan's kernel without launching it."""
        if not empty:
            seed_args = (seed, 0, 0) if seed_in_memory else (x, 0, 0)
            args = (x, pred, noise if given else x, x if out is None else out, *gx(c_x, x), sx,
                    *gp(c_pred, x), sp, *(gz(c_noise, x) if c_noise is not None else (x, 0.0)), sz,
                    *seed_args, 0.0, *tail)
            direct.warm(grid, args)

    run.warm = warm
    return run


def affine_step_triton(
    x: Tensor,
    pred: Tensor,
    c_x: Tensor | float,
    c_pred: Tensor | float,
    c_noise: Tensor | float | None = None,
    *,
    noise: Tensor | None = None,
    seed: int | Tensor | None = None,
    offset: int = 0,
    clamp: float | None = None,
    out: Tensor | None = None,
    block: int | None = None,
    num_warps: int | None = None,
) -> Tensor:
    r"""$x' = c_x x + c_{\rm pred}\,\mathrm{clamp}(p) + c_{\rm noise} z$ in one launch.

    ``x``, ``pred`` (and ``noise``, ``out``): contiguous ``[B, ...]`` tensors, float32,
    float16 or bfloat16. Coefficients: Python floats, 0-d tensors (on the device of ``x``, or
    on the CPU: read on the host) or ``[B]`` tensors on the device of ``x``. With ``c_noise``,
    ``z`` is ``noise`` if given, else drawn in the kernel from ``seed`` and ``offset`` (see the
    module docstring); ``seed`` is an int, or an int64 device tensor ``[seed, offset]`` read by
    the kernel at run time. ``out`` may be ``x``. A repeated call with the same key (dtypes,
    shapes, kinds of argument: see `affine_step_key`) reuses its checked plan and launches the
    compiled kernel directly.
    """
    key = affine_step_key(x, pred, c_x, c_pred, c_noise, noise, seed, offset, clamp, out, block, num_warps)
    plan = _PLANS.get(key)
    if plan is None:
        plan = affine_step_plan(x, pred, c_x, c_pred, c_noise, noise, seed, offset, clamp, out, block, num_warps)
        _PLANS[key] = plan
    return plan(x, pred, c_x, c_pred, c_noise, noise, seed, offset, clamp, out)


def noise_add_key(x0, a, s, c0, c1, noise, seed, offset, block, num_warps) -> tuple:
    """The plan key of a ``noise_add_triton`` call."""
    return (
        "noise_add",
        _tensor_key(x0),
        _coefficient_key(a),
        _coefficient_key(s),
        _coefficient_key(c0),
        _coefficient_key(c1),
        _noise_key(True, noise, seed, offset),
        block,
        num_warps,
    )


def noise_add_plan(x0, a, s, c0, c1, noise, seed, offset, block, num_warps):
    r"""Check a ``noise_add_triton`` call and build its plan (as `affine_step_plan`): a function
    of ``(x0, a, s, c0, c1, noise, seed, offset)`` returning ``(x_t, target)``, $x_t = a\,x_0 + s\,\varepsilon$
    and $c_0 x_0 + c_1 \varepsilon$ (or $\varepsilon$ itself when ``c0`` and ``c1`` are ``None``)."""
    _check_device(x0)
    _check_data("x0", x0, None)
    total, batch, n = _shape(x0)
    if noise is not None:
        _check_data("noise", noise, x0)
        mode, seed_in_memory = NOISE_FROM_MEMORY.value, False
    elif seed is None:
        raise ValueError("noise_add needs noise, or a seed to draw it from")
    else:
        mode, seed_in_memory = NOISE_FROM_PHILOX.value, _seed_args(seed, offset, x0)[3]
    target_is_eps = c0 is None and c1 is None
    ga, sa, ka = _coefficient_args("a", a, x0, batch)
    gs, ss, ks = _coefficient_args("s", s, x0, batch)
    g0, s0, k0 = _coefficient_args("c0", 0.0 if c0 is None else c0, x0, batch)
    g1, s1, k1 = _coefficient_args("c1", 0.0 if c1 is None else c1, x0, batch)
    block, num_warps = launch_config(total, x0.dtype, block, num_warps)
    samples = _samples_mode((ka, ks) if target_is_eps else (ka, ks, k0, k1), n, block)
    grid = (triton.cdiv(total, block), 1, 1)  # three entries: the launcher's form
    tail = (total, n, batch, ka, ks, k0, k1, samples, mode, seed_in_memory, target_is_eps, block)
    device = _device_index(x0)
    direct = DirectLaunch(noise_add_kernel, {"num_warps": num_warps, **_OPTIONS}, device)
    launch = _guarded(direct, device)
    philox = mode == NOISE_FROM_PHILOX.value
    empty = total == 0

    def run(x0, a, s, c0, c1, noise, seed, offset):
        x_t = torch.empty_like(x0)
        target = torch.empty_like(x0)
        if empty:
            return x_t, target
        if philox:
            _check_seed_value(seed, offset)
            seed_args = (seed, 0, 0) if seed_in_memory else (x0, seed, offset)
        else:
            seed_args = (x0, 0, 0)
        a_ptr, a_value = ga(a, x0)
        s_ptr, s_value = gs(s, x0)
        c0_ptr, c0_value = (x0, 0.0) if c0 is None else g0(c0, x0)
        c1_ptr, c1_value = (x0, 0.0) if c1 is None else g1(c1, x0)
        args = (x0, x0 if philox else noise, x_t, target, a_ptr, a_value, sa, s_ptr, s_value, ss,
                c0_ptr, c0_value, s0, c1_ptr, c1_value, s1, *seed_args, *tail)
        launch(grid, args)
        return x_t, target

    def warm(x0, a, s, c0, c1, noise, seed, offset):
        """Compile this plan's kernel without launching it."""
        if not empty:
            seed_args = (seed, 0, 0) if seed_in_memory else (x0, 0, 0)
            c0_args = (x0, 0.0) if c0 is None else g0(c0, x0)
            c1_args = (x0, 0.0) if c1 is None else g1(c1, x0)
            args = (x0, x0 if philox else noise, x0, x0, *ga(a, x0), sa, *gs(s, x0), ss, *c0_args, s0,
                    *c1_args, s1, *seed_args, *tail)
            direct.warm(grid, args)

    run.warm = warm
    return run


def noise_add_triton(
    x0: Tensor,
    a: Tensor | float,
    s: Tensor | float,
    c0: Tensor | float | None = None,
    c1: Tensor | float | None = None,
    *,
    noise: Tensor | None = None,
    seed: int | Tensor | None = None,
    offset: int = 0,
    block: int | None = None,
    num_warps: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""$x_t = a x_0 + s\varepsilon$ and the target $c_0x_0 + c_1\varepsilon$, in one launch.

    Arguments as for {py:obj}`stepdiff.kernels.fused_triton.affine_step_triton` (and planned the
    same way); $\varepsilon$ is ``noise`` if given, else drawn from ``seed`` and ``offset``. If
    only one of ``c0``, ``c1`` is given, the other counts as 0.
    """
    key = noise_add_key(x0, a, s, c0, c1, noise, seed, offset, block, num_warps)
    plan = _PLANS.get(key)
    if plan is None:
        plan = noise_add_plan(x0, a, s, c0, c1, noise, seed, offset, block, num_warps)
        _PLANS[key] = plan
    return plan(x0, a, s, c0, c1, noise, seed, offset)


def philox_normal_triton(
    shape: tuple[int, ...] | torch.Size,
    seed: int | Tensor,
    offset: int = 0,
    *,
    device: torch.device | str = "cuda",
    dtype: torch.dtype = torch.float32,
    block: int | None = None,
    num_warps: int | None = None,
) -> Tensor:
    r"""The in-kernel noise on its own: a tensor of ``shape`` of standard normals, equal to
    the ``z`` the kernels above add for the same seed, offset and shape; element $e$ of the flattened
    tensor is the $z_e$ of `philox_normal_kernel`, so it depends on $e$, the seed and the offset only."""
    out = torch.empty(shape, device=device, dtype=dtype)
    _check_device(out)
    _check_data("out", out, None)
    seed_args = _seed_args(seed, offset, out)
    total = out.numel()
    if total == 0:
        return out
    block, num_warps = launch_config(total, dtype, block, num_warps)
    args = (out, *seed_args[:3], total, seed_args[3], block)
    _launch(philox_normal_kernel, (triton.cdiv(total, block),), out, args, num_warps)
    return out
