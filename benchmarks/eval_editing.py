r"""Editing measured on the committed models, once, for chapter II.10: the SDEdit curve, three ways
of inpainting, and how well a ControlNet follows its control mask.

    python benchmarks/eval_editing.py                         # every part; writes the results file
    python benchmarks/eval_editing.py --parts masked controlnet   # some parts (the others are kept)
    python benchmarks/eval_editing.py --quick --out /tmp/e.json   # a smoke run (few images)
    python benchmarks/eval_editing.py --parts sdedit --out A.json &    # two processes at once ...
    python benchmarks/eval_editing.py --parts inpaint masked controlnet --out B.json
    python benchmarks/eval_editing.py --merge A.json B.json           # ... merged into the results file

Why stored: one call of the 16x16 digits UNet costs about 3 CPU milliseconds per image (one
thread), one guided call of the 32x32 shapes ControlNet about 27; the parts below make about
110,000 image-calls, some 6 CPU minutes, far beyond a chapter's budget. The chapter reads the
file (installed with the package), plots it, and re-measures small pieces live.

**The parts** (every random draw from a fixed seed; one torch thread):

- ``sdedit``: ``N_SDEDIT`` = 200 training digits (a fixed draw), each turned into a two-tone
  blocky sketch ({func}`stepdiff.editing.blocky_sketch`, 2x2 blocks), edited by
  {func}`stepdiff.editing.sdedit` with the unconditional ``digits-unet-uncond`` (so whatever of the
  input survives comes from the input, not from a label) at strengths ``STRENGTHS``, DDPM
  ancestral steps on the uniform grid, $\lceil 100 s\rceil$ of them (the step size of a 100-step
  run, the sampler at which the model is 0.97x the floor). Faithfulness: RMS pixel distance and
  distance in the evaluation classifier's features to the sketch; distance in features to the
  clean original; the class the classifier reads against the original's. Realism: the Fréchet
  distance of the edits to the 300 held-out digits, beside the floor (200 training digits against
  the same held-out set, mean of 10 draws).
- ``inpaint``: ``N_INPAINT`` = 100 held-out digits, each with one unknown box of 50-60 % of each
  side ({func}`stepdiff.editing.random_box_masks`, seed 0), filled by ``digits-unet-uncond`` with
  replacement at every step (50 ancestral steps, uniform grid) and with RePaint's resampling (the
  same grid, ``jump`` = 5, ``resample`` = 4: 185 model calls). Coherence: the fraction of
  completions the classifier reads as the original's class, beside the originals and the holed
  images (the hole set to the background, -1); the known region compared bit for bit.
- ``masked``: the same images and masks filled by the masked-input model ``digits-inpaint`` with
  its null class (unconditional, like the others), 50 DDPM steps on the same grid.
- ``controlnet``: ``N_CONTROL`` = 32 held-out "shapes" scenes (the classifiers' held-out seed,
  the base's data settings); their captions and the union of their object masks as the control.
  Sampled with ``shapes-controlnet`` and, as the baseline, with its base ``shapes-unet`` without
  control, from the same noise: DPM-Solver++(2M), 25 steps on the log-SNR grid, classifier-free
  guidance $w = 3$ (the base's configured sampler). Control followed: the IoU between the object
  mask read from each sample ({func}`stepdiff.models.controlnet.object_mask_from_image`) and the
  control mask; the ceiling is the same estimate on the real scenes.

The file (written atomically after every record, so an interrupted run resumes where it stopped:
records of the same count are kept) holds the command, date, versions, the digests of
every model's weights, the counts and seeds, and per part its numbers and CPU seconds.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import platform
import sys
import time
from pathlib import Path

import torch

import stepdiff
from stepdiff import pretrained
from stepdiff.checkpoints import write_json
from stepdiff.config import build_objective, resolve
from stepdiff.editing import blocky_sketch, inpaint, inpaint_with_model, random_box_masks, sdedit
from stepdiff.evaluation import extract_features, frechet_distance, frechet_floor
from stepdiff.image_data import load_digits
from stepdiff.schedules import time_grid

OUT = Path(stepdiff.__file__).parent / "results" / "editing.json"
PARTS = ("sdedit", "inpaint", "masked", "controlnet")
STRENGTHS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)
N_SDEDIT, N_INPAINT, N_CONTROL = 200, 100, 32
INPAINT_STEPS, JUMP, RESAMPLE = 50, 5, 4
BOX = (0.5, 0.6)  # the unknown box's side as a fraction of the image's


def _digest(name: str) -> str:
    return pretrained.record(name)["weights"]["sha256"]


def _digits_task(quick: bool) -> dict:
    """The classifier, the held-out features and the training digits shared by the digits parts."""
    judge, _ = pretrained.load("digits16-classifier")
    model, record = pretrained.load("digits-unet-uncond")
    schedule, prediction, _ = build_objective(resolve(record["config"]))
    train, held = load_digits("train", size=16), load_digits("heldout", size=16)
    return {"judge": judge, "model": model, "schedule": schedule, "prediction": prediction, "train": train,
            "held": held, "f_held": extract_features(judge, held.images), "quick": quick}


def _read(judge, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return judge.predict(images)


def _earlier(task: dict, part: str, n: int) -> dict:
    """The records of ``part`` already in the results file for the same count (a resumed run)."""
    prev = task["results"]["parts"].get(part) or {}
    return prev if prev.get("n") == n and bool(prev.get("quick")) == task["quick"] else {}


def part_sdedit(task: dict) -> dict:
    judge, model, schedule = task["judge"], task["model"], task["schedule"]
    n = 16 if task["quick"] else N_SDEDIT
    rows = torch.randperm(task["train"].images.shape[0], generator=torch.Generator().manual_seed(0))[:n]
    originals, labels = task["train"].images[rows], task["train"].labels[rows]
    sketches = blocky_sketch(originals, 2)
    f_train = extract_features(judge, task["train"].images)
    floor = frechet_floor(f_train, task["f_held"], n, repeats=10, seed=0)
    f_sketch, f_orig = extract_features(judge, sketches), extract_features(judge, originals)
    result = {"n": n, "quick": task["quick"], "rows_seed": 0, "noise_seed": 1, "sketch_factor": 2, "sampler": "ddpm",
              "spacing": "uniform", "steps_rule": "ceil(100 s)", "model": "digits-unet-uncond",
              "floor": floor.as_dict(),
              "originals_class_read": float((_read(judge, originals) == labels).float().mean()),
              "originals_frechet_ratio": frechet_distance(f_orig, task["f_held"]).value / floor.value}
    done = {r["strength"]: r for r in _earlier(task, "sdedit", n).get("runs", [])}
    runs = []
    for s in STRENGTHS:
        if s in done:
            runs.append(done[s])
            continue
        steps = math.ceil(100 * s)
        cpu = time.process_time()
        with torch.no_grad():
            out = sdedit(model, sketches, schedule, s, n_steps=max(steps, 1), sampler="ddpm",
                         prediction=task["prediction"], generator=1)
        f_out = extract_features(judge, out)
        fd = frechet_distance(f_out, task["f_held"])
        runs.append({
            "strength": s, "steps": steps if s > 0 else 0,
            "pixel_rms_to_input": float(((out - sketches) ** 2).flatten(1).mean(1).sqrt().mean()),
            "feature_distance_to_input": float((f_out - f_sketch).norm(dim=1).mean()),
            "feature_distance_to_original": float((f_out - f_orig).norm(dim=1).mean()),
            "class_kept": float((_read(judge, out) == labels).float().mean()),
            "frechet": fd.value, "frechet_ratio": fd.value / floor.value,
            "cpu_s": round(time.process_time() - cpu, 2),
        })
        print(f"sdedit s={s}: {runs[-1]}", flush=True)
        task["save"]("sdedit", {**result, "runs": runs, "complete": False})
    return {**result, "runs": runs}


def _inpaint_task(task: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = 16 if task["quick"] else N_INPAINT
    images, labels = task["held"].images[:n], task["held"].labels[:n]
    masks = random_box_masks(n, 16, 16, min_frac=BOX[0], max_frac=BOX[1], generator=torch.Generator().manual_seed(0))
    return images, labels, masks


def _fill_record(judge, out, images, labels, masks, cpu: float, calls: int) -> dict:
    known = masks.expand_as(images)
    return {"class_kept": float((_read(judge, out) == labels).float().mean()),
            "known_region_exact": bool(torch.equal(out[known], images[known])),
            "hole_rms_to_original": float((((out - images) ** 2) * ~known).flatten(1).sum(1).div(
                (~known).flatten(1).sum(1)).sqrt().mean()),
            "model_calls": calls, "cpu_s": round(cpu, 2)}


def part_inpaint(task: dict) -> dict:
    judge, model, schedule = task["judge"], task["model"], task["schedule"]
    images, labels, masks = _inpaint_task(task)
    ts = time_grid(INPAINT_STEPS, "uniform", schedule)
    result = {"n": images.shape[0], "quick": task["quick"], "mask_seed": 0, "box_fraction": list(BOX),
              "model": "digits-unet-uncond",
              "steps": INPAINT_STEPS, "spacing": "uniform", "eta": 1.0, "jump": JUMP, "resample": RESAMPLE,
              "noise_seed": 1, "unknown_fraction": float((~masks).float().mean()),
              "originals_class_read": float((_read(judge, images) == labels).float().mean()),
              "holed_class_read": float((_read(judge, torch.where(masks, images, -1.0)) == labels).float().mean())}
    earlier = _earlier(task, "inpaint", images.shape[0])
    for name, resample in (("replacement", 1), ("repaint", RESAMPLE)):
        if name in earlier:
            result[name] = earlier[name]
            continue
        cpu = time.process_time()
        with torch.no_grad():
            out = inpaint(model, images, masks, schedule, ts, resample=resample, jump=JUMP, eta=1.0,
                          prediction=task["prediction"], generator=1)
        calls = INPAINT_STEPS + (resample - 1) * JUMP * ((INPAINT_STEPS - 1) // JUMP)
        result[name] = _fill_record(judge, out, images, labels, masks, time.process_time() - cpu, calls)
        print(f"inpaint {name}: {result[name]}", flush=True)
        task["save"]("inpaint", {**result, "complete": False})
    return result


def part_masked(task: dict) -> dict:
    judge = task["judge"]
    model, record = pretrained.load("digits-inpaint")
    schedule, prediction, _ = build_objective(resolve(record["config"]))
    images, labels, masks = _inpaint_task(task)
    ts = time_grid(INPAINT_STEPS, "uniform", schedule)
    cpu = time.process_time()
    with torch.no_grad():  # no label: the null class, as the other two methods are unconditional
        out = inpaint_with_model(model, images, masks, schedule, ts, sampler="ddpm", prediction=prediction,
                                 generator=1)
    result = {"n": images.shape[0], "quick": task["quick"], "model": "digits-inpaint", "sampler": "ddpm",
              "steps": INPAINT_STEPS,
              "spacing": "uniform", "noise_seed": 1, "label": "null class",
              **_fill_record(judge, out, images, labels, masks, time.process_time() - cpu, INPAINT_STEPS)}
    print(f"inpaint masked: {result}", flush=True)
    return result


def part_controlnet(quick: bool) -> dict:
    from stepdiff.guidance import ClassifierFreeGuidance
    from stepdiff.models.controlnet import control_maps, mask_iou, object_mask_from_image
    from stepdiff.samplers import SAMPLERS
    from stepdiff.shapes import make_shapes
    from stepdiff.text import Tokenizer

    cn, cn_record = pretrained.load("shapes-controlnet")
    base, base_record = pretrained.load("shapes-unet")
    cfg = resolve(cn_record["config"])
    base_cfg = resolve(base_record["config"])
    schedule, prediction, _ = build_objective(base_cfg)
    d = cfg["data"]
    n = 8 if quick else N_CONTROL
    from stepdiff.classifiers import SHAPES_HELD_OUT_SEED

    scenes = make_shapes(n, seed=SHAPES_HELD_OUT_SEED, size=d["size"], n_objects=tuple(d["n_objects"]),
                         caption_style=d["caption_style"], masks=True)
    control = control_maps(scenes.masks, scenes.edges, cfg["model"]["control"])
    target = control > 0.5
    ids = Tokenizer().encode(scenes.captions)
    sample_cfg = base_cfg["sample"]
    w = float(sample_cfg["guidance"])
    ts = time_grid(sample_cfg["steps"], sample_cfg["spacing"], schedule)
    z = torch.randn(n, 3, d["size"], d["size"], generator=torch.Generator().manual_seed(1))
    x = float(schedule.sigma(ts[0])) * z
    result = {"n": n, "quick": quick, "scenes_seed": SHAPES_HELD_OUT_SEED, "noise_seed": 1, "guidance": w,
              "sampler": sample_cfg["sampler"], "steps": sample_cfg["steps"], "spacing": sample_cfg["spacing"],
              "control": cfg["model"]["control"],
              "ceiling_iou": float(mask_iou(object_mask_from_image(scenes.images), target).mean())}
    for name, denoiser in (("controlnet", cn.bind(control)), ("base", base)):
        cpu = time.process_time()
        guided = ClassifierFreeGuidance(denoiser, w, y=ids, null=base.null_ids)
        with torch.no_grad():
            out = SAMPLERS[sample_cfg["sampler"]](guided, x, schedule, ts, prediction=prediction).clamp(-1, 1)
        iou = mask_iou(object_mask_from_image(out), target)
        result[name] = {"iou_mean": float(iou.mean()), "iou_median": float(iou.median()),
                        "iou_min": float(iou.min()), "cpu_s": round(time.process_time() - cpu, 2)}
        print(f"controlnet {name}: {result[name]}", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--quick", action="store_true", help="a smoke run on a few images")
    parser.add_argument("--merge", nargs="+", type=Path, help="merge the parts of these results files into --out")
    args = parser.parse_args(argv)
    if args.merge:
        import json

        merged = json.loads(args.out.read_text()) if args.out.is_file() else {"weights": {}, "parts": {}}
        for path in args.merge:
            other = json.loads(path.read_text())
            merged.update({k: v for k, v in other.items() if k not in ("weights", "parts")})
            merged.setdefault("weights", {}).update(other.get("weights", {}))
            merged.setdefault("parts", {}).update(other.get("parts", {}))
        merged["command"] = "; ".join(sorted({p["run_command"] for p in merged["parts"].values()}))
        write_json(args.out, merged)
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    results = {}
    if args.out.is_file():
        import json

        results = json.loads(args.out.read_text())
    argv_named = [Path(a).name if a.startswith("/") else a for a in (argv if argv is not None else sys.argv[1:])]
    results.update({"command": "python benchmarks/eval_editing.py " + " ".join(argv_named),
                    "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "versions": {"stepdiff": stepdiff.__version__, "torch": torch.__version__,
                                 "python": platform.python_version()},
                    "threads": torch.get_num_threads(), "quick": args.quick})
    results.setdefault("weights", {})
    results.setdefault("parts", {})

    def save(part: str, record: dict) -> None:
        results["parts"][part] = {**record, "run_command": results["command"]}
        write_json(args.out, results)

    task = None
    for part in args.parts:
        cpu = time.process_time()
        if part in ("sdedit", "inpaint", "masked"):
            task = task or {**_digits_task(args.quick), "results": results, "save": save}
            for name in ("digits-unet-uncond", "digits16-classifier"):
                results["weights"][name] = _digest(name)
            out = {"sdedit": part_sdedit, "inpaint": part_inpaint, "masked": part_masked}[part](task)
            if part == "masked":
                results["weights"]["digits-inpaint"] = _digest("digits-inpaint")
        else:
            out = part_controlnet(args.quick)
            for name in ("shapes-controlnet", "shapes-unet"):
                results["weights"][name] = _digest(name)
        out["part_cpu_s"] = round(time.process_time() - cpu, 1)  # this invocation's share, if resumed
        out["complete"] = True
        save(part, out)
        print(f"== {part} done in {out['part_cpu_s']} CPU s", flush=True)


if __name__ == "__main__":
    main()
