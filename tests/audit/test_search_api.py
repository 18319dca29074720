"""GET /audit/events: each filter narrows exactly, pages are stable while the log grows, only auditors, audited."""

from __future__ import annotations

import base64
from datetime import datetime, timezone
from urllib.parse import parse_qsl, urlsplit

import pytest

from tests.audit.auditors import all_events, call, event_of, start_audit_broker
from tests.scenarios.harness import Broker

DATA = ("fhir.search", "fhir.read")


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def scripted(request, tmp_path_factory, fhir_server):  # type: ignore[no-untyped-def]
    """A broker after a fixed script of real requests; yields (broker, {step: request id}, time marks)."""
    tmp = tmp_path_factory.mktemp("search")
    url = f"sqlite:///{tmp / 'broker.sqlite'}" if request.param == "sqlite" else \
        request.getfixturevalue("pg_server").create_database()
    b = await start_audit_broker(tmp, url, fhir_server.base_url)
    steps: dict[str, str] = {}

    async def step(name: str, method: str, path: str, alias: str, status: int, **kw) -> None:
        r = await call(b, method, path, alias=alias, **kw)
        assert r.status_code == status, (name, r.text)
        steps[name] = r.headers["x-request-id"]

    await step("mh-obs", "GET", "/mdts/mdt-alpha/fhir/Observation", "mh", 200, purpose="TREAT")
    await step("po-cond", "GET", "/mdts/mdt-alpha/fhir/Condition", "po", 200, purpose="COC")
    await step("le-denied", "GET", "/mdts/mdt-alpha/fhir/Observation", "le", 403, purpose="HLEGAL")
    await step("bg-create", "POST", "/mdts/mdt-bravo/break-glass", "mh-team", 201,
               body={"purpose": "ETREAT", "reason": "Synthetic emergency for the audit search test."})
    marks = {"before-bg-read": datetime.now(timezone.utc)}
    await step("bg-read", "GET", "/mdts/mdt-bravo/fhir/Patient", "mh-team", 200, purpose="ETREAT")
    marks["after-bg-read"] = datetime.now(timezone.utc)
    await step("cw-patient", "GET", "/mdts/mdt-charlie/fhir/Patient/pt-charlie", "cw", 200, purpose="COC")
    await step("ed-obs", "GET", "/mdts/mdt-alpha/fhir/Observation", "ed", 200, purpose="COC")
    yield b, steps, marks
    await b.aclose()


async def search(b: Broker, alias: str = "auditor", **params) -> list[dict]:
    """Every page of a search, following ``next``."""
    events: list[dict] = []
    query = {k: str(v) for k, v in params.items()}
    while True:
        r = await call(b, "GET", "/audit/events", alias=alias, params=query)
        assert r.status_code == 200, r.text
        body = r.json()
        events += body["events"]
        if body["next"] is None:
            return events
        query = dict(parse_qsl(urlsplit(body["next"]).query))


def _released(e: dict, c: str) -> bool:
    return c in e["categories"]["released"]


def _decided(e: dict, c: str, effect: str | None = None) -> bool:
    return any(d["category"] == c and (effect is None or d["effect"] == effect) for d in e["decisions"])


# filter -> the predicate an auditor means by it, written independently of broker.audit.search
CASES = {
    "youth": ({"youth": "y-alpha"}, lambda e: e.get("youth_id") == "y-alpha"),
    "actor": ({"actor": "staff-po"}, lambda e: (e.get("actor") or {}).get("sub") == "staff-po"),
    "agency": ({"agency": "bh"}, lambda e: (e.get("actor") or {}).get("agency") == "bh"),
    "role": ({"role": "child-welfare-worker"}, lambda e: (e.get("actor") or {}).get("role") == "child-welfare-worker"),
    "mdt": ({"mdt": "mdt-bravo"}, lambda e: e.get("mdt_id") == "mdt-bravo"),
    "action": ({"action": "fhir.read"}, lambda e: e["action"] == "fhir.read"),
    "outcome": ({"outcome": 403}, lambda e: e["outcome"] == 403),
    "purpose": ({"purpose": "COC"}, lambda e: e.get("purpose") == "COC"),
    "category-released": ({"category": "mental-health", "category_state": "released"},
                          lambda e: _released(e, "mental-health")),
    "category-withheld": ({"category": "sud-part2", "category_state": "withheld"},
                          lambda e: "sud-part2" in e["categories"]["withheld"]),
    "category-decided": ({"category": "sud-part2", "category_state": "decided"},
                         lambda e: _decided(e, "sud-part2")),
    "category-any": ({"category": "mental-health"},
                     lambda e: _released(e, "mental-health") or "mental-health" in e["categories"]["withheld"]
                     or _decided(e, "mental-health")),
    "decision-deny": ({"decision": "deny", "category": "general-health"},
                      lambda e: _decided(e, "general-health", "deny")),
    "decision-allow": ({"decision": "allow"}, lambda e: any(d["effect"] == "allow" for d in e["decisions"])),
    "ground": ({"ground": "break-glass"},
               lambda e: "break-glass" in e["grounds"]["used"]
               or any(d["ground"] == "break-glass" and d["effect"] == "allow" for d in e["decisions"])),
    "break-glass-true": ({"break_glass": "true"}, lambda e: e.get("break_glass") is True),
    "break-glass-false": ({"break_glass": "false", "action": "fhir.search"},
                          lambda e: not e.get("break_glass") and e["action"] == "fhir.search"),
    "combined": ({"youth": "y-alpha", "action": "fhir.search", "purpose": "TREAT"},
                 lambda e: e.get("youth_id") == "y-alpha" and e["action"] == "fhir.search"
                 and e.get("purpose") == "TREAT"),
}
# what the script alone says each filter must find (a sanity anchor besides the oracle)
MUST_FIND = {"youth": {"mh-obs", "po-cond", "ed-obs"}, "actor": {"po-cond"},
             "agency": {"mh-obs", "bg-create", "bg-read"},
             "role": {"cw-patient"}, "mdt": {"bg-create", "bg-read"}, "action": {"cw-patient"},
             "outcome": {"le-denied"}, "purpose": {"po-cond", "ed-obs", "cw-patient"},
             "category-released": {"mh-obs", "po-cond"}, "decision-deny": {"ed-obs"},
             "category-withheld": {"mh-obs", "po-cond"},
             "ground": {"bg-read"}, "break-glass-true": {"bg-read"}, "break-glass-false": {"mh-obs", "ed-obs"},
             "combined": {"mh-obs"}}
