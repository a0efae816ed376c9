"""benchmarks/t2i_targets.py: the entry it stores for a text-to-image run (stepdiff evaluate's report
beside the run's training record), the report it takes in place of sampling again, and what it
refuses. Run end to end on a tiny text model with the sample count and sampler steps cut down; the
real measurement (500 samples) is minutes, and its stored results are read by chapter II.9."""

from __future__ import annotations

import json

import pytest
from conftest import load_benchmark

from stepdiff import checkpoints, cli

TINY = ["--set", "model.channels=8", "--set", "model.channel_mult=[1, 2]", "--set", "model.attn_levels=[1]",
        "--set", "model.heads=2", "--set", "model.norm_groups=4", "--set", "model.text.dim=16",
        "--set", "model.text.depth=1", "--set", "model.text.heads=2"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t2i")
    assert cli.main(["train", "--data", "shapes", "--n", "64", "--objects", "1-2", "--set", "data.n_held_out=32",
                     "--condition", "text", "--label-dropout", "0.1", "--steps", "2", "--batch-size", "8",
                     "--threads", "1", "--no-progress", *TINY, "--out", str(folder / "t.pt")]) == 0
    return folder / "t.pt"


@pytest.fixture()
def bench(monkeypatch):
    module = load_benchmark("t2i_targets")
    monkeypatch.setattr(module, "SETTINGS", {"n": 6, "guidance": [2.0], "sampler": "euler", "steps": 2,
                                             "spacing": "uniform", "seed": 3})
    return module


def test_stores_the_report_beside_the_training_record(bench, text_run, tmp_path):
    out = tmp_path / "t2i_targets.json"
    bench.main([str(text_run), "--out", str(out)])
    got = json.loads(out.read_text())
    assert got["settings"] == bench.SETTINGS
    record = checkpoints.record_of(checkpoints.read_checkpoint(text_run))
    entry = got["runs"][record["name"]]
    assert entry["train_command"] == checkpoints.portable_command(record["command"])
    assert entry["step"] == 2 and entry["n_objects"] == [1, 2] and entry["checkpoint"] == "t.pt"
    assert entry["evaluate_command"] == ["stepdiff", "evaluate", "t.pt", "-w", "2", "-n", "6", "--seed", "3",
                                         "--sampler", "euler", "--steps", "2", "--spacing", "uniform", "--no-store"]
    report = entry["report"]
    assert report["n_samples"] == 6 and [p["w"] for p in report["sweep"]] == [2.0]
    scenes = report["sweep"][0]["report"]["scenes"]
    by_n = scenes["by_n_objects"]
    # The overall fraction is the object-count fractions weighted by their counts.
    assert sum(v["n"] for v in by_n.values()) == 6
    assert report["sweep"][0]["all_correct"] == pytest.approx(sum(v["n"] * v["all_correct"] for v in by_n.values()) / 6)
    assert "metrics" not in record  # the checkpoint itself is not written to

    # The report that command wrote is taken as it is, in place of sampling again.
    made = tmp_path / "made.json"
    made.write_text(json.dumps(report))
    again = tmp_path / "again.json"
    bench.main([str(text_run), "--report", str(made), "--out", str(again)])
    stored = json.loads(again.read_text())["runs"][record["name"]]
    assert stored["report"] == report and stored["measured"].startswith("stored from the report")


@pytest.mark.parametrize("change", ["seed", "model", "w"])
def test_refuses_a_report_made_otherwise(bench, text_run, tmp_path, change):
    report = {"model": "t.pt", "n_samples": 6, "seed": 3, "sweep": [{"w": 2.0}],
              "sampler": {"name": "euler", "steps": 2, "spacing": "uniform"}}
    bench.check_report(report, text_run)  # the matching report passes
    if change == "seed":
        report["seed"] = 4
    elif change == "model":
        report["model"] = "other.pt"
    else:
        report["sweep"] = [{"w": 3.0}]
    made, out = tmp_path / "r.json", tmp_path / "out.json"
    made.write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="stores only"):
        bench.main([str(text_run), "--report", str(made), "--out", str(out)])
    assert not out.exists()


def test_refuses_other_settings_and_names_missing_files(bench, tmp_path, capsys):
    out = tmp_path / "t2i_targets.json"
    bench._store(out, "a", {"x": 1})
    before = out.read_text()
    bench.SETTINGS = {**bench.SETTINGS, "n": 7}
    with pytest.raises(SystemExit, match="other settings"):
        bench._store(out, "b", {"x": 2})
    assert out.read_text() == before and not list(tmp_path.glob(".*"))
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path / "nope.pt"), "--out", str(out)])
    assert "nope.pt" in capsys.readouterr().err
