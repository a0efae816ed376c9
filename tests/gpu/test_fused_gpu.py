"""The fused elementwise kernels compiled for a CUDA GPU (skipped without one).

The CPU tests (tests/kernels/test_fused.py) run the same kernels in Triton's interpreter at
small sizes; here they run compiled, in fp32, fp16 and bf16, at large odd sizes, and inside
CUDA graphs: a whole DDPM sampling loop of the package is captured once and replayed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from stepdiff.kernels import affine_step, fused, noise_add
from stepdiff.kernels import fused_triton as ft
from stepdiff.kernels.reference import philox_normal_reference

DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# Large, odd shapes: a tail in every tile size, samples that straddle tiles, and the
# image shape of the benchmark (a multiple of every tile size).
SHAPES = [(3, 1_000_003), (5, 3, 211, 307), (64, 3, 64, 64), (100_001,)]
# The compiled kernel's noise equals the float64 reference up to float32 rounding in its log,
# sqrt, sin and cos (a few 1e-7 relative); any error in the stream itself is of order 1.
NOISE_TOL = 1e-5
Z_LIMIT = 5.0  # standard errors allowed per statistical check: false-alarm rate 5.7e-7


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _randn(shape, dtype=torch.float32, seed=0, scale=1.0):
    return (scale * torch.randn(shape, generator=_generator(seed), device=DEVICE)).to(dtype)


def _per_sample64(c, x):
    c = torch.as_tensor(c, dtype=torch.float64, device=x.device)
    return c.reshape(-1, *([1] * (x.ndim - 1))) if c.ndim == 1 else c


def assert_close_to_float64(y, y64, scale, dtype):
    """|y - y64| <= u_out |y64| + 4 u_32 S (+ 2**-25 in fp16); see tests/kernels/test_fused.py."""
    bound = UNIT_ROUNDOFF[dtype] * y64.abs() + 4 * 2.0**-24 * scale + (2.0**-25 if dtype == torch.float16 else 0.0)
    error = (y.double() - y64).abs()
    worst = float((error - bound).max())
    assert worst <= 0, f"error exceeds the bound by {worst:.3g} (max {float(error.max()):.3g})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_affine_step_matches_float64(dtype, shape):
    batch = shape[0]
    x, pred, noise = _randn(shape, dtype, 1), _randn(shape, dtype, 2, 2.0), _randn(shape, dtype, 3)
    c_x = 0.5 + torch.rand(batch, generator=_generator(4), device=DEVICE)
    c_pred = torch.rand((), generator=_generator(5), device=DEVICE)
    c_noise = 0.3
    x64, p64, z64 = x.double(), pred.double(), noise.double()
    cx64, cp64 = _per_sample64(c_x, x), _per_sample64(c_pred, x)

    y = affine_step(x, pred, c_x, c_pred, c_noise, noise=noise, clamp=1.5)
    assert y.dtype == dtype
    p_clip = p64.clamp(-1.5, 1.5)
    y64 = cx64 * x64 + cp64 * p_clip + c_noise * z64
    scale = (cx64 * x64).abs() + (cp64 * p_clip).abs() + (c_noise * z64).abs()
    assert_close_to_float64(y, y64, scale, dtype)

    y = affine_step(x, pred, c_x, c_pred)  # deterministic: DDIM with eta = 0, Euler
    assert_close_to_float64(y, cx64 * x64 + cp64 * p64, (cx64 * x64).abs() + (cp64 * p64).abs(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_noise_add_matches_float64(dtype, shape):
    batch = shape[0]
    x0, eps = _randn(shape, dtype, 6), _randn(shape, dtype, 7)
    a = torch.rand(batch, generator=_generator(8), device=DEVICE)
    s = torch.sqrt(1 - a**2)
    x64, e64 = x0.double(), eps.double()
    a64, s64 = _per_sample64(a, x0), _per_sample64(s, x0)
    x_t, v = noise_add(x0, a, s, -s, a, noise=eps)  # the v target
    assert_close_to_float64(x_t, a64 * x64 + s64 * e64, (a64 * x64).abs() + (s64 * e64).abs(), dtype)
    assert_close_to_float64(v, a64 * e64 - s64 * x64, (a64 * e64).abs() + (s64 * x64).abs(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_noise_equals_numpy_reference(dtype):
    shape, seed, offset = (3, 1_400_003), 2**40 + 123, 2**33 + 5
    z = ft.philox_normal_triton(shape, seed, offset, device=DEVICE, dtype=dtype)
    z64 = philox_normal_reference(shape, seed, offset, dtype=torch.float64)
    expected = z64.to(DEVICE)
    if dtype == torch.float32:
        torch.testing.assert_close(z.double(), expected, rtol=NOISE_TOL, atol=NOISE_TOL)
    else:  # the float32 noise rounded once to the storage type
        ref32 = ft.philox_normal_triton(shape, seed, offset, device=DEVICE)
        assert torch.equal(z, ref32.to(dtype))


def test_noise_is_the_same_for_every_block_size_and_in_both_kernels():
    shape = (7, 300_007)
    zero = torch.zeros(shape, device=DEVICE)
    runs = [
        ft.affine_step_triton(zero, zero, 0.0, 0.0, 1.0, seed=3, offset=1, block=b, num_warps=w)
        for b, w in ((128, 1), (1024, 2), (2048, 4), (8192, 8))
    ]
    for other in runs[1:]:
        assert torch.equal(other, runs[0])
    _, eps = noise_add(zero.half(), 1.0, 1.0, seed=3, offset=1)
    assert torch.equal(eps, runs[0].half())


def test_noise_statistics_on_the_gpu():
    """2**24 + 4099 draws (seed 77) as [17, ...]: moments, KS, tails, no correlation at lags
    1, 32, 64, 96, 128 or between samples, for values and squares. 5 standard errors per
    check (false-alarm rate 5.7e-7 each), KS p > 1e-4: below 2e-4 for all checks together."""
    n_per = (2**24 + 4099) // 17
    z = ft.philox_normal_triton((17, n_per), 77, device=DEVICE).double()
    flat = z.reshape(-1)
    n = flat.numel()
    se = 1.0 / n**0.5
    assert abs(float(flat.mean())) < Z_LIMIT * se
    assert abs(float(flat.var()) - 1.0) < Z_LIMIT * 2**0.5 * se
    assert abs(float((flat**4).mean()) - 3.0) < Z_LIMIT * 96**0.5 * se
    p_tail = 2 * stats.norm.sf(4.0)
    tail = float((flat.abs() > 4.0).double().mean())
    assert abs(tail - p_tail) < Z_LIMIT * (p_tail * (1 - p_tail) / n) ** 0.5
    assert float(flat.abs().max()) <= (66 * np.log(2)) ** 0.5
    sample = flat[:: max(1, n // 2_000_000)].cpu().numpy()  # KS on 2M values keeps scipy fast
    assert stats.kstest(sample, "norm").pvalue > 1e-4

    def corr(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).mean() / (a.std() * b.std()))

    for lag in (1, 32, 64, 96, 128):
        a, b = flat[:-lag], flat[lag:]
        assert abs(corr(a, b)) < Z_LIMIT / a.numel() ** 0.5, lag
        assert abs(corr(a**2, b**2)) < Z_LIMIT / a.numel() ** 0.5, lag
    a, b = z[:-1].reshape(-1), z[1:].reshape(-1)
    assert abs(corr(a, b)) < Z_LIMIT / a.numel() ** 0.5
    assert abs(corr(a**2, b**2)) < Z_LIMIT / a.numel() ** 0.5


def test_device_mixes_are_refused():
    x = _randn((4, 100))
    with pytest.raises(ValueError, match="pred is on cpu"):
        affine_step(x, x.cpu(), 1.0, 1.0)
    with pytest.raises(ValueError, match="c_x is on cpu"):
        affine_step(x, x, torch.ones(4), 1.0)
    with pytest.raises(ValueError, match="generator is on cpu"):
        affine_step(x, x, 1.0, 1.0, 1.0, generator=torch.Generator())
    with pytest.raises(ValueError, match="seed tensor is on cpu"):
        noise_add(x, 1.0, 1.0, seed=torch.tensor([1, 2]))
    assert fused.resolve_backend(x) == "triton"
    assert fused.resolve_backend(x.double()) == "torch"
    # A 0-d CPU coefficient is read on the host without a device synchronisation.
    y = affine_step(x, x, torch.tensor(0.5), 0.5)
    torch.testing.assert_close(y, x)


def _linear_denoiser(scale: float):
    """A cheap stand-in for a network: the fixed linear map x0_hat = scale * x."""
    return lambda x, t: scale * x


def _warm_graph(fn):
    """Run ``fn`` once on a side stream (compiling its kernels) and return an empty graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    return graph


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_ddpm_loop_in_one_cuda_graph(dtype):
    """sample_ddpm (50 steps, fused kernel per step) captured once: each replay draws new
    noise, re-seeding the generator reproduces the first replay bit for bit, and the eager
    loop is reproducible from the generator's state too. (Eagerly the kernel's seed is the
    generator's Philox state read on the host; under capture it is drawn on the device, so a
    replay and the eager loop draw different, equally distributed, noise: see fused.py.)"""
    from stepdiff.samplers import sample_ddpm
    from stepdiff.schedules import VPLinearSchedule, time_grid

    schedule = VPLinearSchedule()
    ts = time_grid(50).to(DEVICE)  # on the device: the loop reads it without host copies
    x_init = _randn((16, 3, 32, 32), dtype, 9)
    model = _linear_denoiser(0.8)
    g = _generator(0)
    run = lambda: sample_ddpm(model, x_init, schedule, ts, generator=g)  # noqa: E731
    graph = _warm_graph(run)
    if hasattr(graph, "register_generator_state"):  # needed for a non-default generator
        graph.register_generator_state(g)
    with torch.cuda.graph(graph):
        out = run()
    g.manual_seed(1)
    graph.replay()
    first = out.clone()
    graph.replay()
    second = out.clone()
    g.manual_seed(1)
    graph.replay()
    again = out.clone()
    torch.cuda.synchronize()
    assert torch.isfinite(first.float()).all()
    assert not torch.equal(first, second)
    assert torch.equal(first, again)
    g.manual_seed(1)
    eager = run()
    g.manual_seed(1)
    assert torch.equal(run(), eager) and torch.isfinite(eager.float()).all()


