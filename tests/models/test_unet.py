"""Tests for stepdiff.models.unet: shapes and gradients at odd sizes, zero-initialised branches, the
attention against the reference path, padding, conditioning, training, bf16, presets, errors."""

from __future__ import annotations

import pytest
import torch

from stepdiff.models.unet import UNET_PRESETS, AttnBlock, ResBlock, UNet, UNetConfig
from stepdiff.schedules import FlowMatchingSchedule, VPCosineSchedule
from stepdiff.train import diffusion_loss

SMALL = dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), heads=2, norm_groups=4)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny, so intra-op threads only add synchronisation; on a shared, loaded
    2-core machine two threads made these tests 20-40x slower (spinning workers), one does not."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(seed: int = 0, **changes) -> UNet:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return UNet(UNetConfig(**{**SMALL, **changes}))


def perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Give the zero-initialised parameters (output conv, last conv of each block, attention output
    projections, norm biases) random values, so that every path carries signal and gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def contexts(B: int, L: int, dim: int, lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(B, L, dim, generator=g)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    return context, mask


@pytest.mark.parametrize(
    "B, C, H, W, changes",
    [
        (1, 1, 8, 8, {}),
        (3, 3, 6, 10, {}),  # not square, 3 x 5 at the lower level
        (2, 2, 12, 4, dict(channel_mult=(1, 1, 2), attn_levels=(0, 2))),  # attention at full resolution
        (2, 3, 8, 8, dict(num_res_blocks=2, n_classes=5, context_dim=6, scale_shift=False, dropout=0.1)),
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
        if name != "class_embed.weight":  # only the rows of the labels drawn get a gradient
            assert p.grad.abs().sum() > 0, name


def test_output_is_exactly_zero_at_initialisation():
    model = make(n_classes=4, context_dim=3)
    x = 3 * torch.randn(2, 3, 8, 12)
    context, mask = contexts(2, 4, 3, [4, 1])
    out = model(x, torch.rand(2), torch.tensor([1, 4]), context, mask)
    assert torch.equal(out, torch.zeros_like(x))


def test_every_block_starts_as_the_identity():
    """Zero-initialised last convolution (ResBlock) and output projections (AttnBlock): with equal
    input and output widths, each block returns its input exactly."""
    model = make(context_dim=5)
    emb = torch.randn(3, 4 * model.config.channels)
    context, mask = contexts(3, 4, 5, [4, 2, 1])
    blocks = [m for m in model.modules() if isinstance(m, (ResBlock, AttnBlock))]
    assert sum(isinstance(m, AttnBlock) for m in blocks) >= 2
    checked = 0
    for m in blocks:
        if isinstance(m, ResBlock):
            if m.conv1.in_channels != m.conv1.out_channels:
                continue
            x = torch.randn(3, m.conv1.in_channels, 4, 6)
            assert torch.equal(m(x, emb), x)
        else:
            x = torch.randn(3, m.norm.num_channels, 4, 6)
            assert torch.equal(m(x, context, mask), x)
        checked += 1
    assert checked >= 4


def test_scalar_time_is_broadcast_and_time_matters():
    model = perturb(make())
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(model(x, 0.3), model(x, torch.full((3,), 0.3)))
    assert not torch.allclose(model(x, 0.3), model(x, 0.7))


def test_attention_layers_match_the_reference_path():
    """The whole UNet, self- and cross-attention with a padded context, with the Triton kernels (the
    interpreter on a CPU) against the PyTorch reference: outputs and every gradient agree in fp32.

    The absolute tolerance scales with each tensor's largest entry: a weight gradient's entry is a sum
    of many products about that large, so its fp32 rounding error is set by the summands, not by the
    (possibly cancelled, near-zero) sum. With a fixed ``atol = 1e-5``, 2 of 30 random draws failed on
    one near-zero entry of a conv gradient whose entries reach 20 (an error of 6e-7 of the scale)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tri = perturb(make(channels=8, context_dim=6, attn_backend="triton")).to(device)
    ref = make(channels=8, context_dim=6, attn_backend="torch").to(device)
    ref.load_state_dict(tri.state_dict())
    x = torch.randn(2, 3, 4, 6, device=device)
    t = torch.rand(2, device=device)
    context, mask = (v.to(device) for v in contexts(2, 5, 6, [5, 3]))
    outs, grads = [], []
    for model in (tri, ref):
        xi, ci = x.clone().requires_grad_(), context.clone().requires_grad_()
        out = model(xi, t, context=ci, context_mask=mask)
        out.square().sum().backward()
        outs.append(out)
        grads.append([xi.grad, ci.grad] + [p.grad for p in model.parameters()])
    for got, want in zip([outs[0], *grads[0]], [outs[1], *grads[1]], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(want.detach().abs().max())))


def test_padding_tokens_change_nothing():
    """Each image with its context padded (padding filled with large garbage) gives the output and
    the gradients it gets with its context alone, unpadded."""
    model = perturb(make(context_dim=4, n_classes=3)).double()
    lengths = [3, 6, 1]
    B, L = 3, 6
    x = torch.randn(B, 3, 8, 8, dtype=torch.float64)
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


def _train(model, x0, schedule, steps, y=None, lr=2e-3, seed=0, params=None, **kw):
    """A few Adam steps on ``x0`` with fresh times and noise each step."""
    opt = torch.optim.Adam(model.parameters() if params is None else params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = diffusion_loss(model, x0, schedule, y=y, generator=g, t_max=0.98, **kw)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _images(n: int, C: int = 3, H: int = 8, seed: int = 0):
    """Smooth random images in [-1, 1]: a blob per image at a random place, of a random colour."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, 1, 1, generator=g) * H
    ii, jj = torch.meshgrid(torch.arange(H), torch.arange(H), indexing="ij")
    blob = torch.exp(-((ii - centre[:, 0]) ** 2 + (jj - centre[:, 1]) ** 2) / 4.0)
    colour = 2 * torch.rand(n, C, 1, 1, generator=g) - 1
    return (blob[:, None] * colour).clamp(-1, 1)


def test_a_short_training_lowers_the_loss():
    torch.manual_seed(0)
    model = make()
    schedule = VPCosineSchedule()
    x0 = _images(16)
    g = torch.Generator().manual_seed(123)
    t, noise = 0.05 + 0.9 * torch.rand(16, generator=g), torch.randn(x0.shape, generator=g)

    def held_out_loss():
        with torch.no_grad():
            return float(diffusion_loss(model, x0, schedule, t=t, noise=noise))

    before = held_out_loss()
    assert before == pytest.approx(float(noise.square().mean()))  # zero output: the loss is E[eps^2]
    _train(model, x0, schedule, steps=25)
    assert held_out_loss() < 0.8 * before


@pytest.mark.parametrize("kind", ["class", "context"])
def test_conditioning_is_learned(kind):
    """Two classes (or two contexts) of images of opposite sign: after a few Adam steps the loss
    with the right condition is far below the loss with the two conditions swapped."""
    torch.manual_seed(1)
    model = make(n_classes=2) if kind == "class" else make(context_dim=4)
    labels = torch.arange(16) % 2
    x0 = 0.2 + 0.6 * _images(16).abs()
    x0 = torch.where(labels[:, None, None, None] == 0, x0, -x0)
    codes = torch.randn(2, 3, 4)  # one context (3 tokens) per class

    def conditioned(x, t, y):  # the context closed over, as a guidance wrapper does
        if kind == "class":
            return model(x, t, y)
        return model(x, t, context=codes[y], context_mask=torch.ones(len(y), 3, dtype=torch.bool))

    fm = FlowMatchingSchedule()
    _train(conditioned, x0, fm, steps=50, y=labels, lr=5e-3, prediction="velocity", params=model.parameters())
    g = torch.Generator().manual_seed(5)
    t, noise = 0.05 + 0.9 * torch.rand(16, generator=g), torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        right = diffusion_loss(conditioned, x0, fm, y=labels, t=t, noise=noise, prediction="velocity")
        swapped = diffusion_loss(conditioned, x0, fm, y=1 - labels, t=t, noise=noise, prediction="velocity")
    assert swapped > 1.5 * right


@pytest.mark.parametrize("changes", [{}, dict(context_dim=4, n_classes=3)])
def test_bf16_autocast_forward_and_backward(changes):
    model = perturb(make(**changes), std=0.2)
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
    # bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2 %); through a dozen layers the
    # output moves by 1-2 % of its size.
    assert float((out - want).detach().norm() / want.detach().norm()) < 0.03
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_preset_parameter_counts():
    with torch.device("meta"):
        ddpm = UNet(UNetConfig.preset("ddpm-cifar"))  # 32x32x3, unconditional
        tiny = UNet(UNetConfig.preset("tiny"))
        digits = UNet(UNetConfig.preset("tiny", in_channels=1, n_classes=10))
    # Ho et al. 2020 (Appendix B): 35.7 M parameters for the CIFAR-10 model. The exact count of the
    # architecture as built here is pinned too, so that a change to it is seen.
    assert ddpm.num_parameters() == pytest.approx(35.7e6, abs=0.1e6)
    assert ddpm.num_parameters() == 35_746_307
    assert 0.5e6 < tiny.num_parameters() <= 1.25e6
    assert 0.5e6 < digits.num_parameters() <= 1.25e6
    assert UNetConfig() == UNetConfig.preset("tiny") and set(UNET_PRESETS) >= {"tiny", "ddpm-cifar"}
    assert UNetConfig.preset("ddpm-cifar", in_channels=1).in_channels == 1


def test_clear_errors():
    model = make(n_classes=3, context_dim=4)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    ctx, mask = torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(2, 1, 8, 8), t, context=ctx)
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(2, 3, 8, 7), t, context=ctx)
    with pytest.raises(ValueError, match=r"context must have shape \[2, L, 4\]"):
        model(x, t, context=torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="needs one"):
        model(x, t)
    with pytest.raises(ValueError, match=r"y must lie in 0..3.*\[0, 4\]"):
        model(x, t, torch.tensor([0, 4]), ctx)
    with pytest.raises(ValueError, match="y must lie"):
        model(x, t, torch.tensor([-1, 0]), ctx)
    with pytest.raises(ValueError, match="integer labels"):
        model(x, t, torch.tensor([0.0, 1.0]), ctx)
    with pytest.raises(ValueError, match="context_mask must have shape"):
        model(x, t, context=ctx, context_mask=mask[:, :3])
    with pytest.raises(ValueError, match="context_mask must pad on the right"):
        model(x, t, context=ctx, context_mask=torch.tensor([[True] * 5, [True, False, True, False, False]]))
    with pytest.raises(ValueError, match="t must be a scalar"):
        model(x, torch.rand(3), context=ctx)
    plain = make()
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="no cross-attention"):
        plain(x, t, context=ctx)
    with pytest.raises(ValueError, match="norm_groups 3"):
        UNetConfig(channels=8, norm_groups=3)
    with pytest.raises(ValueError, match="attn_levels"):
        UNetConfig(channel_mult=(1, 2), attn_levels=(2,))
    with pytest.raises(ValueError, match="unknown UNet preset 'huge'"):
        UNetConfig.preset("huge")
    with pytest.raises(TypeError, match="unknown UNetConfig fields"):
        UNetConfig.preset("tiny", width=3)


