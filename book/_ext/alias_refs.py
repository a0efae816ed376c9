"""Resolve type-alias references in the API reference.

autodoc2 documents a module-level type alias (``Model = Callable[...]``) as ``py:data``, but
signatures that use the alias refer to it as ``py:class``, which Sphinx then reports as a
missing reference. This resolves such a reference to the documented alias, so that
``-n`` (nitpicky) still catches every genuinely missing target.
"""

from __future__ import annotations


def _resolve_alias(app, env, node, contnode):
    if node.get("refdomain") != "py" or node.get("reftype") != "class":
        return None
    target = node.get("reftarget", "")
    domain = env.get_domain("py")
    entry = domain.objects.get(target)
    if entry is None or entry.objtype != "data":
        return None
    from sphinx.util.nodes import make_refnode

    return make_refnode(app.builder, node.get("refdoc"), entry.docname, entry.node_id, contnode, target)


def setup(app):
    app.connect("missing-reference", _resolve_alias)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
