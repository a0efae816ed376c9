"""Tests for stepdiff.models.vae: the ELBO's two terms against closed forms for a linear-Gaussian VAE
(the KL of two Gaussians, the expected reconstruction log-likelihood, the marginal likelihood,
the ELBO gap as the KL to the exact posterior, and an ELBO equal to log p(x) when the encoder is
the exact posterior); the discretised likelihood (a distribution over the levels, its far tails
against high precision, finite gradients); bits per dimension; errors; and a short training run
on 8x8 digits whose held-out bound falls."""

from __future__ import annotations

import math

import pytest
import torch

from stepdiff.image_data import load_digits
from stepdiff.models.vae import (
    VAE,
    VAEConfig,
    bits_per_dim,
    discretised_gaussian_log_prob,
    gaussian_kl,
    vae_loss,
)
from stepdiff.train import train

f64 = torch.float64
SIDE, K, SIGMA = 3, 2, 0.4  # D = 9 pixels, a 2-D latent, decoder sigma
D = SIDE * SIDE


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one intra-op thread avoids the workers' synchronisation on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- the linear-Gaussian model and its closed forms -------------------------------------------


def decoder_params(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W = Q diag(d) with orthonormal columns Q, so W^T W is diagonal and the exact posterior of
    the linear-Gaussian model is a diagonal Gaussian (an encoder of the VAE can equal it)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, K, generator=g, dtype=f64))
    d = torch.tensor([1.3, 0.6], dtype=f64)
    return q * d, 0.3 * torch.randn(D, generator=g, dtype=f64)


def linear_vae(W, b, A, c, logvar) -> VAE:
    """p(z) = N(0, I), p(x|z) = N(Wz + b, SIGMA^2 I), q(z|x) = N(Ax + c, diag(exp(logvar)))."""
    vae = VAE(VAEConfig(in_channels=1, image_size=SIDE, latent_dim=K, hidden=(), likelihood="gaussian",
                        decoder_std=SIGMA)).double()
    with torch.no_grad():
        vae.decoder[0].weight.copy_(W)
        vae.decoder[0].bias.copy_(b)
        vae.encoder[0].weight.copy_(torch.cat([A, torch.zeros(K, D, dtype=f64)]))
        vae.encoder[0].bias.copy_(torch.cat([c, logvar]))
    return vae


def exact_posterior(W, b):
    """The posterior N(A x + c, S) of the linear-Gaussian model: S = (I + W^T W / sigma^2)^-1,
    A = S W^T / sigma^2, c = -A b."""
    S = torch.linalg.inv(torch.eye(K, dtype=f64) + W.T @ W / SIGMA**2)
    A = S @ W.T / SIGMA**2
    return A, -A @ b, S


def closed_kl(mu, var):
    return 0.5 * (mu.square() + var - 1 - var.log()).sum(-1)


def closed_reconstruction(x, mu, var, W, b):
    """E_{z ~ N(mu, diag var)} log N(x; Wz + b, sigma^2 I)
    = -D/2 log(2 pi sigma^2) - (|x - W mu - b|^2 + sum_j var_j |W_:j|^2) / (2 sigma^2)."""
    r = x - mu @ W.T - b
    trace = (var * W.square().sum(0)).sum(-1)
    return -0.5 * D * math.log(2 * math.pi * SIGMA**2) - (r.square().sum(-1) + trace) / (2 * SIGMA**2)


def marginal(x, W, b):
    """log p(x) = log N(x; b, W W^T + sigma^2 I)."""
    cov = W @ W.T + SIGMA**2 * torch.eye(D, dtype=f64)
    return torch.distributions.MultivariateNormal(b, cov).log_prob(x)


def kl_diag(mu_q, var_q, mu_p, var_p):
    return 0.5 * (var_q / var_p + (mu_q - mu_p).square() / var_p - 1 + var_p.log() - var_q.log()).sum(-1)


def data(n: int = 4, seed: int = 1):
    W, b = decoder_params()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, K, generator=g, dtype=f64) @ W.T + b + SIGMA * torch.randn(n, D, generator=g, dtype=f64)
    return x, W, b


