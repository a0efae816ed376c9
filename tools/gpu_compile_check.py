"""Compile the package's Triton kernels for an NVIDIA GPU, on a machine without one.

    python tools/gpu_compile_check.py                 # a representative set, a few minutes
    python tools/gpu_compile_check.py --all-configs   # every autotuning configuration
    python tools/gpu_compile_check.py --json out.json

Triton's interpreter runs the kernels on the CPU but never compiles them, so a kernel can pass
every CPU test and still fail to compile for a GPU (an unsupported cast, a bf16 dot, a layout
the MMA lowering refuses), or compile into something slow (register spills, no tensor cores).
This script drives the package's real launchers through a stand-in driver that reports an
H100 (sm_90, 132 SMs, 227 KiB of shared memory per block) and launches nothing: Triton
compiles each kernel exactly as it would on that GPU, through PTX to a cubin, with the
specializations the launcher's arguments produce. For every compiled kernel it reports the
registers, the spills and the shared memory from the cubin's resource usage, and whether the
machine code uses Hopper's warpgroup MMA (HGMMA) or older MMA (HMMA) instructions.

It runs in its own process: Triton's interpreter (TRITON_INTERPRET=1, which the test suite
sets on machines without a GPU) must be off before the kernel modules are imported. Nothing
here is a timing: performance can only be measured on a GPU (benchmarks/).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

H100 = {"arch": 90, "warp_size": 32, "max_shared_mem": 232448, "multiprocessor_count": 132}
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


class _Launcher:
    """Stands in for the CUDA launcher: launches nothing. When ``FakeH100Driver.launches`` is a
    list (``benchmarks/host_cost.py`` sets one), each call appends ``(kernel name, arguments)``:
    everything the launcher was given, grid, stream and kernel arguments included."""

    launches: list | None = None

    def __init__(self, src, metadata):
        self.metadata = metadata
        self.name = metadata.name

    def __call__(self, *args, **kwargs):
        if _Launcher.launches is not None:
            _Launcher.launches.append((self.name, args))
        return None


class _Utils:
    def __init__(self, sink: list):
        self.sink = sink

    def get_device_properties(self, device):
        return {"max_shared_mem": H100["max_shared_mem"], "multiprocessor_count": H100["multiprocessor_count"],
                "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 0, "mem_clock_rate": 0, "mem_bus_width": 0}

    def load_binary(self, name, cubin, shared, device):
        """Read the resources from the cubin instead of loading it on a device."""
        self.sink.append(_inspect_cubin(name, cubin, shared))
        return 0, 0, self.sink[-1]["registers"], self.sink[-1]["spill_bytes"], 1024


class FakeH100Driver:
    """The few driver calls Triton makes to compile and launch, answered as an H100 would."""

    def __init__(self):
        self.compiled: list[dict] = []
        self.utils = _Utils(self.compiled)
        self.launcher_cls = _Launcher

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        return None

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", H100["arch"], H100["warp_size"])

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("no GPU: pass an explicit configuration instead of autotuning")


def _inspect_cubin(name: str, cubin: bytes, shared: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([BIN / "cuobjdump", "-res-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([BIN / "cuobjdump", "-sass", path], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return {
        "kernel": name,
        "registers": int(regs.group(1)) if regs else -1,
        # Registers that do not fit spill to the thread's stack frame (local memory); a Triton
        # kernel has no other use for a stack, so its size is the spill.
        "spill_bytes": int(stack.group(1)) if stack else 0,
        "shared_bytes": shared,
        "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
        "hmma": len(re.findall(r"\bHMMA\b", sass)),
        "vector_loads_128": len(re.findall(r"\bLDG\.E\.128\b", sass)),
    }


def _install() -> FakeH100Driver:
    fake = FakeH100Driver()
    driver.set_active(fake)
    return fake


def _cpu_tensor(shape, dtype):
    return torch.randn(shape, dtype=torch.float32).to(dtype)


def check_fused(fake: FakeH100Driver, dtypes) -> list[dict]:
    """Every specialization the package's samplers and training produce, in each dtype."""
    from stepdiff.kernels import fused_triton as F

    F._check_device = lambda x: None  # CPU tensors stand in for device memory; nothing runs
    records = []
    # Batch-first, the size of a small latent batch: sizes that are multiples of 16 elements let
    # Triton prove the tail mask uniform over 128-bit vectors (an odd size compiles too, unvectorized).
    shape = (6, 4, 24, 24)
    B = shape[0]
    for dtype in dtypes:
        x, pred = _cpu_tensor(shape, dtype), _cpu_tensor(shape, dtype)
        per_sample = torch.rand(B)
        seed_tensor = torch.tensor([3, 0], dtype=torch.int64)
        c9, c1, c2 = torch.tensor(0.9), torch.tensor(0.1), torch.tensor(0.2)
        variants = {
            "affine_step: scalar coefficients, no noise": partial(F.affine_step_triton, x, pred, 0.9, 0.1),
            "affine_step: per-sample coefficients, noise, clamp": partial(
                F.affine_step_triton, x, pred, per_sample, per_sample, per_sample, seed=3, clamp=1.0),
            "affine_step: 0-d device coefficients, seed in memory": partial(
                F.affine_step_triton, x, pred, c9, c1, c2, seed=seed_tensor),
            "noise_add: eps target, in-kernel noise": partial(F.noise_add_triton, x, per_sample, per_sample, seed=5),
            "noise_add: v target, given noise": partial(
                F.noise_add_triton, x, per_sample, per_sample, -per_sample, per_sample, noise=pred),
        }
        for label, launch in variants.items():
            records += _compile(fake, launch, {"family": "fused", "variant": label, "dtype": str(dtype)})
    return records


