"""Offline checks of the built site: links, anchors, images, what the pages show, and the
notebooks the chapters offer. The browser tests (test_browser.py) check what only a browser
can see: rendered math, loaded figures, search.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest
from site_helpers import CHAPTERS, ROOT, SETTINGS, SITE, TOC_PAGES, chapter_notebooks, html_pages, name, page_of, soup

#: Attributes that point at another file of the site.
LINK_ATTRS = {"a": "href", "link": "href", "img": "src", "script": "src", "iframe": "src", "source": "src"}
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.I)  # http:, mailto:, data:, javascript:, //cdn
#: An absolute path of a build machine in what a page shows (a path inside a URL is not matched).
MACHINE_PATH = re.compile(r"(?<![\w/.:~-])/(?:work|home|root|tmp|usr|opt|var|private|Users|mnt|srv)/[\w.-]")
#: A warning or an exception as Python prints it ("UserWarning: ...", "ValueError: ...").
PRINTED_PROBLEM = re.compile(r"\b(?:[A-Z]\w*(?:Warning|Error|Exception)|Traceback \(most recent call last\))\b:?")


def _machine_strings() -> list[str]:
    """This machine's own paths, which must appear nowhere in the site."""
    found = {str(ROOT), str(Path(sys.prefix).resolve()), str(Path.home()), tempfile.gettempdir() + "/"}
    found.add(os.path.realpath(str(ROOT)))
    return sorted(s for s in found if len(s) > 4)


@functools.cache
def _ids(page: Path) -> frozenset[str]:
    doc = soup(page)
    return frozenset(
        {t["id"] for t in doc.find_all(id=True)} | {t["name"] for t in doc.find_all("a", attrs={"name": True})}
    )


def _targets(page: Path):
    """(tag, url) for every reference from ``page`` to a file of the site."""
    for tag, attr in LINK_ATTRS.items():
        for node in soup(page).find_all(tag):
            url = node.get(attr)
            if url is None or EXTERNAL.match(url.strip()):
                continue
            yield tag, url.strip()


def _resolve(page: Path, url: str) -> tuple[Path, str]:
    parts = urlsplit(url)
    target = page if not parts.path else (page.parent / unquote(parts.path)).resolve()
    if target.is_dir():
        target = target / "index.html"
    return target, unquote(parts.fragment)


def test_every_page_of_the_table_of_contents_was_built(site):
    missing = [doc for doc in TOC_PAGES if not page_of(doc).exists()]
    assert not missing, f"_toc.yml lists pages the site does not have: {missing}"
    assert CHAPTERS, "no chapters (pages under book/part*) in _toc.yml"


def test_every_internal_link_and_anchor_resolves(site):
    problems = []
    for page in html_pages():
        for tag, url in _targets(page):
            target, fragment = _resolve(page, url)
            if SITE not in target.parents and target != SITE:
                problems.append(f"{name(page)}: <{tag}> {url!r} leaves the site")
            elif not target.exists():
                problems.append(f"{name(page)}: <{tag}> {url!r}: no file {target.relative_to(SITE)}")
            elif fragment and target.suffix == ".html" and fragment not in _ids(target):
                problems.append(f"{name(page)}: <{tag}> {url!r}: {name(target)} has no anchor #{fragment}")
    assert not problems, f"{len(problems)} broken internal link(s):\n" + "\n".join(problems[:40])


def test_every_image_exists(site):
    problems = []
    for page in html_pages():
        for node in soup(page).find_all("img"):
            src = (node.get("src") or "").strip()
            if not src:
                problems.append(f"{name(page)}: an <img> without src")
                continue
            if src.startswith("data:"):
                continue
            if EXTERNAL.match(src):
                problems.append(f"{name(page)}: image {src!r} is not part of the site (offline, it would not load)")
                continue
            target, _ = _resolve(page, src)
            if not target.is_file() or target.stat().st_size == 0:
                problems.append(f"{name(page)}: image {src!r} is missing or empty")
    assert not problems, "\n".join(problems[:40])


def _shown_text(page: Path) -> str:
    doc = soup(page)
    main = doc.find("main") or doc.body or doc
    return "\n".join(t for t in main.find_all(string=True) if t.parent.name not in ("script", "style"))


def _outputs_text(page: Path) -> list[tuple[str, str]]:
    """(kind, text) of every cell output on the page: kind is the output's classes."""
    out = []
    for node in soup(page).select("div.cell_output div.output, div.cell_output .output"):
        out.append((" ".join(node.get("class", [])), node.get_text()))
    return out