MUST_NOT_FIND = {"youth": {"bg-read", "cw-patient"}, "actor": {"mh-obs"}, "agency": {"po-cond"},
                 "mdt": {"mh-obs"}, "outcome": {"mh-obs"}, "purpose": {"mh-obs", "bg-read"},
                 "category-released": {"ed-obs", "le-denied"}, "decision-deny": {"mh-obs"},
                 "category-withheld": {"ed-obs", "cw-patient"},
                 "break-glass-true": {"mh-obs", "bg-create"}, "break-glass-false": {"bg-read"},
                 "combined": {"po-cond"}}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_each_filter_returns_exactly_the_matching_events(scripted, case):
    """The result equals the events whose recorded body satisfies the filter, in sequence order."""
    b, steps, _marks = scripted
    params, predicate = CASES[case]
    stored = all_events(b)
    last = stored[-1][0]
    found = await search(b, **params)
    expected = [seq for seq, e in stored if predicate(e)]
    assert [e["sequence"] for e in found if e["sequence"] <= last] == expected
    assert all(e["action"] == "audit.search" for e in found if e["sequence"] > last)  # the search's own pages
    assert 0 < len(expected) < len(stored)  # the filter narrows, and the script gives it something to find
    ids = {e["request_id"] for e in found}
    assert {steps[s] for s in MUST_FIND.get(case, ())} <= ids
    assert not {steps[s] for s in MUST_NOT_FIND.get(case, ())} & ids


async def test_events_are_returned_as_recorded_without_record_content(scripted):
    """An event from the API is the stored body (plus its hash) and names no released resource."""
    b, steps, _marks = scripted
    found = await search(b, actor="staff-mh")
    mh = next(e for e in found if e["request_id"] == steps["mh-obs"])
    stored = event_of(b, steps["mh-obs"])
    assert {k: v for k, v in mh.items() if k != "hash"} == stored and len(mh["hash"]) == 64
    text = str(found)
    assert "alpha-obs-phq9-2025" not in text and "Testy" not in text and "Placeholder" not in text


async def test_a_time_range_with_zones_selects_by_when_it_happened(scripted):
    """from is inclusive, to exclusive; any zone offset names the same instant."""
    b, steps, marks = scripted
    start = marks["before-bg-read"].astimezone(timezone.utc).isoformat()
    end = marks["after-bg-read"].astimezone().isoformat()  # local offset on purpose
    found = await search(b, **{"from": start, "to": end, "action": "fhir.search"})
    assert [e["request_id"] for e in found] == [steps["bg-read"]]
    zulu = marks["after-bg-read"].strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    later = await search(b, **{"from": zulu, "actor": "staff-cw"})
    assert steps["cw-patient"] in {e["request_id"] for e in later}
    assert steps["bg-read"] not in {e["request_id"] for e in later}


