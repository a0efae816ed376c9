r"""What the text encoder does to attribute binding: the pixel text-to-image model trained three ways,
measured once and stored for chapter II.9 (``stepdiff/results/text_tower.json``, installed with the
package).

    python benchmarks/text_tower.py --arm tuned SNAPSHOT.pt [SNAPSHOT.pt ...]
    python benchmarks/text_tower.py --arm scratch SNAPSHOT.pt [...]

**The question.** The committed text-to-image models (``shapes-pixel-t2i``, ``shapes-ldm``,
``shapes-unet``) read the colour and size asked of them far more often than the shape. They all
encode captions with the *frozen* text tower of the committed small CLIP. Is the frozen tower what
fails? Three runs differ only in their text encoder, everything else being ``shapes-pixel-t2i``'s
configuration (data, UNet, flow-matching objective, caption dropout, 800 steps, seed 0):

- ``frozen``: CLIP's text tower, fixed (Stable Diffusion's choice). This is ``shapes-pixel-t2i``
  itself; its snapshots are measured in ``stepdiff/results/latent_vs_pixel.json``.
- ``tuned``: the same tower, initialised from CLIP and trained on with the UNet
  (``--set model.text.tune=true``).
- ``scratch``: a text encoder of the same size (the package's ``TextEncoder``: 64 wide, 2 layers,
  4 heads) learned from scratch with the UNet (``--set 'model.text.clip=""'``).

And two runs that keep the frozen tower and change where the denoiser reads it:

- ``attn16``: attention blocks (self- and cross-attention to the caption) at 16x16 as well as 8x8
  (``--set 'model.attn_levels=[1, 2]'``), so the words reach the resolution where an object's
  outline is drawn.
- ``pooled``: the frozen tower and 8x8 attention, plus the mean of the caption's token vectors,
  projected by a zero-initialised linear map and added to the time embedding
  (``--set model.pooled_context=true``), so the sentence also reaches every residual block, as
  SDXL's pooled text vector does.

And two that keep all of the frozen run and add a free, N(0, 1)-started row per caption word to the
time embedding, as a class label's row is added (``--set model.text.word_rows=true``; chapter II.9,
"A free row per word"): ``word-rows`` for the 800 steps of the others, and ``word-rows-2000`` for
2000 (``--set train.steps=2000``, the cosine decay stretched to the new end; ``--set
'name="shapes-t2i-word-rows-2000"'``, snapshots every 400 steps). And ``one-object-word-rows-2000``:
the same 2000 steps with word rows on scenes of one object only (``--set 'data.n_objects=[1, 1]'``),
whose one-object scenes are the test of the single-object target. And two with word rows kept apart
per object (``--set model.text.word_row_objects=2``: the words of the caption's second object, from
its article on, take rows from a second table, so the sum keeps which object is red), 2000 steps:
``object-rows-2000`` on the committed recipe's scenes of one or two objects, and
``two-object-object-rows-2000`` on two-object scenes only (``--set 'data.n_objects=[2, 2]'``), whose
two-object scenes are the test of binding.

Each snapshot's entry keeps its run's recorded ``stepdiff train`` command (``train_command``).

**Measured** exactly as ``benchmarks/latent_vs_pixel.py`` measures the frozen run, by its own code
(``evaluate_snapshot``): 200 images for the captions of the first 200 held-out scenes, Heun with
15 steps and $w = 3$, seed 0, read back by the committed ``shapes-classifier``, the Fréchet distance
beside the same floor. This script refuses to write if its settings or reference differ from those
stored in ``latent_vs_pixel.json``, so the three arms are comparable row by row. Cost (one thread):
about 2 CPU minutes per snapshot.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fcntl
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from latent_vs_pixel import DEFAULT_OUT as FROZEN_FILE  # noqa: E402
from latent_vs_pixel import _reference, _settings, evaluate_snapshot  # noqa: E402

from stepdiff import checkpoints  # noqa: E402

DEFAULT_OUT = ROOT / "stepdiff" / "results" / "text_tower.json"
ARMS = {"tuned": "shapes-t2i-tuned", "scratch": "shapes-t2i-scratch", "attn16": "shapes-t2i-attn16",
        "pooled": "shapes-t2i-pooled", "word-rows": "shapes-t2i-word-rows",
        "word-rows-2000": "shapes-t2i-word-rows-2000",
        "one-object-word-rows-2000": "shapes-t2i-one-object-word-rows-2000",
        "object-rows-2000": "shapes-t2i-object-rows-2000",
        "two-object-object-rows-2000": "shapes-t2i-two-object-object-rows-2000",
        "word-rows-4000": "shapes-t2i-word-rows-4000"}  # arm -> run name


def _store(out: Path, settings: dict, reference: dict, arm: str, entry: dict, command: dict) -> None:
    """Add one snapshot's entry (replacing an earlier one of the same arm and step) and this
    invocation's command to the results file, read again under a lock, so that the two arms may be
    measured by two processes at once without losing each other's entries."""
    # The lock lives outside the package so that it is never taken for a result.
    with open(Path(tempfile.gettempdir()) / f"stepdiff.{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {
            "what": "shapes-pixel-t2i's run with its CLIP text tower tuned, or with a text encoder learned from "
                    "scratch, measured along training as latent_vs_pixel.json measures the frozen run "
                    "(benchmarks/text_tower.py)",
            "frozen_arm": f"stepdiff/results/{FROZEN_FILE.name}, runs['shapes-pixel-t2i']",
            "settings": settings,
            "reference": reference,
            "runs": {a: [] for a in ARMS},
            "commands": [],
        }
        if results["settings"] != settings or results["reference"] != reference:
            raise SystemExit(f"{out} was measured with other settings or another reference: write to another file")
        runs = [e for e in results["runs"].get(arm, []) if e["step"] != entry["step"]]
        results["runs"][arm] = sorted(runs + [entry], key=lambda e: e["step"])
        results["commands"] = [c for c in results["commands"]
                               if (c["command"], c["date"]) != (command["command"], command["date"])] + [command]
        checkpoints.write_json(out, results)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arm", required=True, choices=sorted(ARMS), help="which run the snapshots belong to")
    p.add_argument("snapshots", nargs="+", type=Path, help="training checkpoints of that run (stepdiff train)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    for s in args.snapshots:
        if not s.is_file():
            p.error(f"no snapshot file at {s}")
    frozen = json.loads(FROZEN_FILE.read_text(encoding="utf-8"))
    n = frozen["settings"]["n_samples"]
    torch.set_num_threads(1)
    judge, judge_record = checkpoints.load(frozen["settings"]["classifier"]["name"])
    settings = _settings(n, judge_record)
    if settings != frozen["settings"]:
        raise SystemExit(f"the frozen arm ({FROZEN_FILE.name}) was measured with {frozen['settings']}; "
                         f"these settings are {settings}")
    c_start = time.process_time()
    reference, held, f_held = _reference(n, judge)
    if reference != frozen["reference"]:
        raise SystemExit(f"the held-out set or floor differ from those of {FROZEN_FILE.name}")
    command = {
        "command": ["python", "benchmarks/text_tower.py", "--arm", args.arm, *[s.name for s in args.snapshots]],
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_s": 0.0,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": checkpoints.device_description("cpu"),
    }
    for path in args.snapshots:
        entry = evaluate_snapshot(path, ARMS[args.arm], n, judge, held, f_held, reference["floor"]["value"])
        record = checkpoints.record_of(checkpoints.read_checkpoint(path))
        entry["train_command"] = checkpoints.portable_command(record["command"])
        entry["commit"], entry["dirty"] = record["commit"], record["dirty"]
        entry["losses_head"] = record["losses_head"][:5]
        command["cpu_s"] = round(time.process_time() - c_start, 1)
        _store(args.out, settings, reference, args.arm, entry, command)  # per snapshot: an interruption keeps it
        acc = entry["attribute_accuracy"]
        print(f"{args.arm} step {entry['step']:5d}  FD {entry['frechet_ratio']:.2f}x floor  all correct "
              f"{entry['all_correct']:.3f}  shape {acc['shape']:.3f} colour {acc['colour']:.3f} size {acc['size']:.3f}",
              flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
