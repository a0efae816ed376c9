r"""Time the flash-attention kernel against every PyTorch SDPA backend, on one GPU.

    python benchmarks/bench_attention.py            # all shapes, fp16 and bf16; writes results
    python benchmarks/bench_attention.py --quick    # two shapes, to check the setup

For each shape ``(B, H, Lq, Lk, D)``, dtype and implementation it times the forward pass and
the forward plus backward pass (``triton.testing.do_bench``, median over repetitions, the same
tensors for every implementation, all in this process) and reports TFLOP/s with the usual
conventions: $4BHL_qL_kD$ for the forward (two matrix products of $2BHL_qL_kD$ each), and 2.5
times that for the backward (its five products; the recomputation of $QK^\top$ is not counted).
Non-causal throughout. Implementations:

- ``triton``: ``stepdiff.kernels.attention`` (autotuned on first use; that call is not timed);
- ``sdpa-flash``, ``sdpa-cudnn``, ``sdpa-efficient``, ``sdpa-math``: PyTorch's
  ``scaled_dot_product_attention`` forced to one backend with ``torch.nn.attention.sdpa_kernel``
  (a backend that refuses the inputs is reported as skipped; ``sdpa-math`` is skipped where its
  $L_q\times L_k$ matrices would not fit in memory).

Records go to ``benchmarks/results/<device>.json`` through ``benchmarks/common.py``, with
``kernel`` = ``attention-fwd`` or ``attention-fwd+bwd`` and ``shape`` = ``[B, H, Lq, Lk, D]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, write_results  # noqa: E402

# (B, H, Lq, Lk, D): the shapes. (4, 16, 4096, 77, 64) is cross-attention from a
# 64 x 64 latent's tokens to 77 text tokens.
SHAPES = [
    (16, 8, 1024, 1024, 64),
    (4, 16, 4096, 4096, 64),
    (4, 16, 4096, 4096, 128),
    (2, 16, 16384, 16384, 128),
    (64, 8, 256, 256, 64),
    (4, 16, 4096, 77, 64),
]
QUICK = [(16, 8, 1024, 1024, 64), (4, 16, 4096, 77, 64)]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def sdpa_backends() -> dict:
    """impl name -> SDPBackend, for the backends this PyTorch has."""
    from torch.nn.attention import SDPBackend

    names = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
             "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}
    return {impl: getattr(SDPBackend, attr) for impl, attr in names.items()
            if hasattr(SDPBackend, attr)}


def flops(shape, backward: bool) -> float:
    B, H, Lq, Lk, D = shape
    fwd = 4.0 * B * H * Lq * Lk * D
    return fwd * (1 + 2.5) if backward else fwd


def math_fits(shape) -> bool:
    """The math backend holds scores and probabilities (and their gradients) of size
    B*H*Lq*Lk; allow it when four such fp32 matrices fit in half the free memory."""
    B, H, Lq, Lk, _ = shape
    free, _total = torch.cuda.mem_get_info()
    return 4 * B * H * Lq * Lk * 4 < free / 2


def make_fn(impl: str, q, k, v, do, backward: bool):
    """A no-argument callable running one forward (and backward) pass of ``impl``."""
    if impl == "triton":
        from stepdiff.kernels import attention

        def forward():
            return attention(q, k, v)
    else:
        from torch.nn.attention import sdpa_kernel

        backend = sdpa_backends()[impl]

        def forward():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

    if not backward:
        return forward

    def forward_backward():
        forward().backward(do)

    return forward_backward


def bench_one(impl, shape, dtype, backward: bool, reference, graph: bool = False):
    """(median ms, None), or (None, the reason it was skipped)."""
    import triton.testing

    if impl == "sdpa-math" and not math_fits(shape):
        return None, "its Lq x Lk matrices would not fit in memory"
    B, H, Lq, Lk, D = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, L, D, device="cuda", dtype=dtype, generator=g)
                   for L in (Lq, Lk, Lk, Lq))
    for t in (q, k, v):
        t.requires_grad_(backward)
    fn = make_fn(impl, q, k, v, do, backward)
    try:
        with torch.no_grad():
            out = make_fn(impl, q, k, v, do, False)()
        fn()  # first call: autotuning or plan building, not timed
    except RuntimeError as err:  # a backend that does not take these inputs, or out of memory
        return None, str(err).strip().splitlines()[0][:100]
    if reference is not None:
        # Never time a wrong answer: every implementation must agree with SDPA's flash output.
        err = (out.float() - reference.float()).abs().max().item()
        if err > 0.05:
            raise AssertionError(f"{impl} {shape} {dtype}: max |diff| to sdpa-flash {err:.3g}")
    grads = [q, k, v] if backward else None
    if graph:
        # Many calls captured in one CUDA graph and replayed: the device's time alone.
        try:
            ms = triton.testing.do_bench_cudagraph(fn, rep=100, grad_to_none=grads,
                                                   return_mode="median")
        except RuntimeError as err:  # a backend that cannot be captured
            return None, "graph capture: " + str(err).strip().splitlines()[0][:80]
    else:
        ms = triton.testing.do_bench(fn, warmup=50, rep=300, grad_to_none=grads,
                                     return_mode="median")
    del q, k, v, do, out
    torch.cuda.empty_cache()
    return ms, None


def add_ratios(records: list[dict], impls: list[str]) -> None:
    """Ratios: Triton's throughput over each SDPA backend's, same kernel, dtype and shape."""
    by_key = {(r["kernel"], r["dtype"], tuple(r["shape"]), r["impl"]): r for r in records}
    for r in records:
        if r["impl"] not in ("triton", "triton-graph"):
            continue
        suffix = r["impl"].removeprefix("triton")  # graph times against graph times
        for impl in impls[1:]:
            other = by_key.get((r["kernel"], r["dtype"], tuple(r["shape"]), impl + suffix))
            if other is not None:
                r[f"ratio_to_{impl}"] = r["TFLOPs"] / other["TFLOPs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two shapes only")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--no-write", action="store_true", help="print, do not write results")
    parser.add_argument("--graph", action="store_true",
                        help="time CUDA-graph replays (device time; impl names get '-graph')")
    parser.add_argument("--shapes", type=int, nargs="+", help="indices into SHAPES (default: all)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py times GPU kernels and needs a CUDA device; none was found.")

    env = environment()
    print(f"{env['device']}  torch {env['versions']['torch']}  triton {env['versions']['triton']}")
    impls = ["triton", *sdpa_backends()]
    suffix = "-graph" if args.graph else ""
    records, skipped = [], []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        shapes = QUICK if args.quick else [SHAPES[i] for i in args.shapes] if args.shapes else SHAPES
        for shape in shapes:
            B, H, Lq, Lk, D = shape
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype, generator=g)
                       for L in (Lq, Lk, Lk))
            try:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    reference = F.scaled_dot_product_attention(q, k, v)
            except RuntimeError:
                reference = None
            del q, k, v
            for backward in (False, True):
                kernel = "attention-fwd+bwd" if backward else "attention-fwd"
                for impl in impls:
                    ms, why = bench_one(impl, shape, dtype, backward, reference, args.graph)
                    if ms is None:
                        skipped.append(f"{kernel} {impl} {dtype_name} {list(shape)}: {why}")
                        continue
                    records.append({
                        "kernel": kernel, "impl": impl + suffix, "dtype": dtype_name,
                        "shape": [B, H, Lq, Lk, D], "median_ms": ms,
                        "TFLOPs": flops(shape, backward) / (ms * 1e-3) / 1e12,
                    })
                    print(f"  {kernel:18s} {impl:15s} {dtype_name:9s} {list(shape)} "
                          f"{ms:8.3f} ms  {records[-1]['TFLOPs']:6.1f} TFLOP/s", flush=True)
            del reference
            add_ratios(records, impls)
            if not args.no_write and not args.quick:
                write_results(records)  # after every shape: a run cut short keeps what it measured

    print()
    print_table(records, ["kernel", "impl", "dtype", "shape", "median_ms", "TFLOPs"])
    print()
    ratio_cols = [f"ratio_to_{impl}" for impl in impls[1:]]
    print_table([r for r in records if r["impl"] == "triton" + suffix],
                ["kernel", "dtype", "shape", *ratio_cols])
    if skipped:
        print("\nskipped:\n  " + "\n  ".join(skipped))
    if not args.no_write and not args.quick:
        print(f"\nwrote {write_results(records)}")


if __name__ == "__main__":
    main()
