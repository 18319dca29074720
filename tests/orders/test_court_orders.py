"""Court orders: who may record, see and revoke them; what a bad order gets back; when one counts."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from broker.domain import Principal
from broker.errors import NO_ACCESS
from broker.orders.service import active_orders_for
from broker.store.models import AuditEventRow, CourtOrderRow, Mdt, Staff
from tests.scenarios.harness import PERSONAS

ORDER = {
    "youth_id": "y-alpha",
    "case_number": "JV-2026-0042",
    "court": "Superior Court, Juvenile Division",
    "categories": ["mental-health", "juvenile-court"],
    "purposes": ["HLEGAL"],
    "recipients": [{"kind": "person", "value": "staff-da"}],
}


async def call(b, method, path, *, alias=None, token=None, body=None, params=None):
    """One request with a persona's real access token."""
    token = token or await b.token(alias)
    headers = {"Authorization": f"Bearer {token}"}
    return await b.client.request(method, path, headers=headers, json=body, params=params)


async def record(b, alias="admin", **changes):
    """Record an order (admin by default) and return its id."""
    r = await call(b, "POST", "/court-orders", alias=alias, body={**ORDER, **changes})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def audit(b) -> list[tuple[str, int, dict]]:
    """(action, outcome, body) for every audit event so far, in order, except the token requests'."""
    with b.runtime.sessions() as s:
        rows = s.scalars(select(AuditEventRow).where(AuditEventRow.action != "oauth.token")
                         .order_by(AuditEventRow.seq)).all()
        return [(r.action, r.outcome, json.loads(r.body)) for r in rows]


@pytest.mark.parametrize("alias", ["admin", "cw"])
async def test_program_staff_and_the_teams_social_worker_record_orders(orders_broker, alias):
    """Orders arrive at county program staff or the assigned social worker; both may enter them."""
    b = orders_broker
    before = datetime.now(timezone.utc)
    r = await call(b, "POST", "/court-orders", alias=alias, body=ORDER)
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["id"].startswith("co-") and out["youth_id"] == "y-alpha"
    assert out["categories"] == ORDER["categories"] and out["purposes"] == ["HLEGAL"]
    assert out["recipients"] == ORDER["recipients"]
    assert out["created_by"] == PERSONAS[alias].sub and out["revoked_at"] is None and out["period_end"] is None
    start = datetime.fromisoformat(out["period_start"])
    assert before <= start <= datetime.now(timezone.utc)  # period_start defaults to now
    with b.runtime.sessions() as s:
        assert s.get(CourtOrderRow, out["id"]).case_number == ORDER["case_number"]
    assert ("court-order.create", 201) in [(a, o) for a, o, _ in audit(b)]


@pytest.mark.parametrize("alias", ["po", "mh", "depatty", "da", "le", "cw-other", "po-ended"])
async def test_other_roles_may_not_record_and_cannot_tell_why(orders_broker, alias):
    """Everyone else gets the same 403 as for a youth that does not exist, so nothing can be probed."""
    b = orders_broker
    token = await b.token(alias)
    refused = await call(b, "POST", "/court-orders", token=token, body=ORDER)
    unknown = await call(b, "POST", "/court-orders", token=token, body={**ORDER, "youth_id": "y-nobody"})
    assert refused.status_code == unknown.status_code == 403
    assert refused.json() == unknown.json()
    assert refused.json()["issue"][0]["diagnostics"] == NO_ACCESS
    # refusal comes before the terms are checked: a forbidden caller learns nothing from a bad body
    bad = await call(b, "POST", "/court-orders", token=token, body={**ORDER, "categories": ["psychotherapy-notes"]})
    assert bad.status_code == 403 and bad.json() == refused.json()
    with b.runtime.sessions() as s:
        assert s.scalars(select(CourtOrderRow)).all() == []


async def test_unknown_youth_and_closed_team_refused_like_anything_else(orders_broker):
    """The admin gets the one 403 for an unknown youth; a worker on a closed team may no longer record."""
    b = orders_broker
    r = await call(b, "POST", "/court-orders", alias="admin", body={**ORDER, "youth_id": "y-nobody"})
    assert r.status_code == 403 and r.json()["issue"][0]["diagnostics"] == NO_ACCESS
    with b.runtime.sessions() as s:
        s.get(Mdt, "mdt-alpha").closed_at = datetime.now(timezone.utc) - timedelta(minutes=1)
        s.commit()
    r = await call(b, "POST", "/court-orders", alias="cw", body=ORDER)
    assert r.status_code == 403 and r.json()["issue"][0]["diagnostics"] == NO_ACCESS