def random_encoder(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return (0.5 * torch.randn(K, D, generator=g, dtype=f64), 0.2 * torch.randn(K, generator=g, dtype=f64),
            torch.tensor([-1.0, -0.3], dtype=f64))


def test_kl_term_is_the_closed_form_kl_of_two_gaussians():
    x, W, b = data()
    A, c, logvar = random_encoder()
    vae = linear_vae(W, b, A, c, logvar)
    terms = vae.elbo(x.reshape(-1, 1, SIDE, SIDE), generator=torch.Generator().manual_seed(0))
    mu = x @ A.T + c
    assert torch.allclose(terms.kl, closed_kl(mu, logvar.exp().expand_as(mu)), rtol=0, atol=1e-12)
    # ... and the KL of torch.distributions.
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    ref = torch.distributions.kl_divergence(q, p).sum(-1)
    assert torch.allclose(gaussian_kl(mu, logvar.expand_as(mu)), ref, atol=1e-12)


def test_decoder_log_likelihood_is_the_gaussian_density():
    x, W, b = data()
    vae = linear_vae(W, b, *random_encoder())
    z = torch.randn(5, x.shape[0], K, generator=torch.Generator().manual_seed(3), dtype=f64)
    got = vae.log_likelihood(x.reshape(-1, 1, SIDE, SIDE), z)
    ref = torch.distributions.MultivariateNormal(z @ W.T + b, SIGMA**2 * torch.eye(D, dtype=f64)).log_prob(x)
    assert got.shape == (5, x.shape[0]) and torch.allclose(got, ref, atol=1e-10)


def test_reconstruction_term_matches_the_closed_form_expectation():
    x, W, b = data()
    A, c, logvar = random_encoder()
    vae = linear_vae(W, b, A, c, logvar)
    xi = x.reshape(-1, 1, SIDE, SIDE)
    S = 20000
    mu = x @ A.T + c
    want = closed_reconstruction(x, mu, logvar.exp().expand_as(mu), W, b)
    got = vae.elbo(xi, samples=S, generator=torch.Generator().manual_seed(4)).reconstruction
    # The Monte Carlo error, from the spread of independent draws.
    z = vae.reparameterise(mu, logvar.expand_as(mu), S, torch.Generator().manual_seed(5))
    se = vae.log_likelihood(xi, z).std(0) / math.sqrt(S)
    assert ((got - want).abs() < 5 * se).all(), (got - want, se)
    assert (se < 0.1).all()  # the check has power: errors of a tenth of a nat would show


def test_elbo_gap_is_the_kl_to_the_exact_posterior():
    """For any Gaussian q: E_q log p(x|z) - KL(q || p(z)) = log p(x) - KL(q || p(z|x)) (closed forms)."""
    x, W, b = data(6)
    A_star, c_star, S_star = exact_posterior(W, b)
    assert torch.allclose(S_star, torch.diag(torch.diagonal(S_star)), atol=1e-12)  # diagonal, by the choice of W
    A, c, logvar = random_encoder()
    mu, var = x @ A.T + c, logvar.exp().expand(x.shape[0], K)
    elbo = closed_reconstruction(x, mu, var, W, b) - closed_kl(mu, var)
    gap = kl_diag(mu, var, x @ A_star.T + c_star, torch.diagonal(S_star).expand(x.shape[0], K))
    assert torch.allclose(elbo, marginal(x, W, b) - gap, atol=1e-10)
    assert (gap > 1e-3).all()
    # The model's bound sits below log p(x) by that gap, up to its Monte Carlo error.
    vae = linear_vae(W, b, A, c, logvar)
    mc = vae.elbo(x.reshape(-1, 1, SIDE, SIDE), samples=20000, generator=torch.Generator().manual_seed(6)).elbo
    assert torch.allclose(mc, elbo, atol=0.05)
    # With an encoder near the posterior, the importance-weighted bound closes most of the gap.
    g = torch.Generator().manual_seed(7)
    A2 = A_star + 0.1 * torch.randn(K, D, generator=g, dtype=f64)
    logvar2 = torch.diagonal(S_star).log() + 0.3
    mu2, var2 = x @ A2.T + c_star, logvar2.exp().expand(x.shape[0], K)
    elbo2 = closed_reconstruction(x, mu2, var2, W, b) - closed_kl(mu2, var2)
    near = linear_vae(W, b, A2, c_star, logvar2)
    iw = near.iwae_bound(x.reshape(-1, 1, SIDE, SIDE), 4000, g)
    gap2 = marginal(x, W, b) - elbo2
    assert (gap2 > 0.01).all()
    assert ((marginal(x, W, b) - iw).abs() < 0.2 * gap2).all(), (marginal(x, W, b) - iw, gap2)


def test_exact_posterior_encoder_makes_the_elbo_the_marginal_likelihood():
    x, W, b = data(5)
    A, c, S = exact_posterior(W, b)
    vae = linear_vae(W, b, A, c, torch.diagonal(S).log())
    xi = x.reshape(-1, 1, SIDE, SIDE)
    log_px = marginal(x, W, b)
    # Closed forms: reconstruction minus KL equals log p(x).
    mu, var = x @ A.T + c, torch.diagonal(S).expand(x.shape[0], K)
    assert torch.allclose(closed_reconstruction(x, mu, var, W, b) - closed_kl(mu, var), log_px, atol=1e-10)
    # The model's KL term is that closed form, and every importance weight is log p(x) exactly:
    # log p(x|z) + log p(z) - log q(z|x) = log p(x) for every z when q is the posterior.
    terms = vae.elbo(xi, samples=4000, generator=torch.Generator().manual_seed(8))
    assert torch.allclose(terms.kl, closed_kl(mu, var), atol=1e-12)
    lw = vae.log_weights(xi, 50, torch.Generator().manual_seed(9))
    assert torch.allclose(lw, log_px.expand_as(lw), atol=1e-9)
    assert torch.allclose(vae.iwae_bound(xi, 7), log_px, atol=1e-9)
    # The Monte Carlo ELBO agrees within its error.
    assert torch.allclose(terms.elbo, log_px, atol=0.05)
    # Any other encoder does worse (closed forms).
    A2, c2, logvar2 = random_encoder()
    mu2, var2 = x @ A2.T + c2, logvar2.exp().expand(x.shape[0], K)
    assert (closed_reconstruction(x, mu2, var2, W, b) - closed_kl(mu2, var2) < log_px - 1e-3).all()


def test_reparameterised_gradient_matches_the_closed_form_gradient():
    """d/d(mu) of the reconstruction estimate is unbiased: its mean over many draws is the gradient
    of the closed form."""
    x, W, b = data(1)
    A, c, logvar = random_encoder()
    vae = linear_vae(W, b, A, c, logvar)
    xi = x.reshape(-1, 1, SIDE, SIDE)
    torch.manual_seed(0)
    rec = vae.elbo(xi, samples=20000, generator=torch.Generator().manual_seed(10)).reconstruction.sum()
    (g_mc,) = torch.autograd.grad(rec, vae.encoder[0].bias)
    bias = torch.cat([c, logvar]).requires_grad_(True)
    mu = x @ A.T + bias[:K]
    closed = closed_reconstruction(x, mu, bias[K:].exp().expand_as(mu), W, b).sum()
    (g_cf,) = torch.autograd.grad(closed, bias)
    assert torch.allclose(g_mc, g_cf, atol=0.05 * float(g_cf.abs().max())), (g_mc, g_cf)


# --- the discretised likelihood ---------------------------------------------------------------


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_discretised_likelihood_is_a_distribution_over_the_levels(levels):
    g = torch.Generator().manual_seed(levels)
    grid = -1 + 2 * torch.arange(levels, dtype=f64) / (levels - 1)
    mean = torch.randn(6, 1, generator=g, dtype=f64) * 1.5
    log_std = torch.tensor([[-6.0], [-3.0], [-1.0], [0.0], [1.0], [-2.0]], dtype=f64)
    lp = discretised_gaussian_log_prob(grid.expand(6, -1), mean, log_std, levels)
    assert torch.allclose(lp.exp().sum(1), torch.ones(6, dtype=f64), atol=1e-10)
    # Interior bins are Phi differences.
    half = 1 / (levels - 1)
    nd = torch.special.ndtr
    sd = log_std.exp()
    ref = nd((grid + half - mean) / sd) - nd((grid - half - mean) / sd)
    ref[:, 0] = nd((grid[0] + half - mean[:, 0]) / sd[:, 0])
    ref[:, -1] = 1 - nd((grid[-1] - half - mean[:, 0]) / sd[:, 0])
    assert torch.allclose(lp.exp(), ref, atol=1e-12)


def test_discretised_likelihood_far_tails_against_high_precision():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 60
    levels = 17
    half = 1 / 16
    cases = [(0.5, -0.9, -3.0), (-0.75, 0.8, -3.5), (0.25, 0.0, -4.0), (0.125, -0.5, -2.5)]  # x, mean, log_std
    wants = []
    for x, m, ls in cases:
        s = mpmath.e**ls
        want = float(mpmath.log(mpmath.ncdf((x + half - m) / s) - mpmath.ncdf((x - half - m) / s)))
        wants.append(want)
        for dtype, tol in ((f64, 1e-9), (torch.float32, 1e-4)):
            got = discretised_gaussian_log_prob(torch.tensor([x], dtype=dtype), torch.tensor([m], dtype=dtype),
                                                torch.tensor([ls], dtype=dtype), levels)
            assert abs(float(got) - want) <= tol * abs(want), (x, m, ls, dtype, float(got), want)
    assert min(wants) < -100 and max(wants) < -20  # really in the tails


def test_discretised_likelihood_gradients_are_finite_everywhere():
    levels = 17
    grid = -1 + 2 * torch.arange(levels, dtype=torch.float32) / (levels - 1)
    x = grid.repeat(5)
    mean = torch.linspace(-3, 3, x.numel()).requires_grad_(True)
    log_std = torch.linspace(-8, 2, x.numel()).requires_grad_(True)
    lp = discretised_gaussian_log_prob(x, mean, log_std, levels)
    lp.sum().backward()
    assert torch.isfinite(lp).all() and (lp <= 0).all()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_std.grad).all()


