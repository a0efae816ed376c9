"""Run book chapters as notebooks, outside the book build, and report time and output.

    python tools/run_chapter.py book/part1/01_fundamentals.md [more.md ...] [--quiet]

Each chapter is converted with jupytext and executed with nbclient in its own directory
(as the book build does), with the kernel named in its header. Exit status 1 if any cell
fails. Handy while writing a chapter; the book build itself is `make book`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jupytext
import nbclient


def run(path: Path, quiet: bool) -> bool:
    nb = jupytext.read(path)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    start = time.perf_counter()
    ok = True
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        ok = False
        print(f"FAILED {path}:\n{err}")
    elapsed = time.perf_counter() - start
    if not quiet:
        for cell in nb.cells:
            for out in cell.get("outputs", []):
                if out.get("name") == "stdout":
                    print(out["text"], end="")
    print(f"{'ok' if ok else 'FAILED'}  {path}  {elapsed:.1f} s")
    return ok


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    quiet = "--quiet" in sys.argv
    results = [run(Path(a), quiet) for a in args]
    sys.exit(0 if all(results) else 1)
