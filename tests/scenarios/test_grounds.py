"""Consents, court orders and break-glass unlock exactly what they cover, and nothing after they lapse."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select, update

from broker.store.models import AuditEventRow, BreakGlassGrant
from tests.scenarios.consents import consent
from tests.scenarios.harness import PERSONAS, Broker, start_broker

SUD_ITEMS = {"alpha-cond-cannabis", "alpha-enc-sud-intake"}  # Part 2 Condition + Encounter
HIV_ITEMS = {"alpha-obs-hiv-2024", "alpha-obs-hiv-2025", "alpha-obs-hiv-2026"}


@pytest.fixture
async def gb(tmp_path, fhir_server, cws_server) -> Broker:  # type: ignore[no-untyped-def]
    """A broker with the EHR and the child welfare system, on a fresh SQLite database."""
    b = await start_broker(tmp_path, f"sqlite:///{tmp_path / 'broker.sqlite'}", fhir_server.base_url,
                           cws_server.base_url)
    yield b
    await b.aclose()


async def _post(b: Broker, alias: str, path: str, body: dict | None = None):
    token = await b.token(alias)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    return await b.client.post(path, headers=headers, content=json.dumps(body or {}))


async def _ids(b: Broker, alias: str, rtype: str, purpose: str, mdt: str = "mdt-alpha") -> set[str]:
    r = await b.get(f"/mdts/{mdt}/fhir/{rtype}", alias=alias, purpose=purpose)
    assert r.status_code == 200, r.text
    return {e["resource"]["id"] for e in r.json().get("entry", []) if e["search"]["mode"] == "match"}


async def _file(b: Broker, body: dict, alias: str = "cw") -> str:
    r = await _post(b, alias, "/consents", body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _sud(**kw) -> dict:
    kw.setdefault("recipients", [("agency", "probation")])
    kw.setdefault("purposes", ["COC"])
    return consent("y-alpha", categories=["sud-part2"], **kw)


async def test_probation_sees_part2_records_only_with_a_consent_naming_probation(gb):
    without_consent = await _ids(gb, "po", "Condition", "COC")
    assert not (without_consent & SUD_ITEMS)
    consent_id = await _file(gb, _sud())
    with_consent = await _ids(gb, "po", "Condition", "COC")
    assert "alpha-cond-cannabis" in with_consent
    bundle = (await gb.get("/mdts/mdt-alpha/fhir/Condition", alias="po", purpose="COC")).json()
    notices = [e for e in bundle["meta"]["extension"]]
    assert {"valueReference": {"reference": f"Consent/{consent_id}"}}.items() <= notices[-1].items()
    assert any("42 CFR 2.32" in e.get("valueString", "") for e in notices)
    r = await gb.get("/mdts/mdt-alpha/fhir/Condition/alpha-cond-cannabis", alias="po", purpose="COC")
    labels = {s["code"] for s in r.json()["meta"]["security"]}
    assert {"PART2NOTICE", "NORDSCLCD", "NOUSEAGAINSTYOUTH"} <= labels
    refs = [e["valueReference"]["reference"] for e in r.json()["meta"]["extension"]]
    assert f"Consent/{consent_id}" in refs
    # the consent ids relied on are in the audit event
    with gb.runtime.sessions() as s:
        row = s.scalars(select(AuditEventRow).where(AuditEventRow.request_id == r.headers["x-request-id"])).one()
    event = json.loads(row.body)
    assert event["grounds"]["consent_ids"] == [consent_id]
    decided = next(d for d in event["decisions"] if d["category"] == "sud-part2")
    assert decided["effect"] == "allow" and decided["ground"] == "consent-part2" and "2.31" in decided["citation"]
    # revocation takes effect on the very next request
    assert (await _post(gb, "cw", f"/consents/{consent_id}/revoke")).status_code == 200
    assert not (await _ids(gb, "po", "Condition", "COC")) & SUD_ITEMS


@pytest.mark.parametrize("variant", ["other-recipient", "wrong-purpose", "expired"])
async def test_a_consent_that_does_not_fit_unlocks_nothing(gb, variant):
    now = datetime.now(timezone.utc)
    body = {
        "other-recipient": _sud(recipients=[("agency", "bh")]),
        "wrong-purpose": _sud(purposes=["TREAT"]),
        "expired": _sud(start=now - timedelta(days=30), end=now + timedelta(seconds=2)),
    }[variant]
    await _file(gb, body)
    if variant == "expired":
        assert (await _ids(gb, "po", "Condition", "COC")) & SUD_ITEMS  # in force until it lapses
        await asyncio.sleep(2.5)
    assert not (await _ids(gb, "po", "Condition", "COC")) & SUD_ITEMS


async def test_an_hiv_authorization_covers_one_disclosure(gb):
    body = consent("y-alpha", categories=["hiv"], recipients=[("person", PERSONAS["po"].sub)], purposes=["COC"])
    await _file(gb, body)
    first = await _ids(gb, "po", "Observation", "COC")
    assert HIV_ITEMS <= first
    second = await _ids(gb, "po", "Observation", "COC")
    assert not second & HIV_ITEMS
    assert "alpha-obs-weight-2025" in second  # everything else is unaffected


async def test_a_parent_cannot_authorise_reproductive_health_records(gb):
    body = consent("y-alpha", categories=["reproductive-health"], recipients=[("role", "probation-officer")],
                   purposes=["COC"], signer="parent-guardian")
    r = await _post(gb, "cw", "/consents", body)
    assert r.status_code == 422
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert any("signer" in " ".join(i.get("expression", [])) or "performer" in " ".join(i.get("expression", []))
               for i in outcome["issue"])


async def test_a_thirteen_year_old_signs_their_own_sud_consent(gb):
    born = (datetime.now(timezone.utc) - timedelta(days=13 * 365 + 30)).date().isoformat()
    token = await gb.token("cw")
    r = await gb.client.post("/youth", headers={"Authorization": f"Bearer {token}"},
                             json={"birth_date": born, "identifiers": []})
    youth = r.json()["id"]
    r = await gb.client.post("/mdts", headers={"Authorization": f"Bearer {token}"},
                             json={"youth_id": youth, "lead_agency": "cws"})
    mdt = r.json()["id"]
    cw = PERSONAS["cw"]
    r = await gb.client.post(f"/mdts/{mdt}/members", headers={"Authorization": f"Bearer {token}"},
                             json={"sub": cw.sub, "agency": cw.agency, "team_role": cw.role})
    assert r.status_code == 201
    ok = consent(youth, categories=["sud-part2"], recipients=[("agency", "probation")], purposes=["COC"])
    assert (await _post(gb, "cw", "/consents", ok)).status_code == 201
    parent = consent(youth, categories=["sud-part2"], recipients=[("agency", "probation")], purposes=["COC"],
                     signer="parent-guardian")
    assert (await _post(gb, "cw", "/consents", parent)).status_code == 422


async def test_break_glass_needs_a_reason_and_lapses(gb):
    path = "/mdts/mdt-alpha/break-glass"
    assert not (await _ids(gb, "mh-team", "Observation", "ETREAT")) & HIV_ITEMS
    assert (await _post(gb, "mh-team", path, {"purpose": "ETREAT"})).status_code == 400
    assert (await _post(gb, "mh-team", path, {"purpose": "ETREAT", "reason": "  "})).status_code == 400
    r = await _post(gb, "mh-team", path, {"purpose": "ETREAT",
                                          "reason": "Youth brought to the ED unresponsive; need HIV status now."})
    assert r.status_code == 201, r.text
    grant_id = r.json()["id"]
    assert "unresponsive" not in r.text
    r = await gb.get("/mdts/mdt-alpha/fhir/Observation", alias="mh-team", purpose="ETREAT")
    assert HIV_ITEMS <= {e["resource"]["id"] for e in r.json()["entry"]}
    with gb.runtime.sessions() as s:
        event = json.loads(s.scalars(select(AuditEventRow.body).where(
            AuditEventRow.request_id == r.headers["x-request-id"])).one())
        assert event["break_glass"] is True and event["grounds"]["break_glass_id"] == grant_id
        assert all("unresponsive" not in b for b in s.scalars(select(AuditEventRow.body)))
        # the window closes
        s.execute(update(BreakGlassGrant).where(BreakGlassGrant.id == grant_id)
                  .values(expires_at=datetime.now(timezone.utc) - timedelta(seconds=1)))
        s.commit()
    assert not (await _ids(gb, "mh-team", "Observation", "ETREAT")) & HIV_ITEMS
    # psychotherapy notes never, not even in an emergency
    assert "alpha-doc-psychnote-2025" not in await _ids(gb, "mh", "DocumentReference", "ETREAT")


async def test_a_court_order_gives_the_da_the_case_file_but_never_youth_statements(gb):
    assert (await gb.get("/mdts/mdt-alpha/fhir/EpisodeOfCare", alias="da", purpose="HLEGAL")).status_code == 403
    order = {"youth_id": "y-alpha", "case_number": "JV-2026-000123", "court": "Superior Court (synthetic)",
             "categories": ["child-welfare-case", "youth-statement"], "purposes": ["HLEGAL"],
             "recipients": [{"kind": "person", "value": PERSONAS["da"].sub}]}
    token = await gb.token("admin")
    r = await gb.client.post("/court-orders", headers={"Authorization": f"Bearer {token}"}, json=order)
    assert r.status_code == 201, r.text
    assert await _ids(gb, "da", "EpisodeOfCare", "HLEGAL") == {"cws-case-2025"}
    docs = await _ids(gb, "da", "DocumentReference", "HLEGAL")
    assert docs == {"cws-doc-court-report"}          # the statement is withheld, even though the order names it
    assert await _ids(gb, "da", "Observation", "HLEGAL") == set()   # health records: nothing
    assert (await gb.get("/mdts/mdt-alpha/fhir/EpisodeOfCare", alias="da", purpose="CHILDPROT")).json().get(
        "entry") is None                             # the order's purpose binds
    assert (await gb.get("/mdts/mdt-alpha/fhir/EpisodeOfCare", alias="le", purpose="HLEGAL")).status_code == 403


@pytest.mark.postgres
async def test_revocation_is_seen_by_another_broker_process_on_the_same_database(tmp_path, pg_server, fhir_server):
    """Broker A (in this process) revokes; broker B (a separate `broker serve` process) denies next."""
    import os
    import subprocess
    import sys

    import httpx
    import yaml

    from tests.support.ports import free_port

    url = pg_server.create_database()
    a = await start_broker(tmp_path, url, fhir_server.base_url)
    settings = a.runtime.settings
    sources = tmp_path / "sources.yaml"
    sources.write_text(yaml.safe_dump({"sources": [s.model_dump(mode="json") for s in settings.sources]}))
    port = free_port()
    env = {**os.environ, "BROKER_DATABASE_URL": url, "BROKER_PUBLIC_URL": settings.public_url,
           "BROKER_ISSUER": settings.issuer, "BROKER_SIGNING_KEY_FILE": str(settings.signing_key_file),
           "BROKER_SOURCES_FILE": str(sources), "BROKER_LOG_LEVEL": "WARNING"}
    process = subprocess.Popen([sys.executable, "-m", "broker.cli", "serve", "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    client_b = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}")
    try:
        for _ in range(200):
            try:
                if (await client_b.get("/healthz")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(process.stderr.read().decode()[-2000:] if process.poll() is not None else "no start")

        async def ids_b() -> set[str]:
            token = await a.token("po")
            r = await client_b.get("/mdts/mdt-alpha/fhir/Condition", headers={
                "Authorization": f"Bearer {token}", "X-Purpose-Of-Use": "COC"})
            assert r.status_code == 200, r.text
            return {e["resource"]["id"] for e in r.json().get("entry", [])}

        consent_id = await _file(a, _sud())
        assert await ids_b() & SUD_ITEMS
        assert (await _post(a, "cw", f"/consents/{consent_id}/revoke")).status_code == 200
        assert not (await ids_b()) & SUD_ITEMS
    finally:
        await client_b.aclose()
        process.terminate()
        process.wait(timeout=10)
        await a.aclose()
