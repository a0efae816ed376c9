"""Evaluation classifiers: shapes of their outputs, augmentation, deterministic training that
learns, storage, and the held-out accuracy of the digits judge on the real data."""

import pytest
import torch

from stepdiff.classifiers import (
    DigitsCNN,
    DigitsMLP,
    ShapesClassifier,
    augment,
    evaluate_classifier,
    load_classifier,
    save_classifier,
    train_classifier,
    train_digits_classifier,
    train_shapes_classifier,
)
from stepdiff.evaluation import class_accuracy, extract_features

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("cls", [DigitsCNN, DigitsMLP])
@pytest.mark.parametrize("size", [8, 16])
def test_digits_classifier_outputs(cls, size):
    model = cls(image_size=size).eval()
    x = torch.rand(5, 1, size, size) * 2 - 1
    assert model(x).shape == (5, 10)
    assert model.features(x).shape == (5, 128)
    p = model.predict(x)
    assert p.dtype == torch.long and p.shape == (5,)
    # inputs are read clipped to [-1, 1]
    assert torch.equal(model(3 * x), model((3 * x).clamp(-1, 1)))
    with pytest.raises(ValueError, match=rf"reads images \[N, 1, {size}, {size}\]; got \(5, 3, {size}, {size}\)"):
        model(torch.zeros(5, 3, size, size))
    with pytest.raises(ValueError, match="image_size must be 8 or 16"):
        cls(image_size=12)


def test_shapes_classifier_reads_a_consistent_scene():
    torch.manual_seed(0)
    model = ShapesClassifier.for_dataset(width=8).eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    shape, colour, size = model(x)
    assert shape.shape == (4, 9, 9) and colour.shape == (4, 9, 9) and size.shape == (4, 9, 3)
    assert model.features(x).shape == (4, 256)
    # make some cells read as empty and others as occupied by biasing the shape head
    with torch.no_grad():
        bias = model.heads[0].bias.view(9, 9)
        bias[:, 0] = torch.tensor([50.0, -50, 50, -50, 50, -50, 50, -50, 50])
    t = model.predict(x)
    assert t.shape == (4, 9, 3) and t.dtype == torch.long
    empty = t[..., 0] == 0
    assert torch.equal(empty[0], torch.tensor([True, False] * 4 + [True]))
    assert bool((t[empty] == 0).all())
    assert bool((t[~empty][:, 1:] >= 1).all())
    with pytest.raises(ValueError, match=r"targets\[..., 2\] must lie in 0..2"):
        model.loss(x, torch.full((4, 9, 3), 3))


def test_augment_shifts_and_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.full((64, 1, 8, 8), -1.0)
    x[:, :, 4, 4] = 1.0
    assert torch.equal(augment(x, g, shift=0, noise=0.0), x)
    y = augment(x, g, shift=1, noise=0.0)
    where = torch.stack([(img[0] == 1.0).nonzero()[0] for img in y])
    assert int((where - 4).abs().max()) == 1  # moved by at most one pixel, and sometimes by one
    assert len({tuple(w.tolist()) for w in where}) == 9  # all nine shifts occur in 64 draws
    assert int((y == 1.0).sum()) == 64  # one bright pixel per image, nothing lost
    z = augment(x, torch.Generator().manual_seed(1), shift=0, noise=0.1)
    assert z.min() >= -1 and z.max() <= 1 and 0 < float((z - x).abs().mean()) < 0.1
    assert torch.equal(z, augment(x, torch.Generator().manual_seed(1), shift=0, noise=0.1))


