"""Identity linking: link source ids to a youth, refuse conflicting links, correct mistakes, and find a
youth by a source id without revealing to anyone outside the team that the youth is on a CSEC team.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import event, func, select

from broker.domain import Principal
from broker.errors import NO_ACCESS, Conflict
from broker.registry import schemas, service
from broker.store.models import AuditEventRow, Mdt, YouthIdentifier
from tests.audit.auditors import token as persona_token
from tests.scenarios.harness import CWS_SYSTEM, EHR_SYSTEM, PERSONAS

EHR, CWS = "county-ehr", "county-cws"
SOURCES = {EHR: EHR_SYSTEM, CWS: CWS_SYSTEM}
_tokens: dict[tuple[int, str], str] = {}


async def call(b, method, path, alias, body=None, params=None):
    """One request as a persona (or the auditor), with a cached real access token."""
    key = (id(b), alias)
    if key not in _tokens:
        _tokens[key] = await persona_token(b, alias)
    headers = {"Authorization": f"Bearer {_tokens[key]}"}
    return await b.client.request(method, path, headers=headers, json=body, params=params)


def ehr(value: str) -> dict:
    return {"source": EHR, "system": EHR_SYSTEM, "value": value}


def cws(value: str) -> dict:
    return {"source": CWS, "system": CWS_SYSTEM, "value": value}


def fresh_value(prefix: str = "pt") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def link(b, youth_id, alias, *identifiers):
    return await call(b, "POST", f"/youth/{youth_id}/identifiers", alias, {"identifiers": list(identifiers)})


async def lookup(b, alias, system, value):
    return await call(b, "GET", "/youth", alias, params={"identifier": f"{system}|{value}"})


async def new_team(b) -> tuple[str, str]:
    """A youth with no identifiers and an open team led by the child welfare agency (no members yet)."""
    r = await call(b, "POST", "/youth", "cw", {"identifiers": []})
    assert r.status_code == 201, r.text
    youth_id = r.json()["id"]
    r = await call(b, "POST", "/mdts", "cw", {"youth_id": youth_id, "lead_agency": "cws"})
    assert r.status_code == 201, r.text
    return youth_id, r.json()["id"]


async def add_member(b, mdt_id, alias) -> None:
    p = PERSONAS[alias]
    r = await call(b, "POST", f"/mdts/{mdt_id}/members", "cw",
                   {"sub": p.sub, "agency": p.agency, "team_role": p.role})
    assert r.status_code == 201, r.text


def close_team(b, mdt_id) -> None:
    with b.runtime.sessions() as s:
        s.get(Mdt, mdt_id).closed_at = datetime.now(timezone.utc) - timedelta(seconds=1)
        s.commit()


def audited(b, response) -> dict:
    """The audit event of one response (committed before the response was returned)."""
    with b.runtime.sessions() as s:
        row = s.scalars(select(AuditEventRow).where(
            AuditEventRow.request_id == response.headers["x-request-id"])).one()
        body = json.loads(row.body)
        assert body["outcome"] == row.outcome == response.status_code
        assert row.youth_id == body["youth_id"]
        return body


def owners(b, system, value) -> list[str]:
    with b.runtime.sessions() as s:
        return list(s.scalars(select(YouthIdentifier.youth_id).where(YouthIdentifier.system == system,
                                                                    YouthIdentifier.value == value)))


def links_of(b, youth_id) -> list[tuple[str, str, str]]:
    with b.runtime.sessions() as s:
        return [(r.source, r.system, r.value) for r in s.scalars(
            select(YouthIdentifier).where(YouthIdentifier.youth_id == youth_id).order_by(YouthIdentifier.id))]


def diagnostics(response) -> str:
    return response.json()["issue"][0]["diagnostics"]


# ---- linking ------------------------------------------------------------------------------

async def test_link_then_relink_is_idempotent_and_audited(linking_broker):
    b = linking_broker
    youth_id, _mdt = await new_team(b)
    value = fresh_value()
    r = await link(b, youth_id, "cw", ehr(value))
    assert r.status_code == 200, r.text
    assert r.json()["id"] == youth_id and r.json()["identifiers"] == [ehr(value)]
    event = audited(b, r)
    assert event["action"] == "youth.identifiers.link" and event["youth_id"] == youth_id

    again = await link(b, youth_id, "cw", ehr(value))
    assert again.status_code == 200 and again.json() == r.json()
    assert owners(b, EHR_SYSTEM, value) == [youth_id]  # no second row

    second = fresh_value("cws")
    r = await link(b, youth_id, "cw", ehr(value), cws(second))  # one already there, one new
    assert r.status_code == 200 and r.json()["identifiers"] == [ehr(value), cws(second)]
    assert links_of(b, youth_id) == [(EHR, EHR_SYSTEM, value), (CWS, CWS_SYSTEM, second)]


async def test_an_id_on_another_youth_is_a_409_that_does_not_name_that_youth(linking_broker):
    b = linking_broker
    youth_id, _mdt = await new_team(b)
    before = links_of(b, youth_id)
    r = await link(b, youth_id, "cw", ehr("pt-alpha"))  # the seeded y-alpha's EHR id
    assert r.status_code == 409
    assert diagnostics(r) == service.LINKED_ELSEWHERE
    assert "y-alpha" not in r.text and "mdt-alpha" not in r.text and "pt-alpha" not in r.text
    assert owners(b, EHR_SYSTEM, "pt-alpha") == ["y-alpha"]
    # all or nothing: the good identifier in the same request is not linked either
    good = fresh_value("cws")
    r = await link(b, youth_id, "cw", cws(good), ehr("pt-alpha"))
    assert r.status_code == 409 and owners(b, CWS_SYSTEM, good) == []
    assert links_of(b, youth_id) == before
    event = audited(b, r)
    assert event["action"] == "youth.identifiers.link" and event["error"] == "Conflict"


async def test_a_second_id_in_the_same_source_is_refused(linking_broker):
    b = linking_broker
    youth_id, _mdt = await new_team(b)
    first = fresh_value()
    assert (await link(b, youth_id, "admin", ehr(first))).status_code == 200
    r = await link(b, youth_id, "cw", ehr(fresh_value()))
    assert r.status_code == 409 and diagnostics(r) == service.SOURCE_TAKEN
    assert links_of(b, youth_id) == [(EHR, EHR_SYSTEM, first)]


@pytest.mark.parametrize(("identifiers", "names"), [
    ([{"source": "nowhere", "system": EHR_SYSTEM, "value": "zq-1"}], "unknown source"),
    ([{"source": EHR, "system": CWS_SYSTEM, "value": "zq-1"}], "identifier system of its source"),
    ([{"source": EHR, "system": "urn:zq:made-up", "value": "zq-1"}], "identifier system of its source"),
    ([ehr("zq-1"), ehr("zq-2")], "more than one identifier for the same source"),
    ([ehr("zq-1"), ehr("zq-1")], "duplicate identifier"),
    ([], "identifiers"),
    ([{**ehr("zq-1"), "name": "Zq Placeholder"}], "identifiers.0.name"),
    ([ehr("zq 1; drop")], "identifiers.0.value"),
])
async def test_bad_identifiers_are_a_400_and_link_nothing(linking_broker, identifiers, names):
    b = linking_broker
    youth_id, _mdt = await new_team(b)
    r = await link(b, youth_id, "cw", *identifiers)
    assert r.status_code == 400, r.text
    assert r.json()["resourceType"] == "OperationOutcome" and names in diagnostics(r)
    assert "Placeholder" not in r.text and "drop" not in r.text
    assert links_of(b, youth_id) == []
    assert audited(b, r)["action"] == "youth.identifiers.link"


async def test_who_may_link(linking_broker):
    """The registry admin, or staff of the lead agency of one of the youth's open teams (the roster rule)."""
    b = linking_broker
    youth_id, mdt_id = await new_team(b)
    await add_member(b, mdt_id, "po")
    refused = {}
    for alias in ("po", "mh", "da", "le", "auditor", "privacy"):
        r = await link(b, youth_id, alias, ehr(fresh_value()))
        assert r.status_code == 403, (alias, r.text)
        refused[alias] = r.content
        assert audited(b, r)["youth_id"] == youth_id
    assert set(refused.values()) == {refused["po"]} and diagnostics(r) == NO_ACCESS
    # refused before the terms are read: a bad body tells a refused caller nothing
    r = await link(b, youth_id, "po", {"source": "nowhere", "system": "urn:x", "value": "v"})
    assert r.status_code == 403 and r.content == refused["po"]
    # an unknown youth gets the same answer
    assert (await link(b, "y-nobody", "cw", ehr(fresh_value()))).content == refused["po"]
    assert links_of(b, youth_id) == []

    # lead agency staff who are not on the roster may (as they may manage the roster), and the admin
    assert (await link(b, youth_id, "cw-other", ehr(fresh_value()))).status_code == 200
    assert (await link(b, youth_id, "admin", cws(fresh_value("cws")))).status_code == 200

    # once the team is closed only the admin may link
    other_youth, other_mdt = await new_team(b)
    close_team(b, other_mdt)
    assert (await link(b, other_youth, "cw", ehr(fresh_value()))).content == refused["po"]
    assert (await link(b, other_youth, "admin", ehr(fresh_value()))).status_code == 200


