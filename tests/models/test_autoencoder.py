"""Tests for stepdiff.models.autoencoder: the round trip (latent shapes 4x and 2x down, decode of
encode), the posterior's KL, the loss and its parts, the scale factor (unit-variance latents,
stored in the state_dict), PSNR, errors for sizes the downsampling does not divide, and a short
training run whose held-out PSNR rises."""

from __future__ import annotations

import math

import pytest
import torch

from stepdiff.models.autoencoder import (
    Autoencoder,
    AutoencoderConfig,
    DiagonalGaussian,
    autoencoder_loss,
    psnr,
)
from stepdiff.shapes import make_shapes
from stepdiff.train import train


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one intra-op thread avoids the workers' synchronisation on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(seed: int = 0, **kw) -> Autoencoder:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Autoencoder(AutoencoderConfig.preset("tiny", **kw))


@pytest.mark.parametrize(
    ("preset", "size", "latent"),
    [("tiny", (32, 32), (4, 8, 8)), ("tiny", (20, 12), (4, 5, 3)), ("f2", (16, 16), (4, 8, 8)),
     ("f4", (32, 32), (4, 8, 8))],
)
def test_round_trip_shapes(preset, size, latent):
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig.preset(preset))
    assert ae.factor == (2 if preset == "f2" else 4)
    x = torch.rand(2, 3, *size) * 2 - 1
    post = ae.encode(x)
    assert post.mean.shape == post.logvar.shape == (2, *latent)
    assert ae.latent_shape(*size) == latent
    z = post.sample(torch.Generator().manual_seed(0))
    assert z.shape == (2, *latent)
    assert ae.decode(z).shape == x.shape
    recon, post2 = ae(x, torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and torch.equal(post2.mean, post.mean)
    assert ae.decode_latents(ae.encode_latents(x)).shape == x.shape


def test_sizes_not_divisible_by_the_downsampling_are_refused():
    ae = tiny()
    for size in ((30, 32), (32, 18), (2, 4)):
        with pytest.raises(ValueError, match=r"not divisible by the autoencoder's downsampling factor 4"):
            ae.encode(torch.zeros(1, 3, *size))
    with pytest.raises(ValueError, match="factor 2"):
        Autoencoder(AutoencoderConfig.preset("f2", channels=8, norm_groups=4)).encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"x must be a float image batch \[B, 3, H, W\]"):
        ae.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"z must be a float latent batch \[B, 4, h, w\]"):
        ae.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="norm_groups"):
        AutoencoderConfig(channels=12)
    with pytest.raises(ValueError, match="kl_weight"):
        AutoencoderConfig(kl_weight=-1.0)
    with pytest.raises(ValueError, match="unknown autoencoder preset"):
        AutoencoderConfig.preset("f8")
    with pytest.raises(ValueError, match="unconditional"):
        autoencoder_loss(ae, torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))


def test_posterior_kl_and_sampling():
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    logvar = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    post = DiagonalGaussian(mean, logvar)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    assert torch.allclose(post.kl(), torch.distributions.kl_divergence(q, p).flatten(1).sum(1), atol=1e-12)
    draws = torch.stack([post.sample(g) for _ in range(4000)])
    assert torch.allclose(draws.mean(0), mean, atol=5 * float(post.std.max()) / math.sqrt(4000))
    assert torch.allclose(draws.std(0) / post.std, torch.ones_like(mean), atol=0.1)
    assert torch.equal(post.mode(), mean)
    # The clamp of the log-variance keeps a wild encoder finite.
    assert torch.isfinite(DiagonalGaussian(mean, torch.full_like(mean, 1e4)).kl()).all()


def test_loss_is_l1_plus_weighted_kl():
    ae = tiny(1, kl_weight=0.01)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    total, parts = ae.loss(x, torch.Generator().manual_seed(2))
    recon, post = ae(x, torch.Generator().manual_seed(2))
    l1 = (recon - x).abs().flatten(1).sum(1)
    want = (l1 + 0.01 * post.kl()).mean() / x[0].numel()
    assert torch.allclose(total, want, rtol=1e-5)
    assert abs(parts["l1"] - float(l1.detach().mean()) / x[0].numel()) < 1e-6
    assert abs(parts["kl"] - float(post.kl().detach().mean())) < 1e-3
    assert torch.allclose(autoencoder_loss(ae, x, None, torch.Generator().manual_seed(2)), total)
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ae.parameters())


def test_scale_factor_gives_unit_variance_latents_and_travels_in_the_state_dict():
    ae = tiny(2)
    x = make_shapes(48, seed=3, size=16, masks=False).images
    assert float(ae.scale_factor) == 1.0
    raw_std = float(ae.encode(x).mean.double().std())
    s = ae.fit_scale_factor(x, batch_size=20)
    assert abs(s - 1 / raw_std) < 1e-6 * s
    z = ae.encode_latents(x)
    assert abs(float(z.double().std()) - 1.0) < 1e-5
    # Stored with the weights.
    other = tiny(3)
    other.load_state_dict(ae.state_dict())
    assert float(other.scale_factor) == pytest.approx(s)
    # decode_latents undoes the scaling: the same images as decoding the posterior mean.
    with torch.no_grad():
        assert torch.allclose(ae.decode_latents(z), ae.decode(ae.encode(x).mean).clamp(-1, 1), atol=1e-5)
        assert torch.allclose(ae.reconstruct(x, batch_size=7), ae.decode(ae.encode(x).mean).clamp(-1, 1), atol=1e-5)
    # With draws instead of means the scale is close (the posterior is narrow next to the latents' spread).
    s_sample = ae.fit_scale_factor(x, sample=True, generator=torch.Generator().manual_seed(0))
    assert 0.3 * s < s_sample <= 1.0001 * s


def test_psnr_known_values():
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[0] += 0.1
    y[1] += 0.02
    got = psnr(y, x)
    assert torch.allclose(got, torch.tensor([10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.0004)],
                                            dtype=torch.float64))
    assert psnr(y, x, data_range=1.0)[0] == pytest.approx(10 * math.log10(1 / 0.01))
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, x[:1])


def test_short_training_raises_heldout_psnr():
    """80 steps through stepdiff.train.train with autoencoder_loss on 16x16 shapes (4x4x4 latents):
    held-out reconstruction PSNR rises by more than 2 dB."""
    data = make_shapes(512, seed=0, size=16, masks=False).images
    held = make_shapes(64, seed=1, size=16, masks=False).images
    ae = tiny(4)
    before = float(psnr(ae.reconstruct(held), held).mean())
    result = train(ae, data, loss_fn=autoencoder_loss, steps=80, batch_size=16, lr=3e-3, seed=0)
    after = float(psnr(result.model.reconstruct(held), held).mean())
    assert after > before + 2.0, (before, after)
    assert result.losses[-1] < result.losses[0]


class _Wrapped(torch.nn.Module):
    """Stands in for DistributedDataParallel: it exposes forward and .module only."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_autoencoder_loss_goes_through_forward_so_a_ddp_wrapper_works():
    ae = tiny(5, kl_weight=0.1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    a = autoencoder_loss(_Wrapped(ae), x, None, torch.Generator().manual_seed(1))
    b = autoencoder_loss(ae, x, None, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.equal(b, ae.loss(x, torch.Generator().manual_seed(1))[0])