async def test_pages_stay_stable_while_events_are_appended(scripted):
    """Walking with a small limit while new matching events arrive: no duplicates, no gaps, nothing missed."""
    b, _steps, _marks = scripted
    query = {"youth": "y-alpha", "action": "fhir.search", "limit": "1"}
    seen: list[int] = []
    added: list[str] = []
    pages = 0
    while True:
        r = await call(b, "GET", "/audit/events", alias="auditor", params=query)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["events"]) == 1
        seen += [e["sequence"] for e in body["events"]]
        pages += 1
        if body["next"] is None:
            break
        if pages <= 3:  # the log grows between pages
            more = await call(b, "GET", "/mdts/mdt-alpha/fhir/Immunization", alias="mh", purpose="TREAT")
            assert more.status_code == 200
            added.append(more.headers["x-request-id"])
        assert body["next"].startswith("http://127.0.0.1:8000/audit/events?")
        query = dict(parse_qsl(urlsplit(body["next"]).query))
        assert query["youth"] == "y-alpha" and query["limit"] == "1"
    expected = [seq for seq, e in all_events(b) if e.get("youth_id") == "y-alpha" and e["action"] == "fhir.search"]
    assert seen == expected and len(seen) == len(set(seen))
    assert pages >= 6 and len(added) == 3
    by_request = {e["request_id"] for _s, e in all_events(b) if _s in set(seen)}
    assert set(added) <= by_request


async def test_the_cursor_is_opaque_and_the_last_page_has_no_next(scripted):
    """A cursor resumes after the sequence it stands for; a full last page does not promise another."""
    b, _steps, _marks = scripted
    everything = await search(b, action="fhir.search")
    n = len(everything)
    r = await call(b, "GET", "/audit/events", alias="auditor", params={"action": "fhir.search", "limit": str(n)})
    assert r.json()["next"] is None and len(r.json()["events"]) == n
    r = await call(b, "GET", "/audit/events", alias="auditor", params={"action": "fhir.search", "limit": "1"})
    cursor = dict(parse_qsl(urlsplit(r.json()["next"]).query))["cursor"]
    assert base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode() == str(everything[0]["sequence"])
    r = await call(b, "GET", "/audit/events", alias="auditor",
                   params={"action": "fhir.search", "cursor": cursor, "limit": "500"})
    assert [e["sequence"] for e in r.json()["events"]] == [e["sequence"] for e in everything[1:]]


@pytest.mark.parametrize(("params", "named"), [
    ({"cursor": "!!not-base64"}, "cursor"),
    ({"cursor": base64.urlsafe_b64encode(b"12x").decode()}, "cursor"),
    ({"limit": "0"}, "limit"),
    ({"limit": "501"}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"from": "2025-03-01T10:00:00"}, "from"),
    ({"to": "yesterday"}, "to"),
    ({"from": "2025-03-02T00:00:00Z", "to": "2025-03-01T00:00:00Z"}, "to"),
    ({"decision": "maybe"}, "decision"),
    ({"break_glass": "yes"}, "break_glass"),
    ({"category": "gossip"}, "category"),
    ({"category_state": "released"}, "category_state"),
    ({"purpose": "CURIOSITY"}, "purpose"),
    ({"ground": "friendship"}, "ground"),
    ({"outcome": "20x"}, "outcome"),
    ({"youth": "y alpha<script>"}, "youth"),
    ({"action": "DROP TABLE"}, "action"),
    ({"actr": "staff-po"}, "actr"),
])
async def test_malformed_filters_are_a_400_naming_the_parameter(scripted, params, named):
    """A typo never silently widens or empties a search; the answer names the parameter, not the value."""
    b, _steps, _marks = scripted
    r = await call(b, "GET", "/audit/events", alias="auditor", params=params)
    assert r.status_code == 400, r.text
    diagnostics = r.json()["issue"][0]["diagnostics"]
    assert named in diagnostics
    assert "<script>" not in diagnostics


@pytest.mark.parametrize("alias", ["po", "cw", "mh", "depatty", "admin", "le"])
async def test_only_auditors_and_privacy_officers_may_search(scripted, alias):
    """Team members and registry admins get 403, whatever they ask for, and the attempt is on record."""
    b, _steps, _marks = scripted
    r = await call(b, "GET", "/audit/events", alias=alias, params={"youth": "y-alpha"})
    assert r.status_code == 403
    assert "events" not in r.text
    stored = event_of(b, r.headers["x-request-id"])
    assert stored["action"] == "audit.search" and stored["outcome"] == 403


async def test_every_search_is_itself_audited(scripted):
    """The search names who searched, which filters (not their values beyond the youth) and how many came back."""
    b, _steps, _marks = scripted
    r = await call(b, "GET", "/audit/events", alias="privacy", params={"youth": "y-alpha", "decision": "deny"})
    assert r.status_code == 200
    stored = event_of(b, r.headers["x-request-id"])
    assert stored["action"] == "audit.search" and stored["outcome"] == 200
    assert stored["actor"] == {"sub": "staff-privacy", "agency": "audit", "role": "privacy-officer"}
    assert stored["youth_id"] == "y-alpha"
    assert stored["detail"] == {"filters": ["decision", "youth"], "returned": len(r.json()["events"])}
    bad = await call(b, "GET", "/audit/events", alias="auditor", params={"limit": "0"})
    assert event_of(b, bad.headers["x-request-id"])["outcome"] == 400
    later = await search(b, action="audit.search", actor="staff-privacy")
    assert r.headers["x-request-id"] in {e["request_id"] for e in later}
