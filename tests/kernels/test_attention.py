r"""The flash-attention kernels against PyTorch's SDPA in float64 (interpreter on a CPU).

Error bound. For one (batch, head) let $P$ be the exact probabilities, $c$ the scale, $u$ the
unit roundoff of the input dtype and $u_{32} = 2^{-24}$. The kernel rounds $P$ (and $dS$) to the
input dtype before each product and rounds each result to it, which costs about $u$ relative to
the *magnitudes* summed; its scores are fp32 sums, whose rounding $\lesssim u_{32}\,c|Q||K|^\top$
the softmax turns into relative errors of $P$. With $A = |P|\circ(1 + (u_{32}/u)\,c|Q||K|^\top)$,

- $\|\delta O\| \le C u\,\| A|V| \|$, $\|\delta dV\| \le C u\,\|A^\top |dO|\|$,
- $\|\delta dQ\| \le C u\,c\|G|K|\|$, $\|\delta dK\| \le C u\,c\|G^\top|Q|\|$, with
  $G = A\circ(|dP| + |\Delta|) + |P|\circ(|dO||V|^\top)$,

norms over all elements. Measured, the kernel stays below $0.6\,u$ times these magnitudes, and so
does SDPA itself run in the same dtype; every test below also checks that SDPA in the input
dtype meets the bound, so the bound is what the dtype allows and not a number fit to the kernel.
$C = 2$. Unlike a relative error, this stays meaningful where a gradient cancels to (near) zero:
$L_k = 1$ (where $dQ = dK = 0$ exactly) or a dominant key ($P$ nearly one-hot).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stepdiff.kernels import attention
from stepdiff.kernels.attention import attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
U = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
C = 2.0


def _inputs(B, H, Lq, Lk, D, dtype, seed=0, magnitude=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g) * magnitude
    k = torch.randn(B, H, Lk, D, generator=g) * magnitude
    v = torch.randn(B, H, Lk, D, generator=g)
    do = torch.randn(B, H, Lq, D, generator=g)
    return [t.to(device=DEVICE, dtype=dtype) for t in (q, k, v, do)]


def _run(fn, q, k, v, do):
    """``[o, dq, dk, dv]`` of ``o = fn(q, k, v)`` with upstream gradient ``do``."""
    # detach() keeps the strides (a clone would make strided or expanded inputs contiguous),
    # so the kernels' backward sees the layouts under test.
    xs = [t.detach().requires_grad_() for t in (q, k, v)]
    o = fn(*xs)
    o.backward(do.to(o.dtype))
    return [o.detach()] + [x.grad for x in xs]


def _sdpa(causal):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _magnitudes(q, k, v, do, causal, u):
    """The four norms $\\|A|V|\\|$, $c\\|G|K|\\|$, $c\\|G^\\top|Q|\\|$, $\\|A^\\top|dO|\\|$."""
    q, k, v, do = (t.double() for t in (q, k, v, do))
    c = 1.0 / math.sqrt(q.shape[-1])
    s = c * q @ k.transpose(-1, -2)
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(),
                          -math.inf)
    p = torch.softmax(s, -1)
    dp = do @ v.transpose(-1, -2)
    delta = (do * (p @ v)).sum(-1, keepdim=True)
    aq, ak, av, ado = (t.abs() for t in (q, k, v, do))
    a = p * (1 + (2.0**-24 / u) * c * (aq @ ak.transpose(-1, -2)))
    g = a * (dp.abs() + delta.abs()) + p * (ado @ av.transpose(-1, -2))
    return [(a @ av).norm(), c * (g @ ak).norm(), c * (g.transpose(-1, -2) @ aq).norm(),
            (a.transpose(-1, -2) @ ado).norm()]


def check_against_float64(q, k, v, do, causal=False, fn=None):
    """Assert the kernel's output and gradients meet the bound of the module docstring."""
    u = U[q.dtype]
    fn = fn or (lambda a, b, c: attention(a, b, c, causal=causal, backend="triton"))
    exact = _run(_sdpa(causal), *(t.double() for t in (q, k, v, do)))
    same_dtype = _run(_sdpa(causal), q, k, v, do)
    got = _run(fn, q, k, v, do)
    bounds = [C * u * m for m in _magnitudes(q, k, v, do, causal, u)]
    names = ("o", "dq", "dk", "dv")
    for name, x, r, e, b in zip(names, got, same_dtype, exact, bounds, strict=True):
        assert x.dtype == q.dtype and x.shape == e.shape, name
        assert torch.isfinite(x).all(), name
        ref_err = (r.double() - e).norm().item()
        assert ref_err <= b, f"bound too tight for {name}: SDPA errs {ref_err:.3g} > {b:.3g}"
        err = (x.double() - e).norm().item()
        assert err <= b, f"{name}: error {err:.3g} > bound {b:.3g} (SDPA: {ref_err:.3g})"
    return got