async def test_concurrent_links_of_one_id_to_two_youth_one_wins(linking_broker):
    b = linking_broker
    first, _m1 = await new_team(b)
    second, _m2 = await new_team(b)
    for _round in range(4):
        value = fresh_value()
        results = await asyncio.gather(link(b, first, "cw", ehr(value)), link(b, second, "cw", ehr(value)))
        assert sorted(r.status_code for r in results) == [200, 409], [r.text for r in results]
        winner = first if results[0].status_code == 200 else second
        assert owners(b, EHR_SYSTEM, value) == [winner]
        loser = next(r for r in results if r.status_code == 409)
        assert diagnostics(loser) == service.LINKED_ELSEWHERE and winner not in loser.text
        assert (await call(b, "DELETE", f"/youth/{winner}/identifiers/{EHR}", "admin")).status_code == 200
    # the same id linked twice at once to the same youth: both succeed, one row
    value = fresh_value()
    results = await asyncio.gather(*(link(b, first, "cw", ehr(value)) for _ in range(3)))
    assert [r.status_code for r in results] == [200, 200, 200]
    assert owners(b, EHR_SYSTEM, value) == [first]


async def test_the_unique_constraint_decides_a_race_the_check_cannot_see(linking_broker):
    """Another transaction inserts the id after our check but before our commit: 409, never a 500."""
    b = linking_broker
    first, _m1 = await new_team(b)
    second, _m2 = await new_team(b)
    value = fresh_value()
    admin = PERSONAS["admin"]
    principal = Principal(sub=admin.sub, agency=admin.agency, role=admin.role, client_id="test")
    body = schemas.IdentifiersIn.model_validate({"identifiers": [ehr(value)]})
    outcome: list[object] = []

    def racer() -> None:
        try:
            with b.runtime.sessions() as s:
                outcome.append(service.link_identifiers(s, principal=principal, youth_id=second, body=body,
                                                        now=datetime.now(timezone.utc), source_systems=SOURCES))
        except Exception as err:  # noqa: BLE001 - the test inspects what came out
            outcome.append(err)

    with b.runtime.sessions() as holder:
        holder.add(YouthIdentifier(youth_id=first, source=EHR, system=EHR_SYSTEM, value=value))
        holder.flush()  # uncommitted: invisible to the racer's check, but it holds the unique key (or the lock)
        thread = threading.Thread(target=racer)
        thread.start()
        time.sleep(0.4)
        assert thread.is_alive(), outcome  # the racer waits on our transaction
        holder.commit()
    thread.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], Conflict), outcome
    assert str(outcome[0]) == service.LINKED_ELSEWHERE
    assert owners(b, EHR_SYSTEM, value) == [first]


