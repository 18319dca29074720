"""Break-glass review: every grant is queued, a privacy officer records one finding, late ones are listed."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from broker.audit import cli_review
from broker.audit.review import overdue
from broker.store.models import BreakGlassGrant
from tests.audit.auditors import all_events, call, event_of, start_audit_broker

NO_FHIR = "http://127.0.0.1:9/fhir"  # nothing here reads records
REASON = "Synthetic zqxv-reason: youth unresponsive at placement, clinician needs history"
NOTE = "Synthetic kwpl-note: emergency confirmed with the ED log"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def rb(request, tmp_path):  # type: ignore[no-untyped-def]
    """A fresh broker with the audit routes and two grants: mh on alpha, phn on bravo."""
    url = f"sqlite:///{tmp_path / 'broker.sqlite'}" if request.param == "sqlite" else \
        request.getfixturevalue("pg_server").create_database()
    b = await start_audit_broker(tmp_path, url, NO_FHIR)
    b.grants = []
    for alias, mdt in (("mh", "mdt-alpha"), ("phn", "mdt-bravo")):
        r = await call(b, "POST", f"/mdts/{mdt}/break-glass", alias=alias,
                       body={"purpose": "ETREAT", "reason": REASON})
        assert r.status_code == 201, r.text
        b.grants.append(r.json()["id"])
    yield b
    await b.aclose()


async def queue(b, alias: str, status: str | None = None):
    return await call(b, "GET", "/audit/break-glass", alias=alias, params={"status": status} if status else None)


async def review(b, alias: str, grant_id: str, finding: str = "justified", note: str = NOTE):
    return await call(b, "POST", f"/audit/break-glass/{grant_id}/review", alias=alias,
                      body={"finding": finding, "note": note})


async def test_every_grant_is_queued_for_review(rb):
    """Both grants wait, oldest first, with who, where, when and why-category — the reason hidden from auditors."""
    r = await queue(rb, "auditor")
    assert r.status_code == 200, r.text
    grants = r.json()["grants"]
    assert [g["id"] for g in grants] == rb.grants
    first = grants[0]
    assert (first["mdt_id"], first["youth_id"], first["sub"], first["agency"], first["role"], first["purpose"]) == \
        ("mdt-alpha", "y-alpha", "staff-mh", "bh", "mental-health-clinician", "ETREAT")
    assert first["review_status"] == "pending" and first["reviewed_at"] is None
    assert "reason" not in first and "zqxv" not in r.text


async def test_the_reason_is_shown_to_privacy_officers_only_and_never_logged(rb):
    """Reviewing needs the reason; nobody else sees it and no audit event carries it (nor the note)."""
    r = await queue(rb, "privacy")
    assert [g["reason"] for g in r.json()["grants"]] == [REASON, REASON]
    over = await call(rb, "GET", "/audit/break-glass/overdue", alias="auditor")
    assert "zqxv" not in over.text
    assert (await review(rb, "privacy", rb.grants[0])).status_code == 200
    done = await queue(rb, "auditor", "reviewed")
    assert "zqxv" not in done.text and done.json()["grants"][0]["review_note"] == NOTE
    assert not any("zqxv" in str(e) or "kwpl" in str(e) for _s, e in all_events(rb))


@pytest.mark.parametrize("alias", ["po", "mh", "admin", "depatty"])
async def test_only_audit_staff_see_the_queue(rb, alias):
    """Team members, even the grant holder, and registry admins get 403 on the queue and the overdue list."""
    assert (await queue(rb, alias)).status_code == 403
    assert (await call(rb, "GET", "/audit/break-glass/overdue", alias=alias)).status_code == 403


async def test_a_privacy_officer_records_one_finding(rb):
    """The finding, its time, the reviewer and the note are kept; the grant leaves the pending queue."""
    r = await review(rb, "privacy", rb.grants[1], finding="not-justified")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["review_status"] == "not-justified" and out["reviewed_by"] == "staff-privacy"
    assert out["review_note"] == NOTE and "reason" not in out
    assert abs(datetime.fromisoformat(out["reviewed_at"]) - datetime.now(UTC)) < timedelta(minutes=1)
    assert [g["id"] for g in (await queue(rb, "auditor")).json()["grants"]] == [rb.grants[0]]
    assert [g["id"] for g in (await queue(rb, "auditor", "reviewed")).json()["grants"]] == [rb.grants[1]]
    assert [g["id"] for g in (await queue(rb, "auditor", "all")).json()["grants"]] == rb.grants
    with rb.runtime.sessions() as s:
        row = s.get(BreakGlassGrant, rb.grants[1])
        assert (row.review_status, row.reviewed_by, row.review_note) == ("not-justified", "staff-privacy", NOTE)


async def test_an_auditor_may_not_review(rb):
    """Closing a review is the privacy officer's; an auditor's attempt is refused, audited, and changes nothing."""
    r = await review(rb, "auditor", rb.grants[0])
    assert r.status_code == 403
    assert event_of(rb, r.headers["x-request-id"])["action"] == "audit.review"
    assert (await call(rb, "POST", f"/audit/break-glass/{rb.grants[0]}/review", alias="mh",
                       body={"finding": "justified", "note": "my own grant"})).status_code == 403
    with rb.runtime.sessions() as s:
        assert s.get(BreakGlassGrant, rb.grants[0]).review_status == "pending"


async def test_a_grant_is_reviewed_once(rb):
    """A second review, even with the other finding, is a 409 and the first finding stands."""
    assert (await review(rb, "privacy", rb.grants[0], "justified")).status_code == 200
    again = await review(rb, "privacy", rb.grants[0], "not-justified", "changed my mind")
    assert again.status_code == 409
    with rb.runtime.sessions() as s:
        row = s.get(BreakGlassGrant, rb.grants[0])
        assert (row.review_status, row.review_note) == ("justified", NOTE)
    assert event_of(rb, again.headers["x-request-id"])["outcome"] == 409


@pytest.mark.parametrize(("body", "status", "named"), [
    ({"finding": "maybe", "note": NOTE}, 400, "finding"),
    ({"finding": "justified", "note": "   "}, 400, "note"),
    ({"finding": "justified"}, 400, "note"),
    ({"finding": "justified", "note": NOTE, "extra": 1}, 400, "extra"),
])
async def test_a_malformed_review_is_refused(rb, body, status, named):
    """Bad bodies name the field and leave the grant pending."""
    r = await call(rb, "POST", f"/audit/break-glass/{rb.grants[0]}/review", alias="privacy", body=body)
    assert r.status_code == status and named in r.json()["issue"][0]["diagnostics"]
    with rb.runtime.sessions() as s:
        assert s.get(BreakGlassGrant, rb.grants[0]).review_status == "pending"


async def test_an_unknown_grant_is_404(rb):
    """Reviewing a grant that does not exist changes nothing."""
    assert (await review(rb, "privacy", "bg-nonexistent")).status_code == 404


async def test_reviews_are_audit_events(rb):
    """The review event names the grant, the team, the youth and the finding — never the note or the reason."""
    r = await review(rb, "privacy", rb.grants[0], "justified")
    event = event_of(rb, r.headers["x-request-id"])
    assert event["action"] == "audit.review" and event["outcome"] == 200
    assert event["actor"]["sub"] == "staff-privacy"
    assert (event["mdt_id"], event["youth_id"]) == ("mdt-alpha", "y-alpha")
    assert event["detail"] == {"break_glass_id": rb.grants[0], "finding": "justified"}
    listed = await queue(rb, "auditor")
    assert event_of(rb, listed.headers["x-request-id"])["action"] == "audit.break-glass.list"


async def test_overdue_lists_unreviewed_grants_past_the_age(rb):
    """With the clock injected: nothing is overdue before max_age, both after; a reviewed grant never is."""
    with rb.runtime.sessions() as s:
        granted = [s.get(BreakGlassGrant, g).granted_at for g in rb.grants]
    latest = max(g if g.tzinfo else g.replace(tzinfo=UTC) for g in granted)
    age = timedelta(hours=72)
    at_the_edge = overdue(rb.runtime.sessions, now=latest + age, max_age=age)  # exactly max_age old: not yet
    assert [g.id for g in at_the_edge] == rb.grants[:1]
    assert [g.id for g in overdue(rb.runtime.sessions, now=latest + age + timedelta(seconds=1), max_age=age)] == \
        rb.grants
    earliest = min(g if g.tzinfo else g.replace(tzinfo=UTC) for g in granted)
    assert overdue(rb.runtime.sessions, now=earliest + age - timedelta(seconds=1), max_age=age) == []
    assert (await review(rb, "privacy", rb.grants[0])).status_code == 200
    late = overdue(rb.runtime.sessions, now=latest + age + timedelta(hours=1), max_age=age)
    assert [g.id for g in late] == [rb.grants[1]]
    assert not hasattr(late[0], "reason")
    with pytest.raises(ValueError):
        overdue(rb.runtime.sessions, now=datetime(2026, 1, 1), max_age=age)


async def test_the_overdue_route_uses_the_configured_age(rb):
    """A grant backdated past settings.break_glass_review_max_age_hours is listed; a fresh one is not."""
    hours = rb.runtime.settings.break_glass_review_max_age_hours
    with rb.runtime.sessions() as s:
        s.execute(update(BreakGlassGrant).where(BreakGlassGrant.id == rb.grants[1])
                  .values(granted_at=datetime.now(UTC) - timedelta(hours=hours, minutes=5)))
        s.commit()
    r = await call(rb, "GET", "/audit/break-glass/overdue", alias="privacy")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["max_age_hours"] == hours and [g["id"] for g in body["grants"]] == [rb.grants[1]]
    assert body["grants"][0]["reason"] == REASON
    assert event_of(rb, r.headers["x-request-id"])["detail"] == {"listed": 1}


async def test_the_overdue_command_prints_a_table(rb, monkeypatch, capsys):
    """`broker audit overdue` reads settings from the environment, honours --max-age-hours and exits 0."""
    settings = rb.runtime.settings
    for name, value in {"DATABASE_URL": settings.database_url, "PUBLIC_URL": settings.public_url,
                        "ISSUER": settings.issuer, "SIGNING_KEY_FILE": str(settings.signing_key_file),
                        "POLICY_DIR": str(settings.policy_dir), "BREAK_GLASS_REVIEW_MAX_AGE_HOURS": "5"}.items():
        monkeypatch.setenv(f"BROKER_{name}", value)
    with rb.runtime.sessions() as s:
        s.execute(update(BreakGlassGrant).where(BreakGlassGrant.id == rb.grants[0])
                  .values(granted_at=datetime.now(UTC) - timedelta(hours=6)))
        s.commit()
    parser = argparse.ArgumentParser(prog="broker")
    cli_review.add_parsers(parser.add_subparsers(dest="audit_command", required=True))
    args = parser.parse_args(["overdue"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "more than 5 h" in out and rb.grants[0] in out and rb.grants[1] not in out and "staff-mh" in out
    assert "zqxv" not in out
    args = parser.parse_args(["overdue", "--max-age-hours", "7"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert ": 0" in out and rb.grants[0] not in out
    args = parser.parse_args(["overdue", "--database-url", settings.database_url, "--max-age-hours", "1"])
    monkeypatch.delenv("BROKER_SIGNING_KEY_FILE")
    assert args.func(args) == 0
    assert rb.grants[0] in capsys.readouterr().out
