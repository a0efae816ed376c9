r"""Quality against the number of steps for the distilled digits students and their teacher, measured
once and stored for chapter II.11 (``stepdiff/results/distillation.json``, installed with the package).

    python benchmarks/eval_distillation.py                            # every part; writes the results file
    python benchmarks/eval_distillation.py --parts teacher            # some parts (records of others are kept)
    python benchmarks/eval_distillation.py --quick --out /tmp/d.json \
        --student-8 CKPT --student-4 CKPT --consistency CKPT          # a smoke run on checkpoints

**The task.** ``N`` = 1000 images, 100 of each class, asked of the class-conditional teacher
``digits-unet`` and its students (``labels = arange(N) % 10``), no guidance (the conditional model).
Every run starts from the same $z$ (seed 0), put at its first time $t_0$ as $\sigma(t_0)z$, so two
runs differ only by what is compared. Each run is scored with the committed evaluation classifier
``digits16-classifier`` ({mod}`stepdiff.evaluation`): the Fréchet distance of its features to the
300 held-out digits, beside the **floor** (``N`` training digits against the same held-out digits,
mean and spread over 10 draws), precision and recall ($k = 3$) and the accuracy of the class read
back. Deterministic runs also get their **map error**: the root-mean-square pixel distance to the
teacher's 50-step DDIM output from the same $z$ (the stand-in for the exact probability-flow map),
on the first 100 images.

**The runs** (part ``teacher``, then one part per student):

- ``teacher``: DDIM on the students' grid (uniform in $t$ from $t = 1$) at 1, 2, 4, 8 and 50
  steps, and the best solver of the package's exact-denoiser benchmark at 5 calls (UniPC,
  order 2, on the cosine grid, from $t_0$ with $\sigma/\alpha = 80$ as in the digits sweep of
  chapter II.6) at 2, 4 and 8 calls (at one call every solver is DDIM; at 50 steps the teacher is
  represented by DDIM alone).
- ``progressive``: ``digits-student-8`` on its 8-step grid, ``digits-student-4`` on its 4-step grid,
  and ``digits-student-4`` on the 2- and 1-step halvings of its grid, which it was not trained for.
- ``consistency``: ``digits-consistency`` by multistep consistency sampling
  ({func}`stepdiff.distill.sample_consistency`) at 1, 2, 4 and 8 evaluations, the times equally spaced
  in $t$ from 1 (1; 1, 1/2; 1, 3/4, 1/2, 1/4; ...), not tuned.

Cost: one call of the 16x16 UNet is about 3 CPU milliseconds per image on one thread (more under
load); the three parts make about 110 calls per image (teacher 79, each student part 15, and the
map error's 50-step reference on 100 images once per command). The file (written atomically after each record) holds the
command, date, versions, the digests of every model's weights, the task, the floor and one record
per run with its settings, metrics, a checksum of its first 50 images (the mean of their pixels,
which the chapter re-measures live) and CPU seconds.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stepdiff import checkpoints  # noqa: E402
from stepdiff.config import build_data, build_objective, held_out_data, resolve  # noqa: E402
from stepdiff.distill import sample_consistency  # noqa: E402
from stepdiff.evaluation import (  # noqa: E402
    class_accuracy,
    extract_features,
    frechet_distance,
    frechet_floor,
    precision_recall,
)
from stepdiff.samplers import sample  # noqa: E402
from stepdiff.schedules import time_grid  # noqa: E402

OUT = ROOT / "stepdiff" / "results" / "distillation.json"
N_IMAGES = 1000
N_CHECK = 50  # the first images whose pixel mean is stored as a checksum
N_MAP = 100  # the first images whose distance to the teacher's 50-step DDIM images is measured
SIGMA_TOP = 80.0  # the VE noise level where the best solver's grid starts (as in the digits sweep)
DDIM_STEPS = (1, 2, 4, 8, 50)
BEST = ("unipc", "cosine")  # best at 5 calls in stepdiff/results/samplers_exact_denoiser.json
BEST_STEPS = (2, 4, 8)  # at 50 steps DDIM is the teacher's reference already
CONSISTENCY_STEPS = (1, 2, 4, 8)
PARTS = ("teacher", "progressive", "consistency")
REF = {"part": "teacher", "sampler": "ddim", "grid": "uniform", "steps": 50}


def student_grid(n_steps: int) -> torch.Tensor:
    """The uniform grid from t = 1 with ``n_steps`` steps (the progressive students' grids are halvings of it)."""
    return time_grid(n_steps, "uniform", t_max=1.0)


def plan(parts: list[str], sources: dict) -> list[dict]:
    runs = []
    if "teacher" in parts:
        runs += [{"part": "teacher", "sampler": "ddim", "grid": "uniform", "steps": n} for n in DDIM_STEPS]
        runs += [{"part": "teacher", "sampler": BEST[0], "grid": BEST[1], "steps": n} for n in BEST_STEPS]
    if "progressive" in parts:
        runs += [{"part": "progressive", "model": "digits-student-8", "sampler": "ddim", "grid": "uniform", "steps": 8}]
        runs += [{"part": "progressive", "model": "digits-student-4", "sampler": "ddim", "grid": "uniform", "steps": n}
                 for n in (4, 2, 1)]
    if "consistency" in parts:
        runs += [{"part": "consistency", "model": "digits-consistency", "sampler": "consistency", "grid": "uniform",
                  "steps": n} for n in CONSISTENCY_STEPS]
    return runs


def key(spec: dict) -> str:
    return json.dumps({k: spec[k] for k in ("part", "model", "sampler", "grid", "steps") if k in spec},
                      sort_keys=True)


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights_digest(source: str) -> str:
    from stepdiff import pretrained

    path = Path(source)
    if not path.exists():
        path = pretrained.weights_dir() / f"{source}.pt"
    return sha256(path)


class Task:
    def __init__(self, sources: dict, n: int, floor_repeats: int = 10):
        torch.manual_seed(0)
        self.sources = sources
        self.teacher, record = checkpoints.load(sources["digits-unet"])
        self.judge, _ = checkpoints.load(sources["digits16-classifier"])
        self.cfg = resolve(record["config"])
        self.schedule, self.prediction, _ = build_objective(self.cfg)
        held, train = held_out_data(self.cfg), build_data(self.cfg)
        self.n = n
        self.f_held = extract_features(self.judge, held.images)
        self.floor = frechet_floor(extract_features(self.judge, train.images), self.f_held, n,
                                   repeats=floor_repeats, seed=0)
        self.labels = torch.arange(n) % self.teacher.null_class
        self.z = torch.randn((n, *held.images.shape[1:]), generator=torch.Generator().manual_seed(0))
        self.t0 = float(self.schedule.t_from_sigma_ve(torch.tensor(SIGMA_TOP, dtype=torch.float64)))
        self.students: dict = {}
        self._reference: torch.Tensor | None = None

    def model(self, name: str):
        if name not in self.students:
            self.students[name] = checkpoints.load(self.sources[name])[0]
        return self.students[name]

    def start(self, t: float) -> torch.Tensor:
        return float(self.schedule.sigma(torch.tensor(t, dtype=torch.float64))) * self.z

    def images(self, spec: dict) -> tuple[torch.Tensor, bool]:
        """The run's images and whether they are a deterministic function of z."""
        y = self.labels
        if spec["sampler"] == "consistency":
            cm = self.model(spec["model"])
            ts = student_grid(spec["steps"])[:-1]
            return sample_consistency(lambda x, t: cm(x, t, y), self.start(1.0), self.schedule, ts, t_min=cm.t_min,
                                      generator=1), spec["steps"] == 1
        net = self.teacher if spec["part"] == "teacher" else self.model(spec["model"])
        if spec["grid"] == "uniform":  # the students' grids: halvings of the 16-step uniform grid from t = 1
            grid = student_grid(spec["steps"])
        else:
            grid = time_grid(spec["steps"], spec["grid"], self.schedule, t_max=self.t0)
        x = self.start(float(grid[0]))
        return sample(spec["sampler"], lambda x, t: net(x, t, y), x, self.schedule, grid,
                      prediction=self.prediction).float(), True

    def run(self, spec: dict) -> dict:
        start = time.process_time()
        with torch.inference_mode():
            images, deterministic = self.images(spec)
        cpu = time.process_time() - start
        if not bool(torch.isfinite(images).all()):
            raise RuntimeError(f"non-finite samples for {spec}")
        f = extract_features(self.judge, images)
        pr = precision_recall(self.f_held, f, k=3)
        acc = class_accuracy(self.judge.predict(images), self.labels, n_classes=self.teacher.null_class)
        fd = frechet_distance(f, self.f_held).value
        out = {**spec, "nfe": spec["steps"], "frechet": fd, "ratio": fd / self.floor.value,
               "precision": pr["precision"], "recall": pr["recall"], "accuracy": acc["accuracy"],
               "check_mean": float(images[:N_CHECK].double().mean()), "deterministic": deterministic,
               "cpu_s": round(cpu, 2)}
        if deterministic:
            diff = images[:N_MAP].double() - self.reference().double()
            out["map_rms"] = float(diff.pow(2).mean().sqrt())
        return out

    def reference(self) -> torch.Tensor:
        """The teacher's 50-step DDIM images from the first ``N_MAP`` starts (the map error's reference)."""
        if self._reference is None:
            y, grid = self.labels[:N_MAP], student_grid(REF["steps"])
            with torch.inference_mode():
                self._reference = sample("ddim", lambda x, t: self.teacher(x, t, y), self.start(1.0)[:N_MAP],
                                         self.schedule, grid, prediction=self.prediction).float()
        return self._reference


def write_atomically(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--quick", action="store_true", help="a smoke run: 40 images, 2 floor draws")
    for name in ("teacher", "classifier", "student-8", "student-4", "consistency"):
        p.add_argument(f"--{name}", default=None, help="a checkpoint instead of the committed model")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sources = {"digits-unet": args.teacher or "digits-unet",
               "digits16-classifier": args.classifier or "digits16-classifier",
               "digits-student-8": args.student_8 or "digits-student-8",
               "digits-student-4": args.student_4 or "digits-student-4",
               "digits-consistency": args.consistency or "digits-consistency"}
    n = 40 if args.quick else N_IMAGES
    cpu0 = time.process_time()
    task = Task(sources, n, floor_repeats=2 if args.quick else 10)
    digests = {k: weights_digest(v) for k, v in sources.items()
               if (k in ("digits-unet", "digits16-classifier") or any(
                   s.get("model") == k for s in plan(args.parts, sources)))}
    data = json.loads(args.out.read_text()) if args.out.exists() else {}
    same = data.get("task", {}).get("n_images") == n and data.get("weights", {}).get("digits-unet") == digests[
        "digits-unet"]
    old_weights = data.get("weights", {}) if same else {}
    # Records of a model whose weights changed since they were measured are dropped.
    records = {key(r): r for r in data.get("records", []) if same and (
        r.get("model") not in digests or old_weights.get(r["model"]) == digests[r["model"]])}
    weights = {**old_weights, **digests}
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python benchmarks/eval_distillation.py"] + [Path(a).name if a.startswith("/") else a
                                                                      for a in given])
    header = {
        "what": "Quality against steps for the distilled digits students and their teacher (chapter II.11)",
        "commands": (data.get("commands", []) if same else []) + [command],
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "threads": 1,
        "weights": weights,
        "task": {"n_images": n, "labels": "arange(n) % 10", "start": "sigma(t0) z, z [n, 1, 16, 16] from seed 0",
                 "t0_best_solver": task.t0, "sigma_top": SIGMA_TOP, "consistency_noise_seed": 1,
                 "student_grid": "time_grid(n, 'uniform', t_max=1.0)", "best_solver": list(BEST),
                 "map_reference": REF, "n_map": N_MAP, "n_check": N_CHECK,
                 "metrics": "Frechet distance of digits16-classifier features to the 300 held-out digits; precision "
                            "and recall k = 3; class accuracy; map_rms = RMS pixel distance to the teacher's "
                            "50-step DDIM images from the same z, first n_map images (deterministic runs)"},
        "floor": task.floor.as_dict(),
    }
    for spec in plan(args.parts, sources):
        record = task.run(spec)
        records[key(spec)] = record
        print(f"{key(spec)}: FD {record['frechet']:.2f} ({record['ratio']:.2f}x floor), acc {record['accuracy']:.3f}, "
              f"map {record.get('map_rms', float('nan')):.4f}, {record['cpu_s']} CPU s", flush=True)
        write_atomically({**header, "records": list(records.values())}, args.out)
    total = round(time.process_time() - cpu0, 1)
    header["cpu_s_per_command"] = data.get("cpu_s_per_command", []) + [total] if same else [total]
    write_atomically({**header, "records": list(records.values())}, args.out)
    print(f"wrote {args.out} ({len(records)} records; {total} CPU s)")


if __name__ == "__main__":
    main()
