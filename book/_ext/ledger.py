"""The page "What this book verifies": every ledger row of every executed chapter, in one table.

A chapter checks a claim with ``stepdiff.ledger.check(...)`` (or records a number with
``record``, or a statement with ``stated``). Each call shows its row under the cell as HTML,

    <div class="stepdiff-ledger stepdiff-ledger-<result>" data-ledger="<the row as JSON>">

which myst-nb keeps in the chapter's doctree as a raw HTML node (inside the output's mime
bundle; the mime type for the page is chosen only later, per builder). This extension

- **collects** the rows while each chapter is read (``doctree-read``): the JSON of every raw
  HTML node carrying ``data-ledger``, with the chapter's name and the id and title of the
  section the row appears in. The rows live in the build environment, per document, so an
  incremental or parallel build keeps them right (``env-purge-doc``, ``env-merge-info``);
- **replaces** the directive ```` ```{ledger-table} ```` (on ``book/ledger.md``) after
  reading (``doctree-resolved``) by: a count of the tutorial's numbered statements that are
  checked, stated only, or not covered (argument ``summary``); a table of those statements,
  each linked to where the book handles it (``statements``); and, chapter by chapter in
  reading order, one table row per ledger row: label, statement, measured value, bound,
  result, and a link to the section that ran it (``rows``). Without an argument, all three.
  Rows carrying ``extra`` data (a curve, a sweep, an image's metrics: ``data=`` of
  ``ledger.check``) show a short summary of it, so later parts need no change here;
- **fails the build** (a warning, fatal under the book's ``-W``) when a row failed, and when a
  statement of the tutorial's list (``tutorial_statements.txt`` beside this file, or the file
  named by the config value ``ledger_statements_file``; an empty value turns this check off)
  has no row anywhere in the book.

"Checked" means at least one ``check`` row carries the statement's label; "stated only" means
rows exist (``stated`` or ``record``) but none checks a number.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.parsers.rst import Directive
from sphinx.util import logging

logger = logging.getLogger(__name__)

#: The HTML class of a displayed row (``stepdiff.ledger.HTML_CLASS``); not imported, so the
#: book builds even if the package failed to import.
HTML_CLASS = "stepdiff-ledger"
DATA = re.compile(r'data-ledger="([^"]*)"')
STATEMENTS_FILE = Path(__file__).with_name("tutorial_statements.txt")
RESULTS = ("passed", "failed", "measured", "stated")
MARK = {"passed": "✓ passed", "failed": "✗ failed", "measured": "· measured", "stated": "○ stated"}


# --- the tutorial's list -------------------------------------------------------------------------


def read_statements(path: Path) -> list[tuple[str, str, str]]:
    """(label, title, where) of each statement of the list; ``#`` starts a comment."""
    statements = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"{path}:{n}: expected 'label | title | where', got {line!r}")
        statements.append((parts[0], parts[1], parts[2]))
    return statements


def classify(statements: list[tuple[str, str, str]], rows: list[dict]) -> dict[str, str]:
    """Each statement's status: ``checked``, ``stated only`` or ``not covered``."""
    status = {}
    for label, _, _ in statements:
        results = {r.get("result") for r in rows if r.get("label") == label}
        if results & {"passed", "failed"}:
            status[label] = "checked"
        elif results:
            status[label] = "stated only"
        else:
            status[label] = "not covered"
    return status


# --- collecting rows while reading -----------------------------------------------------------------


def rows_in(doctree: nodes.Node) -> list[dict]:
    """The ledger rows shown in a doctree, each with its section's id and title."""
    found = []
    for raw in doctree.findall(nodes.raw):
        if "html" not in raw.get("format", "").split() or HTML_CLASS not in raw.astext():
            continue
        for payload in DATA.findall(raw.astext()):
            try:
                row = json.loads(html.unescape(payload))
            except json.JSONDecodeError as err:
                logger.warning(f"ledger: a row's data could not be read ({err})", location=raw,
                               type="ledger", subtype="unreadable")
                continue
            section = next((a for a in _ancestors(raw) if isinstance(a, nodes.section)), None)
            top = section is not None and not any(isinstance(a, nodes.section) for a in _ancestors(section))
            row["section_id"] = "" if section is None or top or not section["ids"] else section["ids"][0]
            row["section"] = section[0].astext() if section is not None and section.children else ""
            found.append(row)
    return found


def _ancestors(node: nodes.Node):
    node = node.parent
    while node is not None:
        yield node
        node = node.parent


def _store(env) -> dict[str, list[dict]]:
    if not hasattr(env, "stepdiff_ledger"):
        env.stepdiff_ledger = {}
    return env.stepdiff_ledger


