"""Tests for the `stepdiff` command (stepdiff.cli over stepdiff.runs), on the CPU at tiny size.

One end-to-end run goes through `python -m stepdiff` in subprocesses (train a generator and a
classifier, sample, evaluate, export, info); the rest calls `stepdiff.cli.main` in this process.
Every bad input must end with exit status 2, a message naming what is wrong, and no file left
behind.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stepdiff import checkpoints as ckpt
from stepdiff import cli, runs

TINY = ["--set", "model.channels=8", "--set", "model.channel_mult=[1, 2]", "--set", "model.attn_levels=[1]",
        "--set", "model.heads=2", "--set", "model.norm_groups=4"]
DIGITS = ["--data", "digits", "--size", "8", "--condition", "class", "--batch-size", "16", "--label-dropout", "0.2",
          "--threads", "1", "--no-progress", *TINY, "--set", "sample.steps=4", "--set", "evaluate.batch_size=40"]
CLASSIFIER = ["--kind", "classifier", "--data", "digits", "--size", "8", "--arch", "digits-cnn", "--steps", "4",
              "--batch-size", "16", "--threads", "1", "--no-progress", "--set", "model.width=8"]
ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def command(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "stepdiff", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def fails(capsys, *args, match: str, folder: Path | None = None) -> str:
    """Run the command in-process: exit status 2, the message matches, nothing new in ``folder``."""
    before = sorted(p.name for p in folder.iterdir()) if folder is not None else None
    status = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert status == 2, err
    assert match.lower() in err.lower(), err
    if folder is not None:
        assert sorted(p.name for p in folder.iterdir()) == before
    return err


def test_end_to_end_train_sample_evaluate_export_info(tmp_path, capsys):
    """`python -m stepdiff` train -> sample -> evaluate, each a subprocess; then the classifier it
    needs, export and info through `stepdiff.cli.main` in this process (each subprocess pays the
    import of torch)."""
    out = command("train", *DIGITS, "--steps", "5", "--out", "g.pt", cwd=tmp_path)
    assert "wrote g.pt (5 steps this run" in out
    log = [json.loads(line) for line in (tmp_path / "g.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(5))
    assert [r["loss"] for r in log] == ckpt.read_checkpoint(tmp_path / "g.pt")["losses"].tolist()
    assert cli.main(["train", *CLASSIFIER, "--out", str(tmp_path / "c.pt")]) == 0
    out = command("sample", "g.pt", "--out", "s.png", "-n", "6", "--class", "3", "--guidance", "2",
                  "--sampler", "dpmpp_2m", "--steps", "3", cwd=tmp_path)
    assert "wrote s.png" in out
    from PIL import Image

    png = Image.open(tmp_path / "s.png")
    assert png.mode == "L" and png.width > 8
    saved = torch.load(tmp_path / "s.pt", weights_only=True)
    assert saved["images"].shape == (6, 1, 8, 8) and saved["labels"].tolist() == [3] * 6
    assert saved["settings"]["sampler"] == "dpmpp_2m" and saved["settings"]["guidance"] == 2.0
    out = command("evaluate", "g.pt", "--classifier", "c.pt", "-n", "40", "--guidance", "0", "1.5", "--out",
                  "m.json", cwd=tmp_path)
    assert "frechet_ratio" in out and "accuracy" in out
    report = json.loads((tmp_path / "m.json").read_text())
    assert [p["w"] for p in report["sweep"]] == [0.0, 1.5]
    point = report["sweep"][1]
    assert point["report"]["frechet"]["n1"] == 40 and point["report"]["frechet_floor"]["n1"] == 40
    assert point["frechet_ratio"] == pytest.approx(point["frechet"] / point["frechet_floor"])
    assert 0 <= point["accuracy"] <= 1 and 0 <= point["recall"] <= 1
    # evaluate stores the report in the checkpoint's record
    assert ckpt.record_of(ckpt.read_checkpoint(tmp_path / "g.pt"))["metrics"]["sweep"][1]["w"] == 1.5
    assert cli.main(["export", str(tmp_path / "g.pt"), "--name", "tiny", "--dir", str(tmp_path / "w")]) == 0
    record = json.loads((tmp_path / "w" / "tiny.json").read_text())
    assert record["weights"]["dtype"] == "float16" and record["metrics"]["n_samples"] == 40
    assert cli.main(["sample", str(tmp_path / "w" / "tiny.pt"), "--out", str(tmp_path / "t.png"), "-n", "2",
                     "--steps", "2"]) == 0
    capsys.readouterr()
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == str(torch.__version__) and info["threads"] >= 1
    assert info["triton_kernels"].startswith("active" if torch.cuda.is_available() else "inactive")
    assert set(info["configs"]) >= {"digits-unet"}


def test_resume_through_the_command_is_exact(tmp_path, capsys):
    """Stop after 3 steps, resume to 7: the same weights, EMA and log as an uninterrupted run."""
    args = [*DIGITS, "--steps", "7", "--lr-warmup", "2", "--lr-decay", "cosine", "--autocast", "bf16"]
    assert cli.main(["train", *args, "--out", str(tmp_path / "full.pt")]) == 0
    assert cli.main(["train", *args, "--out", str(tmp_path / "part.pt"), "--stop-after", "3"]) == 0
    assert ckpt.read_checkpoint(tmp_path / "part.pt")["step"] == 3
    assert cli.main(["train", *args, "--out", str(tmp_path / "part.pt"), "--resume"]) == 0
    a, b = ckpt.read_checkpoint(tmp_path / "full.pt"), ckpt.read_checkpoint(tmp_path / "part.pt")
    assert a["step"] == b["step"] == 7 and torch.equal(a["losses"], b["losses"])
    for key in ("model",):
        assert all(torch.equal(v, b[key][k]) for k, v in a[key].items())
    assert all(torch.equal(v, b["ema"]["model"][k]) for k, v in a["ema"]["model"].items())
    log_a = [json.loads(x)["loss"] for x in (tmp_path / "full.log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x)["loss"] for x in (tmp_path / "part.log.jsonl").read_text().splitlines()]
    assert log_a == log_b == a["losses"].tolist()
    capsys.readouterr()
    fails(capsys, "train", *args, "--steps", "9", "--out", tmp_path / "part.pt", "--resume",
          match="configuration differs in ['train']")
    fails(capsys, "train", *args, "--out", tmp_path / "full.pt", match="exists; pass resume=True", folder=tmp_path)


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen")
    assert cli.main(["train", *DIGITS, "--steps", "2", "--out", str(folder / "g.pt")]) == 0
    return folder / "g.pt"


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny shapes model conditioned on captions, and a tiny shapes classifier."""
    folder = tmp_path_factory.mktemp("text")
    text = ["--set", "model.text.dim=16", "--set", "model.text.depth=1", "--set", "model.text.heads=2"]
    shapes = ["--data", "shapes", "--n", "64", "--objects", "1-2", "--set", "data.n_held_out=32"]
    assert cli.main(["train", *shapes, "--condition", "text", "--label-dropout", "0.1", "--steps", "2",
                     "--batch-size", "8", "--threads", "1", "--no-progress", *TINY, *text, "--set", "sample.steps=3",
                     "--out", str(folder / "t.pt")]) == 0
    assert cli.main(["train", "--kind", "classifier", *shapes, "--arch", "shapes-cnn", "--steps", "2",
                     "--batch-size", "8", "--set", "model.width=4", "--set", "model.feature_dim=16", "--no-progress",
                     "--out", str(folder / "c.pt")]) == 0
    return folder / "t.pt", folder / "c.pt"


