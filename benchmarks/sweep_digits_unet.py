r"""Sampling sweeps on the committed class-conditional digits model: quality against steps, solver,
grid, posterior variance and guidance, measured once and stored for chapters II.5, II.6 and II.7.

    python benchmarks/sweep_digits_unet.py                        # every part; writes the results file
    python benchmarks/sweep_digits_unet.py --parts guidance       # some parts (records of others are kept)
    python benchmarks/sweep_digits_unet.py --parts reference --out A.json &   # two parts at once ...
    python benchmarks/sweep_digits_unet.py --parts solvers guidance ddpm --out B.json
    python benchmarks/sweep_digits_unet.py --merge A.json B.json  # ... merged into the results file
    python benchmarks/sweep_digits_unet.py --quick --out /tmp/s.json --model CKPT   # a smoke run

Why stored: one call of ``digits-unet`` costs about 3 CPU milliseconds per image (one thread),
and the sweep makes about 2,100 calls per image for 100 images: 590 CPU seconds as measured (the
1000-step reference alone 289), far beyond a chapter's budget. The chapters read the file
(installed with the package, beside the weights), plot it, and re-measure small pieces live.

**The task.** ``N`` = 100 images, 10 of each class, asked of the class-conditional model
(``labels = arange(N) % 10``); every run starts from the same noise $x_{t_0} = \sigma(t_0)z$,
$z$ drawn once from seed 0 (paired comparisons: two runs differ only by what is compared), and a
stochastic sampler's noise comes from seed 1. Every grid starts at the same time $t_0$, where the
schedule's VE noise level $\sigma/\alpha$ is 80 (EDM's $\sigma_{\max}$; on the cosine schedule
$\alpha(t_0) = 0.0125$): the Karras and log-SNR grids need a finite top level. Each run is
measured with the committed evaluation classifier ``digits16-classifier``
({mod}`stepdiff.evaluation`): the Fréchet distance of its features to the 300 held-out digits
(beside the floor: ``N`` training digits against the same held-out set, mean of 10 draws),
precision and recall ($k = 3$), the accuracy of the class read back, and pixel statistics of the
raw (unclipped) images: the fraction outside $[-1, 1]$, the mean $|x|$ and the standard
deviation (for oversaturation). No guidance ($w = 1$, the conditional model) outside ``guidance``.

**The parts.**

- ``solvers`` (II.6): DDIM, DPM-Solver++(2M) as published and UniPC (the package's default
  sampler) on five grids at 5 and 10 model calls: ``uniform`` ($t_i = t_0(1 - i/n)$),
  ``quadratic``, ``karras`` ($\rho = 7$, $\sigma_{\min} = 0.002$), ``logsnr``
  ($\sigma_{\min} = 0.002$) and ``cosine`` (:func:`stepdiff.schedules.time_grid`); Heun on the
  cosine and Karras grids; every solver at 20 calls on the cosine grid; DDPM ($\tilde\beta$) on
  the uniform grid at 5 to 100 steps; UniPC at 50 and DDIM at 50 calls. Heun runs the largest
  number of steps whose calls fit the budget (:func:`stepdiff.samplers.steps_for_nfe`); each
  record says what ran.
- ``ddpm`` (II.5): DDPM with Ho et al.'s other variance $\beta$ (``variance="forward"``) on the
  uniform grid at 10 to 100 steps, beside the $\tilde\beta$ runs of ``solvers``.
- ``reference`` (II.5, II.6): DDPM ($\tilde\beta$) with 1000 steps on the uniform grid.
- ``guidance`` (II.7): classifier-free guidance at $w$ = 0, 1, 2, 3, 4, 8 with the default
  sampler (UniPC on the cosine grid) at 20 calls; at $w = 8$ also with guidance rescale
  $\varphi = 0.7$ (Lin et al. 2024, on the $v$-prediction) and with the guidance interval of
  Kynkäänniemi et al. 2024 (guidance only for VE noise levels in $(0.28, 5.42]$, mapped to times
  through the schedule).

The file (written atomically after every record, so an interrupted run resumes where it stopped;
records of other weights are discarded) holds the command, date, versions, the model's and the
classifier's weight digests, the task, the floor, the real images' pixel statistics and one
record per run with its settings, metrics and CPU seconds.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stepdiff import checkpoints  # noqa: E402
from stepdiff.checkpoints import write_json  # noqa: E402
from stepdiff.config import build_data, build_objective, held_out_data, resolve  # noqa: E402
from stepdiff.evaluation import (  # noqa: E402
    class_accuracy,
    extract_features,
    frechet_distance,
    frechet_floor,
    precision_recall,
)
from stepdiff.guidance import ClassifierFreeGuidance  # noqa: E402
from stepdiff.pretrained import weights_dir  # noqa: E402
from stepdiff.samplers import model_calls, sample, steps_for_nfe  # noqa: E402
from stepdiff.schedules import time_grid  # noqa: E402

OUT = weights_dir() / "digits-unet.sweeps.json"
N_IMAGES = 100
SIGMA_TOP = 80.0  # the VE noise level every grid starts from
SIGMA_MIN = 0.002  # the lowest nonzero level of the Karras and log-SNR grids
SOLVERS = ["ddim", "dpmpp_2m", "unipc"]  # on every grid at 5 and 10 calls
GRIDS = ["uniform", "quadratic", "karras", "logsnr", "cosine"]
# (sampler, grid, budgets) of the other solver runs: Heun on its two grids, DDPM on the uniform one,
# every solver at 20 calls on the cosine grid, and a few runs at 50 and 100 calls
OTHER_RUNS = [("heun", "cosine", (5, 10, 20)), ("heun", "karras", (5, 10)), ("ddpm", "uniform", (5, 10, 20, 50, 100)),
              ("ddim", "cosine", (20,)), ("dpmpp_2m", "cosine", (20,)), ("unipc", "cosine", (20, 50)),
              ("ddim", "uniform", (50,))]
DDPM_FORWARD = (10, 20, 50, 100)  # DDPM with Ho et al.'s other variance, beta, on the uniform grid
REFERENCE_STEPS = 1000  # the reference: DDPM (beta tilde) with 1000 steps on the uniform grid
WS = (0.0, 1.0, 2.0, 3.0, 4.0, 8.0)
W_FIXES = (8.0,)
PARTS = ("solvers", "guidance", "ddpm", "reference")
RESCALE = 0.7
INTERVAL_SIGMAS = (0.28, 5.42)  # Kynkaanniemi et al. 2024: guide only for sigma in (0.28, 5.42]
GUIDANCE_NFE = 20


def grid(spacing: str, n_steps: int, schedule, t0: float) -> torch.Tensor:
    """The time grid of ``spacing`` with ``n_steps`` steps, starting at ``t0`` (see the module docstring)."""
    if spacing in ("karras", "logsnr"):
        return time_grid(n_steps, spacing, schedule, t_max=t0, sigma_min=SIGMA_MIN)
    return time_grid(n_steps, spacing, schedule, t_max=t0)


def plan(parts: list[str]) -> list[dict]:
    """Every run of the chosen parts, as settings dicts (the record's key), in the order they run."""
    runs = []
    if "solvers" in parts:
        runs += [{"part": "solvers", "sampler": s, "grid": g, "budget": b} for b in (5, 10) for s in SOLVERS
                 for g in GRIDS]
        runs += [{"part": "solvers", "sampler": s, "grid": g, "budget": b} for s, g, budgets in OTHER_RUNS
                 for b in budgets]
    if "guidance" in parts:
        base = {"part": "guidance", "sampler": "unipc", "grid": "cosine", "budget": GUIDANCE_NFE}
        runs += [{**base, "w": w} for w in WS]
        runs += [{**base, "w": w, "rescale": RESCALE} for w in W_FIXES]
        runs += [{**base, "w": w, "interval": "kynkaanniemi"} for w in W_FIXES]
    if "ddpm" in parts:
        runs += [{"part": "ddpm", "sampler": "ddpm", "grid": "uniform", "budget": n, "variance": "forward"}
                 for n in DDPM_FORWARD]
    if "reference" in parts:
        runs += [{"part": "ddpm", "sampler": "ddpm", "grid": "uniform", "budget": REFERENCE_STEPS}]
    return runs


def key(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


def spec_key(record: dict) -> str:
    """The key of the settings a record was run with (``spec_keys`` names them)."""
    return key({k: record[k] for k in record["spec_keys"]})


def pixel_stats(images: torch.Tensor) -> dict:
    x = images.double()
    return {"outside": float((x.abs() > 1).double().mean()), "mean_abs": float(x.abs().mean()),
            "std": float(x.std()), "mean": float(x.mean()), "max_abs": float(x.abs().max())}


class Task:
    def __init__(self, model_source: str, classifier_source: str, n: int, floor_repeats: int = 10):
        torch.manual_seed(0)
        self.model, self.record = checkpoints.load(model_source)
        self.judge, self.judge_record = checkpoints.load(classifier_source)
        self.cfg = resolve(self.record["config"])
        self.schedule, self.prediction, _ = build_objective(self.cfg)
        held, train = held_out_data(self.cfg), build_data(self.cfg)
        self.n = n
        self.f_held = extract_features(self.judge, held.images)
        f_train = extract_features(self.judge, train.images)
        self.floor = frechet_floor(f_train, self.f_held, n, repeats=floor_repeats, seed=0)
        self.real_pixels = pixel_stats(held.images)
        self.labels = torch.arange(n) % self.model.null_class
        self.t0 = float(self.schedule.t_from_sigma_ve(torch.tensor(SIGMA_TOP, dtype=torch.float64)))
        z = torch.randn((n, *held.images.shape[1:]), generator=torch.Generator().manual_seed(0))
        self.x_start = float(self.schedule.sigma(torch.tensor(self.t0, dtype=torch.float64))) * z
        to_t = lambda s: float(self.schedule.t_from_sigma_ve(torch.tensor(s, dtype=torch.float64)))
        self.interval = (to_t(INTERVAL_SIGMAS[0]), to_t(INTERVAL_SIGMAS[1]))

    def run(self, spec: dict) -> dict:
        name = spec["sampler"]
        n_steps = steps_for_nfe(name, spec["budget"])
        ts = grid(spec["grid"], n_steps, self.schedule, self.t0)
        kwargs = {"prediction": self.prediction}
        if name == "ddpm":
            kwargs.update(variance=spec.get("variance", "posterior"), generator=1)
        interval = self.interval if spec.get("interval") else None
        net = ClassifierFreeGuidance(self.model, spec.get("w", 1.0), y=self.labels, rescale=spec.get("rescale", 0.0),
                                     prediction=self.prediction, schedule=self.schedule, interval=interval)
        start = time.process_time()
        with torch.inference_mode():
            images = sample(name, net, self.x_start, self.schedule, ts, **kwargs).float()
        cpu = time.process_time() - start
        if not bool(torch.isfinite(images).all()):
            raise RuntimeError(f"non-finite samples for {spec}")
        f = extract_features(self.judge, images)
        pr = precision_recall(self.f_held, f, k=3)
        acc = class_accuracy(self.judge.predict(images), self.labels, n_classes=self.model.null_class)
        return {**spec, "steps": n_steps, "nfe": model_calls(name, n_steps),
                "frechet": frechet_distance(f, self.f_held).value, "precision": pr["precision"],
                "recall": pr["recall"], "accuracy": acc["accuracy"], "pixels": pixel_stats(images),
                "cpu_s": round(cpu, 2)}


def merge(paths: list[Path], out: Path) -> None:
    """One results file from several of the same model, classifier and task (their records united)."""
    files = [json.loads(p.read_text()) for p in paths]
    first = files[0]
    for p, f in zip(paths, files):
        for field in ("model", "classifier", "task", "floor"):
            if f[field] != first[field]:
                raise ValueError(f"{p}: its {field} differs from {paths[0]}'s; only runs of one task merge")
    order = {key(s): i for i, s in enumerate(plan(list(PARTS)))}
    records = {spec_key(r): r for f in files for r in f["records"]}
    write_json(out, {**first, "command": " & ".join(f["command"] for f in files) + " (run at once), merged by "
                      + "python benchmarks/sweep_digits_unet.py --merge " + " ".join(p.name for p in paths),
                      "cpu_seconds": round(sum(f["cpu_seconds"] for f in files), 1),
                      "records": sorted(records.values(), key=lambda r: order.get(spec_key(r), len(order)))})
    print(f"merged {len(records)} records of {len(paths)} files into {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits-unet", help="committed model or checkpoint (default: %(default)s)")
    parser.add_argument("--classifier", default="digits16-classifier", help="default: %(default)s")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--merge", nargs="+", type=Path, metavar="FILE",
                        help="merge results files of the same model and task (parts run in parallel) into --out")
    parser.add_argument("--n", type=int, default=N_IMAGES, help="images per run (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 images, 5 and 10 calls only")
    parser.add_argument("--out", type=Path, default=OUT, help="results file (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.merge:
        merge(args.merge, args.out)
        return
    torch.set_num_threads(1)  # one thread: the fastest per CPU second on a shared machine
    n = 20 if args.quick else args.n
    task = Task(args.model, args.classifier, n)
    digest = (task.record.get("weights") or {}).get("sha256") or checkpoints.file_sha256(args.model)
    judge_digest = (task.judge_record.get("weights") or {}).get("sha256")
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    same = old.get("model", {}).get("sha256") == digest and old.get("task", {}).get("n_images") == n
    done = {spec_key(r): r for r in old.get("records", [])} if same else {}
    specs = plan(args.parts)
    if args.quick:
        specs = [s for s in specs if s["budget"] <= 10][:12]
    # Absolute paths (a scratch --out, a checkpoint) are recorded by name only: the file is committed.
    given = argv if argv is not None else sys.argv[1:]
    shown = [Path(a).name if os.path.isabs(a) else a for a in given]
    command = "python benchmarks/sweep_digits_unet.py " + " ".join(shown)
    records = list(done.values())
    order = {key(s): i for i, s in enumerate(plan(list(PARTS)))}
    cpu_before = old.get("cpu_seconds", 0.0) if same else 0.0
    started = time.process_time()

    def save() -> None:
        write_json(args.out, {
            "command": command.strip(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"python": platform.python_version(), "torch": torch.__version__},
            "cpu_seconds": round(cpu_before + time.process_time() - started, 1),
            "model": {"source": args.model, "name": task.record.get("name"), "sha256": digest},
            "classifier": {"source": args.classifier, "name": task.judge_record.get("name"), "sha256": judge_digest},
            "task": {
                "n_images": n, "labels": "arange(n) % 10", "start": "sigma(t0) z, z from seed 0 (every run)",
                "t0": task.t0, "sigma_top": SIGMA_TOP, "sigma_min": SIGMA_MIN,
                "ddpm_noise_seed": 1, "guidance_interval_sigmas": INTERVAL_SIGMAS,
                "guidance_interval_t": task.interval, "rescale": RESCALE, "guidance_nfe": GUIDANCE_NFE,
                "metrics": "Frechet distance of digits16-classifier features to the 300 held-out digits; precision "
                           "and recall k = 3; class accuracy; pixel statistics of the raw images",
            },
            "floor": task.floor.as_dict(),
            "real_pixels": task.real_pixels,
            "records": sorted(records, key=lambda r: order.get(spec_key(r), len(order))),
        })

    todo = [s for s in specs if key(s) not in done]
    print(f"{len(specs)} runs planned, {len(specs) - len(todo)} already in {args.out}; floor {task.floor.value:.3f}")
    for i, spec in enumerate(todo):
        result = task.run(spec)
        result["spec_keys"] = sorted(spec)
        records.append(result)
        done[key(spec)] = result
        print(f"[{i + 1}/{len(todo)}] {spec['part']:8s} {spec['sampler']:9s} {spec['grid']:9s} nfe {result['nfe']:4d}"
              f" {'w=' + str(spec['w']) if 'w' in spec else '':6s} fd {result['frechet']:7.3f} acc "
              f"{result['accuracy']:.3f} rec {result['recall']:.3f} out {result['pixels']['outside']:.4f}"
              f"  ({result['cpu_s']:.0f} CPU s)", flush=True)
        save()
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
