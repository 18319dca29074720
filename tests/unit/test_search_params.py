"""The facade's search parameter allow-list."""

from __future__ import annotations

import pytest

from broker.errors import BadRequest
from broker.pipeline.search_params import parse_search


@pytest.mark.parametrize("items", [
    [("code", "http://loinc.org|29463-7")], [("code", "29463-7,2106-3")], [("date", "ge2025-01-01")],
    [("date", "ge2025-01-01"), ("date", "lt2026")], [("_lastUpdated", "gt2025-01-01T10:00:00Z")],
    [("_id", "alpha-obs-1")], [("_sort", "-date")], [("status", "final")], [("_format", "json")],
])
def test_accepted(items):
    parsed = parse_search(items, max_count=50)
    assert all(name in dict(items) for name, _ in parsed.params)


@pytest.mark.parametrize(("items", "fragment"), [
    ([("patient", "Patient/x")], "unsupported"), ([("subject", "x")], "unsupported"),
    ([("_include", "Observation:patient")], "unsupported"), ([("_has:Condition:patient:code", "x")], "unsupported"),
    ([("code:text", "x")], "unsupported"), ([("date", "2025-13-45T")], "malformed"), ([("date", "soon")], "malformed"),
    ([("_count", "abc")], "integer"), ([("_count", "-1")], "integer"), ([("_count", "1"), ("_count", "2")], "once"),
    ([("_sort", "name")], "malformed"), ([("code", "a b")], "malformed"), ([("_id", "../../x")], "malformed"),
    ([("_format", "xml")], "JSON"), ([("code", ",".join(["x"] * 21))], "too many"),
    ([("date", "ge2025")] * 21, "too many"),
])
def test_refused_with_the_parameter_named(items, fragment):
    with pytest.raises(BadRequest) as err:
        parse_search(items, max_count=50)
    assert fragment in err.value.diagnostics
    assert "Patient/x" not in err.value.diagnostics


def test_count_is_capped_and_offset_kept():
    parsed = parse_search([("_count", "5000"), ("_offset", "40")], max_count=200)
    assert (parsed.count, parsed.offset, parsed.params) == (200, 40, ())
