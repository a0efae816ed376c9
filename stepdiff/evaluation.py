r"""The numbers every image chapter reports: Fréchet distance, precision and recall, memorisation,
conditional accuracy, and the errors of generated "shapes" scenes by kind.

Features are the penultimate activations of an evaluation classifier
({mod}`stepdiff.classifiers`), ``[n, D]``; everything here computes in float64 on the device of
its inputs and returns Python numbers (or tensors where a per-sample answer is the point).

- {func}`frechet_distance` between two feature sets, always with the two sample counts
  ({class}`FrechetDistance`), and {func}`frechet_floor`, the distance between two disjoint real
  sets at the same counts: the value a perfect generator would get. Report both.
- {func}`precision_recall` with $k$-nearest-neighbour manifolds (Kynkäänniemi et al. 2019).
- {func}`memorisation`: each sample's distance to its nearest training image, in pixels and
  in features, and the fraction closer than a threshold.
- {func}`class_accuracy` and {func}`attribute_accuracy`: how often the classifier reads back
  what was asked for; {func}`scene_errors`: every error of a generated scene, by kind.
- {func}`evaluate_samples`: all of the above in one call, as a JSON-ready dict.

Cost for 10,000 images, in CPU seconds of one core (PyTorch 2.13, this project's CPU machine,
``torch.set_num_threads(1)``; wall time was 5-8x longer there because other jobs shared the
two cores):

| step | 1x8x8 digits | 1x16x16 digits | 3x32x32 shapes |
|---|---|---|---|
| features, ``DigitsCNN`` (digits) or ``ShapesClassifier`` (shapes) | 2.0 | 4.8 | 12.6 |
| features, ``DigitsMLP`` | 0.02 | | |
| Fréchet distance, 10,000 vs 10,000 (width 128 / 256) | 0.08 | 0.06 | 0.23 |
| precision and recall, 10,000 vs 10,000 | | 13 | 15 |
| memorisation in pixels, 10,000 vs 10,000 | | 3.3 | 19 |
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

__all__ = [
    "FrechetDistance",
    "gaussian_moments",
    "frechet_distance_from_moments",
    "frechet_distance",
    "frechet_floor",
    "precision_recall",
    "nearest_neighbours",
    "memorisation",
    "class_accuracy",
    "attribute_accuracy",
    "ERROR_KINDS",
    "scene_errors",
    "MULTI_OBJECT_KINDS",
    "multi_object_share",
    "extract_features",
    "evaluate_samples",
]

f64 = torch.float64


def _features(x: Tensor, name: str, min_n: int = 2) -> Tensor:
    """A feature set ``[n, ...]`` as float64 ``[n, D]``, checked."""
    if not isinstance(x, Tensor) or x.ndim < 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor [n, D] (or [n, ...]); got {shape}")
    if x.shape[0] < min_n:
        raise ValueError(f"{name} needs at least {min_n} rows; got {x.shape[0]}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    return x.reshape(x.shape[0], -1).to(f64)


def _pair(a: Tensor, b: Tensor, names: tuple[str, str], min_n: int = 2) -> tuple[Tensor, Tensor]:
    x, y = _features(a, names[0], min_n), _features(b, names[1], min_n)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{names[0]} has {x.shape[1]} features per row but {names[1]} has {y.shape[1]}")
    return x, y.to(x.device)


# --- Fréchet distance -------------------------------------------------------------------------


@dataclass(frozen=True)
class FrechetDistance:
    r"""A Fréchet distance with the sample counts it was computed from.

    ``value`` the distance (squared units of the features, as FID), ``n1`` and ``n2`` the two
    counts; for an average over ``repeats`` draws ({func}`frechet_floor`), ``std`` is their
    standard deviation. ``float(fd)`` is the value.
    """

    value: float
    n1: int
    n2: int
    repeats: int = 1
    std: float = 0.0

    def __float__(self) -> float:
        return self.value

    def as_dict(self) -> dict:
        return asdict(self)


def gaussian_moments(features: Tensor) -> tuple[Tensor, Tensor]:
    r"""The mean $\mu$ ``[D]`` and the unbiased covariance $\Sigma$ ``[D, D]`` of ``features`` ``[n, D]`` (float64)."""
    x = _features(features, "features")
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def _sqrt_psd(m: Tensor) -> Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigendecomposition)."""
    vals, vecs = torch.linalg.eigh(0.5 * (m + m.T))
    return (vecs * vals.clamp(min=0.0).sqrt()) @ vecs.T


