"""Shared by the tests of the built website (``_build/html``), run by ``make site-test`` after ``make book``.

They are not part of ``make test`` (``pyproject.toml`` ignores this folder unless it is named),
and they fail, never skip, when the site, the browser or the vendored MathJax is missing.
Everything is found from ``_toc.yml`` and the built files, so a chapter added later is covered
without a change here.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SITE = Path(os.environ.get("STEPDIFF_SITE", ROOT / "_build" / "html")).resolve()
#: Screenshots and other test artefacts.
ARTEFACTS = ROOT / "_build" / "site-test"

sys.path.insert(0, str(ROOT / "book" / "_ext"))
import chapter_notebooks  # noqa: E402

SETTINGS = chapter_notebooks.book_settings(ROOT)
CHAPTERS: list[str] = SETTINGS["chapters"]


def _toc_pages() -> list[str]:
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    return chapter_notebooks.toc_files(toc)


TOC_PAGES = _toc_pages()


def require_site() -> Path:
    if not (SITE / "index.html").exists():
        pytest.fail(f"no built site at {SITE}: run `make book` first (these tests check what it built)")
    return SITE


@functools.cache
def html_pages() -> list[Path]:
    """Every page of the site (the theme's own files under _static are not pages)."""
    require_site()
    return sorted(p for p in SITE.rglob("*.html") if "_static" not in p.relative_to(SITE).parts)


@functools.cache
def soup(page: Path):
    from bs4 import BeautifulSoup

    return BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")


def page_of(docname: str) -> Path:
    return SITE / f"{docname}.html"


def name(page: Path) -> str:
    return page.relative_to(SITE).as_posix()
