"""Sweep the fused kernels' launch settings, and measure their host-side cost, on one GPU.

    python benchmarks/sweep_fused.py [--out sweep.json]

Two questions the main benchmark (bench_fused.py) does not answer:

1. Which tile size (``BLOCK``) and warps per program (``num_warps``) move the large batch
   (256x4x128x128) fastest, per kernel and dtype? Each setting is timed from CUDA-graph
   replays (``triton.testing.do_bench_cudagraph``, median: device time, no host share),
   launched through the Triton launcher with the seed in a device tensor, beside a
   device-to-device copy of the same bytes timed the same way.
2. How much host time does one call cost? At the small batch (64x3x64x64) the GPU work is a few
   microseconds, so a loop of calls with one synchronisation at the end measures the host:
   Python checks, the Triton launcher, the seed draw of the public function, PyTorch dispatch.

It prints a table and writes the records as JSON (``--out``); it does not touch the results file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fused import (  # noqa: E402
    DTYPES,
    SHAPES,
    eager_affine_step,
    eager_affine_step_noise,
    eager_noise_add,
)
from common import environment  # noqa: E402

LARGE, SMALL = SHAPES["large"], SHAPES["small"]
BLOCKS = (1024, 2048, 4096)
WARPS = (2, 4, 8)


def launchers(x, pred, seed):
    """kernel name -> f(block, num_warps) running it once through the Triton launcher."""
    from stepdiff.kernels.fused_triton import affine_step_triton, noise_add_triton

    dev = x.device
    c = [torch.rand((), device=dev) for _ in range(3)]
    a = torch.rand(x.shape[0], device=dev)
    s = torch.sqrt(1 - a**2)
    return {
        "affine_step": lambda b, w: affine_step_triton(x, pred, c[0], c[1], block=b, num_warps=w),
        "affine_step_noise": lambda b, w: affine_step_triton(
            x, pred, c[0], c[1], c[2], seed=seed, block=b, num_warps=w),
        "noise_add": lambda b, w: noise_add_triton(x, a, s, seed=seed, block=b, num_warps=w),
    }


def sweep(dtype_name, bench) -> list[dict]:
    dtype = DTYPES[dtype_name]
    x, pred = (torch.randn(LARGE, device="cuda").to(dtype) for _ in range(2))
    seed = torch.tensor([1234, 0], dtype=torch.int64, device="cuda")
    nbytes = 3 * x.numel() * x.element_size()
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    records = []
    for kernel, run in launchers(x, pred, seed).items():
        for block in BLOCKS:
            for warps in WARPS:
                try:
                    run(block, warps)
                except Exception as error:  # report and go on
                    print(f"  {kernel} {dtype_name} block {block} warps {warps}: {error}")
                    continue
                ms = bench(lambda run=run, b=block, w=warps: run(b, w))
                records.append({"kernel": kernel, "dtype": dtype_name, "shape": list(LARGE),
                                "block": block, "num_warps": warps, "median_ms": ms,
                                "GBps": nbytes / ms / 1e6, "pct_copy": 100 * copy_ms / ms})
    return records


def host_cost(dtype_name, calls=2000) -> list[dict]:
    """Wall time per call for a loop of calls at the small size, synchronised once."""
    from stepdiff.kernels import affine_step, noise_add
    from stepdiff.kernels.fused_triton import affine_step_triton, noise_add_triton

    dtype = DTYPES[dtype_name]
    g = torch.Generator(device="cuda").manual_seed(0)
    x, pred = (torch.randn(SMALL, device="cuda").to(dtype) for _ in range(2))
    c = [torch.rand((), device="cuda") for _ in range(3)]
    a = torch.rand(SMALL[0], device="cuda")
    s = torch.sqrt(1 - a**2)
    seed = torch.tensor([1234, 0], dtype=torch.int64, device="cuda")
    fns = {
        ("affine_step", "public"): lambda: affine_step(x, pred, c[0], c[1]),
        ("affine_step", "launcher"): lambda: affine_step_triton(x, pred, c[0], c[1]),
        ("affine_step", "eager"): lambda: eager_affine_step(x, pred, c[0], c[1]),
        ("affine_step_noise", "public"): lambda: affine_step(x, pred, *c, generator=g),
        ("affine_step_noise", "launcher"): lambda: affine_step_triton(x, pred, *c, seed=seed),
        ("affine_step_noise", "seed-draw"): lambda: torch.randint(
            0, 2**62, (2,), generator=g, device="cuda"),
        ("affine_step_noise", "eager"): lambda: eager_affine_step_noise(x, pred, *c),
        ("noise_add", "public"): lambda: noise_add(x, a, s, generator=g),
        ("noise_add", "launcher"): lambda: noise_add_triton(x, a, s, seed=seed),
        ("noise_add", "eager"): lambda: eager_noise_add(x, a, s),
    }
    records = []
    for (kernel, impl), fn in fns.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        us = (time.perf_counter() - start) / calls * 1e6
        records.append({"kernel": kernel, "impl": impl, "dtype": dtype_name,
                        "shape": list(SMALL), "host_us_per_call": us})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("sweep_fused.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sweep_fused.py needs a CUDA device")
    import triton.testing

    def bench(fn):
        # CUDA-graph replays: the device's time, without the launcher's host time.
        return float(triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median"))

    result = {**environment(), "sweep": [], "host": []}
    for dtype_name in DTYPES:
        result["host"] += host_cost(dtype_name)
        args.out.write_text(json.dumps(result, indent=1))
    for r in result["host"]:
        print(f"host {r['kernel']:18s} {r['impl']:9s} {r['dtype']:8s} {r['host_us_per_call']:7.1f} us/call")
    for dtype_name in DTYPES:
        result["sweep"] += sweep(dtype_name, bench)
        args.out.write_text(json.dumps(result, indent=1))
    best = {}
    for r in result["sweep"]:
        print(f"sweep {r['kernel']:18s} {r['dtype']:8s} block {r['block']:5d} warps {r['num_warps']} "
              f"{r['median_ms'] * 1e3:7.1f} us {r['pct_copy']:5.1f}% of copy")
        key = (r["kernel"], r["dtype"])
        if key not in best or r["median_ms"] < best[key]["median_ms"]:
            best[key] = r
    for (kernel, dtype_name), r in best.items():
        print(f"best  {kernel:18s} {dtype_name:8s} block {r['block']} warps {r['num_warps']}: "
              f"{r['pct_copy']:.1f}% of copy")


if __name__ == "__main__":
    main()