# ---- unlinking ----------------------------------------------------------------------------

async def test_the_admin_removes_a_mistaken_link_and_the_audit_keeps_which_source(linking_broker):
    b = linking_broker
    wrong, _m1 = await new_team(b)
    right, _m2 = await new_team(b)
    value, kept = fresh_value(), fresh_value("cws")
    assert (await link(b, wrong, "cw", ehr(value), cws(kept))).status_code == 200
    assert (await link(b, right, "cw", ehr(value))).status_code == 409

    for alias in ("cw", "po", "auditor"):
        r = await call(b, "DELETE", f"/youth/{wrong}/identifiers/{EHR}", alias)
        assert r.status_code == 403 and diagnostics(r) == service.ONLY_ADMIN_UNLINKS
        assert audited(b, r)["detail"]["source"] == EHR
    r = await call(b, "DELETE", f"/youth/{wrong}/identifiers/{EHR}", "admin")
    assert r.status_code == 200, r.text
    assert r.json()["id"] == wrong and r.json()["identifiers"] == [cws(kept)]
    event = audited(b, r)
    assert event["action"] == "youth.identifiers.unlink" and event["youth_id"] == wrong
    assert event["detail"] == {"source": EHR, "identifier_systems": [EHR_SYSTEM]}
    assert value not in json.dumps(event)  # the source's id for the youth is not copied into the log

    assert (await link(b, right, "cw", ehr(value))).status_code == 200  # now it can go where it belongs
    r = await call(b, "DELETE", f"/youth/{wrong}/identifiers/{EHR}", "admin")
    assert r.status_code == 404 and diagnostics(r) == "the youth has no identifier in that source"
    assert (await call(b, "DELETE", f"/youth/y-nobody/identifiers/{EHR}", "admin")).status_code == 404
    assert (await call(b, "DELETE", f"/youth/{wrong}/identifiers/Not_A_Source", "admin")).status_code == 400
    assert links_of(b, wrong) == [(CWS, CWS_SYSTEM, kept)]