def test_bits_per_dim_conversions():
    ll = torch.tensor([-64 * math.log(2.0), -128 * math.log(2.0)])
    assert torch.allclose(bits_per_dim(ll, 64), torch.tensor([1.0, 2.0]))
    # A density on [-1, 1] of 8-bit data: + log2(127.5) bits per dimension... minus log2 of the bin.
    dens = torch.tensor([0.0])
    assert torch.allclose(bits_per_dim(dens, 10, bin_width=2 / 255), torch.tensor([math.log2(127.5)]))
    with pytest.raises(ValueError, match="dims"):
        bits_per_dim(ll, 0)
    with pytest.raises(ValueError, match="bin_width"):
        bits_per_dim(ll, 4, bin_width=0.0)


def test_model_bits_per_dim_is_the_negative_elbo_over_d_ln2():
    """A decoder that ignores z (zero weights) and a zero-KL encoder (q = N(0, I)): the bound is the
    decoder's discretised log-probability exactly, whatever z is drawn, and costs more than 0 bits."""
    vae = VAE(VAEConfig(hidden=(), latent_dim=2))
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        vae.decoder[0].bias.copy_(torch.linspace(-0.5, 0.5, 64))
        vae.log_std.fill_(-1.0)
    x = load_digits("heldout").images[:10]
    bpd = vae.bits_per_dim(x, generator=torch.Generator().manual_seed(0))
    lp = discretised_gaussian_log_prob(x.flatten(1), torch.linspace(-0.5, 0.5, 64), torch.full((64,), -1.0), 17)
    assert torch.allclose(bpd, -lp.sum(1) / (64 * math.log(2)), atol=1e-5)
    assert (bpd > 0).all()


