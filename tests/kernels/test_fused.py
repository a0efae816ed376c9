"""The fused elementwise kernels (stepdiff.kernels.fused / fused_triton) on the CPU.

Without a GPU the Triton kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports them), one program after another, so the shapes
here are small and odd. What is checked:

- the kernels against float64 references, with bounds derived from the dtypes' unit
  roundoffs (fp32 and fp16; bf16 arithmetic is wrong in the interpreter, see tests/gpu/);
- the in-kernel noise against the NumPy reference of the same Philox stream, and its
  statistics;
- reproducibility: the noise is a function of (seed, offset, element index) only;
- dispatch and the errors for bad input.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from scipy import stats

from stepdiff.kernels import affine_step, noise_add
from stepdiff.kernels import fused as fused_module
from stepdiff.kernels.reference import (
    affine_step_reference,
    noise_add_reference,
    philox4x32,
    philox_normal_reference,
)

ft = pytest.importorskip("stepdiff.kernels.fused_triton")
pytestmark = pytest.mark.skipif(
    not ft.INTERPRETED and not torch.cuda.is_available(),
    reason="the Triton kernels need a GPU or TRITON_INTERPRET=1",
)

DEVICE = "cpu" if ft.INTERPRETED else "cuda"
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
SHAPES = [(1,), (7,), (1000,), (3, 5, 7, 9)]
# Noise from the kernels equals the float64 reference up to their float32 log, sin and cos:
# relative errors of a few 1e-7 (measured: at most 3e-7 absolute for |z| < 7).
NOISE_TOL = 1e-5


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _randn(shape, dtype=torch.float32, seed=0, scale=1.0) -> torch.Tensor:
    return (scale * torch.randn(shape, generator=_generator(seed), device=DEVICE)).to(dtype)


def _coefficient(kind: str, batch: int, seed: int):
    """A random coefficient as a Python float, a 0-d tensor or one value per sample."""
    values = 0.25 + torch.rand(batch, generator=_generator(seed), device=DEVICE)
    if kind == "float":
        return float(values[0])
    if kind == "0-d":
        return values[0].clone()
    if kind == "per-sample":
        return values
    return values.double()  # per-sample, float64


def _per_sample64(c, x):
    c = torch.as_tensor(c, dtype=torch.float64, device=x.device)
    return c.reshape(-1, *([1] * (x.ndim - 1))) if c.ndim == 1 else c


def assert_close_to_float64(y, y64, scale, dtype):
    """|y - y64| <= u_out |y64| + 4 u_32 S (+ 2**-25 in fp16), S the sum of the |terms|.

    The float32 evaluation of a sum of three products errs by at most about 3 u_32 S; the
    final rounding to the output dtype adds u_out |y|, and half the spacing of fp16's
    subnormals, 2**-25, where results underflow.
    """
    u_out = UNIT_ROUNDOFF[dtype]
    bound = u_out * y64.abs() + 4 * 2.0**-24 * scale + (2.0**-25 if dtype == torch.float16 else 0.0)
    error = (y.double() - y64).abs()
    worst = (error - bound).max()
    assert worst <= 0, f"error exceeds the bound by {float(worst):.3g} (max error {float(error.max()):.3g})"


# --- the update and the forward noising against float64 ----------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["float", "0-d", "per-sample", "per-sample-fp64"])
def test_affine_step_matches_float64(dtype, shape, kind):
    batch = shape[0]
    x, pred = _randn(shape, dtype, 1), _randn(shape, dtype, 2, scale=2.0)
    noise = _randn(shape, dtype, 3)
    c_x, c_pred, c_noise = (_coefficient(kind, batch, s) for s in (4, 5, 6))
    x64, p64, z64 = x.double(), pred.double(), noise.double()
    cx64, cp64, cz64 = (_per_sample64(c, x) for c in (c_x, c_pred, c_noise))

    # Deterministic step with the prediction clipped to [-1, 1].
    y = affine_step(x, pred, c_x, c_pred, clamp=1.0, backend="triton")
    assert y.dtype == dtype and y.shape == shape
    p_clip = p64.clamp(-1.0, 1.0)
    y64 = cx64 * x64 + cp64 * p_clip
    assert_close_to_float64(y, y64, (cx64 * x64).abs() + (cp64 * p_clip).abs(), dtype)

    # Stochastic step with the noise injected.
    y = affine_step(x, pred, c_x, c_pred, c_noise, noise=noise, backend="triton")
    y64 = cx64 * x64 + cp64 * p64 + cz64 * z64
    scale = (cx64 * x64).abs() + (cp64 * p64).abs() + (cz64 * z64).abs()
    assert_close_to_float64(y, y64, scale, dtype)

    # The PyTorch reference obeys the same bound.
    ref = affine_step(x, pred, c_x, c_pred, c_noise, noise=noise, backend="torch")
    assert_close_to_float64(ref, y64, scale, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["float", "0-d", "per-sample"])
def test_noise_add_matches_float64(dtype, shape, kind):
    batch = shape[0]
    x0, eps = _randn(shape, dtype, 7), _randn(shape, dtype, 8)
    a, s, c0, c1 = (_coefficient(kind, batch, k) for k in (9, 10, 11, 12))
    x64, e64 = x0.double(), eps.double()
    a64, s64, c064, c164 = (_per_sample64(c, x0) for c in (a, s, c0, c1))
    x_t64 = a64 * x64 + s64 * e64
    scale_t = (a64 * x64).abs() + (s64 * e64).abs()

    x_t, target = noise_add(x0, a, s, noise=eps, backend="triton")
    assert x_t.dtype == target.dtype == dtype
    assert_close_to_float64(x_t, x_t64, scale_t, dtype)
    assert torch.equal(target, eps)  # the default target is the noise itself

    # A v-like target c0 x0 + c1 eps from the same eps.
    x_t, target = noise_add(x0, a, s, c0, c1, noise=eps, backend="triton")
    t64 = c064 * x64 + c164 * e64
    assert_close_to_float64(x_t, x_t64, scale_t, dtype)
    assert_close_to_float64(target, t64, (c064 * x64).abs() + (c164 * e64).abs(), dtype)

    # Only c1 given: c0 counts as 0.
    _, target = noise_add(x0, a, s, c1=c1, noise=eps, backend="triton")
    assert_close_to_float64(target, c164 * e64, (c164 * e64).abs(), dtype)


@pytest.mark.parametrize(
    "shape, block",
    [
        ((2, 512), 256),  # n % BLOCK == 0: every tile in one sample
        ((3, 700), 256),  # n >= BLOCK: tiles that straddle two samples
        ((5, 90), 512),  # n < BLOCK: many samples per tile
        ((9, 1), 128),  # one element per sample
    ],
)
def test_per_sample_coefficients_in_every_tiling(shape, block):
    """Each way a tile finds its samples' coefficients, against the reference."""
    batch = shape[0]
    x, pred, noise = _randn(shape, seed=13), _randn(shape, seed=14), _randn(shape, seed=15)
    c_x, c_pred, c_noise = (_coefficient("per-sample", batch, s) for s in (16, 17, 18))
    y = ft.affine_step_triton(x, pred, c_x, c_pred, c_noise, noise=noise, block=block)
    ref = affine_step_reference(x, pred, c_x, c_pred, c_noise, noise)
    torch.testing.assert_close(y, ref, rtol=4 * 2.0**-24, atol=1e-6)
    x_t, target = ft.noise_add_triton(x, c_x, c_pred, c_noise, c_x, noise=noise, block=block)
    x_r, t_r = noise_add_reference(x, c_x, c_pred, noise, c_noise, c_x)
    torch.testing.assert_close(x_t, x_r, rtol=4 * 2.0**-24, atol=1e-6)
    torch.testing.assert_close(target, t_r, rtol=4 * 2.0**-24, atol=1e-6)


