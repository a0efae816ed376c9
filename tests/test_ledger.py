"""The ledger helper: bounds judged right, rows recorded and written, failures raised."""

import json

import numpy as np
import pytest
import torch

from stepdiff import ledger


@pytest.fixture(autouse=True)
def _fresh():
    ledger.clear()
    yield
    ledger.clear()


@pytest.mark.parametrize(
    ("value", "bound", "passes"),
    [
        (0.5, {"lt": 1.0}, True),
        (1.0, {"lt": 1.0}, False),
        (1.0, {"le": 1.0}, True),
        (1.0 + 1e-12, {"le": 1.0}, False),
        (2.0, {"gt": 1.0}, True),
        (1.0, {"ge": 1.0}, True),
        (0.999, {"ge": 1.0}, False),
        (1.5, {"between": (1.0, 2.0)}, True),
        (2.5, {"between": (1.0, 2.0)}, False),
        (2.05, {"close_to": 2.0, "atol": 0.1}, True),
        (2.2, {"close_to": 2.0, "atol": 0.1}, False),
        (2.2, {"close_to": 2.0, "rtol": 0.2}, True),
        (7, {"equals": 7}, True),
        (7, {"equals": 8}, False),
        ("abc", {"equals": "abc"}, True),
    ],
)
def test_scalar_bounds(value, bound, passes):
    if passes:
        assert ledger.check("statement", value, **bound) == value
        assert ledger.rows()[-1].result == "passed"
    else:
        with pytest.raises(ledger.CheckFailed, match="statement"):
            ledger.check("statement", value, **bound)
        assert ledger.rows()[-1].result == "failed"


def test_array_bounds_hold_elementwise_and_show_the_worst_element():
    rng = np.random.default_rng(0)
    errors = rng.uniform(0, 0.5, size=17)
    ledger.check("all errors small", errors, lt=0.6)
    row = ledger.rows()[-1]
    assert row.number == pytest.approx(errors.max())
    assert "worst of 17" in row.value
    errors[5] = 0.7
    with pytest.raises(ledger.CheckFailed):
        ledger.check("all errors small", errors, lt=0.6)
    assert ledger.rows()[-1].number == pytest.approx(0.7)
    # close_to against a reference array: the worst element is the one farthest outside.
    ref = torch.linspace(0, 1, 9, dtype=torch.float64)
    got = ref + 1e-9
    got[3] += 1e-3
    with pytest.raises(ledger.CheckFailed):
        ledger.check("matches the reference", got, close_to=ref, atol=1e-6)
    assert ledger.rows()[-1].number == pytest.approx(float(got[3]))
    ledger.check("lower bound", torch.tensor([3.0, 2.0, 5.0]), ge=2.0)
    assert ledger.rows()[-1].number == 2.0


def test_nan_never_passes():
    with pytest.raises(ledger.CheckFailed):
        ledger.check("finite", float("nan"), lt=1.0)
    with pytest.raises(ledger.CheckFailed):
        ledger.check("finite", np.array([0.1, np.nan]), close_to=0.0, atol=1.0)


def test_holds_records_a_boolean_claim():
    ledger.check("the KL decreases", [0.3, 0.2, 0.1], holds=True)
    with pytest.raises(ledger.CheckFailed):
        ledger.check("the KL decreases", holds=False)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"lt": 1.0, "gt": 0.0}, {"close_to": 1.0}, {"close_to": 1.0, "atol": -1.0}, {"between": (2.0, 1.0)}],
)
def test_bad_bounds_are_rejected(kwargs):
    with pytest.raises(ValueError):
        ledger.check("statement", 0.5, **kwargs)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="statement"):
        ledger.check("", 1.0, lt=2.0)
    with pytest.raises(TypeError, match="numeric"):
        ledger.check("statement", "not a number", lt=2.0)
    with pytest.raises(ValueError, match="label"):
        ledger.stated("", "something")


def test_a_one_element_list_or_array_is_shown_as_its_number():
    rng = np.random.default_rng(3)
    x = float(rng.uniform(1, 9))
    for value in ([x], np.array([x]), torch.tensor([[x]], dtype=torch.float64)):
        ledger.check("one element", value, equals=[x] if isinstance(value, list) else value)
        row = ledger.rows()[-1]
        assert (row.result, row.number) == ("passed", pytest.approx(x))
        assert row.value == ledger._fmt(x)  # the number, not "[x]" or "worst of 1"
    with pytest.raises(ledger.CheckFailed):
        ledger.check("one element", [x], equals=[x + 1])


def test_record_and_stated_rows():
    ledger.record("the measured slope", torch.tensor(1.234567))
    ledger.stated("Definition 1", "a reverse sampler maps p_t to p_{t-1}", why="a definition")
    measured, stated = ledger.rows()
    assert (measured.result, measured.value, measured.number) == ("measured", "1.235", pytest.approx(1.234567))
    assert (stated.result, stated.label, stated.bound) == ("stated", "Definition 1", "a definition")


def test_rows_are_written_to_the_named_file(tmp_path, monkeypatch):
    path = tmp_path / "ledger.jsonl"
    monkeypatch.setenv(ledger.ENV_FILE, str(path))
    ledger.check("one", 1.0, close_to=1.0, atol=1e-9, label="Claim 2", data={"n": 10})
    with pytest.raises(ledger.CheckFailed):
        ledger.check("two", 3.0, le=2.0)
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["result"] for r in written] == ["passed", "failed"]
    assert written[0]["label"] == "Claim 2" and written[0]["extra"] == {"n": 10}


def test_html_carries_the_row_for_the_book():
    ledger.check("a < b", 0.25, lt=0.5, label="Lemma 3")
    html = ledger._Display(ledger.rows()[-1])._repr_html_()
    assert f'class="{ledger.HTML_CLASS} {ledger.HTML_CLASS}-passed"' in html
    payload = html.split('data-ledger="')[1].split('"')[0]
    import html as html_lib

    row = json.loads(html_lib.unescape(payload))
    assert (row["label"], row["statement"], row["result"], row["bound"]) == ("Lemma 3", "a < b", "passed", "< 0.5")


@pytest.mark.parametrize(
    ("x", "text"),
    [(0.0, "0"), (1.23456, "1.235"), (1.5e-7, "1.50e-07"), (123456.0, "1.23e+05"), (3, "3"), (True, "true")],
)
def test_numbers_are_formatted_for_reading(x, text):
    assert ledger._fmt(x) == text


def test_glue_returns_the_value_and_checks_the_name():
    assert ledger.glue("x", 1.5) == 1.5
    with pytest.raises(ValueError, match="name"):
        ledger.glue("", 1.0)


def test_glue_stores_plain_python_numbers(monkeypatch):
    import sys
    import types

    seen = {}
    fake = types.SimpleNamespace(glue=lambda name, value, display: seen.update({name: value}))
    monkeypatch.setitem(sys.modules, "myst_nb", fake)
    ledger.glue("a", np.float64(0.25))
    ledger.glue("b", torch.tensor(3))
    ledger.glue("c", np.array([2.5]))
    assert seen == {"a": 0.25, "b": 3, "c": 2.5}
    assert all(type(v) in (float, int) for v in seen.values())
