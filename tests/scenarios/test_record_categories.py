"""The matrix for the agency categories, through GET /mdts/{id}/record and the FHIR facade.

Five real sources: the Node FHIR server (health) and the four SQL-backed agency systems
(child welfare, probation, juvenile court, school district) on SQLite, built from the
synthetic generator. Reporter identity and placement address are element-level labels.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from broker.store.models import AuditEventRow, MembershipRow, Staff, YouthIdentifier
from connectors import synthetic
from tests.scenarios.harness import EHR_SYSTEM, EHR_TYPES, Broker, start_broker
from broker.settings import SourceConfig

RECORD = "/mdts/mdt-alpha/record"
REFERRALS = {"cws-referral-7001", "cws-referral-7002"}
STATEMENTS = {"cws-statement-8001", "cws-statement-8003", "prb-interview-9801"}
PLACEMENTS_WITH_ADDRESS = {"cws-placement-6002", "cws-placement-6003"}
ADDRESS_URL = "https://mdt-broker.example.org/StructureDefinition/placement-address"
# Extra staff only this module needs: an education liaison who holds the school's own access,
# and a probation officer on the team without their own statutory access to school records.
EXTRA = {"ed-school": ("schools", "education-liaison", True), "po-team": ("probation", "probation-officer", False)}


@pytest.fixture(scope="module")
async def agency_broker(tmp_path_factory, fhir_server) -> Broker:
    tmp = tmp_path_factory.mktemp("agencies")
    urls = synthetic.build_sqlite(tmp / "sources")
    sources = [SourceConfig(name="county-ehr", kind="fhir", base_url=fhir_server.base_url,
                            identifier_system=EHR_SYSTEM, default_categories=["general-health"],
                            resource_types=EHR_TYPES, timeout=5),
               *synthetic.source_configs(urls, timeout=5)]
    b = await start_broker(tmp, f"sqlite:///{tmp / 'broker.sqlite'}", fhir_server.base_url, sources=sources)
    now = datetime.now(timezone.utc)
    with b.runtime.sessions() as s:
        for youth, ids in synthetic.TEST_YOUTH.items():
            for source, value in ids.items():
                s.add(YouthIdentifier(youth_id=youth, source=source, system=synthetic.identifier_system(source),
                                      value=value))
        for alias, (agency, role, statutory) in EXTRA.items():
            s.add(Staff(sub=f"staff-{alias}", agency_id=agency, roles=[role], active=True))
            s.add(MembershipRow(id=f"m-{alias}", mdt_id="mdt-alpha", agency_id=agency, sub=f"staff-{alias}",
                                team_role=role, statutory=statutory, valid_from=now - timedelta(days=1),
                                valid_to=None, added_by="seed"))
        s.commit()
    yield b
    await b.aclose()


async def _token(b: Broker, alias: str) -> str:
    if alias in EXTRA:
        agency, role, _ = EXTRA[alias]
        r = await b.request_token(agency=agency, sub=f"staff-{alias}", role=role)
        assert r.status_code == 200, r.text
        return r.json()["access_token"]
    return await b.token(alias)


async def record(b: Broker, alias: str, purpose: str) -> tuple[dict[str, dict], dict, str]:
    """({id: resource}, bundle, raw text) of the record view."""
    r = await b.get(RECORD, token=await _token(b, alias), purpose=purpose)
    assert r.status_code == 200, r.text
    bundle = r.json()
    items = {e["resource"]["id"]: e["resource"] for e in bundle["entry"]
             if e["resource"]["resourceType"] != "OperationOutcome"}
    return items, bundle, r.text


def _audit(b: Broker, request_id: str) -> dict:
    with b.runtime.sessions() as s:
        return json.loads(s.scalars(select(AuditEventRow.body).where(AuditEventRow.request_id == request_id)).one())


def _reporters() -> set[str]:
    rows = synthetic.dataset()["cws-cms"]
    names = {row["reporter_name"] for table, rs in rows.items() for row in rs if "reporter_name" in row}
    assert names, "the synthetic child welfare data must have reporters"
    return names


def _addresses() -> set[str]:
    rows = synthetic.dataset()["cws-cms"]
    lines = {row["address_line"] for rs in rows.values() for row in rs if row.get("address_line")}
    assert lines
    return lines


# --- reporter identity -----------------------------------------------------------------------

@pytest.mark.parametrize(("alias", "purpose"), [("cw", "CHILDPROT"), ("po", "CHILDPROT")])
async def test_reporter_identity_reaches_the_investigating_roles(agency_broker, alias, purpose):
    items, bundle, text = await record(agency_broker, alias, purpose)
    assert REFERRALS <= set(items)
    for rid in REFERRALS:
        assert items[rid]["sender"]["display"]
    assert any(name in text for name in _reporters())
    codes = {c["code"] for c in bundle["meta"]["security"]}
    assert codes  # labelled


@pytest.mark.parametrize(("alias", "purpose"), [("cw", "TREAT"), ("mh", "TREAT"), ("phn", "COC"), ("ed", "COC"),
                                                ("advocate", "COC"), ("sud", "COC")])
async def test_everyone_else_gets_the_referral_without_the_reporter(agency_broker, alias, purpose):
    items, _bundle, text = await record(agency_broker, alias, purpose)
    assert REFERRALS <= set(items), sorted(items)
    for rid in REFERRALS:
        assert "sender" not in items[rid]
    assert not any(name in text for name in _reporters())
    assert "reporter-identity" not in text  # no label, no marker: nothing shows it was there


async def test_the_redaction_is_audited_as_a_path(agency_broker):
    r = await agency_broker.get(RECORD, alias="mh", purpose="TREAT")
    event = _audit(agency_broker, r.headers["x-request-id"])
    assert "Communication.sender" in event["redactions"]
    assert "reporter-identity" in event["categories"]["withheld"]
    assert not any(name in json.dumps(event) for name in _reporters())


async def test_the_fhir_facade_redacts_the_same_way(agency_broker):
    r = await agency_broker.get("/mdts/mdt-alpha/fhir/Communication", alias="mh", purpose="TREAT")
    assert r.status_code == 200
    ids = {e["resource"]["id"] for e in r.json()["entry"] if e["search"]["mode"] == "match"}
    assert REFERRALS <= ids and not any(name in r.text for name in _reporters())
    r = await agency_broker.get("/mdts/mdt-alpha/fhir/Communication/cws-referral-7001", alias="mh", purpose="TREAT")
    assert r.status_code == 200 and "sender" not in r.json()


# --- placement -------------------------------------------------------------------------------

@pytest.mark.parametrize(("alias", "purpose"), [("cw", "COC"), ("mh", "TREAT"), ("ed", "COC"), ("po", "COC")])
async def test_members_see_placement_type_and_allowed_roles_the_address(agency_broker, alias, purpose):
    items, _b, text = await record(agency_broker, alias, purpose)
    assert PLACEMENTS_WITH_ADDRESS <= set(items)
    for rid in PLACEMENTS_WITH_ADDRESS:
        assert items[rid]["type"]
        assert any(e["url"] == ADDRESS_URL for e in items[rid].get("extension", []))
    assert any(line in text for line in _addresses())


async def test_a_court_ordered_prosecutor_sees_the_case_but_not_where_the_youth_is_nor_statements(agency_broker):
    b = agency_broker
    order = {"youth_id": "y-alpha", "case_number": "JV-TEST-0001", "court": "Superior Court of Nowhere County",
             "categories": ["child-welfare-case", "youth-statement", "placement-location", "canra-report"],
             "purposes": ["HLEGAL"], "recipients": [{"kind": "person", "value": "staff-da"}]}
    admin = {"Authorization": f"Bearer {await b.token('admin')}"}
    r = await b.client.post("/court-orders", json=order, headers=admin)
    assert r.status_code == 201, r.text
    order_id = r.json()["id"]
    try:
        items, _bundle, text = await record(b, "da", "HLEGAL")
        assert PLACEMENTS_WITH_ADDRESS <= set(items)  # the case file, under the order (W&IC 827(a)(1)(Q))
        for rid in PLACEMENTS_WITH_ADDRESS:
            assert items[rid]["type"]
            assert not any(e["url"] == ADDRESS_URL for e in items[rid].get("extension", []))
        assert not any(line in text for line in _addresses())
        assert not (STATEMENTS & set(items)), "the district attorney never sees youth statements"
        assert not any(name in text for name in _reporters())
        for path in ("Communication", "DocumentReference"):
            r = await b.get(f"/mdts/mdt-alpha/fhir/{path}", alias="da", purpose="HLEGAL")
            assert r.status_code == 200
            assert not STATEMENTS & {e["resource"]["id"] for e in r.json().get("entry", [])}
    finally:
        r = await b.client.post(f"/court-orders/{order_id}/revoke", headers=admin)
        assert r.status_code == 200, r.text


# --- youth statements --------------------------------------------------------------------------

@pytest.mark.parametrize(("alias", "expected"), [
    ("cw", STATEMENTS), ("po", STATEMENTS), ("mh", STATEMENTS), ("advocate", STATEMENTS),
    # the liaison's "S(limited)" probation access is not encoded, so the probation interview stays
    ("ed", STATEMENTS - {"prb-interview-9801"}),
])
async def test_team_members_see_what_the_youth_said(agency_broker, alias, expected):
    items, _b, _t = await record(agency_broker, alias, "COC")
    assert STATEMENTS & set(items) == expected


@pytest.mark.parametrize("alias", ["da", "le"])
async def test_prosecution_and_police_are_not_on_the_record(agency_broker, alias):
    r = await agency_broker.get(RECORD, alias=alias, purpose="HLEGAL")
    assert r.status_code == 403


# --- education ---------------------------------------------------------------------------------

EDUCATION = {"edu-enrollment-12001", "edu-attendance-13001", "edu-credits-14001", "edu-iep-15001"}


@pytest.mark.parametrize("alias", ["ed-school", "cw"])
async def test_education_records_reach_the_liaison_and_child_welfare(agency_broker, alias):
    items, _b, _t = await record(agency_broker, alias, "COC")
    assert EDUCATION <= set(items)


@pytest.mark.parametrize(("alias", "purpose"), [("po-team", "COC"), ("mh", "TREAT"), ("advocate", "COC"),
                                                ("ed", "COC")])
async def test_education_records_do_not_reach_others_by_default(agency_broker, alias, purpose):
    items, bundle, _t = await record(agency_broker, alias, purpose)
    assert not EDUCATION & set(items)
    statuses = bundle["entry"][-1]["resource"]["issue"]
    assert {i["details"]["text"]: i["details"]["coding"][0]["code"] for i in statuses}["school-district"] == "ok"


# --- grouping, labels, sources -----------------------------------------------------------------

async def test_the_record_is_grouped_by_category_and_every_source_answered(agency_broker):
    _items, bundle, _t = await record(agency_broker, "cw", "COC")
    groups = [e["extension"][0]["valueCode"] for e in bundle["entry"][:-1]]
    order = list(agency_broker.runtime.vocabulary.categories)
    assert groups == sorted(groups, key=order.index)  # contiguous, in vocabulary order
    assert {"child-welfare-case", "canra-report", "youth-statement", "probation", "juvenile-court",
            "education"} <= set(groups)
    by_id = {e["resource"]["id"]: e["extension"][0]["valueCode"] for e in bundle["entry"][:-1]}
    assert by_id["cws-referral-7001"] == "canra-report" and by_id["cws-statement-8001"] == "youth-statement"
    assert by_id["cws-placement-6002"] == "child-welfare-case"
    statuses = {i["details"]["text"]: i["details"]["coding"][0]["code"]
                for i in bundle["entry"][-1]["resource"]["issue"]}
    assert statuses == {name: "ok" for name in agency_broker.runtime.connectors}
    assert "total" not in bundle


async def test_every_released_item_carries_its_labels(agency_broker):
    items, _b, _t = await record(agency_broker, "cw", "CHILDPROT")
    for resource in items.values():
        assert resource["meta"]["security"], resource["id"]


async def test_the_record_for_another_team_is_the_same_403_as_no_team(agency_broker):
    a = await agency_broker.get("/mdts/mdt-bravo/record", alias="po-ended", purpose="COC")
    b = await agency_broker.get("/mdts/mdt-nope/record", alias="po-ended", purpose="COC")
    assert a.status_code == b.status_code == 403 and a.json() == b.json()
