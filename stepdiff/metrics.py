r"""Distances between two samples, used by the tests and the chapters to say "close to the data".

- {func}`mmd`: the squared maximum mean discrepancy with a Gaussian (RBF) kernel.
- {func}`sliced_wasserstein`: the sliced 2-Wasserstein (or 1-Wasserstein) distance.
- {func}`mode_weights`: the fraction of samples nearest each mode of a mixture.

Samples are tensors ``[n, ...]``; everything after the first axis is flattened, so images
``[n, C, H, W]`` work as points of $\mathbb R^{CHW}$. The arithmetic is in float64 on the device
of the inputs, and the results are float64 tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mmd", "median_bandwidth", "sliced_wasserstein", "mode_weights"]

f64 = torch.float64


def _flat(s: Tensor, name: str, min_n: int) -> Tensor:
    """A sample ``[n, ...]`` as float64 ``[n, D]``; it must have at least ``min_n`` points."""
    if not isinstance(s, Tensor) or s.ndim < 1:
        raise ValueError(f"{name} must be a tensor of shape [n, ...]; got {type(s).__name__}")
    if s.shape[0] < min_n:
        raise ValueError(f"{name} needs at least {min_n} points; got shape {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    return s.reshape(s.shape[0], -1).to(f64)


def _flat_pair(x: Tensor, y: Tensor, names: tuple[str, str] = ("x", "y"), min_n: int = 2):
    """Both samples as float64 ``[n, D]`` and ``[m, D]``, after checking that their points agree."""
    a, b = _flat(x, names[0], min_n), _flat(y, names[1], min_n)
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(
            f"{names[0]} and {names[1]} must hold points of the same shape; got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.device != y.device:
        raise ValueError(f"{names[0]} is on {x.device} but {names[1]} is on {y.device}")
    return a, b


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    r"""$\|a_i - b_j\|^2$ for all pairs, ``[n, m]`` (clamped at 0 against rounding)."""
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T).clamp(min=0.0)


def median_bandwidth(x: Tensor, y: Tensor, max_points: int = 1000) -> Tensor:
    r"""The median heuristic: $h = \mathrm{median}_{i<j}\|z_i - z_j\|$ over the pooled $z = (x, y)$.

    The lower median of the $\binom{N}{2}$ pairwise distances (``torch.median``). A median of
    a few hundred thousand distances is as good a bandwidth as one of millions and costs
    far less, so when the pooled sample has more than ``max_points`` points an evenly
    strided subset of ``max_points`` of them is used (deterministic: the same data give
    the same bandwidth).
    """
    x, y = _flat_pair(x, y)
    z = torch.cat([x, y])
    if z.shape[0] > max_points:
        z = z[torch.linspace(0, z.shape[0] - 1, max_points, device=z.device).long()]
    d2 = _sq_dists(z, z)
    i, j = torch.triu_indices(z.shape[0], z.shape[0], offset=1, device=z.device)
    return d2[i, j].median().sqrt()


def mmd(x: Tensor, y: Tensor, bandwidth: float | Tensor | None = None, *, unbiased: bool = False) -> Tensor:
    r"""The squared maximum mean discrepancy $\mathrm{MMD}^2(x, y)$ with a Gaussian kernel.

    Kernel $k(a, b) = \exp\!\big(-\|a - b\|^2 / (2h^2)\big)$, with bandwidth $h$ = ``bandwidth``
    or, by default, the median heuristic {func}`median_bandwidth` on the pooled sample.
    With $K^{xx}_{ij} = k(x_i, x_j)$ and so on, the default (biased, V-statistic) estimate is

    $$\widehat{\mathrm{MMD}}{}^2_b = \frac1{n^2}\sum_{i,j}K^{xx}_{ij}
    + \frac1{m^2}\sum_{i,j}K^{yy}_{ij} - \frac2{nm}\sum_{i,j}K^{xy}_{ij} \;\ge 0,$$

    the squared RKHS distance between the two empirical mean embeddings. For two samples of
    the same law its expectation is about $(1/n + 1/m)(1 - \mathbb E\,k(x, x'))$, not 0.
    ``unbiased=True`` drops the diagonals $i = j$ from the first two sums (dividing by
    $n(n-1)$ and $m(m-1)$): the U-statistic, with expectation exactly
    $\mathrm{MMD}^2$, which can come out negative. Because the Gaussian kernel is
    characteristic, $\mathrm{MMD} = 0$ only for equal laws. ``x``: ``[n, ...]``, ``y``:
    ``[m, ...]``; returns a float64 scalar. Cost $O((n+m)^2 D)$ time and $O((n+m)^2)$ memory.
    """
    x, y = _flat_pair(x, y)
    if bandwidth is None:
        h = median_bandwidth(x, y)
        if not float(h) > 0:
            raise ValueError("the median heuristic gave bandwidth 0 (most points coincide)")
    else:
        h = torch.as_tensor(bandwidth, dtype=f64, device=x.device)
        if h.ndim != 0 or not float(h) > 0:
            raise ValueError(f"bandwidth must be a positive number; got {bandwidth!r}")
    gamma = 1.0 / (2.0 * h**2)
    k_xx = torch.exp(-gamma * _sq_dists(x, x))
    k_yy = torch.exp(-gamma * _sq_dists(y, y))
    k_xy = torch.exp(-gamma * _sq_dists(x, y))
    n, m = x.shape[0], y.shape[0]
    if unbiased:
        term_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
        term_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    else:
        term_xx, term_yy = k_xx.mean(), k_yy.mean()
    return term_xx + term_yy - 2.0 * k_xy.mean()


def _as_generator(generator: torch.Generator | int | None, device: torch.device):
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        kind = type(generator).__name__
        raise TypeError(f"generator must be a torch.Generator, an int seed or None; got {kind}")
    return torch.Generator(device=device).manual_seed(generator)


def _quantile_grid(n: int, m: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    r"""Where the empirical quantile functions of $n$ and $m$ points jump, merged.

    Returns the widths of the pieces of $[0, 1]$ between consecutive jumps and, for each
    piece, the index of the order statistic of each sample that is its quantile there.
    """
    jumps_x = torch.arange(1, n + 1, device=device, dtype=f64) / n
    jumps_y = torch.arange(1, m + 1, device=device, dtype=f64) / m
    u = torch.cat([jumps_x, jumps_y]).unique()  # sorted
    widths = torch.diff(u, prepend=torch.zeros(1, device=device, dtype=f64))
    mid = u - widths / 2
    ix = torch.clamp(torch.ceil(mid * n).long() - 1, 0, n - 1)
    iy = torch.clamp(torch.ceil(mid * m).long() - 1, 0, m - 1)
    return widths, ix, iy


def sliced_wasserstein(
    x: Tensor,
    y: Tensor,
    n_projections: int = 512,
    *,
    p: int = 2,
    generator: torch.Generator | int | None = 0,
) -> Tensor:
    r"""The sliced $p$-Wasserstein distance between two samples ($p = 2$ by default, or $p = 1$).

    $$\mathrm{SW}_p(\mu, \nu) = \Big(\mathbb E_{\theta\sim U(S^{D-1})}\,
    W_p^p\big(\theta_\#\mu,\ \theta_\#\nu\big)\Big)^{1/p},\qquad
    W_p^p = \int_0^1 \big|F^{-1}_{\theta\cdot x}(u) - F^{-1}_{\theta\cdot y}(u)\big|^p\,du,$$

    the expectation estimated with ``n_projections`` directions $\theta$ drawn uniformly on
    the sphere (normalised Gaussians) from ``generator`` (an ``int`` seed, by default 0, so
    the same call gives the same number). Each 1-D distance between the two empirical laws
    is exact: by sorting when $n = m$, and for $n \ne m$ by integrating the two step quantile
    functions over the merged grid of their jumps. For $y = x + \delta$ (a pure shift),
    $W_2^2(\theta_\#\mu, \theta_\#\nu) = (\theta\cdot\delta)^2$, so
    $\mathrm{SW}_2 = \|\delta\|/\sqrt D$. ``x``: ``[n, ...]``, ``y``: ``[m, ...]``;
    returns a float64 scalar in the units of the data.
    """
    x, y = _flat_pair(x, y)
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2; got {p!r}")
    if isinstance(n_projections, bool) or not isinstance(n_projections, int) or n_projections < 1:
        raise ValueError(f"n_projections must be a positive integer; got {n_projections!r}")
    g = _as_generator(generator, x.device)
    theta = torch.randn(x.shape[1], n_projections, generator=g, device=x.device, dtype=f64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    # Sorted projections are the empirical quantiles. Project as [L, n] so that each
    # direction's values are contiguous: sorting along the last axis is several times faster.
    px = torch.sort(theta.T @ x.T, dim=1).values  # [L, n]
    py = torch.sort(theta.T @ y.T, dim=1).values  # [L, m]
    n, m = px.shape[1], py.shape[1]
    if n == m:
        cost = (px - py).abs().pow(p).mean(1)
    else:
        widths, ix, iy = _quantile_grid(n, m, x.device)
        cost = (widths[None, :] * (px[:, ix] - py[:, iy]).abs().pow(p)).sum(1)
    return cost.mean().pow(1.0 / p)


def mode_weights(samples: Tensor, centers: Tensor, *, max_distance: float | None = None) -> Tensor:
    r"""The fraction of samples nearest each mode: $\hat\pi_k = \frac1n\#\{i : k_i = k\}$.

    Here $k_i = \arg\min_j \|x_i - c_j\|$ is the mode nearest sample $i$.

    ``samples``: ``[n, ...]``; ``centers``: ``[K, ...]`` (the modes, e.g. a mixture's
    ``means``). With ``max_distance`` a sample farther than that from every centre counts
    for no mode, so the weights sum to the fraction of samples near some mode (a sampler
    that leaves mass between the modes shows up as a sum below 1). Returns float64 ``[K]``.

    ```python
    >>> mode_weights(torch.tensor([[0.1], [0.9], [1.2]]), torch.tensor([[0.0], [1.0]]))
    tensor([0.3333, 0.6667], dtype=torch.float64)
    >>> mode_weights(torch.tensor([[0.1], [0.5], [1.2]]), torch.tensor([[0.0], [1.0]]), max_distance=0.3)
    tensor([0.3333, 0.3333], dtype=torch.float64)

    ```
    """
    x, c = _flat_pair(samples, centers, ("samples", "centers"), min_n=1)
    d2 = _sq_dists(x, c)
    nearest = d2.argmin(1)
    keep = torch.ones_like(nearest, dtype=torch.bool)
    if max_distance is not None:
        if not max_distance > 0:
            raise ValueError(f"max_distance must be positive; got {max_distance}")
        keep = d2.min(1).values <= max_distance**2
    counts = torch.bincount(nearest[keep], minlength=c.shape[0]).to(f64)
    return counts / x.shape[0]
