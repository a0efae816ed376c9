r"""Time the fused elementwise kernels against PyTorch and against a plain copy, on one GPU.

    python benchmarks/bench_fused.py            # everything below; writes results
    python benchmarks/bench_fused.py --quick    # fewer repetitions, to check the setup

Kernels (``kernel`` in the records), each at the small (64x3x64x64) and the large
(256x4x128x128) batch, in float32 and bfloat16:

- ``affine_step``: $x' = c_x x + c_{\rm pred}\,p$ (DDIM with $\eta = 0$, Euler);
- ``affine_step_noise``: $x' = c_x x + c_{\rm pred}\,p + c_{\rm noise} z$ with $z$ drawn in the
  kernel (DDPM, DDIM with $\eta > 0$); the coefficients are 0-d device tensors, as the
  samplers pass them;
- ``noise_add``: $x_t = a x_0 + s\varepsilon$ and the target $\varepsilon$, with per-sample
  ``[B]`` coefficients, as training draws them;
- ``ddpm_loop_50``: the package's ``sample_ddpm`` for 50 steps at the small size with a fixed
  linear map as the denoiser, through the fused kernel.

Implementations (``impl``):

- ``triton``: the public function of ``stepdiff.kernels`` as the samplers call it (with a
  ``torch.Generator``, whose Philox state seeds the kernel from the host: no extra kernel);
- ``triton-kernel``: the Triton launcher alone, seed read from a device tensor;
- ``eager``: the same math in eager PyTorch (``randn_like`` and elementwise ops);
- ``compile``: that eager function under ``torch.compile``;
- ``copy``: a device-to-device copy moving the same number of bytes: the ceiling.

For the loop: ``triton-graph`` (the whole loop captured once in a CUDA graph and replayed),
``triton`` (the same loop launched from Python) and ``eager`` (the loop with the PyTorch
reference updates, ``backend="torch"``).

- ``triton-kernel-graph``, ``eager-graph``, ``copy-graph``: those three calls captured many
  times over in one CUDA graph and replayed (``triton.testing.do_bench_cudagraph``): the
  device's time alone.

Times are medians of ``triton.testing.do_bench``, which clears the L2 cache before every call
and times each call with CUDA events. The events time the device, but a call whose host work
(Python checks, the Triton launcher: tens of microseconds) outlasts the device work queued
before it leaves the device idle inside the timed span, so at small sizes these times measure
the host; the ``-graph`` times do not. At the small size the graph replays also find the data
in the L2 cache (3 MB tensors); their copy is measured the same way.
Bandwidth counts the minimum traffic: every input read once and every output written once
(3 tensors of the data's size for each kernel). Records go to
``benchmarks/results/<device>.json`` through ``benchmarks/common.py``; each carries ``bytes``
so any ratio can be recomputed.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, write_results  # noqa: E402

SHAPES = {"small": (64, 3, 64, 64), "large": (256, 4, 128, 128)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
KERNELS = ("affine_step", "affine_step_noise", "noise_add")
LOOP = "ddpm_loop_50"
LOOP_STEPS = 50
# Tensors of the data's size that each kernel must move at least: reads plus writes.
PASSES = {"affine_step": 3, "affine_step_noise": 3, "noise_add": 3}
# Per step of the loop: the update (3) and the stand-in denoiser, which reads x and writes
# its prediction (2).
LOOP_PASSES_PER_STEP = 5
GRAPH = "-graph"  # impl suffix of times taken from CUDA-graph replays


def min_bytes(kernel: str, shape, itemsize: int) -> int:
    """The least number of bytes ``kernel`` moves on data of ``shape``."""
    numel = math.prod(shape)
    if kernel == LOOP:
        return LOOP_STEPS * LOOP_PASSES_PER_STEP * numel * itemsize
    return PASSES[kernel] * numel * itemsize


def make_record(kernel: str, impl: str, dtype: str, shape, median_ms: float, nbytes: int) -> dict:
    """One measurement in the results file's format, with the derived bandwidth."""
    return {
        "kernel": kernel,
        "impl": impl,
        "dtype": dtype,
        "shape": list(shape),
        "median_ms": median_ms,
        "bytes": nbytes,
        "GBps": nbytes / (median_ms * 1e-3) / 1e9,
    }


