"""SDEdit and inpainting against exact denoisers, whose answers are known in closed form.

Statistical tests use fixed seeds (so they are deterministic); their thresholds are a false-alarm
level for a correct implementation (stated where it is a test of a law) or a factor between two
measured errors, chosen well inside the measured gap and failing for a broken method.
"""

import math

import pytest
import torch
from scipy import stats

from stepdiff.denoisers import GaussianMixture, exact_denoiser, gaussian
from stepdiff.editing import (
    MaskedInputDenoiser,
    blocky_sketch,
    check_mask,
    inpaint,
    inpaint_with_model,
    masked_diffusion_loss,
    random_box_masks,
    repaint_levels,
    sdedit,
)
from stepdiff.models import UNet, UNetConfig
from stepdiff.samplers import SAMPLERS, posterior_coefficients, sample_ddim
from stepdiff.schedules import FlowMatchingSchedule, VESchedule, VPCosineSchedule, VPLinearSchedule, time_grid

torch.set_num_threads(1)
f64 = torch.float64


def _mixture_1d() -> GaussianMixture:
    return GaussianMixture(torch.tensor([[-1.0], [0.8]]), torch.tensor([0.09, 0.25]), torch.tensor([0.3, 0.7]))


def _mixture_cdf(mix: GaussianMixture):
    means, sds, w = mix.means[:, 0].numpy(), mix.eigvals[:, 0].sqrt().numpy(), mix.weights.numpy()

    def cdf(v):
        return sum(wk * stats.norm.cdf(v, mk, sk) for wk, mk, sk in zip(w, means, sds))

    return cdf


# --- SDEdit -------------------------------------------------------------------------------------


def test_sdedit_strength_zero_returns_the_input_exactly():
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def never(x, t):
        raise AssertionError("strength 0 must not call the model")

    out = sdedit(never, x, VPLinearSchedule(), 0.0)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("schedule", [FlowMatchingSchedule(), VPCosineSchedule()], ids=["flow", "cosine"])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun"])
def test_sdedit_strength_one_is_sampling_from_the_same_noise(schedule, sampler):
    """alpha(1) = 0: x_1 = sigma(1) z whatever the input, so SDEdit at s = 1 is the sampler run from that noise
    (bit for bit on the flow path; the cosine schedule's alpha(1) is cos(pi/2) = 6e-17 in floating point)."""
    target = GaussianMixture(torch.tensor([[1.0, -0.5], [-1.0, 0.4]]), 0.05)
    D = exact_denoiser(target, schedule)
    g = torch.Generator().manual_seed(3)
    x, z = torch.randn(64, 2, generator=g, dtype=f64), torch.randn(64, 2, generator=g, dtype=f64)
    out = sdedit(D, x, schedule, 1.0, n_steps=12, sampler=sampler, noise=z)
    ref = SAMPLERS[sampler](D, float(schedule.sigma(1.0)) * z, schedule, time_grid(12, "uniform"))
    if isinstance(schedule, FlowMatchingSchedule):
        assert torch.equal(out, ref)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_sdedit_noises_to_the_strength_and_runs_the_grid_from_there():
    """The partial run is the sampler on time_grid(n, t_max=s) from alpha(s) x + sigma(s) z (deterministic DDIM)."""
    schedule = VPLinearSchedule()
    D = exact_denoiser(GaussianMixture(torch.tensor([[0.5, 0.0], [-0.5, 1.0]]), 0.1), schedule)
    g = torch.Generator().manual_seed(4)
    x, z = torch.randn(32, 2, generator=g, dtype=f64), torch.randn(32, 2, generator=g, dtype=f64)
    s = 0.37
    out = sdedit(D, x, schedule, s, n_steps=9, noise=z)
    x_s = schedule.alpha(s) * x + schedule.sigma(s) * z
    ref = sample_ddim(D, x_s, schedule, time_grid(9, "uniform", t_max=s))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def _ddpm_chain_gain(schedule, ts, c):
    """For p0 = N(0, c) in 1-D, the exact denoiser is linear, D(x, t) = k_t x, so each ancestral step is
    x <- g x + c_noise z with g = c_x + c_x0 k_t: the whole run maps x_s to A x_s + N(0, V)."""
    A, V = 1.0, 0.0
    for t, s in zip(ts[:-1], ts[1:]):
        c_x, c_x0, c_n = (float(v) for v in posterior_coefficients(schedule, t, s))
        a, sg = float(schedule.alpha(t)), float(schedule.sigma(t))
        k = a * c / (a * a * c + sg * sg)
        gain = c_x + c_x0 * k
        A, V = gain * A, gain * gain * V + c_n * c_n
    return A, V


