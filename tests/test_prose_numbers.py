r"""No measured number is typed into a chapter's prose: it is glued from the cell that computes it.

A number typed into a sentence drifts silently when the code above it changes. So every number
a chapter *measures* reaches its prose through myst-nb's glue: a cell computes it and calls
``ledger.glue("key", value)`` (``from stepdiff.ledger import glue``), and the sentence says
`` {glue:text}`key:.3g` ``. This test reads every page under ``book/part*`` listed in
``_toc.yml`` (so a new part is covered as soon as it is in the table of contents) and fails on

- a **decimal number** (``0.54``, ``3.6``, ``5e-3``, ``1.2e+04``) or a **percentage** (``6 %``,
  ``60%``, ``45\%``, ``12 percent``) in the prose, including headings, tables, admonitions,
  proof boxes, exercise and answer text, and figure captions (a code cell's ``caption:``);
- inside math, a decimal after ``\approx``, ``\simeq`` or ``≈``, and any percentage: a value
  stated as approximately equal to something is a result, not a definition.

What is *not* prose, and so is not read: the YAML header, code cells (their source; only their
captions are read), other fenced code blocks (```` ```python ````, ```` ```text ````, ...),
``literalinclude`` and ``math`` directives, directive option lines (``:label:``, ``:tags:``,
``:width: 0.8``) and option blocks (``---`` ... ``---``), inline code (`` `0.5` ``), every role's
content (`` {glue:text}`key:.3f` ``, `` {cite}`key` ``, `` {eq}`label` ``, `` {term}`...` ``),
``(label)=`` lines, link targets and bare URLs, HTML comments, and math (``$...$``,
``$$...$$``, ``\begin{...}...\end{...}``) apart from the rule above.

Inside math, decimals are allowed: they are taken as **definitions**, the values a chapter sets
(``$\sigma = 0.5$``, ``$\Delta t = 0.01$``, ``$\beta(t) = 0.1 + 19.9t$``). A measured or
computed value is never written in math: write it outside math, glued (``the slope is
{glue:text}`slope:.2f```), or write the exact expression instead of its decimal
(``$7/3$`` rather than ``$\approx 2.3$``).

Also allowed outside math, because they are names rather than quantities: section numbers of
the tutorial or the book (``§2.4``, ``section 3.5``, ``App. B.1``), line numbers of an algorithm
box (``line 2.2``), software versions after the software's name (``Python 3.11``, ``Triton
3.6``, ``PyTorch 2.11``) and any three-part version (``0.42.1``), and arXiv identifiers
(``arXiv:2406.08929``). Integers are not flagged (``50 steps``, ``seed 1``, ``77 tokens``):
they are mostly setup constants, and a static test cannot tell them from results. A chapter
still glues an integer that it measures.

Anything else must be on :data:`ALLOWED`, a short per-chapter list of setup constants, each
given as the *phrase* it is typed in (``"standard deviation 0.2"``, matched with any run of
white space, line breaks included) and the reason it may be typed. The number is allowed only
inside that phrase, so the same digits elsewhere in the chapter are still read. Keep the list
short: the right fix is almost always to glue, or to write the constant as a definition in math
(``$\sigma_{\min} = 0.002$``).

Every glue key a chapter's prose uses must also be glued by one of its cells (a literal
``glue("key", ...)``), unless the chapter builds keys at run time (``glue(f"...", ...)``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

#: Setup constants a chapter may type into its prose: {chapter: {phrase: why}}. The numbers
#: inside a listed phrase are allowed there (the phrase matches across line breaks), nowhere else.
ALLOWED: dict[str, dict[str, str]] = {
    "book/part1/02_ddpm.md": {
        "standard deviation is 0.3": "the narrowest component of data.mixture_1d, a setup constant",
        "standard deviation 0.2": "the components of data.eight_gaussians, a setup constant",
        "which is 0.2 for the data": "the spread of data.eight_gaussians is its components' sd by definition",
    },
    "book/part1/03_ddim.md": {
        "kernel of width 0.2": "the MMD kernel width chosen for the comparison, a setup constant",
        "thinnest component is 0.1 wide": "a component sd of the chapter's target, a setup constant",
    },
    "book/part1/04_flow_matching.md": {
        "resolution (0.05)": "the step of the grid of times searched, a setup constant",
    },
    "book/part1/05_practice.md": {
        "down to 0.002": "Karras et al.'s smallest noise level, a setup constant of the grid",
        "width 0.2 of the mixture": "the components' sd of the chapter's target, a setup constant",
    },
}


def _toc_files(node) -> list[str]:
    if isinstance(node, dict):
        own = [node["file"]] if "file" in node else []
        return own + [f for value in node.values() for f in _toc_files(value)]
    if isinstance(node, list):
        return [f for item in node for f in _toc_files(item)]
    return []


TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
CHAPTERS = [f for f in _toc_files(TOC) if f.startswith("book/part")]

# --- reading a MyST chapter into its prose -----------------------------------------------------

FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,}|:{3,})\s*(?:\{(?P<name>[^}\s]+)\})?(?P<arg>.*)$")
#: Directives whose body is code or data, not prose.
CODE_DIRECTIVES = {"code-cell", "literalinclude", "math", "raw", "eval-rst", "code", "code-block", "sourcecode"}
OPTION = re.compile(r"^\s*:[\w-]+:")


def _captions(node) -> list[str]:
    """Every ``caption`` string in a code cell's YAML options (mystnb figure, image, ...)."""
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k == "caption" and isinstance(v, str)]
        return found + [c for k, v in node.items() if k != "caption" for c in _captions(v)]
    if isinstance(node, list):
        return [c for item in node for c in _captions(item)]
    return []


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, text) of every line of prose, with code, options and headers left out.

    Lines that are not prose come back empty, so that math and roles that span lines still
    join up and every line keeps its number.
    """
    lines = text.split("\n")
    out = [""] * len(lines)
    i = 0
    if lines and lines[0].strip() == "---":  # the jupytext header
        i = 1
        while i < len(lines) and lines[i].strip() != "---":
            i += 1
        i += 1
    stack: list[tuple[str, bool]] = []  # open fences: (fence string, body is prose)
    while i < len(lines):
        line = lines[i]
        m = FENCE.match(line)
        if m and stack and m.group("fence")[0] == stack[-1][0][0] and len(m.group("fence")) >= len(stack[-1][0]) \
                and not m.group("name") and not m.group("arg").strip():
            stack.pop()  # a closing fence
            i += 1
            continue
        in_prose = all(prose for _, prose in stack)
        if m and in_prose and (m.group("name") or m.group("fence")[0] == "`" or m.group("fence")[0] == "~"):
            name = m.group("name")
            prose_body = bool(name) and name not in CODE_DIRECTIVES and not name.startswith("glue")
            stack.append((m.group("fence"), prose_body))
            if prose_body and m.group("arg").strip():
                out[i] = m.group("arg")  # a directive's title is prose
            i += 1
            # Options: ":key: value" lines, or a YAML block between "---" lines.
            if i < len(lines) and lines[i].strip() == "---":
                start = i
                i += 1
                while i < len(lines) and lines[i].strip() != "---":
                    i += 1
                try:
                    options = yaml.safe_load("\n".join(lines[start + 1 : i])) or {}
                except yaml.YAMLError:
                    options = {}
                if in_prose:  # captions are prose, even a code cell's
                    for caption in _captions(options):
                        out[start] = (out[start] + " " + " ".join(caption.split())).strip()
                i += 1
            while i < len(lines) and OPTION.match(lines[i]):
                i += 1
            continue
        if in_prose and not re.match(r"^\s*\([^)\s]+\)=\s*$", line):  # "(label)=" lines are not prose
            out[i] = line
        i += 1
    return [(n + 1, s) for n, s in enumerate(out)]


# --- what is removed from prose before numbers are looked for ----------------------------------

ROLE = re.compile(r"\{[\w:.+-]+\}`[^`]*`")
CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
DISPLAY_MATH = re.compile(r"\$\$.+?\$\$", re.S)
ENV_MATH = re.compile(r"\\begin\{(\w+\*?)\}.*?\\end\{\1\}", re.S)
INLINE_MATH = re.compile(r"(?<![\\$])\$(?!\$)(?:[^$\\\n]|\\.|\n(?!\s*\n))+?\$")
COMMENT = re.compile(r"<!--.*?-->", re.S)
LINK_TARGET = re.compile(r"\]\([^)]*\)|<https?://[^>]*>|https?://\S+")
NAMES = re.compile(
    r"(?i:§\s*|\b(?:sections?|sec\.|app\.|appendix|appendices|lines?)\s+)[A-Z]?\d+(?:\.\d+)*(?:\s*[–-]\s*[A-Z]?\d+(?:\.\d+)*)?"
    r"|\b(?:Python|PyTorch|Triton|CUDA|NumPy|SciPy|Jupyter Book|jupytext|myst-nb|Sphinx)\s+v?\d+(?:\.\d+)+\+?"
    r"|\barXiv:\s*\d{4}\.\d{4,5}(?:v\d+)?"
    r"|(?<![\w.])v?\d+\.\d+\.\d+(?![\w.])"
)
NUMBER = r"\d+(?:\.\d+)?(?:[eE][-+−]?\d+)?"
PERCENT = re.compile(rf"(?<![\w.]){NUMBER}\s?(?:%|\\%|percent\b)")
DECIMAL = re.compile(r"(?<![\w.])(?:\d+\.\d+(?:[eE][-+−]?\d+)?|\d+[eE][-+−]?\d+)(?![\d])")
APPROX_IN_MATH = re.compile(r"(?:\\approx|\\simeq|≈)\s*[-−]?\s*(\d+\.\d+(?:[eE][-+−]?\d+)?|\d+[eE][-+−]?\d+)")


def _blank(match: re.Match) -> str:
    """The match replaced by spaces, newlines kept, so that line numbers stay right."""
    return re.sub(r"[^\n]", " ", match.group(0))


def _phrase(phrase: str) -> re.Pattern:
    return re.compile(r"\s+".join(re.escape(word) for word in phrase.split()))


def typed_numbers(text: str, allowed: dict[str, str] | None = None) -> list[tuple[int, str, str]]:
    """(line, number, where) for every number the rule above forbids; ``where`` is prose or math.

    ``allowed`` maps phrases of setup constants to the reasons they may be typed.
    """
    joined = "\n".join(s for _, s in prose_lines(text))
    for phrase in allowed or {}:
        joined = _phrase(phrase).sub(_blank, joined)
    found: list[tuple[int, str, str]] = []

    def line_of(pos: int) -> int:
        return joined.count("\n", 0, pos) + 1

    for pattern in (COMMENT, ROLE, CODE):
        joined = pattern.sub(_blank, joined)
    for pattern in (DISPLAY_MATH, ENV_MATH, INLINE_MATH):
        for m in pattern.finditer(joined):
            for hit in APPROX_IN_MATH.finditer(m.group(0)):
                found.append((line_of(m.start() + hit.start(1)), hit.group(1), "math"))
            for hit in PERCENT.finditer(m.group(0)):
                found.append((line_of(m.start() + hit.start()), hit.group(0), "math"))
        joined = pattern.sub(_blank, joined)
    for pattern in (LINK_TARGET, NAMES):
        joined = pattern.sub(_blank, joined)
    for m in PERCENT.finditer(joined):
        found.append((line_of(m.start()), m.group(0), "prose"))
    joined = PERCENT.sub(_blank, joined)
    for m in DECIMAL.finditer(joined):
        found.append((line_of(m.start()), m.group(0), "prose"))
    return sorted(found)


def glue_keys(text: str) -> tuple[set[str], set[str], bool]:
    """(keys the prose uses, keys the cells glue literally, whether any key is built at run time)."""
    used = {m.group(1) for m in re.finditer(r"\{glue(?::\w+)?\}`([^`:]+)", text)}
    used |= {m.group(1) for m in re.finditer(r"```\{glue:?\w*\}\s+([^\s`]+)", text)}
    glued = {m.group(1) for m in re.finditer(r"\bglue\(\s*[\"']([^\"']+)[\"']", text)}
    dynamic = bool(re.search(r"\bglue\(\s*(?![\"'])\S", text))
    return used, glued, dynamic


# --- the tests ---------------------------------------------------------------------------------


def test_every_part_is_covered():
    assert CHAPTERS, "no book/part* pages in _toc.yml"
    for chapter in CHAPTERS:
        assert (ROOT / f"{chapter}.md").exists(), f"_toc.yml lists {chapter}, which does not exist"
    unknown = set(ALLOWED) - {f"{c}.md" for c in CHAPTERS}
    assert not unknown, f"ALLOWED names pages that are not chapters: {sorted(unknown)}"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_prose_numbers_are_glued(chapter):
    path = f"{chapter}.md"
    bad = typed_numbers((ROOT / path).read_text(), ALLOWED.get(path))
    report = "\n".join(
        f"  {path}:{n}: {num!r} typed in {where}" + (" after \\approx" if where == "math" and "%" not in num else "")
        for n, num, where in bad
    )
    assert not bad, (
        f"{len(bad)} number(s) typed into the prose of {path}; glue each from the cell that computes it "
        f"(ledger.glue('key', value) and {{glue:text}}`key:.3g`), or add a setup constant to ALLOWED "
        f"in tests/test_prose_numbers.py with its reason:\n{report}"
    )


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_glued_keys_exist(chapter):
    used, glued, dynamic = glue_keys((ROOT / f"{chapter}.md").read_text())
    missing = used - glued
    assert dynamic or not missing, f"{chapter}: the prose uses glue keys no cell glues: {sorted(missing)}"


# --- the rule itself, on small examples ----------------------------------------------------------

EXAMPLE = """\
---
kernelspec:
  name: python3