def check_norm(fake: FakeH100Driver, dtypes) -> list[dict]:
    """GroupNorm+SiLU (NCHW and channels-last) and adaLN modulate, forward and backward, at the
    UNet's and the DiT's sizes."""
    from stepdiff.kernels import norm_triton as N

    records = []
    for dtype in dtypes:
        x = _cpu_tensor((2, 128, 16, 16), dtype)
        w, b = torch.ones(128), torch.zeros(128)
        mean, rstd = torch.zeros(2, 32), torch.ones(2, 32)
        t = _cpu_tensor((2, 256, 768), dtype)
        shift, scale = _cpu_tensor((2, 768), dtype), _cpu_tensor((2, 768), dtype)
        row_stats = torch.zeros(2, 256)
        variants = {
            "group_norm_silu forward (NCHW)": (partial(N.group_norm_silu_forward, x, 32, w, b, 1e-5), "_gn_silu_fwd"),
            "group_norm_silu forward (channels-last)": (partial(
                N.group_norm_silu_forward, x.to(memory_format=torch.channels_last), 32, w, b, 1e-5), "_gn_silu_fwd"),
            "group_norm_silu backward (NCHW)": (partial(
                N.group_norm_silu_backward, x.clone(), x, 32, w, b, mean, rstd), "_gn_silu_bwd"),
            "adaln_modulate forward (D 768)": (partial(N.adaln_forward, t, shift, scale, 1e-6), "_adaln_fwd"),
            "adaln_modulate backward (D 768)": (partial(N.adaln_backward, t.clone(), t, scale, row_stats, row_stats),
                                                "_adaln_bwd"),
        }
        for label, (launch, kernel) in variants.items():
            records += _compile(fake, launch, {"family": "norm", "variant": label, "dtype": str(dtype)}, keep=kernel)
    return records


