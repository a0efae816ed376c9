"""The chapters as the notebooks a reader downloads: write them, or run them as a reader would.

    python tools/notebooks.py write [OUT]       # every chapter as .ipynb (no outputs), OUT/<doc>.ipynb
    python tools/notebooks.py execute [--jobs N] [--timeout S] [--cache DIR] [CHAPTER ...]

Both go over the chapters of ``_toc.yml`` (pages under ``book/part*``), or the chapters
named, and build each notebook with the book's own reader (``book/_ext/chapter_notebooks.py``:
the chapter's cells after the two set-up cells that install ``stepdiff`` on a hosted service).

``execute`` is the notebook test and the book's execution in one run. Each chapter runs
top to bottom in a fresh kernel whose working directory is a new empty folder outside the
repository (so a chapter that reads a file by a path relative to the repository fails
here), with ``N`` kernels at a time (default 2) and the CPU's threads shared between them.
Every chapter is tried; a failing cell's traceback is printed and the exit status is 1.
The executed notebooks go into the jupyter-cache at ``--cache`` (default
``_build/.jupyter_cache``, emptied first when all chapters are run), where ``make book``
renders them from (``STEPDIFF_PREEXECUTED=1``), and a table of wall and CPU time per chapter
is printed and written to ``_build/notebook-times.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book" / "_ext"))

from chapter_notebooks import book_settings, read_chapter  # noqa: E402


def _notebooks(chapters: list[str]) -> dict[str, nbformat.NotebookNode]:
    settings = book_settings(ROOT)
    docs = chapters or settings["chapters"]
    out = {}
    for doc in docs:
        doc = str(Path(doc).with_suffix("")) if doc.endswith(".md") else doc
        doc = Path(doc).resolve().relative_to(ROOT).as_posix() if Path(doc).is_absolute() else doc
        out[doc] = read_chapter(
            ROOT / f"{doc}.md", settings["repository_url"], settings["branch"], settings["extensions"]
        )
    return out


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write(out: Path, chapters: list[str]) -> int:
    for doc, nb in _notebooks(chapters).items():
        nb.metadata.pop("source_map", None)
        target = out / f"{doc}.ipynb"
        _write_atomic(target, nbformat.writes(nb))
        print(target)
    return 0


def _run(doc: str, nb_json: str, timeout: int, threads: int) -> dict:
    """Run one chapter in a fresh kernel in an empty directory outside the repository."""
    import nbclient

    nb = nbformat.reads(nb_json, as_version=4)
    kernelspec = dict(nb.metadata.get("kernelspec", {}))
    env_threads = {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k not in os.environ}
    os.environ.update(env_threads)
    # A reader's kernel does not see this repository on its path: only the installed package.
    os.environ.pop("PYTHONPATH", None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    error = None
    with tempfile.TemporaryDirectory(prefix="stepdiff-notebook-") as cwd:
        client = nbclient.NotebookClient(
            nb,
            timeout=timeout,
            kernel_name=nb.metadata.get("kernelspec", {}).get("name", "python3"),
            resources={"metadata": {"path": cwd}},
            record_timing=False,  # cell metadata is hashed by jupyter-cache: leave it as the chapter has it
        )
        try:
            client.execute(cwd=cwd)
        except nbclient.exceptions.CellExecutionError as err:
            error = str(err)
        except Exception as err:  # a kernel that died, a timeout: report it as this chapter's failure
            error = f"{type(err).__name__}: {err}"
    wall = time.perf_counter() - start
    # The kernel rewrites kernelspec (its display name): keep the chapter's, which jupyter-cache
    # hashes, so that the book build finds this run, and which a reader's Jupyter resolves.
    nb.metadata["kernelspec"] = kernelspec
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"doc": doc, "notebook": nbformat.writes(nb), "error": error, "wall_s": wall, "cpu_s": cpu}


def execute(chapters: list[str], jobs: int, timeout: int, cache_dir: Path) -> int:
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    notebooks = _notebooks(chapters)
    if not chapters and cache_dir.exists():
        shutil.rmtree(cache_dir)  # every chapter is run: nothing stale may remain
    cache = get_cache(cache_dir)
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    print(f"executing {len(notebooks)} chapter(s), {jobs} kernel(s) at a time, {threads} thread(s) each", flush=True)
    start = time.perf_counter()
    results = []
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_run, doc, nbformat.writes(nb), timeout, threads) for doc, nb in notebooks.items()]
        for future in as_completed(futures):
            r = future.result()
            results.append(r)
            status = "ok" if r["error"] is None else "FAILED"
            print(f"{status:6s} {r['doc']}  {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU", flush=True)
            if r["error"] is None:
                nb = nbformat.reads(r["notebook"], as_version=4)
                cache.cache_notebook_bundle(
                    CacheBundleIn(nb, uri=str(ROOT / f"{r['doc']}.md"), data={"execution_seconds": r["wall_s"]}),
                    check_validity=False,
                    overwrite=True,
                )
    total = time.perf_counter() - start
    failed = [r for r in results if r["error"] is not None]
    for r in failed:
        print(f"\n===== {r['doc']} failed (run as a downloaded notebook: fresh kernel, empty working directory) =====")
        print(r["error"])
    times = {
        "jobs": jobs,
        "threads_per_kernel": threads,
        "wall_s": round(total, 1),
        "cpu_s": round(sum(r["cpu_s"] for r in results), 1),
        "chapters": {
            r["doc"]: {"wall_s": round(r["wall_s"], 1), "cpu_s": round(r["cpu_s"], 1), "ok": r["error"] is None}
            for r in sorted(results, key=lambda r: r["doc"])
        },
    }
    _write_atomic(ROOT / "_build" / "notebook-times.json", json.dumps(times, indent=1) + "\n")
    print(
        f"{len(results) - len(failed)} of {len(results)} chapter(s) ran without error in {total:.0f} s "
        f"({times['cpu_s']:.0f} s CPU in the kernels)"
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write every chapter as a notebook without outputs")
    w.add_argument("out", nargs="?", default=str(ROOT / "_build" / "notebooks"))
    w.add_argument("chapters", nargs="*")
    e = sub.add_parser("execute", help="run every chapter as a downloaded notebook, into the book's cache")
    e.add_argument("chapters", nargs="*", help="chapter files or docnames (default: every chapter in _toc.yml)")
    e.add_argument("--jobs", type=int, default=int(os.environ.get("JOBS", "2")))
    e.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    e.add_argument("--cache", default=str(ROOT / "_build" / ".jupyter_cache"))
    args = parser.parse_args(argv)
    if args.command == "write":
        return write(Path(args.out), args.chapters)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    return execute(args.chapters, args.jobs, args.timeout, Path(args.cache))


if __name__ == "__main__":
    sys.exit(main())
