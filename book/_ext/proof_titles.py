"""Show the tutorial's own numbering in unnumbered sphinx-proof boxes, without a doubled name.

The chapters box the tutorial's statements with its numbers, e.g.
``{prf:algorithm} Algorithm 2 (Deterministic reverse sampler)`` with ``:nonumber:``.
sphinx-proof renders an unnumbered box as "<Type> (<title>)", which would read
"Algorithm (Algorithm 2 (Deterministic reverse sampler))". For a title that already starts
with a name and a number ("Fact 1", "Claim 2", "Pseudocode 7"), this drops the type prefix
and the outer parentheses, so the box reads "Algorithm 2 (Deterministic reverse sampler)".
Other boxes are left as sphinx-proof draws them.
"""

from __future__ import annotations

import re

from docutils import nodes

NUMBERED_TITLE = re.compile(r"^\s*\(\s*[A-Z][A-Za-z]* \d+\b")


def _strip_parentheses(title: nodes.title) -> bool:
    texts = [t for t in title.findall(nodes.Text)]
    if not texts or not NUMBERED_TITLE.match(title.astext()) or not title.astext().rstrip().endswith(")"):
        return False
    first, last = texts[0], texts[-1]
    first.parent.replace(first, nodes.Text(str(first).lstrip().removeprefix("(")))
    texts = [t for t in title.findall(nodes.Text)]
    last = texts[-1]
    last.parent.replace(last, nodes.Text(str(last).rstrip().removesuffix(")")))
    return True


def _retitle(app, doctree, docname):
    from sphinx_proof.nodes import unenumerable_node

    for node in doctree.findall(unenumerable_node):
        if node.children and isinstance(node[0], nodes.title) and _strip_parentheses(node[0]):
            node["titled_by_source"] = True


def _depart(self, node):
    from sphinx_proof.nodes import depart_unenumerable_node

    if node.get("titled_by_source") and self.builder.format == "html":
        self.body.append("</div>")  # sphinx-proof's depart, minus the "<Type> " prefix
    else:
        depart_unenumerable_node(self, node)


def setup(app):
    app.setup_extension("sphinx_proof")
    from sphinx_proof.nodes import unenumerable_node, visit_unenumerable_node

    app.add_node(unenumerable_node, override=True, html=(visit_unenumerable_node, _depart))
    app.connect("doctree-resolved", _retitle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
