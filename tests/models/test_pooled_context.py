"""The pooled caption in the time embedding (``pooled_context``), for the UNet and the DiT: the
layer against a float64 reference, switched off at initialisation, a path to every block that does
not go through cross-attention, padding-blind, learned, and its errors."""

from __future__ import annotations

import pytest
import torch

from stepdiff.config import ConfigError, build_model, load_config, resolve, set_value
from stepdiff.models import DiT, DiTConfig, UNet, UNetConfig
from stepdiff.models.layers import PooledContext
from stepdiff.schedules import FlowMatchingSchedule
from stepdiff.train import diffusion_loss

from .test_unet import _images, _one_thread, contexts, perturb  # noqa: F401 (_one_thread: autouse fixture)

UNET = dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), heads=2, norm_groups=4)
DIT = dict(hidden=16, depth=2, heads=2, patch_size=2, freq_dim=16)
D_CTX = 5


def make(arch: str, seed: int = 0, **changes):
    cls, config, base = (UNet, UNetConfig, UNET) if arch == "unet" else (DiT, DiTConfig, DIT)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return cls(config(**{**base, "context_dim": D_CTX, **changes}))


def test_pooled_layer_matches_a_float64_reference():
    """W (sum_l m_l c_l / sum_l m_l) + b, row by row, with odd sizes and one row all real."""
    torch.manual_seed(0)
    layer = PooledContext(7, 11)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    lengths = [1, 4, 9]
    context, mask = contexts(3, 9, 7, lengths, seed=3)
    out = layer(context, mask)
    W, b = layer.weight.double(), layer.bias.double()
    for row, n in enumerate(lengths):
        mean = context[row, :n].double().mean(0)
        torch.testing.assert_close(out[row].double(), W @ mean + b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(context[2:], None), out[2:], rtol=1e-6, atol=1e-6)  # no mask: all real
    assert out.dtype == torch.float32


def test_pooled_layer_is_zero_and_draws_no_random_numbers():
    state = torch.random.get_rng_state()
    layer = PooledContext(4, 6)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not layer.weight.any() and not layer.bias.any()
    assert not layer(torch.randn(2, 3, 4), None).any()


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_switched_off_at_initialisation(arch):
    """Same seed, with and without the option: the same other weights, and (with every zero-initialised
    weight given values) the same outputs, bit for bit, until the new layer moves."""
    off, on = make(arch), make(arch, pooled_context=True)
    s_off, s_on = off.state_dict(), on.state_dict()
    assert set(s_on) - set(s_off) == {"pooled.weight", "pooled.bias"}
    assert all(torch.equal(s_off[k], s_on[k]) for k in s_off)
    perturb(off, seed=1)
    on.load_state_dict({**off.state_dict(), "pooled.weight": on.pooled.weight, "pooled.bias": on.pooled.bias})
    x, t = torch.randn(3, 3, 8, 8), torch.rand(3)
    context, mask = contexts(3, 6, D_CTX, [6, 2, 4])
    assert torch.equal(off(x, t, context=context, context_mask=mask), on(x, t, context=context, context_mask=mask))
    with torch.no_grad():
        on.pooled.weight.normal_()
    assert not torch.allclose(off(x, t, context=context, context_mask=mask),
                              on(x, t, context=context, context_mask=mask))


