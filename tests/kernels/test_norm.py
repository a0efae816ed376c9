r"""The fused GroupNorm+SiLU and adaLN-modulate kernels against float64 PyTorch (interpreter).

Error bound. Every output (and gradient) $r$ is compared with its float64 value $r_{64}$ in the
norm over all elements:
$\|r - r_{64}\| \le 2u\,\|r_{64}\| + (K u_{32} + 2u_x)\,\|M\|$, with $u$ the unit roundoff
of the result's dtype (its final rounding), $u_x$ that of the input's dtype, and $M$ the sum of
the magnitudes the result is computed from (below), so that cancellation cannot make the bound
vanish. Float32 arithmetic puts each element through about ten roundings and the group or row
statistics (sums over up to $10^4$ values, merged tile by tile) add relative errors of order
$\log_2(n)\,u_{32}$: $K = 32$ covers both. The $2u_x$ term allows intermediates rounded to the
input's dtype, as PyTorch's half-precision path rounds them (the kernels keep them in float32).
Each test also checks that PyTorch itself, run in the input dtype, meets the same bound, so the
bound is the dtype's and not fit to the kernels.

Magnitudes, with $r$ the reciprocal standard deviation, $|\hat x|$ standing for
$|\hat x| + r\,\overline{|x|}$ (a normalized value inherits the error of the mean, relative to
the values it is the mean of, times $r$: large when the spread is tiny, as for $D = 1$),
$\sigma' = $ SiLU's derivative at $z$:

- GroupNorm+SiLU: $y$: $|w||\hat x| + |b|$; $dx$: $r(|d\hat x| + \overline{|d\hat x|} + |\hat
  x|\,\overline{|d\hat x\,\hat x|})$ with $|d\hat x| = |dy||\sigma'||w|$; $dw$: $\sum|dy\,
  \sigma'\hat x|$; $db$: $\sum|dy\,\sigma'|$;
- adaLN: $y$: $|\hat x||1+s| + |h|$; $dx$ as above with $|d\hat x| = |dy||1+s|$; $ds$:
  $\sum_l|dy\,\hat x|$; $dh$: $\sum_l |dy|$.
"""

from __future__ import annotations

import pytest
import torch

from stepdiff.kernels import adaln_modulate, group_norm_silu
from stepdiff.kernels.norm import adaln_modulate_reference, group_norm_silu_reference

ft = pytest.importorskip("stepdiff.kernels.fused_triton")
DEVICE = "cpu" if ft.INTERPRETED else "cuda"
U = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
U32 = 2.0**-24
K = 32.0


def _grads(fn, inputs, dy):
    xs = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*xs)
    out.backward(dy.to(out.dtype))
    return [out.detach()] + [None if t is None else t.grad for t in xs]


def _check(name, got, want, magnitude, dtype, input_dtype):
    assert got.dtype == dtype, (name, got.dtype)
    assert torch.isfinite(got).all(), name
    bound = 2 * U[dtype] * want.norm() + (K * U32 + 2 * U[input_dtype]) * magnitude.norm()
    err = (got.double() - want).norm()
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


def _gn_magnitudes(x, num_groups, w, b, dy, eps):
    """The magnitudes of the module docstring, in float64."""
    N, C = x.shape[:2]
    x3 = x.double().reshape(N, num_groups, -1)
    mean = x3.mean(-1, keepdim=True)
    rstd = (x3.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
    xhat = ((x3 - mean) * rstd).reshape(x.shape)
    shape = (1, C) + (1,) * (x.ndim - 2)
    w64 = torch.ones(shape, dtype=torch.float64, device=x.device) if w is None else w.double().reshape(shape)
    b64 = torch.zeros(shape, dtype=torch.float64, device=x.device) if b is None else b.double().reshape(shape)
    z = xhat * w64 + b64
    sig = torch.sigmoid(z)
    dsilu = (sig * (1 + z * (1 - sig))).abs()
    ady = dy.double().abs()
    adxhat = (ady * dsilu * w64.abs()).reshape(N, num_groups, -1)
    axhat = xhat.abs().reshape(N, num_groups, -1) + rstd * x3.abs().mean(-1, keepdim=True)
    xhat = axhat.reshape(x.shape)
    m_dx = rstd * (adxhat + adxhat.mean(-1, keepdim=True) + axhat * (adxhat * axhat).mean(-1, keepdim=True))
    dims = [0] + list(range(2, x.ndim))
    return {
        "y": w64.abs() * xhat + b64.abs(),
        "dx": m_dx.reshape(x.shape),
        "dw": (ady * dsilu * xhat).sum(dims),
        "db": (ady * dsilu).sum(dims),
    }


def check_group_norm_silu(x, num_groups, w, b, eps=1e-5, same_dtype_reference=True):
    dtype = x.dtype
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(99)).to(x.device, dtype)
    got = _grads(lambda a, c, d: group_norm_silu(a, num_groups, c, d, eps, backend="triton"), (x, w, b), dy)
    want = _grads(lambda a, c, d: group_norm_silu_reference(a, num_groups, c, d, eps),
                  (x.double(), None if w is None else w.double(), None if b is None else b.double()), dy.double())
    mags = _gn_magnitudes(x, num_groups, w, b, dy, eps)
    pairs = [("y", 0, dtype), ("dx", 1, dtype)]
    if w is not None:
        pairs.append(("dw", 2, w.dtype))
    if b is not None:
        pairs.append(("db", 3, b.dtype))
    if same_dtype_reference:  # PyTorch in the input dtype meets the bound too
        same = _grads(lambda a, c, d: torch.nn.functional.silu(torch.nn.functional.group_norm(a, num_groups, c, d,
                                                                                              eps)), (x, w, b), dy)
        for name, i, dt in pairs:
            _check(f"torch {name}", same[i], want[i], mags[name], dt, dtype)
    for name, i, dt in pairs:
        _check(name, got[i], want[i], mags[name], dt, dtype)
    return got


