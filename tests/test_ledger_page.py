"""The page "What this book verifies" (``book/_ext/ledger.py``): rows found, table built, build failed.

The extension is exercised on a small Sphinx project built here in a temporary directory, in
seconds: its chapters carry ledger rows as raw HTML written by :mod:`stepdiff.ledger` itself
(as myst-nb renders a cell's output), so the contract between the helper and the page is tested
end to end without executing a notebook. The tutorial's list of numbered statements that the
book must cover is committed beside the extension; it is compared here with the tutorial notes
when those are present next to the repository.
"""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
import yaml
from docutils import nodes

from stepdiff import ledger

ROOT = Path(__file__).resolve().parents[1]
EXT = ROOT / "book" / "_ext"
sys.path.insert(0, str(EXT))
import ledger as ledger_page  # noqa: E402  (the Sphinx extension, not stepdiff.ledger)

sys.path.remove(str(EXT))

NOTES = ROOT.parent / "shared" / "notes" / "tutorial.md"
EXPECTED = (
    ["Fact 1", "Definition 1", "Algorithm 1", "Algorithm 2"]
    + [f"Claim {i}" for i in range(1, 6)]
    + [f"Lemma {i}" for i in range(1, 5)]
    + [f"Pseudocode {i}" for i in range(1, 8)]
)


def _row(statement: str, result: str = "passed", label: str | None = None, **kw) -> ledger.Row:
    defaults = {"value": "1", "bound": "< 2", "number": 1.0}
    defaults.update(kw)
    return ledger.Row(statement, label, result=result, **defaults)


# --- the tutorial's list -------------------------------------------------------------------------


def test_the_committed_list_holds_the_tutorials_numbered_statements():
    statements = ledger_page.read_statements(ledger_page.STATEMENTS_FILE)
    labels = [label for label, _, _ in statements]
    assert len(labels) == len(set(labels)), "a statement is listed twice"
    assert sorted(labels) == sorted(EXPECTED)


def _inventory(notes: str) -> list[str]:
    """The labels of the inventory table of the notes' section 4, in its order."""
    section = re.search(r"^## 4\..*?$(.*?)^## 5\.", notes, re.S | re.M)
    assert section, "the notes have no section 4 (inventory of numbered objects)"
    labels = []
    for line in section.group(1).splitlines():
        cell = line.split("|")[1].strip() if line.startswith("|") else ""
        m = re.match(r"(Fact|Definition|Algorithm|Claim|Lemma|Pseudocode) (\d+)\b", cell)
        if m:
            labels.append(f"{m.group(1)} {m.group(2)}")
    return labels


@pytest.mark.skipif(not NOTES.exists(), reason=f"the tutorial notes are not next to the repository ({NOTES.name})")
def test_the_committed_list_matches_the_tutorial_notes():
    """CI has no notes directory; where the notes exist, the committed list must equal their inventory."""
    listed = [label for label, _, _ in ledger_page.read_statements(ledger_page.STATEMENTS_FILE)]
    assert listed == _inventory(NOTES.read_text(encoding="utf-8"))


def test_a_malformed_list_is_rejected(tmp_path):
    bad = tmp_path / "list.txt"
    bad.write_text("# comment\nClaim 1 | only a title\n", encoding="utf-8")
    with pytest.raises(ValueError, match="list.txt:2"):
        ledger_page.read_statements(bad)


# --- rows found in a doctree, statements classified --------------------------------------------------


def test_rows_written_by_the_helper_are_found_with_their_section():
    doc = nodes.document(None, None)
    chapter = nodes.section(ids=["chapter"])
    chapter += nodes.title("", "Chapter")
    sub = nodes.section(ids=["the-check", "sec-check"])
    sub += nodes.title("", "The check")
    curve = {"curve": [0.5, 0.25, 0.125], "seed": 3}
    sub += nodes.raw("", ledger._html(_row("a curve falls", label="Lemma 1", extra=curve)), format="html")
    sub += nodes.raw("", "<div>an unrelated output</div>", format="html")
    chapter += nodes.raw("", ledger._html(_row("x < 2 & y > 1", "stated", label="Definition 1")), format="html")
    chapter += sub
    doc += chapter
    rows = ledger_page.rows_in(doc)
    assert [r["statement"] for r in rows] == ["x < 2 & y > 1", "a curve falls"]  # escaping undone
    assert rows[0]["section_id"] == "" and rows[0]["section"] == "Chapter"  # the chapter's top
    assert rows[1]["section_id"] == "the-check" and rows[1]["section"] == "The check"
    assert rows[1]["extra"] == curve and rows[1]["label"] == "Lemma 1"
    assert ledger_page.summarize_extra(rows[1]["extra"]) == "curve: 3 values; seed = 3"