def _cross_attention_off(model):
    """Zero every cross-attention output projection: the context's only way in is then the pool."""
    n = 0
    for m in model.modules():
        cross = getattr(m, "cross", None)
        if cross is not None:
            for p in cross.to_out.parameters():
                torch.nn.init.zeros_(p)
            n += 1
    assert n > 0
    return model


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_the_caption_reaches_the_blocks_without_cross_attention(arch):
    """With cross-attention silenced, a model without the pool ignores the caption entirely; with it,
    two captions give two different outputs (the pool is a second path, through the time embedding)."""
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    a, mask = contexts(2, 4, D_CTX, [4, 3], seed=1)
    b, _ = contexts(2, 4, D_CTX, [4, 3], seed=2)
    for pooled in (False, True):
        model = _cross_attention_off(perturb(make(arch, pooled_context=pooled), seed=4))
        if pooled:
            with torch.no_grad():
                model.pooled.weight.normal_(std=0.3)
        out_a = model(x, t, context=a, context_mask=mask)
        out_b = model(x, t, context=b, context_mask=mask)
        assert torch.equal(out_a, out_b) != pooled


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_padding_changes_nothing(arch):
    """Padding tokens (filled with large garbage) change neither output nor gradient: the mean is
    over the real tokens only."""
    model = perturb(make(arch, pooled_context=True), seed=2).double()
    with torch.no_grad():
        model.pooled.weight.normal_(std=0.3)
    lengths = [2, 5, 1]
    x, t = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    context, mask = contexts(3, 5, D_CTX, lengths)
    context = torch.where(mask[:, :, None], context, 1e3 * torch.randn(3, 5, D_CTX)).double()
    out = model(x, t, context=context, context_mask=mask)
    for row, n in enumerate(lengths):
        alone = model(x[row:row + 1], t[row:row + 1], context=context[row:row + 1, :n])
        torch.testing.assert_close(out[row:row + 1], alone, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_the_pool_is_learned(arch):
    """Two captions for images of opposite sign, cross-attention kept silent: only the pool can tell
    them apart, and after a few Adam steps the loss with the right caption is far below the swapped."""
    torch.manual_seed(1)
    model = make(arch, pooled_context=True)
    cross = [p for m in model.modules() if getattr(m, "cross", None) is not None for p in m.cross.parameters()]
    frozen = {id(p) for p in cross}
    _cross_attention_off(model)
    labels = torch.arange(16) % 2
    x0 = 0.2 + 0.6 * _images(16).abs()
    x0 = torch.where(labels[:, None, None, None] == 0, x0, -x0)
    codes = torch.randn(2, 3, D_CTX)

    def conditioned(x, t, y):
        return model(x, t, context=codes[y], context_mask=torch.ones(len(y), 3, dtype=torch.bool))

    fm = FlowMatchingSchedule()
    params = [p for p in model.parameters() if id(p) not in frozen]
    opt = torch.optim.Adam(params, lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss = diffusion_loss(conditioned, x0, fm, y=labels, generator=g, t_max=0.98, prediction="velocity")
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.pooled.weight.abs().max() > 0
    g = torch.Generator().manual_seed(5)
    t, noise = 0.05 + 0.9 * torch.rand(16, generator=g), torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        right = diffusion_loss(conditioned, x0, fm, y=labels, t=t, noise=noise, prediction="velocity")
        swapped = diffusion_loss(conditioned, x0, fm, y=1 - labels, t=t, noise=noise, prediction="velocity")
    assert swapped > 1.5 * right


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_bf16_autocast(arch):
    model = perturb(make(arch, pooled_context=True), seed=3, std=0.2)
    with torch.no_grad():
        model.pooled.weight.normal_(std=0.3)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    context, mask = contexts(2, 4, D_CTX, [4, 1])
    want = model(x, t, context=context, context_mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, context=context, context_mask=mask)
        out.square().mean().backward()
    assert out.dtype == torch.float32
    assert float((out - want).detach().norm() / want.detach().norm()) < 0.03  # bf16: 8 significant bits
    assert model.pooled.weight.grad is not None and torch.isfinite(model.pooled.weight.grad).all()


@pytest.mark.parametrize("config", [UNetConfig, DiTConfig])
def test_errors_name_the_option(config):
    with pytest.raises(ValueError, match="pooled_context .*context_dim > 0"):
        config(pooled_context=True)
    with pytest.raises(ValueError, match="pooled_context must be True or False"):
        config(context_dim=4, pooled_context=1)


def _config(name: str, *assignments: str) -> dict:
    raw = load_config(name)
    for a in assignments:
        raw = set_value(raw, a)
    return resolve(raw)


def test_the_configuration_option():
    """``[model] pooled_context = true`` builds the text-conditioned UNet with the pool; a model with no
    caption to pool is a configuration error naming the table."""
    model = build_model(_config("shapes-pixel-t2i", "model.pooled_context=true"))
    unet = model.denoiser
    assert unet.config.pooled_context
    assert unet.pooled.weight.shape == (4 * unet.config.channels, unet.config.context_dim)
    assert build_model(_config("shapes-pixel-t2i")).denoiser.pooled is None  # the committed models: off
    with pytest.raises(ConfigError, match=r"\[model\].*pooled_context"):
        build_model(_config("digits-unet", "model.pooled_context=true"))


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_a_pool_that_starts_on(arch):
    """``pooled_gain = g``: W starts N(0, g^2 / D_c), drawn after every other weight, so those stay as the
    seed draws them without the pool; the caption then changes the output from the first step."""
    off, on = make(arch), make(arch, pooled_context=True, pooled_gain=2.0)
    s_off, s_on = off.state_dict(), on.state_dict()
    assert all(torch.equal(s_off[k], s_on[k]) for k in s_off)
    layer = PooledContext(400, 300, gain=2.0)
    assert float(layer.weight.detach().std()) == pytest.approx(2.0 / 400**0.5, rel=0.02)
    assert not layer.bias.any()
    perturb(off, seed=1)
    on.load_state_dict({**off.state_dict(), "pooled.weight": on.pooled.weight, "pooled.bias": on.pooled.bias})
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    context, mask = contexts(2, 4, D_CTX, [4, 2])
    assert not torch.allclose(off(x, t, context=context, context_mask=mask),
                              on(x, t, context=context, context_mask=mask))


@pytest.mark.parametrize("config", [UNetConfig, DiTConfig])
def test_gain_errors_name_the_option(config):
    with pytest.raises(ValueError, match="pooled_gain must be a number >= 0"):
        config(context_dim=4, pooled_context=True, pooled_gain=-1.0)
    with pytest.raises(ValueError, match="pooled_gain .*needs pooled_context"):
        config(context_dim=4, pooled_gain=1.0)
    with pytest.raises(ValueError, match="gain must be a number >= 0"):
        PooledContext(4, 4, gain=float("nan"))


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_a_caption_by_the_pool_alone(arch):
    """``cross_attention = False``: no cross-attention layer is built, the caption still steers the output
    through the pool, and only its real tokens count."""
    model = make(arch, pooled_context=True, pooled_gain=1.0, cross_attention=False)
    assert all(getattr(m, "cross", None) is None for m in model.modules())
    assert not any("cross" in k for k in model.state_dict())
    perturb(model, seed=5)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    a, mask = contexts(2, 4, D_CTX, [4, 2], seed=1)
    b, _ = contexts(2, 4, D_CTX, [4, 2], seed=2)
    out_a = model(x, t, context=a, context_mask=mask)
    assert not torch.allclose(out_a, model(x, t, context=b, context_mask=mask))
    padded = torch.where(mask[:, :, None], a, 1e3 * torch.randn(2, 4, D_CTX))
    torch.testing.assert_close(model(x, t, context=padded, context_mask=mask), out_a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [UNetConfig, DiTConfig])
def test_cross_attention_errors_name_the_option(config):
    with pytest.raises(ValueError, match="cross_attention = False .*needs pooled_context"):
        config(context_dim=4, cross_attention=False)
    with pytest.raises(ValueError, match="cross_attention must be True or False"):
        config(context_dim=4, pooled_context=True, cross_attention="no")
