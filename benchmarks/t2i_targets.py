r"""The text-to-image targets measured on trained runs that are not committed models: ``stepdiff
evaluate``'s full report for one training checkpoint, stored with the run's training record for
chapter II.9 (``stepdiff/results/t2i_targets.json``, installed with the package).

    python benchmarks/t2i_targets.py CHECKPOINT.pt
    python benchmarks/t2i_targets.py CHECKPOINT.pt --report REPORT.json

**What is measured.** Exactly what ``stepdiff evaluate`` measures for a committed text model, with
one fixed setting for every run: 500 samples for the captions of the run's own held-out scenes (so
a run trained on one-object scenes is asked one-object captions, a run on one or two objects both,
reported by object count), Heun with 15 steps on a uniform grid, $w = 3$, seed 1, read back by the
committed ``shapes-classifier``; the Fréchet distance in its features against the 2000 held-out
images, beside the floor at the same counts; precision and recall; every error by kind. That is
the command

    stepdiff evaluate CHECKPOINT.pt -w 3 -n 500 --seed 1 --sampler heun --steps 15 --spacing uniform --no-store

which this script runs in-process (``stepdiff.runs.evaluate_run``). With ``--report`` it stores
instead the report that command wrote with ``--out`` for this checkpoint, after checking that the
report names this checkpoint and was made with these settings (sampling 500 images takes about
12 CPU minutes, so a report already made is not made again).

Each entry keeps the run's recorded ``stepdiff train`` command, commit, seed, CPU time and the
first losses, so the run can be trained again and checked.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fcntl
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stepdiff import checkpoints, runs  # noqa: E402

DEFAULT_OUT = ROOT / "stepdiff" / "results" / "t2i_targets.json"
SETTINGS = {"n": 500, "guidance": [3.0], "sampler": "heun", "steps": 15, "spacing": "uniform", "seed": 1}


def evaluate_command(checkpoint: Path) -> list[str]:
    """The ``stepdiff evaluate`` command line that gives this script's report for ``checkpoint``."""
    s = SETTINGS
    return ["stepdiff", "evaluate", checkpoint.name, "-w", *[f"{w:g}" for w in s["guidance"]], "-n", str(s["n"]),
            "--seed", str(s["seed"]), "--sampler", s["sampler"], "--steps", str(s["steps"]), "--spacing",
            s["spacing"], "--no-store"]


def check_report(report: dict, checkpoint: Path) -> None:
    """Refuse a report made for another checkpoint or with other settings than :data:`SETTINGS`."""
    s = SETTINGS
    made = {"model": Path(str(report.get("model"))).name, "n": report.get("n_samples"), "seed": report.get("seed"),
            "sampler": report.get("sampler"), "guidance": [e.get("w") for e in report.get("sweep", [])]}
    want = {"model": checkpoint.name, "n": s["n"], "seed": s["seed"],
            "sampler": {"name": s["sampler"], "steps": s["steps"], "spacing": s["spacing"]}, "guidance": s["guidance"]}
    if made != want:
        raise SystemExit(f"the report was made with {made}; this script stores only {want}")


def _store(out: Path, name: str, entry: dict) -> None:
    """Add (or replace) one run's entry, reading the file again under a lock so that two processes
    may store at once."""
    # The lock lives outside the package so that it is never taken for a result.
    with open(Path(tempfile.gettempdir()) / f"stepdiff.{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {
            "what": "stepdiff evaluate's report for text-to-image runs that are not committed models, with "
                    "their training records (benchmarks/t2i_targets.py)",
            "settings": SETTINGS,
            "runs": {},
        }
        if results["settings"] != SETTINGS:
            raise SystemExit(f"{out} was measured with other settings: write to another file")
        results["runs"][name] = entry
        checkpoints.write_json(out, results)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a training checkpoint of a text-to-image run (stepdiff train)")
    p.add_argument("--report", type=Path, help="the report `stepdiff evaluate --out` already wrote for it")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    for path in (args.checkpoint, args.report):
        if path is not None and not path.is_file():
            p.error(f"no file at {path}")
    record = checkpoints.record_of(checkpoints.read_checkpoint(args.checkpoint))
    if record.get("config", {}).get("data", {}).get("condition") != "text":
        p.error(f"{args.checkpoint} is not a text-conditioned run")
    if args.report is not None:
        report = json.loads(args.report.read_text(encoding="utf-8"))
        check_report(report, args.checkpoint)
        measured = "stored from the report of the command below"
    else:
        torch.set_num_threads(1)
        s = SETTINGS
        report = runs.evaluate_run(args.checkpoint, n=s["n"], guidance=s["guidance"], sampler=s["sampler"],
                                   steps=s["steps"], spacing=s["spacing"], seed=s["seed"], store=False)
        measured = "measured by this script (the command below, in-process)"
    report["model"] = args.checkpoint.name  # the file's name, never a path of this machine
    entry = {
        "checkpoint": args.checkpoint.name,
        "step": record["step"],
        "n_objects": record["config"]["data"]["n_objects"],
        "train_command": checkpoints.portable_command(record["command"]),
        "seed": record["seed"],
        "commit": record["commit"],
        "dirty": record["dirty"],
        "train_cpu_s": record["cpu_s"],
        "losses_head": record["losses_head"][:5],
        "evaluate_command": evaluate_command(args.checkpoint),
        "measured": measured,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": checkpoints.device_description("cpu"),
        "report": report,
    }
    _store(args.out, record["name"], entry)
    point = report["sweep"][0]
    print(f"{record['name']} step {record['step']}: all correct {point['all_correct']:.3f}, Fréchet "
          f"{point['frechet_ratio']:.2f}x floor; wrote {args.out}")


if __name__ == "__main__":
    main()
