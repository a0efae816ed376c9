"""[data] subset: a digits run trained on a balanced part of the training digits (chapter II.12's
memorisation series)."""

import pytest
import torch

from stepdiff.config import ConfigError, balanced_subset, build_data, resolve
from stepdiff.image_data import load_digits


def _cfg(**data):
    return resolve({"kind": "classifier", "data": {"name": "digits", "size": 8, **data}})


@pytest.mark.parametrize("n", [1, 7, 10, 100, 333, 1497])
def test_subset_is_balanced_and_drawn_from_the_training_digits(n):
    full = load_digits("train", size=8)
    d = build_data(_cfg(subset=n))
    assert d.images.shape == (n, 1, 8, 8)
    counts = torch.bincount(d.labels, minlength=10)
    # class by class in turn: the counts differ by at most one while every class still has digits left
    if n <= 10 * int(torch.bincount(full.labels).min()):
        assert int(counts.max() - counts.min()) <= 1
    # every chosen image is a training digit with its own label, no repeats
    flat = full.images.flatten(1)
    match = (d.images.flatten(1)[:, None, :] == flat[None]).all(-1)
    rows = [set(match[i].nonzero().flatten().tolist()) for i in range(n)]
    assert all(rows) and all(int(d.labels[i]) in {int(full.labels[j]) for j in r} for i, r in enumerate(rows))
    idx = balanced_subset(full.labels, n)
    assert idx.unique().numel() == n and torch.equal(idx, idx.sort().values)
    assert torch.equal(d.images, full.images[idx])


def test_subset_grows_by_adding():
    labels = load_digits("train", size=8).labels
    small, large = set(balanced_subset(labels, 100).tolist()), set(balanced_subset(labels, 1000).tolist())
    assert small < large


def test_subset_zero_is_the_whole_training_set():
    assert torch.equal(build_data(_cfg()).images, load_digits("train", size=8).images)


def test_subset_errors_name_the_key():
    with pytest.raises(ConfigError, match="subset"):
        _cfg(subset=-1)
    with pytest.raises(ConfigError, match="subset"):
        build_data(_cfg(subset=5000))
    with pytest.raises(ConfigError, match="subset"):
        resolve({"kind": "classifier", "data": {"name": "shapes", "subset": 10}})
    with pytest.raises(ConfigError, match="subset"):
        _cfg(subset=2.5)
    with pytest.raises(ValueError, match="n must be"):
        balanced_subset(torch.tensor([0, 1, 1]), 4)
