"""The ledger: every claim the book checks, with the measured value, the bound and the result.

A chapter never checks a claim with a bare ``assert``. It calls

>>> from stepdiff import ledger
>>> slope = ledger.check("the per-step KL falls like dt^2", 1.97, close_to=2.0, atol=0.15, label="Lemma 1")

which compares the measured value with the bound, records one row
(label, statement, measured value, bound, result), shows that row under the cell when it runs
in a notebook, returns the value, and raises {class}`CheckFailed` when the bound is not met.
The book's build collects the rows of every chapter into the page "What this book verifies"
(``book/_ext/ledger.py``), and fails if any row failed or if a numbered statement of the
tutorial has no row.

Three kinds of row:

- {func}`check` -- a claim with a bound: ``passed`` or ``failed`` (and then it raises);
- {func}`record` -- a measured number the text discusses, with no bound: ``measured``;
- {func}`stated` -- a statement the book states (or derives) but does not test numerically,
  such as a definition: ``stated``.

A bound is given by keyword. For an array ``value`` the bound must hold for every element, and
the row shows the element farthest from meeting it (the worst case):

| keyword | holds when |
| --- | --- |
| ``lt=b`` / ``le=b`` | $v < b$ / $v \\le b$ |
| ``gt=b`` / ``ge=b`` | $v > b$ / $v \\ge b$ |
| ``between=(lo, hi)`` | $\\mathrm{lo} \\le v \\le \\mathrm{hi}$ |
| ``close_to=c, atol, rtol`` | $\\lvert v - c\\rvert \\le \\mathrm{atol} + \\mathrm{rtol}\\,\\lvert c\\rvert$ |
| ``equals=c`` | $v = c$ exactly (integers, strings, bits) |
| ``holds=b`` | ``b`` is true (``value`` is then only shown) |

Rows are kept in memory ({func}`rows`), and appended as JSON lines to the file named by the
environment variable ``STEPDIFF_LEDGER_FILE`` when it is set.

Numbers quoted in a chapter's prose are bound to the cell that computes them with {func}`glue`
(myst-nb's glue in the book build; nothing in a notebook run without myst-nb installed), so the
text can never disagree with the computation.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["CheckFailed", "Row", "check", "clear", "glue", "record", "rows", "stated"]

#: The HTML class of a displayed row; the book's Sphinx extension finds rows by it.
HTML_CLASS = "stepdiff-ledger"
#: The environment variable naming a JSON-lines file that receives every row.
ENV_FILE = "STEPDIFF_LEDGER_FILE"


class CheckFailed(AssertionError):
    """A checked claim whose measured value is outside its bound."""


@dataclass(frozen=True)
class Row:
    """One line of the ledger.

    ``result`` is ``"passed"``, ``"failed"``, ``"measured"`` or ``"stated"``; ``value`` and
    ``bound`` are the strings shown to the reader; ``number`` is the measured value (worst
    element for an array) as a float when it is numeric, for machine use.
    """

    statement: str
    label: str | None
    value: str
    bound: str
    result: str
    number: float | None = None
    unit: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str)


_ROWS: list[Row] = []


def rows() -> list[Row]:
    """The rows recorded in this process so far, in order."""
    return list(_ROWS)


def clear() -> None:
    """Forget the rows recorded in this process (the file of ``STEPDIFF_LEDGER_FILE`` is kept)."""
    _ROWS.clear()


# --- formatting ----------------------------------------------------------------------------


def _fmt(x: Any, digits: int = 4) -> str:
    """A number as a reader wants to see it: 4 significant digits, scientific when tiny or huge."""
    if isinstance(x, (bool, np.bool_)):
        return "true" if x else "false"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if math.isnan(x) or math.isinf(x):
            return str(x)
        if x == 0:
            return "0"
        if 1e-3 <= abs(x) < 1e5:
            return f"{x:.{digits}g}"
        return f"{x:.{max(digits - 2, 1)}e}"
    return str(x)


def _as_array(value: Any) -> np.ndarray | None:
    """The value as a float64 array when it is numeric (scalar, list, NumPy or torch), else None."""
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().double().numpy()
    if isinstance(value, (bool, np.bool_, str)):
        return None
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr


# --- the bound -----------------------------------------------------------------------------

_BOUND_KEYS = ("lt", "le", "gt", "ge", "between", "close_to", "equals", "holds")


def _judge(value: Any, bounds: dict[str, Any], atol: float, rtol: float) -> tuple[bool, str, Any]:
    """(passed, the bound as text, the element shown: the worst one for an array)."""
    given = [k for k in _BOUND_KEYS if bounds.get(k) is not None]
    if len(given) != 1:
        raise ValueError(f"ledger.check needs exactly one bound of {_BOUND_KEYS}, got {given or 'none'}")
    kind = given[0]
    b = bounds[kind]
    if kind == "holds":
        return bool(b), "holds", value
    if kind == "equals":
        arr, ref = _as_array(value), _as_array(b)
        if arr is not None and ref is not None and arr.size > 1:
            ok = arr.shape == ref.shape or ref.size == 1
            ok = ok and bool(np.all(arr == ref))
            return ok, f"= {_fmt(b) if ref.size == 1 else 'the reference, elementwise'}", value
        return bool(value == b), f"= {_fmt(b)}", value
    arr = _as_array(value)
    if arr is None or arr.size == 0:
        raise TypeError(f"ledger.check: a bound `{kind}` needs a numeric value, got {type(value).__name__}")
    if np.isnan(arr).any():
        return False, _bound_text(kind, b, atol, rtol), float("nan")
    flat = arr.ravel()
    if kind in ("lt", "le"):
        worst = flat.max()
        ok = worst < b if kind == "lt" else worst <= b
    elif kind in ("gt", "ge"):
        worst = flat.min()
        ok = worst > b if kind == "gt" else worst >= b
    elif kind == "between":
        lo, hi = b
        if lo > hi:
            raise ValueError(f"ledger.check: between=({lo}, {hi}) is empty")
        worst = flat[np.argmax(np.maximum(lo - flat, flat - hi))]
        ok = bool(np.all((flat >= lo) & (flat <= hi)))
    else:  # close_to
        c = np.broadcast_to(np.asarray(b, dtype=np.float64), arr.shape).ravel()
        if atol < 0 or rtol < 0:
            raise ValueError(f"ledger.check: atol and rtol must be >= 0, got atol={atol}, rtol={rtol}")
        if atol == 0 and rtol == 0:
            raise ValueError("ledger.check: close_to needs atol or rtol > 0 (use equals= for exact equality)")
        err = np.abs(flat - c) - (atol + rtol * np.abs(c))
        i = int(np.argmax(err))
        worst = flat[i]
        ok = bool(np.all(err <= 0))
    return bool(ok), _bound_text(kind, b, atol, rtol), float(worst)


def _bound_text(kind: str, b: Any, atol: float, rtol: float) -> str:
    if kind == "between":
        return f"in [{_fmt(b[0])}, {_fmt(b[1])}]"
    if kind == "close_to":
        arr = np.asarray(b, dtype=np.float64)
        target = _fmt(arr.item()) if arr.size == 1 else "the reference"
        parts = [f"≈ {target}"]
        if atol:
            parts.append(f"± {_fmt(atol)}")
        if rtol:
            parts.append(f"(rel. {_fmt(rtol)})")
        return " ".join(parts)
    symbol = {"lt": "<", "le": "≤", "gt": ">", "ge": "≥"}[kind]
    return f"{symbol} {_fmt(b)}"


# --- the three entry points ----------------------------------------------------------------


def check(
    statement: str,
    value: Any = None,
    *,
    label: str | None = None,
    lt: float | None = None,
    le: float | None = None,
    gt: float | None = None,
    ge: float | None = None,
    between: tuple[float, float] | None = None,
    close_to: Any = None,
    atol: float = 0.0,
    rtol: float = 0.0,
    equals: Any = None,
    holds: bool | None = None,
    unit: str = "",
    data: dict[str, Any] | None = None,
) -> Any:
    """Check a claim: compare ``value`` with one bound, record the row, raise if it fails.

    ``statement`` says in words what is claimed; ``label`` names the statement it belongs to
    ("Claim 2", "Lemma 4", "Pseudocode 3" for the tutorial's, or the book's own, e.g.
    "Eq. (12)"). ``data`` (JSON-serialisable) is kept in the row's ``extra``: sample counts,
    the seed, a whole curve. Returns ``value`` unchanged, so the check can sit
    where the value is computed.
    """
    if not statement or not isinstance(statement, str):
        raise ValueError("ledger.check: `statement` must be a non-empty string")
    bounds = dict(lt=lt, le=le, gt=gt, ge=ge, between=between, close_to=close_to, equals=equals, holds=holds)
    passed, bound, shown = _judge(value, bounds, atol, rtol)
    if value is None and holds is not None:
        shown_text = "true" if holds else "false"
    else:
        shown_text = _value_text(value, shown)
    number = _number(shown)
    row = Row(statement, label, shown_text, bound, "passed" if passed else "failed", number, unit, dict(data or {}))
    _emit(row)
    if not passed:
        where = f"{label}: " if label else ""
        raise CheckFailed(f"{where}{statement}: measured {shown_text}{unit and ' ' + unit}, required {bound}")
    return value


def record(
    statement: str, value: Any, *, label: str | None = None, unit: str = "", data: dict[str, Any] | None = None
) -> Any:
    """Record a measured number the text discusses but does not bound. Returns ``value``."""
    if not statement or not isinstance(statement, str):
        raise ValueError("ledger.record: `statement` must be a non-empty string")
    arr = _as_array(value)
    shown = value if arr is None or arr.size != 1 else arr.item()
    row = Row(statement, label, _value_text(value, shown), "", "measured", _number(shown), unit, dict(data or {}))
    _emit(row)
    return value


def stated(label: str, statement: str, *, why: str = "") -> None:
    """Record that a numbered statement is stated (or derived) in the text but not tested.

    ``why`` says why no number checks it (for example: "a definition", "an algorithm box;
    its code is Pseudocode 2, checked").
    """
    if not label or not statement:
        raise ValueError("ledger.stated: `label` and `statement` must be non-empty")
    _emit(Row(statement, label, "", why, "stated"))


# --- output --------------------------------------------------------------------------------


def _value_text(value: Any, shown: Any) -> str:
    arr = _as_array(value)
    if arr is not None and arr.size > 1:
        return f"{_fmt(shown)} (worst of {arr.size})"
    if arr is not None and arr.size == 1:
        return _fmt(arr.item())  # .item(), not float(): NumPy refuses float() on a 1-D array of one
    return _fmt(value)


def _number(x: Any) -> float | None:
    arr = _as_array(x)
    if arr is None or arr.size != 1:
        return None
    return arr.item()


_MARK = {"passed": "✓", "failed": "✗", "measured": "·", "stated": "○"}


def _text(row: Row) -> str:
    head = f"{_MARK[row.result]} {row.label + ' · ' if row.label else ''}{row.statement}"
    if row.result == "stated":
        return f"{head} · stated{': ' + row.bound if row.bound else ''}"
    tail = f"measured {row.value}{' ' + row.unit if row.unit else ''}"
    return f"{head} · {tail}" + (f" · required {row.bound}" if row.bound else "")


def _html(row: Row) -> str:
    payload = html.escape(row.to_json(), quote=True)
    return (
        f'<div class="{HTML_CLASS} {HTML_CLASS}-{row.result}" data-ledger="{payload}">'
        f"<code>{html.escape(_text(row))}</code></div>"
    )


class _Display:
    """What a notebook shows under the cell: the row as text, and as HTML carrying its data."""

    def __init__(self, row: Row):
        self.row = row

    def _repr_html_(self) -> str:
        return _html(self.row)

    def __repr__(self) -> str:
        return _text(self.row)


def _emit(row: Row) -> None:
    _ROWS.append(row)
    path = os.environ.get(ENV_FILE)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(row.to_json() + "\n")
    try:  # shown under the cell in a notebook; silent in a plain Python process
        from IPython import get_ipython

        if get_ipython() is not None:
            from IPython.display import display

            display(_Display(row))
    except ImportError:
        pass


def glue(name: str, value: Any) -> Any:
    """Bind ``value`` to ``name`` for the prose (`` {glue:text}`name:.3f` `` in MyST) and return it.

    This is myst-nb's ``glue(name, value, display=False)`` when myst-nb is installed (the book
    build); without it (a chapter downloaded and run as a plain notebook) it does nothing, so
    chapters never need myst-nb to run.
    """
    if not name or not isinstance(name, str):
        raise ValueError("ledger.glue: `name` must be a non-empty string")
    try:
        from myst_nb import glue as _myst_glue
    except ImportError:
        return value
    # A one-element torch tensor or a NumPy scalar is stored as a plain Python number, so that
    # `{glue:text}` with a format spec formats it (myst-nb would store "np.float64(...)").
    if hasattr(value, "detach") and value.numel() == 1:
        value = value.detach().cpu().item()
    elif isinstance(value, (np.generic, np.ndarray)) and np.size(value) == 1:
        value = np.asarray(value).item()
    _myst_glue(name, value, display=False)
    return value
