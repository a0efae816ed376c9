"""Every chapter as a notebook that runs where the reader runs it.

A chapter (a page under ``book/part*``) is a MyST Markdown notebook. This extension, and
``tools/notebooks.py`` through the same functions, make of it the notebook a reader gets:

- **Two set-up cells open every chapter's notebook** (:func:`setup_cells`): a Markdown cell
  that says how to install ``stepdiff``, and a code cell that installs it on a hosted notebook
  service (Colab, Binder, Kaggle) when it is missing, and otherwise does nothing (in the book's
  build, and wherever the package is installed). Both are tagged ``remove-cell``: the web page
  does not show them, the ``.ipynb`` does. They are added to the notebook as it is read
  (:func:`read_chapter`), not to the text, so the chapter files stay as written and warnings
  keep their line numbers.
- **Downloads.** Every chapter page offers its executed notebook (``_sources/<doc>.ipynb``).
- **Launch links.** Where ``repository.url`` is set in ``_config.yml`` (the only place the
  URL lives), every chapter page offers Colab (GitHub only) and Binder. Colab cannot open a
  MyST ``.md``, so both open the executed ``.ipynb`` from the branch ``notebooks`` that
  ``.github/workflows/publish.yml`` writes (the same files as the downloads, same paths).
  With no URL (the default) there are no launch links.
- **Pre-executed chapters.** ``make book`` first runs every chapter with
  ``tools/notebooks.py execute`` (in parallel, each in a fresh kernel in an empty directory
  outside the repository) and stores the executed notebooks in ``_build/.jupyter_cache``.
  With ``STEPDIFF_PREEXECUTED=1`` in the environment, the build then renders those outputs
  (myst-nb's ``cache`` mode) instead of executing every chapter a second time. A chapter the
  cache does not hold is reported (a warning, fatal under ``-W``), and the downloadable
  notebook gets the cached outputs (myst-nb writes it without them after a cache hit).
  Without the variable, ``_config.yml``'s ``execute_notebooks: force`` applies unchanged.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import nbformat

#: Pages under these folders are chapters: notebooks a reader can download and run.
CHAPTER_PREFIX = "book/part"
#: The branch that holds the executed chapter notebooks for Colab and Binder.
NOTEBOOKS_BRANCH = "notebooks"
#: Set (to anything but "" or "0") by ``make book`` after ``tools/notebooks.py execute``.
PREEXECUTED_ENV = "STEPDIFF_PREEXECUTED"

COLAB = "https://colab.research.google.com"
BINDER = "https://mybinder.org"
#: Marks the set-up cells (in their metadata), so that tests and tools can find them.
SETUP_KEY = "stepdiff_setup"


def is_chapter(docname: str) -> bool:
    return docname.replace(os.sep, "/").startswith(CHAPTER_PREFIX)


def install_requirement(repository_url: str, branch: str = "main") -> str | None:
    """What ``pip install`` is given on a hosted service: this repository at ``branch``."""
    url = (repository_url or "").strip().rstrip("/")
    if not url:
        return None
    if url.endswith(".git"):
        url = url[: -len(".git")]
    return f"stepdiff[notebook] @ git+{url}.git@{branch}"


def setup_cells(repository_url: str = "", branch: str = "main") -> list[nbformat.NotebookNode]:
    """The Markdown cell that explains the install and the code cell that performs it."""
    requirement = install_requirement(repository_url, branch)
    if requirement:
        how = f'`pip install "{requirement}"`'
        hosted = "On Colab, Binder or Kaggle the next cell does it for you."
    else:
        how = '`pip install ".[notebook]"` in a copy of the stepdiff repository (`-e` to edit it)'
        hosted = "The next cell checks that it is installed."
    markdown = (
        "**Running this chapter as a notebook.** Its code imports the `stepdiff` package. "
        f"Install it into the notebook's Python first: {how}, then restart the kernel. {hosted} "
        "It does nothing where `stepdiff` is already installed. "
        "Run the cells from top to bottom; the chapter takes about a minute and a half on a CPU."
    )
    code = f"""# Set-up: install stepdiff on a hosted notebook service when it is missing; otherwise do nothing.
import importlib
import importlib.util
import os
import subprocess
import sys

