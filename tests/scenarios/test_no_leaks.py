"""Withheld data leaves no trace: same bytes as an empty record, nothing released if audit fails."""

from __future__ import annotations

import re

import pytest

from broker.audit.sink import AuditWriteError


def normalized(body: bytes, mdt: str) -> bytes:
    """Remove what differs between any two responses: ids, timestamps and the team id in URLs."""
    text = body.decode()
    text = text.replace(mdt, "MDT")
    text = re.sub(r'"id":"[0-9a-f]{32}"', '"id":"X"', text)
    text = re.sub(r'"lastUpdated":"[^"]+"', '"lastUpdated":"T"', text)
    return text.encode()


@pytest.mark.parametrize(("alias", "purpose", "mdt", "rtype"), [
    ("po", "COC", "mdt-charlie", "Observation"),        # HIV result: needs a consent
    ("po", "COC", "mdt-charlie", "Condition"),          # Part 2 diagnosis: needs a consent
    ("mh", "TREAT", "mdt-charlie", "DocumentReference"),  # psychotherapy note: never
    ("caregiver", "COC", "mdt-alpha", "Observation"),   # everything withheld from this role
])
async def test_everything_withheld_is_indistinguishable_from_no_records(broker, alias, purpose, mdt, rtype):
    token = await broker.token(alias)
    withheld = await broker.get(f"/mdts/{mdt}/fhir/{rtype}", token=token, purpose=purpose)
    empty = await broker.get(f"/mdts/mdt-bravo/fhir/{rtype}", token=token, purpose=purpose)
    assert withheld.status_code == empty.status_code == 200
    assert "entry" not in withheld.json()
    assert normalized(withheld.content, mdt) == normalized(empty.content, "mdt-bravo")
    hdr = {k: v for k, v in withheld.headers.items() if k not in ("x-request-id", "date", "content-length")}
    hdr_empty = {k: v for k, v in empty.headers.items() if k not in ("x-request-id", "date", "content-length")}
    assert hdr == hdr_empty


async def test_audit_failure_means_503_and_nothing_released(broker, monkeypatch):
    token = await broker.token("mh")

    async def broken(_event):
        raise AuditWriteError("disk full")

    monkeypatch.setattr(broker.runtime.audit, "append_async", broken)  # what the pipeline awaits
    r = await broker.get("/mdts/mdt-alpha/fhir/Observation", token=token, purpose="TREAT")
    assert r.status_code == 503
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert "alpha" not in r.text and "Observation" not in r.text


async def test_audit_records_the_decision_without_content(broker):
    from sqlalchemy import select

    from broker.store.models import AuditEventRow

    token = await broker.token("po")
    r = await broker.get("/mdts/mdt-alpha/fhir/Observation", token=token, purpose="COC")
    request_id = r.headers["x-request-id"]
    with broker.runtime.sessions() as s:
        row = s.scalars(select(AuditEventRow).where(AuditEventRow.request_id == request_id)).one()
    import json

    event = json.loads(row.body)
    assert event["outcome"] == 200 and event["actor"]["role"] == "probation-officer"
    assert event["youth_id"] == "y-alpha" and event["mdt_id"] == "mdt-alpha" and event["purpose"] == "COC"
    assert event["grounds"]["used"] == ["mdt-member", "own-statute"]
    assert "hiv" in event["categories"]["withheld"] and "hiv" not in event["categories"]["released"]
    decided = {d["category"]: d for d in event["decisions"]}
    assert decided["mental-health"]["effect"] == "allow" and decided["mental-health"]["citation"]
    assert decided["psychotherapy-notes"]["effect"] == "deny" and decided["psychotherapy-notes"]["citation"]
    assert event["policy_version"].startswith("sha256:")
    assert "Testy" not in row.body and "Placeholder" not in row.body and "alpha-obs" not in row.body


async def test_a_failure_building_the_audit_event_is_a_503_too(broker, monkeypatch):
    from broker.pipeline.exchange import Exchange

    token = await broker.token("mh")

    def broken(self, status):
        raise RuntimeError("cannot build the event")

    monkeypatch.setattr(Exchange, "audit_event", broken)
    r = await broker.get("/mdts/mdt-alpha/fhir/Observation", token=token, purpose="TREAT")
    assert r.status_code == 503 and "alpha-obs" not in r.text
