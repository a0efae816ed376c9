"""Tests for stepdiff.models.dit: patches and positions, adaLN-Zero at initialisation, shapes and
gradients, the attention against the reference path, padding, conditioning, training, bf16, the
paper's parameter counts, errors."""

from __future__ import annotations

import pytest
import torch

from stepdiff.models.dit import DIT_PRESETS, DiT, DiTConfig, sincos_position_embedding
from stepdiff.schedules import FlowMatchingSchedule, VPCosineSchedule
from stepdiff.train import diffusion_loss

SMALL = dict(hidden=16, depth=2, heads=2, patch_size=2, freq_dim=32)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny, so intra-op threads only add synchronisation; on a shared, loaded
    2-core machine two threads made these tests 20-40x slower (spinning workers), one does not."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(seed: int = 0, **changes) -> DiT:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return DiT(DiTConfig(**{**SMALL, **changes}))


def perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Give the zero-initialised parameters (adaLN regressions, final layer, cross-attention output,
    biases) random values, so that every path carries signal and gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def contexts(B: int, L: int, dim: int, lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    return torch.randn(B, L, dim, generator=g), mask


def test_position_embedding_is_the_sin_cos_of_row_and_column():
    dim, h, w = 12, 3, 5
    emb = sincos_position_embedding(dim, h, w)
    assert emb.shape == (h * w, dim)
    omega = 10000.0 ** (-torch.arange(3) / 3)
    for i in range(h):
        for j in range(w):
            want = torch.cat([torch.sin(j * omega), torch.cos(j * omega), torch.sin(i * omega), torch.cos(i * omega)])
            torch.testing.assert_close(emb[i * w + j], want)
    assert len({tuple(r.tolist()) for r in emb}) == h * w  # every position is told apart


def test_patches_go_back_where_they_came_from():
    """At initialisation every block is the identity (adaLN-Zero), so with a random final layer the
    DiT maps each patch on its own: changing the pixels of one patch changes the output in that
    patch and nowhere else. This ties the token order of the patch embedding to that of the
    reassembly, on a non-square grid with an odd patch size."""
    p = 3
    model = make(in_channels=2, patch_size=p)
    perturb(model.final)
    x = torch.randn(1, 2, 2 * p, 5 * p)
    base = model(x, 0.4)
    for i, j in [(0, 0), (1, 3), (0, 4)]:
        x2 = x.clone()
        x2[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p] += torch.randn(1, 2, p, p)
        changed = (model(x2, 0.4) != base).any(1)[0]  # [H, W]
        inside = torch.zeros_like(changed)
        inside[i * p : (i + 1) * p, j * p : (j + 1) * p] = True
        assert changed[inside].all() and not changed[~inside].any()


@pytest.mark.parametrize(
    "B, C, H, W, changes",
    [
        (1, 1, 8, 8, {}),
        (3, 3, 6, 10, {}),  # 3 x 5 patches
        (2, 2, 12, 4, dict(patch_size=4, depth=3)),
        (2, 3, 6, 6, dict(n_classes=5, context_dim=6, mlp_ratio=2.0)),
    ],
)
def test_shapes_and_gradients(B, C, H, W, changes):
    model = perturb(make(in_channels=C, **changes))
    x = torch.randn(B, C, H, W, requires_grad=True)
    kw = {}
    if model.config.n_classes:
        kw["y"] = torch.randint(0, model.config.n_classes + 1, (B,))
    if model.config.context_dim:
        kw["context"], kw["context_mask"] = contexts(B, 5, model.config.context_dim, [5, 2][:B])
        kw["context"].requires_grad_()
    out = model(x, torch.rand(B), **kw)
    assert out.shape == x.shape and out.dtype == x.dtype
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad.abs().sum() > 0
    if "context" in kw:
        assert kw["context"].grad[:, :2].abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name != "class_embed.weight":
            assert p.grad.abs().sum() > 0, name


def test_output_is_exactly_zero_and_every_block_the_identity_at_initialisation():
    model = make(n_classes=4, context_dim=3, depth=3)
    B = 2
    x = 3 * torch.randn(B, 3, 8, 6)
    context, mask = contexts(B, 4, 3, [4, 1])
    out = model(x, torch.rand(B), torch.tensor([1, 4]), context, mask)
    assert torch.equal(out, torch.zeros_like(x))
    tokens, c = torch.randn(B, 12, 16), torch.randn(B, 16)
    for block in model.blocks:
        assert torch.equal(block(tokens, c, context, mask), tokens)


def test_scalar_time_is_broadcast_and_time_matters():
    model = perturb(make())
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(model(x, 0.3), model(x, torch.full((3,), 0.3)))
    assert not torch.allclose(model(x, 0.3), model(x, 0.7))


def test_attention_layers_match_the_reference_path():
    """The DiT, self- and cross-attention with a padded context, with the Triton kernels (the
    interpreter on a CPU) against the PyTorch reference: outputs and every gradient agree in fp32."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tri = perturb(make(context_dim=6, attn_backend="triton")).to(device)
    ref = make(context_dim=6, attn_backend="torch").to(device)
    ref.load_state_dict(tri.state_dict())
    x = torch.randn(2, 3, 6, 8, device=device)
    t = torch.rand(2, device=device)
    context, mask = (v.to(device) for v in contexts(2, 5, 6, [5, 3]))
    outs, grads = [], []
    for model in (tri, ref):
        xi, ci = x.clone().requires_grad_(), context.clone().requires_grad_()
        out = model(xi, t, context=ci, context_mask=mask)
        out.square().sum().backward()
        outs.append(out)
        grads.append([xi.grad, ci.grad] + [p.grad for p in model.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    for g_tri, g_ref in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(g_tri, g_ref, rtol=1e-4, atol=1e-5)


def test_padding_tokens_change_nothing():
    model = perturb(make(context_dim=4, n_classes=3)).double()
    lengths = [3, 6, 1]
    B, L = 3, 6
    x = torch.randn(B, 3, 4, 6, dtype=torch.float64)
    t, y = torch.rand(B, dtype=torch.float64), torch.tensor([0, 2, 3])
    context, mask = contexts(B, L, 4, lengths)
    context = torch.where(mask[:, :, None], context, 1e3 * torch.randn(B, L, 4)).double().requires_grad_()
    out = model(x, t, y, context, mask)
    out.square().sum().backward()
    for b, n in enumerate(lengths):
        alone = context.detach()[b : b + 1, :n].clone().requires_grad_()
        out_b = model(x[b : b + 1], t[b : b + 1], y[b : b + 1], alone)
        out_b.square().sum().backward()
        torch.testing.assert_close(out[b : b + 1], out_b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(context.grad[b : b + 1, :n], alone.grad, rtol=1e-10, atol=1e-12)
        assert torch.equal(context.grad[b, n:], torch.zeros_like(context.grad[b, n:]))


def test_null_class_and_unconditional_input():
    model = perturb(make(n_classes=3))
    assert model.null_class == 3 and make().null_class is None
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    assert torch.equal(model(x, t), model(x, t, torch.tensor([3, 3])))
    assert not torch.allclose(model(x, t, torch.tensor([0, 1])), model(x, t))


def _images(n: int, C: int = 3, H: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, 1, 1, generator=g) * H
    ii, jj = torch.meshgrid(torch.arange(H), torch.arange(H), indexing="ij")
    blob = torch.exp(-((ii - centre[:, 0]) ** 2 + (jj - centre[:, 1]) ** 2) / 4.0)
    colour = 2 * torch.rand(n, C, 1, 1, generator=g) - 1
    return (blob[:, None] * colour).clamp(-1, 1)


def _train(model, params, x0, schedule, steps, lr, y=None, **kw):
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = diffusion_loss(model, x0, schedule, y=y, generator=g, t_max=0.98, **kw)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_a_short_training_lowers_the_loss():
    torch.manual_seed(0)
    model = make(hidden=32)
    schedule = VPCosineSchedule()
    x0 = _images(16)
    g = torch.Generator().manual_seed(123)
    t, noise = 0.05 + 0.9 * torch.rand(16, generator=g), torch.randn(x0.shape, generator=g)

    def held_out_loss():
        with torch.no_grad():
            return float(diffusion_loss(model, x0, schedule, t=t, noise=noise))

    before = held_out_loss()
    assert before == pytest.approx(float(noise.square().mean()))  # zero output: the loss is E[eps^2]
    _train(model, model.parameters(), x0, schedule, steps=25, lr=3e-3)
    assert held_out_loss() < 0.8 * before


@pytest.mark.parametrize("kind", ["class", "context"])
def test_conditioning_is_learned(kind):
    """Two classes (or two contexts) of images of opposite sign: after a few Adam steps the loss
    with the right condition is far below the loss with the two conditions swapped."""
    torch.manual_seed(1)
    model = make(n_classes=2, hidden=32) if kind == "class" else make(context_dim=4, hidden=32)
    labels = torch.arange(16) % 2
    x0 = 0.2 + 0.6 * _images(16).abs()
    x0 = torch.where(labels[:, None, None, None] == 0, x0, -x0)
    codes = torch.randn(2, 3, 4)

    def conditioned(x, t, y):
        if kind == "class":
            return model(x, t, y)
        return model(x, t, context=codes[y], context_mask=torch.ones(len(y), 3, dtype=torch.bool))

    fm = FlowMatchingSchedule()
    _train(conditioned, model.parameters(), x0, fm, steps=50, lr=5e-3, y=labels, prediction="velocity")
    g = torch.Generator().manual_seed(5)
    t, noise = 0.05 + 0.9 * torch.rand(16, generator=g), torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        right = diffusion_loss(conditioned, x0, fm, y=labels, t=t, noise=noise, prediction="velocity")
        swapped = diffusion_loss(conditioned, x0, fm, y=1 - labels, t=t, noise=noise, prediction="velocity")
    assert swapped > 1.5 * right


@pytest.mark.parametrize("changes", [{}, dict(context_dim=4, n_classes=3)])
def test_bf16_autocast_forward_and_backward(changes):
    model = perturb(make(hidden=32, **changes), std=0.2)
    B = 3
    x, t = torch.randn(B, 3, 8, 8), torch.rand(B)
    kw = {}
    if model.config.context_dim:
        kw = dict(y=torch.tensor([0, 1, 3]), context=torch.randn(B, 5, 4),
                  context_mask=torch.arange(5)[None] < torch.tensor([[5], [2], [1]]))
    want = model(x, t, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, **kw)
        out.square().mean().backward()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2 %); through the blocks the
    # output moves by about 1 % of its size.
    assert float((out - want).detach().norm() / want.detach().norm()) < 0.03
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name, paper", [("S/2", 33e6), ("S/4", 33e6), ("B/2", 130e6), ("B/4", 130e6)])
def test_preset_parameter_counts_match_the_paper(name, paper):
    """Peebles & Xie 2023: DiT-S 33 M and DiT-B 130 M parameters, for 32x32x4 latents and ImageNet's
    1000 classes (theirs also predicts the variance, 4 more output channels: under 0.1 %)."""
    with torch.device("meta"):
        model = DiT(DiTConfig.preset(name, in_channels=4, n_classes=1000))
    assert model.num_parameters() == pytest.approx(paper, rel=0.02)
    assert model.config.patch_size == int(name[-1])


def test_tiny_preset():
    with torch.device("meta"):
        tiny = DiT(DiTConfig.preset("tiny"))
    assert 0.5e6 < tiny.num_parameters() <= 1.25e6
    assert DiTConfig() == DiTConfig.preset("tiny") and set(DIT_PRESETS) >= {"S/2", "S/4", "B/2", "B/4", "tiny"}


def test_clear_errors():
    model = make(n_classes=3, context_dim=4)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    ctx = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(2, 1, 8, 8), t, context=ctx)
    with pytest.raises(ValueError, match="divisible by the patch size 2"):
        model(torch.randn(2, 3, 8, 7), t, context=ctx)
    with pytest.raises(ValueError, match=r"context must have shape \[2, L, 4\]"):
        model(x, t, context=torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="needs one"):
        model(x, t)
    with pytest.raises(ValueError, match=r"y must lie in 0..3.*\[0, 4\]"):
        model(x, t, torch.tensor([0, 4]), ctx)
    with pytest.raises(ValueError, match="context_mask must pad on the right"):
        model(x, t, context=ctx, context_mask=torch.tensor([[False] * 5, [True] * 5]))
    plain = make()
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="no cross-attention"):
        plain(x, t, context=ctx)
    with pytest.raises(ValueError, match="heads 5 does not divide"):
        DiTConfig(hidden=16, heads=5)
    with pytest.raises(ValueError, match="divisible by 4"):
        DiTConfig(hidden=18, heads=2)
    with pytest.raises(ValueError, match="unknown DiT preset 'XL/2'"):
        DiTConfig.preset("XL/2")


# --- the fused adaLN modulate -------------------------------------------------------------------------------


def _forward_backward(model, x, t, **kw):
    """Output, and the gradients of the input and of every parameter, of a scalar loss."""
    model.zero_grad()
    xi = x.clone().requires_grad_()
    out = model(xi, t, **kw)
    (out * torch.linspace(-1, 1, out.shape[-1])).square().sum().backward()
    return [out.detach(), xi.grad] + [p.grad for p in model.parameters()]


def test_fused_adaln_changes_nothing_on_the_cpu(monkeypatch):
    """On the CPU the fused adaLN calls take the PyTorch reference, which computes what the unfused
    LN(x)(1 + scale) + shift did: output and every gradient bit for bit equal in fp32; the state
    dict is the unfused network's."""
    from stepdiff.models import dit

    model = perturb(make(context_dim=6, n_classes=3))
    B = 2
    x, t = torch.randn(B, 3, 6, 8), torch.rand(B)
    context, mask = contexts(B, 5, 6, [5, 2])
    kw = dict(y=torch.tensor([0, 3]), context=context, context_mask=mask)
    fused = _forward_backward(model, x, t, **kw)
    calls = []

    def unfused(norm, h, shift, scale, backend=None):
        calls.append(norm)
        return dit.modulate(norm(h), shift[:, None], scale[:, None])

    monkeypatch.setattr(dit, "norm_modulate", unfused)
    plain = _forward_backward(model, x, t, **kw)
    assert len(calls) == 2 * model.config.depth + 1
    for a, b in zip(fused, plain, strict=True):
        assert torch.equal(a, b)
    assert list(model.state_dict()) == list(make(context_dim=6, n_classes=3, norm_backend="triton").state_dict())


def test_triton_adaln_matches_the_reference():
    """The DiT with the fused Triton adaLN (the interpreter on a CPU) against the same weights on the
    PyTorch reference, fp32, odd token count and width: output and every gradient agree to float32
    rounding (1e-4 relative, or 1e-5 of the tensor's largest entry)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    changes = dict(hidden=20, heads=2, n_classes=3, attn_backend="torch")
    tri = perturb(make(**changes, norm_backend="triton")).to(device)
    ref = make(**changes, norm_backend="torch").to(device)
    ref.load_state_dict(tri.state_dict())
    x, t = torch.randn(3, 3, 6, 10, device=device), torch.rand(3, device=device)  # 15 tokens
    y = torch.tensor([0, 2, 3], device=device)
    got, want = _forward_backward(tri, x, t, y=y), _forward_backward(ref, x, t, y=y)
    assert want[0].abs().max() > 0.1
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())))


def test_sdpa_attention_backend_matches_the_reference():
    """attn_backend='sdpa' (PyTorch's scaled_dot_product_attention, the benchmarks' baseline) gives
    the reference path's output, padded context included."""
    ref = perturb(make(context_dim=6, attn_backend="torch"))
    sdpa = make(context_dim=6, attn_backend="sdpa")
    sdpa.load_state_dict(ref.state_dict())
    x, t = torch.randn(2, 3, 6, 8), torch.rand(2)
    context, mask = contexts(2, 5, 6, [5, 2])
    torch.testing.assert_close(sdpa(x, t, context=context, context_mask=mask),
                               ref(x, t, context=context, context_mask=mask), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="norm_backend must be one of"):
        DiTConfig(norm_backend="sdpa")
