r"""Training and sampling throughput of the image models, in images per second.

    python benchmarks/bench_models.py                 # tiny UNet and DiT, fp32 and bf16 autocast
    python benchmarks/bench_models.py --quick         # fewer repetitions, to check the setup
    python benchmarks/bench_models.py --models ddpm-cifar dit-B/2 --dtypes bfloat16   # on a GPU

Models (``kernel`` in the records; ``--models`` picks some):

- ``unet-tiny``, ``dit-tiny``: the CPU presets on 32x32x3 images (the "shapes" size), batch 64;
- ``unet-ddpm-cifar``: Ho et al.'s 35.7 M-parameter CIFAR-10 UNet on 32x32x3, batch 128 (GPU);
- ``dit-B/2``: DiT-B/2 on 64x64x4 inputs, 32x32 = 1024 tokens, batch 32 (GPU).

What is timed (``impl``):

- ``train``: one optimiser step, as :func:`stepdiff.train.train` takes it: the flow-matching
  loss of :func:`stepdiff.train.diffusion_loss` (noising included), backward, Adam;
- ``sample-euler-<S>``: a whole :func:`stepdiff.samplers.sample_euler` run of ``S`` steps from
  noise, under ``torch.inference_mode`` (``per_eval_ms`` is the time per network evaluation).

Dtypes: ``float32``, and ``bfloat16``: float32 weights with ``torch.autocast`` to bfloat16 (on
the CPU and on CUDA), as training in bf16 is done. Times are medians over ``--repeats`` timed
calls after warm-up calls (which on CUDA also compile and autotune the Triton attention);
``img_per_s`` is the batch divided by the median. On the CPU each record also carries the CPU
time per call (``img_per_cpu_s`` = batch / CPU time: with ``--threads 1`` the single-core
throughput, which a loaded machine changes far less than the wall time) and the load average
before and after, because on a shared machine wall times depend on what else runs.

Records go to ``benchmarks/results/<device>.json`` through ``benchmarks/common.py`` (on a CPU the
file is named after the processor, ``cpu_<model>.json``), merged with the records already there.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, device_slug, print_table, write_results  # noqa: E402

from stepdiff.models import DiT, DiTConfig, UNet, UNetConfig  # noqa: E402
from stepdiff.samplers import sample_euler  # noqa: E402
from stepdiff.schedules import FlowMatchingSchedule, time_grid  # noqa: E402
from stepdiff.train import diffusion_loss  # noqa: E402

# name: (constructor, image shape C x H x W, batch)
MODELS = {
    "unet-tiny": (lambda: UNet(UNetConfig.preset("tiny")), (3, 32, 32), 64),
    "dit-tiny": (lambda: DiT(DiTConfig.preset("tiny")), (3, 32, 32), 64),
    "unet-ddpm-cifar": (lambda: UNet(UNetConfig.preset("ddpm-cifar")), (3, 32, 32), 128),
    "dit-B/2": (lambda: DiT(DiTConfig.preset("B/2", in_channels=4)), (4, 64, 64), 32),
}
CPU_MODELS = ("unet-tiny", "dit-tiny")
DTYPES = ("float32", "bfloat16")


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, warmup: int, repeats: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def bench_model(name: str, dtype: str, device: str, steps: int, warmup: int, repeats: int,
                batch: int | None) -> list[dict]:
    make, shape, default_batch = MODELS[name]
    B = batch or default_batch
    torch.manual_seed(0)
    model = make().to(device)
    params = sum(p.numel() for p in model.parameters())
    schedule = FlowMatchingSchedule()
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(B, *shape, device=device, generator=g) * 2 - 1
    autocast = torch.autocast(device, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def train_step():
        with autocast:
            loss = diffusion_loss(model, x0, schedule, prediction="velocity", generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ts = time_grid(steps)
    noise = torch.randn(B, *shape, device=device, generator=g)

    def sample():
        with torch.inference_mode(), autocast:
            return sample_euler(model, noise, schedule, ts, prediction="velocity")

    records = []
    for impl, fn, n_warm, n_rep in (("train", train_step, warmup, repeats),
                                    (f"sample-euler-{steps}", sample, 1, max(1, repeats // 3))):
        model.train(impl == "train")
        load0 = os.getloadavg()
        wall, cpu = timed(fn, device, n_warm, n_rep)
        load1 = os.getloadavg()
        median = statistics.median(wall)
        record = {
            "kernel": name, "impl": impl, "dtype": dtype, "shape": [B, *shape],
            "median_ms": 1e3 * median, "img_per_s": B / median, "repeats": n_rep, "params": params,
            "min_ms": 1e3 * min(wall), "max_ms": 1e3 * max(wall),
        }
        if impl != "train":
            record["per_eval_ms"] = 1e3 * median / steps
        if device == "cpu":
            # With one thread, CPU time is the time the call computed, whatever else waited for the
            # cores: B / CPU time is the single-core throughput, robust to a loaded machine.
            cpu_s = statistics.median(cpu)
            record.update(cpu_s_per_call=cpu_s, img_per_cpu_s=B / cpu_s, threads=torch.get_num_threads(),
                          loadavg_before=round(load0[0], 2), loadavg_after=round(load1[0], 2))
        records.append(record)
        print(f"  {name} {impl} {dtype}: {record['img_per_s']:.1f} img/s (median {record['median_ms']:.0f} ms "
              f"over {n_rep})", flush=True)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        help=f"default: {' '.join(CPU_MODELS)} on a CPU, all on CUDA")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--batch", type=int, help="batch size for every model (default: per model)")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps (default 10)")
    parser.add_argument("--repeats", type=int, default=9, help="timed training steps per case (default 9)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps first (default 3)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1 warm-up, 4 sampler steps")
    parser.add_argument("--no-write", action="store_true", help="print only; keep the results file")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.steps = 3, 1, 4
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = args.models or (list(MODELS) if device == "cuda" else list(CPU_MODELS))
    where = torch.cuda.get_device_name() if device == "cuda" else f"{cpu_name()}, {os.cpu_count()} cores"
    print(f"device: {where}; torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}")
    records = []
    for name in models:
        for dtype in args.dtypes:
            records += bench_model(name, dtype, device, args.steps, args.warmup, args.repeats, args.batch)
    columns = ["kernel", "impl", "dtype", "shape", "img_per_s", "median_ms", "repeats"]
    if device == "cpu":
        columns += ["img_per_cpu_s", "threads", "loadavg_before", "loadavg_after"]
    print_table(records, columns)
    if not args.no_write:
        path = None if device == "cuda" else RESULTS_DIR / f"cpu_{device_slug(cpu_name())}.json"
        for r in records:
            r["device_detail"] = where
        print(f"records written to {write_results(records, path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