# ---- lookup -------------------------------------------------------------------------------

async def test_a_team_member_finds_the_youth_by_any_linked_id(linking_broker):
    b = linking_broker
    for system, value in ((EHR_SYSTEM, "pt-alpha"), (CWS_SYSTEM, "cws-0001")):
        r = await lookup(b, "po", system, value)
        assert r.status_code == 200, r.text
        assert r.json() == {"youth_id": "y-alpha", "mdts": ["mdt-alpha"]}
        event = audited(b, r)
        assert event["action"] == "youth.lookup" and event["youth_id"] == "y-alpha"
        assert event["detail"] == {"identifier_system": system, "matched": True, "mdts": ["mdt-alpha"],
                                   "answered_as": ["mdt-member"]}
        assert value not in json.dumps(event)
    # only the teams the caller is on: cw-other is on mdt-bravo only
    r = await lookup(b, "cw-other", EHR_SYSTEM, "pt-bravo")
    assert r.json() == {"youth_id": "y-bravo", "mdts": ["mdt-bravo"]}


def _same_404(reference, response) -> None:
    assert response.status_code == reference.status_code == 404
    assert response.content == reference.content
    strip = {"x-request-id", "date"}
    assert {k: v for k, v in response.headers.items() if k not in strip} == \
        {k: v for k, v in reference.headers.items() if k not in strip}


async def test_everyone_else_gets_the_same_404_as_for_an_unknown_id(linking_broker):
    """Non-member, ended member, other agency, auditor, admin off the team: exactly what 'not registered' gets."""
    b = linking_broker
    reference = await lookup(b, "da", EHR_SYSTEM, "pt-nobody")
    assert reference.json()["issue"][0] == {"severity": "error", "code": "not-found",
                                            "diagnostics": service.NOT_FOUND_BY_IDENTIFIER}
    cases = [("cw-other", "pt-alpha"), ("po-ended", "pt-alpha"), ("da", "pt-alpha"), ("le", "pt-alpha"),
             ("auditor", "pt-alpha"), ("privacy", "pt-alpha"), ("admin", "pt-alpha"), ("po", "pt-nobody"),
             ("auditor", "pt-nobody")]
    responses = [await lookup(b, alias, EHR_SYSTEM, value) for alias, value in cases]
    for response in [reference, *responses]:
        _same_404(reference, response)
        event = audited(b, response)
        # the caller's own audit event (auditors can read theirs) tells them nothing either
        assert event["youth_id"] is None and event["mdt_id"] is None
        assert event["detail"] == {"identifier_system": EHR_SYSTEM, "matched": False}
        assert event["grounds"]["court_order_ids"] == [] and "pt-alpha" not in json.dumps(event)


async def test_membership_that_ends_or_a_team_that_closes_stops_the_answer(linking_broker):
    b = linking_broker
    youth_id, mdt_id = await new_team(b)
    value = fresh_value()
    assert (await link(b, youth_id, "cw", ehr(value))).status_code == 200
    reference = await lookup(b, "mh", EHR_SYSTEM, "pt-nobody")
    _same_404(reference, await lookup(b, "mh", EHR_SYSTEM, value))  # registered, not yet on the team
    await add_member(b, mdt_id, "mh")
    assert (await lookup(b, "mh", EHR_SYSTEM, value)).json() == {"youth_id": youth_id, "mdts": [mdt_id]}
    close_team(b, mdt_id)
    _same_404(reference, await lookup(b, "mh", EHR_SYSTEM, value))