def test_statements_are_classified_by_their_rows():
    statements = [("Claim 1", "t", "w"), ("Claim 2", "t", "w"), ("Claim 3", "t", "w"), ("Claim 4", "t", "w")]
    rows = [
        {"label": "Claim 1", "result": "passed"},
        {"label": "Claim 1", "result": "stated"},
        {"label": "Claim 2", "result": "stated"},
        {"label": "Claim 3", "result": "measured"},
        {"label": None, "result": "passed"},
    ]
    assert ledger_page.classify(statements, rows) == {
        "Claim 1": "checked",
        "Claim 2": "stated only",
        "Claim 3": "stated only",
        "Claim 4": "not covered",
    }


# --- a whole (small) Sphinx build --------------------------------------------------------------------


def _project(tmp_path: Path, chapter_rows: list[ledger.Row]) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "conf.py").write_text(
        f"import sys\nsys.path.insert(0, {str(EXT)!r})\nextensions = ['ledger']\n"
        "ledger_statements_file = 'statements.txt'\nroot_doc = 'index'\n",
        encoding="utf-8",
    )
    (src / "statements.txt").write_text("Claim 1 | one | §1\nClaim 2 | two | §2\n", encoding="utf-8")
    (src / "index.rst").write_text("Book\n====\n\n.. toctree::\n\n   chapter\n   verified\n", encoding="utf-8")
    raw = "\n".join("   " + ledger._html(r) for r in chapter_rows)
    (src / "chapter.rst").write_text(
        f"The chapter\n===========\n\nChecks\n------\n\n.. raw:: html\n\n{raw}\n", encoding="utf-8"
    )
    (src / "verified.rst").write_text("What is verified\n================\n\n.. ledger-table::\n", encoding="utf-8")
    return src


def _build(src: Path, parallel: int = 0) -> tuple[str, str]:
    from sphinx.application import Sphinx
    from sphinx.util.docutils import docutils_namespace

    out, warnings = src.parent / "out", io.StringIO()
    with docutils_namespace():  # each build registers its nodes and directives afresh
        app = Sphinx(str(src), str(src), str(out), str(out / ".doctrees"), "html",
                     status=io.StringIO(), warning=warnings, freshenv=True, parallel=parallel)
        app.build(force_all=True)
    return warnings.getvalue(), (out / "verified.html").read_text(encoding="utf-8")


def test_a_complete_ledger_builds_without_warnings_and_links_each_row(tmp_path):
    rows = [_row("one holds", label="Claim 1"), _row("two is stated", "stated", label="Claim 2", bound="a definition")]
    warnings, page = _build(_project(tmp_path, rows))
    assert "ledger" not in warnings, warnings
    assert "Of the tutorial" in page and "2 numbered statements, 1 is checked, 1 stated only, and 0 not covered" in page
    assert "one holds" in page and "two is stated" in page
    assert 'href="chapter.html#checks"' in page


def test_a_failed_row_fails_the_build(tmp_path):
    rows = [_row("one holds", "failed", label="Claim 1", value="3"), _row("two", "stated", label="Claim 2")]
    warnings, page = _build(_project(tmp_path, rows))
    assert "ledger: a check failed: Claim 1: one holds: measured 3, required < 2" in warnings
    assert "✗ failed" in page


def test_a_statement_without_a_row_fails_the_build(tmp_path):
    warnings, page = _build(_project(tmp_path, [_row("one holds", label="Claim 1")]))
    assert "ledger: 1 of the tutorial's statements has no ledger row in any chapter: Claim 2" in warnings
    assert "1 not covered" in page


def test_rows_read_in_parallel_processes_are_merged(tmp_path):
    """With parallel reading (more than five documents), each process's rows reach the page."""
    src = _project(tmp_path, [_row("one holds", label="Claim 1")])
    names = [f"more{i}" for i in range(6)]
    for i, name in enumerate(names):
        row = ledger._html(_row(f"row of document {i}", label="Claim 2" if i == 5 else None))
        (src / f"{name}.rst").write_text(f"Doc {i}\n=====\n\n.. raw:: html\n\n   {row}\n", encoding="utf-8")
    index = (src / "index.rst").read_text(encoding="utf-8")
    (src / "index.rst").write_text(index + "".join(f"   {n}\n" for n in names), encoding="utf-8")
    warnings, page = _build(src, parallel=2)
    assert "ledger" not in warnings, warnings
    assert all(f"row of document {i}" in page for i in range(6))
    assert "1 is checked, 0 stated only, and 0 not covered" not in page  # both are checked
    assert "2 are checked, 0 stated only, and 0 not covered" in page


# --- the book uses it ---------------------------------------------------------------------------------


def test_the_book_registers_the_extension_and_lists_the_page():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["sphinx"]["local_extensions"].get("ledger") == "book/_ext"
    assert "book/ledger" in (ROOT / "_toc.yml").read_text()
    assert "```{ledger-table}" in (ROOT / "book" / "ledger.md").read_text()