def annotate(records: list[dict]) -> list[dict]:
    """Add ``pct_copy`` (bandwidth as a percentage of the copy of the same bytes) and the
    speed-ups ``vs_eager`` and ``vs_compile`` (their time over this time), where measured."""
    by_key = {(r["kernel"], r["impl"], r["dtype"], tuple(r["shape"])): r for r in records}
    out = []
    for r in records:
        key = (r["kernel"], r["dtype"], tuple(r["shape"]))
        # Graph-replayed times ("...-graph") are compared with graph-replayed times only.
        suffix = GRAPH if r["impl"].endswith(GRAPH) else ""
        row = dict(r)
        copy = by_key.get((key[0], "copy" + suffix, *key[1:]))
        if copy is not None and r["impl"] != "copy" + suffix:
            row["pct_copy"] = 100.0 * r["GBps"] / copy["GBps"]
        for base in ("eager", "compile"):
            other = by_key.get((key[0], base + suffix, *key[1:]))
            if other is not None and r["impl"] != base + suffix:
                row[f"vs_{base}"] = other["median_ms"] / r["median_ms"]
        out.append(row)
    return out


# --- the functions that are timed (CUDA only) -------------------------------------------------


def eager_affine_step(x, pred, c_x, c_pred):
    return c_x * x + c_pred * pred


def eager_affine_step_noise(x, pred, c_x, c_pred, c_noise):
    return c_x * x + c_pred * pred + c_noise * torch.randn_like(x)


def eager_noise_add(x0, a, s):
    view = (-1,) + (1,) * (x0.ndim - 1)
    eps = torch.randn_like(x0)
    return a.view(view) * x0 + s.view(view) * eps, eps


@contextlib.contextmanager
def backend(name: str):
    """Run the package's kernels through ``name`` (via ``STEPDIFF_BACKEND``) inside the block."""
    old = os.environ.get("STEPDIFF_BACKEND")
    os.environ["STEPDIFF_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["STEPDIFF_BACKEND"]
        else:
            os.environ["STEPDIFF_BACKEND"] = old


def bench_graph(fn) -> float:
    """Median time of one call of ``fn``, from replays of a CUDA graph holding many calls."""
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))


def time_kernel(kernel: str, shape, dtype: torch.dtype, bench, use_compile: bool) -> list[dict]:
    """Records for ``kernel`` at ``shape`` and ``dtype``: every implementation and the copy."""
    from stepdiff.kernels import affine_step, noise_add
    from stepdiff.kernels.fused_triton import affine_step_triton, noise_add_triton

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(shape, device=dev, generator=g).to(dtype)
    pred = torch.randn(shape, device=dev, generator=g).to(dtype)
    batch = shape[0]
    state = torch.tensor([1234, 0], dtype=torch.int64, device=dev)
    if kernel == "noise_add":
        a = torch.rand(batch, device=dev, generator=g)
        s = torch.sqrt(1 - a**2)
        fns = {
            "triton": lambda: noise_add(x, a, s, generator=g),
            "triton-kernel": lambda: noise_add_triton(x, a, s, seed=state),
            "eager": lambda: eager_noise_add(x, a, s),
        }
        eager, args = eager_noise_add, (x, a, s)
    else:
        # 0-d float32 device tensors, as the samplers pass them.
        c_x, c_pred, c_noise = (torch.rand((), device=dev, generator=g) for _ in range(3))
        if kernel == "affine_step":
            fns = {
                "triton": lambda: affine_step(x, pred, c_x, c_pred),
                "triton-kernel": lambda: affine_step_triton(x, pred, c_x, c_pred),
                "eager": lambda: eager_affine_step(x, pred, c_x, c_pred),
            }
            eager, args = eager_affine_step, (x, pred, c_x, c_pred)
        else:
            fns = {
                "triton": lambda: affine_step(x, pred, c_x, c_pred, c_noise, generator=g),
                "triton-kernel": lambda: affine_step_triton(x, pred, c_x, c_pred, c_noise, seed=state),
                "eager": lambda: eager_affine_step_noise(x, pred, c_x, c_pred, c_noise),
            }
            eager, args = eager_affine_step_noise, (x, pred, c_x, c_pred, c_noise)
    if use_compile:
        try:
            compiled = torch.compile(eager, dynamic=False)
            compiled(*args)  # compile outside the timing
            fns["compile"] = lambda: compiled(*args)
        except Exception as error:  # report and go on: the other numbers still stand
            print(f"  torch.compile failed for {kernel}: {type(error).__name__}: {error}")
    nbytes = min_bytes(kernel, shape, x.element_size())
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    fns["copy"] = lambda: dst.copy_(src)
    name = str(dtype).removeprefix("torch.")
    records = []
    for impl, fn in fns.items():
        fn()  # compile / autotune / allocate outside the timing
        records.append(make_record(kernel, impl, name, shape, bench(fn), nbytes))
    # The same calls replayed from a CUDA graph: device time alone, without the host's share
    # (Python, the launcher), which do_bench counts whenever the host is slower than the GPU.
    for impl in ("triton-kernel", "eager", "copy"):
        ms = bench_graph(fns[impl])
        records.append(make_record(kernel, impl + GRAPH, name, shape, ms, nbytes))
    return records


