"""Run book chapters as notebooks, outside the book build, and report time and output.

    python tools/run_chapter.py book/part1/01_fundamentals.md [more.md ...] [--quiet]

Each chapter is read as the notebook a reader downloads (the set-up cells first, as
``tools/notebooks.py`` and the book build do) and executed with nbclient in a fresh kernel,
in an empty temporary directory (as ``make book`` runs it: a path relative to the repository
fails here too), with the kernel named in its header. Exit status 1 if any cell fails. Handy
while writing a chapter; the book build itself is `make book`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import nbclient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book" / "_ext"))

from chapter_notebooks import book_settings, read_chapter  # noqa: E402


def run(path: Path, quiet: bool) -> bool:
    settings = book_settings(ROOT)
    nb = read_chapter(path, settings["repository_url"], settings["branch"], settings["extensions"])
    start = time.perf_counter()
    ok = True
    with tempfile.TemporaryDirectory(prefix="stepdiff-chapter-") as cwd:
        client = nbclient.NotebookClient(
            nb, timeout=600, kernel_name=nb.metadata.get("kernelspec", {}).get("name", "python3"),
            resources={"metadata": {"path": cwd}},
        )
        try:
            client.execute(cwd=cwd)
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
