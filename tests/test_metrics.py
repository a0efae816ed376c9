"""Tests for stepdiff.metrics: the estimators against closed forms, and their invariances.

Statistical checks and their false-alarm reasoning:

- Same-law MMD (n = m = 1000 in 2-D, median bandwidth): over 30 seeds the biased MMD^2 had
  mean 8.5e-4, sd 6.4e-4, max 2.7e-3; the bound 5e-3 is more than 6 sd above the mean.
  A shift of 0.5 already gives 3e-2, six times the bound.
- Same-law SW2 (n = 1000): mean 0.079, sd 0.015, max 0.115 over 30 seeds; bound 0.16
  (over 5 sd). A shift of 0.5 gives 0.35.
- Closed forms are checked within 5-6 standard errors of the estimator (stated per test).
All seeds are fixed, so the outcomes are deterministic; the margins say that they are not
luck of the seed.
"""

import math

import numpy as np
import pytest
import torch

from stepdiff.metrics import median_bandwidth, mmd, mode_weights, sliced_wasserstein


def gaussian_pair(n, m, shift, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(m, d, generator=g, dtype=torch.float64) + torch.as_tensor(shift, dtype=torch.float64)
    return x, y


# --- MMD --------------------------------------------------------------------------------------


def test_mmd_near_zero_for_the_same_law_and_positive_otherwise():
    x, y = gaussian_pair(1000, 1000, [0.0, 0.0])
    same = float(mmd(x, y))
    assert 0 <= same < 5e-3
    x, z = gaussian_pair(1000, 1000, [0.5, 0.0])
    assert float(mmd(x, z)) > 2e-2
    x, z = gaussian_pair(1000, 1000, [1.0, 0.0])
    assert float(mmd(x, z)) > 8e-2


def test_mmd_unbiased_matches_the_gaussian_closed_form():
    """Population MMD^2 of N(0, I) and N(delta, I) under k = exp(-|a-b|^2 / 2h^2), d = 2:

    E k(x, x') = (h^2 / (h^2 + 2))^{d/2}, E k(x, y) = (h^2 / (h^2 + 2))^{d/2} exp(-|delta|^2 / (2 (h^2 + 2))),
    so MMD^2 = 2 c (1 - exp(-|delta|^2 / (2 (h^2 + 2)))) with c = h^2 / (h^2 + 2).
    Here MMD^2 = 0.2085. The U-statistic is unbiased; with n = m = 2000 its sd is 8.6e-3
    (20 seeds: mean 0.2089), so the tolerance 0.035 is 4 sd (false alarm about 6e-5). It pins
    the bandwidth convention: the kernel exp(-|a-b|^2 / h^2) would give 0.145, 7 sd away.
    Under the same law the sd is 3.9e-4 and the tolerance 3e-3.
    """
    h, delta = 1.0, torch.tensor([1.5, 0.0])
    c = h**2 / (h**2 + 2)
    exact = 2 * c * (1 - math.exp(-float(delta @ delta) / (2 * (h**2 + 2))))
    x, y = gaussian_pair(2000, 2000, delta, seed=1)
    assert abs(float(mmd(x, y, bandwidth=h, unbiased=True)) - exact) < 0.035
    # Same law: expectation exactly 0.
    x, y = gaussian_pair(2000, 2000, [0.0, 0.0], seed=2)
    assert abs(float(mmd(x, y, bandwidth=h, unbiased=True))) < 3e-3


def test_mmd_formula_on_a_tiny_example():
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    y = torch.tensor([[0.5], [2.0]], dtype=torch.float64)
    h = 0.7

    def k(a, b):
        return math.exp(-((a - b) ** 2) / (2 * h * h))

    xs, ys = x[:, 0].tolist(), y[:, 0].tolist()
    kxx = [[k(a, b) for b in xs] for a in xs]
    kyy = [[k(a, b) for b in ys] for a in ys]
    kxy = sum(k(a, b) for a in xs for b in ys) / 6
    biased = sum(map(sum, kxx)) / 9 + sum(map(sum, kyy)) / 4 - 2 * kxy
    unbiased = (sum(map(sum, kxx)) - 3) / 6 + (sum(map(sum, kyy)) - 2) / 2 - 2 * kxy
    assert float(mmd(x, y, h)) == pytest.approx(biased, rel=1e-12)
    assert float(mmd(x, y, h, unbiased=True)) == pytest.approx(unbiased, rel=1e-12)


def test_median_bandwidth_is_the_median_pairwise_distance():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(7, 3, generator=g), torch.randn(6, 3, generator=g)
    z = torch.cat([x, y]).double().numpy()
    d = [np.linalg.norm(z[i] - z[j]) for i in range(13) for j in range(i + 1, 13)]
    assert len(d) % 2 == 0  # 78 pairs: torch.median takes the lower of the two middle values
    assert float(median_bandwidth(x, y)) == pytest.approx(sorted(d)[(len(d) - 1) // 2], rel=1e-10)


def test_mmd_is_symmetric_and_permutation_invariant():
    x, y = gaussian_pair(300, 200, [0.3, -0.2], seed=4)
    g = torch.Generator().manual_seed(0)
    px, py = x[torch.randperm(300, generator=g)], y[torch.randperm(200, generator=g)]
    for unbiased in (False, True):
        ref = float(mmd(x, y, unbiased=unbiased))
        assert float(mmd(px, py, unbiased=unbiased)) == pytest.approx(ref, rel=1e-9, abs=1e-12)
        assert float(mmd(y, x, unbiased=unbiased)) == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_mmd_flattens_images_and_checks_inputs():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(50, 1, 4, 4, generator=g), torch.randn(40, 1, 4, 4, generator=g)
    assert float(mmd(a, b)) == pytest.approx(float(mmd(a.reshape(50, -1), b.reshape(40, -1))))
    with pytest.raises(ValueError, match="same shape"):
        mmd(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="at least 2"):
        mmd(torch.zeros(1, 2), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="bandwidth"):
        mmd(a, b, bandwidth=0.0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        mmd(a, b.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match="bandwidth 0"):
        mmd(torch.zeros(5, 2), torch.zeros(5, 2))


# --- sliced Wasserstein -----------------------------------------------------------------------


@pytest.mark.parametrize("d", [2, 5])
def test_sw2_of_a_shift_is_the_shift_over_sqrt_d(d):
    """y = x + delta exactly, so each projection's W2^2 is (theta . delta)^2 with no sampling
    error, and SW2^2 = |delta|^2 / d. Only the 4000 random directions add error: the relative
    sd of the estimated SW2^2 is sqrt(Var((theta . e)^2) / 4000) / (1/d), about 1.1% for d = 2
    and 1.5% for d = 5; the 5% tolerance on SW2 (10% on SW2^2) is over 6 sd.
    """
    g = torch.Generator().manual_seed(6)
    x = torch.randn(500, d, generator=g, dtype=torch.float64)
    delta = torch.randn(d, generator=g, dtype=torch.float64)
    sw = float(sliced_wasserstein(x, x + delta, 4000, generator=1))
    assert sw == pytest.approx(float(delta.norm()) / math.sqrt(d), rel=0.05)


def test_sw1_of_a_shift_in_2d():
    """In 2-D, E|theta . delta| = |delta| E|cos phi| = 2|delta| / pi (same error budget as above)."""
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    delta = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert float(sliced_wasserstein(x, x + delta, 4000, p=1)) == pytest.approx(10 / math.pi, rel=0.03)


def test_sw2_near_zero_for_the_same_law_and_matches_a_shift_between_samples():
    x, y = gaussian_pair(1000, 1000, [0.0, 0.0], seed=8)
    assert float(sliced_wasserstein(x, y)) < 0.16
    # Independent samples of N(0, I) and N(delta, I): SW2^2 = |delta|^2/2 + sampling error.
    x, y = gaussian_pair(4000, 4000, [2.0, 0.0], seed=9)
    assert float(sliced_wasserstein(x, y, 2000)) == pytest.approx(math.sqrt(2.0), rel=0.05)


def test_sw_with_unequal_sizes_is_exact():
    """Duplicating every point leaves the empirical law unchanged: distance 0 exactly."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(37, 3, generator=g, dtype=torch.float64)
    assert float(sliced_wasserstein(x, x.repeat(3, 1))) < 1e-12
    shift = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    same_n = float(sliced_wasserstein(x, x + shift, generator=4))
    assert float(sliced_wasserstein(x, (x + shift).repeat(2, 1), generator=4)) == pytest.approx(same_n, rel=1e-10)


@pytest.mark.parametrize("p", [1, 2])
def test_sw_in_1d_is_the_exact_wasserstein_distance(p):
    """In 1-D every direction is +-1, so SW_p = W_p; compare with the quantile integral on the
    grid of 1/lcm(n, m) (where both quantile functions are constant), and with scipy for W1."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(12, 1, generator=g, dtype=torch.float64)
    y = 0.5 + 2 * torch.rand(8, 1, generator=g, dtype=torch.float64)
    L = math.lcm(12, 8)
    u = (np.arange(L) + 0.5) / L
    qx = np.sort(x[:, 0].numpy())[np.ceil(u * 12).astype(int) - 1]
    qy = np.sort(y[:, 0].numpy())[np.ceil(u * 8).astype(int) - 1]
    exact = np.mean(np.abs(qx - qy) ** p) ** (1 / p)
    assert float(sliced_wasserstein(x, y, 3, p=p)) == pytest.approx(exact, rel=1e-10)
    if p == 1:
        from scipy.stats import wasserstein_distance

        assert exact == pytest.approx(wasserstein_distance(x[:, 0].numpy(), y[:, 0].numpy()), rel=1e-10)


def test_sw_is_seeded_symmetric_and_permutation_invariant():
    x, y = gaussian_pair(200, 300, [0.4, 0.1], seed=12)
    ref = float(sliced_wasserstein(x, y))
    assert float(sliced_wasserstein(x, y)) == ref  # default seed 0
    assert float(sliced_wasserstein(x, y, generator=torch.Generator().manual_seed(0))) == ref
    assert float(sliced_wasserstein(x, y, generator=1)) != ref
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(1))
    assert float(sliced_wasserstein(x[perm], y)) == pytest.approx(ref, rel=1e-12)
    assert float(sliced_wasserstein(y, x)) == pytest.approx(ref, rel=1e-12)


def test_sw_checks_inputs():
    x = torch.zeros(10, 2)
    with pytest.raises(ValueError, match="p must be"):
        sliced_wasserstein(x, x, p=3)
    with pytest.raises(ValueError, match="n_projections"):
        sliced_wasserstein(x, x, 0)
    with pytest.raises(ValueError, match="same shape"):
        sliced_wasserstein(x, torch.zeros(10, 3))
    with pytest.raises(TypeError, match="generator"):
        sliced_wasserstein(x, x, generator="0")


# --- mode weights -----------------------------------------------------------------------------


def test_mode_weights_counts_nearest_centres():
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    samples = torch.tensor([[0.1, 0.0], [9.0, 1.0], [8.0, 0.0], [0.0, 12.0], [5.0, 5.1]])
    w = mode_weights(samples, centers)
    assert w.dtype == torch.float64
    assert w.tolist() == pytest.approx([0.2, 0.4, 0.4])
    # Within distance 2.5 of a mode: the midpoint sample (5, 5.1) counts for none.
    assert mode_weights(samples, centers, max_distance=2.5).tolist() == pytest.approx([0.2, 0.4, 0.2])
    assert float(mode_weights(samples, centers, max_distance=2.5).sum()) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="max_distance"):
        mode_weights(samples, centers, max_distance=0.0)
    with pytest.raises(ValueError, match="same shape"):
        mode_weights(samples, torch.zeros(3, 3))