def toy_digits(n, g):
    """A stand-in for the digits: class k < 9 is a bright 2x2 block at one of nine places three
    pixels apart (so a one-pixel shift never turns one class into another), class 9 two blocks."""
    labels = torch.randint(0, 10, (n,), generator=g)
    x = -1 + 0.2 * torch.rand(n, 1, 8, 8, generator=g)
    for i, k in enumerate(labels.tolist()):
        for cell in (0, 8) if k == 9 else (k,):
            r, c = 3 * (cell // 3), 3 * (cell % 3)
            x[i, 0, r : r + 2, c : c + 2] = 1.0
    return x, labels


def test_training_is_seeded_and_learns_a_stand_in_task():
    g = torch.Generator().manual_seed(0)
    x, y = toy_digits(600, g)
    hx, hy = toy_digits(200, g)

    def run():
        torch.manual_seed(3)
        model = DigitsCNN(8, width=8, feature_dim=32)
        report = train_classifier(model, x, y, held_out=(hx, hy), steps=120, batch_size=64, seed=5, log_every=20)
        return model, report

    m1, r1 = run()
    m2, r2 = run()
    for p1, p2 in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(p1, p2)
    assert r1.losses == r2.losses and len(r1.losses) == 6
    assert r1.losses[-1] < 0.2 * r1.losses[0]
    assert r1.held_out["accuracy"] >= 0.95 and m1.held_out == r1.held_out
    assert r1.n_train == 600 and r1.n_held_out == 200 and r1.cpu_seconds > 0
    assert not m1.training


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DigitsMLP(16, hidden=32, feature_dim=16).eval()
    model.held_out = {"accuracy": 0.5}
    path = save_classifier(tmp_path / "judges" / "mlp.pt", model, {"note": "test"})
    assert [p.name for p in path.parent.iterdir()] == ["mlp.pt"]  # no temporary file left behind
    back = load_classifier(path)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    assert isinstance(back, DigitsMLP) and not back.training
    assert torch.equal(back(x), model(x)) and back.held_out == {"accuracy": 0.5}
    half = load_classifier(save_classifier(tmp_path / "half.pt", model, dtype=torch.float16))
    assert next(half.parameters()).dtype == torch.float32
    torch.testing.assert_close(half(x), model(x), rtol=0, atol=0.02)
    assert (tmp_path / "half.pt").stat().st_size < 0.6 * path.stat().st_size
    with pytest.raises(FileNotFoundError, match="no classifier file"):
        load_classifier(tmp_path / "missing.pt")
    torch.save(
        {"class": "DigitsMLP", "config": {"image_size": 8}, "state_dict": model.state_dict()}, tmp_path / "bad.pt"
    )
    with pytest.raises(ValueError, match="do not match"):
        load_classifier(tmp_path / "bad.pt")


def test_digits_judge_reads_held_out_digits():
    """The 8x8 digits CNN, trained for half its default steps, reads >= 97 % of the held-out digits."""
    from stepdiff.image_data import load_digits

    model, report = train_digits_classifier(8, "cnn", steps=300)
    held = load_digits("heldout", size=8)
    acc = class_accuracy(model.predict(held.images), held.labels, n_classes=10)
    assert acc["n"] == 300
    assert acc["accuracy"] >= 0.97
    assert (
        acc["accuracy"]
        == report.held_out["accuracy"]
        == evaluate_classifier(model, held.images, held.labels)["accuracy"]
    )
    # its features separate the classes: held-out digits are nearest a training digit of their class
    train = load_digits("train", size=8)
    f_train, f_held = extract_features(model, train.images), extract_features(model, held.images)
    nearest = torch.cdist(f_held, f_train).argmin(1)
    assert float((train.labels[nearest] == held.labels).float().mean()) >= 0.95


def test_shapes_classifier_training_lowers_the_loss():
    """A short run on real scenes (the full one, measured in the report, is minutes long)."""
    model, report = train_shapes_classifier(n_train=600, n_held_out=200, steps=60, width=8, log_every=20)
    assert report.losses[-1] < 0.6 * report.losses[0]
    assert set(report.held_out) == {"shape", "colour", "size", "occupancy", "scene"}
    assert model.held_out == report.held_out and report.n_train == 600 and report.n_held_out == 200
