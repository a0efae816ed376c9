"""Checks on the built website that Sphinx itself does not make.

    python .ci/check_site.py _build/html

For every executed chapter (a page built from a notebook): the page offers its notebook for
download and the notebook exists with outputs; the page shows no traceback; math was
rendered; no absolute machine path leaked into the page. The page "What this book verifies"
exists, shows its tables, and lists no failed check. Exit status 1 on any problem.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

LEAK = re.compile(r"/(?:work|home|root|tmp)/[A-Za-z]")


def check(site: Path) -> list[str]:
    problems = []
    chapters = sorted(p for p in (site / "_sources").rglob("*.ipynb")) if (site / "_sources").exists() else []
    executed = sorted((site.parent / "jupyter_execute").rglob("*.ipynb"))
    if not executed:
        problems.append("no executed notebooks under _build/jupyter_execute")
    for nb_path in executed:
        doc = nb_path.relative_to(site.parent / "jupyter_execute").with_suffix("")
        page = site / doc.with_suffix(".html")
        download = site / "_sources" / doc.with_suffix(".ipynb")
        if not page.exists():
            problems.append(f"{doc}: no page {page}")
            continue
        html = page.read_text(encoding="utf-8")
        if f"_sources/{doc.as_posix()}.ipynb" not in html.replace("../", ""):
            problems.append(f"{doc}: the page does not link its notebook for download")
        if not download.exists():
            problems.append(f"{doc}: the downloadable notebook {download} is missing")
        else:
            nb = json.loads(download.read_text(encoding="utf-8"))
            code = [c for c in nb["cells"] if c["cell_type"] == "code"]
            if code and not any(c.get("outputs") for c in code):
                problems.append(f"{doc}: the downloadable notebook has no outputs")
            errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
            if errors:
                problems.append(f"{doc}: the notebook holds {len(errors)} error output(s)")
        if "Traceback (most recent call last)" in html:
            problems.append(f"{doc}: the page shows a traceback")
        if 'class="math' not in html:
            problems.append(f"{doc}: no rendered math on the page")
        leak = LEAK.search(html)
        if leak:
            problems.append(f"{doc}: absolute path on the page near {html[leak.start():leak.start() + 60]!r}")
    if chapters and len(chapters) < len(executed):
        problems.append(f"{len(executed)} chapters executed but only {len(chapters)} offered for download")
    ledger = site / "book" / "ledger.html"
    if executed and not ledger.exists():
        problems.append("no ledger page book/ledger.html ('What this book verifies')")
    elif executed:
        page = ledger.read_text(encoding="utf-8")
        if "stepdiff-ledger-table" not in page:
            problems.append("the ledger page shows no table of checks")
        if "✗ failed" in page:
            problems.append("the ledger page lists a failed check")
    return problems


if __name__ == "__main__":
    site = Path(sys.argv[1] if len(sys.argv) > 1 else "_build/html")
    found = check(site)
    for p in found:
        print("site check:", p)
    n = len(list((site.parent / "jupyter_execute").rglob("*.ipynb")))
    print(f"site check: {n} executed chapter(s), {len(found)} problem(s)")
    sys.exit(1 if found else 0)
