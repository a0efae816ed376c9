"""The examples in the package's docstrings run, as doctests, in ``make test``.

Each module of the package is imported and its ``>>>`` examples are run (ELLIPSIS and
NORMALIZE_WHITESPACE on). The docstrings are MyST (the API reference parses them so), where an
example sits in a fenced block; the fence's closing line must follow a blank line, or doctest
reads it as part of the expected output, and this says so.
"""

from __future__ import annotations

import doctest
import importlib
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> list[str]:
    out = subprocess.run(["git", "ls-files", "stepdiff"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    mods = []
    for rel in out.split():
        if rel.endswith(".py") and (ROOT / rel).exists() and not rel.endswith("__main__.py"):
            mods.append(rel[: -len(".py")].replace("/", ".").removesuffix(".__init__"))
    return sorted(mods)


MODULES = _modules()


def test_some_module_has_examples():
    count = sum(len(t.examples) for m in MODULES for t in doctest.DocTestFinder().find(importlib.import_module(m)))
    assert count > 0, "no docstring example in the package: the doctest run would test nothing"


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module):
    mod = importlib.import_module(module)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    problems = []
    for test in doctest.DocTestFinder(exclude_empty=True).find(mod, module):
        for example in test.examples:
            if "```" in example.want:
                problems.append(
                    f"{test.name}: the example's expected output runs into a ``` fence "
                    f"(leave a blank line before the fence): {example.source.strip()!r}"
                )
        runner.run(test, out=problems.append)
    assert not problems, "\n".join(problems)
