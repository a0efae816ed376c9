"""Shared plumbing for the benchmarks: environment facts and the results file.

Every benchmark writes its measurements into ``benchmarks/results/<device>.json``::

    {"device": ..., "date": ..., "versions": {...},
     "records": [{"kernel", "impl", "dtype", "shape", "median_ms", "GBps" or "TFLOPs", ...}]}

A later run replaces the records it measures again (same kernel, impl, dtype and shape) and
keeps the others, so the two kernel benchmarks can share one file per device.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import re
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    """The CUDA device's name, e.g. ``NVIDIA H100 80GB HBM3``."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def device_slug(name: str | None = None) -> str:
    """A file-name-safe form of the device name."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", name or device_name()).strip("_")


def environment() -> dict:
    """Device, date and the versions that the numbers depend on."""
    info = {
        "device": device_name(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        },
    }
    try:
        import triton

        info["versions"]["triton"] = triton.__version__
    except ImportError:
        info["versions"]["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["sm_count"] = props.multi_processor_count
        info["memory_GiB"] = round(props.total_memory / 2**30, 1)
    return info


def _key(record: dict) -> tuple:
    return (record["kernel"], record["impl"], record["dtype"], tuple(record["shape"]))


def write_results(records: list[dict], path: Path | None = None) -> Path:
    """Merge ``records`` into the device's results file (replacing re-measured ones)."""
    path = path or RESULTS_DIR / f"{device_slug()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else {"records": []}
    fresh = {_key(r) for r in records}
    kept = [r for r in old.get("records", []) if _key(r) not in fresh]
    data = {**environment(), "records": kept + records}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def print_table(records: list[dict], columns: list[str]) -> None:
    """Print the records as an aligned text table."""
    rows = [[str(r.get(c, "")) if not isinstance(r.get(c), float) else f"{r[c]:.4g}" for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
