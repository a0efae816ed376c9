r"""The ``stepdiff`` command: argparse subcommands over {mod}`stepdiff.runs`.

```bash
stepdiff train --config digits-unet --out runs/digits.pt            # a shipped configuration
stepdiff train --data digits --size 8 --condition class --steps 2000 --out runs/d8.pt
stepdiff train --config digits-unet --out runs/digits.pt --resume   # continue exactly
torchrun --nproc_per_node 2 -m stepdiff train --config shapes-unet --out runs/s.pt --set train.micro_batches=2
stepdiff sample runs/digits.pt --class 3 --guidance 2 -n 16 --out three.png
stepdiff sample shapes-unet --prompt "a red circle at the top left" --out red.png
stepdiff evaluate runs/digits.pt --guidance 0 1 2 3 --out metrics.json
stepdiff export runs/digits.pt --name digits-unet
stepdiff info
stepdiff bench models
```

Every subcommand is one call of a function of {mod}`stepdiff.runs` (``train_run``,
``sample_run``, ``evaluate_run``, ``export_run``, ``info``, ``bench_run``); this module only turns
flags into its arguments. Training flags become ``table.key=value`` overrides of the
configuration ({mod}`stepdiff.config`), applied after ``--config`` and before ``--set``.
Errors in the input (an unknown name, a missing file, a checkpoint that does not fit its model, a
negative guidance scale, a prompt without a known word) end the command with a message that
names it and exit status 2, and leave no partial file behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "train_overrides", "config_from_argv"]

# flag -> (configuration key, how to write its value)
_TRAIN_FLAGS = {
    "name": ("name", "str"),
    "kind": ("kind", "str"),
    "data": ("data.name", "str"),
    "size": ("data.size", "raw"),
    "condition": ("data.condition", "str"),
    "path": ("data.path", "str"),
    "n": ("data.n", "raw"),
    "objects": ("data.n_objects", "objects"),
    "arch": ("model.arch", "str"),
    "preset": ("model.preset", "str"),
    "schedule": ("objective.schedule", "str"),
    "prediction": ("objective.prediction", "str"),
    "weighting": ("objective.weighting", "str"),
    "steps": ("train.steps", "raw"),
    "batch_size": ("train.batch_size", "raw"),
    "micro_batches": ("train.micro_batches", "raw"),
    "lr": ("train.lr", "float"),
    "lr_warmup": ("train.lr_warmup", "raw"),
    "lr_decay": ("train.lr_decay", "str"),
    "ema": ("train.ema_decay", "float"),
    "seed": ("train.seed", "raw"),
    "label_dropout": ("train.label_dropout", "float"),
    "autocast": ("train.autocast", "str"),
    "threads": ("train.threads", "raw"),
    "checkpoint_every": ("train.checkpoint_every", "raw"),
}


def _objects(text: str) -> str:
    """``2`` -> ``[2, 2]``, ``1-3`` -> ``[1, 3]``."""
    lo, _, hi = text.partition("-")
    try:
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--objects takes N or LO-HI (e.g. 2 or 1-3); got {text!r}") from None
    return f"[{lo_i}, {hi_i}]"


def train_overrides(args: argparse.Namespace) -> list[str]:
    """The ``table.key=value`` overrides the training flags of ``args`` stand for, then ``--set``."""
    out = []
    for flag, (key, how) in _TRAIN_FLAGS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if how == "str":
            out.append(f"{key}={json.dumps(str(value))}")
        elif how == "float":
            out.append(f"{key}={float(value)!r}")
        elif how == "objects":
            out.append(f"{key}={_objects(value)}")
        else:
            out.append(f"{key}={value}")
    return out + list(args.set or [])


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the command and its subcommands."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="stepdiff", description="Train, sample and evaluate the book's image models.")
    parser.add_argument("--version", action="version", version=f"stepdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model from a TOML configuration and/or flags",
                       description="Train a diffusion model or an evaluation classifier into a checkpoint, with a "
                                   "JSON-lines loss log beside it. Runs data-parallel under torchrun.")
    t.add_argument("--config", help="a shipped configuration's name (see `stepdiff info`) or a TOML file")
    t.add_argument("--out", required=True, help="the checkpoint file to write (e.g. runs/digits.pt)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    t.add_argument("--stop-after", type=int, metavar="K", help="stop after K steps (resume later)")
    t.add_argument("--set", action="append", metavar="TABLE.KEY=VALUE",
                   help="override any configuration key (TOML value), e.g. --set model.channels=48; repeatable")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = t.add_argument_group("configuration flags (each overrides the --config file)")
    g.add_argument("--name", help="the run's name")
    g.add_argument("--kind", help="diffusion (default), classifier, a part of the text-to-image stack: clip, vae, "
                                  "autoencoder, or one built on a trained model ([base]): controlnet, distill")
    g.add_argument("--data", help="digits, shapes, image-folder, mnist, fashion-mnist or cifar10")
    g.add_argument("--size", type=int, help="image side (digits 8 or 16; shapes 32; an image folder: any)")
    g.add_argument("--condition", help="none, class or text (text: the shapes captions)")
    g.add_argument("--path", help="the folder of an image folder / MNIST / Fashion-MNIST / CIFAR-10 files")
    g.add_argument("--n", type=int, help="shapes: number of training scenes")
    g.add_argument("--objects", help="shapes: objects per scene, N or LO-HI")
    g.add_argument("--arch", help="unet or dit; for classifiers digits-cnn, digits-mlp or shapes-cnn")
    g.add_argument("--preset", help="the model preset (UNet: tiny, ddpm-cifar; DiT: tiny, S/2, S/4, B/2, B/4)")
    g.add_argument("--schedule", help="vp-cosine, vp-linear, flow, ve, edm, discrete-vp")
    g.add_argument("--prediction", help="eps, x0, v, score or velocity")
    g.add_argument("--weighting", help="none or min-snr")
    g.add_argument("--steps", type=int, help="optimiser steps")
    g.add_argument("--batch-size", type=int, help="the global batch")
    g.add_argument("--micro-batches", type=int, help="parts of the global batch (a multiple of the processes)")
    g.add_argument("--lr", type=float, help="learning rate")
    g.add_argument("--lr-warmup", type=int, help="linear warm-up steps")
    g.add_argument("--lr-decay", help="constant or cosine")
    g.add_argument("--ema", type=float, help="EMA decay")
    g.add_argument("--seed", type=int, help="the run's seed (initial weights, batches, noise)")
    g.add_argument("--label-dropout", type=float, help="probability of dropping the class or caption")
    g.add_argument("--autocast", help="none, bf16 or fp16")
    g.add_argument("--threads", type=int, help="torch intra-op threads (0: torch's default)")
    g.add_argument("--checkpoint-every", type=int, help="write the checkpoint every this many steps")

    s = sub.add_parser("sample", help="draw images from a checkpoint or a committed model",
                       description="Sample images and write a PNG grid (--out) and the tensors beside it (.pt).")
    s.add_argument("model", help="a checkpoint file, an exported .pt, or a committed model's name")
    s.add_argument("--out", required=True, help="the PNG grid to write; the tensors go to the same name with .pt")
    s.add_argument("-n", type=int, default=16, help="number of images (default 16)")
    s.add_argument("--class", dest="label", help="the class (id or name) of a class-conditional model")
    s.add_argument("--prompt", help="the caption of a text-conditioned model")
    s.add_argument("--guidance", "-w", type=float, help="classifier-free guidance scale w >= 0")
    s.add_argument("--rescale", type=float, help="guidance rescale phi in [0, 1]")
    s.add_argument("--interval", type=float, nargs=2, metavar=("T_LO", "T_HI"), help="guide only for t in it")
    s.add_argument("--sampler", help="any of stepdiff.samplers.SAMPLERS (default: the model's)")
    s.add_argument("--steps", type=int, help="sampler steps")
    s.add_argument("--spacing", help="time grid spacing (uniform, quadratic, karras, logsnr, ...)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--nrow", type=int, help="images per row of the grid")
    s.add_argument("--progress", action="store_true")

    e = sub.add_parser("evaluate", help="measure a model: Fréchet distance, precision/recall, accuracy",
                       description="Sample at each guidance scale and measure the samples in an evaluation "
                                   "classifier's features; store the report in the checkpoint's record.")
    e.add_argument("model", help="a checkpoint file, an exported .pt, or a committed model's name")
    e.add_argument("--out", help="write the full report here (JSON)")
    e.add_argument("--classifier", help="a committed classifier's name or a classifier checkpoint")
    e.add_argument("-n", type=int, help="samples per guidance scale")
    e.add_argument("--guidance", "-w", type=float, nargs="+", help="the guidance scales of the sweep")
    e.add_argument("--sampler")
    e.add_argument("--steps", type=int)
    e.add_argument("--spacing")
    e.add_argument("--seed", type=int)
    e.add_argument("--no-store", action="store_true", help="do not store the report in the checkpoint's record")
    e.add_argument("--progress", action="store_true")

    x = sub.add_parser("export", help="write a checkpoint's EMA weights and record as a committed model")
    x.add_argument("checkpoint")
    x.add_argument("--name", help="the committed model's name (default: the run's)")
    x.add_argument("--dir", help="the folder (default: the package's weights/)")
    x.add_argument("--dtype", help="float16 (generators' default), bfloat16 or float32 (classifiers' default)")

    i = sub.add_parser("info", help="versions, device, Triton kernels, configurations, committed models")
    i.add_argument("--json", action="store_true", help="print as JSON")

    b = sub.add_parser("bench", help="run the benchmarks of the checkout's benchmarks/ folder",
                       description="Run the kernel and end-to-end benchmark scripts (short by default) and print "
                                   "their tables; say which were skipped for want of a GPU.")
    b.add_argument("names", nargs="*", help="benchmarks to run (default: all), e.g. models fused attention")
    b.add_argument("--full", action="store_true", help="the full runs, not --quick")
    b.add_argument("--write", action="store_true", help="let the scripts write their results files")
    b.add_argument("--timeout", type=float, default=1800.0, help="seconds per script")
    return parser


def config_from_argv(argv: list[str]) -> dict:
    """The resolved configuration a recorded ``stepdiff train ...`` command line stands for."""
    from .runs import make_config

    argv = list(argv)
    if argv and argv[0] == "train":
        argv = argv[1:]
    args = build_parser().parse_args(["train", *argv])
    return make_config(args.config, train_overrides(args))


def _print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from . import runs

    rank0 = int(os.environ.get("RANK", "0")) == 0
    if args.command == "train":
        result = runs.train_run(args.config, args.out, overrides=train_overrides(args), resume=args.resume,
                                stop_after=args.stop_after, argv=argv, progress=not args.no_progress and rank0)
        if rank0 and result.path is not None:
            losses = result.losses
            tail = f", last loss {sum(losses[-50:]) / len(losses[-50:]):.4f}" if losses else ""
            print(f"wrote {result.path} ({len(losses)} steps this run{tail}); log {runs.log_path(result.path)}")
        return 0
    if args.command == "sample":
        settings = runs.sample_run(args.model, args.out, n=args.n, label=args.label, prompt=args.prompt,
                                   guidance=args.guidance, rescale=args.rescale, interval=args.interval,
                                   sampler=args.sampler, steps=args.steps, spacing=args.spacing, seed=args.seed,
                                   nrow=args.nrow, progress=args.progress)
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.pt')} ({settings['n']} images, "
              f"{settings['sampler']} {settings['steps']} steps, w = {settings['guidance']})")
        return 0
    if args.command == "evaluate":
        report = runs.evaluate_run(args.model, args.out, classifier=args.classifier, n=args.n, guidance=args.guidance,
                                   sampler=args.sampler, steps=args.steps, spacing=args.spacing, seed=args.seed,
                                   store=not args.no_store, progress=args.progress)
        rows = report["sweep"]
        columns = ["w", "frechet", "frechet_floor", "frechet_ratio", "precision", "recall"]
        columns += [c for c in ("accuracy", "all_correct", "all_correct_1_object", "all_correct_2_objects",
                                "all_correct_3_objects") if any(c in r for r in rows)]
        print(f"{report['name']}: {report['n_samples']} samples per point against {report['n_held_out']} held-out "
              f"images, features of {report['classifier']['source']}")
        _print_table(rows, columns)
        where = [p for p in (args.out, None if args.no_store or not Path(args.model).exists() else args.model) if p]
        if where:
            print("report written to " + " and ".join(str(p) for p in where))
        return 0
    if args.command == "export":
        weights, record = runs.export_run(args.checkpoint, args.dir, args.name, dtype=args.dtype)
        print(f"wrote {weights} ({weights.stat().st_size / 2**20:.2f} MiB) and {record}")
        return 0
    if args.command == "info":
        facts = runs.info()
        if args.json:
            print(json.dumps(facts, indent=1))
            return 0
        for key, value in facts.items():
            if key == "committed_models":
                print(f"committed models: {', '.join(m['name'] for m in value) if value else 'none yet'}")
                for m in value:
                    print(f"  {m['name']}: {m['kind']}, {m['parameters']} parameters, {m['trained_steps']} steps, "
                          f"{(m['cpu_s'] or 0) / 60:.1f} CPU min on {m['device']}; evaluated: {m['evaluated']}")
            elif key == "configs":
                print(f"configurations: {', '.join(value)}")
            else:
                print(f"{key}: {value}")
        return 0
    if args.command == "bench":
        results = runs.bench_run(args.names or None, full=args.full, write=args.write, timeout=args.timeout)
        print()
        _print_table(results, ["name", "status", "seconds"])
        skipped = [r for r in results if r["status"] == "skipped"]
        if skipped:
            print("skipped for want of a CUDA device: " + ", ".join(r["name"] for r in skipped))
        return 0 if all(r["status"] in ("ran", "skipped") for r in results) else 1
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    from .config import ConfigError

    try:
        return _run(args, argv)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"stepdiff {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stepdiff {args.command}: interrupted (the last checkpoint written is complete)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