# --- the model around it ----------------------------------------------------------------------


def test_shapes_sampling_and_determinism():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(hidden=(32,), latent_dim=4))
    x = load_digits("heldout").images[:7]
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (7, 4)
    assert vae.decode(mean).shape == (7, 1, 8, 8)
    terms = vae.elbo(x, samples=3)
    assert terms.reconstruction.shape == terms.kl.shape == terms.elbo.shape == (7,)
    assert (terms.kl >= 0).all() and (terms.reconstruction <= 0).all()  # discrete probabilities
    s1 = vae.sample(5, torch.Generator().manual_seed(1))
    s2 = vae.sample(5, torch.Generator().manual_seed(1))
    assert s1.shape == (5, 1, 8, 8) and torch.equal(s1, s2) and s1.abs().max() <= 1
    assert vae.reconstruct(x).shape == x.shape
    assert vae.log_weights(x, 4).shape == (4, 7)


def test_errors():
    with pytest.raises(ValueError, match="likelihood"):
        VAEConfig(likelihood="bernoulli")
    with pytest.raises(ValueError, match="levels"):
        VAEConfig(levels=1)
    with pytest.raises(ValueError, match="decoder_std"):
        VAEConfig(decoder_std=0.0)
    with pytest.raises(ValueError, match="hidden"):
        VAEConfig(hidden=(0,))
    vae = VAE(VAEConfig(hidden=(8,), latent_dim=2))
    with pytest.raises(ValueError, match=r"x must be a float image batch \[B, 1, 8, 8\]"):
        vae.elbo(torch.zeros(2, 1, 16, 16))
    # Off the 17-level grid: the discretised bound would be meaningless.
    off = load_digits("heldout", size=16).images[:2]
    off = off[:, :, ::2, ::2].contiguous()
    assert ((off + 1) * 8 - ((off + 1) * 8).round()).abs().max() > 1e-3
    with pytest.raises(ValueError, match="levels=17"):
        vae.elbo(off)
    with pytest.raises(ValueError, match="samples"):
        vae.elbo(load_digits("heldout").images[:2], samples=0)
    with pytest.raises(ValueError, match="unconditional"):
        vae_loss(vae, load_digits("heldout").images[:2], torch.zeros(2, dtype=torch.long))
    gauss = VAE(VAEConfig(hidden=(8,), latent_dim=2, likelihood="gaussian", decoder_std=0.1))
    with pytest.raises(ValueError, match="discretised"):
        gauss.bits_per_dim(load_digits("heldout").images[:2])
    with pytest.raises(ValueError, match="n must be"):
        vae.sample(0)