def test_noise_add_and_seed_tensor_under_capture():
    """Under capture, the generator path and a device [seed, offset] tensor advanced on the
    device both give new noise on every replay, reproducibly."""
    x0 = _randn((8, 3, 17, 19), seed=10)
    a = torch.rand(8, generator=_generator(11), device=DEVICE)
    g = _generator(3)
    state = torch.tensor([12345, 0], dtype=torch.int64, device=DEVICE)

    def step():
        x_t, eps = noise_add(x0, a, torch.sqrt(1 - a**2), generator=g)
        z = ft.philox_normal_triton(x0.shape, state, device=DEVICE)
        state[1:].add_(1)  # advanced on the device: the next replay reads the new offset
        return x_t, eps, z

    graph = _warm_graph(step)
    state[1] = 0
    if hasattr(graph, "register_generator_state"):
        graph.register_generator_state(g)
    with torch.cuda.graph(graph):
        x_t, eps, z = step()
    g.manual_seed(0)
    state[1] = 0
    graph.replay()
    first = (x_t.clone(), eps.clone(), z.clone())
    graph.replay()
    assert not torch.equal(eps, first[1]) and not torch.equal(z, first[2])
    assert torch.equal(z, ft.philox_normal_triton(x0.shape, 12345, 1, device=DEVICE))
    g.manual_seed(0)
    state[1] = 0
    graph.replay()
    for now, then in zip((x_t, eps, z), first, strict=True):
        assert torch.equal(now, then)


