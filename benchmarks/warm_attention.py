"""Compile the attention kernels for the benchmark's shapes in parallel, before timing.

    python benchmarks/warm_attention.py [--jobs 12] [--shapes 0 1 ...] [--dtypes float16 ...]

The first call of :func:`stepdiff.kernels.attention` at a new (head dim, dtype, length bucket)
autotunes: it compiles every candidate configuration of the forward and both backward kernels,
a dozen or so compilations of several seconds each, one after another. Triton keeps compiled
kernels in its on-disk cache, so running one forward and backward pass per benchmark shape in
separate processes, at once, compiles them on all CPU cores; the benchmark then finds every
candidate in the cache and only times them. Nothing here is measured: the autotuning these
processes do side by side on one GPU is thrown away with them.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import DTYPES, SHAPES  # noqa: E402


def warm(job) -> str:
    """One forward (without and with grad) and backward pass at ``shape`` and ``dtype``."""
    import torch

    from stepdiff.kernels import attention

    shape, dtype_name = job
    B, H, Lq, Lk, D = shape
    dtype = DTYPES[dtype_name]
    start = time.perf_counter()
    q, k, v, do = (torch.randn(B, H, L, D, device="cuda", dtype=dtype) for L in (Lq, Lk, Lk, Lq))
    with torch.no_grad():
        attention(q, k, v)
    for t in (q, k, v):
        t.requires_grad_()
    attention(q, k, v).backward(do)
    torch.cuda.synchronize()
    return f"{dtype_name} {list(shape)}: {time.perf_counter() - start:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--shapes", type=int, nargs="+", help="indices into SHAPES (default: all)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    args = parser.parse_args()
    shapes = [SHAPES[i] for i in args.shapes] if args.shapes else SHAPES
    jobs = [(shape, dtype) for dtype in args.dtypes for shape in shapes]
    start = time.perf_counter()
    with mp.get_context("spawn").Pool(min(args.jobs, len(jobs))) as pool:
        for line in pool.imap_unordered(warm, jobs):
            print("compiled", line, flush=True)
    print(f"all {len(jobs)} compiled in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