@pytest.mark.parametrize(("change", "sent", "names"), [
    ({"categories": ["made-up-category-zq"]}, "made-up-category-zq", "category"),
    ({"categories": ["mental-health", "psychotherapy-notes"]}, "psychotherapy-notes", "psychotherapy notes"),
    ({"purposes": ["PURPOSEZQ"]}, "PURPOSEZQ", "purpose"),
    ({"recipients": [{"kind": "role", "value": "wizard-zq"}]}, "wizard-zq", "role"),
    ({"recipients": [{"kind": "agency", "value": "agency-zq"}]}, "agency-zq", "agency"),
    ({"recipients": [{"kind": "cousin", "value": "staff-da"}]}, "cousin", "recipients.0.kind"),
    ({"period_start": "2026-03-01T00:00:00Z", "period_end": "2026-02-01T00:00:00Z"}, "2026-02-01", "period_end"),
    ({"period_start": "2026-03-01T00:00:00Z", "period_end": "2026-03-01T00:00:00Z"}, "2026-03-01", "period_end"),
    ({"period_start": "2026-03-01T00:00:00"}, "2026-03-01", "time zone"),
    ({"categories": []}, None, "categories"),          # nothing sent to echo
    ({"recipients": []}, None, "recipients"),
    ({"case_number": "JV\n-forged-zq"}, "forged-zq", "case_number"),
    ({"judge": "Hon. Zq Placeholder"}, "Placeholder", "judge"),
])
async def test_a_bad_order_is_refused_without_echoing_it(orders_broker, change, sent, names):
    """400 names the field or rule at fault; the value sent never comes back (it may be sensitive)."""
    b = orders_broker
    r = await call(b, "POST", "/court-orders", alias="cw", body={**ORDER, **change})
    assert r.status_code == 400, r.text
    diagnostics = r.json()["issue"][0]["diagnostics"]
    assert names in diagnostics
    assert sent is None or sent not in r.text
    with b.runtime.sessions() as s:
        assert s.scalars(select(CourtOrderRow)).all() == []
        rows = s.scalars(select(AuditEventRow).where(AuditEventRow.action != "oauth.token")).all()
        assert [(row.action, row.outcome) for row in rows] == [("court-order.create", 400)]
        assert sent is None or sent not in rows[0].body


async def test_a_named_district_attorney_reads_the_order_an_unnamed_one_cannot(orders_broker):
    """A recipient may see the orders naming them, and only those; to anyone else they do not exist."""
    b = orders_broker
    with b.runtime.sessions() as s:
        s.add(Staff(sub="staff-da2", agency_id="da", roles=["district-attorney"], active=True))
        s.commit()
    r = await b.request_token(agency="da", sub="staff-da2", role="district-attorney")
    da2 = r.json()["access_token"]
    named = await record(b)  # names the person staff-da
    for_le = await record(b, recipients=[{"kind": "role", "value": "law-enforcement"}])
    for_da_office = await record(b, recipients=[{"kind": "agency", "value": "da"}])

    r = await call(b, "GET", f"/court-orders/{named}", alias="da")
    assert r.status_code == 200 and r.json()["id"] == named and r.json()["case_number"] == ORDER["case_number"]
    denied = await call(b, "GET", f"/court-orders/{named}", token=da2)
    missing = await call(b, "GET", "/court-orders/co-does-not-exist", token=da2)
    assert denied.status_code == missing.status_code == 403 and denied.json() == missing.json()
    assert (await call(b, "GET", f"/court-orders/{for_le}", alias="da")).status_code == 403
    assert (await call(b, "GET", f"/court-orders/{for_da_office}", token=da2)).status_code == 200
    # a team member who neither records orders nor is named does not see them either
    assert (await call(b, "GET", f"/court-orders/{named}", alias="mh")).status_code == 403

    r = await call(b, "GET", "/court-orders", alias="da", params={"youth": "y-alpha"})
    assert r.status_code == 200 and [o["id"] for o in r.json()["orders"]] == [named, for_da_office]
    r = await call(b, "GET", "/court-orders", alias="le", params={"youth": "y-alpha"})
    assert r.status_code == 200 and [o["id"] for o in r.json()["orders"]] == [for_le]
    # named in nothing for this youth: the same 403 as a youth that does not exist
    none = await call(b, "GET", "/court-orders", alias="le", params={"youth": "y-bravo"})
    nobody = await call(b, "GET", "/court-orders", alias="le", params={"youth": "y-nobody"})
    assert none.status_code == nobody.status_code == 403 and none.json() == nobody.json()
    assert (await call(b, "GET", "/court-orders", alias="mh", params={"youth": "y-alpha"})).status_code == 403

    for alias in ("admin", "cw"):
        r = await call(b, "GET", "/court-orders", alias=alias, params={"youth": "y-alpha"})
        assert r.status_code == 200 and [o["id"] for o in r.json()["orders"]] == [named, for_le, for_da_office]
        assert (await call(b, "GET", f"/court-orders/{for_le}", alias=alias)).status_code == 200
    r = await call(b, "GET", "/court-orders", alias="cw", params={"youth": "y-charlie"})
    assert r.status_code == 200 and r.json() == {"youth_id": "y-charlie", "orders": []}

    events = audit(b)
    assert ("court-order.get", 200) in [(a, o) for a, o, _ in events]
    assert ("court-order.get", 403) in [(a, o) for a, o, _ in events]
    lists = [e for a, o, e in events if a == "court-order.list" and o == 200]
    assert lists and all(e["youth_id"] == "y-alpha" or e["youth_id"] == "y-charlie" for e in lists)