@pytest.mark.parametrize("s", [0.15, 0.5, 0.9])
def test_sdedit_law_given_the_input_is_the_exact_law_of_the_discrete_chain(s):
    """Gaussian target N(0, c), exact denoiser, 20 ancestral steps: out | x is N(A a x, A^2 sigma^2 + V) with
    (A, V) from the chain's coefficients. KS test of 4000 draws at a fixed x; false alarm 1e-3."""
    schedule, c, x_in = VPLinearSchedule(), 0.5, 1.3
    D = exact_denoiser(gaussian(torch.zeros(1), torch.tensor([[c]])), schedule)
    out = sdedit(D, torch.full((4000, 1), x_in, dtype=f64), schedule, s, n_steps=20, sampler="ddpm", generator=11)
    A, V = _ddpm_chain_gain(schedule, time_grid(20, "uniform", t_max=s), c)
    a, sg = float(schedule.alpha(s)), float(schedule.sigma(s))
    mean, sd = A * a * x_in, math.sqrt(A * A * sg * sg + V)
    assert stats.kstest(out[:, 0].numpy(), "norm", args=(mean, sd)).pvalue > 1e-3


@pytest.mark.parametrize("s", [0.2, 0.6])
def test_sdedit_law_given_the_input_approaches_the_true_posterior(s):
    """With many ancestral steps the reverse run draws from p(x0 | x_s), so out | x is the forward-then-reverse
    posterior N(k a x, k^2 sigma^2 + c sigma^2 / (a^2 c + sigma^2)), k = a c / (a^2 c + sigma^2). The chain's
    exact law (above) converges to it; at 400 steps mean and sd agree within 2 %."""
    schedule, c, x_in = VPLinearSchedule(), 0.5, 1.3
    a, sg = float(schedule.alpha(s)), float(schedule.sigma(s))
    k = a * c / (a * a * c + sg * sg)
    true_mean, true_sd = k * a * x_in, math.sqrt(k * k * sg * sg + c * sg * sg / (a * a * c + sg * sg))
    A, V = _ddpm_chain_gain(schedule, time_grid(400, "uniform", t_max=s), c)
    assert abs(A * a * x_in - true_mean) < 0.02 * true_sd
    assert abs(math.sqrt(A * A * sg * sg + V) / true_sd - 1) < 0.02
    D = exact_denoiser(gaussian(torch.zeros(1), torch.tensor([[c]])), schedule)
    out = sdedit(D, torch.full((3000, 1), x_in, dtype=f64), schedule, s, n_steps=400, sampler="ddpm", generator=5)
    assert stats.kstest(out[:, 0].numpy(), "norm", args=(true_mean, true_sd)).pvalue > 1e-3


def test_sdedit_keeps_the_data_distribution_and_stays_closer_to_the_input_as_s_falls():
    """x ~ p0 (a 1-D mixture), exact denoiser, DDPM: the output is again ~ p0 at every strength (KS against the
    mixture's CDF, false alarm 1e-3 each), and the mean distance to the input grows with s."""
    mix = _mixture_1d()
    schedule = VPLinearSchedule()
    D = exact_denoiser(mix, schedule)
    x = mix.sample(3000, generator=7)
    cdf = _mixture_cdf(mix)
    moved = []
    for i, s in enumerate([0.02, 0.1, 0.25, 0.6]):
        out = sdedit(D, x, schedule, s, n_steps=200, sampler="ddpm", generator=20 + i)
        assert stats.kstest(out[:, 0].numpy(), cdf).pvalue > 1e-3, s
        moved.append(float((out - x).abs().mean()))
    assert all(b > 1.05 * a for a, b in zip(moved[:-1], moved[1:])), moved
    # At the top the output has nearly forgotten x: about the distance between two independent draws.
    y = mix.sample(3000, generator=8)
    assert moved[-1] > 0.8 * float((y - x).abs().mean())


def test_sdedit_works_on_images_with_a_network():
    net = UNet(UNetConfig.preset("tiny", in_channels=1, channels=16, channel_mult=(1, 2), attn_levels=()))
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    out = sdedit(net, x, VPCosineSchedule(), 0.4, n_steps=3, prediction="eps", generator=0)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_sdedit_bad_input():
    D = exact_denoiser(GaussianMixture(torch.zeros(1, 2), 1.0), VPLinearSchedule())
    x = torch.zeros(4, 2, dtype=f64)
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="strength"):
            sdedit(D, x, VPLinearSchedule(), bad)
    with pytest.raises(ValueError, match="strength"):
        sdedit(D, x, VPLinearSchedule(), torch.tensor([0.2, 0.3]))
    with pytest.raises(ValueError, match="unknown sampler"):
        sdedit(D, x, VPLinearSchedule(), 0.5, sampler="nope")
    with pytest.raises(ValueError, match="noise"):
        sdedit(D, x, VPLinearSchedule(), 0.5, noise=torch.zeros(3, 2, dtype=f64))
    with pytest.raises(ValueError, match="x must"):
        sdedit(D, torch.zeros(4, dtype=torch.long), VPLinearSchedule(), 0.5)