def _pages(env) -> set[str]:
    if not hasattr(env, "stepdiff_ledger_pages"):
        env.stepdiff_ledger_pages = set()
    return env.stepdiff_ledger_pages


def _collect(app, doctree):
    rows = rows_in(doctree)
    if rows:
        _store(app.env)[app.env.docname] = rows


def _purge(app, env, docname):
    _store(env).pop(docname, None)
    _pages(env).discard(docname)


def _merge(app, env, docnames, other):
    _store(env).update({d: r for d, r in _store(other).items() if d in docnames})
    _pages(env).update(_pages(other) & set(docnames))


def _outdated(app, env, added, changed, removed):
    """The ledger page is rebuilt whenever a chapter is re-read."""
    if added or changed or removed:
        return sorted(_pages(env) - set(added) - set(changed))
    return []


# --- the directive and the table ------------------------------------------------------------------


class ledger_table(nodes.General, nodes.Element):
    """Where the ledger goes; replaced once every chapter has been read."""


class LedgerTable(Directive):
    """``{ledger-table}`` with an optional argument: ``summary``, ``statements`` or ``rows``."""

    has_content = False
    optional_arguments = 1

    def run(self):
        env = self.state.document.settings.env
        part = self.arguments[0] if self.arguments else ""
        if part not in ("", "summary", "statements", "rows"):
            raise self.error(f"ledger-table: the argument is summary, statements or rows, not {part!r}")
        _pages(env).add(env.docname)
        return [ledger_table(part=part)]


def _statements(app) -> list[tuple[str, str, str]]:
    """The tutorial's list: the file beside this one, or the one configured ('' for none)."""
    name = app.config.ledger_statements_file
    if name is None:
        return read_statements(STATEMENTS_FILE)
    if not name:
        return []
    return read_statements(Path(name) if Path(name).is_absolute() else Path(app.srcdir) / name)


def reading_order(env) -> list[str]:
    """Documents in the order of the table of contents, depth first from the root."""
    order, seen = [], set()

    def walk(doc):
        if doc in seen:
            return
        seen.add(doc)
        order.append(doc)
        for child in env.toctree_includes.get(doc, []):
            walk(child)

    walk(env.config.root_doc)
    return order + sorted(d for d in _store(env) if d not in seen)


def _text(text: str) -> nodes.paragraph:
    return nodes.paragraph("", "", nodes.Text(text))


def _table(header: list[str], body: list[list[nodes.Node | str]], widths: list[int], classes: list[str]) -> nodes.table:
    table = nodes.table(classes=["stepdiff-ledger-table", *classes])
    group = nodes.tgroup(cols=len(header))
    table += group
    group.extend(nodes.colspec(colwidth=w) for w in widths)
    head = nodes.thead()
    head += nodes.row("", *[nodes.entry("", _text(h)) for h in header])
    group += head
    tbody = nodes.tbody()
    for cells in body:
        row = nodes.row()
        for cell in cells:
            row += nodes.entry("", cell if isinstance(cell, nodes.Node) else _text(cell))
        tbody += row
    group += tbody
    return table


def _link(app, fromdoc: str, row: dict, docname: str, text: str) -> nodes.paragraph:
    uri = app.builder.get_relative_uri(fromdoc, docname)
    if row.get("section_id"):
        uri += "#" + row["section_id"]
    return nodes.paragraph("", "", nodes.reference("", text, refuri=uri, internal=True))


def summarize_extra(extra: dict[str, Any]) -> str:
    """A short reading of a row's ``extra`` data: scalars as they are, sequences by their length."""
    parts = []
    for key, value in extra.items():
        if isinstance(value, (list, tuple)):
            parts.append(f"{key}: {len(value)} values")
        elif isinstance(value, dict):
            parts.append(f"{key}: {len(value)} entries")
        else:
            text = str(value)
            parts.append(f"{key} = {text if len(text) <= 24 else text[:21] + '...'}")
    return "; ".join(parts)


def _value(row: dict) -> str:
    value = row.get("value", "")
    if value and row.get("unit"):
        value += " " + row["unit"]
    if row.get("extra"):
        value = (value + " " if value else "") + f"[{summarize_extra(row['extra'])}]"
    return value


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _where(env, doc: str, row: dict) -> str:
    title = env.titles[doc].astext()
    return f"{title} › {row['section']}" if row.get("section") and row["section"] != title else title


