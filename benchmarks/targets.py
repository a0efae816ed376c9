"""Print issue 17's kernel targets as pass / fail / unmeasured, from a results file.

    python benchmarks/targets.py                                  # this device's results file
    python benchmarks/targets.py benchmarks/results/NVIDIA_H100_80GB_HBM3.json --host host_cost.json

Reads the records that bench_fused.py, bench_attention.py (per call, and with ``--graph``),
bench_end_to_end.py and host_cost.py write, and checks each target of the issue against them.
A target whose records are missing is reported as unmeasured, never as passed. Exit status 0 whatever the verdicts (a
GPU session should go on to its next step); ``--strict`` exits 1 if any target failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, device_slug  # noqa: E402

SMALL, LARGE = [64, 3, 64, 64], [256, 4, 128, 128]  # bench_fused.py's shapes
FUSED = ("affine_step", "affine_step_noise", "noise_add")
NOISY = ("affine_step_noise", "noise_add")
HOST_TARGET_US = 15.0


def _index(records):
    return {(r["kernel"], r["impl"], r["dtype"], tuple(r["shape"])): r for r in records}


def fused_targets(records) -> list[tuple[str, float | None, str, bool | None]]:
    """(target, measured value, bound, verdict) for the fused kernels; verdict None: unmeasured."""
    at = _index(records)
    out = []

    def get(kernel, impl, dtype, shape, field):
        r = at.get((kernel, impl, dtype, tuple(shape)))
        return None if r is None else r.get(field)

    def add(name, value, op, bound):
        verdict = None if value is None else (value >= bound if op == ">=" else value < bound)
        out.append((name, value, f"{op} {bound:g}", verdict))

    for dtype in ("float32", "bfloat16"):
        for kernel in FUSED:
            add(f"{kernel} {dtype} small, per call: x eager", get(kernel, "triton", dtype, SMALL, "vs_eager"),
                ">=", 1.0)
            add(f"{kernel} {dtype} large, per call: % of copy", get(kernel, "triton", dtype, LARGE, "pct_copy"),
                ">=", 85.0 if dtype == "float32" else 80.0)
            add(f"{kernel} {dtype} large, per call: x torch.compile",
                get(kernel, "triton", dtype, LARGE, "vs_compile"), ">=", 1.1 if kernel in NOISY else 0.95)
            add(f"{kernel} {dtype} large, graph replay: % of copy",
                get(kernel, "triton-kernel-graph", dtype, LARGE, "pct_copy"), ">=",
                90.0 if kernel not in NOISY else (85.0 if dtype == "float32" else 75.0))
            add(f"{kernel} {dtype} large, graph replay: x eager",
                get(kernel, "triton-kernel-graph", dtype, LARGE, "vs_eager"), ">=", 3.0 if kernel in NOISY else 2.2)
        add(f"ddpm_loop_50 {dtype}, no graph: x eager loop", get("ddpm_loop_50", "triton", dtype, SMALL, "vs_eager"),
            ">=", 1.5)
        eager_loop = at.get(("ddpm_loop_50", "eager", dtype, tuple(SMALL)))
        graph_loop = at.get(("ddpm_loop_50", "triton-graph", dtype, tuple(SMALL)))
        ratio = None if not (eager_loop and graph_loop) else eager_loop["median_ms"] / graph_loop["median_ms"]
        # "With a graph, 15-18x: keep it": no regression beyond the measurement's noise.
        add(f"ddpm_loop_50 {dtype}, one graph: x eager loop (keep)", ratio, ">=", 14.5)
    return out


def attention_targets(records) -> list[tuple[str, float | None, str, bool | None]]:
    out = []
    fwd = [r for r in records if r["kernel"] == "attention-fwd" and r["impl"] == "triton"]
    both = [r for r in records if r["kernel"] == "attention-fwd+bwd" and r["impl"] == "triton"]
    if not fwd:
        out.append(("attention forward per call: x sdpa-flash, every shape", None, ">= 1", None))
    for r in fwd:
        value = r.get("ratio_to_sdpa-flash")
        out.append((f"attention fwd {r['dtype']} {r['shape']}: x sdpa-flash", value, ">= 1",
                    None if value is None else value >= 1.0))
    for r in both:
        if r["shape"][2] >= 1024:
            value = r.get("ratio_to_sdpa-flash")
            out.append((f"attention fwd+bwd {r['dtype']} {r['shape']}: x sdpa-flash", value, ">= 1",
                        None if value is None else value >= 1.0))
    for r in fwd:
        B, H, Lq, Lk, D = r["shape"]
        if Lq >= 4096 and Lk >= 4096 and D in (64, 128):
            value = r.get("ratio_to_sdpa-cudnn")
            out.append((f"attention fwd {r['dtype']} {r['shape']}: x sdpa-cudnn", value, ">= 0.8",
                        None if value is None else value >= 0.8))
    return out


# End to end (bench_end_to_end.py): the fast path's ratios of medians, by case: (case, against, bound).
E2E_TARGETS = [
    ("unet-ddpm-cifar", "eager", 2.5),
    ("unet-ddpm-cifar", "compile", 1.3),
    ("dit-B/2-1024", "eager", 1.3),
    ("dit-B/2-4096", "eager", 1.3),
]
E2E_BATCH = 256  # the batch; a record at another batch says so in the target's name


def end_to_end_targets(records) -> list[tuple[str, float | None, str, bool | None]]:
    """50 DDIM steps in bf16: the UNet's fast path at least 2.5x its eager loop and 1.3x
    torch.compile, DiT-B/2's at least 1.3x eager at 1024 and 4096 tokens. Records of other step
    counts, or of smoke runs, do not count."""
    out = []
    for case, against, bound in E2E_TARGETS:
        fast = [r for r in records if r["kernel"] == f"e2e-{case}" and r["impl"] == "fast"
                and r.get("steps") == 50 and not r.get("smoke")]
        # The batch if measured, else the largest measured.
        fast.sort(key=lambda r: (r["shape"][0] == E2E_BATCH, r["shape"][0]))
        record = fast[-1] if fast else None
        value = None if record is None else record.get(f"vs_{against}")
        name = f"e2e {case}, {'torch.compile' if against == 'compile' else against}: fast x"
        if record is not None and record["shape"][0] != E2E_BATCH:
            name += f" (batch {record['shape'][0]})"
        out.append((name, value, f">= {bound:g}", None if value is None else value >= bound))
    return out


def host_targets(report: dict | None) -> list[tuple[str, float | None, str, bool | None]]:
    if report is None:
        return [("host cost per call (host_cost.py)", None, f"< {HOST_TARGET_US:g} us", None)]
    bound = f"< {HOST_TARGET_US:g} us"
    return [(f"host cost: {r['function']}", r["min_cpu_us"], bound, r["min_cpu_us"] < HOST_TARGET_US)
            for r in report["records"] if r["path"] == "plan"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", type=Path, help="results file (default: this device's)")
    parser.add_argument("--host", type=Path, default=RESULTS_DIR / "host_cost_cpu.json", help="host_cost.py output")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target failed")
    args = parser.parse_args(argv)
    path = args.results or RESULTS_DIR / f"{device_slug()}.json"
    records = json.loads(path.read_text())["records"] if path.exists() else []
    host = json.loads(args.host.read_text()) if args.host and args.host.exists() else None
    rows = fused_targets(records) + attention_targets(records) + end_to_end_targets(records) + host_targets(host)
    print(f"issue 17 targets from {path}{'' if path.exists() else ' (missing)'}")
    for name, value, bound, verdict in rows:
        shown = "-" if value is None else f"{value:.3g}"
        label = "UNMEASURED" if verdict is None else ("pass" if verdict else "FAIL")
        print(f"  {label:10s} {name:62s} {shown:>8s}  (target {bound})")
    counts = {k: sum(1 for *_, v in rows if v is k) for k in (True, False, None)}
    print(f"{counts[True]} pass, {counts[False]} fail, {counts[None]} unmeasured")
    return 1 if args.strict and counts[False] else 0


if __name__ == "__main__":
    sys.exit(main())