def time_loop(dtype: torch.dtype, bench) -> list[dict]:
    """The 50-step DDPM loop at the small size: one CUDA graph, Python launches, and eager."""
    from stepdiff.samplers import sample_ddpm
    from stepdiff.schedules import VPLinearSchedule, time_grid

    dev = "cuda"
    shape = SHAPES["small"]
    schedule = VPLinearSchedule()
    ts = time_grid(LOOP_STEPS).to(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    x_init = torch.randn(shape, device=dev, generator=g).to(dtype)

    def model(x, t):  # a fixed linear map: the cheapest stand-in for a network
        return 0.8 * x

    def run():
        return sample_ddpm(model, x_init, schedule, ts, generator=g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # compile the kernels before capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if hasattr(graph, "register_generator_state"):
        graph.register_generator_state(g)
    with torch.cuda.graph(graph):
        run()
    name = str(dtype).removeprefix("torch.")
    nbytes = min_bytes(LOOP, shape, x_init.element_size())
    records = [make_record(LOOP, "triton-graph", name, shape, bench(graph.replay), nbytes)]
    with backend("triton"):
        records.append(make_record(LOOP, "triton", name, shape, bench(run), nbytes))
    with backend("torch"):
        run()
        records.append(make_record(LOOP, "eager", name, shape, bench(run), nbytes))
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-write", action="store_true", help="print only; keep the results file")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="only these dtypes")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_fused.py times GPU kernels and needs a CUDA device; none is available here, "
            "so nothing was measured.",
            file=sys.stderr,
        )
        return 1
    import triton.testing

    rep = 30 if args.quick else 200

    def bench(fn) -> float:
        return float(triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median"))

    env = environment()
    print(f"{env['device']}, torch {env['versions']['torch']}, triton {env['versions']['triton']}")
    records = []

    def save() -> None:
        # Written after every group, so a run stopped by a time limit keeps what it measured.
        if not args.no_write:
            write_results(annotate(records))

    for dname, dtype in DTYPES.items():
        if args.dtypes and dname not in args.dtypes:
            continue
        for size, shape in SHAPES.items():
            for kernel in KERNELS:
                print(f"timing {kernel} {dname} {size} {shape} ...", flush=True)
                records += time_kernel(kernel, shape, dtype, bench, not args.no_compile)
                save()
        print(f"timing {LOOP} {dname} ...", flush=True)
        records += time_loop(dtype, bench)
        save()
    table = annotate(records)
    columns = ["kernel", "impl", "dtype", "shape", "median_ms", "GBps", "pct_copy"]
    print_table(table, columns + ["vs_eager", "vs_compile"])
    print(
        "\nGBps counts the minimum traffic (inputs read once, outputs written once); pct_copy "
        "is against a device-to-device copy of the same bytes. At the small size launch "
        "overhead dominates: one kernel replaces 3-6, and the loop runs as one CUDA graph."
    )
    if not args.no_write:
        print(f"records written to {write_results(table)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
