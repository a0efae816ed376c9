"""The chapters as the notebooks a reader downloads, without executing a chapter.

Every chapter is executed once per build, as a downloaded notebook (fresh kernel, empty working
directory outside the repository), by ``tools/notebooks.py execute`` in ``make book``; the book
renders those outputs. What is tested here, in seconds, is everything else a reader relies on:
the notebook is the chapter's cells after the two set-up cells, the set-up cell installs
stepdiff only where it should, the launch links open a notebook that exists, and the files
the package reads are in what ``pip install`` installs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book" / "_ext"))
import chapter_notebooks as cn  # noqa: E402

SETTINGS = cn.book_settings(ROOT)


def test_the_chapters_are_the_pages_under_book_part():
    assert SETTINGS["chapters"], "no chapter in _toc.yml"
    assert all(doc.startswith("book/part") for doc in SETTINGS["chapters"])
    assert not any(cn.is_chapter(doc) for doc in ("book/intro", "book/ledger", "book/apidocs/index"))


@pytest.mark.parametrize("doc", SETTINGS["chapters"])
def test_notebook_is_the_chapter_after_the_setup_cells(doc):
    import jupytext

    nb = cn.read_chapter(ROOT / f"{doc}.md", SETTINGS["repository_url"], SETTINGS["branch"], SETTINGS["extensions"])
    setup = nb.cells[:2]
    assert [c.cell_type for c in setup] == ["markdown", "code"]
    assert all("remove-cell" in c.metadata["tags"] and c.metadata[cn.SETUP_KEY] for c in setup)
    assert "pip install" in setup[0].source and "stepdiff" in setup[0].source
    # The rest is the chapter, cell for cell, as jupytext (Jupyter's reader of the .md) sees it.
    ref = jupytext.read(ROOT / f"{doc}.md")
    assert [(c.cell_type, c.source) for c in nb.cells[2:]] == [(c.cell_type, c.source) for c in ref.cells]
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert len(nb.metadata["source_map"]) == len(nb.cells), "every cell keeps a line in the chapter"
    # Adding the cells twice does not stack them.
    assert len(cn.add_setup_cells(nb).cells) == len(nb.cells)


def _run_setup_cell(repository_url: str, *, installed: bool, env: dict[str, str], colab: bool = False):
    """Run the set-up cell's code with find_spec and subprocess.run replaced: returns the pip calls."""
    code = cn.setup_cells(repository_url, "main")[1].source
    harness = textwrap.dedent(f"""
        import importlib.util, json, os, subprocess, sys, types
        calls = []
        importlib.util.find_spec = lambda name, *a: object() if ({installed!r} or name != "stepdiff") else None
        subprocess.run = lambda args, **kw: calls.append(args)
        if {colab!r}:
            sys.modules["google.colab"] = types.ModuleType("google.colab")
        try:
            exec(compile({code!r}, "setup-cell", "exec"), {{}})
        except ModuleNotFoundError as err:
            print(json.dumps({{"error": str(err)}}))
        else:
            print(json.dumps({{"calls": calls}}))
    """)
    clean = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("BINDER_", "KAGGLE_"))}
    out = subprocess.run(
        [sys.executable, "-c", harness], env={**clean, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


URL = "https://github.com/example-org/stepdiff"


def test_setup_cell_does_nothing_where_stepdiff_is_installed():
    assert _run_setup_cell(URL, installed=True, env={"BINDER_LAUNCH_HOST": "x"}, colab=True) == {"calls": []}
    assert _run_setup_cell("", installed=True, env={}) == {"calls": []}


@pytest.mark.parametrize("where", ["colab", "binder", "kaggle"])
def test_setup_cell_installs_on_a_hosted_service(where):
    env = {
        "binder": {"BINDER_LAUNCH_HOST": "https://mybinder.org/"},
        "kaggle": {"KAGGLE_KERNEL_RUN_TYPE": "Interactive"},
    }
    result = _run_setup_cell(URL, installed=False, env=env.get(where, {}), colab=where == "colab")
    assert result["calls"] and result["calls"][0][-1] == f"stepdiff[notebook] @ git+{URL}.git@main"
    assert result["calls"][0][1:4] == ["-m", "pip", "install"]


def test_setup_cell_explains_instead_of_installing_elsewhere():
    # A local Jupyter without stepdiff: the reader installs it; nothing is installed behind their back.
    assert "pip install" in _run_setup_cell(URL, installed=False, env={})["error"]
    # A hosted service, but no public repository configured: nothing to install from.
    assert "pip install" in _run_setup_cell("", installed=False, env={"BINDER_LAUNCH_HOST": "x"})["error"]


def test_launch_links_open_the_executed_notebook_from_the_notebooks_branch():
    assert cn.launch_links("", "book/part1/01_fundamentals") == []
    links = {link["text"]: link["url"] for link in cn.launch_links(URL + "/", "book/part1/01_fundamentals")}
    assert links["Colab"] == (
        "https://colab.research.google.com/github/example-org/stepdiff/blob/notebooks/book/part1/01_fundamentals.ipynb"
    )
    assert links["Binder"] == (
        "https://mybinder.org/v2/gh/example-org/stepdiff/notebooks?urlpath=tree/book/part1/01_fundamentals.ipynb"
    )
    other = {link["text"] for link in cn.launch_links("https://gitlab.com/a/b", "book/part1/x")}
    assert other == {"Binder"}, "Colab opens notebooks from GitHub only"


def test_make_notebooks_writes_every_chapter(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "notebooks.py"), "write", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    for doc in SETTINGS["chapters"]:
        path = tmp_path / f"{doc}.ipynb"
        assert str(path) in out.stdout
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.cells[0].metadata[cn.SETUP_KEY] and nb.cells[1].metadata[cn.SETUP_KEY]
        assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")


MINI_CONFIG = """\
title: mini
only_build_toc_files: true
execute:
  execute_notebooks: "off"
repository:
  url: {url}
  branch: main
sphinx:
  local_extensions:
    chapter_notebooks: {ext}
"""
MINI_CHAPTER = """\
---
jupytext:
  text_representation: {extension: .md, format_name: myst}
kernelspec: {display_name: Python 3, language: python, name: python3}
---

# A chapter

```{code-cell} ipython3
x = 1 + 1
```
"""


@pytest.mark.parametrize("url", [URL, ""])
def test_a_build_shows_launch_links_exactly_when_a_repository_is_set(tmp_path, url):
    """A two-page book, built with this extension: the chapter page offers its notebook, and
    Colab and Binder links to the same path on the notebooks branch when (only when) a URL is set."""
    (tmp_path / "_config.yml").write_text(MINI_CONFIG.format(url=json.dumps(url), ext=ROOT / "book" / "_ext"))
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: book/part1/01_x\n")
    (tmp_path / "intro.md").write_text("# Intro\n")
    (tmp_path / "book" / "part1").mkdir(parents=True)
    (tmp_path / "book" / "part1" / "01_x.md").write_text(MINI_CHAPTER)
    jb = Path(sys.executable).parent / "jupyter-book"
    run = subprocess.run([str(jb), "build", str(tmp_path), "-W", "-n", "--keep-going"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    html = (tmp_path / "_build" / "html" / "book" / "part1" / "01_x.html").read_text()
    notebook = tmp_path / "_build" / "html" / "_sources" / "book" / "part1" / "01_x.ipynb"
    assert "_sources/book/part1/01_x.ipynb" in html and notebook.exists()
    nb = nbformat.read(notebook, as_version=4)
    assert nb.cells[1].metadata.get(cn.SETUP_KEY), "the downloaded notebook starts with the set-up cells"
    assert "Running this chapter as a notebook" not in html, "the page hides the set-up cells"
    if not url:
        assert "colab.research.google.com" not in html and "mybinder.org/v2" not in html
        assert "STEPDIFF = None" in nb.cells[1].source
        return
    colab = "https://colab.research.google.com/github/example-org/stepdiff/blob/notebooks/book/part1/01_x.ipynb"
    assert (
        colab in html
        and "https://mybinder.org/v2/gh/example-org/stepdiff/notebooks?urlpath=tree/book/part1/01_x.ipynb" in html
    )
    # Colab opens <path> from the notebooks branch, which the publishing workflow fills with the
    # files under _sources/: the same path holds a valid notebook.
    published = colab.split("/blob/notebooks/", 1)[1]
    nbformat.validate(nbformat.read(tmp_path / "_build" / "html" / "_sources" / published, as_version=4))
    assert f"git+{URL}.git@main" in nb.cells[1].source


def test_files_the_package_reads_are_installed_with_it(tmp_path):
    """Chapters find data and checkpoints through the installed package (importlib.resources),
    so every file committed under stepdiff/ must be in the wheel that `pip install .` builds."""
    tracked = subprocess.run(["git", "ls-files", "stepdiff"], cwd=ROOT, capture_output=True, text=True, check=True)
    committed = {p for p in tracked.stdout.split() if not p.endswith((".py", ".pyc")) and (ROOT / p).is_file()}
    # Build from a copy of the tracked files, so that no build/ or egg-info lands in the checkout.
    src = tmp_path / "src"
    for rel in ["pyproject.toml", "README.md", *tracked.stdout.split()]:
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    # Offline with the environment's setuptools when it has one (Python 3.11 venvs do).
    import importlib.util

    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", *isolation, "-w", str(tmp_path / "dist")]
    subprocess.run([*cmd, str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("stepdiff-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert "stepdiff/__init__.py" in names
    missing = sorted(committed - names)
    assert not missing, f"committed under stepdiff/ but not installed by `pip install .` (add package data): {missing}"


def _requirement_closure(requirements: list[str], extras: set[str] = frozenset()) -> set[str]:
    """The distributions that pip installs for ``requirements`` (as installed here, markers evaluated)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [(r, set(extras)) for r in requirements]
    while todo:
        text, wanted = todo.pop()
        req = Requirement(text)
        envs = [{"extra": e} for e in wanted] or [{"extra": ""}]
        if req.marker and not any(req.marker.evaluate(env) for env in envs):
            continue
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            todo.extend((r, set(req.extras)) for r in metadata.requires(req.name) or [])
        except metadata.PackageNotFoundError:
            pass
    return seen


@pytest.mark.parametrize("doc", SETTINGS["chapters"])
def test_chapter_imports_come_with_pip_install_stepdiff_notebook(doc):
    """A reader who runs `pip install "stepdiff[notebook]"` has every module the chapter imports."""
    import ast
    from importlib import metadata

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
        import tomli as tomllib

    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = project.get("optional-dependencies", {}).get("notebook")
    assert extra, 'pyproject.toml has no "notebook" extra: what a chapter needs beyond the package'
    installed = _requirement_closure(project["dependencies"] + extra)
    providers = metadata.packages_distributions()
    nb = cn.read_chapter(ROOT / f"{doc}.md")
    missing = set()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        code = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(code)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for top in {n.split(".")[0] for n in names}:
                if top in sys.stdlib_module_names or top == "stepdiff":
                    continue
                dists = {canonicalize_name(d) for d in providers.get(top, [])}
                if not dists & installed:
                    missing.add(f"{top} (from {sorted(dists) or 'no installed distribution'})")
    assert not missing, f'{doc} imports what pip install "stepdiff[notebook]" does not install: {sorted(missing)}'
