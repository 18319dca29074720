"""Break-glass: only an active member may open it, it lasts the configured window, and the reason stays put."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from broker.breakglass.service import active_break_glass, pending_reviews
from broker.domain import Principal
from broker.errors import NO_ACCESS
from broker.observability import configure_logging
from broker.store.models import AuditEventRow, BreakGlassGrant, Mdt
from tests.breakglass.conftest import WINDOW_MINUTES
from tests.scenarios.harness import PERSONAS

# Recognisable text that must never leave the break_glass_grants table.
REASON = "Youth zqxv-marker reported overdose risk at placement; clinician needs history now"
OUT_KEYS = {"id", "mdt_id", "purpose", "granted_at", "expires_at", "review_status"}


async def call(b, method, path, *, alias=None, token=None, body=None):
    """One request with a persona's real access token."""
    token = token or await b.token(alias)
    return await b.client.request(method, path, headers={"Authorization": f"Bearer {token}"}, json=body)


def principal(alias: str) -> Principal:
    """The principal a persona's access token proves."""
    p = PERSONAS[alias]
    return Principal(sub=p.sub, agency=p.agency, role=p.role, client_id=f"{p.agency}-system")


def audit_rows(b) -> list[AuditEventRow]:
    with b.runtime.sessions() as s:
        # the route's own events: each token request is audited too (docs/security.md)
        rows = s.scalars(select(AuditEventRow).where(AuditEventRow.action != "oauth.token")
                         .order_by(AuditEventRow.seq)).all()
        s.expunge_all()
        return rows


async def test_an_active_member_gets_a_grant_for_the_configured_window(bg_broker):
    """The grant starts now, ends after settings.break_glass_minutes, waits for review, and hides the reason."""
    b = bg_broker
    r = await call(b, "POST", "/mdts/mdt-alpha/break-glass", alias="mh", body={"purpose": "ETREAT",
                                                                                "reason": f"  {REASON}  "})
    assert r.status_code == 201, r.text
    out = r.json()
    assert set(out) == OUT_KEYS
    assert out["mdt_id"] == "mdt-alpha" and out["purpose"] == "ETREAT" and out["review_status"] == "pending"
    granted, expires = datetime.fromisoformat(out["granted_at"]), datetime.fromisoformat(out["expires_at"])
    assert expires - granted == timedelta(minutes=WINDOW_MINUTES)
    with b.runtime.sessions() as s:
        row = s.get(BreakGlassGrant, out["id"])
        assert row.reason == REASON  # stored for the reviewer, stripped
        assert (row.sub, row.agency_id, row.role, row.youth_id) == ("staff-mh", "bh", "mental-health-clinician",
                                                                    "y-alpha")
        assert [g.id for g in pending_reviews(s)] == [out["id"]]
    events = [(row.action, row.outcome, row.mdt_id) for row in audit_rows(b)]
    assert events == [("break-glass.create", 201, "mdt-alpha")]


async def test_the_grant_holds_until_it_expires_and_only_for_its_holder(bg_broker):
    """Access ends at expires_at without anyone acting; nobody else, and no other team, inherits it."""
    b = bg_broker
    r = await call(b, "POST", "/mdts/mdt-alpha/break-glass", alias="mh", body={"purpose": "THREAT",
                                                                                "reason": REASON})
    grant_id = r.json()["id"]
    expires = datetime.fromisoformat(r.json()["expires_at"])
    granted = datetime.fromisoformat(r.json()["granted_at"])
    mh = principal("mh")
    with b.runtime.sessions() as s:
        assert active_break_glass(s, mdt_id="mdt-alpha", principal=mh, now=granted).id == grant_id
        assert active_break_glass(s, mdt_id="mdt-alpha", principal=mh,
                                  now=expires - timedelta(microseconds=1)).id == grant_id
        assert active_break_glass(s, mdt_id="mdt-alpha", principal=mh, now=expires) is None
        assert active_break_glass(s, mdt_id="mdt-alpha", principal=mh, now=expires + timedelta(hours=1)) is None
        assert active_break_glass(s, mdt_id="mdt-alpha", principal=mh, now=granted - timedelta(seconds=1)) is None
        assert active_break_glass(s, mdt_id="mdt-alpha", principal=principal("mh-team"), now=granted) is None
        assert active_break_glass(s, mdt_id="mdt-bravo", principal=mh, now=granted) is None
        assert active_break_glass(s, mdt_id="mdt-nowhere", principal=mh, now=granted) is None


async def test_the_most_recent_grant_in_force_is_the_one_returned(bg_broker):
    """A second emergency while the first grant still runs is tied to its own, newer grant."""
    b = bg_broker
    first = (await call(b, "POST", "/mdts/mdt-alpha/break-glass", alias="mh",
                        body={"purpose": "ETREAT", "reason": REASON})).json()
    second = (await call(b, "POST", "/mdts/mdt-alpha/break-glass", alias="mh",
                         body={"purpose": "THREAT", "reason": REASON})).json()
    with b.runtime.sessions() as s:
        now = datetime.fromisoformat(second["granted_at"])
        assert active_break_glass(s, mdt_id="mdt-alpha", principal=principal("mh"), now=now).id == second["id"]
        # the first expiring does not cut the second short; the second expiring ends both
        assert active_break_glass(s, mdt_id="mdt-alpha", principal=principal("mh"),
                                  now=datetime.fromisoformat(first["expires_at"])).id == second["id"]
        assert active_break_glass(s, mdt_id="mdt-alpha", principal=principal("mh"),
                                  now=datetime.fromisoformat(second["expires_at"])) is None


