"""benchmarks/shape_drawing.py's measure of "the asked shape was drawn": on real scenes, which have
the asked shape by construction, the committed classifier's reading scores (nearly) all of them;
asked for the wrong shapes it scores none; it refuses inputs of the wrong form."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_benchmark

from stepdiff import pretrained
from stepdiff.config import held_out_data
from stepdiff.runs import make_config
from stepdiff.shapes import SHAPES, parse_caption


def _load():
    return load_benchmark("shape_drawing")


@pytest.fixture(scope="module")
def one_object_scenes():
    held = held_out_data(make_config("shapes-pixel-t2i"))
    keep = [i for i, c in enumerate(held.captions) if len(parse_caption(c).objects) == 1][:120]
    asked = torch.tensor([SHAPES.index(parse_caption(held.captions[i]).objects[0].shape) for i in keep])
    judge, _ = pretrained.load("shapes-classifier")
    with torch.no_grad():
        read = judge.predict(held.images[keep])
    return read, asked


def test_real_scenes_have_their_shape(one_object_scenes):
    bench = _load()
    read, asked = one_object_scenes
    got = bench.shape_reading(read, asked)
    # The classifier reads held-out shapes right 99.7 % of the time (its record).
    assert got["shape_right"] >= 0.97 and got["drawn"] == 1.0 and got["n"] == len(asked)
    assert abs(got["objects_read_mean"] - 1.0) < 0.05
    assert set(got["by_shape"]) == {SHAPES[k] for k in asked.unique().tolist()}


def test_wrong_shapes_score_nothing(one_object_scenes):
    bench = _load()
    read, asked = one_object_scenes
    shift = torch.randint(1, len(SHAPES), asked.shape, generator=torch.Generator().manual_seed(0))
    wrong = (asked + shift) % len(SHAPES)
    got = bench.shape_reading(read, wrong)
    assert got["shape_right"] <= 0.03 and got["drawn"] == 1.0


def test_empty_readings_are_not_drawn():
    bench = _load()
    read = torch.zeros(5, 9, 3, dtype=torch.long)
    read[0, 4] = torch.tensor([3, 1, 1])  # a triangle (index 2) in the centre of the first image
    got = bench.shape_reading(read, torch.tensor([2, 2, 0, 1, 2]))
    assert got["shape_right"] == pytest.approx(0.2) and got["drawn"] == pytest.approx(0.2)
    assert got["by_shape"] == pytest.approx({"circle": 0.0, "square": 0.0, "triangle": 1 / 3})


@pytest.mark.parametrize("read, asked, name", [
    (torch.zeros(4, 9), torch.zeros(4, dtype=torch.long), "predicted"),
    (torch.zeros(4, 9, 3, dtype=torch.long), torch.zeros(3, dtype=torch.long), "asked"),
])
def test_bad_input_names_the_argument(read, asked, name):
    with pytest.raises(ValueError, match=name):
        _load().shape_reading(read, asked)


def test_invocations_merge_and_refuse_other_settings(tmp_path):
    bench = _load()
    out = tmp_path / "shape_drawing.json"
    settings = {"n_samples": 200, "seed": 0}

    def entry(name, step, right):
        return {"name": name, "step": step, "shape_right": right}

    bench._store(out, settings, {"class": [entry("c", 400, 0.5), entry("c", 200, 0.3)], "text": []}, {"date": "1"})
    bench._store(out, settings, {"class": [entry("c", 400, 0.6)], "text": [entry("t", 800, 0.2)]}, {"date": "2"})
    got = json.loads(out.read_text())
    assert [(e["step"], e["shape_right"]) for e in got["runs"]["class"]] == [(200, 0.3), (400, 0.6)]
    assert [e["name"] for e in got["runs"]["text"]] == ["t"]
    assert [c["date"] for c in got["commands"]] == ["1", "2"]
    before = out.read_text()
    with pytest.raises(SystemExit, match="other settings"):
        bench._store(out, {"n_samples": 100, "seed": 0}, {"class": [], "text": []}, {"date": "3"})
    assert out.read_text() == before


def test_shape_style_prompts_ask_the_same_shapes():
    """A model trained on shape-only captions is asked each held-out scene's shape in its own style:
    the prompt parses back to that shape alone, and other styles keep the caption as it is."""
    bench = _load()
    held = held_out_data(make_config("shapes-pixel-t2i"))
    one = [c for c in held.captions if len(parse_caption(c).objects) == 1][:40]
    bare = bench.prompts_for(one, "shape")
    assert len(bare) == len(one) and bench.prompts_for(one, "positional") == one
    for full, short in zip(one, bare):
        want = parse_caption(full).objects[0]
        got = parse_caption(short).objects
        assert len(got) == 1 and got[0].shape == want.shape
        assert (got[0].colour, got[0].size, got[0].cell) == (None, None, None)
        assert set(short.split()) <= {"a", "an", *SHAPES}