def build_table(app, fromdoc: str, part: str = "") -> list[nodes.Node]:
    """The ledger's nodes: ``summary``, ``statements``, ``rows``, or all three for ``""``."""
    env = app.env
    store = _store(env)
    statements = _statements(app)
    chapters = [d for d in reading_order(env) if d in store]
    all_rows = [r for d in chapters for r in store[d]]
    out: list[nodes.Node] = []
    if part in ("", "summary"):
        if statements:
            status = classify(statements, all_rows)
            tally = {s: sum(v == s for v in status.values()) for s in ("checked", "stated only", "not covered")}
            out.append(
                nodes.paragraph(
                    "",
                    "",
                    nodes.strong(
                        "",
                        f"Of the tutorial's {len(statements)} numbered statements, {tally['checked']} "
                        f"{'is' if tally['checked'] == 1 else 'are'} checked, {tally['stated only']} stated only, "
                        f"and {tally['not covered']} not covered.",
                    ),
                )
            )
        counts = {result: sum(r.get("result") == result for r in all_rows) for result in RESULTS}
        out.append(
            _text(
                f"The book records {_plural(len(all_rows), 'row')} in {_plural(len(chapters), 'chapter')}: "
                f"{_plural(counts['passed'], 'check')} passed, {counts['failed']} failed, "
                f"{_plural(counts['measured'], 'number')} measured without a bound, and "
                f"{_plural(counts['stated'], 'statement')} stated without a numerical test."
            )
        )
    if part in ("", "statements") and statements:
        status = classify(statements, all_rows)
        body = []
        for label, title, where in statements:
            links = nodes.paragraph()
            places = []
            for doc in chapters:
                for row in store[doc]:
                    if row.get("label") == label and (doc, row.get("section_id")) not in places:
                        places.append((doc, row.get("section_id")))
                        if len(links):
                            links += nodes.Text("; ")
                        links += _link(app, fromdoc, row, doc, _where(env, doc, row)).children
            rows = [r for r in all_rows if r.get("label") == label]
            n_checks = sum(r.get("result") in ("passed", "failed") for r in rows)
            body.append([label, title, where, f"{status[label]} ({_plural(n_checks, 'check')})", links])
        out.append(_table(["Statement", "What it says", "Tutorial", "Status", "Where"], body, [10, 28, 14, 14, 34], []))
    if part in ("", "rows"):
        for doc in chapters:
            out.append(nodes.rubric("", env.titles[doc].astext()))
            body = []
            for row in store[doc]:
                body.append(
                    [
                        row.get("label") or "",
                        row.get("statement", ""),
                        _value(row),
                        row.get("bound", ""),
                        MARK.get(row.get("result"), row.get("result", "")),
                        _link(app, fromdoc, row, doc, row.get("section") or env.titles[doc].astext()),
                    ]
                )
            out.append(
                _table(["Label", "Statement", "Measured", "Bound", "Result", "Where"], body, [9, 38, 14, 14, 9, 16], [])
            )
        if not chapters:
            out.append(_text("No chapter has recorded a ledger row."))
    return out


def _resolve(app, doctree, docname):
    for node in list(doctree.findall(ledger_table)):
        node.replace_self(build_table(app, docname, node["part"]))


def _check(app, env):
    """The build's verdict: every row passed, and every tutorial statement has a row."""
    store = _store(env)
    for doc in sorted(store):
        for row in store[doc]:
            if row.get("result") == "failed":
                where = f"{row['label']}: " if row.get("label") else ""
                logger.warning(
                    f"ledger: a check failed: {where}{row.get('statement')}: measured {row.get('value')}, "
                    f"required {row.get('bound')}",
                    location=doc,
                    type="ledger",
                    subtype="failed",
                )
    statements = _statements(app)
    if statements:
        rows = [r for d in store for r in store[d]]
        missing = [label for label, status in classify(statements, rows).items() if status == "not covered"]
        if missing:
            logger.warning(
                f"ledger: {len(missing)} of the tutorial's statements {'has' if len(missing) == 1 else 'have'} "
                f"no ledger row in any chapter: "
                f"{', '.join(missing)} (record one with ledger.check(..., label=...) or ledger.stated(label, ...))",
                type="ledger",
                subtype="missing",
            )


def setup(app):
    app.add_config_value("ledger_statements_file", None, "env", [str, type(None)])
    app.add_node(ledger_table)
    app.add_directive("ledger-table", LedgerTable)
    app.connect("doctree-read", _collect)
    app.connect("env-purge-doc", _purge)
    app.connect("env-merge-info", _merge)
    app.connect("env-get-outdated", _outdated)
    app.connect("env-check-consistency", _check)
    app.connect("doctree-resolved", _resolve)
    return {"version": "1", "env_version": 1, "parallel_read_safe": True, "parallel_write_safe": True}