def check_attention(fake: FakeH100Driver, dtypes, head_dims, all_configs: bool) -> list[dict]:
    """Forward and backward for each dtype and head dim, with and without ``kv_lens``: every
    autotuning candidate the GPU would try (``all_configs``), or the first."""
    from stepdiff.kernels import attention_triton as A

    records = []
    for dtype in dtypes:
        for D in head_dims:
            q, k, v = (_cpu_tensor((2, 2, 130, D), dtype) for _ in range(3))
            block_d = max(16, triton.next_power_of_2(D))
            for which in ("fwd", "dkdv", "dq"):
                candidates = A.configs_for(which, block_d)
                chosen = candidates if all_configs else candidates[:1]
                # Each launch compiles twice: without key padding, and with kv_lens (the
                # variant that reads each batch's key count from memory).
                for cfg, lens in ((c, lens) for c in chosen for lens in (None, torch.tensor([130, 77]))):
                    base = {"family": "attention", "variant": which + (" kv_lens" if lens is not None else ""),
                            "dtype": str(dtype), "head_dim": D, "kv_lens": lens is not None, **cfg}
                    if which == "fwd":
                        launch = partial(A.attention_forward, q, k, v, D**-0.5, False, config=cfg, kv_lens=lens)
                    else:
                        other = A._INTERP_DQ if which == "dkdv" else A._INTERP_DKDV
                        configs = (cfg, other) if which == "dkdv" else (other, cfg)
                        o, lse = q.clone(), torch.zeros(2, 2, 130)
                        launch = partial(A.attention_backward, q.clone(), q, k, v, o, lse, D**-0.5, False,
                                         configs=configs, kv_lens=lens)
                    records += _compile(fake, launch, base, keep=A._attn_fwd.fn.__name__ if which == "fwd"
                                        else ("_attn_bwd_dkdv" if which == "dkdv" else "_attn_bwd_dq"))
    return records


def _compile(fake: FakeH100Driver, launch, base: dict, keep: str | None = None) -> list[dict]:
    start, t0 = len(fake.compiled), time.perf_counter()
    try:
        launch()
    except Exception as error:  # report every failure, then fail at the end
        return [{**base, "ok": False, "error": f"{type(error).__name__}: {str(error)[:400]}"}]
    seconds = time.perf_counter() - t0
    new = [r for r in fake.compiled[start:] if keep is None or r["kernel"] == keep]
    return [{**base, **r, "ok": True, "seconds": round(seconds, 2)} for r in new]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all-configs", action="store_true", help="every autotuning configuration")
    parser.add_argument("--head-dims", default="40,64,72,128,160,256")
    parser.add_argument("--dtypes", default="float32,float16,bfloat16")
    parser.add_argument("--no-fused", action="store_true", help="attention only (no fused or norm kernels)")
    parser.add_argument("--json", type=Path, help="write the records here")
    args = parser.parse_args(argv)
    fake = _install()
    dtypes = tuple(getattr(torch, name) for name in args.dtypes.split(","))
    head_dims = [int(d) for d in args.head_dims.split(",") if d]
    records = [] if args.no_fused else check_fused(fake, dtypes) + check_norm(fake, dtypes)
    records += check_attention(fake, dtypes, head_dims, args.all_configs)
    failed = [r for r in records if not r["ok"]]
    for r in records:
        if r["ok"]:
            cfg = f" {r.get('BLOCK_M', '')}x{r.get('BLOCK_N', '')} w{r.get('num_warps', '')} s{r.get('num_stages', '')}"
            print(f"ok   {r['family']:9s} {r['variant'][:48]:48s} {r['dtype'][6:]:8s} D={r.get('head_dim', '-')!s:3s}"
                  f"{cfg if 'BLOCK_M' in r else '':18s} regs {r['registers']:3d}  spill {r['spill_bytes']:5d} B  "
                  f"smem {r['shared_bytes'] // 1024:3d} KiB  hgmma {r['hgmma']:3d} hmma {r['hmma']:3d}  "
                  f"ldg128 {r['vector_loads_128']:3d}  {r['seconds']:.1f} s")
        else:
            print(f"FAIL {r['family']} {r['variant']} {r['dtype']} {r.get('head_dim', '')}: {r['error']}")
    print(f"{len(records) - len(failed)} compiled for sm_{H100['arch']} with Triton {triton.__version__}, "
          f"{len(failed)} failed")
    if args.json:
        report = {"triton": triton.__version__, "target": "sm_90", "records": records}
        args.json.write_text(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