def test_out_in_place_and_empty():
    x, pred = _randn((3, 50), seed=19), _randn((3, 50), seed=20)
    expected = affine_step(x, pred, 0.9, 0.1, backend="torch")
    result = affine_step(x, pred, 0.9, 0.1, out=x, backend="triton")
    assert result.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, expected, rtol=4 * 2.0**-24, atol=0.0)
    empty = torch.empty(0, 4, device=DEVICE)
    assert affine_step(empty, empty, 1.0, 1.0, 1.0, seed=1, backend="triton").shape == (0, 4)
    assert noise_add(empty, 1.0, 1.0, seed=1, backend="triton")[0].shape == (0, 4)


def test_clamp_keeps_nan_like_torch():
    pred = _randn((2, 40), seed=21)
    pred[0, 3] = float("nan")
    pred[1, 5] = float("inf")
    x = torch.zeros_like(pred)
    y = affine_step(x, pred, 1.0, 1.0, clamp=0.5, backend="triton")
    ref = affine_step(x, pred, 1.0, 1.0, clamp=0.5, backend="torch")
    assert torch.isnan(y[0, 3]) and y[1, 5] == 0.5
    torch.testing.assert_close(y, ref, equal_nan=True, rtol=0, atol=0)


# --- the noise: the same numbers as the NumPy reference ----------------------------------------