def frechet_distance_from_moments(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    r"""The Fréchet (2-Wasserstein) distance between $\mathcal N(\mu_1, \Sigma_1)$ and $\mathcal N(\mu_2, \Sigma_2)$:

    $$d^2 = \|\mu_1 - \mu_2\|^2 + \operatorname{Tr}\Sigma_1 + \operatorname{Tr}\Sigma_2
    - 2\operatorname{Tr}\big(\Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2}\big)^{1/2}.$$

    $\Sigma_1\Sigma_2$ is not symmetric, but it is similar to the symmetric positive
    semi-definite $\Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2}$, so
    $\operatorname{Tr}(\Sigma_1\Sigma_2)^{1/2} = \sum_i\sqrt{\lambda_i}$ over the eigenvalues of
    the latter: two symmetric eigendecompositions in float64, no complex arithmetic and no
    iteration (``scipy.linalg.sqrtm`` of the product can return an imaginary part when the
    product is nearly singular). Rounding can leave tiny negative eigenvalues; they are clamped
    to 0, and the result to $\ge 0$. Returns a float.
    """
    mu1, mu2 = torch.as_tensor(mu1, dtype=f64), torch.as_tensor(mu2, dtype=f64)
    cov1, cov2 = torch.as_tensor(cov1, dtype=f64), torch.as_tensor(cov2, dtype=f64)
    if mu1.ndim != 1 or mu2.shape != mu1.shape:
        raise ValueError(f"mu1 and mu2 must be vectors of one length; got {tuple(mu1.shape)}, {tuple(mu2.shape)}")
    D = mu1.shape[0]
    for name, c in (("cov1", cov1), ("cov2", cov2)):
        if c.shape != (D, D):
            raise ValueError(f"{name} must have shape [{D}, {D}]; got {tuple(c.shape)}")
        if not torch.allclose(c, c.T, rtol=1e-8, atol=1e-10 * float(c.abs().max().clamp(min=1e-300))):
            raise ValueError(f"{name} must be symmetric")
    cov2 = cov2.to(cov1.device)
    s1 = _sqrt_psd(cov1)
    inner = s1 @ cov2 @ s1
    eig = torch.linalg.eigvalsh(0.5 * (inner + inner.T)).clamp(min=0.0)
    d2 = (mu1 - mu2.to(mu1.device)).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2.0 * eig.sqrt().sum()
    return max(float(d2), 0.0)


def frechet_distance(features1: Tensor, features2: Tensor) -> FrechetDistance:
    r"""The Fréchet distance between Gaussians fitted to two feature sets ``[n1, D]``, ``[n2, D]``.

    The means and unbiased covariances of the two sets go into
    {func}`frechet_distance_from_moments`. This is FID's formula (Heusel et al. 2017) in
    whatever feature space is given. It is biased upward at finite counts (by roughly
    $\operatorname{Tr}\Sigma/n$ per set), which is why it is only comparable at equal counts and
    is reported beside {func}`frechet_floor`. Returns a {class}`FrechetDistance` carrying the
    counts.
    """
    x, y = _pair(features1, features2, ("features1", "features2"))
    mu1, c1 = gaussian_moments(x)
    mu2, c2 = gaussian_moments(y)
    return FrechetDistance(frechet_distance_from_moments(mu1, c1, mu2, c2), x.shape[0], y.shape[0])


def _check_count(name: str, n: int, available: int, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"{name} must be an integer >= 2; got {n!r}")
    if n > available:
        raise ValueError(f"{name} = {n} but {what} has only {available} rows")
    return n


def frechet_floor(
    real1: Tensor, real2: Tensor, n1: int, n2: int | None = None, *, repeats: int = 1, seed: int = 0
) -> FrechetDistance:
    r"""The real-vs-real Fréchet distance at counts ``(n1, n2)``: the floor a perfect generator reaches.

    ``real1`` and ``real2`` are features of two **disjoint** sets of real images (e.g. training
    and held-out images). Each repeat draws ``n1`` rows of ``real1`` and ``n2`` rows of
    ``real2`` (all of ``real2`` by default) without replacement, from a generator seeded with
    ``seed``, and computes {func}`frechet_distance`; the result is the mean over the
    $R$ = ``repeats`` draws, $\bar d = \frac1R\sum_r d(X_r, Y_r)$ with $X_r\subset$ ``real1``
    ($|X_r| = n_1$) and $Y_r \subset$ ``real2`` ($|Y_r| = n_2$), with their standard deviation.
    To compare with samples, use ``n1`` = the number of samples
    and the same ``real2`` as the samples were compared with.
    """
    x, y = _pair(real1, real2, ("real1", "real2"))
    n1 = _check_count("n1", n1, x.shape[0], "real1")
    n2 = y.shape[0] if n2 is None else _check_count("n2", n2, y.shape[0], "real2")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer; got {repeats!r}")
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(repeats):
        i = torch.randperm(x.shape[0], generator=g)[:n1].to(x.device)
        j = torch.randperm(y.shape[0], generator=g)[:n2].to(y.device)
        values.append(frechet_distance(x[i], y[j]).value)
    v = torch.tensor(values, dtype=f64)
    std = float(v.std()) if repeats > 1 else 0.0
    return FrechetDistance(float(v.mean()), n1, n2, repeats, std)


# --- nearest neighbours, precision and recall -------------------------------------------------


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    r"""$\|a_i - b_j\|^2$ ``[n, m]``, clamped at 0 against rounding."""
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T).clamp(min=0.0)