# Representative cases rather than the full product: odd lengths 1, 7, 77, 130; head dims 16,
# 40 (SD 1.x), 64, 72 (DiT); Lq != Lk both ways (77 text tokens); causal with both orders.
CASES = [
    # B, H, Lq, Lk, D, causal
    (1, 2, 77, 130, 40, False),
    (2, 2, 130, 77, 72, False),
    (1, 1, 1, 7, 16, False),
    (2, 1, 7, 1, 64, False),
    (1, 2, 130, 130, 64, True),
    (1, 1, 77, 130, 16, True),
    (1, 1, 130, 7, 40, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: "B{}H{}q{}k{}d{}{}".format(*c[:5], "c" * c[5]))
def test_matches_float64_sdpa(case, dtype):
    B, H, Lq, Lk, D, causal = case
    q, k, v, do = _inputs(B, H, Lq, Lk, D, dtype, seed=Lq * 1000 + Lk + D)
    check_against_float64(q, k, v, do, causal)


def test_zero_gradients_for_a_single_key():
    """With Lk = 1 every probability is exactly 1: O = v exactly, and dQ = dK = 0 up to rounding
    (dS = P(dP - Delta) subtracts two fp32 sums of the same products taken in different orders)."""
    q, k, v, do = _inputs(1, 2, 7, 1, 40, torch.float32, seed=5)
    o, dq, dk, dv = _run(lambda a, b, c: attention(a, b, c, backend="triton"), q, k, v, do)
    torch.testing.assert_close(o, v.expand_as(o), rtol=0, atol=0)
    rounding = 40 * 2.0**-24 * (do.abs() * v.abs()).sum(-1).max() * k.abs().max()
    assert dq.abs().max() <= rounding and dk.abs().max() <= 7 * rounding
    torch.testing.assert_close(dv, do.sum(2, keepdim=True), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_large_scores_do_not_overflow(dtype):
    """Scores in the thousands: exp would overflow without the running maximum."""
    q, k, v, do = _inputs(1, 2, 100, 90, 64, dtype, seed=7, magnitude=30.0)
    s = (q.double() @ k.double().transpose(-1, -2)) / 8
    assert s.abs().max() > 1000  # e^1000 overflows even float64
    check_against_float64(q, k, v, do)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_one_key_dominates(dtype):
    """Every query aligned with one key (P nearly one-hot): O is that key's value row."""
    g = torch.Generator().manual_seed(11)
    B, H, Lq, Lk, D = 1, 2, 90, 100, 64
    q = torch.randn(B, H, Lq, D, generator=g)
    q = q.abs() * torch.randn(B, H, 1, D, generator=g).sign()  # one sign pattern per head
    k = torch.randn(B, H, Lk, D, generator=g)
    k[:, :, 61] = 4 * q[:, :, 0].sign()  # key 61 dominates every row by a wide margin
    v = torch.randn(B, H, Lk, D, generator=g)
    do = torch.randn(B, H, Lq, D, generator=g)
    q, k, v, do = (t.to(DEVICE, dtype) for t in (q, k, v, do))
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8, -1)
    assert p[..., 61].min() > 0.999
    o = check_against_float64(q, k, v, do)[0]
    torch.testing.assert_close(o.double(), v[:, :, 61:62].double().expand_as(o), rtol=0, atol=0.01)


def test_log_sum_exp_is_saved_exactly():
    """The forward saves lse2 = log2 sum_j exp(s_ij), which the backward relies on."""
    from stepdiff.kernels import attention_triton as kernels

    q, k, v, _ = _inputs(2, 2, 77, 130, 72, torch.float32, seed=3)
    o, lse2 = kernels.attention_forward(q, k, v, 0.3, causal=True)
    s = 0.3 * q.double() @ k.double().transpose(-1, -2)
    s = s.masked_fill(~torch.ones(77, 130, dtype=torch.bool, device=s.device).tril(), -math.inf)
    torch.testing.assert_close(lse2.double() * math.log(2), torch.logsumexp(s, -1),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_result_does_not_depend_on_tiling(causal):
    """The GPU autotuner picks other tile shapes than the interpreter's default: check several,
    including BLOCK_M != BLOCK_N (the causal diagonal then cuts tiles unevenly)."""
    from stepdiff.kernels import attention_triton as kernels

    q, k, v, do = _inputs(1, 1, 100, 83, 40, torch.float32, seed=13)
    exact = _run(_sdpa(causal), *(t.double() for t in (q, k, v, do)))
    bounds = [C * U[q.dtype] * m for m in _magnitudes(q, k, v, do, causal, U[q.dtype])]
    for bm, bn in ((16, 64), (64, 16), (64, 32), (16, 16)):
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 4, "num_stages": 1}
        o, lse = kernels.attention_forward(q, k, v, 1 / math.sqrt(40), causal, config=cfg)
        # dK/dV holds BLOCK_N keys and steps BLOCK_M queries; dQ the other way round.
        grads = kernels.attention_backward(do, q, k, v, o, lse, 1 / math.sqrt(40), causal,
                                           configs=(cfg, {**cfg, "BLOCK_M": bn, "BLOCK_N": bm}))
        for name, x, e, b in zip(("o", "dq", "dk", "dv"), (o, *grads), exact, bounds,
                                 strict=True):
            err = (x.double() - e).norm().item()
            assert err <= b, f"{name} with tiles {bm}x{bn}: error {err:.3g} > {b:.3g}"


@pytest.mark.parametrize("head_dim", [40, 72, 160])
def test_every_gpu_autotuning_candidate_is_correct(head_dim):
    """The GPU autotuner only times its candidates (``TUNING``); run each one here, forward and
    backward, on a ragged causal shape, against the float64 bound."""
    from stepdiff.kernels import attention_triton as kernels

    q, k, v, do = _inputs(1, 1, 70, 45, head_dim, torch.float32, seed=17)
    c = 1 / math.sqrt(head_dim)
    exact = _run(_sdpa(False), *(t.double() for t in (q, k, v, do)))
    bounds = [C * U[q.dtype] * m for m in _magnitudes(q, k, v, do, False, U[q.dtype])]
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    fwd, dkdv, dq = (kernels.configs_for(which, block_d) for which in ("fwd", "dkdv", "dq"))
    for i in range(max(len(fwd), len(dkdv), len(dq))):
        cf, ckv, cq = fwd[i % len(fwd)], dkdv[i % len(dkdv)], dq[i % len(dq)]
        o, lse = kernels.attention_forward(q, k, v, c, False, config=cf)
        grads = kernels.attention_backward(do, q, k, v, o, lse, c, False, configs=(ckv, cq))
        for name, x, e, b in zip(("o", "dq", "dk", "dv"), (o, *grads), exact, bounds, strict=True):
            err = (x.double() - e).norm().item()
            assert err <= b, f"{name} with {cf}, {ckv}, {cq}: error {err:.3g} > {b:.3g}"


def test_layouts_and_strides(monkeypatch):
    """[B, L, H, D] inputs, a head-dim stride of 2, a transposed K, and V broadcast over heads
    (stride 0): read through their strides, never copied, and the same numbers come out."""
    B, H, Lq, Lk, D = 2, 2, 33, 47, 40
    g = torch.Generator().manual_seed(17)
    q_blhd = torch.randn(B, Lq, H, D, generator=g).to(DEVICE)
    k_wide = torch.randn(B, H, Lk, 2 * D, generator=g).to(DEVICE)[..., ::2]  # stride_d = 2
    k_t = torch.randn(B, H, D, Lk, generator=g).to(DEVICE).transpose(-1, -2)  # stride_l = 1
    v_shared = torch.randn(B, 1, Lk, D, generator=g).to(DEVICE).expand(B, H, Lk, D)
    do_blhd = torch.randn(B, Lq, H, D, generator=g).to(DEVICE)
    assert not k_wide.is_contiguous() and v_shared.stride(1) == 0

    o = attention(q_blhd, k_wide.transpose(1, 2), v_shared.transpose(1, 2), layout="blhd",
                  backend="triton")
    assert o.shape == (B, Lq, H, D)
    o_bhld = attention(q_blhd.transpose(1, 2).contiguous(), k_wide.contiguous(),
                       v_shared.contiguous(), backend="triton")
    torch.testing.assert_close(o, o_bhld.transpose(1, 2), rtol=1e-6, atol=1e-6)

    # Gradients through the strided views, against float64 SDPA.
    check_against_float64(q_blhd.transpose(1, 2), k_t, v_shared, do_blhd.transpose(1, 2))
    check_against_float64(q_blhd.transpose(1, 2), k_wide, v_shared, do_blhd.transpose(1, 2))
    # ... and with the kernels reading them in place (a spy on the launch sees the strides).
    from stepdiff.kernels import attention_triton as kernels

    seen = []
    real = kernels.attention_backward

    def spy(do, q, k, v, *args, **kwargs):
        seen.append((q.stride(), k.stride(), v.stride(), do.stride()))
        return real(do, q, k, v, *args, **kwargs)

    monkeypatch.setattr(kernels, "attention_backward", spy)
    _run(lambda a, b, c: attention(a, b, c, backend="triton"), q_blhd.transpose(1, 2),
         k_wide, v_shared, do_blhd.transpose(1, 2))
    assert seen == [(q_blhd.transpose(1, 2).stride(), k_wide.stride(), v_shared.stride(),
                     do_blhd.transpose(1, 2).stride())]


def test_backward_is_deterministic():
    q, k, v, do = _inputs(1, 2, 77, 130, 16, torch.float16, seed=19)
    first = _run(lambda a, b, c: attention(a, b, c, backend="triton"), q, k, v, do)
    second = _run(lambda a, b, c: attention(a, b, c, backend="triton"), q, k, v, do)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# The reference and the dispatcher
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_reference_in_float64_equals_sdpa(causal):
    q, k, v, do = _inputs(2, 3, 13, 29, 24, torch.float64, seed=23)
    for got, want in zip(_run(lambda a, b, c: attention_reference(a, b, c, causal=causal),
                              q, k, v, do), _run(_sdpa(causal), q, k, v, do), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    blhd = attention_reference(*(t.transpose(1, 2) for t in (q, k, v)), causal=causal,
                               layout="blhd", scale=0.7)
    torch.testing.assert_close(blhd.transpose(1, 2),
                               attention_reference(q, k, v, causal=causal, scale=0.7))


def test_cpu_tensors_take_the_reference_unless_asked(monkeypatch):
    from stepdiff.kernels import attention_triton as kernels

    calls = []
    real = kernels.attention_forward
    monkeypatch.setattr(kernels, "attention_forward",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, _ = (t.cpu() for t in _inputs(1, 1, 5, 6, 16, torch.float32, seed=29))
    monkeypatch.delenv("STEPDIFF_BACKEND", raising=False)
    assert torch.equal(attention(q, k, v), attention_reference(q, k, v))
    assert calls == []
    monkeypatch.setenv("STEPDIFF_BACKEND", "triton")
    o = attention(q, k, v)
    assert calls == [1]
    torch.testing.assert_close(o, attention_reference(q, k, v), rtol=1e-5, atol=1e-6)
    # float64 always takes the reference under "auto" (the kernels have no float64 path).
    monkeypatch.setenv("STEPDIFF_BACKEND", "auto")
    attention(q.double(), k.double(), v.double())
    # "torch" (the name the other kernels use too) forces the reference.
    monkeypatch.setenv("STEPDIFF_BACKEND", "torch")
    assert torch.equal(attention(q, k, v), attention_reference(q, k, v))
    assert calls == [1]


def _bad(**changes):
    base = {"q": torch.randn(2, 3, 5, 16), "k": torch.randn(2, 3, 7, 16),
            "v": torch.randn(2, 3, 7, 16)}
    return {**base, **changes}


@pytest.mark.parametrize("kwargs, error, match", [
    (_bad(k=torch.randn(1, 3, 7, 16)), ValueError, "batch and heads"),
    (_bad(v=torch.randn(2, 4, 7, 16)), ValueError, "batch and heads"),
    (_bad(k=torch.randn(2, 3, 7, 8)), ValueError, "head dims"),
    (_bad(v=torch.randn(2, 3, 6, 16)), ValueError, "same length"),
    ({"q": torch.randn(1, 1, 4, 264), "k": torch.randn(1, 1, 4, 264),
      "v": torch.randn(1, 1, 4, 264)}, ValueError, "exceeds"),
    (_bad(q=torch.ones(2, 3, 5, 16, dtype=torch.int32)), TypeError, "floating-point"),
    (_bad(k=torch.randn(2, 3, 7, 16, dtype=torch.float16)), TypeError, "one dtype"),
    (_bad(v=torch.randn(2, 3, 7, 16, device="meta")), ValueError, "one device"),
    (_bad(q=torch.randn(2, 3, 5)), ValueError, "4 dims"),
    (_bad(k=torch.randn(2, 3, 0, 16), v=torch.randn(2, 3, 0, 16)), ValueError, "at least 1"),
    (_bad(layout="bshd"), ValueError, "layout"),
    (_bad(scale=-1.0), ValueError, "scale"),
    (_bad(backend="cuda"), ValueError, "backend"),
    (_bad(layout="blhd"), ValueError, "batch and heads"),  # [2,5,3,16] vs [2,7,3,16] as BLHD
])
def test_bad_inputs_raise(kwargs, error, match):
    kwargs = dict(kwargs)
    q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
    with pytest.raises(error, match=match):
        attention(q, k, v, **kwargs)


def test_triton_backend_rejects_what_it_cannot_run():
    q = torch.randn(1, 1, 4, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        attention(q, q, q, backend="triton")
    if DEVICE == "cpu":
        b = q.to(torch.bfloat16)
        with pytest.raises(TypeError, match="interpreter"):
            attention(b, b, b, backend="triton")
    m = torch.randn(1, 1, 4, 16, device="meta")
    with pytest.raises(ValueError, match="CUDA tensors"):
        attention(m, m, m, backend="triton")


def test_kernels_refuse_what_their_indexing_cannot_reach():
    """Offsets within a head are int32 and batch/heads are grid axes (at most 65535 each)."""
    from stepdiff.kernels import attention_triton as kernels

    huge = torch.empty_strided((1, 1, 2, 16), (1, 1, 2**31, 1), device="meta")
    with pytest.raises(ValueError, match="int32"):
        kernels.attention_forward(huge, huge, huge, 1.0)
    wide = torch.empty(70000, 1, 2, 16, device="meta")
    with pytest.raises(ValueError, match="65535"):
        kernels.attention_forward(wide, wide, wide, 1.0)


# ----------------------------------------------------------------------------------------------
# Key padding (kv_lens)
# ----------------------------------------------------------------------------------------------


def check_kv_lens(q, k, v, do, lens, causal=False, got=None):
    """Batch by batch, the kernel with ``kv_lens`` against float64 SDPA on that batch's
    unpadded keys, under the bound of the module docstring (computed on the unpadded keys);
    the padded keys' dK and dV must be exactly 0."""
    u = U[q.dtype]
    kv_lens = torch.tensor(lens, dtype=torch.int64, device=q.device)
    if got is None:
        got = _run(lambda a, b, c: attention(a, b, c, kv_lens=kv_lens, causal=causal,
                                             backend="triton"), q, k, v, do)
    for b, n in enumerate(lens):
        sl = (q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], do[b:b + 1])
        exact = _run(_sdpa(causal), *(t.double() for t in sl))
        same_dtype = _run(_sdpa(causal), *sl)
        bounds = [C * u * m for m in _magnitudes(*sl, causal, u)]
        mine = (got[0][b:b + 1], got[1][b:b + 1], got[2][b:b + 1, :, :n], got[3][b:b + 1, :, :n])
        for name, x, r, e, bound in zip(("o", "dq", "dk", "dv"), mine, same_dtype, exact, bounds,
                                        strict=True):
            assert x.dtype == q.dtype and torch.isfinite(x).all(), (b, name)
            ref_err = (r.double() - e).norm().item()
            assert ref_err <= bound, f"bound too tight for {name}[{b}]: SDPA errs {ref_err:.3g}"
            err = (x.double() - e).norm().item()
            assert err <= bound, f"{name}[{b}] (kv_len {n}): error {err:.3g} > bound {bound:.3g}"
        assert torch.equal(got[2][b, :, n:], torch.zeros_like(got[2][b, :, n:])), b
        assert torch.equal(got[3][b, :, n:], torch.zeros_like(got[3][b, :, n:])), b
    return got


def _padded(B, H, Lq, Lk, D, dtype, lens, seed, fill=float("nan")):
    """Random inputs whose keys and values past each batch's length hold ``fill``: if a kernel
    read them, NaN would reach its results."""
    q, k, v, do = _inputs(B, H, Lq, Lk, D, dtype, seed=seed)
    for b, n in enumerate(lens):
        k[b, :, n:] = fill
        v[b, :, n:] = fill
    return q, k, v, do


# Lq != Lk both ways, odd sizes, a length of 1, all keys kept, key tiles that hold padding
# only (5 of 77 with 32-key tiles), a single query, and causal with padding.
KV_CASES = [
    # B, H, Lq, Lk, D, causal, kv_lens
    (3, 2, 45, 77, 40, False, [77, 1, 37]),
    (2, 1, 130, 77, 72, True, [5, 77]),
    (2, 2, 1, 70, 16, False, [33, 64]),
    (2, 1, 7, 1, 64, False, [1, 1]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", KV_CASES,
                         ids=lambda c: "B{}H{}q{}k{}d{}{}".format(*c[:5], "c" * c[5]))
def test_kv_lens_equals_attention_on_the_unpadded_keys(case, dtype):
    B, H, Lq, Lk, D, causal, lens = case
    q, k, v, do = _padded(B, H, Lq, Lk, D, dtype, lens, seed=Lq * 100 + Lk + D)
    check_kv_lens(q, k, v, do, lens, causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_kv_lens_with_other_tilings(causal):
    """Tiles with BLOCK_M != BLOCK_N, and key tiles that straddle a batch's length."""
    from stepdiff.kernels import attention_triton as kernels

    lens = [83, 17, 40]
    q, k, v, do = _padded(3, 1, 50, 83, 40, torch.float32, lens, seed=41)
    kv_lens = torch.tensor(lens, device=q.device)
    c = 1 / math.sqrt(40)
    for bm, bn in ((16, 64), (64, 16)):
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 4, "num_stages": 1}
        o, lse = kernels.attention_forward(q, k, v, c, causal, config=cfg, kv_lens=kv_lens)
        grads = kernels.attention_backward(do, q, k, v, o, lse, c, causal, kv_lens=kv_lens,
                                           configs=(cfg, {**cfg, "BLOCK_M": bn, "BLOCK_N": bm}))
        check_kv_lens(q, k, v, do, lens, causal, got=[o, *grads])


def test_kv_lens_in_the_blhd_layout():
    """[B, L, H, D] tensors (as the attention layer passes them) with a padded context."""
    lens = [9, 30]
    q, k, v, do = _padded(2, 3, 21, 30, 24, torch.float32, lens, seed=43)
    kv_lens = torch.tensor(lens, device=q.device)
    got = _run(lambda a, b, c: attention(a, b, c, kv_lens=kv_lens, layout="blhd",
                                         backend="triton"),
               *(t.transpose(1, 2) for t in (q, k, v, do)))
    check_kv_lens(q, k, v, do, lens, got=[t.transpose(1, 2) for t in got])


def test_reference_with_kv_lens_equals_masked_sdpa():
    """The reference in float64 equals SDPA given the same key mask, values and gradients;
    padded keys get zero gradients and whatever they hold (NaN here) changes nothing."""
    lens = [13, 1, 29]
    q, k, v, do = _padded(3, 2, 11, 29, 24, torch.float64, lens, seed=47)
    kv_lens = torch.tensor(lens, device=q.device)
    mask = (torch.arange(29, device=q.device) < kv_lens[:, None])[:, None, None, :]
    clean_k, clean_v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    want = _run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask),
                q, clean_k, clean_v, do)
    got = _run(lambda a, b, c: attention_reference(a, b, c, kv_lens=kv_lens), q, k, v, do)
    for name, x, w in zip(("o", "dq", "dk", "dv"), got, want, strict=True):
        assert torch.isfinite(x).all(), name
        torch.testing.assert_close(x, w, rtol=1e-12, atol=1e-12)
    for b, n in enumerate(lens):
        assert not got[2][b, :, n:].any() and not got[3][b, :, n:].any()
    # The dispatcher on CPU tensors takes the reference, with the same result.
    assert torch.equal(attention(q, k, v, kv_lens=kv_lens), got[0])
    # Causal and padded together: query i sees keys j <= i and j < kv_lens[b].
    both = mask & torch.ones(11, 29, dtype=torch.bool, device=q.device).tril()
    want = F.scaled_dot_product_attention(q, clean_k, clean_v, attn_mask=both)
    torch.testing.assert_close(attention_reference(q, k, v, kv_lens=kv_lens, causal=True), want,
                               rtol=1e-12, atol=1e-12)


def test_kv_lens_values_are_checked_again_after_a_change():
    """Values are read once per tensor; an in-place change is seen (the version counter)."""
    q, k, v, _ = _inputs(2, 1, 3, 6, 16, torch.float32, seed=53)
    lens = torch.tensor([6, 2], device=q.device)
    attention(q, k, v, kv_lens=lens)
    lens[1] = 0
    with pytest.raises(ValueError, match=r"kv_lens must lie in \[1, Lk\] = \[1, 6\]; got \[0\]"):
        attention(q, k, v, kv_lens=lens)
    with pytest.raises(ValueError, match=r"kv_lens.*got \[7\]"):
        attention(q, k, v, kv_lens=torch.tensor([7, 1], device=q.device), backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kv_lens_made_under_inference_mode(backend):
    """A kv_lens tensor made under torch.inference_mode (it has no version counter) works on both
    paths and gives the result of a plain tensor with the same values; on the CPU it is checked at
    every call, so a bad value, or one written in place after a first use, is still refused."""
    q, k, v, _ = _inputs(2, 2, 5, 9, 16, torch.float32, seed=71)
    want = attention(q, k, v, kv_lens=torch.tensor([9, 4]), backend=backend)
    with torch.inference_mode():
        lens = torch.tensor([9, 4])
        assert lens.is_inference()
        for _ in range(2):  # the second call is the cached (fast) path on the kernels' side
            assert torch.equal(attention(q, k, v, kv_lens=lens, backend=backend), want)
        lens[1] = 10
        with pytest.raises(ValueError, match=r"kv_lens must lie in \[1, Lk\] = \[1, 9\]; got \[10\]"):
            attention(q, k, v, kv_lens=lens, backend=backend)
        with pytest.raises(ValueError, match=r"got \[0\]"):
            attention(q, k, v, kv_lens=torch.tensor([0, 3]), backend=backend)
    assert torch.equal(attention(q, k, v, kv_lens=torch.tensor([9, 4]), backend=backend), want)


def _bad_kv_lens(**changes):
    base = {"q": torch.randn(2, 3, 5, 16), "k": torch.randn(2, 3, 7, 16),
            "v": torch.randn(2, 3, 7, 16), "kv_lens": torch.tensor([7, 3])}
    return {**base, **changes}


@pytest.mark.parametrize("kwargs, error, match", [
    (_bad_kv_lens(kv_lens=[7, 3]), TypeError, "kv_lens must be a torch.Tensor"),
    (_bad_kv_lens(kv_lens=torch.tensor([7, 3], dtype=torch.int32)), TypeError, "kv_lens.*int64"),
    (_bad_kv_lens(kv_lens=torch.tensor([7.0, 3.0])), TypeError, "kv_lens.*int64"),
    (_bad_kv_lens(kv_lens=torch.tensor([7, 3, 1])), ValueError, r"kv_lens.*shape \[B\] = \[2\]"),
    (_bad_kv_lens(kv_lens=torch.tensor([[7], [3]])), ValueError, r"kv_lens.*shape"),
    (_bad_kv_lens(kv_lens=torch.tensor([7, 3], device="meta")), ValueError, "kv_lens is on meta"),
    (_bad_kv_lens(kv_lens=torch.tensor([0, 3])), ValueError, r"kv_lens.*\[1, 7\].*\[0\]"),
    (_bad_kv_lens(kv_lens=torch.tensor([8, -1])), ValueError, r"kv_lens.*\[8, -1\]"),
    (_bad_kv_lens(kv_lens=torch.tensor([7, 3]), layout="blhd"), ValueError,
     "batch and heads"),  # checked after the shapes
])
def test_bad_kv_lens_raise(kwargs, error, match):
    kwargs = dict(kwargs)
    q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
    with pytest.raises(error, match=match):
        attention(q, k, v, **kwargs)
    if "layout" not in kwargs:
        with pytest.raises(error, match=match):
            attention_reference(q, k, v, **kwargs)