@triton.jit
def _randint4x_kernel(out_ptr, seed, N: tl.constexpr):
    i = tl.arange(0, N)
    w0, w1, w2, w3 = tl.randint4x(seed, i)
    tl.store(out_ptr + i, w0)
    tl.store(out_ptr + N + i, w1)
    tl.store(out_ptr + 2 * N + i, w2)
    tl.store(out_ptr + 3 * N + i, w3)


@pytest.mark.parametrize("seed", [0, 0xFFFFFFFF, 0x0000000FCAFEB0BA, 2**63 - 1])
def test_numpy_philox_matches_triton(seed):
    """The reference's Philox-4x32-10 equals Triton's, bit for bit (counter (i, 0, 0, 0))."""
    out = torch.empty(4 * 64, dtype=torch.int32, device=DEVICE)
    _randint4x_kernel[(1,)](out, seed, 64)
    words = out.cpu().numpy().view(np.uint32).reshape(4, 64)
    expected = philox4x32((np.arange(64), 0, 0, 0), seed)
    for k in range(4):
        np.testing.assert_array_equal(words[k], expected[k].astype(np.uint32))


@pytest.mark.parametrize(
    "shape, seed, offset",
    [
        ((1,), 0, 0),
        ((7,), 1, 0),
        ((3, 5, 7, 9), 2**40 + 7, 2**35 + 3),
        ((2, 1000), 2**63 - 1, 2**63 - 1),
    ],
)
def test_kernel_noise_equals_numpy_reference(shape, seed, offset):
    """The in-kernel noise is the documented Philox stream (NOISE_TOL: float32 log/sin/cos)."""
    z = ft.philox_normal_triton(shape, seed, offset, device=DEVICE)
    z64 = philox_normal_reference(shape, seed, offset, dtype=torch.float64)
    torch.testing.assert_close(z.cpu().double(), z64, rtol=NOISE_TOL, atol=NOISE_TOL)


def test_noise_depends_only_on_seed_offset_and_element():
    """Same (seed, offset): the same noise for every block size, launch grid and shape, and
    in both kernels; the seeded reference path draws the same numbers too."""
    shape = (3, 700)
    x, pred = _randn(shape, seed=22), _randn(shape, seed=23)
    zero = torch.zeros_like(x)
    runs = [
        ft.affine_step_triton(zero, pred, 0.0, 0.0, 1.0, seed=5, offset=9, block=block) for block in (128, 512, 2048)
    ]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    flat = ft.philox_normal_triton((2100,), 5, 9, device=DEVICE, block=256)
    assert torch.equal(flat.reshape(shape), runs[0])
    _, eps = noise_add(x, 1.0, 1.0, seed=5, offset=9, backend="triton")
    assert torch.equal(eps, runs[0])
    # The seeded step adds exactly the noise it would read if the noise were injected.
    y = affine_step(x, pred, 0.3, 0.7, 0.5, seed=5, offset=9, backend="triton")
    y_injected = affine_step(x, pred, 0.3, 0.7, 0.5, noise=runs[0], backend="triton")
    assert torch.equal(y, y_injected)
    y_ref = affine_step(x, pred, 0.3, 0.7, 0.5, seed=5, offset=9, backend="torch")
    torch.testing.assert_close(y_ref, y, rtol=NOISE_TOL, atol=NOISE_TOL)