def test_text_model_samples_a_prompt_and_evaluates_scenes(text_model, tmp_path, capsys):
    model, classifier = text_model
    assert cli.main(["sample", str(model), "--prompt", "a small red circle at the top left", "-n", "3",
                     "--guidance", "3", "--rescale", "0.5", "--interval", "0.1", "0.9",
                     "--out", str(tmp_path / "p.png")]) == 0
    saved = torch.load(tmp_path / "p.pt", weights_only=True)
    assert saved["images"].shape == (3, 3, 32, 32) and saved["prompts"] == ["a small red circle at the top left"] * 3
    report = runs.evaluate_run(model, tmp_path / "m.json", classifier=classifier, n=16, guidance=[2.0], store=False)
    point = report["sweep"][0]
    scenes = point["report"]["scenes"]
    assert scenes["n_scenes"] == 16 and set(scenes["by_n_objects"]) <= {1, 2}
    assert set(scenes["errors"]) >= {"wrong_shape", "colour_leak", "missing_object", "extra_object"}
    assert "all_correct_1_object" in point or "all_correct_2_objects" in point
    assert "metrics" not in ckpt.record_of(ckpt.read_checkpoint(model))  # store=False
    capsys.readouterr()
    fails(capsys, "sample", model, "--class", "2", "--out", tmp_path / "x.png", match="needs a class-conditional",
          folder=tmp_path)