@pytest.mark.parametrize("doc", TOC_PAGES)
def test_no_page_shows_a_traceback_or_a_printed_warning(site, doc):
    page = page_of(doc)
    assert page.exists(), f"{doc}: not built"
    problems = []
    for kind, text in _outputs_text(page):
        if "traceback" in kind.split() or "Traceback (most recent call last)" in text:
            problems.append(f"a traceback in a cell output: {text.strip()[:300]!r}")
        elif PRINTED_PROBLEM.search(text):
            hit = PRINTED_PROBLEM.search(text)
            problems.append(
                f"a cell printed {hit.group(0)!r}: {text[max(0, hit.start() - 100) : hit.end() + 200].strip()!r}"
            )
        elif "stderr" in kind.split() and text.strip():
            problems.append(f"a cell wrote to stderr: {text.strip()[:300]!r}")
    if "Traceback (most recent call last)" in _shown_text(page):
        problems.append("the page shows a traceback")
    assert not problems, f"{doc}:\n" + "\n".join(problems)


def test_no_page_shows_a_path_of_the_build_machine(site):
    own = _machine_strings()
    problems = []
    for page in html_pages():
        raw = page.read_text(encoding="utf-8")
        for s in own:
            if s in raw:
                i = raw.index(s)
                problems.append(f"{name(page)}: {s!r} near {raw[max(0, i - 60) : i + 80]!r}")
        hit = MACHINE_PATH.search(_shown_text(page))
        if hit:
            text = hit.string
            problems.append(f"{name(page)}: an absolute path near {text[max(0, hit.start() - 60) : hit.end() + 60]!r}")
    for nb_path in sorted((SITE / "_sources").rglob("*.ipynb")):
        raw = nb_path.read_text(encoding="utf-8")
        for s in own:
            if s in raw:
                problems.append(f"{nb_path.relative_to(SITE)}: holds {s!r}")
    assert not problems, "\n".join(problems[:40])


@pytest.mark.parametrize("doc", CHAPTERS)
def test_every_chapter_offers_its_executed_notebook(site, doc):
    page = page_of(doc)
    assert page.exists(), f"{doc}: not built"
    links = {a.get("href", "") for a in soup(page).find_all("a")}
    wanted = f"_sources/{doc}.ipynb"
    assert any(h.replace("../", "").endswith(wanted) for h in links), f"{doc}: the page does not link {wanted}"
    path = SITE / wanted
    assert path.is_file(), f"{doc}: the page links {wanted}, which does not exist"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    # It starts with the two set-up cells, the same ones `make notebooks` writes.
    expected = chapter_notebooks.setup_cells(SETTINGS["repository_url"], SETTINGS["branch"])
    assert [c.cell_type for c in nb.cells[:2]] == ["markdown", "code"], f"{doc}: no set-up cells first"
    assert [c.source for c in nb.cells[:2]] == [c.source for c in expected], f"{doc}: set-up cells differ"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert any(c.get("outputs") for c in code[1:]), f"{doc}: the notebook offered for download has no outputs"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{doc}: the notebook holds {len(errors)} error output(s): {errors[0].get('ename')}"


@pytest.mark.parametrize("doc", CHAPTERS)
def test_launch_links_follow_the_configured_repository(site, doc):
    """Colab and Binder where _config.yml names a repository (opening the executed notebook from
    the notebooks branch, at the path of the download), and no launch link otherwise."""
    hrefs = [a.get("href", "") for a in soup(page_of(doc)).find_all("a")]
    launch = [h for h in hrefs if "colab.research.google.com" in h or "mybinder.org" in h]
    expected = [link["url"] for link in chapter_notebooks.launch_links(SETTINGS["repository_url"], doc)]
    assert sorted(set(launch)) == sorted(expected), f"{doc}: launch links {launch}, expected {expected}"
    for url in expected:
        assert f"{doc}.ipynb" in url and (SITE / "_sources" / f"{doc}.ipynb").exists()


def test_the_execution_report_covers_every_chapter(site):
    """make book ran every chapter of the table of contents once, as a downloaded notebook."""
    report = ROOT / "_build" / "notebook-times.json"
    assert report.exists(), "no _build/notebook-times.json: the book was not built by `make book`"
    ran = json.loads(report.read_text())["chapters"]
    assert sorted(ran) == sorted(CHAPTERS), f"chapters run {sorted(ran)} != chapters in _toc.yml {sorted(CHAPTERS)}"
    assert all(r["ok"] for r in ran.values())


@pytest.mark.parametrize("doc", CHAPTERS)
def test_every_chapter_has_math_for_mathjax(site, doc):
    """Sphinx wrote the chapter's TeX into math elements (the browser test checks they render),
    and no display math was left as raw $$ text."""
    page = soup(page_of(doc))
    assert page.select(".math"), f"{doc}: no math element on the page"
    stray = [
        t
        for t in page.find_all(string=re.compile(r"\$\$"))
        if t.parent.name not in ("script", "style", "code", "pre")
        and not t.find_parent(class_=re.compile(r"highlight|math"))
    ]
    assert not stray, f"{doc}: raw $$ in the page text: {[s[:80] for s in stray[:3]]}"