async def test_ending_the_membership_ends_the_grant(bg_broker):
    """A grant is never a way back in: once the roster entry ends, the unexpired grant no longer counts."""
    b = bg_broker
    r = await call(b, "POST", "/mdts/mdt-alpha/break-glass", alias="po", body={"purpose": "THREAT", "reason": REASON})
    assert r.status_code == 201
    po = principal("po")
    with b.runtime.sessions() as s:
        assert active_break_glass(s, mdt_id="mdt-alpha", principal=po, now=datetime.now(timezone.utc)) is not None
    r = await call(b, "DELETE", "/mdts/mdt-alpha/members/m-po-mdt-alpha", alias="cw")
    assert r.status_code == 200, r.text
    with b.runtime.sessions() as s:
        assert active_break_glass(s, mdt_id="mdt-alpha", principal=po, now=datetime.now(timezone.utc)) is None
    r = await call(b, "POST", "/mdts/mdt-alpha/break-glass", alias="po", body={"purpose": "THREAT", "reason": REASON})
    assert r.status_code == 403


async def test_closing_the_team_ends_the_grant(bg_broker):
    """A closed team has no emergencies: no new grant, and an open one stops counting."""
    b = bg_broker
    r = await call(b, "POST", "/mdts/mdt-bravo/break-glass", alias="sud", body={"purpose": "ETREAT", "reason": REASON})
    assert r.status_code == 201
    with b.runtime.sessions() as s:
        s.get(Mdt, "mdt-bravo").closed_at = datetime.now(timezone.utc) - timedelta(seconds=1)
        s.commit()
        assert active_break_glass(s, mdt_id="mdt-bravo", principal=principal("sud"),
                                  now=datetime.now(timezone.utc)) is None
    r = await call(b, "POST", "/mdts/mdt-bravo/break-glass", alias="sud", body={"purpose": "ETREAT", "reason": REASON})
    assert r.status_code == 403 and r.json()["issue"][0]["diagnostics"] == NO_ACCESS


@pytest.mark.parametrize(("alias", "mdt"), [
    ("da", "mdt-alpha"),         # never on the team
    ("le", "mdt-alpha"),
    ("cw-other", "mdt-alpha"),   # on another team only
    ("po-ended", "mdt-alpha"),   # membership ended yesterday
    ("admin", "mdt-alpha"),      # administers rosters, never reads through a team
])
async def test_anyone_but_an_active_member_gets_the_one_403(bg_broker, alias, mdt):
    """Refused exactly as for a team that does not exist, so membership cannot be probed."""
    b = bg_broker
    token = await b.token(alias)
    body = {"purpose": "ETREAT", "reason": REASON}
    refused = await call(b, "POST", f"/mdts/{mdt}/break-glass", token=token, body=body)
    unknown = await call(b, "POST", "/mdts/mdt-nowhere/break-glass", token=token, body=body)
    assert refused.status_code == unknown.status_code == 403
    assert refused.json() == unknown.json() and refused.json()["issue"][0]["diagnostics"] == NO_ACCESS
    listed = await call(b, "GET", f"/mdts/{mdt}/break-glass", token=token)
    assert listed.status_code == 403 and listed.json() == refused.json()
    with b.runtime.sessions() as s:
        assert s.scalars(select(BreakGlassGrant)).all() == []
    assert [(r.action, r.outcome) for r in audit_rows(b)] == [
        ("break-glass.create", 403), ("break-glass.create", 403), ("break-glass.list", 403)]


@pytest.mark.parametrize(("body", "field"), [
    ({"purpose": "ETREAT"}, "reason"),
    ({"purpose": "ETREAT", "reason": ""}, "reason"),
    ({"purpose": "ETREAT", "reason": "          \n\t   "}, "reason"),
    ({"purpose": "ETREAT", "reason": "zq urgent"}, "reason"),                # 9 characters
    ({"purpose": "ETREAT", "reason": "     zq urgent      "}, "reason"),     # 9 once stripped
    ({"purpose": "ETREAT", "reason": "zq" + "x" * 1999}, "reason"),          # 2001 characters
    ({"purpose": "ETREAT", "reason": 1234567890123}, "reason"),
    ({"purpose": "TREAT", "reason": REASON}, "purpose"),                     # not an emergency purpose
    ({"reason": REASON}, "purpose"),
    ({"purpose": "ETREAT", "reason": REASON, "patient": "zq-extra"}, "patient"),
])
async def test_a_missing_or_thin_reason_is_refused_naming_only_the_field(bg_broker, body, field):
    """400 names the field; whatever was typed as a reason is not repeated back or logged."""
    b = bg_broker
    r = await call(b, "POST", "/mdts/mdt-alpha/break-glass", alias="mh", body=body)
    assert r.status_code == 400, r.text
    assert field in r.json()["issue"][0]["diagnostics"]
    assert "zq" not in r.text and "marker" not in r.text and "1234567890123" not in r.text
    with b.runtime.sessions() as s:
        assert s.scalars(select(BreakGlassGrant)).all() == []
    rows = audit_rows(b)
    assert [(r.action, r.outcome) for r in rows] == [("break-glass.create", 400)]
    assert "zq" not in rows[0].body and "marker" not in rows[0].body