STEPDIFF = {requirement!r}  # this book's repository (None: no public repository is configured)
if importlib.util.find_spec("stepdiff") is None:
    hosted = "google.colab" in sys.modules or any(
        key in os.environ for key in ("BINDER_LAUNCH_HOST", "BINDER_REQUEST", "KAGGLE_KERNEL_RUN_TYPE")
    )
    if not (hosted and STEPDIFF):
        raise ModuleNotFoundError(
            'This chapter needs the stepdiff package: run `pip install ".[notebook]"` in a copy of its '
            "repository (or pip install the repository's URL with [notebook]), then restart the kernel."
        )
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", STEPDIFF], check=True)
    importlib.invalidate_caches()"""
    meta = {"tags": ["remove-cell"], SETUP_KEY: True}
    return [
        nbformat.v4.new_markdown_cell(markdown, metadata=copy.deepcopy(meta)),
        nbformat.v4.new_code_cell(code, metadata=copy.deepcopy(meta)),
    ]


def add_setup_cells(nb: nbformat.NotebookNode, repository_url: str = "", branch: str = "main") -> nbformat.NotebookNode:
    """Put the set-up cells first (once), keeping the source map of the other cells."""
    if nb.cells and nb.cells[0].get("metadata", {}).get(SETUP_KEY):
        return nb
    cells = setup_cells(repository_url, branch)
    # Cell ids are not hashed by jupyter-cache, but a notebook must not hold two equal ids.
    for i, cell in enumerate(cells):
        cell["id"] = f"stepdiff-setup-{i}"
    nb.cells[:0] = cells
    if isinstance(nb.metadata.get("source_map"), list):
        # Warnings in the chapter's cells keep their true line numbers; the new cells map to line 1.
        nb.metadata["source_map"][:0] = [0] * len(cells)
    return nb


def read_chapter(path: Path, repository_url: str = "", branch: str = "main", extensions=()) -> nbformat.NotebookNode:
    """A chapter as the notebook that the book renders and the reader downloads.

    Read exactly as myst-nb reads it (so that jupyter-cache matches the notebook that
    ``tools/notebooks.py execute`` ran to the one the build renders), then the set-up cells.
    """
    from myst_nb.core.read import read_myst_markdown_notebook
    from myst_parser.config.main import MdParserConfig

    config = MdParserConfig(enable_extensions=set(extensions))
    nb = read_myst_markdown_notebook(
        Path(path).read_text(encoding="utf-8"), config=config, add_source_map=True, path=path
    )
    return add_setup_cells(nb, repository_url, branch)


def book_settings(root: Path) -> dict[str, Any]:
    """The repository URL, branch and MyST extensions from ``_config.yml``, and the chapters
    of ``_toc.yml`` (docnames, in order): what ``tools/notebooks.py`` needs outside Sphinx."""
    import yaml

    config = yaml.safe_load((root / "_config.yml").read_text(encoding="utf-8")) or {}
    toc = yaml.safe_load((root / "_toc.yml").read_text(encoding="utf-8"))
    repository = config.get("repository") or {}
    return {
        "repository_url": repository.get("url") or "",
        "branch": repository.get("branch") or "main",
        "extensions": list((config.get("parse") or {}).get("myst_enable_extensions") or []),
        "chapters": [f for f in toc_files(toc) if is_chapter(f)],
    }


def toc_files(node) -> list[str]:
    """Every ``file:`` entry of a ``_toc.yml`` tree, in reading order (the root first)."""
    files = []
    if isinstance(node, dict):
        for key in ("root", "file"):
            if key in node:
                files.append(re.sub(r"\.(md|ipynb)$", "", str(node[key])))
        for key, value in node.items():
            if key not in ("root", "file"):
                files.extend(toc_files(value))
    elif isinstance(node, list):
        for item in node:
            files.extend(toc_files(item))
    return files


def launch_links(repository_url: str, docname: str) -> list[dict[str, str]]:
    """Colab and Binder links that open ``docname``'s executed notebook from the notebooks branch."""
    url = (repository_url or "").strip().rstrip("/")
    if not url:
        return []
    if url.endswith(".git"):
        url = url[: -len(".git")]
    path = f"{docname}.ipynb"
    match = re.fullmatch(r"https?://github\.com/([^/]+)/([^/]+)", url)
    links = []
    if match:
        org, repo = match.groups()
        links.append(
            {
                "text": "Colab",
                "url": f"{COLAB}/github/{org}/{repo}/blob/{NOTEBOOKS_BRANCH}/{path}",
                "icon": "_static/images/logo_colab.png",
            }
        )
        binder = f"{BINDER}/v2/gh/{org}/{repo}/{NOTEBOOKS_BRANCH}"
    else:
        from urllib.parse import quote

        binder = f"{BINDER}/v2/git/{quote(url, safe='')}/{NOTEBOOKS_BRANCH}"
    links.append({"text": "Binder", "url": f"{binder}?urlpath=tree/{path}", "icon": "_static/images/logo_binder.svg"})
    return links


# --------------------------------------------------------------------------------------------
# Sphinx


def _repository(app) -> tuple[str, str]:
    options = app.config.html_theme_options or {}
    return options.get("repository_url", "") or "", options.get("repository_branch", "") or "main"


def _preexecuted() -> bool:
    return os.environ.get(PREEXECUTED_ENV, "") not in ("", "0")


_STATE: dict[str, Any] = {}