---

(sec-x)=
# Heading with 1.5 in it

The slope is {glue:text}`slope:.2f`, the bound $\\sigma = 0.5$ is set, and `x = 0.25` is code.
We measured 0.54 here and 6 % there; see §2.4, App. B.1 and arXiv:2406.08929, on Python 3.11.
Line 2.2 of the box, `diffusers` 0.42.1, a kernel of
width 0.2 (allowed), and width 0.2 elsewhere.
$$ a = 0.1 + 19.9 t \\approx 2.3 $$ (eq-a)
A [link](https://example.org/v1.2) and 1e-3 and {cite}`key2024`.

```{code-cell} ipython3
---
mystnb:
  figure:
    caption: |
      A caption with 0.31 in it.
---
y = 0.75
```

```{note}
:class: 0.9
Inside a note, 45% counts, $t \\approx 0.1$ too.
```

```text
0.123 in a text block
```
"""


def test_the_rule_on_an_example():
    allowed = {"kernel of width 0.2": "a setup constant"}
    hits = [(line, number.strip(), where) for line, number, where in typed_numbers(EXAMPLE, allowed)]
    assert hits == [
        (7, "1.5", "prose"),
        (10, "0.54", "prose"),
        (10, "6 %", "prose"),
        (12, "0.2", "prose"),
        (13, "2.3", "math"),
        (14, "1e-3", "prose"),
        (17, "0.31", "prose"),
        (28, "0.1", "math"),
        (28, "45%", "prose"),
    ], hits


def test_glue_keys_are_read_from_prose_and_cells():
    used, glued, dynamic = glue_keys('{glue:text}`a:.2f` and {glue}`b`\n```{code-cell}\nglue("a", 1)\n```\n')
    assert used == {"a", "b"} and glued == {"a"} and not dynamic
    assert glue_keys('glue(f"k{i}", 1)')[2]