def test_seed_tensor_is_read_at_run_time():
    """An int64 [seed, offset] tensor gives the noise of that seed and offset, and a change
    made to it in place (as a CUDA graph would make on the device) changes the next draw."""
    state = torch.tensor([11, 3], dtype=torch.int64, device=DEVICE)
    first = ft.philox_normal_triton((4, 100), state, device=DEVICE)
    assert torch.equal(first, ft.philox_normal_triton((4, 100), 11, 3, device=DEVICE))
    state[1] += 1
    second = ft.philox_normal_triton((4, 100), state, device=DEVICE)
    assert torch.equal(second, ft.philox_normal_triton((4, 100), 11, 4, device=DEVICE))
    assert not torch.equal(first, second)


# --- the noise: statistics ----------------------------------------------------------------------

N_STATS = 7 * 7033  # 49231 normals, not a multiple of any block
Z_LIMIT = 5.0  # two-sided false-alarm rate of one check, for a correct generator: 5.7e-7


def _corr(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def test_noise_statistics():
    """Moments, KS test, tail mass and the absence of correlation of the in-kernel noise.

    49231 draws (seed 2024), shaped [7, 7033] for the between-sample checks. Each moment and
    correlation check allows 5 standard errors: false-alarm rate 5.7e-7 per check for a
    correct generator; the KS test fails when p < 1e-4. Over the 17 checks the chance that a
    correct generator fails for a random seed is below 2e-4. Lags 32, 64 and 96 pair elements
    that come from the same Philox call; 1 and 128 pair neighbours and neighbouring calls.
    Squares are correlated too, as dependence need not show in the values themselves.
    """
    z = ft.philox_normal_triton((7, N_STATS // 7), 2024, device=DEVICE).cpu().double().numpy()
    flat = z.reshape(-1)
    n = flat.size
    assert n == N_STATS
    se = 1.0 / np.sqrt(n)
    assert abs(flat.mean()) < Z_LIMIT * se
    assert abs(flat.var() - 1.0) < Z_LIMIT * np.sqrt(2.0) * se
    assert abs((flat**4).mean() - 3.0) < Z_LIMIT * np.sqrt(96.0) * se  # E z^8 - 9 = 96
    assert stats.kstest(flat, "norm").pvalue > 1e-4
    p_tail = 2 * stats.norm.sf(3.0)
    tail = np.mean(np.abs(flat) > 3.0)
    assert abs(tail - p_tail) < Z_LIMIT * np.sqrt(p_tail * (1 - p_tail) / n)
    assert np.abs(flat).max() <= np.sqrt(66 * np.log(2))  # the radius bound of the transform
    for lag in (1, 32, 64, 96, 128):
        a, b = flat[:-lag], flat[lag:]
        limit = Z_LIMIT / np.sqrt(a.size)
        assert abs(_corr(a, b)) < limit, f"correlation at lag {lag}"
        assert abs(_corr(a**2, b**2)) < limit, f"correlation of squares at lag {lag}"
    # Sample b against sample b + 1, element by element.
    a, b = z[:-1].reshape(-1), z[1:].reshape(-1)
    assert abs(_corr(a, b)) < Z_LIMIT / np.sqrt(a.size)
    assert abs(_corr(a**2, b**2)) < Z_LIMIT / np.sqrt(a.size)


@pytest.mark.parametrize("other", [(8, 0), (7, 1), (7, 2**32)])
def test_other_seeds_and_offsets_give_independent_noise(other):
    """Changing the seed, the offset, or only the offset's high word gives new noise,
    uncorrelated with the first (12000 draws each; 5 standard errors, as above)."""
    base = ft.philox_normal_triton((12000,), 7, 0, device=DEVICE).cpu().double().numpy()
    new = ft.philox_normal_triton((12000,), *other, device=DEVICE).cpu().double().numpy()
    assert not np.array_equal(base, new)
    limit = Z_LIMIT / np.sqrt(base.size)
    assert abs(_corr(base, new)) < limit
    assert abs(_corr(base**2, new**2)) < limit
    assert stats.kstest(new, "norm").pvalue > 1e-4


# --- generators and dispatch --------------------------------------------------------------------


def test_generator_maps_to_a_drawn_seed(monkeypatch):
    """On the Triton path with CPU data (the interpreter; also CUDA data under graph capture) a
    generator supplies a fresh [seed, offset] drawn with torch.randint per call; re-seeding it
    reproduces the noise. On the reference path it feeds torch.randn. (CUDA data outside
    capture read the generator's Philox state on the host instead: test_launch_path.py.)"""
    shape = (3, 77)
    x = _randn(shape, seed=24)
    g = _generator(5)
    y1 = affine_step(x, x, 0.0, 0.0, 1.0, generator=g, backend="triton")
    y2 = affine_step(x, x, 0.0, 0.0, 1.0, generator=g, backend="triton")
    assert not torch.equal(y1, y2)
    g.manual_seed(5)
    seed, offset = torch.randint(0, 2**63 - 1, (2,), generator=g, device=DEVICE).tolist()
    expected = philox_normal_reference(shape, seed, offset, device=DEVICE)
    torch.testing.assert_close(y1, expected, rtol=NOISE_TOL, atol=NOISE_TOL)
    g.manual_seed(5)
    assert torch.equal(affine_step(x, x, 0.0, 0.0, 1.0, generator=g, backend="triton"), y1)

    g.manual_seed(5)
    y_ref = affine_step(x, x, 0.0, 0.0, 1.0, generator=g, backend="torch")
    assert torch.equal(y_ref, torch.randn(shape, generator=_generator(5), device=DEVICE))
    # The environment variable selects the backend when no argument does.
    monkeypatch.setenv("STEPDIFF_BACKEND", "triton")
    g.manual_seed(5)
    assert torch.equal(affine_step(x, x, 0.0, 0.0, 1.0, generator=g), y1)


def test_dispatch_on_cpu(monkeypatch):
    x = _randn((2, 9), seed=25)
    monkeypatch.delenv("STEPDIFF_BACKEND", raising=False)
    assert fused_module.resolve_backend(x) == ("triton" if x.is_cuda else "torch")
    assert fused_module.resolve_backend(x, "triton") == "triton"
    assert fused_module.resolve_backend(x.double()) == "torch"
    assert fused_module.resolve_backend(x, "auto", x.double()) == "torch"
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        fused_module.resolve_backend(x.double(), "triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_module.resolve_backend(x, "cuda")
    monkeypatch.setenv("STEPDIFF_BACKEND", "fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        affine_step(x, x, 1.0, 1.0)
    monkeypatch.setattr(ft, "INTERPRETED", False)
    if not x.is_cuda:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            fused_module.resolve_backend(x, "triton")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            ft.affine_step_triton(x, x, 1.0, 1.0)


def test_importing_the_package_does_not_import_triton():
    code = (
        "import sys, stepdiff, stepdiff.kernels, stepdiff.samplers, stepdiff.forward\n"
        "assert 'triton' not in sys.modules, sorted(m for m in sys.modules if 'triton' in m)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def _linear_denoiser(scale: float):
    """x0_hat = scale * x: a cheap stand-in model with a fixed linear map."""
    return lambda x, t: scale * x


def test_samplers_and_forward_through_the_kernels(monkeypatch):
    """The package's samplers and forward process give the reference's results when every
    update runs through the Triton path (deterministic DDIM, and DDPM with injected-free
    seeded noise being reproducible)."""
    from stepdiff.forward import add_noise
    from stepdiff.samplers import sample_ddim, sample_ddpm
    from stepdiff.schedules import VPLinearSchedule, time_grid

    schedule = VPLinearSchedule()
    ts = time_grid(6)
    x = _randn((4, 3, 5), seed=26)
    model = _linear_denoiser(0.5)
    monkeypatch.setenv("STEPDIFF_BACKEND", "torch")
    ddim_ref = sample_ddim(model, x, schedule, ts)
    monkeypatch.setenv("STEPDIFF_BACKEND", "triton")
    ddim = sample_ddim(model, x, schedule, ts)
    torch.testing.assert_close(ddim, ddim_ref, rtol=1e-5, atol=1e-6)

    first = sample_ddpm(model, x, schedule, ts, generator=_generator(3), clip_x0=1.0)
    again = sample_ddpm(model, x, schedule, ts, generator=_generator(3), clip_x0=1.0)
    other = sample_ddpm(model, x, schedule, ts, generator=_generator(4), clip_x0=1.0)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.isfinite(first).all()

    t = torch.rand(4, generator=_generator(6), device=DEVICE).double()
    eps = _randn(x.shape, seed=27)
    x_t, v = add_noise(x, t, schedule, prediction="v", noise=eps)
    monkeypatch.setenv("STEPDIFF_BACKEND", "torch")
    x_t_ref, v_ref = add_noise(x, t, schedule, prediction="v", noise=eps)
    torch.testing.assert_close(x_t, x_t_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v, v_ref, rtol=1e-6, atol=1e-6)


def _load_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_fused.py"
    spec = importlib.util.spec_from_file_location("bench_fused", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_bookkeeping(capsys):
    """The benchmark's byte counts, records and ratios (its timing needs a GPU)."""
    bench = _load_benchmark()
    shape = (256, 4, 128, 128)
    assert bench.min_bytes("affine_step_noise", shape, 2) == 3 * 2 * 256 * 4 * 128 * 128
    assert bench.min_bytes("ddpm_loop_50", (2, 3), 4) == 50 * 5 * 6 * 4
    nbytes = bench.min_bytes("noise_add", shape, 4)
    records = [
        bench.make_record("noise_add", impl, "float32", shape, ms, nbytes)
        for impl, ms in (("triton", 0.1), ("eager", 0.35), ("compile", 0.15), ("copy", 0.08))
    ]
    assert records[0]["GBps"] == pytest.approx(nbytes / 1e-4 / 1e9)
    triton_row = bench.annotate(records)[0]
    assert triton_row["pct_copy"] == pytest.approx(80.0)
    assert triton_row["vs_eager"] == pytest.approx(3.5)
    assert triton_row["vs_compile"] == pytest.approx(1.5)
    assert "pct_copy" not in bench.annotate(records)[3]
    if not torch.cuda.is_available():
        assert bench.main(["--quick"]) == 1
        assert "needs a CUDA device" in capsys.readouterr().err


# --- bad input ----------------------------------------------------------------------------------


def _bad_cases():
    x = _randn((3, 8), seed=28)
    t = "triton"
    int_c = torch.ones(3, dtype=torch.int32)
    meta_c = torch.ones(3, device="meta")
    cases = {
        "shape": (lambda: affine_step(x, x[:, :4], 1.0, 1.0), ValueError, "shape"),
        "coefficient length": (lambda: affine_step(x, x, torch.ones(4), 1.0), ValueError, r"\[3\]"),
        "coefficient dims": (lambda: noise_add(x, torch.ones(3, 1), 1.0), ValueError, "a must"),
        "integer data": (lambda: affine_step(x.long(), x, 1.0, 1.0), TypeError, "floating"),
        "integer coefficient": (lambda: affine_step(x, x, int_c, 1.0), TypeError, "c_x"),
        "device": (lambda: affine_step(x, x.to("meta"), 1.0, 1.0), ValueError, "meta"),
        "coefficient device": (lambda: affine_step(x, x, meta_c, 1.0), ValueError, "c_x"),
        "noise shape": (lambda: noise_add(x, 1.0, 1.0, noise=x[:2]), ValueError, "noise"),
        "noise and seed": (
            lambda: affine_step(x, x, 1.0, 1.0, 1.0, noise=x, seed=1),
            ValueError,
            "not both",
        ),
        "negative seed": (lambda: affine_step(x, x, 1.0, 1.0, 1.0, seed=-1), ValueError, "seed"),
        "seed type": (lambda: noise_add(x, 1.0, 1.0, seed=1.5), TypeError, "seed"),
        "seed tensor": (lambda: noise_add(x, 1.0, 1.0, seed=torch.ones(2)), ValueError, "int64"),
        "generator": (lambda: noise_add(x, 1.0, 1.0, generator=5), TypeError, "generator"),
        "clamp": (lambda: affine_step(x, x, 1.0, 1.0, clamp=-1.0), ValueError, "clamp"),
        "non-contiguous": (
            lambda: affine_step(x.t(), x.t(), 1.0, 1.0, backend=t),
            ValueError,
            "x must be contiguous",
        ),
        "non-contiguous pred": (
            lambda: affine_step(x[:, :4].contiguous(), x[:, ::2], 1.0, 1.0, backend=t),
            ValueError,
            "pred must be contiguous",
        ),
        "float64 on triton": (
            lambda: affine_step(x.double(), x.double(), 1.0, 1.0, backend=t),
            TypeError,
            "float64",
        ),
        "block": (lambda: ft.affine_step_triton(x, x, 1.0, 1.0, block=96), ValueError, "power"),
    }
    return cases


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_is_refused_with_a_clear_error(case):
    call, error, match = _bad_cases()[case]
    with pytest.raises(error, match=match):
        call()
