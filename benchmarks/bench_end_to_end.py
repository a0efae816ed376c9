r"""End to end: DDIM sampling with the package's UNet and DiT, eager vs torch.compile vs the fast path.

    python benchmarks/bench_end_to_end.py                 # on a GPU: every case below, bf16; writes results
    python benchmarks/bench_end_to_end.py --cases unet    # one model
    python benchmarks/bench_end_to_end.py --smoke         # on a CPU: tiny models, to check that it runs

Issue 17's end-to-end targets: 50 DDIM steps at batch 256 in bf16, same weights, same process.
Cases (``kernel`` in the records, ``e2e-<case>``):

- ``unet-ddpm-cifar``: the package's ``ddpm-cifar`` UNet (35.7 M parameters) on 32x32x3, batch 256;
- ``dit-B/2-1024``: DiT-B/2 on 64x64x4 latents (1024 tokens), batch 256;
- ``dit-B/2-4096``: DiT-B/2 on 128x128x4 latents (4096 tokens), batch 64 by default: one
  50-step run at batch 256 takes about half a minute of an H100 by a FLOP count, too long for a
  GPU session of a few minutes (``--dit-4096-batch 256`` runs the issue's size).

Implementations (``impl``), all the same weights (one set of float32 parameters, loaded into each
variant), all under ``torch.inference_mode`` and ``torch.autocast`` to bfloat16, all the same
50-step DDIM run (``eta = 0``, $v$-prediction, the linear VP schedule):

- ``eager``: :func:`stepdiff.samplers.sample_ddim` on the model as a plain PyTorch user would run
  it: NCHW, ``F.group_norm`` + ``F.silu`` / ``F.layer_norm`` and the modulation
  (``norm_backend="torch"``), PyTorch's ``scaled_dot_product_attention``
  (``attn_backend="sdpa"``), the update in PyTorch (``STEPDIFF_BACKEND=torch``);
- ``compile``: the same, the model under ``torch.compile`` (default mode; UNet only);
- ``fast``: :func:`stepdiff.fast.fast_sampler`: the Triton kernels (attention, GroupNorm+SiLU,
  adaLN, the fused update), a channels-last UNet, the whole loop replayed from one CUDA graph;
- ``fast-nograph``: the same without the graph (UNet by default; ``--impls`` for the others),
  to split what the kernels and layout give from what the graph gives.

Times are medians over ``--repeats`` timed runs (3 for the UNet, 2 for the DiTs, whose runs
take seconds) after one warm-up run (for ``compile`` the warm-up compiles; for ``fast`` the
warm-up steps, the capture and a first replay; either way its time is ``setup_s``). Before the
cases, the attention kernels of every case are compiled in parallel processes (``--warm-jobs``),
so that the first calls only autotune. ``img_per_s`` = batch / median. Each ``fast`` record
carries ``vs_eager`` (and for the UNet ``vs_compile``), ratios of medians, and
``rel_diff_vs_eager``, the relative L2 difference of its samples from the eager ones from the
same noise (bf16: a few 1e-2 at most; a broken fast path is far off). The zero-initialised
layers get small random weights first, so that the networks compute non-trivial samples.
Records go to ``benchmarks/results/<device>.json`` (``benchmarks/common.py``), written after
each case; then issue 17's end-to-end targets are printed through ``benchmarks/targets.py``.

``--smoke`` runs tiny models for 3 steps at batch 2 on whatever device there is (one CPU
thread), ``compile`` with the ``eager`` backend of ``torch.compile`` unless
``--compile-backend`` says otherwise (inductor would spend a minute of CPU compiling), writes
records only to ``--out`` if given, and prints no verdicts: its timings measure nothing.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stepdiff.fast import fast_sampler  # noqa: E402
from stepdiff.models import DiT, DiTConfig, UNet, UNetConfig  # noqa: E402
from stepdiff.samplers import sample_ddim  # noqa: E402
from stepdiff.schedules import VPLinearSchedule, time_grid  # noqa: E402

IMPLS = ("eager", "fast", "fast-nograph", "compile")  # compile last: the longest set-up
# The attention of each case, [L, H, D] per layer kind (UNet ddpm-cifar: one head of 256 at 16x16
# and in the 4x4 middle; DiT-B/2: 12 heads of 64 over every token).
ATTENTION = {"unet-ddpm-cifar": [(256, 1, 256), (16, 1, 256)], "dit-B/2-1024": [(1024, 12, 64)],
             "dit-B/2-4096": [(4096, 12, 64)]}


def _warm_one(job) -> str:
    """One inference call of the Triton attention at ``[2, L, H, D]`` in bf16, [B, L, H, D] layout
    (as the models call it): compiles, into Triton's on-disk cache, every candidate that the
    autotuner of the benchmark process will then only time."""
    L, H, D = job
    start = time.perf_counter()
    from stepdiff.kernels import attention

    q, k, v = (torch.randn(2, L, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with torch.inference_mode():
        attention(q, k, v, layout="blhd")
    torch.cuda.synchronize()
    return f"[2, {L}, {H}, {D}]: {time.perf_counter() - start:.0f} s"


def warm_attention(names: list[str], jobs: int) -> None:
    """Compile the attention kernels of the chosen cases in parallel processes (a first call
    autotunes over a dozen candidates, each compiled for seconds, one after another)."""
    import multiprocessing as mp

    shapes = sorted({shape for name in names for shape in ATTENTION.get(name, [])})
    if not shapes or jobs < 1:
        return
    start = time.perf_counter()
    with mp.get_context("spawn").Pool(min(jobs, len(shapes))) as pool:
        for line in pool.imap_unordered(_warm_one, shapes):
            print(f"  attention compiled {line}", flush=True)
    print(f"attention warm-up: {time.perf_counter() - start:.0f} s", flush=True)


def _unet(smoke: bool, **backends) -> UNet:
    if smoke:
        config = UNetConfig(channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), heads=1,
                            norm_groups=4, scale_shift=False, **backends)
    else:
        config = UNetConfig.preset("ddpm-cifar", **backends)
    return UNet(config)


def _dit(smoke: bool, **backends) -> DiT:
    if smoke:
        return DiT(DiTConfig(in_channels=4, hidden=32, depth=2, heads=2, freq_dim=32, **backends))
    return DiT(DiTConfig.preset("B/2", in_channels=4, **backends))


def cases(smoke: bool, dit_4096_batch: int) -> dict:
    """name: (constructor taking backend settings, sample shape C x H x W, batch, default impls)."""
    if smoke:
        return {
            "unet-ddpm-cifar": (lambda **kw: _unet(True, **kw), (3, 8, 8), 2, IMPLS),
            "dit-B/2-1024": (lambda **kw: _dit(True, **kw), (4, 8, 8), 2, ("eager", "fast")),
        }
    return {
        "unet-ddpm-cifar": (lambda **kw: _unet(False, **kw), (3, 32, 32), 256, IMPLS),
        "dit-B/2-1024": (lambda **kw: _dit(False, **kw), (4, 64, 64), 256, ("eager", "fast")),
        "dit-B/2-4096": (lambda **kw: _dit(False, **kw), (4, 128, 128), dit_4096_batch, ("eager", "fast")),
    }


def perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Small random values for the zero-initialised parameters (output layers, adaLN regressions,
    biases), so that the network's output, and so the samples, are not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def torch_backend():
    """The package's dispatchers (the sampler's fused update) on their PyTorch references."""
    old = os.environ.get("STEPDIFF_BACKEND")
    os.environ["STEPDIFF_BACKEND"] = "torch"
    try:
        yield
    finally:
        if old is None:
            del os.environ["STEPDIFF_BACKEND"]
        else:
            os.environ["STEPDIFF_BACKEND"] = old


def timed(run, device: torch.device, repeats: int) -> tuple[list[float], list[float], torch.Tensor]:
    """Wall and CPU seconds of ``repeats`` calls of ``run`` (each a whole sampling run), and its last output."""
    wall, cpu, out = [], [], None
    for _ in range(repeats):
        sync(device)
        w0, c0 = time.perf_counter(), time.process_time()
        out = run()
        sync(device)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return wall, cpu, out


def bench_case(name: str, spec, impls, args, device: torch.device, save=None) -> list[dict]:
    make, chw, batch, default_impls = spec
    impls = list(impls or default_impls)
    repeats = args.repeats or (1 if args.smoke else 3 if name.startswith("unet") else 2)
    shape = (batch, *chw)
    torch.manual_seed(0)
    fast_model = perturb(make()).to(device).eval()  # backends by device: the Triton kernels on CUDA
    state = fast_model.state_dict()
    plain = make(attn_backend="sdpa", norm_backend="torch").to(device).eval()
    plain.load_state_dict(state)
    schedule = VPLinearSchedule()
    ts = time_grid(args.steps, schedule=schedule)
    noise = torch.randn(shape, device=device, generator=torch.Generator(device).manual_seed(1))
    amp = torch.bfloat16 if (device.type == "cuda" or args.cpu_bf16) else None
    params = sum(p.numel() for p in plain.parameters())
    records, outputs, times = [], {}, {}
    print(f"{name}: batch {batch}, {args.steps} steps, {params / 1e6:.1f} M parameters, impls {impls}", flush=True)

    def autocast():
        if amp is None:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=amp)

    for impl in impls:
        setup = 0.0
        if impl in ("eager", "compile"):
            model = plain
            if impl == "compile":
                model = torch.compile(plain, backend=args.compile_backend)

            def run(model=model):
                with torch.inference_mode(), autocast(), torch_backend():
                    return sample_ddim(model, noise, schedule, ts, prediction="v")

            t0 = time.perf_counter()
            run()  # warm-up (compiles for torch.compile)
            sync(device)
            setup = time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            sampler = fast_sampler(fast_model, schedule, ts, shape, prediction="v", amp_dtype=amp,
                                   graph=(impl == "fast" and device.type == "cuda"))
            sampler(noise)  # warm-up: without a graph the kernels' first calls, with one the first replay
            sync(device)
            setup = time.perf_counter() - t0

            def run(sampler=sampler):
                return sampler(noise)

        load0 = os.getloadavg()[0]
        wall, cpu, out = timed(run, device, repeats)
        median = statistics.median(wall)
        outputs[impl], times[impl] = out.float(), median
        record = {
            "kernel": f"e2e-{name}", "impl": impl, "dtype": "bfloat16" if amp is not None else "float32",
            "shape": list(shape), "steps": args.steps, "median_ms": 1e3 * median, "img_per_s": batch / median,
            "min_ms": 1e3 * min(wall), "max_ms": 1e3 * max(wall), "repeats": repeats,
            "setup_s": round(setup, 2), "params": params,
        }
        if impl == "compile":
            record["compile_backend"] = args.compile_backend
        if device.type == "cpu":
            record.update(cpu_s_per_run=statistics.median(cpu), loadavg_before=round(load0, 2))
        if args.smoke:
            record["smoke"] = True
        records.append(record)
        if save is not None:
            save(records)  # a step stopped at its time limit keeps what it measured
        print(f"  {impl:13s} {record['img_per_s']:9.2f} img/s  (median {record['median_ms']:.1f} ms over "
              f"{repeats}; setup {setup:.1f} s)", flush=True)
        if impl == "compile":
            del model
            torch._dynamo.reset()
    reference = outputs.get("eager")
    if reference is not None and not torch.isfinite(reference).all():
        print("  WARNING: the eager samples are not finite", flush=True)
    for r in records:
        impl = r["impl"]
        if impl.startswith("fast") and "eager" in times:
            r["vs_eager"] = times["eager"] / times[impl]
            if "compile" in times:
                r["vs_compile"] = times["compile"] / times[impl]
        if reference is not None and impl != "eager":
            diff = float((outputs[impl] - reference).norm() / reference.norm().clamp_min(1e-30))
            r["rel_diff_vs_eager"] = diff
            if not diff < 0.1:
                print(f"  WARNING: {impl} samples differ from eager by {diff:.3g} (relative L2): not the same run",
                      flush=True)
    if save is not None:
        save(records)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", help="case names, or prefixes: unet, dit (default: all)")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, help="implementations (default: per case)")
    parser.add_argument("--steps", type=int, help="DDIM steps (default 50; 3 with --smoke)")
    parser.add_argument("--repeats", type=int,
                        help="timed runs per implementation (default 3 for the UNet, 2 for the DiTs; 1 with --smoke)")
    parser.add_argument("--dit-4096-batch", type=int, default=64, help="batch of the 4096-token DiT (default 64)")
    parser.add_argument("--compile-backend", help="torch.compile backend (default inductor; eager with --smoke)")
    parser.add_argument("--warm-jobs", type=int, default=4,
                        help="processes compiling the attention kernels first (CUDA; 0: none)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's; 1 with --smoke)")
    parser.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast on the CPU too")
    parser.add_argument("--smoke", action="store_true", help="tiny models, 3 steps, batch 2: checks that it runs")
    parser.add_argument("--out", type=Path, help="results file (default: the device's; with --smoke: none)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    args.steps = args.steps or (3 if args.smoke else 50)
    args.compile_backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    if args.threads or args.smoke:
        # Tiny tensors: more threads only spin, most of all on a shared, loaded machine.
        torch.set_num_threads(args.threads or 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: the end-to-end benchmark measures a GPU; run --smoke to check it on a CPU")
        return 2
    all_cases = cases(args.smoke, args.dit_4096_batch)
    chosen = [n for n in all_cases if not args.cases or any(n == c or n.startswith(c) for c in args.cases)]
    if not chosen:
        parser.error(f"no case matches {args.cases}; the cases are {list(all_cases)}")
    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {where}; torch {torch.__version__}; {args.steps} DDIM steps" + (" (smoke)" if args.smoke else ""))
    if device.type == "cuda" and not args.smoke:
        warm_attention(chosen, args.warm_jobs)
    write = not args.no_write and (args.out or not args.smoke)
    path = None
    records = []
    for name in chosen:
        def save(new):
            nonlocal path
            path = write_results(new, args.out)

        records += bench_case(name, all_cases[name], args.impls, args, device, save if write else None)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(records, ["kernel", "impl", "dtype", "shape", "img_per_s", "median_ms", "vs_eager", "vs_compile",
                          "rel_diff_vs_eager", "setup_s"])
    if path is not None:
        print(f"records written to {path}")
    import targets

    rows = targets.end_to_end_targets(records)
    print("issue 17, end to end" + (" (smoke run: no verdicts, these timings measure nothing)" if args.smoke else ""))
    for target, value, bound, verdict in rows:
        label = "-" if args.smoke else ("UNMEASURED" if verdict is None else ("pass" if verdict else "FAIL"))
        shown = "-" if value is None else f"{value:.3g}"
        print(f"  {label:10s} {target:62s} {shown:>8s}  (target {bound})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