def _wrap_myst_nb_reader() -> None:
    """Add the set-up cells to each chapter's notebook as myst-nb reads it."""
    import dataclasses

    import myst_nb.sphinx_ as sphinx_

    if getattr(sphinx_.create_nb_reader, "_stepdiff", False):
        return
    original = sphinx_.create_nb_reader

    def create_nb_reader(path, md_config, nb_config, content):
        reader = original(path, md_config, nb_config, content)
        app = _STATE.get("app")
        if reader is None or app is None:
            return reader
        docname = app.env.path2doc(str(path))
        if docname is None or not is_chapter(docname):
            return reader
        read = reader.read
        url, branch = _repository(app)

        def read_with_setup(text):
            _STATE.setdefault("with_setup", set()).add(docname)
            return add_setup_cells(read(text), url, branch)

        return dataclasses.replace(reader, read=read_with_setup)

    create_nb_reader._stepdiff = True
    sphinx_.create_nb_reader = create_nb_reader


def _config_inited(app, config) -> None:
    if _preexecuted():
        config.nb_execution_mode = "cache"


def _builder_inited(app) -> None:
    _STATE.clear()
    _STATE["app"] = app
    _wrap_myst_nb_reader()


def _doctree_read(app, doctree) -> None:
    """After a cache hit, give the downloadable notebook the outputs the page shows."""
    docname = app.env.docname
    if not (is_chapter(docname) and _preexecuted() and "kernelspec" in app.env.metadata.get(docname, {})):
        return
    from jupyter_cache import get_cache
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    cache = get_cache(app.env.mystnb_config.execution_cache_path)
    source = str(Path(app.env.doc2path(docname)).resolve())
    if any(str(Path(r.uri).resolve()) == source for r in cache.list_project_records()):
        logger.warning(
            f"{docname}: not among the chapters that tools/notebooks.py executed, so the book build executed "
            "it (a second run of a chapter, or one missing from the notebook test)",
            location=docname,
            type="stepdiff",
            subtype="preexecuted",
        )
    written = Path(app.env.mystnb_config.output_folder, *f"{docname}.ipynb".split("/"))
    nb = nbformat.read(written, as_version=4)
    try:
        _, merged = cache.merge_match_into_notebook(nb)
    except KeyError:
        return
    tmp = written.with_suffix(".ipynb.tmp")
    tmp.write_text(nbformat.writes(merged), encoding="utf-8")
    tmp.replace(written)


def _page_context(app, pagename, templatename, context, doctree) -> None:
    """Offer the chapter's notebook, and the launch links where a repository URL is set."""
    if not is_chapter(pagename) or "kernelspec" not in app.env.metadata.get(pagename, {}):
        return
    out = Path(app.outdir)
    executed = Path(app.env.mystnb_config.output_folder, *f"{pagename}.ipynb".split("/"))
    if executed.exists():
        target = out / "_sources" / f"{pagename}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(executed.read_bytes())
        context["ipynb_source"] = f"{pagename}.ipynb"
    links = launch_links(_repository(app)[0], pagename)
    if links and "header_buttons" in context:
        context["header_buttons"].append(
            {
                "type": "group",
                "tooltip": "Launch interactive content",
                "icon": "fas fa-rocket",
                "label": "launch-buttons",
                "buttons": [
                    {
                        "type": "link",
                        "text": link["text"],
                        "tooltip": f"Open this chapter's notebook on {link['text']}",
                        "icon": link["icon"],
                        "url": link["url"],
                    }
                    for link in links
                ],
            }
        )


def _check_every_chapter(app, env) -> None:
    from sphinx.util import logging

    missing = sorted(
        d
        for d in env.found_docs
        if is_chapter(d)
        and "kernelspec" in env.metadata.get(d, {})
        and d not in _STATE.get("with_setup", set())
        and d in _STATE.get("read", set())
    )
    for docname in missing:
        logging.getLogger(__name__).warning(
            f"{docname}: the set-up cells were not added to its notebook (has myst-nb changed its reader?)",
            location=docname,
            type="stepdiff",
            subtype="setup",
        )


def _source_read(app, docname, source) -> None:
    _STATE.setdefault("read", set()).add(docname)


def setup(app):
    app.connect("config-inited", _config_inited)
    app.connect("builder-inited", _builder_inited)
    app.connect("source-read", _source_read)
    app.connect("doctree-read", _doctree_read)
    app.connect("env-updated", _check_every_chapter)
    # After the theme's prep_header_buttons (500, registered earlier) and before its
    # add_header_buttons (501), which draws the download menu from context["ipynb_source"].
    app.connect("html-page-context", _page_context, priority=500)
    return {"parallel_read_safe": False, "parallel_write_safe": True}


__all__ = [
    "CHAPTER_PREFIX",
    "NOTEBOOKS_BRANCH",
    "PREEXECUTED_ENV",
    "SETUP_KEY",
    "add_setup_cells",
    "book_settings",
    "install_requirement",
    "is_chapter",
    "launch_links",
    "read_chapter",
    "setup_cells",
    "toc_files",
]