def test_short_training_on_digits_improves_the_heldout_bound():
    """300 steps through stepdiff.train.train with the negative ELBO as its loss_fn: the held-out
    bound falls by more than a bit per dimension (from about log2(17) = 4.1 bits at the start)."""
    train_x = load_digits("train").images
    held = load_digits("heldout").images
    torch.manual_seed(0)
    vae = VAE(VAEConfig(hidden=(64,), latent_dim=8))

    def heldout_bpd(m: VAE) -> float:
        with torch.no_grad():
            return float(m.bits_per_dim(held, samples=4, generator=torch.Generator().manual_seed(0)).mean())

    before = heldout_bpd(vae)
    result = train(vae, train_x, loss_fn=vae_loss, steps=300, batch_size=128, lr=3e-3, seed=0)
    after = heldout_bpd(result.model)
    terms = result.model.elbo(held, samples=4, generator=torch.Generator().manual_seed(0))
    assert after < before - 1.0, (before, after)
    assert float(terms.kl.detach().mean()) > 1.0  # the latent is used


class _Wrapped(torch.nn.Module):
    """Stands in for DistributedDataParallel: it exposes forward and .module only."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_vae_loss_goes_through_forward_so_a_ddp_wrapper_works():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(hidden=(16,), latent_dim=3))
    x = load_digits("heldout").images[:5]
    a = vae_loss(_Wrapped(vae), x, None, torch.Generator().manual_seed(1))
    b = vae_loss(vae, x, None, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    terms = vae.elbo(x, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(b, -terms.elbo.mean() / 64)
