"""benchmarks/bench_end_to_end.py runs on a CPU at a tiny size (--smoke): every case and implementation
of the GPU benchmark goes through the same code, the records are complete and the samples of
every implementation agree. Its timings are not checked: on a CPU they measure nothing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from conftest import threads_kept

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_end_to_end", ROOT / "benchmarks" / "bench_end_to_end.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run(tmp_path, capsys):
    bench = _load()
    with threads_kept():
        assert bench.main(["--smoke", "--out", str(tmp_path / "results.json")]) == 0
    out = capsys.readouterr().out
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    got = {(r["kernel"], r["impl"]) for r in records}
    assert got == {("e2e-unet-ddpm-cifar", impl) for impl in ("eager", "compile", "fast", "fast-nograph")} | {
        ("e2e-dit-B/2-1024", "eager"), ("e2e-dit-B/2-1024", "fast")}
    for r in records:
        assert r["smoke"] and r["steps"] == 3 and r["img_per_s"] > 0 and r["shape"][0] == 2
        if r["impl"] != "eager":
            # float32 on the CPU: the fast path (reference kernels) and torch.compile compute the
            # eager samples up to float32 rounding; a wrong step or a wrong weight is far off.
            assert r["rel_diff_vs_eager"] < 1e-4, r
        if r["impl"].startswith("fast"):
            assert r["vs_eager"] > 0
    assert "smoke run: no verdicts" in out and "pass" not in out and "FAIL" not in out
