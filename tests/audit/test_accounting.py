"""The accounting of disclosures lists exactly what a scripted week released, and nothing withheld or refused."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from broker.audit.accounting import Disclosure, Recipient, Release, accounting, render_html, window_start
from tests.audit.auditors import call, start_audit_broker
from tests.scenarios.consents import consent
from tests.scenarios.harness import PERSONAS, YOUTH, client_id
from tests.scenarios.records import records

SYNTHETIC_NAMES = ("Testy", "Placeholder", "Fakename", "Notarealperson")


@dataclass
class Expected:
    """What the script says one request disclosed: who, which categories, why, and on what."""

    request_id: str
    alias: str
    purpose: str
    categories: set[str]
    consent_ids: list[str] = field(default_factory=list)
    break_glass_id: str | None = None
    relied: set[str] = field(default_factory=set)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def week(request, tmp_path_factory, fhir_server):  # type: ignore[no-untyped-def]
    """Run the week on a real broker; yield (broker, the disclosures the script expects, other request ids)."""
    tmp = tmp_path_factory.mktemp("week")
    url = f"sqlite:///{tmp / 'broker.sqlite'}" if request.param == "sqlite" else \
        request.getfixturevalue("pg_server").create_database()
    b = await start_audit_broker(tmp, url, fhir_server.base_url)
    expected: list[Expected] = []
    not_disclosures: dict[str, str] = {}
    released_ids: set[str] = set()

    async def read(alias: str, path: str, purpose: str, **kw) -> Expected | None:
        """One data request; a disclosure is expected exactly when resources came back."""
        r = await call(b, "GET", path, alias=alias, purpose=purpose, params=kw or None)
        if r.status_code != 200:
            not_disclosures[path + alias] = r.headers["x-request-id"]
            return None
        body = r.json()
        ids = [e["resource"]["id"] for e in body.get("entry", []) if e.get("search", {}).get("mode") == "match"] \
            if body.get("resourceType") == "Bundle" else [body["id"]]
        if not ids:
            not_disclosures[path + alias] = r.headers["x-request-id"]
            return None
        released_ids.update(ids)
        cats = set().union(*(records()[i][2] for i in ids))  # the data's own ground truth, not the broker's
        e = Expected(r.headers["x-request-id"], alias, purpose, cats)
        if "/mdts/mdt-alpha/" in path:
            expected.append(e)
        return e

    # Monday: team members read as usual.
    mon = await read("mh", "/mdts/mdt-alpha/fhir/Observation", "TREAT")
    mon.relied = {"mdt-member", "own-statute"}
    await read("cw", "/mdts/mdt-alpha/fhir/Patient/pt-alpha", "COC")
    expected[-1].relied = {"mdt-member", "own-statute"}
    # Tuesday: the Part 2 program's records stay closed to probation; then the youth consents.
    assert await read("po", "/mdts/mdt-alpha/fhir/Condition", "COC", _id="alpha-cond-cannabis") is None
    assert await read("po", "/mdts/mdt-alpha/fhir/Condition/alpha-cond-cannabis", "COC") is None
    r = await call(b, "POST", "/consents", alias="cw", body=consent(
        "y-alpha", categories=["sud-part2"], recipients=[("agency", "probation")], purposes=["COC"]))
    assert r.status_code == 201, r.text
    consent_id = r.json()["id"]
    # Wednesday: probation reads under the consent.
    for rtype in ("Condition", "Observation"):
        e = await read("po", f"/mdts/mdt-alpha/fhir/{rtype}", "COC")
        assert "sud-part2" in e.categories
        e.consent_ids, e.relied = [consent_id], {"mdt-member", "own-statute", "consent-part2"}
    # Thursday: the consent is revoked; probation's next read releases no Part 2 record.
    assert (await call(b, "POST", f"/consents/{consent_id}/revoke", alias="cw", body={})).status_code == 200
    e = await read("po", "/mdts/mdt-alpha/fhir/Condition", "COC")
    assert "sud-part2" not in e.categories
    e.relied = {"mdt-member", "own-statute"}
    # Friday: an emergency. A non-statutory clinician breaks the glass and reads.
    r = await call(b, "POST", "/mdts/mdt-alpha/break-glass", alias="mh-team",
                   body={"purpose": "ETREAT", "reason": "Synthetic emergency for the accounting test week."})
    assert r.status_code == 201, r.text
    grant_id = r.json()["id"]
    e = await read("mh-team", "/mdts/mdt-alpha/fhir/Observation", "ETREAT")
    assert "hiv" in e.categories
    e.break_glass_id, e.relied = grant_id, {"break-glass"}
    # Saturday: requests that release nothing, and a non-member who is refused.
    assert await read("ed", "/mdts/mdt-alpha/fhir/Observation", "COC") is None
    assert await read("caregiver", "/mdts/mdt-alpha/fhir/DocumentReference", "COC") is None
    assert await read("le", "/mdts/mdt-alpha/fhir/Observation", "HLEGAL") is None
    assert await read("po", "/mdts/mdt-alpha/fhir/DocumentReference/alpha-doc-psychnote-2025", "COC") is None
    # Sunday: another youth's team, which must not appear in this youth's accounting.
    other = await read("mh", "/mdts/mdt-bravo/fhir/Patient", "TREAT")
    assert other is not None
    yield b, expected, not_disclosures, released_ids, (consent_id, grant_id, other.request_id)
    await b.aclose()


async def get_accounting(b, alias="auditor", **params):
    return await call(b, "GET", "/audit/accounting", alias=alias, params={"youth": "y-alpha", **params})


async def test_the_accounting_lists_exactly_the_disclosures_made(week):
    """Every release appears once with its recipient, categories, purpose and grounds; nothing else appears."""
    b, expected, not_disclosures, _released, (_c, _g, other) = week
    r = await get_accounting(b)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["youth_id"] == "y-alpha" and body["window"] == "hipaa"
    got = body["disclosures"]
    assert [d["request_id"] for d in got] == [e.request_id for e in expected]
    for d, e in zip(got, expected):
        p = PERSONAS[e.alias]
        assert d["recipient"] == {"sub": p.sub, "role": p.role, "agency": p.agency, "client_id": client_id(p.agency)}
        assert set(d["categories"]) == e.categories, e.alias
        assert d["purpose"] == e.purpose and d["mdt_id"] == "mdt-alpha"
        assert d["consent_ids"] == e.consent_ids and d["break_glass_id"] == e.break_glass_id
        assert d["court_order_ids"] == []
        assert d["grounds"] and set(d["grounds"]) <= e.relied
        assert {x["category"] for x in d["releases"]} == e.categories
        assert all(x["citation"] for x in d["releases"]) and d["citations"]
    part2 = [d for d in got if d["consent_ids"]]
    assert len(part2) == 2 and all("consent-part2" in d["grounds"] and "sud-part2" in d["categories"] for d in part2)
    assert any("42 CFR 2.31" in c for d in part2 for c in d["citations"])
    assert next(d for d in got if d["break_glass_id"])["grounds"] == ["break-glass"]
    listed = {d["request_id"] for d in got}
    assert not listed & (set(not_disclosures.values()) | {other})


async def test_nothing_withheld_is_ever_listed(week):
    """Each listed category was actually released in that request; withheld-only requests are absent."""
    b, expected, _nd, _released, _ids = week
    got = (await get_accounting(b)).json()["disclosures"]
    by_id = {e.request_id: e for e in expected}
    for d in got:
        assert set(d["categories"]) <= by_id[d["request_id"]].categories
    assert "psychotherapy-notes" not in {c for d in got for c in d["categories"]}


async def test_the_part2_list_holds_the_consented_disclosures_and_survives_revocation(week):
    """42 CFR 2.24: the two releases under the general-designation consent, still listed after it was revoked."""
    b, expected, _nd, _released, (consent_id, _g, _o) = week
    r = await get_accounting(b, window="part2")
    assert r.status_code == 200
    got = r.json()["disclosures"]
    assert [d["request_id"] for d in got] == [e.request_id for e in expected if e.consent_ids]
    assert all(d["consent_ids"] == [consent_id] and "sud-part2" in d["categories"] for d in got)


async def test_look_back_windows_are_six_and_three_years(week):
    """With the clock moved on, disclosures drop out of the Part 2 list after 3 years and the HIPAA list after 6."""
    b, expected, _nd, _released, _ids = week
    now = datetime.now(UTC)
    n, n2 = len(expected), len([e for e in expected if e.consent_ids])
    assert len(accounting(b.runtime.sessions, youth_id="y-alpha", now=now)) == n
    later = now + timedelta(days=3 * 365 + 10)
    assert len(accounting(b.runtime.sessions, youth_id="y-alpha", now=later)) == n
    assert accounting(b.runtime.sessions, youth_id="y-alpha", now=later, part2_only=True) == []
    assert len(accounting(b.runtime.sessions, youth_id="y-alpha", now=now, part2_only=True)) == n2
    much_later = now + timedelta(days=6 * 365 + 10)
    assert accounting(b.runtime.sessions, youth_id="y-alpha", now=much_later) == []
    assert accounting(b.runtime.sessions, youth_id="y-alpha", now=now - timedelta(days=1)) == []
    assert window_start(datetime(2028, 2, 29, tzinfo=UTC), 6) == datetime(2022, 2, 28, tzinfo=UTC)


async def test_the_printable_form_has_the_window_the_date_and_no_record_content(week):
    """The HTML names the look-back window and date, lists every disclosure, and carries no record content."""
    b, expected, _nd, released_ids, (consent_id, grant_id, _o) = week
    r = await call(b, "GET", "/audit/accounting/print", alias="depatty", params={"youth": "y-alpha"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    page = r.text
    assert "45 CFR 164.528" in page and "past 6 years" in page
    assert datetime.now(UTC).strftime("%Y-%m-%d") in page
    assert page.count("<tr>") == len(expected) + 1  # header row + one per disclosure
    assert consent_id in page and grant_id in page and "@media print" in page
    assert "What the grounds mean" in page and "emergency" in page
    for rid in released_ids | set(YOUTH.values()):
        assert rid not in page, rid
    for name in SYNTHETIC_NAMES:
        assert name not in page
    part2 = await call(b, "GET", "/audit/accounting/print", alias="auditor",
                       params={"youth": "y-alpha", "window": "part2"})
    assert "42 CFR 2.24" in part2.text and "past 3 years" in part2.text


def test_the_printable_form_escapes_everything():
    """Markup in any recorded value is shown as text, never interpreted."""
    evil = "<script>alert(1)</script>"
    d = Disclosure(sequence=1, request_id="r", time=datetime(2026, 1, 2, 3, 4, tzinfo=UTC), mdt_id="m",
                   recipient=Recipient(sub=evil, role='x" onload="y', agency="a&b", client_id="<zz-client>"),
                   categories=("general-health",), purpose="<zz-purpose>", grounds=("mdt-member",),
                   consent_ids=("c'1",),
                   court_order_ids=(), break_glass_id=None,
                   releases=(Release("general-health", "mdt-member", "<zz-cite>"),))
    page = render_html([d], youth_id="y-<b>", window="hipaa", now=datetime(2026, 1, 9, tzinfo=UTC))
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert 'x" onload' not in page and "&quot;" in page and "a&amp;b" in page and "y-&lt;b&gt;" in page
    assert "<zz-" not in page and "&lt;zz-cite&gt;" in page and "&lt;zz-purpose&gt;" in page
    assert "2020-01-09 to 2026-01-09" in page


@pytest.mark.parametrize(("alias", "youth", "status"), [
    ("auditor", "y-alpha", 200), ("privacy", "y-alpha", 200), ("depatty", "y-alpha", 200),
    ("cw", "y-alpha", 200),
    ("cw-other", "y-bravo", 200), ("cw-other", "y-alpha", 403), ("po", "y-alpha", 403), ("mh", "y-alpha", 403),
    ("le", "y-alpha", 403), ("admin", "y-alpha", 403), ("depatty", "y-nobody", 403), ("po", "y-nobody", 403),
])
async def test_who_may_see_an_accounting(week, alias, youth, status):
    """Auditors, and the youth's attorney or social worker on the youth's team; everyone else the same 403."""
    b, *_ = week
    r = await call(b, "GET", "/audit/accounting", alias=alias, params={"youth": youth})
    assert r.status_code == status, r.text
    if status == 403:
        assert r.json()["issue"][0]["diagnostics"] == "you may not see the accounting of disclosures for this youth"
        assert "disclosures\"" not in r.text


async def test_the_accounting_is_audited_and_bad_parameters_are_named(week):
    """Each accounting request is an audit.accounting event about the youth; a bad window is a 400 naming it."""
    b, *_ = week
    r = await get_accounting(b, alias="privacy", window="part2")
    found = await call(b, "GET", "/audit/events", alias="auditor",
                       params={"action": "audit.accounting", "actor": "staff-privacy"})
    event = next(e for e in found.json()["events"] if e["request_id"] == r.headers["x-request-id"])
    assert event["youth_id"] == "y-alpha" and event["outcome"] == 200 and event["detail"] == {"window": "part2"}
    bad = await get_accounting(b, window="forever")
    assert bad.status_code == 400 and "window" in bad.json()["issue"][0]["diagnostics"]
    missing = await call(b, "GET", "/audit/accounting", alias="auditor")
    assert missing.status_code == 400 and "youth" in missing.json()["issue"][0]["diagnostics"]