async def test_a_vacated_order_stops_counting_and_stays_on_record(orders_broker):
    """Revoking keeps the row, stops the ground from that instant, and only recorders may do it."""
    b = orders_broker
    order_id = await record(b)
    da = Principal(sub="staff-da", agency="da", role="district-attorney", client_id="da-system")
    with b.runtime.sessions() as s:
        assert [o.id for o in active_orders_for(s, youth_id="y-alpha", principal=da,
                                                now=datetime.now(timezone.utc))] == [order_id]

    for alias in ("da", "po", "cw-other"):
        r = await call(b, "POST", f"/court-orders/{order_id}/revoke", alias=alias)
        assert r.status_code == 403 and r.json()["issue"][0]["diagnostics"] == NO_ACCESS
    r = await call(b, "POST", "/court-orders/co-does-not-exist/revoke", alias="cw")
    assert r.status_code == 403 and r.json()["issue"][0]["diagnostics"] == NO_ACCESS

    r = await call(b, "POST", f"/court-orders/{order_id}/revoke", alias="cw")
    assert r.status_code == 200, r.text
    assert r.json()["revoked_by"] == PERSONAS["cw"].sub and r.json()["revoked_at"] is not None
    revoked_at = datetime.fromisoformat(r.json()["revoked_at"])
    assert (await call(b, "POST", f"/court-orders/{order_id}/revoke", alias="admin")).status_code == 409

    with b.runtime.sessions() as s:
        assert active_orders_for(s, youth_id="y-alpha", principal=da, now=datetime.now(timezone.utc)) == []
        # it still counted just before the instant it was revoked
        before = revoked_at - timedelta(microseconds=1)
        assert [o.id for o in active_orders_for(s, youth_id="y-alpha", principal=da, now=before)] == [order_id]
    r = await call(b, "GET", f"/court-orders/{order_id}", alias="da")
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    outcomes = [(a, o) for a, o, _ in audit(b)]
    assert ("court-order.revoke", 403) in outcomes and ("court-order.revoke", 200) in outcomes
    assert ("court-order.revoke", 409) in outcomes


async def test_active_orders_match_person_role_and_agency_and_only_while_in_force(orders_broker):
    """The court-order ground holds only for an order in force, for this youth, naming the requester."""
    b = orders_broker
    now = datetime.now(timezone.utc)
    day = timedelta(days=1)

    def row(oid, recipients, *, youth="y-alpha", start=now - day, end=None, revoked=None):
        return CourtOrderRow(id=oid, youth_id=youth, case_number="JV-1", court="Juvenile", categories=["probation"],
                             purposes=["HLEGAL"], recipients=recipients, period_start=start, period_end=end,
                             created_at=now - 2 * day, created_by="seed", revoked_at=revoked,
                             revoked_by="seed" if revoked else None)

    person = [{"kind": "person", "value": "staff-da"}]
    with b.runtime.sessions() as s:
        s.add_all([
            row("o-person", person),
            row("o-role", [{"kind": "role", "value": "law-enforcement"}]),
            row("o-agency", [{"kind": "agency", "value": "da"}], end=now + day),
            row("o-revoked", person, revoked=now - timedelta(hours=1)),
            row("o-expired", person, start=now - 3 * day, end=now - day),
            row("o-ends-now", person, end=now),
            row("o-future", person, start=now + day),
            row("o-other-youth", person, youth="y-bravo"),
        ])
        s.commit()

    da = Principal(sub="staff-da", agency="da", role="district-attorney", client_id="da-system")
    deputy = Principal(sub="staff-da-9", agency="da", role="district-attorney", client_id="da-system")
    deputy_le = Principal(sub="staff-le", agency="sheriff", role="law-enforcement", client_id="sheriff-system")
    stranger = Principal(sub="staff-x", agency="probation", role="probation-officer", client_id="probation-system")

    def ids(principal, at=now, youth="y-alpha"):
        with b.runtime.sessions() as s:
            return {o.id for o in active_orders_for(s, youth_id=youth, principal=principal, now=at)}

    assert ids(da) == {"o-person", "o-agency"}
    assert ids(deputy) == {"o-agency"}
    assert ids(deputy_le) == {"o-role"}
    assert ids(stranger) == set()
    assert ids(da, youth="y-bravo") == {"o-other-youth"}
    # the same orders at other instants: before revocation, inside the old period, after the start
    assert "o-revoked" in ids(da, at=now - timedelta(hours=2))
    assert "o-expired" in ids(da, at=now - 2 * day)
    assert "o-ends-now" in ids(da, at=now - timedelta(microseconds=1))
    assert "o-future" in ids(da, at=now + 2 * day) and "o-agency" not in ids(da, at=now + 2 * day)
