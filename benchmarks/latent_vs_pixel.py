r"""Latent against pixel diffusion along training, measured once and stored for chapter II.8
(``stepdiff/results/latent_vs_pixel.json``, installed with the package).

    python benchmarks/latent_vs_pixel.py --model shapes-ldm SNAPSHOT.pt [SNAPSHOT.pt ...]
    python benchmarks/latent_vs_pixel.py --model shapes-pixel-t2i SNAPSHOT.pt [...]
    python benchmarks/latent_vs_pixel.py --model shapes-ldm CKPT --out /tmp/x.json --n 16   # a smoke run

**What is compared.** ``shapes-ldm`` (a UNet on the 8x8x4 latents of the committed autoencoder
``shapes-ae``) and its pixel-space twin ``shapes-pixel-t2i`` (a UNet on the 32x32x3 pixels), trained
on the same scenes and captions with the same objective (flow matching, velocity), the same frozen
CLIP text tower and caption dropout, the pixel twin for the same wall time. The snapshots are copies
of a run's training checkpoint taken as it was rewritten; each stores its ``step`` and the time spent
so far (``elapsed``: wall and CPU seconds), so the series gives quality against training steps and
against training time.

**Each snapshot** (its EMA weights) draws ``n`` images (default 200) for the captions of the first
``n`` held-out scenes, from the same start noise (seed 0), with the same sampler for both models
(Heun, 15 steps, uniform grid: 29 network calls, each doubled by classifier-free guidance with
$w = 3$), and is scored by the committed evaluation classifier ``shapes-classifier``
({mod}`stepdiff.evaluation`): the Fréchet distance of its features to the 2000 held-out scenes,
beside the **floor** (``n`` training scenes against the same held-out scenes, mean and spread over 5
draws), and the scenes read back against their captions (``all_correct``, the attribute accuracies).
The CPU seconds of the sampling (one thread, one batch of ``n``) are stored per image.

Cost (one thread): about 0.5 CPU s per image for the pixel model and 0.14 for the latent one, so at
``n`` = 200 about 100 s per pixel snapshot and 30 s per latent snapshot, plus about 15 s to render
the scenes and read them. Run it once per model with the snapshots chosen; every run adds its records
to the file (a snapshot evaluated again replaces its record), and refuses to mix settings. The file
is written atomically and holds the commands, the versions, the classifier's digest and the settings.
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

from stepdiff import checkpoints  # noqa: E402
from stepdiff.config import build_data, held_out_data, resolve  # noqa: E402
from stepdiff.evaluation import extract_features, frechet_distance, frechet_floor, scene_errors  # noqa: E402
from stepdiff.runs import make_config, sample_images  # noqa: E402
from stepdiff.shapes import parse_caption  # noqa: E402

DEFAULT_OUT = ROOT / "stepdiff" / "results" / "latent_vs_pixel.json"
MODELS = ("shapes-ldm", "shapes-pixel-t2i")
SAMPLER = {"sampler": "heun", "steps": 15, "spacing": "uniform"}
GUIDANCE = 3.0
SEED = 0
FLOOR_REPEATS = 5
N_FLOOR_TRAIN = 2000  # training scenes the floor's draws are taken from


def _settings(n: int, classifier_record: dict) -> dict:
    return {
        "n_samples": n,
        "guidance": GUIDANCE,
        **SAMPLER,
        "seed": SEED,
        "prompts": f"the captions of the first {n} held-out scenes",
        "classifier": {"name": classifier_record.get("name"), "commit": classifier_record.get("commit"),
                       "sha256": (classifier_record.get("weights") or {}).get("sha256")},
        "floor_repeats": FLOOR_REPEATS,
        "floor_train_scenes": N_FLOOR_TRAIN,
        "threads": 1,
    }


def _reference(n: int, judge) -> tuple[dict, dict, torch.Tensor]:
    """The held-out scenes (2000, of the data both models trained on), their features, and the floor."""
    cfg = make_config("shapes-pixel-t2i")  # the data table is the same for both models
    held = held_out_data(cfg)
    floor_cfg = make_config("shapes-pixel-t2i", [f"data.n={N_FLOOR_TRAIN}"])
    train_images = build_data(floor_cfg).images
    f_held = extract_features(judge, held.images)
    f_train = extract_features(judge, train_images)
    floor = frechet_floor(f_train, f_held, n, repeats=FLOOR_REPEATS, seed=SEED)
    return {"n_held_out": int(held.images.shape[0]), "floor": floor.as_dict()}, held, f_held


def evaluate_snapshot(path: Path, model_name: str, n: int, judge, held, f_held, floor_value: float) -> dict:
    model, record = checkpoints.load(path)
    if record.get("name") != model_name:
        raise ValueError(f"{path} is a checkpoint of {record.get('name')!r}, not of {model_name!r}")
    cfg = resolve(record["config"], source=str(path))
    prompts = list(held.captions[:n])
    c0, w0 = time.process_time(), time.perf_counter()
    images = sample_images(model, cfg, n, prompts=prompts, guidance=GUIDANCE, seed=SEED, batch_size=n, **SAMPLER)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    fd = frechet_distance(extract_features(judge, images), f_held)
    with torch.no_grad():
        predicted = judge.predict(images)
    scenes = scene_errors(predicted, [parse_caption(c) for c in prompts])
    return {
        "file": path.name,
        "step": int(record["step"]),
        "train_wall_s": round(float(record["wall_s"]), 2),
        "train_cpu_s": round(float(record["cpu_s"]), 2),
        "frechet": fd.value,
        "frechet_ratio": fd.value / floor_value,
        "all_correct": scenes["all_correct"],
        "by_n_objects": scenes["by_n_objects"],
        "attribute_accuracy": scenes["attribute_accuracy"],
        "sample_cpu_s_per_image": cpu / n,
        "sample_wall_s_per_image": wall / n,
        "mean_pixel": float(images.mean()),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, choices=MODELS, help="which run the snapshots belong to")
    p.add_argument("snapshots", nargs="+", type=Path, help="training checkpoints of that run (stepdiff train)")
    p.add_argument("--n", type=int, default=200, help="images per snapshot (default 200)")
    p.add_argument("--classifier", default="shapes-classifier", help="evaluation classifier (committed name or file)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if args.n < 2:
        p.error(f"--n must be at least 2; got {args.n}")
    for s in args.snapshots:
        if not s.is_file():
            p.error(f"no snapshot file at {s}")
    torch.set_num_threads(1)
    judge, judge_record = checkpoints.load(args.classifier)
    if judge_record.get("kind") != "classifier":
        p.error(f"--classifier {args.classifier} is not a classifier")
    settings = _settings(args.n, judge_record)
    existing = json.loads(args.out.read_text(encoding="utf-8")) if args.out.is_file() else None
    if existing is not None and existing["settings"] != settings:
        raise SystemExit(f"{args.out} was measured with other settings ({existing['settings']}); "
                         f"these are {settings}: write to another file")
    c_start = time.process_time()
    reference, held, f_held = _reference(args.n, judge)
    if existing is not None and existing["reference"] != reference:
        raise SystemExit(f"{args.out}: the held-out set or floor differ from the stored ones")
    results = existing or {
        "what": "Latent (shapes-ldm) against pixel (shapes-pixel-t2i) diffusion: Frechet distance and scenes read "
                "back along training, from snapshots of the training checkpoints (benchmarks/latent_vs_pixel.py)",
        "settings": settings,
        "reference": reference,
        "runs": {m: [] for m in MODELS},
        "commands": [],
    }
    command = {
        "command": ["python", "benchmarks/latent_vs_pixel.py", "--model", args.model, "--n", str(args.n),
                    "--classifier", Path(args.classifier).name, *[s.name for s in args.snapshots]],
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_s": 0.0,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": checkpoints.device_description("cpu"),
    }
    results["commands"].append(command)
    for path in args.snapshots:
        entry = evaluate_snapshot(path, args.model, args.n, judge, held, f_held, reference["floor"]["value"])
        runs = [e for e in results["runs"][args.model] if e["step"] != entry["step"]]
        results["runs"][args.model] = sorted(runs + [entry], key=lambda e: e["step"])
        command["cpu_s"] = round(time.process_time() - c_start, 1)
        checkpoints.write_json(args.out, results)  # after every snapshot, so that an interrupted run keeps its part
        print(f"{args.model} step {entry['step']:5d}  train {entry['train_wall_s']:7.0f} s wall "
              f"{entry['train_cpu_s']:7.0f} s CPU  FD {entry['frechet']:8.2f} ({entry['frechet_ratio']:.2f}x floor)  "
              f"all correct {entry['all_correct']:.3f}  sample {entry['sample_cpu_s_per_image']:.3f} CPU s/image",
              flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
