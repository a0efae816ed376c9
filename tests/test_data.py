"""Tests for stepdiff.data: shapes, seeding, and that each sampler draws the law its docstring states.

The statistical checks use n = 20 000 points and tolerances of at least 5 standard errors,
so a correct sampler fails one of them with probability below 1e-6 (and the seeds are fixed,
so the outcome is in fact deterministic).
"""

import math

import pytest
import torch

from stepdiff import data as D
from stepdiff.denoisers import GaussianMixture
from stepdiff.metrics import mode_weights

TOYS = [D.spiral, D.swiss_roll, D.two_moons, D.eight_gaussians, D.checkerboard, D.annulus]
N = 20_000


@pytest.mark.parametrize("fn", TOYS, ids=lambda f: f.__name__)
def test_toys_shape_dtype_and_seeding(fn):
    x = fn(100, generator=3)
    assert x.shape == (100, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(x, fn(100, generator=3))
    assert torch.equal(x, fn(100, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(x, fn(100, generator=4))
    assert fn(0, generator=0).shape == (0, 2)


@pytest.mark.parametrize("fn", TOYS, ids=lambda f: f.__name__)
def test_toys_reject_bad_arguments(fn):
    with pytest.raises(ValueError, match="n must be"):
        fn(-1)
    with pytest.raises(ValueError, match="n must be"):
        fn(2.5)
    with pytest.raises(TypeError, match="generator"):
        fn(10, generator="seed")


def test_global_generator_is_used_without_a_seed():
    with torch.random.fork_rng():
        torch.manual_seed(11)
        a = D.spiral(50)
        torch.manual_seed(11)
        assert torch.equal(a, D.spiral(50))


def test_spiral_lies_on_its_curve_without_noise():
    x = D.spiral(N, turns=2.0, radius=2.0, noise=0.0, generator=0).double()
    r = x.norm(dim=1)
    theta_max = 2 * math.pi * 2.0
    theta = theta_max * r / 2.0  # r = R theta / theta_max
    back = r[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    assert torch.allclose(back, x, atol=1e-4)
    # theta = theta_max sqrt(u): (r / R)^2 is uniform on [0, 1], mean 1/2, sd 1/sqrt(12).
    u = (r / 2.0) ** 2
    assert abs(float(u.mean()) - 0.5) < 5 / math.sqrt(12 * N)
    assert float(r.max()) <= 2.0 + 1e-6


def test_spiral_noise_is_gaussian_with_the_stated_scale():
    clean = D.spiral(N, noise=0.0, generator=0)
    noisy = D.spiral(N, noise=0.1, generator=0)  # same generator: same u, then the noise
    resid = (noisy - clean).double()
    assert abs(float(resid.std()) - 0.1) < 5 * 0.1 / math.sqrt(2 * 2 * N)
    assert abs(float(resid.mean())) < 5 * 0.1 / math.sqrt(2 * N)


def test_swiss_roll_angle_range_and_scale():
    x = D.swiss_roll(N, radius=2.0, noise=0.0, generator=1).double()
    r = x.norm(dim=1)
    theta = r * 4.5 * math.pi / 2.0
    assert float(theta.min()) >= 1.5 * math.pi - 1e-3 and float(theta.max()) <= 4.5 * math.pi + 1e-3
    back = r[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    assert torch.allclose(back, x, atol=1e-4)
    # The angle is uniform on [1.5 pi, 4.5 pi]: mean 3 pi, sd 3 pi / sqrt(12).
    assert abs(float(theta.mean()) - 3 * math.pi) < 5 * 3 * math.pi / math.sqrt(12 * N)


def test_two_moons_geometry_labels_and_centring():
    x, labels = D.two_moons(N, noise=0.0, generator=2, return_labels=True)
    x = x.double() + torch.tensor([0.5, 0.25], dtype=torch.float64)
    upper, lower = x[labels == 0], x[labels == 1]
    # Upper moon: unit circle around (0, 0), y >= 0; lower: around (1, 0.5), y <= 0.5.
    assert torch.allclose(upper.norm(dim=1), torch.ones(len(upper), dtype=torch.float64), atol=1e-5)
    centre = torch.tensor([1.0, 0.5], dtype=torch.float64)
    assert torch.allclose((lower - centre).norm(dim=1), torch.ones(len(lower), dtype=torch.float64), atol=1e-5)
    assert float(upper[:, 1].min()) >= -1e-6 and float(lower[:, 1].max()) <= 0.5 + 1e-6
    frac = float(labels.double().mean())
    assert abs(frac - 0.5) < 5 * 0.5 / math.sqrt(N)
    # Centred: the noiseless mean is exactly (1/2, 1/4), so the returned points have mean 0.
    mean = D.two_moons(N, noise=0.0, generator=3).double().mean(0)
    assert mean.abs().max() < 5 * 0.9 / math.sqrt(N)
    assert labels.dtype == torch.int64
    assert D.two_moons(10, generator=0).shape == (10, 2)


def test_eight_gaussians_matches_its_mixture():
    mix = D.eight_gaussians_mixture(radius=2.0, std=0.2)
    assert isinstance(mix, GaussianMixture) and mix.means.shape == (8, 2)
    assert torch.allclose(mix.means.norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64))
    assert torch.allclose(mix.weights, torch.full((8,), 1 / 8, dtype=torch.float64))
    x, labels = D.eight_gaussians(N, generator=4, return_labels=True)
    # The same draws as the mixture's own sampler, in float32.
    ref = mix.sample(N, 4)
    assert torch.equal(x, ref.float())
    # Each mode has weight 1/8 and the spread std around its centre.
    w = mode_weights(x, mix.means)
    assert (w - 1 / 8).abs().max() < 5 * math.sqrt(1 / 8 * 7 / 8 / N)
    resid = x.double() - mix.means[labels]
    assert abs(float(resid.std()) - 0.2) < 0.01
    # Nearest mode and true label disagree only for the rare point more than 3.8 sd out.
    by_label = torch.bincount(labels, minlength=8).double() / N
    assert torch.allclose(mode_weights(x, mix.means), by_label, atol=5e-4)


def test_checkerboard_only_dark_squares_and_uniform_over_them():
    x = D.checkerboard(N, squares=4, size=4.0, generator=5).double()
    assert float(x.min()) >= -2.0 and float(x.max()) <= 2.0
    ij = torch.floor((x + 2.0) / 1.0).long()  # square indices 0..3
    assert bool(((ij.sum(1) % 2) == 0).all())
    counts = torch.bincount(ij[:, 0] * 4 + ij[:, 1], minlength=16).double() / N
    dark = torch.tensor([(i + j) % 2 == 0 for i in range(4) for j in range(4)])
    assert torch.all(counts[~dark] == 0)
    assert (counts[dark] - 1 / 8).abs().max() < 5 * math.sqrt(1 / 8 * 7 / 8 / N)
    odd = D.checkerboard(1000, squares=3, size=3.0, generator=0)
    assert bool(((torch.floor(odd + 1.5).long().sum(1) % 2) == 0).all())


def test_annulus_radius_law():
    x = D.annulus(N, r_inner=1.5, r_outer=2.0, generator=6).double()
    r = x.norm(dim=1)
    assert float(r.min()) >= 1.5 - 1e-5 and float(r.max()) <= 2.0 + 1e-5
    # r^2 is uniform on [r_in^2, r_out^2]: its mean is the midpoint.
    lo, hi = 1.5**2, 2.0**2
    assert abs(float((r**2).mean()) - (lo + hi) / 2) < 5 * (hi - lo) / math.sqrt(12 * N)
    angle = torch.atan2(x[:, 1], x[:, 0])
    assert abs(float(torch.cos(angle).mean())) < 5 / math.sqrt(2 * N)
    with pytest.raises(ValueError, match="r_inner"):
        D.annulus(10, r_inner=2.0, r_outer=1.0)


def test_mixture_1d_is_a_stated_gaussian_mixture():
    mix = D.mixture_1d()
    assert mix.dim == 1 and mix.n_components == 3
    assert torch.allclose(mix.means[:, 0], torch.tensor([-2.0, 0.0, 2.5], dtype=torch.float64))
    assert torch.allclose(mix.eigvals[:, 0], torch.tensor([0.09, 0.16, 0.25], dtype=torch.float64))
    assert torch.allclose(mix.weights, torch.tensor([0.25, 0.45, 0.3], dtype=torch.float64))
    # Its density integrates to 1 and is trimodal.
    grid = torch.linspace(-6, 7, 20001, dtype=torch.float64)[:, None]
    p = mix.log_prob(grid).exp()
    assert abs(float(torch.trapezoid(p, grid[:, 0])) - 1.0) < 1e-6
    rising = torch.sign(torch.diff(p))
    peaks = int(((rising[:-1] > 0) & (rising[1:] < 0)).sum())
    assert peaks == 3
    with pytest.raises(ValueError, match="same positive length"):
        D.mixture_1d(means=(0.0, 1.0), stds=(1.0,), weights=(1.0,))


def test_load_digits():
    images, labels, classes = D.load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert float(images.min()) == -1.0 and float(images.max()) == 1.0
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert set(labels.tolist()) == set(range(10)) and classes == [str(i) for i in range(10)]
    from sklearn.datasets import load_digits

    raw = torch.as_tensor(load_digits().images[5])
    assert torch.allclose(images[5, 0].double(), raw / 8 - 1)


def _write_png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


def test_load_image_folder_with_classes(tmp_path):
    import numpy as np

    for name, value in (("b_white", 255), ("a_black", 0)):
        (tmp_path / name).mkdir()
        for i in range(3):
            _write_png(tmp_path / name / f"{i}.png", np.full((12, 16, 3), value, dtype=np.uint8))
    images, labels, classes = D.load_image_folder(tmp_path, size=8, channels=3)
    assert classes == ["a_black", "b_white"]
    assert images.shape == (6, 3, 8, 8) and images.dtype == torch.float32
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.all(images[:3] == -1.0) and torch.all(images[3:] == 1.0)
    gray, _, _ = D.load_image_folder(tmp_path, size=4, channels=1)
    assert gray.shape == (6, 1, 4, 4)


def test_load_image_folder_crops_to_the_centre_and_scales(tmp_path):
    import numpy as np

    # A 4 x 8 image: dark left and right quarters, a bright centre square 4 x 4.
    a = np.zeros((4, 8), dtype=np.uint8)
    a[:, 2:6] = 255
    _write_png(tmp_path / "x.png", a)
    images, labels, classes = D.load_image_folder(tmp_path, size=4, channels=1)
    assert classes == [""] and labels.tolist() == [0]
    assert torch.all(images == 1.0)  # the centre crop is the bright square only
    mid = np.full((2, 2), 51, dtype=np.uint8)  # 51 / 127.5 - 1 = -0.6
    _write_png(tmp_path / "y.png", mid)
    images, _, _ = D.load_image_folder(tmp_path, size=2, channels=1)
    assert torch.allclose(images[1], torch.full((1, 2, 2), -0.6))


def test_load_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        D.load_image_folder(tmp_path / "missing", size=8)
    with pytest.raises(ValueError, match="no image files"):
        D.load_image_folder(tmp_path, size=8)
    with pytest.raises(ValueError, match="channels"):
        D.load_image_folder(tmp_path, size=8, channels=2)
    with pytest.raises(ValueError, match="size"):
        D.load_image_folder(tmp_path, size=0)
    import numpy as np

    _write_png(tmp_path / "top.png", np.zeros((4, 4), dtype=np.uint8))
    (tmp_path / "cls").mkdir()
    _write_png(tmp_path / "cls" / "a.png", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="both image files and sub-folders"):
        D.load_image_folder(tmp_path, size=4)
