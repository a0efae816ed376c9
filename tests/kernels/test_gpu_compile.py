"""The Triton kernels compile for an H100 (sm_90), checked on a machine without a GPU.

The interpreter that runs the other kernel tests never compiles anything, so a kernel could
pass them and still fail to compile for a GPU, or compile into code without tensor cores or
with register spills. `tools/gpu_compile_check.py` compiles the package's real launches for
sm_90 through PTX to machine code with a stand-in driver that launches nothing; this test runs
it (in a subprocess: the interpreter must be off there) on a representative set and checks the
machine code: everything compiles (attention also in its key-padding variant, ``kv_lens``; the
GroupNorm+SiLU and adaLN kernels forward and backward), half-precision attention uses Hopper's
warpgroup MMA, the fused kernels move data in 128-bit loads and stores, and nothing spills.

Not asserted, because it is not true yet: at head dimension 72 (DiT) a row is 72 elements, a
stride Triton cannot prove divisible by 16, so its loads are not vectorized and most candidates
spill a few dozen bytes (head dimension 80, checked here, does not). `python
tools/gpu_compile_check.py --all-configs` prints the whole table.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stepdiff.kernels.attention_triton import configs_for

ROOT = Path(__file__).resolve().parents[2]
triton = pytest.importorskip("triton")
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@pytest.mark.skipif(not (BIN / "cuobjdump").exists(), reason="Triton's NVIDIA backend is not installed")
def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "records.json"
    runs = [
        ["--dtypes", "float16,bfloat16", "--head-dims", "128"],  # fused kernels, first candidates
        ["--dtypes", "float16", "--head-dims", "80", "--no-fused", "--all-configs"],  # every candidate
        ["--dtypes", "float32", "--head-dims", "40", "--no-fused"],  # fp32 attention, exact dots
    ]
    records = []
    for extra in runs:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "gpu_compile_check.py"), "--json", str(out), *extra],
            env=env, capture_output=True, text=True, timeout=900,
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        records += json.loads(out.read_text())["records"]
    assert all(r["ok"] for r in records)
    fused = [r for r in records if r["family"] == "fused"]
    norm = [r for r in records if r["family"] == "norm"]
    attention = [r for r in records if r["family"] == "attention"]
    candidates = sum(len(configs_for(which, 128)) for which in ("fwd", "dkdv", "dq"))
    # Every attention launch is compiled without and with kv_lens (key padding).
    assert len(fused) == 10 and len(norm) == 10 and len(attention) == 2 * (2 * 3 + candidates + 3)
    assert sum(r["kv_lens"] for r in attention) == len(attention) // 2
    for r in fused:
        assert r["spill_bytes"] == 0, r
        if r["dtype"] == "torch.float32":
            # 4 floats per thread and run: 128-bit vectors. In fp16/bf16 the default tile gives
            # each thread 4 elements per run (64-bit loads), which an H100 measured faster
            # than 8 per thread with 128-bit loads (launch_config's docstring).
            assert r["vector_loads_128"] > 0, r
    for r in norm:
        assert r["spill_bytes"] == 0, r
    for r in attention:
        if r["dtype"] in ("torch.float16", "torch.bfloat16"):
            assert r["hgmma"] > 0, r  # tensor cores, in Hopper's warpgroup form
            assert r["spill_bytes"] == 0, r