# --- the fused GroupNorm+SiLU and the channels-last layout --------------------------------------------------


def _forward_backward(model, x, t, **kw):
    """Output, and the gradients of the input and of every parameter, of a scalar loss."""
    model.zero_grad()
    xi = x.clone().requires_grad_()
    out = model(xi, t, **kw)
    (out * torch.linspace(-1, 1, out.shape[-1])).square().sum().backward()
    return [out.detach(), xi.grad] + [p.grad for p in model.parameters()]


def assert_fp32_close(got: list, want: list) -> None:
    """Equal up to float32 rounding of a different summation order: within 1e-4 relative, or 1e-5 of
    the tensor's largest entry (at least 1e-5 absolute: the key biases' gradients are exactly 0 in
    exact arithmetic, so theirs are pure rounding noise of order 1e-8)."""
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("changes", [dict(scale_shift=False, dropout=0.0), dict(context_dim=4, n_classes=3)],
                         ids=["additive-time", "scale-shift-cross"])
def test_fused_norm_silu_changes_nothing_on_the_cpu(monkeypatch, changes):
    """On the CPU the fused GroupNorm+SiLU calls take the PyTorch reference, which computes what the
    unfused network did: output and every gradient bit for bit equal in fp32, and the state dict is
    the unfused network's (the nn.GroupNorm modules hold the parameters)."""
    import torch.nn.functional as F

    from stepdiff.models import unet

    model = perturb(make(**changes))
    B = 3
    x, t = torch.randn(B, 3, 8, 8), torch.rand(B)
    kw = {}
    if model.config.context_dim:
        kw = dict(y=torch.tensor([0, 1, 3]), context=torch.randn(B, 5, 4),
                  context_mask=torch.arange(5)[None] < torch.tensor([[5], [2], [1]]))
    fused = _forward_backward(model, x, t, **kw)
    calls = []

    def unfused(norm, h, backend=None):
        calls.append(norm)
        return F.silu(norm(h))

    monkeypatch.setattr(unet, "norm_silu", unfused)
    plain = _forward_backward(model, x, t, **kw)
    # Every ResBlock's first norm, the second with the additive time, and the output norm.
    per_block = 1 if model.config.scale_shift else 2
    assert len(calls) == per_block * sum(isinstance(m, ResBlock) for m in model.modules()) + 1
    for a, b in zip(fused, plain, strict=True):
        assert torch.equal(a, b)
    keys = list(model.state_dict())
    assert "down.0.0.norm1.weight" in keys and "norm_out.bias" in keys
    assert keys == list(make(**changes, norm_backend="triton", channels_last=True).state_dict())


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_triton_norm_silu_matches_the_reference(channels_last):
    """The UNet with the fused Triton GroupNorm+SiLU (the interpreter on a CPU) against the same
    weights on the PyTorch reference, fp32, at odd sizes (6x10 images, 4 and 8 channels per group):
    output and every gradient agree to float32 rounding."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    changes = dict(channels=12, norm_groups=3, scale_shift=False, attn_backend="torch")
    tri = perturb(make(**changes, norm_backend="triton", channels_last=channels_last)).to(device)
    ref = make(**changes, norm_backend="torch").to(device)
    ref.load_state_dict(tri.state_dict())
    x, t = torch.randn(2, 3, 6, 10, device=device), torch.rand(2, device=device)
    got, want = _forward_backward(tri, x, t), _forward_backward(ref, x, t)
    assert want[0].abs().max() > 0.1  # the perturbed network carries signal
    assert_fp32_close(got, want)


def test_channels_last_option():
    """channels_last=True stores the convolution weights and runs every activation in channels-last
    format, gives the output back in the input's layout, and equals the NCHW network to fp32
    rounding (values and gradients); set_channels_last switches either way in place."""
    ref = perturb(make(context_dim=4))
    cl = make(context_dim=4, channels_last=True)
    cl.load_state_dict(ref.state_dict())
    convs = [m for m in cl.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    layouts = []
    hooks = [m.register_forward_hook(lambda m, i, o: layouts.append(
        o.is_contiguous(memory_format=torch.channels_last) and not o.is_contiguous())) for m in convs]
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    kw = dict(context=torch.randn(2, 5, 4), context_mask=torch.arange(5)[None] < torch.tensor([[5], [3]]))
    got, want = _forward_backward(cl, x, t, **kw), _forward_backward(ref, x, t, **kw)
    assert len(layouts) >= len(convs) and all(layouts)
    for h in hooks:
        h.remove()
    assert got[0].is_contiguous()  # NCHW in, NCHW out
    assert_fp32_close(got, want)
    out = cl(x.contiguous(memory_format=torch.channels_last), t, **kw)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    params = list(cl.parameters())
    assert cl.set_channels_last(False) is cl and list(cl.parameters()) == params  # the same objects
    assert all(m.weight.is_contiguous() for m in convs) and cl.channels_last is False
    torch.testing.assert_close(cl(x, t, **kw), want[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="enabled must be True or False"):
        cl.set_channels_last("yes")


def test_backend_settings_are_checked():
    with pytest.raises(ValueError, match="norm_backend must be one of"):
        UNetConfig(norm_backend="cuda")
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        UNetConfig(attn_backend="flash")
    with pytest.raises(ValueError, match="channels_last must be True or False"):
        UNetConfig(channels_last=1)
    assert UNetConfig(attn_backend="sdpa").attn_backend == "sdpa"
