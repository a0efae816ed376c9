"""benchmarks/text_tower.py: how it merges the two arms' entries into one results file, and what it
refuses. The measurement itself is latent_vs_pixel.py's ``evaluate_snapshot``, minutes per snapshot;
the stored results it wrote are read, and checked against the frozen run's settings, by chapter II.9."""

from __future__ import annotations

import json

import pytest
from conftest import load_benchmark


def _load():
    return load_benchmark("text_tower")


def _entry(step, shape):
    return {"step": step, "attribute_accuracy": {"shape": shape}}


def _command(arm, date):
    return {"command": ["python", "benchmarks/text_tower.py", "--arm", arm], "date": date}


def test_entries_of_both_arms_merge_by_step(tmp_path):
    bench = _load()
    out = tmp_path / "text_tower.json"
    settings, reference = {"n_samples": 7, "seed": 3}, {"floor": {"value": 1.5}}
    bench._store(out, settings, reference, "tuned", _entry(400, 0.2), _command("tuned", "d1"))
    bench._store(out, settings, reference, "scratch", _entry(200, 0.1), _command("scratch", "d1"))
    bench._store(out, settings, reference, "tuned", _entry(200, 0.3), _command("tuned", "d1"))
    # A re-measured snapshot replaces its entry rather than adding a second one for the same step.
    bench._store(out, settings, reference, "tuned", _entry(400, 0.25), _command("tuned", "d2"))
    got = json.loads(out.read_text())
    assert got["settings"] == settings and got["reference"] == reference
    assert [(e["step"], e["attribute_accuracy"]["shape"]) for e in got["runs"]["tuned"]] == [(200, 0.3), (400, 0.25)]
    assert [e["step"] for e in got["runs"]["scratch"]] == [200]
    # One record per invocation (command and date), the latest state of each.
    assert [(c["command"][3], c["date"]) for c in got["commands"]] == [("scratch", "d1"), ("tuned", "d1"),
                                                                        ("tuned", "d2")]
    assert not list(tmp_path.glob(".*")), "no lock or temporary file is left beside the results"


@pytest.mark.parametrize("changed", ["settings", "reference"])
def test_refuses_to_mix_measurements(tmp_path, changed):
    bench = _load()
    out = tmp_path / "text_tower.json"
    settings, reference = {"n_samples": 7}, {"floor": {"value": 1.5}}
    bench._store(out, settings, reference, "tuned", _entry(200, 0.2), _command("tuned", "d1"))
    before = out.read_text()
    other = ({"n_samples": 8}, reference) if changed == "settings" else (settings, {"floor": {"value": 2.0}})
    with pytest.raises(SystemExit, match="other settings or another reference"):
        bench._store(out, *other, "scratch", _entry(200, 0.1), _command("scratch", "d1"))
    assert out.read_text() == before


def test_missing_snapshot_is_named(tmp_path, capsys):
    bench = _load()
    missing = tmp_path / "nope.800.pt"
    with pytest.raises(SystemExit):
        bench.main(["--arm", "tuned", str(missing), "--out", str(tmp_path / "r.json")])
    assert "nope.800.pt" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_an_arm_added_later_joins_an_existing_file(tmp_path):
    """A results file written before an arm existed takes that arm's entries beside the others."""
    bench = _load()
    out = tmp_path / "text_tower.json"
    settings, reference = {"n_samples": 7}, {"floor": {"value": 1.5}}
    bench._store(out, settings, reference, "tuned", _entry(200, 0.2), _command("tuned", "d1"))
    old = json.loads(out.read_text())
    del old["runs"]["attn16"]
    out.write_text(json.dumps(old))
    bench._store(out, settings, reference, "attn16", _entry(200, 0.4), _command("attn16", "d1"))
    got = json.loads(out.read_text())["runs"]
    assert [e["attribute_accuracy"]["shape"] for e in got["attn16"]] == [0.4]
    assert [e["attribute_accuracy"]["shape"] for e in got["tuned"]] == [0.2]
