"""Evaluation metrics on cases with a known answer."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from stepdiff.evaluation import (
    FrechetDistance,
    attribute_accuracy,
    class_accuracy,
    frechet_distance,
    frechet_distance_from_moments,
    frechet_floor,
    gaussian_moments,
    memorisation,
    nearest_neighbours,
    precision_recall,
)

f64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def random_rotation(d, g):
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=f64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def commuting_pair(d, g):
    """Two covariances sharing eigenvectors (a random rotation), and the closed-form distance."""
    Q = random_rotation(d, g)
    a = 0.2 + 2.0 * torch.rand(d, generator=g, dtype=f64)
    b = 0.2 + 2.0 * torch.rand(d, generator=g, dtype=f64)
    mu1, mu2 = torch.randn(d, generator=g, dtype=f64), torch.randn(d, generator=g, dtype=f64)
    c1, c2 = Q @ torch.diag(a) @ Q.T, Q @ torch.diag(b) @ Q.T
    closed = float((mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    return mu1, c1, mu2, c2, closed


def test_frechet_from_moments_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    mu1, c1, mu2, c2, closed = commuting_pair(6, g)
    assert frechet_distance_from_moments(mu1, c1, mu2, c2) == pytest.approx(closed, rel=1e-12, abs=1e-12)
    # non-commuting 2x2: Tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = C1 C2 (similar to a PSD matrix)
    A = torch.tensor([[2.0, 0.7], [0.7, 0.5]], dtype=f64)
    B = torch.tensor([[0.3, -0.2], [-0.2, 1.4]], dtype=f64)
    M = A @ B
    tr_sqrt = math.sqrt(float(torch.trace(M)) + 2 * math.sqrt(float(torch.linalg.det(M))))
    m1, m2 = torch.tensor([0.5, -1.0], dtype=f64), torch.tensor([0.0, 2.0], dtype=f64)
    expected = float((m1 - m2).pow(2).sum() + torch.trace(A) + torch.trace(B)) - 2 * tr_sqrt
    assert frechet_distance_from_moments(m1, A, m2, B) == pytest.approx(expected, rel=1e-12)


def test_frechet_matches_scipy_sqrtm_on_random_covariances():
    g = torch.Generator().manual_seed(1)
    d = 30
    X = torch.randn(d, 2 * d, generator=g, dtype=f64)
    Y = torch.randn(d, d + 3, generator=g, dtype=f64)
    c1, c2 = X @ X.T / (2 * d), Y @ Y.T / d
    mu1, mu2 = torch.randn(d, generator=g, dtype=f64), torch.randn(d, generator=g, dtype=f64)
    root = scipy.linalg.sqrtm(c1.numpy() @ c2.numpy())
    assert np.abs(root.imag).max() < 1e-8
    ref = float((mu1 - mu2).pow(2).sum()) + float(np.trace(c1.numpy()) + np.trace(c2.numpy()) - 2 * np.trace(root.real))
    assert frechet_distance_from_moments(mu1, c1, mu2, c2) == pytest.approx(ref, rel=1e-9)


def test_frechet_of_large_gaussian_samples_approaches_the_closed_form():
    g = torch.Generator().manual_seed(2)
    d, n = 4, 200_000
    mu1, c1, mu2, c2, closed = commuting_pair(d, g)
    x = mu1 + torch.randn(n, d, generator=g, dtype=f64) @ torch.linalg.cholesky(c1).T
    y = mu2 + torch.randn(n, d, generator=g, dtype=f64) @ torch.linalg.cholesky(c2).T
    fd = frechet_distance(x, y)
    assert isinstance(fd, FrechetDistance) and (fd.n1, fd.n2) == (n, n)
    assert fd.value == pytest.approx(closed, rel=0.01)
    # the moments themselves are the textbook ones
    mu, cov = gaussian_moments(x[:50])
    torch.testing.assert_close(cov, torch.from_numpy(np.cov(x[:50].numpy(), rowvar=False)))
    torch.testing.assert_close(mu, x[:50].mean(0))


def test_frechet_identity_symmetry_and_invariance():
    g = torch.Generator().manual_seed(3)
    d = 16
    x = torch.randn(500, d, generator=g, dtype=f64) * torch.linspace(0.1, 3, d, dtype=f64)
    y = 0.3 + torch.randn(700, d, generator=g, dtype=f64) @ random_rotation(d, g)
    assert frechet_distance(x, x).value < 1e-9
    ab, ba = frechet_distance(x, y), frechet_distance(y, x)
    assert (ab.n1, ab.n2, ba.n1, ba.n2) == (500, 700, 700, 500)
    assert ab.value == pytest.approx(ba.value, rel=1e-10)
    Q, shift = random_rotation(d, g), torch.randn(d, generator=g, dtype=f64)
    assert frechet_distance(x @ Q + shift, y @ Q + shift).value == pytest.approx(ab.value, rel=1e-9)
    # float32 features are accepted and computed in float64
    assert frechet_distance(x.float(), y.float()).value == pytest.approx(ab.value, rel=1e-5)


def test_frechet_floor_at_the_same_counts():
    g = torch.Generator().manual_seed(4)
    d = 8
    real = torch.randn(6000, d, generator=g, dtype=f64)
    train, held = real[:4000], real[4000:]
    small = frechet_floor(train, held, 250, repeats=5, seed=1)
    large = frechet_floor(train, held, 2000, repeats=5, seed=1)
    assert (small.n1, small.n2, small.repeats) == (250, 2000, 5) and small.std > 0
    # For two samples of N(0, I_d) the expected distance is, to first order in 1/n,
    # (d + d(d+1)/4)(1/n1 + 1/n2): d/n from the means, and a quarter of E|S1 - S2|_F^2 from the
    # covariances (the Bures distance near I is |dS|_F^2/4; each diagonal entry of S has
    # variance 2/n, each off-diagonal one 1/n).
    c = d + d * (d + 1) / 4
    assert small.value == pytest.approx(c * (1 / 250 + 1 / 2000), rel=0.2)
    assert large.value == pytest.approx(c * (1 / 2000 + 1 / 2000), rel=0.2)
    # deterministic given the seed
    assert frechet_floor(train, held, 250, repeats=5, seed=1) == small
    with pytest.raises(ValueError, match="n1 = 5000 but real1 has only 4000"):
        frechet_floor(train, held, 5000)
    with pytest.raises(ValueError, match="features1 has 8 features per row but features2 has 3"):
        frechet_distance(train, held[:, :3])


def test_precision_recall_identical_disjoint_and_subsets():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(300, 5, generator=g, dtype=f64)
    b = 100.0 + torch.randn(100, 5, generator=g, dtype=f64)
    c = -100.0 + torch.randn(100, 5, generator=g, dtype=f64)
    same = precision_recall(a, a.clone())
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["k"] == 3
    far = precision_recall(a, b)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    # samples cover only part of the real data: every sample is real-looking, 3/4 of the data covered
    sub = precision_recall(torch.cat([a, b]), a.clone())
    assert sub["precision"] == 1.0 and sub["recall"] == 0.75
    assert (sub["n_real"], sub["n_fake"]) == (400, 300)
    # a quarter of the samples are off the data manifold, and a quarter of the data is uncovered
    mixed = precision_recall(torch.cat([a, b]), torch.cat([a, c]))
    assert mixed["precision"] == 0.75 and mixed["recall"] == 0.75


def test_precision_uses_the_kth_neighbour_radius():
    real = torch.arange(10, dtype=f64)[:, None]  # radii with k = 3: 3 at the ends, 2 inside
    fake = torch.tensor([[-2.5], [-3.5], [11.9], [12.5]], dtype=f64)
    assert precision_recall(real, fake, k=3)["precision"] == 0.5
    assert precision_recall(real, fake, k=1)["precision"] == 0.0
    with pytest.raises(ValueError, match="k must be a positive integer"):
        precision_recall(real, fake, k=0)


def test_memorisation_finds_planted_copies():
    g = torch.Generator().manual_seed(6)
    train = torch.rand(300, 1, 8, 8, generator=g) * 2 - 1
    fresh = torch.rand(20, 1, 8, 8, generator=g) * 2 - 1
    planted = torch.tensor([7, 150, 299, 42, 42])
    copies = train[planted] + 1e-3 * torch.randn(5, 1, 8, 8, generator=g)
    samples = torch.cat([fresh[:10], copies, fresh[10:]])
    proj = torch.randn(64, 16, generator=g)
    rep = memorisation(
        samples,
        train,
        threshold=0.01,
        sample_features=samples.flatten(1) @ proj,
        train_features=train.flatten(1) @ proj,
        feature_threshold=0.05,
    )
    assert rep["n_samples"] == 25 and rep["n_train"] == 300
    for space, thr in (("pixel", 0.01), ("feature", 0.05)):
        entry = rep[space]
        assert torch.equal(entry["index"][10:15], planted)
        assert entry["fraction_within"] == 5 / 25 and entry["threshold"] == thr
        assert float(entry["distance"][10:15].max()) < thr
        assert float(torch.cat([entry["distance"][:10], entry["distance"][15:]]).min()) > 0.1
    # the distance is the per-entry RMS of the difference
    d, i = nearest_neighbours(samples[:1], train)
    assert float(d[0]) == pytest.approx(float((samples[0] - train[int(i[0])]).pow(2).mean().sqrt()), rel=1e-6)
    with pytest.raises(ValueError, match="both sample_features and train_features"):
        memorisation(samples, train, sample_features=samples.flatten(1))


def test_class_accuracy_counts():
    asked = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 2, 2, 2, 1])
    rep = class_accuracy(pred, asked, n_classes=4)
    assert rep["accuracy"] == 0.7 and rep["n"] == 10
    assert rep["per_class"] == [0.5, 2 / 3, 0.8, None]
    assert rep["confusion"][2] == [0, 1, 4, 0] and rep["confusion"][0] == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="integer class ids"):
        class_accuracy(torch.rand(10), asked)


def test_attribute_accuracy_counts_per_asked_object():
    asked = torch.zeros(2, 9, 3, dtype=torch.long)
    asked[0, 0] = torch.tensor([1, 2, 1])
    asked[1, 4] = torch.tensor([3, 3, 2])
    asked[1, 8] = torch.tensor([2, 5, 1])
    pred = asked.clone()
    pred[0, 0, 1] = 4  # wrong colour
    pred[1, 8] = 0  # missing: wrong in every attribute
    pred[1, 2] = torch.tensor([1, 1, 1])  # an extra object: only occupancy notices
    rep = attribute_accuracy(pred, asked)
    assert rep["n_objects"] == 3
    assert rep["shape"] == pytest.approx(2 / 3) and rep["size"] == pytest.approx(2 / 3)
    assert rep["colour"] == pytest.approx(1 / 3)
    assert rep["occupancy"] == pytest.approx(16 / 18)


# --- scene errors -------------------------------------------------------------------------------


def scene(*objects):
    """Targets [9, 3] from (cell, shape, colour, size) names."""
    from stepdiff.shapes import COLOURS, SHAPES, SIZES

    t = torch.zeros(9, 3, dtype=torch.long)
    for cell, shape, colour, size in objects:
        t[cell] = torch.tensor([1 + SHAPES.index(shape), 1 + COLOURS.index(colour), 1 + SIZES.index(size)])
    return t


RED_CIRCLE = (0, "circle", "red", "small")
BLUE_SQUARE = (8, "square", "blue", "large")


@pytest.mark.parametrize(
    "asked, read, kinds",
    [
        ([RED_CIRCLE, BLUE_SQUARE], [RED_CIRCLE, BLUE_SQUARE], []),
        ([RED_CIRCLE], [(0, "square", "red", "small")], ["wrong_shape"]),
        ([RED_CIRCLE], [(0, "circle", "green", "small")], ["wrong_colour"]),
        ([RED_CIRCLE], [(0, "circle", "red", "large")], ["wrong_size"]),
        # the circle took the colour asked for the square: a binding error
        ([RED_CIRCLE, BLUE_SQUARE], [(0, "circle", "blue", "small"), BLUE_SQUARE], ["colour_leak"]),
        ([RED_CIRCLE, BLUE_SQUARE], [BLUE_SQUARE], ["missing_object"]),
        ([RED_CIRCLE], [RED_CIRCLE, (4, "star", "white", "large")], ["extra_object"]),
        ([RED_CIRCLE], [(2, "circle", "red", "small")], ["wrong_position"]),
        ([RED_CIRCLE], [(5, "heart", "cyan", "large")], ["missing_object", "extra_object"]),
        ([RED_CIRCLE], [], ["missing_object"]),
    ],
)
def test_scene_errors_one_kind_each(asked, read, kinds):
    from stepdiff.evaluation import scene_errors

    rep = scene_errors(scene(*read)[None], scene(*asked)[None], per_scene=True)
    assert sorted(rep["per_scene"][0]) == sorted(kinds)
    assert rep["all_correct"] == (1.0 if not kinds else 0.0)
    for kind, count in rep["errors"].items():
        assert count == kinds.count(kind)


def test_scene_errors_with_captions_and_relations():
    from stepdiff.evaluation import scene_errors
    from stepdiff.shapes import parse_caption

    spec = parse_caption("a red circle left of a blue square")
    right = scene((3, "circle", "red", "small"), (5, "square", "blue", "large"))  # sizes left open
    wrong = scene((5, "circle", "red", "small"), (3, "square", "blue", "large"))
    leak = scene((3, "circle", "blue", "large"), (5, "square", "blue", "small"))
    rep = scene_errors(torch.stack([right, wrong, leak]), [spec] * 3, per_scene=True)
    assert rep["per_scene"] == [[], ["wrong_relation"], ["colour_leak"]]
    assert rep["by_n_objects"] == {2: {"n": 3, "all_correct": 1 / 3}}
    assert rep["scenes_with"]["wrong_relation"] == pytest.approx(1 / 3)
    assert rep["attribute_accuracy"] == {"shape": 1.0, "colour": pytest.approx(5 / 6), "size": None}
    open_colour = parse_caption("a circle at the top left")
    rep = scene_errors(scene((0, "circle", "green", "large"))[None], [open_colour])
    assert rep["all_correct"] == 1.0
    with pytest.raises(ValueError, match="asked has 1 scenes but predicted has 3"):
        scene_errors(torch.stack([right, wrong, leak]), [spec])


def test_scene_correct_exactly_when_the_caption_is_satisfied():
    """On random readings of random captions, a scene has no error iff CaptionSpec.satisfied_by."""
    from stepdiff.evaluation import scene_errors
    from stepdiff.shapes import make_shapes, parse_caption

    data = make_shapes(60, seed=11, masks=False)
    specs = [parse_caption(c) for c in data.captions]
    g = torch.Generator().manual_seed(0)
    readings = data.targets.clone()
    for n in range(60):
        k = int(torch.randint(0, 4, (1,), generator=g))
        if k == 1:  # change one attribute of one cell
            cell, h = int(torch.randint(0, 9, (1,), generator=g)), int(torch.randint(0, 3, (1,), generator=g))
            if readings[n, cell, 0] > 0:
                readings[n, cell, h] = 1 + (readings[n, cell, h] % (2 if h == 2 else 8))
        elif k == 2:  # move the scene one column (objects may fall off: missing)
            readings[n] = torch.roll(readings[n].view(3, 3, 3), 1, dims=1).view(9, 3)
        elif k == 3:  # swap two cells
            i, j = torch.randperm(9, generator=g)[:2].tolist()
            readings[n, [i, j]] = readings[n, [j, i]]
    rep = scene_errors(readings, specs, per_scene=True)
    for n in range(60):
        assert (not rep["per_scene"][n]) == specs[n].satisfied_by(readings[n])
    assert 0 < rep["all_correct"] < 1
    # the asked targets themselves, read back exactly, are all correct in both forms
    assert scene_errors(data.targets, data.targets)["all_correct"] == 1.0
    assert scene_errors(data.targets, specs)["all_correct"] == 1.0


def test_evaluate_samples_one_call_report():
    import json

    from stepdiff.classifiers import DigitsMLP, ShapesClassifier
    from stepdiff.evaluation import evaluate_samples, scene_errors
    from stepdiff.image_data import load_digits
    from stepdiff.shapes import make_shapes

    torch.manual_seed(0)
    judge = DigitsMLP(8, hidden=32, feature_dim=16).eval()
    train, held = load_digits("train"), load_digits("heldout")
    copies = train.images[:200]  # a generator that memorised its training set
    rep = evaluate_samples(judge, copies, held_out=held.images, train=train.images, asked=train.labels[:200])
    json.dumps(rep)  # JSON-ready
    assert (rep["n_samples"], rep["n_held_out"], rep["n_train"]) == (200, 300, 1497)
    assert (rep["frechet"]["n1"], rep["frechet"]["n2"]) == (200, 300)
    assert (rep["frechet_floor"]["n1"], rep["frechet_floor"]["n2"], rep["frechet_floor"]["repeats"]) == (200, 300, 3)
    assert rep["frechet_ratio"] == pytest.approx(rep["frechet"]["value"] / rep["frechet_floor"]["value"])
    assert rep["memorisation"]["pixel"]["median"] == 0.0 and rep["memorisation"]["feature"]["median"] == 0.0
    assert rep["memorisation"]["pixel"]["held_out_median"] > 0.1
    expected = class_accuracy(judge.predict(copies), train.labels[:200], n_classes=10)
    assert rep["accuracy"] == expected
    with pytest.raises(ValueError, match="train has 100 images"):
        evaluate_samples(judge, copies, held_out=held.images, train=train.images[:100])

    reader = ShapesClassifier.for_dataset(width=8).eval()
    scenes = make_shapes(40, seed=3, masks=False)
    rep = evaluate_samples(
        reader,
        scenes.images[:20],
        held_out=scenes.images[20:],
        train=scenes.images[20:],
        asked=scenes.targets[:20],
        k=2,
    )
    assert rep["scenes"] == scene_errors(reader.predict(scenes.images[:20]), scenes.targets[:20])
    assert rep["attributes"] == attribute_accuracy(reader.predict(scenes.images[:20]), scenes.targets[:20])
    assert rep["precision_recall"]["k"] == 2


def test_multi_object_share_counts_among_the_larger_scenes():
    """Against a count over the per-scene errors of the scenes with two or more asked objects, on
    random readings of random one-to-three-object captions, before and after a round trip through JSON."""
    import json

    from stepdiff.evaluation import multi_object_share, scene_errors
    from stepdiff.shapes import make_shapes, parse_caption

    data = make_shapes(90, seed=5, masks=False, n_objects=(1, 3))
    specs = [parse_caption(c) for c in data.captions]
    g = torch.Generator().manual_seed(1)
    readings = data.targets.clone()
    for n in range(90):  # swap two objects' colours, or the two objects, in a third of the scenes each
        cells = (readings[n, :, 0] > 0).nonzero().flatten()
        if len(cells) < 2:
            continue
        i, j = cells[torch.randperm(len(cells), generator=g)[:2]].tolist()
        k = n % 3
        if k == 1:
            readings[n, [i, j], 1] = readings[n, [j, i], 1]
        elif k == 2:
            readings[n, [i, j]] = readings[n, [j, i]]
    rep = scene_errors(readings, specs, per_scene=True)
    larger = [n for n in range(90) if len(specs[n].objects) >= 2]
    assert 0 < len(larger) < 90
    for kind in ("colour_leak", "wrong_relation"):
        want = sum(kind in rep["per_scene"][n] for n in larger) / len(larger)
        assert 0 < want < 1
        assert multi_object_share(rep, kind) == pytest.approx(want, rel=1e-12)
        assert multi_object_share(json.loads(json.dumps(rep)), kind) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="kind must be one of"):
        multi_object_share(rep, "wrong_shape")
    one = scene_errors(scene(RED_CIRCLE)[None], scene(RED_CIRCLE)[None])
    with pytest.raises(ValueError, match="no scene of two or more objects"):
        multi_object_share(one, "colour_leak")
    with pytest.raises(ValueError, match="scenes must be a scene_errors report"):
        multi_object_share({"n_scenes": 1}, "colour_leak")


def test_shape_swaps_count_wrong_shapes_asked_for_the_other_object():
    from stepdiff.evaluation import scene_errors
    from stepdiff.shapes import SHAPES, parse_caption

    pair = parse_caption("a red circle left of a blue square")
    twins = parse_caption("a red circle left of a blue circle")
    one = parse_caption("a red circle")
    swapped = scene((3, "square", "red", "small"), (5, "circle", "blue", "small"))  # shapes bound the wrong way
    other = scene((3, "star", "red", "small"), (5, "square", "blue", "small"))  # a shape nobody asked for
    rep = scene_errors(torch.stack([swapped, other, other, scene((4, "star", "red", "small"))]),
                       [pair, pair, twins, one], per_scene=True)
    assert rep["per_scene"] == [["wrong_shape", "wrong_shape"], ["wrong_shape"], ["wrong_shape", "wrong_shape"],
                                ["wrong_shape"]]
    # the twins' and the lone circle's wrong shapes have no other asked shape to be: not counted
    chance = 1 / (len(SHAPES) - 1)
    assert rep["shape_swaps"]["wrong_shapes"] == 3 and rep["shape_swaps"]["of_another_object"] == 2
    assert rep["shape_swaps"]["expected_at_random"] == pytest.approx(3 * chance)
    assert rep["errors"]["wrong_shape"] == 6  # the breakdown leaves the error counts as they were
