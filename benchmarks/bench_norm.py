r"""Time the fused GroupNorm+SiLU and adaLN-modulate kernels against PyTorch, on one GPU.

    python benchmarks/bench_norm.py              # all shapes, bf16; writes results
    python benchmarks/bench_norm.py --quick      # fewer repetitions

Kernels (``kernel`` in the records), forward (``-fwd``) and forward plus backward (``-fwd+bwd``):

- ``group_norm_silu``: $\mathrm{SiLU}(\mathrm{GroupNorm}_{32}(x))$ at the sizes of the package's
  ``ddpm-cifar`` UNet sampling a batch of 256 (32x32 with 128 channels, 16x16 and 8x8 with 256),
  NCHW and channels-last;
- ``adaln_modulate``: $\mathrm{LN}(x)(1 + s) + h$ at DiT-B/2's width (768) for 256, 1024 and
  4096 tokens.

Implementations (``impl``): ``triton`` (``stepdiff.kernels``, the launch path of plans),
``eager`` (the PyTorch composition: ``F.silu(F.group_norm(...))``, or ``F.layer_norm`` then
the modulation), ``compile`` (that eager function under ``torch.compile``) and ``copy`` (a
device-to-device copy of the forward's minimum traffic, the ceiling). Times are medians of
``triton.testing.do_bench`` per call, and of ``do_bench_cudagraph`` (``-graph`` impls: device
time alone) for the forward. Bandwidth counts the forward's minimum traffic, $x$ read once and
$y$ written once. Records go to ``benchmarks/results/<device>.json`` (``benchmarks/common.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, write_results  # noqa: E402

GN_SHAPES = [(256, 128, 32, 32), (256, 256, 16, 16), (256, 256, 8, 8)]
ADALN_SHAPES = [(256, 256, 768), (64, 1024, 768), (16, 4096, 768)]
GROUPS = 32


def eager_gn(x, w, b):
    return F.silu(F.group_norm(x, GROUPS, w, b, 1e-5))


def eager_adaln(x, shift, scale):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


def cases(dtype):
    """(kernel, shape label, layout, make inputs, triton fn, eager fn)."""
    from stepdiff.kernels import adaln_modulate, group_norm_silu

    out = []
    for shape in GN_SHAPES:
        for layout in ("nchw", "channels_last"):
            def make(shape=shape, layout=layout):
                x = torch.randn(shape, device="cuda", dtype=dtype)
                if layout == "channels_last":
                    x = x.to(memory_format=torch.channels_last)
                w = torch.randn(shape[1], device="cuda", dtype=dtype)
                b = torch.randn(shape[1], device="cuda", dtype=dtype)
                return x, w, b

            out.append(("group_norm_silu", list(shape), layout, make,
                        lambda x, w, b: group_norm_silu(x, GROUPS, w, b), eager_gn))
    for shape in ADALN_SHAPES:
        def make(shape=shape):
            B, _, D = shape
            return (torch.randn(shape, device="cuda", dtype=dtype), torch.randn(B, D, device="cuda", dtype=dtype),
                    torch.randn(B, D, device="cuda", dtype=dtype))

        out.append(("adaln_modulate", list(shape), "bld", make, adaln_modulate, eager_adaln))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_norm.py times GPU kernels and needs a CUDA device; none is available, nothing measured.",
              file=sys.stderr)
        return 1
    import triton.testing

    rep = 30 if args.quick else 200
    dtype = getattr(torch, args.dtype)
    env = environment()
    print(f"{env['device']}, torch {env['versions']['torch']}, triton {env['versions']['triton']}")
    records = []

    def record(kernel, impl, shape, layout, ms, nbytes):
        records.append({"kernel": kernel, "impl": impl, "dtype": args.dtype, "shape": shape + [layout],
                        "median_ms": ms, "bytes": nbytes, "GBps": nbytes / (ms * 1e-3) / 1e9})
        print(f"  {kernel:22s} {impl:16s} {shape} {layout:13s} {ms * 1e3:9.1f} us  {records[-1]['GBps']:7.0f} GB/s",
              flush=True)

    for kernel, shape, layout, make, fast, eager in cases(dtype):
        inputs = make()
        nbytes = 2 * inputs[0].numel() * inputs[0].element_size()
        fns = {"triton": lambda f=fast, a=inputs: f(*a), "eager": lambda f=eager, a=inputs: f(*a)}
        if not args.no_compile:
            try:
                compiled = torch.compile(eager, dynamic=False)
                compiled(*inputs)
                fns["compile"] = lambda f=compiled, a=inputs: f(*a)
            except Exception as error:  # report and go on
                print(f"  torch.compile failed for {kernel}: {type(error).__name__}: {error}")
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        fns["copy"] = lambda d=dst, s=src: d.copy_(s)
        with torch.no_grad():
            for impl, fn in fns.items():
                fn()
                ms = triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")
                record(kernel + "-fwd", impl, shape, layout, ms, nbytes)
                ms = triton.testing.do_bench_cudagraph(fn, rep=max(20, rep // 4), return_mode="median")
                record(kernel + "-fwd", impl + "-graph", shape, layout, ms, nbytes)
        grads = [t.requires_grad_() for t in inputs]
        for impl in ("triton", "eager", "compile"):
            if impl not in fns:
                continue
            fn = fns[impl]
            dy = torch.randn_like(inputs[0])

            def step(fn=fn, dy=dy):
                fn().backward(dy)

            step()
            ms = triton.testing.do_bench(step, warmup=10, rep=rep, grad_to_none=grads, return_mode="median")
            record(kernel + "-fwd+bwd", impl, shape, layout, ms, nbytes)
        if not args.no_write:
            write_results(records)  # after every shape: a run cut short keeps what it measured
    by_key = {(r["kernel"], r["impl"], tuple(r["shape"])): r for r in records}
    for r in records:
        suffix = "-graph" if r["impl"].endswith("-graph") else ""
        for base in ("eager", "compile", "copy"):
            other = by_key.get((r["kernel"], base + suffix, tuple(r["shape"])))
            if other is not None and r["impl"] == "triton" + suffix:
                r["vs_" + base] = other["median_ms"] / r["median_ms"]
    print()
    print_table([r for r in records if r["impl"].startswith("triton")],
                ["kernel", "impl", "shape", "median_ms", "GBps", "vs_eager", "vs_compile", "vs_copy"])
    if not args.no_write:
        print(f"records written to {write_results(records)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