def test_bad_input_is_named_and_leaves_nothing(tmp_path, capsys, generator):
    capsys.readouterr()
    out = tmp_path / "x.pt"
    fails(capsys, "train", "--data", "fmnist", "--out", out, match="unknown name 'fmnist' in [data]", folder=tmp_path)
    fails(capsys, "train", *DIGITS, "--arch", "vit", "--out", out, match="unknown arch 'vit'", folder=tmp_path)
    fails(capsys, "train", *DIGITS, "--preset", "huge", "--out", out, match="unknown unet preset 'huge'",
          folder=tmp_path)
    fails(capsys, "train", "--config", "no-such-config", "--out", out, match="no configuration 'no-such-config'",
          folder=tmp_path)
    fails(capsys, "train", "--data", "image-folder", "--size", "8", "--path", tmp_path / "none", "--out", out,
          match="no such folder", folder=tmp_path)
    fails(capsys, "train", *DIGITS, "--out", out, "--resume", match="no checkpoint at", folder=tmp_path)
    fails(capsys, "sample", tmp_path / "missing.pt", "--out", tmp_path / "s.png", match="no checkpoint",
          folder=tmp_path)
    fails(capsys, "sample", generator, "--guidance", "-1", "--class", "1", "--out", tmp_path / "s.png",
          match="guidance scale w must be a number >= 0", folder=tmp_path)
    fails(capsys, "sample", generator, "--prompt", "zebra quokka", "--out", tmp_path / "s.png",
          match="prompt 'zebra quokka' has no known word", folder=tmp_path)
    fails(capsys, "sample", generator, "--class", "11", "--out", tmp_path / "s.png", match="class 11 out of range",
          folder=tmp_path)
    fails(capsys, "sample", generator, "--sampler", "euler_a", "--out", tmp_path / "s.png",
          match="unknown sampler 'euler_a'", folder=tmp_path)
    fails(capsys, "evaluate", generator, "--guidance", "1", "-0.5", "--classifier", generator,
          match="guidance scale w must be a number >= 0")
    fails(capsys, "evaluate", generator, "--classifier", tmp_path / "none.pt", match="no checkpoint")
    fails(capsys, "evaluate", generator, "--classifier", generator, "-n", "8", "--guidance", "1",
          match="is not a classifier")
    # a checkpoint that does not match the model its record describes
    weights, record = ckpt.export(generator, tmp_path / "w", "tiny")
    data = json.loads(record.read_text())
    data["config"]["model"]["channels"] = 16
    record.write_text(json.dumps(data))
    fails(capsys, "sample", weights, "--out", tmp_path / "s.png", match="do not match the model of its record",
          folder=tmp_path)


def test_config_from_argv_reproduces_the_recorded_configuration(generator):
    record = ckpt.record_of(ckpt.read_checkpoint(generator))
    assert record["command"][0] == "train"
    assert cli.config_from_argv(record["command"]) == record["config"]


def test_info_prints_the_facts(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("stepdiff:", "torch:", "device:", "triton_kernels:", "configurations:", "committed models:"):
        assert key in out


def test_bench_runs_what_runs_and_says_what_was_skipped(tmp_path, monkeypatch, capsys):
    """A stand-in benchmarks/ folder: a script that prints its table, one that needs CUDA, one
    that fails; `stepdiff bench` passes --quick and --no-write to the scripts that accept them."""
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    (folder / "bench_table.py").write_text(
        'import sys\nargs = sys.argv[1:]  # "--quick" "--no-write"\nprint("kernel  img/s", args)\n')
    (folder / "bench_gpu.py").write_text('import sys\nsys.exit("bench_gpu.py needs a CUDA device")\n')
    (folder / "bench_broken.py").write_text('raise RuntimeError("boom")\n')
    monkeypatch.setattr(runs, "_benchmarks_dir", lambda: folder)
    results = {r["name"]: r for r in runs.bench_run(echo=False)}
    assert results["table"]["status"] == "ran" and "['--quick', '--no-write']" in results["table"]["output"]
    assert results["broken"]["status"] == "failed"
    if not torch.cuda.is_available():
        assert results["gpu"]["status"] == "skipped"
    assert cli.main(["bench", "table", "gpu"]) == 0
    assert "skipped for want of a CUDA device: gpu" in capsys.readouterr().out or torch.cuda.is_available()
    assert cli.main(["bench", "broken"]) == 1
    fails(capsys, "bench", "nonesuch", match="unknown benchmark(s) ['nonesuch']")


def write_idx(path: Path, array) -> None:
    import numpy as np

    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    path.write_bytes(header + array.tobytes())


def test_data_a_user_has_on_disk_trains(tmp_path):
    """An image folder (one sub-folder per class), MNIST IDX files and CIFAR-10 pickles, written
    small here, each train a step through the command's configuration."""
    import pickle

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "folder"
    for c in ("cats", "dogs"):
        (folder / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    write_idx(mnist / "train-images-idx3-ubyte", rng.integers(0, 256, (8, 28, 28)))
    write_idx(mnist / "train-labels-idx1-ubyte", rng.integers(0, 10, 8))
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [1, 7]}
        (cifar / name).write_bytes(pickle.dumps(batch))
    common = ["train.steps=1", "train.batch_size=4", "train.threads=1", *TINY[1::2]]  # TINY's --set values
    cases = {
        "folder": [f"data.path={json.dumps(str(folder))}", "data.name=image-folder", "data.size=8",
                   "data.condition=class", "data.n_classes=2"],
        "mnist": [f"data.path={json.dumps(str(mnist))}", "data.name=mnist", "data.pad=2"],
        "cifar": [f"data.path={json.dumps(str(cifar))}", "data.name=cifar10", "data.condition=class"],
    }
    for name, data in cases.items():
        result = runs.train_run(None, tmp_path / f"{name}.pt", overrides=[*data, *common])
        model, record = ckpt.load(result.path)
        shape = runs._image_shape(record["config"])
        assert shape == {"folder": (3, 8, 8), "mnist": (1, 32, 32), "cifar": (3, 32, 32)}[name]
        images = runs.sample_images(model, record["config"], 2, steps=2)
        assert images.shape == (2, *shape) and bool(torch.isfinite(images).all())
