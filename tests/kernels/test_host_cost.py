"""benchmarks/host_cost.py runs on a machine without a GPU and checks the launch path.

The script compiles the kernels for an H100 through the stand-in driver of
tools/gpu_compile_check.py, and before it times anything it runs every case twice, once through
Triton's own launch path and once through the package's plan, and fails unless both hand the
launcher the same grid, stream, kernel and arguments. This test runs it with few calls and
checks that it finished and wrote a record per case. It asserts no timing: a shared CI machine's
timings are not the project's figure (the script's results file and benchmarks/NOTES.md are).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
triton = pytest.importorskip("triton")
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@pytest.mark.skipif(not (BIN / "ptxas").exists(), reason="Triton's NVIDIA backend is not installed")
def test_host_cost_script_runs_and_verifies_the_plans(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "host_cost.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "host_cost.py"), "--calls", "20", "--repeats", "2",
         "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    plans = [r for r in report["records"] if r["path"] == "plan"]
    functions = {r["function"].split(" (")[0] for r in plans}
    assert functions == {"affine_step", "noise_add", "affine_step_triton", "attention forward",
                         "attention forward + backward"}
    assert len(plans) == 7
    for r in report["records"]:
        assert r["min_cpu_us"] > 0 and r["launches_per_call"] >= 1
    assert report["triton"] == triton.__version__ and report["redirected"]
