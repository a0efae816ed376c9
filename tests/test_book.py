"""Static checks of the book's chapters, without executing them.

The chapters are executed by the strict book build (`make book`: every cell runs, any error
or warning fails it), so they are not run a second time here. These tests catch, in seconds,
what would otherwise surface only in that build: a chapter that is not a python3 notebook,
a citation key missing from references.bib, a `literalinclude` of a function that no
longer exists, a chapter without a numbered equation, a ledger check or a closing summary,
or one that checks its claims with bare asserts instead of the ledger.
"""

import ast
import re
from pathlib import Path

import jupytext
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _toc_files(node) -> list[str]:
    files = []
    if isinstance(node, dict):
        if "file" in node:
            files.append(node["file"])
        for value in node.values():
            files.extend(_toc_files(value))
    elif isinstance(node, list):
        for item in node:
            files.extend(_toc_files(item))
    return files


TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
PAGES = [f for f in _toc_files(TOC) if "apidocs" not in f]
CHAPTERS = [f for f in PAGES if "/part" in f]
BIB_KEYS = set(re.findall(r"@\w+\{([^,]+),", (ROOT / "book" / "references.bib").read_text()))


def test_toc_lists_the_written_chapters():
    assert TOC["root"] == "book/intro"
    assert CHAPTERS, "no chapters in _toc.yml"
    for page in PAGES + [TOC["root"]]:
        assert (ROOT / f"{page}.md").exists(), f"_toc.yml lists {page} but {page}.md does not exist"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_is_a_checked_notebook(chapter):
    path = ROOT / f"{chapter}.md"
    text = path.read_text()
    nb = jupytext.read(path)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "stepdiff" in code, "a chapter imports the package"
    assert re.search(r"\$\$\s*\([\w-]+\)", text), "a chapter has a numbered, labelled equation"
    assert "{eq}`" in text, "a chapter refers to its equations"
    assert re.search(r"^#+ What to remember", text, re.M), "a chapter ends with what to remember"


#: Bare asserts a chapter may keep for plumbing (a shape, a file that must exist): a claim is
#: checked with ``ledger.check``, so that it gets a row on the page "What this book verifies".
MAX_BARE_ASSERTS = 5


def _bare_asserts(code: str) -> int:
    try:
        return sum(isinstance(node, ast.Assert) for node in ast.walk(ast.parse(code)))
    except SyntaxError:  # IPython magics: count the statements by their look
        return len(re.findall(r"^\s*assert\b", code, re.M))


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_checks_its_claims_through_the_ledger(chapter):
    nb = jupytext.read(ROOT / f"{chapter}.md")
    cells = [c.source for c in nb.cells if c.cell_type == "code"]
    code = "\n".join(cells)
    assert re.search(r"\bledger\.check\(|^from stepdiff\.ledger import .*\bcheck\b", code, re.M), (
        f"{chapter}: a chapter checks its claims with ledger.check (from stepdiff import ledger)"
    )
    bare = sum(_bare_asserts(c) for c in cells)
    assert bare <= MAX_BARE_ASSERTS, (
        f"{chapter}: {bare} bare asserts; a claim is checked with ledger.check(statement, value, bound...), "
        f"and at most {MAX_BARE_ASSERTS} asserts may remain for plumbing"
    )


@pytest.mark.parametrize("page", PAGES + [TOC["root"]])
def test_citations_exist(page):
    text = (ROOT / f"{page}.md").read_text()
    keys = {k.strip() for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", text) for k in group.split(",")}
    missing = keys - BIB_KEYS
    assert not missing, f"{page} cites keys missing from book/references.bib: {sorted(missing)}"


def _defined_names(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names.update(
                    f"{node.name}.{m.name}" for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))
                )
    return names


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_literalincludes_point_at_real_code(chapter):
    path = ROOT / f"{chapter}.md"
    text = path.read_text()
    for match in re.finditer(r"```\{literalinclude\}\s+(\S+)\n((?::[^\n]*\n)*)", text):
        target = (path.parent / match.group(1)).resolve()
        assert target.exists(), f"{chapter}: literalinclude of a missing file {match.group(1)}"
        obj = re.search(r":pyobject:\s*(\S+)", match.group(2))
        if obj:
            assert obj.group(1) in _defined_names(target.read_text()), (
                f"{chapter}: {match.group(1)} defines no {obj.group(1)}"
            )


@pytest.mark.parametrize("page", ["README.md", "book/intro.md"])
def test_the_quick_start_examples_run(page):
    """The Python examples shown to a new user (README, introduction) run as printed."""
    text = (ROOT / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, f"{page} has no python example"
    for block in blocks:
        scope: dict = {}
        exec(compile(block, page, "exec"), scope)
        if "x0" in scope:
            assert scope["x0"].shape == (1000, 2)


def test_the_intro_says_which_chapters_are_written():
    """The intro's map marks a chapter 'written' exactly when the table of contents lists it."""
    roman = {"I": 1, "II": 2, "III": 3, "IV": 4}
    intro = (ROOT / "book" / "intro.md").read_text()
    rows = re.findall(r"^\| (I{1,3}|IV) \| (\d+)\. [^|]*\|[^|]*\| (\w+) \|$", intro, re.M)
    assert rows, "the intro's map of the book has no status column"
    listed = {(int(m.group(1)), int(m.group(2))) for c in CHAPTERS if (m := re.match(r"book/part(\d+)/(\d+)_", c))}
    for part, number, status in rows:
        key = (roman[part], int(number))
        assert status in ("written", "coming"), f"part {part}, chapter {number}: status {status!r}"
        assert (status == "written") == (key in listed), (
            f"the intro says part {part}, chapter {number} is {status}, but _toc.yml "
            f"{'does not list' if status == 'written' else 'lists'} it"
        )
    assert listed <= {(roman[p], int(n)) for p, n, _ in rows}, "a chapter in _toc.yml is missing from the intro's map"


def test_references_bib_parses_entry_by_entry():
    """The bibliography is read by a BibTeX parser as the build reads it (an unclosed entry swallows the
    next ones, or stops the build), and every ``@type{key,`` the regex above finds is an entry."""
    database = pytest.importorskip("pybtex.database")
    entries = database.parse_file(str(ROOT / "book" / "references.bib")).entries
    assert set(entries) == BIB_KEYS
