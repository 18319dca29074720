"""Register a youth, open a team, add and end members; access follows the roster to the instant."""

from __future__ import annotations

import json

from sqlalchemy import select

from broker.store.models import AuditEventRow
from tests.scenarios.harness import EHR_SYSTEM, PERSONAS


async def _call(broker, method, path, alias, body=None):
    token = await broker.token(alias)
    headers = {"Authorization": f"Bearer {token}"}
    if body is not None:
        return await broker.client.request(method, path, headers=headers, json=body)
    return await broker.client.request(method, path, headers=headers)


async def test_roster_lifecycle(fresh_broker):
    b = fresh_broker
    r = await _call(b, "POST", "/youth", "cw", {"identifiers": [
        {"source": "county-ehr", "system": "urn:test:other-system", "value": "pt-new-1"}]})
    assert r.status_code == 201, r.text
    youth_id = r.json()["id"]

    r = await _call(b, "POST", "/mdts", "cw", {"youth_id": youth_id, "lead_agency": "cws"})
    assert r.status_code == 201, r.text
    mdt_id = r.json()["id"]
    assert (await _call(b, "POST", "/mdts", "cw", {"youth_id": youth_id, "lead_agency": "cws"})).status_code == 409

    po = PERSONAS["po"]
    add = {"sub": po.sub, "agency": po.agency, "team_role": po.role, "statutory": True}
    # only the lead agency (or the registry admin) changes the roster
    assert (await _call(b, "POST", f"/mdts/{mdt_id}/members", "po", add)).status_code == 403
    r = await _call(b, "POST", f"/mdts/{mdt_id}/members", "cw", add)
    assert r.status_code == 201, r.text
    membership_id = r.json()["id"]
    assert (await _call(b, "POST", f"/mdts/{mdt_id}/members", "cw", add)).status_code == 409

    r = await b.get(f"/mdts/{mdt_id}/fhir/Observation", alias="po", purpose="COC")
    assert r.status_code == 200
    r = await _call(b, "GET", f"/mdts/{mdt_id}", "po")
    assert r.status_code == 200 and [m["sub"] for m in r.json()["members"]] == [po.sub]

    r = await _call(b, "DELETE", f"/mdts/{mdt_id}/members/{membership_id}", "cw")
    assert r.status_code == 200 and r.json()["valid_to"] is not None
    r = await b.get(f"/mdts/{mdt_id}/fhir/Observation", alias="po", purpose="COC")
    assert r.status_code == 403
    assert (await _call(b, "GET", f"/mdts/{mdt_id}", "po")).status_code == 403
    assert (await _call(b, "GET", f"/youth/{youth_id}", "po")).status_code == 403

    with b.runtime.sessions() as s:
        actions = [(json.loads(row.body)["action"], row.outcome)
                   for row in s.scalars(select(AuditEventRow).order_by(AuditEventRow.seq))]
    assert ("youth.create", 201) in actions and ("mdt.create", 201) in actions
    assert ("membership.add", 403) in actions and ("membership.end", 200) in actions


async def test_registry_refusals(fresh_broker):
    b = fresh_broker
    # a role that may not register youth
    r = await _call(b, "POST", "/youth", "mh", {"identifiers": []})
    assert r.status_code == 403
    # a source id already linked to another youth
    r = await _call(b, "POST", "/youth", "cw", {"identifiers": [
        {"source": "county-ehr", "system": EHR_SYSTEM, "value": "pt-alpha"}]})
    assert r.status_code == 409
    # an unknown source, an unknown field, a malformed body
    r = await _call(b, "POST", "/youth", "cw", {"identifiers": [
        {"source": "nowhere", "system": "urn:x", "value": "v1"}]})
    assert r.status_code == 400
    r = await _call(b, "POST", "/youth", "cw", {"identifiers": [], "name": "Testy Placeholder"})
    assert r.status_code == 400 and "Testy" not in r.text
    token = await b.token("cw")
    r = await b.client.post("/youth", content=b"{not json", headers={"Authorization": f"Bearer {token}",
                                                                      "Content-Type": "application/json"})
    assert r.status_code == 400
    # another agency may not open a team led by the child welfare agency
    r = await _call(b, "POST", "/mdts", "po", {"youth_id": "y-alpha", "lead_agency": "cws"})
    assert r.status_code == 403
    # a member cannot be added in a role their agency does not hold
    r = await _call(b, "POST", "/mdts/mdt-alpha/members", "cw", {
        "sub": PERSONAS["da"].sub, "agency": "da", "team_role": "probation-officer"})
    assert r.status_code == 400
    # youth records are visible to members and the admin only
    assert (await _call(b, "GET", "/youth/y-alpha", "po")).status_code == 200
    assert (await _call(b, "GET", "/youth/y-alpha", "admin")).status_code == 200
    assert (await _call(b, "GET", "/youth/y-alpha", "da")).status_code == 403
    assert (await _call(b, "GET", "/youth/y-missing", "da")).content == \
        (await _call(b, "GET", "/youth/y-alpha", "da")).content


async def test_registry_needs_a_token(fresh_broker):
    r = await fresh_broker.client.post("/youth", json={"identifiers": []})
    assert r.status_code == 401