def test_generator_noise_needs_no_seed_kernel():
    """Outside capture the noise from a generator is its Philox state read on the host: one
    kernel per call (the fused one), the generator's offset moved on by 4, and the noise the
    documented stream for key = the generator's seed, counter offset 2**62 + offset / 4."""
    from torch.profiler import ProfilerActivity, profile

    shape = (5, 3, 37, 41)
    zero = torch.zeros(shape, device=DEVICE)
    g = _generator(123)
    affine_step(zero, zero, 0.0, 0.0, 1.0, generator=g)  # builds the plan (compiles)
    used = g.get_offset()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        z = affine_step(zero, zero, 0.0, 0.0, 1.0, generator=g)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert kernels and all("affine_step_kernel" in name for name in kernels), kernels
    assert g.get_offset() == used + 4
    want = philox_normal_reference(shape, 123, 2**62 + used // 4, dtype=torch.float64).to(DEVICE)
    torch.testing.assert_close(z.double(), want, rtol=NOISE_TOL, atol=NOISE_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_launches_equal_the_first_and_follow_the_stream(dtype):
    """Calls after the first launch the compiled kernel directly: the same result bit for bit,
    and on the current stream (a kernel queued on a side stream reads what that stream wrote
    before it, however long that took)."""
    shape = (64, 3, 64, 64)
    x, pred = _randn(shape, dtype, 41), _randn(shape, dtype, 42)
    c = torch.rand(64, generator=_generator(43), device=DEVICE)
    first = affine_step(x, pred, c, 0.3, 0.2, seed=9, clamp=1.0)
    second = affine_step(x, pred, c, 0.3, 0.2, seed=9, clamp=1.0)
    assert torch.equal(first, second)
    x_t, eps = noise_add(x, c, 1 - c, seed=4)
    assert all(torch.equal(a, b) for a, b in zip((x_t, eps), noise_add(x, c, 1 - c, seed=4), strict=True))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    big = torch.randn(4096, 4096, device=DEVICE)
    with torch.cuda.stream(side):
        for _ in range(8):  # keep the side stream busy, then write x2 at its end
            big = big @ big / 64
        x2 = (x.float() * 2).to(dtype)
        y = affine_step(x2, pred, c, 0.3, 0.2, seed=9, clamp=1.0)
    torch.cuda.synchronize()
    assert torch.equal(y, affine_step(x2, pred, c, 0.3, 0.2, seed=9, clamp=1.0))