def _kth_neighbour_radius(x: Tensor, k: int, chunk: int) -> Tensor:
    """Distance from each row to its k-th nearest other row ``[n]``."""
    radii = []
    for s in range(0, x.shape[0], chunk):
        d2 = _sq_dists(x[s : s + chunk], x)
        # the smallest entry of each row is the point itself (0), so take the (k+1)-th smallest
        radii.append(d2.topk(k + 1, dim=1, largest=False).values[:, k].sqrt())
    return torch.cat(radii)


def _inside_any_ball(queries: Tensor, centres: Tensor, radii: Tensor, chunk: int) -> Tensor:
    """Whether each query lies in some ball ``|q - centre_j| <= radius_j`` ``[n]`` (bool)."""
    r2 = radii.pow(2)[None, :]
    out = []
    for s in range(0, queries.shape[0], chunk):
        out.append((_sq_dists(queries[s : s + chunk], centres) <= r2).any(1))
    return torch.cat(out)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, *, chunk: int = 1024) -> dict:
    r"""Improved precision and recall (Kynkäänniemi et al. 2019) with $k$-NN manifolds.

    Each set's manifold is the union of balls around its points, the radius of each ball
    being the distance to the point's $k$-th nearest neighbour within its own set:

    $$\mathrm{precision} = \frac1{|F|}\sum_{f\in F}\mathbb 1\big[f \in \mathcal M(R)\big],\qquad
    \mathrm{recall} = \frac1{|R|}\sum_{r\in R}\mathbb 1\big[r \in \mathcal M(F)\big],\qquad
    \mathcal M(S) = \bigcup_{s\in S} B\big(s, \mathrm{NN}_k(s, S)\big).$$

    Precision is the fraction of samples that look real (quality), recall the fraction of real
    data the samples cover (diversity). Both lie in $[0, 1]$. ``real`` ``[n, D]``, ``fake``
    ``[m, D]``, both with more than ``k`` rows; distances in chunks of ``chunk`` rows so memory
    stays $O(\text{chunk}\cdot\max(n, m))$. Returns ``{"precision", "recall", "k", "n_real",
    "n_fake"}``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    r, f = _pair(real, fake, ("real", "fake"), min_n=k + 1)
    r_real = _kth_neighbour_radius(r, k, chunk)
    r_fake = _kth_neighbour_radius(f, k, chunk)
    precision = _inside_any_ball(f, r, r_real, chunk).to(f64).mean()
    recall = _inside_any_ball(r, f, r_fake, chunk).to(f64).mean()
    return {"precision": float(precision), "recall": float(recall), "k": k, "n_real": r.shape[0], "n_fake": f.shape[0]}


def nearest_neighbours(queries: Tensor, reference: Tensor, *, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    r"""For each row of ``queries`` ``[n, ...]``, its nearest row of ``reference`` ``[m, ...]``.

    Returns ``(distance [n], index [n])`` with the root-mean-square distance
    $\|q - r\|_2/\sqrt D$ (float64; $D$ the entries per row, so a threshold means the same at
    any resolution: on images in $[-1, 1]$, 0.05 is a typical per-pixel difference of 0.05).
    """
    q, r = _pair(queries, reference, ("queries", "reference"), min_n=1)
    dist, index = [], []
    for s in range(0, q.shape[0], chunk):
        d2, i = _sq_dists(q[s : s + chunk], r).min(1)
        dist.append(d2.sqrt())
        index.append(i)
    return torch.cat(dist) / math.sqrt(q.shape[1]), torch.cat(index)


def memorisation(
    samples: Tensor,
    train: Tensor,
    *,
    threshold: float | None = None,
    sample_features: Tensor | None = None,
    train_features: Tensor | None = None,
    feature_threshold: float | None = None,
) -> dict:
    r"""How close each sample is to its nearest training image: copies show up as distances near 0.

    Per sample $x_i$, $d_i = \min_j \|x_i - t_j\|_2/\sqrt D$ over the training images $t_j$,
    and for a threshold $\tau$ the fraction $\frac1n\#\{i : d_i \le \tau\}$.
    ``samples`` ``[n, C, H, W]`` and ``train`` ``[m, C, H, W]`` in pixel space; optionally their
    features ``[n, D]``, ``[m, D]`` for the same measure in feature space. Distances are
    root-mean-square per entry ({func}`nearest_neighbours`). Returns a dict with, per space
    (``"pixel"`` and, with features, ``"feature"``): ``distance`` ``[n]`` and ``index`` ``[n]``
    (tensors: the nearest training row), ``min``, ``median``, and, when a threshold is given,
    ``threshold`` and ``fraction_within`` (the fraction of samples closer than it, i.e. the
    suspected copies). A sensible threshold comes from real data: the distances of held-out
    images to the training set ({func}`nearest_neighbours`) show how close a new image gets
    without being a copy.
    """
    report: dict = {"n_samples": int(samples.shape[0]), "n_train": int(train.shape[0])}
    spaces = [("pixel", samples, train, threshold)]
    if (sample_features is None) != (train_features is None):
        raise ValueError("give both sample_features and train_features, or neither")
    if sample_features is not None:
        if sample_features.shape[0] != samples.shape[0] or train_features.shape[0] != train.shape[0]:
            raise ValueError("sample_features / train_features must have one row per sample / training image")
        spaces.append(("feature", sample_features, train_features, feature_threshold))
    elif feature_threshold is not None:
        raise ValueError("feature_threshold needs sample_features and train_features")
    for name, q, r, thr in spaces:
        d, i = nearest_neighbours(q, r)
        entry = {"distance": d, "index": i, "min": float(d.min()), "median": float(d.median())}
        if thr is not None:
            if not thr > 0:
                raise ValueError(f"the {name} threshold must be positive; got {thr}")
            entry["threshold"] = float(thr)
            entry["fraction_within"] = float((d <= thr).to(f64).mean())
        report[name] = entry
    return report


# --- conditional accuracy ---------------------------------------------------------------------


def class_accuracy(predicted: Tensor, asked: Tensor, n_classes: int | None = None) -> dict:
    r"""The fraction of samples whose class the classifier reads as the one asked for,
    $\frac1n\sum_i \mathbb 1[\hat y_i = y_i]$.

    ``predicted`` and ``asked``: ``LongTensor [n]``. Returns ``{"accuracy", "n", "per_class",
    "confusion"}``: per-class accuracy (``None`` for a class never asked) and the confusion
    matrix ``confusion[asked][predicted]`` as nested lists of counts.
    """
    p, a = torch.as_tensor(predicted), torch.as_tensor(asked)
    if p.ndim != 1 or p.shape != a.shape or p.numel() == 0:
        raise ValueError(
            f"predicted and asked must be non-empty [n] tensors of one shape; got {tuple(p.shape)}, {tuple(a.shape)}"
        )
    if p.is_floating_point() or a.is_floating_point():
        raise ValueError("predicted and asked must be integer class ids (call the classifier's predict first)")
    K = int(max(int(p.max()), int(a.max())) + 1) if n_classes is None else n_classes
    if int(p.min()) < 0 or int(a.min()) < 0 or int(p.max()) >= K or int(a.max()) >= K:
        raise ValueError(f"class ids must lie in 0..{K - 1}")
    confusion = torch.zeros(K, K, dtype=torch.long)
    confusion.index_put_((a.cpu(), p.cpu()), torch.ones_like(a.cpu()), accumulate=True)
    rows = confusion.sum(1)
    per_class = [int(confusion[k, k]) / int(rows[k]) if rows[k] > 0 else None for k in range(K)]
    correct = int(confusion.diagonal().sum())
    return {
        "accuracy": correct / p.numel(),
        "n": int(p.numel()),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


_ATTRIBUTES = ("shape", "colour", "size")


def _check_targets(t: Tensor, name: str) -> Tensor:
    t = torch.as_tensor(t)
    if t.ndim != 3 or t.shape[1:] != (9, 3) or t.is_floating_point():
        raise ValueError(
            f"{name} must be an integer tensor [N, 9, 3] (cells x (shape, colour, size)); got {tuple(t.shape)}"
        )
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{name} holds negative ids")
    return t.cpu()


def attribute_accuracy(predicted: Tensor, asked: Tensor) -> dict:
    r"""Per-attribute accuracy of scenes read back cell by cell (targets ``[N, 9, 3]`` as in {mod}`stepdiff.shapes`).

    For attribute $h$: $\frac1{|O|}\sum_{(n, c)\in O}\mathbb 1[\hat a_{nch} = a_{nch}]$, $O$ the
    (scene, cell) pairs where an object was asked for.
    Over the cells where an object was asked for: the fraction whose shape, colour and size
    the classifier reads as asked (an empty reading counts as wrong); ``occupancy``: over all
    cells, the fraction whose emptiness is read right; ``n_objects`` the number of asked objects.
    """
    p, a = _check_targets(predicted, "predicted"), _check_targets(asked, "asked")
    if p.shape != a.shape:
        raise ValueError(f"predicted and asked must have the same shape; got {tuple(p.shape)}, {tuple(a.shape)}")
    occupied = a[..., 0] > 0
    n_obj = int(occupied.sum())
    out: dict = {"n_objects": n_obj}
    for h, name in enumerate(_ATTRIBUTES):
        out[name] = float((p[..., h] == a[..., h])[occupied].to(f64).mean()) if n_obj else None
    out["occupancy"] = float(((p[..., 0] > 0) == occupied).to(f64).mean())
    return out


# --- scene errors by kind ---------------------------------------------------------------------

ERROR_KINDS = (
    "wrong_shape",
    "wrong_colour",
    "wrong_size",
    "colour_leak",
    "wrong_position",
    "missing_object",
    "extra_object",
    "wrong_relation",
)
"""The kinds of scene error {func}`scene_errors` counts."""


def _asked_objects(spec, vocab) -> tuple[list[tuple[int | None, ...]], list[tuple[int, str, int]]]:
    """Asked objects as ``(shape, colour, size, cell)`` ids (``None`` where open) and relations."""
    objects = []
    for o in spec.objects:
        ids = []
        for h, name in enumerate(_ATTRIBUTES):
            value = getattr(o, name)
            if value is None:
                ids.append(None)
            elif isinstance(value, str):
                if value not in vocab[h]:
                    raise ValueError(f"unknown {name} {value!r} in an asked scene; choose one of {vocab[h]}")
                ids.append(1 + vocab[h].index(value))
            else:
                ids.append(int(value))
        cell = getattr(o, "cell", None)
        objects.append((*ids, None if cell is None else int(cell)))
    return objects, list(getattr(spec, "relations", ()))


def _pair_errors(want: tuple, got: tuple, other_colours: set[int]) -> list[str]:
    """Error kinds of reading asked object ``want`` as predicted object ``got`` (both (s, c, z, cell))."""
    errors = []
    if want[0] is not None and got[0] != want[0]:
        errors.append("wrong_shape")
    if want[1] is not None and got[1] != want[1]:
        errors.append("colour_leak" if got[1] in other_colours else "wrong_colour")
    if want[2] is not None and got[2] != want[2]:
        errors.append("wrong_size")
    if want[3] is not None and got[3] != want[3]:
        errors.append("wrong_position")
    return errors


def _read_scene(
    row: Tensor, asked: list[tuple], relations: list[tuple[int, str, int]], relation_of
) -> tuple[list[str], list[list[str] | None], list[tuple | None]]:
    """The errors of one scene under the reading that explains it with the fewest errors, each
    asked object's own errors under that reading (``None``: missing), and the predicted object
    ``(shape, colour, size, cell)`` it was read as (``None``: missing)."""
    predicted = [(int(row[c, 0]), int(row[c, 1]), int(row[c, 2]), c) for c in range(9) if int(row[c, 0]) > 0]
    colours = [o[1] for o in asked]
    others = [
        {c for j, c in enumerate(colours) if j != i and c is not None and c != colours[i]} for i in range(len(asked))
    ]
    pair = [[_pair_errors(w, g, others[i]) for g in predicted] for i, w in enumerate(asked)]
    best: tuple | None = None
    # Each asked object is read as one predicted object or as missing; leftover predicted objects
    # are extra. At most 3 asked and 9 predicted objects, so enumerating every reading is cheap.
    for choice in itertools.product(range(-1, len(predicted)), repeat=len(asked)):
        used = [c for c in choice if c >= 0]
        if len(used) != len(set(used)):
            continue
        errors: list[str] = []
        for i, c in enumerate(choice):
            errors += pair[i][c] if c >= 0 else ["missing_object"]
        errors += ["extra_object"] * (len(predicted) - len(used))
        for i, word, j in relations:
            if choice[i] >= 0 and choice[j] >= 0:
                ci, cj = predicted[choice[i]][3], predicted[choice[j]][3]
                if relation_of(ci, cj) != word:
                    errors.append("wrong_relation")
        key = (len(errors), -len(used))
        if best is None or key < best[0]:
            best = (key, errors, choice)
    _, errors, choice = best
    return (errors, [pair[i][c] if c >= 0 else None for i, c in enumerate(choice)],
            [predicted[c] if c >= 0 else None for c in choice])


_ATTRIBUTE_ERRORS = {"shape": ("wrong_shape",), "colour": ("wrong_colour", "colour_leak"), "size": ("wrong_size",)}


def scene_errors(predicted: Tensor, asked: Tensor | Sequence, *, per_scene: bool = False) -> dict:
    r"""Read generated scenes back and count their errors by kind ({data}`ERROR_KINDS`).

    ``predicted``: the classifier's reading, targets ``LongTensor [N, 9, 3]`` (per cell
    ``(shape, colour, size)`` ids, 0 = empty, as in {mod}`stepdiff.shapes`). ``asked``: what each
    scene was asked to show, either targets ``[N, 9, 3]`` (every attribute and cell stated) or a
    sequence of ``N`` caption specifications ({class}`stepdiff.shapes.CaptionSpec`: objects whose
    shape, colour, size and cell may be ``None`` when the caption leaves them open, and relations
    ``(i, word, j)``: object i is ``word`` object j, judged from the cells by
    {func}`stepdiff.shapes.relation`).

    Each scene is read under the assignment $\pi$ of asked objects to predicted objects (or to
    nothing) that explains it with the fewest errors, $\pi^* = \arg\min_\pi |E(\pi)|$ (ties: more
    objects matched), $E(\pi)$ being the list of errors below. Then:

    - a matched object can have a ``wrong_shape``, ``wrong_size`` or ``wrong_position`` (a stated
      cell), and a wrong colour: ``colour_leak`` when the colour read is one asked for another
      object of the scene (a binding error), else ``wrong_colour``;
    - an asked object matched to nothing is a ``missing_object``; a predicted object matched to
      no asked object an ``extra_object``;
    - a relation between two matched objects that their cells do not satisfy is a ``wrong_relation``.

    A scene is correct when it has no error, which for a caption is exactly
    {meth}`stepdiff.shapes.CaptionSpec.satisfied_by`. Returns a JSON-ready dict: ``n_scenes``,
    ``all_correct`` (the fraction of correct scenes), ``by_n_objects`` (``{k: {"n",
    "all_correct"}}`` by the number of asked objects), ``errors`` (count of each kind),
    ``scenes_with`` (fraction of scenes with at least one error of each kind), ``attribute_accuracy``
    (per attribute, over the asked objects that state it: matched and right), ``shape_swaps``
    (the shape's binding error: of the ``wrong_shapes`` of objects asked beside an object of
    another stated shape, how many are ``of_another_object``, and the ``expected_at_random``
    count $\sum |S_{\text{other}}| / (|S| - 1)$ had each wrong shape been drawn uniformly from the
    $|S| - 1$ shapes not asked), and, when
    ``per_scene``, ``per_scene`` (the list of each scene's error kinds).
    """
    p = _check_targets(predicted, "predicted")
    from . import shapes

    vocab = (shapes.SHAPES, shapes.COLOURS, shapes.SIZES)
    if isinstance(asked, Tensor):
        a = _check_targets(asked, "asked")
        if a.shape != p.shape:
            raise ValueError(f"predicted and asked must have the same shape; got {tuple(p.shape)}, {tuple(a.shape)}")
        specs = [
            ([(int(a[n, c, 0]), int(a[n, c, 1]), int(a[n, c, 2]), c) for c in range(9) if int(a[n, c, 0]) > 0], [])
            for n in range(a.shape[0])
        ]
    else:
        asked = list(asked)
        if len(asked) != p.shape[0]:
            raise ValueError(f"asked has {len(asked)} scenes but predicted has {p.shape[0]}")
        specs = [_asked_objects(s, vocab) for s in asked]
    for n, (objects, relations) in enumerate(specs):
        if not objects:
            raise ValueError(f"asked scene {n} has no object")
        for i, word, j in relations:
            if word not in shapes.RELATIONS or not (0 <= i < len(objects) and 0 <= j < len(objects)):
                raise ValueError(f"asked scene {n}: bad relation {(i, word, j)!r}; words are {shapes.RELATIONS}")
    counts = dict.fromkeys(ERROR_KINDS, 0)
    scenes_with = dict.fromkeys(ERROR_KINDS, 0)
    by_n: dict[int, list[int]] = {}
    attr_right = [0, 0, 0]
    attr_total = [0, 0, 0]
    all_errors = []
    # wrong shapes that are the shape asked for another object of the scene (the shape's binding
    # error), and how many of them a wrong shape drawn at random would give
    swaps = {"wrong_shapes": 0, "of_another_object": 0, "expected_at_random": 0.0}
    for n, (objects, relations) in enumerate(specs):
        errors, per_object, read_as = _read_scene(p[n], objects, relations, shapes.relation)
        for i, (o, own, got) in enumerate(zip(objects, per_object, read_as)):
            others = {q[0] for j, q in enumerate(objects) if j != i and q[0] is not None and q[0] != o[0]}
            if own is not None and "wrong_shape" in own and others:
                swaps["wrong_shapes"] += 1
                swaps["of_another_object"] += got[0] in others
                swaps["expected_at_random"] += len(others) / (len(shapes.SHAPES) - 1)
        all_errors.append(errors)
        for kind in errors:
            counts[kind] += 1
        for kind in set(errors):
            scenes_with[kind] += 1
        stats = by_n.setdefault(len(objects), [0, 0])
        stats[0] += 1
        stats[1] += not errors
        # an attribute is right when its object was matched and charged no error of its kind
        for h, name in enumerate(_ATTRIBUTES):
            for o, own in zip(objects, per_object):
                if o[h] is not None:
                    attr_total[h] += 1
                    attr_right[h] += own is not None and not any(k in own for k in _ATTRIBUTE_ERRORS[name])
    N = p.shape[0]
    report = {
        "n_scenes": N,
        "all_correct": sum(not e for e in all_errors) / N,
        "by_n_objects": {k: {"n": v[0], "all_correct": v[1] / v[0]} for k, v in sorted(by_n.items())},
        "errors": counts,
        "scenes_with": {k: v / N for k, v in scenes_with.items()},
        "shape_swaps": swaps,
        "attribute_accuracy": {
            name: (attr_right[h] / attr_total[h] if attr_total[h] else None) for h, name in enumerate(_ATTRIBUTES)
        },
    }
    if per_scene:
        report["per_scene"] = all_errors
    return report


MULTI_OBJECT_KINDS = ("colour_leak", "wrong_relation")
"""The error kinds only a scene of two or more asked objects can have: a colour leak needs a colour asked
for another object, a relation needs two objects."""


def multi_object_share(scenes: dict, kind: str) -> float:
    r"""The fraction of the scenes of two or more asked objects that have an error of ``kind``.

    ``scenes``: a {func}`scene_errors` report (or the same report read back from JSON, whose
    ``by_n_objects`` keys are strings); ``kind``: one of {data}`MULTI_OBJECT_KINDS`. The report keeps
    $s$, the fraction of all $N$ scenes with that error; since no one-object scene can have it,
    the share among the $N_{\ge 2} = \sum_{k \ge 2} N_k$ larger scenes is $s N / N_{\ge 2}$.
    """
    if kind not in MULTI_OBJECT_KINDS:
        raise ValueError(f"kind must be one of {MULTI_OBJECT_KINDS} (a one-object scene can have any other kind); "
                         f"got {kind!r}")
    try:
        n, share, by_n = scenes["n_scenes"], scenes["scenes_with"][kind], scenes["by_n_objects"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"scenes must be a scene_errors report (n_scenes, scenes_with, by_n_objects); "
                         f"missing {e}") from None
    n_multi = sum(v["n"] for k, v in by_n.items() if int(k) >= 2)
    if n_multi == 0:
        raise ValueError(f"scenes has no scene of two or more objects (by_n_objects: {sorted(by_n)})")
    return share * n / n_multi


# --- features and the one-call report ---------------------------------------------------------


@torch.no_grad()
def extract_features(classifier: Callable, images: Tensor, *, batch_size: int = 500) -> Tensor:
    r"""The features $\phi(x)$ = ``classifier.features(images)``, in batches, without gradients:
    ``[n, D]`` float32.

    The classifier is put in eval mode for the call and restored. Cost: see the module docstring
    (2 to 13 CPU seconds per 10,000 images).
    """
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError(f"images must be a tensor [n, C, H, W]; got {getattr(images, 'shape', type(images).__name__)}")
    was_training = getattr(classifier, "training", False)
    if hasattr(classifier, "eval"):
        classifier.eval()
    try:
        device = next(classifier.parameters()).device if hasattr(classifier, "parameters") else images.device
        out = [
            classifier.features(images[s : s + batch_size].to(device)).float().cpu()
            for s in range(0, images.shape[0], batch_size)
        ]
    finally:
        if was_training:
            classifier.train()
    return torch.cat(out)


@torch.no_grad()
def _predict(classifier, images: Tensor, batch_size: int) -> Tensor:
    was_training = getattr(classifier, "training", False)
    classifier.eval()
    try:
        device = next(classifier.parameters()).device
        out = [
            classifier.predict(images[s : s + batch_size].to(device)).cpu()
            for s in range(0, images.shape[0], batch_size)
        ]
    finally:
        if was_training:
            classifier.train()
    return torch.cat(out)


def evaluate_samples(
    classifier,
    samples: Tensor,
    *,
    held_out: Tensor,
    train: Tensor,
    asked: Tensor | Sequence | None = None,
    k: int = 3,
    floor_repeats: int = 3,
    memorisation_threshold: float | None = None,
    batch_size: int = 500,
    seed: int = 0,
) -> dict:
    r"""Every number of this module for one set of samples, as a JSON-ready dict.

    ``classifier``: an evaluation classifier ({mod}`stepdiff.classifiers`: ``features`` and
    ``predict``). ``samples`` ``[n, C, H, W]``; ``held_out`` real images the classifier and the
    generator never trained on; ``train`` the generator's training images (disjoint from
    ``held_out``, at least ``n`` of them). ``asked``: what each sample was conditioned on, class
    ids ``[n]``, targets ``[n, 9, 3]`` or caption specifications (``None`` for an unconditional
    model).

    - ``frechet``: samples vs held-out, with the counts; ``frechet_floor``: training images vs
      held-out at the same counts (mean of ``floor_repeats`` draws); ``frechet_ratio`` the two divided.
    - ``precision_recall`` of the samples against held-out data, $k$-NN manifolds.
    - ``memorisation``: nearest training image per sample, pixel and feature space, summarised
      (median, min; the fraction within ``memorisation_threshold`` when given). When no
      threshold is given, ``held_out_median`` states the median distance of held-out images
      to the training set, the scale a non-copy lives at.
    - ``accuracy`` (class ids) or ``scenes`` (targets or captions) when ``asked`` is given.
    """
    if not isinstance(samples, Tensor) or samples.ndim != 4:
        raise ValueError(f"samples must be images [n, C, H, W]; got {getattr(samples, 'shape', None)}")
    for name, ref in (("held_out", held_out), ("train", train)):
        if not isinstance(ref, Tensor) or ref.shape[1:] != samples.shape[1:]:
            raise ValueError(f"{name} must be images of the samples' shape {tuple(samples.shape[1:])}")
    n = samples.shape[0]
    if train.shape[0] < n:
        raise ValueError(
            f"train has {train.shape[0]} images but the real-vs-real floor at the samples' count needs at least {n}"
        )
    f_s = extract_features(classifier, samples, batch_size=batch_size)
    f_h = extract_features(classifier, held_out, batch_size=batch_size)
    f_t = extract_features(classifier, train, batch_size=batch_size)
    fd = frechet_distance(f_s, f_h)
    floor = frechet_floor(f_t, f_h, n, repeats=floor_repeats, seed=seed)
    mem = memorisation(samples, train, threshold=memorisation_threshold, sample_features=f_s, train_features=f_t)
    held_d, _ = nearest_neighbours(held_out, train)
    report = {
        "n_samples": n,
        "n_held_out": int(held_out.shape[0]),
        "n_train": int(train.shape[0]),
        "frechet": fd.as_dict(),
        "frechet_floor": floor.as_dict(),
        "frechet_ratio": fd.value / floor.value if floor.value > 0 else None,
        "precision_recall": precision_recall(f_h, f_s, k=k),
        "memorisation": {
            space: {key: v for key, v in mem[space].items() if not isinstance(v, Tensor)}
            for space in ("pixel", "feature")
        },
    }
    report["memorisation"]["pixel"]["held_out_median"] = float(held_d.median())
    if asked is not None:
        predicted = _predict(classifier, samples, batch_size)
        if isinstance(asked, Tensor) and asked.ndim == 1:
            report["accuracy"] = class_accuracy(predicted, asked, n_classes=getattr(classifier, "n_classes", None))
        else:
            report["scenes"] = scene_errors(predicted, asked)
            if isinstance(asked, Tensor):
                report["attributes"] = attribute_accuracy(predicted, asked)
    return report