async def test_exactly_ten_and_two_thousand_characters_are_accepted(bg_broker):
    """The bounds are inclusive, counted after stripping."""
    b = bg_broker
    for reason in ("  a" + "b" * 9 + "  ", "c" * 2000):
        r = await call(b, "POST", "/mdts/mdt-alpha/break-glass", alias="mh", body={"purpose": "ETREAT",
                                                                                    "reason": reason})
        assert r.status_code == 201, r.text


async def test_members_list_only_their_own_grants(bg_broker):
    """A member sees when they broke the glass, newest first; never someone else's grant or any reason."""
    b = bg_broker
    ids = []
    for purpose in ("ETREAT", "THREAT"):
        r = await call(b, "POST", "/mdts/mdt-alpha/break-glass", alias="mh", body={"purpose": purpose,
                                                                                    "reason": REASON})
        ids.append(r.json()["id"])
    other = (await call(b, "POST", "/mdts/mdt-alpha/break-glass", alias="sud",
                        body={"purpose": "ETREAT", "reason": REASON})).json()["id"]
    r = await call(b, "GET", "/mdts/mdt-alpha/break-glass", alias="mh")
    assert r.status_code == 200
    grants = r.json()["grants"]
    assert [g["id"] for g in grants] == ids[::-1] and other not in r.text
    assert all(set(g) == OUT_KEYS for g in grants) and "marker" not in r.text
    r = await call(b, "GET", "/mdts/mdt-bravo/break-glass", alias="mh")
    assert r.status_code == 200 and r.json() == {"mdt_id": "mdt-bravo", "grants": []}
    assert ("break-glass.list", 200) in [(row.action, row.outcome) for row in audit_rows(b)]


async def test_pending_reviews_queue_holds_only_unreviewed_grants(bg_broker):
    """The later review queue reads review_status; a reviewed grant leaves it."""
    b = bg_broker
    first = (await call(b, "POST", "/mdts/mdt-alpha/break-glass", alias="mh",
                        body={"purpose": "ETREAT", "reason": REASON})).json()["id"]
    second = (await call(b, "POST", "/mdts/mdt-bravo/break-glass", alias="phn",
                         body={"purpose": "THREAT", "reason": REASON})).json()["id"]
    with b.runtime.sessions() as s:
        assert [g.id for g in pending_reviews(s)] == [first, second]
        row = s.get(BreakGlassGrant, first)
        row.review_status, row.reviewed_by, row.reviewed_at = "approved", "staff-reviewer", datetime.now(timezone.utc)
        s.commit()
        assert [g.id for g in pending_reviews(s)] == [second]


async def test_the_reason_appears_in_no_response_log_or_audit_event(bg_broker):
    """The reason is stored for the reviewer and nowhere else (no PHI in logs, responses or the audit trail)."""
    b = bg_broker
    marker = "zqxv-marker"
    log = io.StringIO()
    configure_logging("DEBUG", stream=log)
    try:
        responses = [
            await call(b, "POST", "/mdts/mdt-alpha/break-glass", alias="mh", body={"purpose": "ETREAT",
                                                                                    "reason": REASON}),
            await call(b, "POST", "/mdts/mdt-alpha/break-glass", alias="da", body={"purpose": "ETREAT",
                                                                                    "reason": REASON}),
            await call(b, "POST", "/mdts/mdt-alpha/break-glass", alias="mh",
                       body={"purpose": "ETREAT", "reason": REASON * 40}),  # too long
            await call(b, "POST", "/mdts/mdt-alpha/break-glass", alias="mh",
                       body={"purpose": "NOPE", "reason": REASON}),
            await call(b, "GET", "/mdts/mdt-alpha/break-glass", alias="mh"),
        ]
    finally:
        configure_logging("WARNING")
    assert [r.status_code for r in responses] == [201, 403, 400, 400, 200]
    for r in responses:
        assert marker not in r.text and marker not in str(r.headers)
    written = log.getvalue()
    assert "break-glass" in written  # the request lines were logged, so the check below means something
    assert marker not in written
    rows = audit_rows(b)
    assert len(rows) == len(responses)
    for row in rows:
        assert marker not in row.body
        assert all(marker not in str(getattr(row, c.name)) for c in AuditEventRow.__table__.columns)
    assert json.loads(rows[0].body)["mdt_id"] == "mdt-alpha"
    with b.runtime.sessions() as s:
        assert [g.reason for g in s.scalars(select(BreakGlassGrant))] == [REASON]