# --- inpainting -------------------------------------------------------------------------------


def test_repaint_levels():
    assert repaint_levels(4) == [4, 3, 2, 1, 0]
    assert repaint_levels(3, 1, 3) == [3, 2, 3, 2, 3, 2, 1, 2, 1, 2, 1, 0]
    walk = repaint_levels(10, 2, 4)
    steps = list(zip(walk[:-1], walk[1:]))
    assert all(abs(a - b) == 1 for a, b in steps) and walk[0] == 10 and walk[-1] == 0
    assert 0 not in walk[:-1] and min(walk) == 0
    down = sum(b < a for a, b in steps)
    assert down == 10 + 3 * 2 * ((10 - 1) // 2)
    with pytest.raises(ValueError, match="resample"):
        repaint_levels(5, 1, 0)


def _corr_gaussian(rho: float = 0.95):
    return gaussian(torch.zeros(2), torch.tensor([[1.0, rho], [rho, 1.0]], dtype=f64))


@pytest.mark.parametrize("resample", [1, 3])
def test_inpaint_known_region_is_exact_and_independent_of_the_model(resample):
    """The known entries are x_known bit for bit at the end, and at every step they are the same whatever the
    model returns (two models, same seed: identical known entries through the whole trajectory)."""
    schedule = VPLinearSchedule()
    D = exact_denoiser(_corr_gaussian(), schedule)

    def garbage(x, t):
        return 10 * x + 3

    g = torch.Generator().manual_seed(0)
    x_known = torch.randn(500, 2, generator=g, dtype=f64)
    mask = torch.tensor([[True, False]])
    ts = time_grid(8, "uniform")
    a = inpaint(D, x_known, mask, schedule, ts, resample=resample, generator=1, return_trajectory=True)
    b = inpaint(garbage, x_known, mask, schedule, ts, resample=resample, generator=1, return_trajectory=True)
    assert torch.equal(a[-1][:, 0], x_known[:, 0]) and torch.equal(b[-1][:, 0], x_known[:, 0])
    assert torch.equal(a[:, :, 0], b[:, :, 0])
    assert not torch.allclose(a[-1][:, 1], b[-1][:, 1])
    # At the step down to ts[1] the known entries are the known image noised to that time: standardised, N(0, 1).
    s = ts[1]
    z = (a[1][:, 0] - schedule.alpha(s) * x_known[:, 0]) / schedule.sigma(s)
    assert abs(float(z.mean())) < 4 / math.sqrt(500) and abs(float(z.std()) - 1) < 0.1


def test_inpaint_images_keep_the_known_pixels_bit_for_bit():
    net = UNet(UNetConfig.preset("tiny", in_channels=3, channels=16, channel_mult=(1, 2), attn_levels=()))
    with torch.no_grad():  # a non-zero output, as a trained network has
        net.conv_out.weight.normal_(0, 0.1)
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = random_box_masks(3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = inpaint(net, x, mask, VPCosineSchedule(), time_grid(4, "uniform", t_max=0.99), prediction="eps",
                      resample=2, generator=2)
    known = mask.expand_as(x)
    assert torch.equal(out[known], x[known])
    assert not torch.equal(out[~known], x[~known])


def _conditional_w2(out: torch.Tensor, rho: float, x_known: float) -> float:
    """W2 between a Gaussian fit of the filled coordinate and the exact conditional N(rho x, 1 - rho^2)."""
    mu, sd = float(out.mean()), float(out.std())
    return math.hypot(mu - rho * x_known, sd - math.sqrt(1 - rho * rho))


def test_repaint_resampling_brings_the_fill_closer_to_the_exact_conditional():
    """Target N(0, [[1, rho], [rho, 1]]), x_1 known: the fill x_2 should be N(rho x_1, 1 - rho^2). Replacement
    alone is far off (measured W2 0.46 for 20 steps); RePaint with U = 5 is much closer (0.16)."""
    rho, x1 = 0.95, 1.5
    schedule = VPLinearSchedule()
    D = exact_denoiser(_corr_gaussian(rho), schedule)
    x_known = torch.tensor([[x1, 0.0]], dtype=f64).expand(2000, 2).clone()
    mask = torch.tensor([[True, False]])
    ts = time_grid(20, "uniform")
    plain = inpaint(D, x_known, mask, schedule, ts, generator=0)
    repaint = inpaint(D, x_known, mask, schedule, ts, resample=5, generator=0)
    w_plain = _conditional_w2(plain[:, 1], rho, x1)
    w_repaint = _conditional_w2(repaint[:, 1], rho, x1)
    assert w_plain > 0.3
    assert w_repaint < 0.5 * w_plain, (w_plain, w_repaint)


def test_inpaint_with_nothing_known_is_plain_ancestral_sampling():
    """An all-False mask leaves nothing to replace: inpainting with eta = 0 is DDIM from sigma(t0) z."""
    schedule = VESchedule(2.0)
    target = GaussianMixture(torch.tensor([[1.0, 0.0], [-1.0, 0.5]]), 0.1)
    D = exact_denoiser(target, schedule)
    z = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=f64)
    ts = time_grid(6, "uniform")
    out = inpaint(D, torch.zeros(50, 2, dtype=f64), torch.zeros(1, 2, dtype=torch.bool), schedule, ts,
                  noise=z, eta=0.0)
    ref = sample_ddim(D, 2.0 * z, schedule, ts)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_check_mask_and_inpaint_bad_input():
    x = torch.zeros(2, 3, 4, 4)
    assert check_mask(torch.ones(2, 1, 4, 4), x).dtype == torch.bool
    assert check_mask(torch.ones(1, 1, 4, 4, dtype=torch.uint8), x).shape == (1, 1, 4, 4)
    for bad_shape in [(2, 1, 4, 5), (3, 1, 4, 4), (1, 4, 4), (2, 2, 4, 4)]:
        with pytest.raises(ValueError, match="mask must have 4 dimensions"):
            check_mask(torch.ones(bad_shape, dtype=torch.bool), x)
    with pytest.raises(ValueError, match="mask must hold only 0"):
        check_mask(torch.full((2, 1, 4, 4), 0.5), x)
    with pytest.raises(ValueError, match="mask must be bool"):
        check_mask(torch.ones(2, 1, 4, 4, dtype=torch.complex64), x)
    with pytest.raises(TypeError, match="mask"):
        check_mask([[1, 0]], x)
    D = exact_denoiser(GaussianMixture(torch.zeros(1, 2), 1.0), VPLinearSchedule())
    pts = torch.zeros(4, 2, dtype=f64)
    with pytest.raises(ValueError, match="mask"):
        inpaint(D, pts, torch.ones(4, 3, dtype=torch.bool), VPLinearSchedule(), time_grid(3))
    with pytest.raises(ValueError, match="mask must hold only 0"):
        inpaint(D, pts, torch.full((4, 2), 2.0), VPLinearSchedule(), time_grid(3))
    with pytest.raises(ValueError, match="ts must"):
        inpaint(D, pts, torch.ones(4, 2, dtype=torch.bool), VPLinearSchedule(), torch.tensor([0.5, 0.7, 0.0]))
    with pytest.raises(ValueError, match="eta"):
        inpaint(D, pts, torch.ones(4, 2, dtype=torch.bool), VPLinearSchedule(), time_grid(3), eta=-1.0)


# --- the masked-input model ---------------------------------------------------------------------


def _masked_unet(channels: int = 1) -> MaskedInputDenoiser:
    torch.manual_seed(0)
    net = UNet(UNetConfig.preset("tiny", in_channels=2 * channels + 1, channels=16, channel_mult=(1, 2),
                                 attn_levels=()))
    return MaskedInputDenoiser(net, channels)


def test_random_box_masks():
    m = random_box_masks(200, 8, 12, min_frac=0.25, max_frac=0.5, generator=torch.Generator().manual_seed(0))
    assert m.shape == (200, 1, 8, 12) and m.dtype == torch.bool
    unknown = (~m).sum((1, 2, 3)).float()
    assert float(unknown.min()) >= 2 * 3 and float(unknown.max()) <= 4 * 6
    rows, cols = (~m).any(3)[:, 0], (~m).any(2)[:, 0]
    assert torch.equal((~m)[:, 0].sum((1, 2)), rows.sum(1) * cols.sum(1))  # one rectangle each


def test_masked_input_model_reads_only_the_known_pixels_and_inpaints_exactly():
    model = _masked_unet()
    with torch.no_grad():
        model.net.conv_out.weight.normal_(0, 0.1)
    x = torch.randn(2, 1, 8, 8)
    known = torch.rand(2, 1, 8, 8)
    mask = random_box_masks(2, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, torch.tensor([0.3, 0.7]), known=known, mask=mask)
        changed = known + 5.0 * (~mask)  # differs only under the unknown box
        same = model(x, torch.tensor([0.3, 0.7]), known=changed, mask=mask)
        other = model(x, torch.tensor([0.3, 0.7]), known=known + 1.0, mask=mask)
    assert out.shape == x.shape
    assert torch.equal(out, same) and not torch.allclose(out, other)
    with torch.no_grad():
        filled = inpaint_with_model(model, known, mask, VPCosineSchedule(), time_grid(3, t_max=0.99), generator=0)
    k = mask.expand_as(known)
    assert torch.equal(filled[k], known[k])


def test_masked_input_model_trains():
    """A few Adam steps of the masked loss on one fixed batch lower it (the plumbing learns)."""
    from stepdiff.train import train

    model = _masked_unet()
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    schedule = VPCosineSchedule()

    def loss_fn(m, x0, y, g):
        return masked_diffusion_loss(m, x0, schedule, y=y, generator=g, t_max=0.99)

    result = train(model, images, loss_fn=loss_fn, steps=40, batch_size=16, lr=3e-3, seed=0)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_masked_input_bad_input():
    with pytest.raises(ValueError, match="2 \\* 1 \\+ 1"):
        MaskedInputDenoiser(UNet(UNetConfig.preset("tiny", in_channels=1, channels=16)), 1)
    model = _masked_unet()
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="mask must have 4 dimensions"):
        model(x, 0.5, known=x, mask=torch.ones(2, 1, 8, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="known"):
        model(x, 0.5, known=torch.zeros(2, 1, 4, 4), mask=torch.ones(2, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must hold only 0"):
        masked_diffusion_loss(model, x, VPCosineSchedule(), mask=torch.full((2, 1, 8, 8), 0.3))


def test_inpaint_kind_trains_through_the_command(tmp_path):
    """stepdiff train --kind inpaint: a MaskedInputDenoiser on the digits, its loss on random masks; loaded back,
    it inpaints with the known pixels exact."""
    from stepdiff import checkpoints
    from stepdiff.config import ConfigError, resolve
    from stepdiff.runs import train_run

    tiny = {"arch": "unet", "preset": "tiny", "channels": 8, "channel_mult": [1, 2], "attn_levels": [1], "heads": 2,
            "norm_groups": 4}
    data = {"name": "digits", "size": 8, "condition": "class"}
    result = train_run({"kind": "inpaint", "name": "inpaint", "data": data, "model": tiny,
                        "train": {"steps": 3, "batch_size": 16, "threads": 1, "label_dropout": 0.2}}, tmp_path / "i.pt")
    assert len(result.losses) == 3
    model, record = checkpoints.load(tmp_path / "i.pt")
    assert isinstance(model, MaskedInputDenoiser) and model.net.config.in_channels == 3 and record["kind"] == "inpaint"
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    mask = random_box_masks(2, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = inpaint_with_model(model, x, mask, VPCosineSchedule(), time_grid(3), prediction="v", generator=0)
    assert torch.equal(out[mask.expand_as(x)], x[mask.expand_as(x)])
    with pytest.raises(ConfigError, match="inpaint"):
        resolve({"kind": "inpaint", "data": {"name": "shapes", "condition": "text"}})


def test_blocky_sketch_is_the_thresholded_block_average():
    """Against a loop over the blocks on an odd-sized batch: two tones, constant on f x f blocks."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 2, 9, 15, generator=g, dtype=f64) * 2 - 1
    out = blocky_sketch(x, 3, threshold=0.1)
    assert out.shape == x.shape and out.dtype == x.dtype
    for i in range(3):
        for j in range(5):
            block = x[:, :, 3 * i: 3 * i + 3, 3 * j: 3 * j + 3]
            want = torch.where(block.mean((2, 3)) > 0.1, 1.0, -1.0).to(f64)
            assert torch.equal(out[:, :, 3 * i: 3 * i + 3, 3 * j: 3 * j + 3], want[:, :, None, None].expand_as(block))
    assert torch.equal(blocky_sketch(out, 3, threshold=0.1), out)  # a sketch is its own sketch
    assert torch.equal(blocky_sketch(x, 1), torch.where(x > 0, 1.0, -1.0).to(f64))
    with pytest.raises(ValueError, match="factor must divide"):
        blocky_sketch(x, 2)
    with pytest.raises(ValueError, match="factor"):
        blocky_sketch(x, 0)
    with pytest.raises(ValueError, match="images"):
        blocky_sketch(x[0], 3)
