"""stepdiff.attacks.ascend: projected gradient ascent on an input, against closed forms and fixed models."""

import pytest
import torch
from torch import nn

from stepdiff.attacks import ascend

f64 = torch.float64


def _tiny_classifier(seed: int, d: int, k: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 7), nn.Tanh(), nn.Linear(7, k)).to(f64).eval()


def test_quadratic_converges_to_the_projection_monotonically():
    # f(x) = -||x - a||^2 is concave with a 2-Lipschitz gradient: plain projected ascent with
    # lr <= 1/2 never lowers it and converges to the box's closest point to a, clamp(a, -1, 1).
    g = torch.Generator().manual_seed(3)
    a = 2.5 * torch.randn(5, 3, 7, generator=g, dtype=f64)  # odd sizes; many entries outside the box
    x0 = torch.rand(5, 3, 7, generator=g, dtype=f64) * 2 - 1
    out = ascend(lambda x: -(x - a).pow(2).flatten(1).sum(1), x0, steps=60, lr=0.2, normalize=False)
    assert out.scores.shape == (61, 5)
    assert torch.all(out.scores[1:] >= out.scores[:-1] - 1e-12)
    assert torch.allclose(out.images, a.clamp(-1, 1), atol=1e-10)
    assert float(out.images.abs().max()) <= 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ascent_raises_a_fixed_classifiers_log_probability_monotonically(seed):
    d, k = 11, 5
    model = _tiny_classifier(seed, d, k)
    before = [p.detach().clone() for p in model.parameters()]
    target = torch.arange(9) % k
    x0 = torch.randn(9, 1, d, generator=torch.Generator().manual_seed(seed + 10), dtype=f64)

    def score(x):
        return model(x).log_softmax(1).gather(1, target[:, None])[:, 0]

    out = ascend(score, x0, steps=80, lr=0.02, normalize=False)
    # small plain steps on a smooth score: every step raises (or keeps) every image's score
    assert torch.all(out.scores[1:] >= out.scores[:-1] - 1e-12)
    assert torch.all(out.scores[-1] > out.scores[0])
    # the model is the attacked thing, never the trained thing
    assert all(torch.equal(p, q) and p.grad is None for p, q in zip(model.parameters(), before))


def test_normalised_ascent_reaches_high_confidence_and_stays_in_the_box():
    d, k = 13, 4
    model = _tiny_classifier(5, d, k)
    target = torch.arange(8) % k
    x0 = torch.randn(8, d, generator=torch.Generator().manual_seed(0), dtype=f64)
    out = ascend(lambda x: model(x).log_softmax(1).gather(1, target[:, None])[:, 0], x0, steps=150, lr=0.05)
    assert float(out.images.min()) >= -1.0 and float(out.images.max()) <= 1.0
    assert torch.all(out.scores[-1] > out.scores[0])
    assert torch.equal(model(out.images).argmax(1), target)


def test_images_of_a_batch_do_not_interact():
    d, k = 6, 3
    model = _tiny_classifier(7, d, k)
    x0 = torch.randn(4, d, generator=torch.Generator().manual_seed(1), dtype=f64)

    def score(x):
        return model(x)[:, 0]

    both = ascend(score, x0, steps=20, lr=0.1)
    alone = ascend(score, x0[2:3], steps=20, lr=0.1)
    assert torch.allclose(both.images[2:3], alone.images, atol=1e-12)
    assert torch.allclose(both.scores[:, 2:3], alone.scores, atol=1e-12)


def test_bounds_are_respected():
    x0 = torch.zeros(2, 5, dtype=f64)
    out = ascend(lambda x: x.sum(1), x0, steps=10, lr=0.3, bounds=(-0.5, 0.25))
    assert torch.allclose(out.images, torch.full_like(x0, 0.25))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1}, "lr"),
        ({"bounds": (1.0, -1.0)}, "bounds"),
        ({"bounds": (0.0,)}, "bounds"),
    ],
)
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ascend(lambda x: x.flatten(1).sum(1), torch.zeros(2, 3), **kwargs)


def test_bad_inputs_and_scores_are_named():
    with pytest.raises(ValueError, match="x0"):
        ascend(lambda x: x.sum(1), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="x0"):
        ascend(lambda x: x.sum(1), torch.zeros(3))
    with pytest.raises(ValueError, match="score"):
        ascend("not a function", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="one number per image"):
        ascend(lambda x: x.sum(), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        ascend(lambda x: x.sum(1) / 0.0 * 0.0, torch.zeros(2, 3))


def test_stop_at_freezes_images_that_reach_the_goal():
    d, k = 9, 3
    model = _tiny_classifier(11, d, k)
    target = torch.arange(6) % k
    x0 = torch.randn(6, d, generator=torch.Generator().manual_seed(4), dtype=f64)

    def score(x):
        return model(x).log_softmax(1).gather(1, target[:, None])[:, 0]

    free = ascend(score, x0, steps=200, lr=0.05)
    # a goal every image reaches on the way, after some steps
    goal = float(free.scores[-1].min()) - 0.02
    assert torch.all(free.scores[0] < goal)
    stopped = ascend(score, x0, steps=200, lr=0.05, stop_at=goal)
    first = (stopped.scores >= goal).to(torch.int64).argmax(0)  # the step at which each image reached it
    assert torch.all(stopped.scores[-1] >= goal)
    for i in range(6):
        # once reached, the score (and the image) never changes again
        assert torch.all(stopped.scores[first[i]:, i] == stopped.scores[first[i], i])
        # and up to that step the run is the unstopped one
        assert torch.allclose(stopped.scores[: first[i] + 1, i], free.scores[: first[i] + 1, i], atol=1e-12)
    # it moves the images less than the free run
    change = (stopped.images - x0.clamp(-1, 1)).norm(dim=1)
    assert torch.all(change <= (free.images - x0.clamp(-1, 1)).norm(dim=1) + 1e-12)
    with pytest.raises(ValueError, match="stop_at"):
        ascend(score, x0, stop_at=float("nan"))