GN_CASES = [
    # shape, groups, channels-last, weight and bias, offset of the mean
    ((3, 12, 5, 7), 4, False, True, 0.0),
    ((2, 8, 33, 31), 2, False, True, 20.0),  # 4 tiles per group; mean far from 0 (Chan merge)
    ((2, 8, 9, 11), 8, True, True, 1.0),  # channels-last, one channel per group
    ((2, 6, 40), 1, False, True, 0.0),  # 1-D positions, one group
    ((4, 6, 3, 3), 3, False, False, 0.0),  # no affine parameters
    ((1, 130, 3, 5), 1, False, True, 0.0),  # 130 channels per group: tiles over channels too
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", GN_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"g{c[1]}" + "cl" * c[2])
def test_group_norm_silu_matches_float64(case, dtype):
    shape, groups, channels_last, affine, offset = case
    g = torch.Generator().manual_seed(sum(shape) + groups)
    x = (3 * torch.randn(shape, generator=g) + offset).to(DEVICE, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = (1 + 0.5 * torch.randn(shape[1], generator=g)).to(DEVICE) if affine else None
    b = (0.5 * torch.randn(shape[1], generator=g)).to(DEVICE) if affine else None
    y = check_group_norm_silu(x, groups, w, b)[0]
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_group_norm_silu_half_parameters_and_eps():
    """Weight and bias stored in the input dtype, and a large eps."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 12, 7, 6, generator=g).to(DEVICE, torch.float16)
    w, b = (torch.randn(12, generator=g).to(DEVICE, torch.float16) for _ in range(2))
    check_group_norm_silu(x, 3, w, b, eps=0.5)


def _adaln_magnitudes(x, shift, scale, dy, eps):
    x64 = x.double()
    mean = x64.mean(-1, keepdim=True)
    rstd = (x64.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
    axhat = ((x64 - mean) * rstd).abs() + rstd * x64.abs().mean(-1, keepdim=True)
    one_s = (1 + scale.double()[:, None, :]).abs()
    ady = dy.double().abs()
    adxhat = ady * one_s
    m_dx = rstd * (adxhat + adxhat.mean(-1, keepdim=True) + axhat * (adxhat * axhat).mean(-1, keepdim=True))
    return {"y": axhat * one_s + shift.double()[:, None, :].abs(), "dx": m_dx, "dshift": ady.sum(1),
            "dscale": (ady * axhat).sum(1)}


def check_adaln(x, shift, scale, eps=1e-6, same_dtype_reference=True):
    dtype = x.dtype
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(98)).to(x.device, dtype)
    got = _grads(lambda a, h, s: adaln_modulate(a, h, s, eps, backend="triton"), (x, shift, scale), dy)
    want = _grads(lambda a, h, s: adaln_modulate_reference(a, h, s, eps), (x.double(), shift.double(),
                                                                          scale.double()), dy.double())
    mags = _adaln_magnitudes(x, shift, scale, dy, eps)
    pairs = [("y", 0, dtype), ("dx", 1, dtype), ("dshift", 2, shift.dtype), ("dscale", 3, scale.dtype)]
    if same_dtype_reference:
        def torch_same(a, h, s):
            xn = torch.nn.functional.layer_norm(a, a.shape[-1:], eps=eps)
            return xn * (1 + s[:, None, :]) + h[:, None, :]

        same = _grads(torch_same, (x, shift, scale), dy)
        for name, i, dt in pairs:
            _check(f"torch {name}", same[i], want[i], mags[name], dt, dtype)
    for name, i, dt in pairs:
        _check(name, got[i], want[i], mags[name], dt, dtype)
    return got


ADALN_CASES = [(3, 7, 40), (2, 41, 72), (1, 5, 1), (2, 3, 300)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", ADALN_CASES, ids=lambda s: "x".join(map(str, s)))
def test_adaln_modulate_matches_float64(shape, dtype):
    B, L, D = shape
    g = torch.Generator().manual_seed(B * 1000 + L + D)
    x = (2 * torch.randn(B, L, D, generator=g) + 3).to(DEVICE, dtype)
    shift, scale = (0.5 * torch.randn(B, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    check_adaln(x, shift, scale)


def test_adaln_strided_tokens():
    """Tokens that are a strided view (every other token) and parameters with a row stride."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 30, 48, generator=g).to(DEVICE)[:, ::2]
    params = torch.randn(2, 3, 48, generator=g).to(DEVICE)
    check_adaln(x, params[:, 0], params[:, 2])


# --- dispatch and errors -----------------------------------------------------------------------


def test_cpu_takes_the_references_unless_asked(monkeypatch):
    monkeypatch.delenv("STEPDIFF_BACKEND", raising=False)
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(group_norm_silu(x, 2), group_norm_silu_reference(x, 2))
    t = torch.randn(2, 5, 8)
    h, s = torch.randn(2, 8), torch.randn(2, 8)
    assert torch.equal(adaln_modulate(t, h, s), adaln_modulate_reference(t, h, s))
    assert adaln_modulate(t.double(), h.double(), s.double()).dtype == torch.float64
    # Inference (no autograd) gives the autograd path's numbers.
    with torch.no_grad():
        fast = group_norm_silu(x, 2, backend="triton")
    torch.testing.assert_close(fast, group_norm_silu(x.requires_grad_(), 2, backend="triton").detach(),
                               rtol=0, atol=0)


@pytest.mark.parametrize("call, error, match", [
    (lambda: group_norm_silu(torch.randn(2, 6, 3), 4), ValueError, "must divide the 6 channels"),
    (lambda: group_norm_silu(torch.randn(2, 6, 3), 0), ValueError, "num_groups"),
    (lambda: group_norm_silu(torch.randn(6), 2), ValueError, r"\[N, C, \*spatial\]"),
    (lambda: group_norm_silu(torch.randn(2, 6, 3), 2, torch.ones(5)), ValueError, r"weight must have shape \[C\]"),
    (lambda: group_norm_silu(torch.randn(2, 6, 3), 2, None, torch.ones(6, device="meta")), ValueError, "bias is on"),
    (lambda: group_norm_silu(torch.ones(2, 6, 3, dtype=torch.int32), 2), TypeError, "floating-point"),
    (lambda: group_norm_silu(torch.randn(2, 6, 3), 2, eps=0.0), ValueError, "eps"),
    (lambda: group_norm_silu(torch.randn(2, 6, 3), 2, backend="cuda"), ValueError, "backend"),
    (lambda: group_norm_silu(torch.randn(2, 6, 3).bfloat16(), 2, backend="triton"), TypeError, "interpreter"),
    (lambda: group_norm_silu(torch.randn(2, 6, 3).double(), 2, backend="triton"), TypeError, "float32, float16"),
    (lambda: adaln_modulate(torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5)), ValueError, r"\[B, L, D\]"),
    (lambda: adaln_modulate(torch.randn(2, 3, 5), torch.randn(2, 4), torch.randn(2, 5)), ValueError,
     r"shift must have shape \[B, D\] = \[2, 5\]"),
    (lambda: adaln_modulate(torch.randn(2, 3, 5), torch.randn(2, 5), torch.randn(1, 5)), ValueError, "scale"),
    (lambda: adaln_modulate(torch.randn(2, 3, 5), torch.randn(2, 5), "s"), TypeError, "scale must be a torch.Tensor"),
])
def test_bad_inputs_raise(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_norm_benchmark_needs_a_gpu(capsys):
    """benchmarks/bench_norm.py measures nothing without a GPU, and says so."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_norm.py"
    spec = importlib.util.spec_from_file_location("bench_norm", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert all(shape[1] % bench.GROUPS == 0 for shape in bench.GN_SHAPES)
    if not torch.cuda.is_available():
        assert bench.main(["--quick"]) == 1
        assert "needs a CUDA device" in capsys.readouterr().err
