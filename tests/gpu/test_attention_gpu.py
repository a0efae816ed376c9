r"""The flash-attention kernels compiled on a GPU: bf16, long sequences, every launch config.

Skipped without CUDA (tests/conftest.py). The bound is the one derived in
tests/kernels/test_attention.py: for each of $O, dQ, dK, dV$ the error against float64 SDPA is
at most $C u$ times the magnitudes the result is summed from, $u$ the unit roundoff of the input
dtype, and SDPA run in the input dtype must meet the same bound. On the GPU $C = 2$ as in the
interpreter for fp16 and bf16; for fp32 the kernel's ``exp2`` is the hardware's approximate
``ex2.approx.f32`` (relative error up to about $2^{-22}$, i.e. $4u$ rather than $u/2$), so fp32
gets $C = 8$. A wrong rescale, mask or stride gives errors of order one, far above any of these.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stepdiff.kernels import attention

DEVICE = "cuda"
U = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
C = {torch.float32: 8.0, torch.float16: 2.0, torch.bfloat16: 2.0}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
IDS = ["fp16", "bf16", "fp32"]


def _inputs(B, H, Lq, Lk, D, dtype, seed=0, magnitude=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g) * magnitude
    k = torch.randn(B, H, Lk, D, generator=g) * magnitude
    v = torch.randn(B, H, Lk, D, generator=g)
    do = torch.randn(B, H, Lq, D, generator=g)
    return [t.to(device=DEVICE, dtype=dtype) for t in (q, k, v, do)]


def _run(fn, q, k, v, do):
    # detach() keeps the strides (a clone would make strided or expanded inputs contiguous),
    # so the kernels' backward sees the layouts under test.
    xs = [t.detach().requires_grad_() for t in (q, k, v)]
    o = fn(*xs)
    o.backward(do.to(o.dtype))
    return [o.detach()] + [x.grad for x in xs]


def _sdpa(causal):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _magnitudes(q, k, v, do, causal, u):
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


def _check(q, k, v, do, causal=False, got=None, check_sdpa=True):
    u = U[q.dtype]
    exact = _run(_sdpa(causal), *(t.double() for t in (q, k, v, do)))
    if got is None:
        got = _run(lambda a, b, c: attention(a, b, c, causal=causal), q, k, v, do)
    bounds = [C[q.dtype] * u * m for m in _magnitudes(q, k, v, do, causal, u)]
    same = _run(_sdpa(causal), q, k, v, do) if check_sdpa else [None] * 4
    for name, x, r, e, b in zip(("o", "dq", "dk", "dv"), got, same, exact, bounds, strict=True):
        assert x.dtype == q.dtype and torch.isfinite(x).all(), name
        if r is not None:
            ref_err = (r.double() - e).norm().item()
            assert ref_err <= b, f"bound too tight for {name}: SDPA errs {ref_err:.3g} > {b:.3g}"
        err = (x.double() - e).norm().item()
        assert err <= b, f"{name}: error {err:.3g} > bound {b:.3g}"
    return got


CASES = [
    # B, H, Lq, Lk, D, causal: odd lengths, SD 1.x head dims 40/80/160, DiT 72, 88, 256
    (2, 3, 77, 130, 40, False),
    (1, 2, 1, 7, 16, False),
    (2, 2, 130, 77, 72, False),
    (1, 2, 257, 77, 80, False),
    (1, 2, 200, 200, 88, True),
    (1, 2, 130, 301, 128, False),
    (1, 1, 129, 129, 160, True),
    (1, 1, 100, 70, 256, False),
    (2, 1, 7, 1, 64, False),
]


@pytest.fixture
def first_candidates(monkeypatch):
    """Launch each kernel with the first autotuning candidate of its head-dim class instead of
    autotuning. Autotuning compiles every candidate (seconds each); this sweep over head dims,
    lengths and dtypes checks the kernels' indexing and masking, which no candidate changes.
    The tests below without this fixture autotune, and one checks every candidate."""
    from stepdiff.kernels import attention_triton as kernels

    launch = kernels._launch

    def pinned(which, grid_rows, B, H, args, meta, config):
        return launch(which, grid_rows, B, H, args, meta,
                      config or kernels.configs_for(which, meta["BLOCK_D"])[0])

    monkeypatch.setattr(kernels, "_launch", pinned)
    # Plans made here keep their pinned kernels: give this test its own plan cache.
    monkeypatch.setattr(kernels, "_PLANS", {})


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: "B{}H{}q{}k{}d{}{}".format(*c[:5], "c" * c[5]))
def test_matches_float64_sdpa(case, dtype, first_candidates):
    B, H, Lq, Lk, D, causal = case
    _check(*_inputs(B, H, Lq, Lk, D, dtype, seed=Lq + Lk + D), causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=IDS[:2])
@pytest.mark.parametrize("shape", [(1, 2, 4096, 4096, 64, False), (1, 2, 4096, 4096, 128, True),
                                   (1, 2, 4096, 77, 128, False), (1, 1, 5000, 4097, 72, False)],
                         ids=["self-d64", "causal-d128", "cross77-d128", "ragged-d72"])
def test_long_sequences(shape, dtype):
    B, H, Lq, Lk, D, causal = shape
    _check(*_inputs(B, H, Lq, Lk, D, dtype, seed=Lq), causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=IDS[:2])
def test_large_scores_do_not_overflow(dtype):
    q, k, v, do = _inputs(1, 2, 300, 200, 64, dtype, seed=7, magnitude=30.0)
    _check(q, k, v, do)


def test_non_contiguous_and_blhd_inputs():
    B, H, Lq, Lk, D = 2, 4, 333, 129, 64
    g = torch.Generator().manual_seed(17)
    q = torch.randn(B, Lq, H, D, generator=g).to(DEVICE, torch.bfloat16)  # blhd memory
    k = torch.randn(B, H, Lk, 2 * D, generator=g).to(DEVICE, torch.bfloat16)[..., ::2]
    v = torch.randn(B, 1, Lk, D, generator=g).to(DEVICE, torch.bfloat16).expand(B, H, Lk, D)
    do = torch.randn(B, Lq, H, D, generator=g).to(DEVICE, torch.bfloat16)
    got = _run(lambda a, b, c: attention(a, b, c, layout="blhd").transpose(1, 2),
               q, k.transpose(1, 2), v.transpose(1, 2), do.transpose(1, 2))
    got = [got[0], got[1].transpose(1, 2), got[2].transpose(1, 2), got[3].transpose(1, 2)]
    _check(q.transpose(1, 2), k, v, do.transpose(1, 2), got=got)


def test_backward_is_deterministic():
    q, k, v, do = _inputs(2, 4, 1024, 1000, 64, torch.bfloat16, seed=19)
    first = _run(lambda a, b, c: attention(a, b, c), q, k, v, do)
    second = _run(lambda a, b, c: attention(a, b, c), q, k, v, do)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_autotune_config_is_correct(causal):
    """The autotuner only times its configs; check each one it may pick for head dim 72 (tile
    width 128) on a ragged shape, forward and backward."""
    from triton.runtime.errors import OutOfResources

    from stepdiff.kernels import attention_triton as kernels

    q, k, v, do = _inputs(1, 2, 300, 171, 72, torch.bfloat16, seed=31)
    scale = 1 / math.sqrt(72)
    exact = _run(_sdpa(causal), *(t.double() for t in (q, k, v, do)))
    bounds = [2 * U[q.dtype] * m for m in _magnitudes(q, k, v, do, causal, U[q.dtype])]
    fwd, dkdv, dq = (kernels.configs_for(which, 128) for which in ("fwd", "dkdv", "dq"))
    ran = 0
    for i in range(max(len(fwd), len(dkdv), len(dq))):
        cf, ckv, cq = fwd[i % len(fwd)], dkdv[i % len(dkdv)], dq[i % len(dq)]
        try:
            o, lse = kernels.attention_forward(q, k, v, scale, causal, config=cf)
            grads = kernels.attention_backward(do, q, k, v, o, lse, scale, causal,
                                               configs=(ckv, cq))
        except OutOfResources:
            continue  # the autotuner skips these too
        ran += 1
        for name, x, e, b in zip(("o", "dq", "dk", "dv"), (o, *grads), exact, bounds,
                                 strict=True):
            err = (x.double() - e).norm().item()
            assert err <= b, f"{name} with {cf}, {ckv}, {cq}: error {err:.3g} > {b:.3g}"
    assert ran > 0


def test_attention_layer_in_bf16_trains():
    from stepdiff.models.attention import Attention

    torch.manual_seed(0)
    layer = Attention(320, heads=8, head_dim=40, context_dim=96).to(DEVICE, torch.bfloat16)
    x = torch.randn(2, 1024, 320, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    ctx = torch.randn(2, 77, 96, device=DEVICE, dtype=torch.bfloat16)
    out = layer(x, ctx)
    ref = Attention(320, heads=8, head_dim=40, context_dim=96, backend="torch")
    ref = ref.to(DEVICE, torch.bfloat16)
    ref.load_state_dict(layer.state_dict())
    torch.testing.assert_close(out.float(), ref(x, ctx).float(), rtol=0.02, atol=0.02)
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    assert torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------------------------
# Key padding (kv_lens): the interpreter tests' check (tests/kernels/test_attention.py), here in
# bf16 and fp16 at the sizes of text cross-attention and of long padded contexts.
# ----------------------------------------------------------------------------------------------


def _check_kv_lens(q, k, v, do, lens, causal=False, got=None):
    """Per batch against float64 SDPA on the unpadded keys; padded dK, dV exactly 0."""
    kv_lens = torch.tensor(lens, dtype=torch.int64, device=q.device)
    if got is None:
        got = _run(lambda a, b, c: attention(a, b, c, kv_lens=kv_lens, causal=causal), q, k, v, do)
    for b, n in enumerate(lens):
        sl = (q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], do[b:b + 1])
        mine = [got[0][b:b + 1], got[1][b:b + 1], got[2][b:b + 1, :, :n], got[3][b:b + 1, :, :n]]
        _check(*sl, causal, got=mine, check_sdpa=b == 0)
        assert not got[2][b, :, n:].any() and not got[3][b, :, n:].any(), b
    return got


def _padded(B, H, Lq, Lk, D, dtype, lens, seed):
    q, k, v, do = _inputs(B, H, Lq, Lk, D, dtype, seed=seed)
    for b, n in enumerate(lens):  # NaN padding: any read of it would show
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    return q, k, v, do


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=IDS[:2])
@pytest.mark.parametrize("shape", [
    (4, 4, 1024, 77, 64, False, [77, 1, 12, 60]),  # text cross-attention at 32x32 tokens
    (3, 2, 4096, 77, 40, False, [5, 77, 33]),  # SD 1.x head dim, 64x64 tokens
    (2, 2, 1500, 2048, 128, True, [2048, 700]),  # long padded context, causal
    (2, 2, 333, 300, 72, False, [129, 300]),  # DiT head dim
], ids=["cross77-d64", "cross77-d40", "long-causal-d128", "d72"])
def test_kv_lens_matches_unpadded_attention(shape, dtype, first_candidates):
    B, H, Lq, Lk, D, causal, lens = shape
    _check_kv_lens(*_padded(B, H, Lq, Lk, D, dtype, lens, seed=Lq + Lk), lens, causal)


def test_kv_lens_autotuned_and_blhd():
    """Through the autotuner (no pinned candidate), with [B, L, H, D] views as the attention
    layer makes them."""
    lens = [77, 20]
    q, k, v, do = _padded(2, 8, 1024, 77, 64, torch.bfloat16, lens, seed=61)
    kv_lens = torch.tensor(lens, device=DEVICE)
    blhd = [t.transpose(1, 2).contiguous() for t in (q, k, v, do)]
    got = _run(lambda a, b, c: attention(a, b, c, kv_lens=kv_lens, layout="blhd"), *blhd)
    _check_kv_lens(q, k, v, do, lens, got=[t.transpose(1, 2) for t in got])


def test_kv_lens_under_cuda_graph_capture():
    """Attention with kv_lens can be captured (no host read of the values while capturing), and a
    replay reads the lengths from memory as they are at replay time."""
    lens = torch.tensor([77, 9], device=DEVICE)
    q, k, v, _ = _inputs(2, 4, 256, 77, 64, torch.bfloat16, seed=67)
    with torch.no_grad():
        attention(q, k, v, kv_lens=lens)  # compile and check the values outside the capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            attention(q, k, v, kv_lens=lens)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = attention(q, k, v, kv_lens=lens)
        graph.replay()
        first = out.clone()
        lens.copy_(torch.tensor([30, 77], device=DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(first, attention(q, k, v, kv_lens=torch.tensor([77, 9], device=DEVICE)))
        assert torch.equal(out, attention(q, k, v, kv_lens=torch.tensor([30, 77], device=DEVICE)))


def test_repeated_calls_launch_the_chosen_kernels_directly(monkeypatch):
    """After the first call of a shape (autotuning there), forward and backward launch the
    chosen configurations directly, and give the first call's results bit for bit; the
    inference path (no gradients, [B, L, H, D] read through strides) equals the autograd path."""
    from stepdiff.kernels import attention_triton as kernels

    monkeypatch.setattr(kernels, "_PLANS", {})  # only this test's plans below
    q, k, v, do = _inputs(2, 8, 333, 200, 64, torch.bfloat16, seed=71)
    first = _run(lambda a, b, c: attention(a, b, c), q, k, v, do)
    second = _run(lambda a, b, c: attention(a, b, c), q, k, v, do)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    plans = [p for p in kernels._PLANS.values()]
    assert plans
    kernel_plans = [cell.cell_contents for p in plans for cell in (p.__closure__ or ())
                    if isinstance(cell.cell_contents, kernels._KernelPlan)]
    assert kernel_plans and all(kp.direct is not None for kp in kernel_plans)
    blhd = [t.transpose(1, 2).contiguous() for t in (q, k, v)]
    with torch.no_grad():
        fast = attention(*blhd, layout="blhd")
        fast_again = attention(*blhd, layout="blhd")
    assert torch.equal(fast, fast_again)
    # Other strides, same configuration and arithmetic; a wrong stride would be far off.
    torch.testing.assert_close(fast.transpose(1, 2), first[0], rtol=2**-7, atol=2**-7)


def test_kv_lens_made_under_inference_mode_costs_no_sync_after_its_first_use():
    """A CUDA kv_lens made under torch.inference_mode (no version counter) is checked at its first
    use (a bad one is refused) and then trusted: a repeated call makes no device synchronisation
    (CUDA's sync debug mode raises on one), and the result is a plain tensor's with those values."""
    q, k, v, _ = _inputs(2, 4, 96, 80, 64, torch.bfloat16, seed=81)
    want = attention(q, k, v, kv_lens=torch.tensor([80, 33], device=DEVICE))
    with torch.inference_mode():
        lens = torch.tensor([80, 33], device=DEVICE)
        assert torch.equal(attention(q, k, v, kv_lens=lens), want)
        torch.cuda.set_sync_debug_mode("error")
        try:
            again = attention(q, k, v, kv_lens=lens)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(again, want)
        with pytest.raises(ValueError, match=r"kv_lens must lie in \[1, Lk\]"):
            attention(q, k, v, kv_lens=torch.tensor([81, 3], device=DEVICE))
