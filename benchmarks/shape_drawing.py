r"""Can the pixel UNet of the text-to-image models draw the eight shapes at all, when the shape is all
it is told? Measured once and stored for chapter II.9 (``stepdiff/results/shape_drawing.json``,
installed with the package).

    python benchmarks/shape_drawing.py --class SNAPSHOT.pt [...] --text MODEL_OR_SNAPSHOT [...]

**The question.** The text-to-image models read back the asked shape for about a fifth of their
objects, and chapter II.9 found that neither tuning the text tower nor learning a text encoder
from scratch changes that. Two explanations remain: the UNet cannot yet draw a shape's outline at
32x32 (a drawing problem), or it can but the sentence does not steer it (a conditioning problem).
A run that removes the sentence tells them apart:

- ``class``: ``shapes-pixel-t2i``'s UNet, objective and 800 steps (seed 0), on scenes of one object
  labelled only by its shape (a class embedding of 8 shapes plus the null class, 10 % dropped for
  guidance): ``stepdiff train --config shapes-pixel-t2i --set 'data.condition="class"' --set
  'data.n_objects=[1, 1]' --set 'model.text.clip=""' --set 'name="shapes-class-shape"'``.
- ``text``: text-conditioned models (the committed ``shapes-pixel-t2i`` and checkpoints of its
  variants), asked the captions of one-object held-out scenes; a model trained on shape-only
  captions (``--set 'data.caption_style="shape"'``, "a circle") is asked the same scenes' shapes
  in its own style.
- Longer and looked up: the ``class`` run and the best caption run (CLIP's tower, pool only) trained
  for 2000 steps (``--set train.steps=2000``, the cosine decay stretched with it; about 30 CPU
  minutes each), measured every 400 steps; and a caption read by a text encoder with no
  transformer blocks (``--set model.text.depth=0``: one free row per word and place).
- One-hot words: no text encoder at all (``--set model.text.depth=0 --set model.text.one_hot=true``),
  so the pool is a bag of words and each word has its own column of the pool's map, as a label has
  its own row; pool only, 800 steps, from a zero map (the default) and from a random map whose
  word columns move the time embedding about as much as a class embedding does
  (``--set model.pooled_gain=24.0``: 4 real tokens of "a circle", 37 words, so
  $g = 4\sqrt{37}$), the latter also for 2000 steps; and the committed model's recipe (one and two
  objects, full captions, cross-attention and pool) with one-hot words (``shapes-t2i-one-hot``).
- CLIP's shape word through the pool alone from a random start (``--set model.pooled_gain=1.0``
  and ``4.0``; at gain 4 every pair of shape words starts at least as far apart as two label rows),
  800 steps.
- Word rows beside CLIP's tokens (``--set model.text.word_rows=true``: a free N(0, 1) row per word,
  summed into the time embedding), 800 steps: on one-object shape captions
  (``shapes-t2i-shape-word-word-rows``), and in the committed recipe (``shapes-t2i-word-rows``);
  the committed recipe with word rows also for 2000 steps, measured every 400
  (``shapes-t2i-word-rows-2000``), and on one-object scenes only
  (``shapes-t2i-one-object-word-rows-2000``, ``--set 'data.n_objects=[1, 1]'``).

**Measured** alike for both: 200 images (the class model: each shape 25 times; a text model: the
first 200 one-object held-out captions), Heun with 15 steps, $w = 3$, seed 0 (the settings of
``benchmarks/latent_vs_pixel.py``), read back by the committed ``shapes-classifier``. An image
counts as *shape right* when an object it reads has the asked shape, wherever it is and whatever
its colour and size; ``drawn`` is the fraction of images in which it reads any object at all.
Cost (one thread): about 2 CPU minutes per model.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from latent_vs_pixel import GUIDANCE, SAMPLER, SEED  # noqa: E402

from stepdiff import checkpoints  # noqa: E402
from stepdiff.config import held_out_data, resolve  # noqa: E402
from stepdiff.runs import make_config, sample_images  # noqa: E402
from stepdiff.shapes import SHAPES, caption, parse_caption, scene_from_caption  # noqa: E402

DEFAULT_OUT = ROOT / "stepdiff" / "results" / "shape_drawing.json"
N = 200


def shape_reading(predicted: torch.Tensor, asked: torch.Tensor) -> dict:
    r"""How often the read scenes ``predicted`` (``[N, 9, 3]``, {meth}`ShapesClassifier.predict`) hold
    an object of the asked shape index ``asked`` (``[N]``, into ``SHAPES``): ``shape_right``
    $= \frac1N\sum_n \mathbb 1[\exists c: \hat s_{nc} = a_n + 1]$, ``drawn`` the fraction with any object
    read, ``by_shape`` the first per asked shape."""
    if predicted.ndim != 3 or predicted.shape[1:] != (9, 3):
        raise ValueError(f"predicted must be [N, 9, 3] read scenes; got {tuple(predicted.shape)}")
    if asked.shape != predicted.shape[:1]:
        raise ValueError(f"asked must be [N] = [{predicted.shape[0]}] shape indices; got {tuple(asked.shape)}")
    shapes = predicted[..., 0]
    right = (shapes == asked[:, None] + 1).any(1)
    return {
        "n": int(asked.numel()),
        "shape_right": float(right.double().mean()),
        "drawn": float((shapes > 0).any(1).double().mean()),
        "objects_read_mean": float((shapes > 0).sum(1).double().mean()),
        "by_shape": {name: float(right[asked == k].double().mean()) for k, name in enumerate(SHAPES)
                     if bool((asked == k).any())},
    }


def prompts_for(captions: list[str], style: str) -> list[str]:
    """The held-out captions as the model was trained to read them: unchanged, or for a model trained
    on the ``"shape"`` style ("a circle"), reduced to their shapes."""
    if style != "shape":
        return list(captions)
    return [caption(scene_from_caption(c, seed=0, index=i), "shape") for i, c in enumerate(captions)]


def _measure(source: str | Path, kind: str, judge, one_object_captions: list[str]) -> dict:
    model, record = checkpoints.load(source)
    cfg = resolve(record["config"], source=str(source))
    condition = cfg["data"]["condition"]
    if condition != kind:
        raise SystemExit(f"{source} is conditioned on {condition!r}, not {kind!r}")
    if kind == "class":
        asked = torch.arange(N) % len(SHAPES)
        kwargs = {"labels": asked}
    else:
        prompts = prompts_for(one_object_captions[:N], cfg["data"]["caption_style"])
        asked = torch.tensor([SHAPES.index(parse_caption(p).objects[0].shape) for p in prompts])
        kwargs = {"prompts": prompts}
    c0 = time.process_time()
    images = sample_images(model, cfg, N, guidance=GUIDANCE, seed=SEED, batch_size=N, **kwargs, **SAMPLER)
    cpu = time.process_time() - c0
    with torch.no_grad():
        reading = shape_reading(judge.predict(images), asked)
    return {
        "model": Path(source).name if Path(source).is_file() else str(source),
        "name": record.get("name"),
        "caption_style": cfg["data"]["caption_style"] if kind == "text" else None,
        "n_objects": list(cfg["data"]["n_objects"]),
        "step": int(record["step"]),
        "train_cpu_s": round(float(record["cpu_s"]), 2),
        **reading,
        "sample_cpu_s_per_image": cpu / N,
        "train_command": checkpoints.portable_command(record["command"]) if record.get("command") else None,
        "commit": record.get("commit"),
        "dirty": record.get("dirty"),
        "losses_head": (record.get("losses_head") or [])[:5],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--class", dest="class_models", nargs="+", default=[], metavar="SNAPSHOT",
                   help="checkpoints of the shape-labelled run")
    p.add_argument("--text", dest="text_models", nargs="+", default=[], metavar="MODEL",
                   help="text-conditioned models: committed names or checkpoints")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if not args.class_models and not args.text_models:
        p.error("give models to measure with --class and/or --text")
    for s in args.class_models:
        if not Path(s).is_file():
            p.error(f"--class: no snapshot file at {s}")
    torch.set_num_threads(1)
    judge, judge_record = checkpoints.load("shapes-classifier")
    held = held_out_data(make_config("shapes-pixel-t2i"))
    one = [c for c in held.captions if len(parse_caption(c).objects) == 1]
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    c0 = time.process_time()
    runs = {"class": [], "text": []}
    for kind, sources in (("class", args.class_models), ("text", args.text_models)):
        for source in sources:
            entry = _measure(source, kind, judge, one)
            runs[kind].append(entry)
            print(f"{kind:5s} {entry['name']} step {entry['step']:5d}  shape right {entry['shape_right']:.3f}  "
                  f"drawn {entry['drawn']:.3f}", flush=True)
    settings = {"n_samples": N, "guidance": GUIDANCE, **SAMPLER, "seed": SEED,
                "class_labels": f"each of the {len(SHAPES)} shapes in turn",
                "prompts": f"the first {N} one-object held-out captions",
                "classifier": {"name": judge_record.get("name"), "commit": judge_record.get("commit"),
                               "sha256": (judge_record.get("weights") or {}).get("sha256")},
                "threads": 1}
    command = {"command": ["python", "benchmarks/shape_drawing.py"]
               + (["--class", *[Path(s).name for s in args.class_models]] if args.class_models else [])
               + (["--text", *[Path(s).name if Path(s).is_file() else s for s in args.text_models]]
                  if args.text_models else []),
               "date": started, "cpu_s": round(time.process_time() - c0, 1), "torch": torch.__version__,
               "python": platform.python_version(), "device": checkpoints.device_description("cpu")}
    _store(args.out, settings, runs, command)
    print(f"wrote {args.out}")


def _store(out: Path, settings: dict, runs: dict, command: dict) -> None:
    """Write the entries to ``out``, merged into what it holds from earlier invocations with the same
    settings (an entry of the same model name and step is replaced), and this invocation's command."""
    results = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {
        "what": "how often a pixel UNet draws the asked shape, told only the shape (a class label) or a "
                "one-object caption (benchmarks/shape_drawing.py)",
        "settings": settings,
        "runs": {"class": [], "text": []},
        "commands": [],
    }
    if results["settings"] != settings:
        raise SystemExit(f"{out} was measured with other settings: write to another file")
    for kind, entries in runs.items():
        new = {(e["name"], e["step"]) for e in entries}
        kept = [e for e in results["runs"][kind] if (e["name"], e["step"]) not in new]
        results["runs"][kind] = sorted(kept + entries, key=lambda e: (e["name"], e["step"]))
    results["commands"].append(command)
    checkpoints.write_json(out, results)


if __name__ == "__main__":
    main()