async def test_a_requester_a_court_order_names_finds_the_youth_until_it_is_revoked(linking_broker):
    b = linking_broker
    youth_id, mdt_id = await new_team(b)
    value = fresh_value()
    assert (await link(b, youth_id, "cw", ehr(value))).status_code == 200
    reference = await lookup(b, "da", EHR_SYSTEM, "pt-nobody")
    _same_404(reference, await lookup(b, "da", EHR_SYSTEM, value))
    r = await call(b, "POST", "/court-orders", "admin", {
        "youth_id": youth_id, "case_number": "JV-2026-0107", "court": "Superior Court, Juvenile Division",
        "categories": ["juvenile-court"], "purposes": ["HLEGAL"],
        "recipients": [{"kind": "person", "value": PERSONAS["da"].sub}]})
    assert r.status_code == 201, r.text
    order_id = r.json()["id"]

    r = await lookup(b, "da", EHR_SYSTEM, value)
    assert r.status_code == 200 and r.json() == {"youth_id": youth_id, "mdts": [mdt_id]}
    event = audited(b, r)
    assert event["youth_id"] == youth_id and event["grounds"]["court_order_ids"] == [order_id]
    assert event["detail"]["answered_as"] == ["court-order"]
    _same_404(reference, await lookup(b, "le", EHR_SYSTEM, value))  # the order names one person only

    assert (await call(b, "POST", f"/court-orders/{order_id}/revoke", "admin")).status_code == 200
    _same_404(reference, await lookup(b, "da", EHR_SYSTEM, value))


@pytest.mark.parametrize("params", [
    {"identifier": "pt-alpha"},
    {"identifier": "|pt-alpha"},
    {"identifier": f"{EHR_SYSTEM}|"},
    {"identifier": f"{EHR_SYSTEM}|pt alpha"},
    {"identifier": f"{EHR_SYSTEM}|pt-alpha|x"},
    {"identifier": f"{EHR_SYSTEM}|" + "a" * 300},
    {"identifier": "urn:zq:made-up|pt-alpha"},
    {"identifier": [f"{EHR_SYSTEM}|pt-alpha", f"{EHR_SYSTEM}|pt-bravo"]},
    {"identifier": f"{EHR_SYSTEM}|pt-alpha", "name": "Zq"},
    {},
])
async def test_a_malformed_lookup_is_a_400_and_audited(linking_broker, params):
    b = linking_broker
    r = await call(b, "GET", "/youth", "po", params=params)
    assert r.status_code == 400, r.text
    assert r.json()["resourceType"] == "OperationOutcome" and r.json()["issue"][0]["code"] == "invalid"
    assert "pt-alpha" not in r.text and "Zq" not in r.text and "zq" not in r.text
    event = audited(b, r)
    assert event["action"] == "youth.lookup" and event["youth_id"] is None and event["error"] == "BadRequest"


async def test_the_lookup_runs_the_same_queries_whatever_the_answer(linking_broker):
    """Timing must not tell a registered youth from an unknown id: same statements, same count."""
    b = linking_broker
    engine = b.runtime.engine
    now = datetime.now(timezone.utc)

    def statements(alias: str, value: str) -> tuple[list[str], str | None]:
        p = PERSONAS[alias]
        principal = Principal(sub=p.sub, agency=p.agency, role=p.role, client_id="test")
        seen: list[str] = []

        def record(_conn, _cursor, statement, *_args):  # type: ignore[no-untyped-def]
            seen.append(statement)

        event.listen(engine, "before_cursor_execute", record)
        try:
            with b.runtime.sessions() as s:
                found = service.lookup_youth(s, principal=principal, system=EHR_SYSTEM, value=value, now=now)
        finally:
            event.remove(engine, "before_cursor_execute", record)
        return seen, found.youth_id

    member, answered = statements("po", "pt-alpha")
    outsider, refused = statements("da", "pt-alpha")
    unknown, missing = statements("da", "pt-nobody")
    assert answered == "y-alpha" and refused is None and missing is None
    assert len(member) >= 3 and member == outsider == unknown


async def test_the_new_routes_need_a_token(linking_broker):
    c = linking_broker.client
    assert (await c.get("/youth", params={"identifier": f"{EHR_SYSTEM}|pt-alpha"})).status_code == 401
    assert (await c.post("/youth/y-alpha/identifiers", json={"identifiers": [ehr("x-1")]})).status_code == 401
    assert (await c.delete(f"/youth/y-alpha/identifiers/{EHR}")).status_code == 401
    with linking_broker.runtime.sessions() as s:
        assert s.scalar(select(func.count()).select_from(YouthIdentifier).where(
            YouthIdentifier.youth_id == "y-alpha")) == 2
