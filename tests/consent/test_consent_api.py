"""The consent routes on a real broker: who may file, read and revoke, and what is audited."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone

from fhir.resources.R4B.consent import Consent
from sqlalchemy import select

from broker.consent.service import active_consents
from broker.errors import NO_ACCESS
from broker.store.models import AuditEventRow, ConsentRow
from tests.consent import fixtures as f

FHIR_JSON = "application/fhir+json"


def consent(youth_id: str = "y-alpha", **changes) -> dict:
    """A valid Part 2 consent for a seeded youth, signed yesterday, valid for six months."""
    today = date.today()
    resource = f.part2(**changes)
    resource["patient"] = {"reference": f"Patient/{youth_id}"}
    resource["dateTime"] = (datetime.now(timezone.utc) - timedelta(days=1)).isoformat()
    resource["provision"]["period"] = {"start": (today - timedelta(days=1)).isoformat(),
                                       "end": (today + timedelta(days=180)).isoformat()}
    return resource


async def call(broker, method: str, path: str, alias: str, body: dict | None = None, **params):
    headers = {"Authorization": f"Bearer {await broker.token(alias)}"}
    if body is not None:
        headers["Content-Type"] = FHIR_JSON
        return await broker.client.request(method, path, headers=headers, content=json.dumps(body), params=params)
    return await broker.client.request(method, path, headers=headers, params=params or None)


def audit_rows(broker) -> list[tuple[str, int, str | None, str | None]]:
    with broker.runtime.sessions() as s:
        rows = s.scalars(select(AuditEventRow).order_by(AuditEventRow.seq)).all()
        return [(r.action, r.outcome, r.youth_id, r.actor_sub) for r in rows if r.action.startswith("consent.")]


async def test_file_list_read_and_revoke(fresh_broker):
    b = fresh_broker
    r = await call(b, "POST", "/consents", "sud", consent())
    assert r.status_code == 201, r.text
    assert r.headers["content-type"].startswith(FHIR_JSON)
    filed = r.json()
    consent_id = filed["id"]
    assert consent_id.startswith("c-") and filed["status"] == "active" and "_youth_id" not in filed
    assert "display" not in filed["performer"][0]  # names are not kept
    Consent.model_validate(filed)

    r = await call(b, "GET", "/consents", "po", youth="y-alpha")  # a member it does not name sees none
    assert r.status_code == 200 and "entry" not in r.json()
    r = await call(b, "GET", "/consents", "ed", youth="y-alpha")
    assert r.status_code == 200 and "entry" not in r.json()
    r = await call(b, "GET", "/consents", "mh", youth="y-alpha")  # filers see every consent of the youth
    assert r.status_code == 200 and r.headers["content-type"].startswith(FHIR_JSON)
    bundle = r.json()
    assert bundle["type"] == "searchset" and "total" not in bundle
    assert [e["resource"]["id"] for e in bundle["entry"]] == [consent_id]
    assert bundle["entry"][0]["fullUrl"].endswith(f"/consents/{consent_id}")
    r = await call(b, "GET", "/consents", "mh", youth="y-bravo")
    assert r.status_code == 200 and "entry" not in r.json()  # another youth's consents are not listed

    r = await call(b, "GET", f"/consents/{consent_id}", "cw")  # named (by role) and a filer
    assert r.status_code == 200 and r.json()["id"] == consent_id
    r = await call(b, "GET", f"/consents/{consent_id}", "advocate")  # neither: its existence stays hidden
    assert r.status_code == 403

    with b.runtime.sessions() as s:
        assert [c.id for c in active_consents(s, youth_id="y-alpha", now=datetime.now(timezone.utc))] == [consent_id]
        row = s.get(ConsentRow, consent_id)
        assert (row.form, row.categories, row.recipients, row.created_by) == (
            "part2", ["sud-part2"], [{"kind": "role", "value": "child-welfare-worker"}], "staff-sud")

    r = await call(b, "POST", f"/consents/{consent_id}/revoke", "depatty")
    assert r.status_code == 200, r.text
    revoked = r.json()
    assert revoked["status"] == "inactive"
    Consent.model_validate(revoked)
    again = await call(b, "POST", f"/consents/{consent_id}/revoke", "cw")
    assert again.status_code == 200 and again.json() == revoked  # idempotent: first revocation stands
    with b.runtime.sessions() as s:
        row = s.get(ConsentRow, consent_id)
        assert (row.status, row.revoked_by) == ("revoked", "staff-depatty")
        assert active_consents(s, youth_id="y-alpha", now=datetime.now(timezone.utc)) == []
    listed = (await call(b, "GET", "/consents", "cw", youth="y-alpha")).json()
    assert listed["entry"][0]["resource"]["status"] == "inactive"


async def test_each_filer_role_and_the_admin_may_file(fresh_broker):
    b = fresh_broker
    for alias in ("cw", "depatty", "mh", "sud", "phn", "admin"):
        r = await call(b, "POST", "/consents", alias, consent("y-bravo"))
        assert r.status_code == 201, (alias, r.text)


async def test_outsiders_and_other_roles_get_the_one_403(fresh_broker):
    b = fresh_broker
    consent_id = (await call(b, "POST", "/consents", "cw", consent())).json()["id"]
    denied = []
    for alias in ("da", "le", "po-ended"):  # not (or no longer) on the team
        denied += [await call(b, "POST", "/consents", alias, consent()),
                   await call(b, "GET", "/consents", alias, youth="y-alpha"),
                   await call(b, "GET", f"/consents/{consent_id}", alias),
                   await call(b, "POST", f"/consents/{consent_id}/revoke", alias)]
    for alias in ("po", "ed", "advocate", "caregiver"):  # members whose role does not file
        denied += [await call(b, "POST", "/consents", alias, consent()),
                   await call(b, "POST", f"/consents/{consent_id}/revoke", alias)]
        denied.append(await call(b, "GET", f"/consents/{consent_id}", alias))  # not named in it
    denied += [await call(b, "POST", "/consents", "cw", consent("y-nobody")),  # unknown youth
               await call(b, "GET", "/consents", "cw", youth="y-nobody"),
               await call(b, "GET", "/consents/c-unknown", "cw"),
               await call(b, "POST", "/consents/c-unknown/revoke", "cw")]
    for r in denied:
        assert r.status_code == 403, r.text
        assert r.json()["issue"][0]["diagnostics"] == NO_ACCESS
    with b.runtime.sessions() as s:
        row = s.get(ConsentRow, consent_id)
        assert row.status == "active"
        assert len(s.scalars(select(ConsentRow)).all()) == 1


async def test_a_refused_consent_lists_every_issue(fresh_broker):
    b = fresh_broker
    resource = consent()
    del resource["organization"]
    del resource["provision"]["code"]
    resource["performer"] = [{"reference": "RelatedPerson/someone", "display": "Jane Q Sample"}]
    resource["extension"][0]["valueCode"] = "minors-counsel"
    r = await call(b, "POST", "/consents", "cw", resource)
    assert r.status_code == 422 and r.headers["content-type"].startswith(FHIR_JSON)
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    found = {(i["expression"][0], i["diagnostics"]) for i in outcome["issue"]}
    assert ("Consent.organization", "42 CFR 2.31(a)(2): who may disclose is missing") in found
    assert any(e == "Consent.provision.code" and "2.31(a)(3)" in t for e, t in found)
    assert any(e == "Consent.extension:signer-capacity" and "317(f)" in t for e, t in found)
    assert "Jane" not in r.text and "someone" not in r.text
    r = await call(b, "POST", "/consents", "cw", {**consent(), "dateTime": "not-a-date"})
    assert r.status_code == 422 and r.json()["issue"][0]["expression"] == ["Consent.dateTime"]
    r = await call(b, "POST", "/consents", "cw", {"resourceType": "Consent"})
    assert r.status_code == 422 and r.json()["issue"][0]["expression"] == ["Consent.patient"]
    with b.runtime.sessions() as s:
        assert s.scalars(select(ConsentRow)).all() == []


async def test_every_call_is_audited_with_the_youth(fresh_broker):
    b = fresh_broker
    consent_id = (await call(b, "POST", "/consents", "cw", consent())).json()["id"]
    await call(b, "GET", "/consents", "mh", youth="y-alpha")
    await call(b, "GET", f"/consents/{consent_id}", "mh")
    await call(b, "POST", f"/consents/{consent_id}/revoke", "cw")
    await call(b, "POST", "/consents", "po", consent())
    bad = consent()
    del bad["sourceAttachment"]
    await call(b, "POST", "/consents", "cw", bad)
    assert audit_rows(b) == [
        ("consent.file", 201, "y-alpha", "staff-cw"),
        ("consent.search", 200, "y-alpha", "staff-mh"),
        ("consent.read", 200, "y-alpha", "staff-mh"),
        ("consent.revoke", 200, "y-alpha", "staff-cw"),
        ("consent.file", 403, None, "staff-po"),  # a refusal does not confirm the youth exists
        ("consent.file", 422, None, "staff-cw"),
    ]


async def test_a_member_who_does_not_file_sees_only_the_consents_naming_them(fresh_broker):
    b = fresh_broker
    named = consent()
    named["provision"]["actor"] = [f.recipient("role", "probation-officer")]
    named_id = (await call(b, "POST", "/consents", "cw", named)).json()["id"]
    other_id = (await call(b, "POST", "/consents", "cw", consent())).json()["id"]
    listed = (await call(b, "GET", "/consents", "po", youth="y-alpha")).json()
    assert [e["resource"]["id"] for e in listed["entry"]] == [named_id]
    assert (await call(b, "GET", f"/consents/{named_id}", "po")).status_code == 200
    hidden = await call(b, "GET", f"/consents/{other_id}", "po")
    unknown = await call(b, "GET", "/consents/c-unknown", "po")
    assert hidden.status_code == unknown.status_code == 403 and hidden.content == unknown.content
