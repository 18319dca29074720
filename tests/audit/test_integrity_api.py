"""The integrity API through a real app: real tokens, the pipeline's authentication and audit, both databases."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timezone

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fhir.resources.R4B.auditevent import AuditEvent
from sqlalchemy import select

from broker.api import audit_integrity
from broker.app import create_app
from broker.audit.checkpoint import AuditKey, write_checkpoint
from broker.audit.export import verify_export
from broker.auth.keys import BrokerKey
from broker.runtime import build_runtime
from broker.store.models import Agency, AuditEventRow, OAuthClient, Staff
from tests.scenarios.harness import AGENCIES, PUBLIC_URL, Broker, client_id, make_settings, seed, write_key

AUDIT_OFFICE = "audit-office"


@pytest.fixture
async def broker(db, tmp_path):
    """A broker with the integrity router, a checkpoint key, and an audit office staffed by an auditor."""
    keys = {a: BrokerKey.from_pem(write_key(tmp_path / f"{a}.pem").read_bytes()) for a in [*AGENCIES, AUDIT_OFFICE]}
    seed(db.url, {a: keys[a] for a in AGENCIES})
    now = datetime.now(timezone.utc)
    with db.sessions.begin() as s:
        s.add(Agency(id=AUDIT_OFFICE, name="County audit office", roles=["auditor", "privacy-officer"]))
        s.flush()
        s.add(OAuthClient(client_id=client_id(AUDIT_OFFICE), agency_id=AUDIT_OFFICE, name="audit tool",
                          jwks=keys[AUDIT_OFFICE].public_jwks(), active=True, created_at=now))
        s.add(Staff(sub="staff-auditor", agency_id=AUDIT_OFFICE, roles=["auditor", "privacy-officer"], active=True))
    settings = make_settings(tmp_path, db.url, "http://127.0.0.1:9", sources=[])
    runtime = build_runtime(settings)
    runtime.audit_key = AuditKey(Ed25519PrivateKey.generate())  # what the wiring will set from audit_key_file
    app = create_app(runtime=runtime)
    app.include_router(audit_integrity.router)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=PUBLIC_URL)
    b = Broker(runtime=runtime, client=client, keys=keys)
    yield b
    await b.aclose()


async def _token(broker: Broker, role: str = "auditor") -> dict[str, str]:
    r = await broker.request_token(agency=AUDIT_OFFICE, sub="staff-auditor", role=role)
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def _events(broker: Broker) -> list[dict]:
    with broker.runtime.sessions() as s:
        return [json.loads(b) for b in s.scalars(select(AuditEventRow.body).order_by(AuditEventRow.seq))]


async def test_checkpoint_key_is_public(broker):
    r = await broker.client.get("/audit/checkpoint-key")
    assert r.status_code == 200
    key = broker.runtime.audit_key
    assert r.json() == {"key_id": key.key_id, "alg": "EdDSA", "pem": key.public_pem(), "jwk": key.public_jwk()}
    broker.runtime.audit_key = None
    assert (await broker.client.get("/audit/checkpoint-key")).status_code == 404


async def test_verify_reports_and_is_itself_audited(broker, db):
    for alias in ("po", "cw"):
        await broker.get("/mdts/mdt-alpha", alias=alias)
    write_checkpoint(db.sessions, broker.runtime.audit_key, reason="manual")
    before = len(_events(broker))

    for role in ("auditor", "privacy-officer"):
        r = await broker.client.get("/audit/verify", headers=await _token(broker, role))
        assert r.status_code == 200, r.text
        report = r.json()
        assert report["ok"] is True and report["signatures_checked"] is True and report["kind"] is None
        assert report["signed_through"] == before and report["summary"].startswith("OK:")
    last = _events(broker)[-1]
    assert last["action"] == "audit.verify" and last["outcome"] == 200
    assert last["actor"]["role"] == "privacy-officer" and last["detail"]["verify"]["ok"] is True


async def test_only_auditors_and_privacy_officers_get_in(broker):
    po = await broker.token("po")
    for path in ("/audit/verify", "/audit/export"):
        r = await broker.client.get(path, headers={"Authorization": f"Bearer {po}"})
        assert r.status_code == 403, (path, r.text)
        assert (await broker.client.get(path)).status_code == 401
    denied = [e for e in _events(broker) if e["action"] in ("audit.verify", "audit.export")]
    assert [(e["action"], e["outcome"]) for e in denied] == [("audit.verify", 403), ("audit.verify", 401),
                                                             ("audit.export", 403), ("audit.export", 401)]


async def test_exports_stream_in_each_format(broker, db):
    await broker.get("/mdts/mdt-alpha", alias="po")
    write_checkpoint(db.sessions, broker.runtime.audit_key, reason="manual")
    auditor = await _token(broker)
    pem = (await broker.client.get("/audit/checkpoint-key")).json()["pem"]

    r = await broker.client.get("/audit/export", headers=auditor)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    assert "attachment" in r.headers["content-disposition"]
    report = verify_export(r.text.splitlines(), pem)
    assert report.ok and report.count >= 2 and report.signed_through is not None, report
    assert json.loads(r.text.splitlines()[-3])["action"] == "audit.export"  # audited before streaming

    r = await broker.client.get("/audit/export", params={"format": "csv", "since_seq": 2}, headers=auditor)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text, newline="")))
    assert rows[0]["seq"] == "2" and rows[-1]["action"] == "audit.export"

    r = await broker.client.get("/audit/export", params={"format": "fhir"}, headers=auditor)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+ndjson")
    resources = [AuditEvent.model_validate(json.loads(line)) for line in r.text.splitlines()]
    assert resources[0].agent[1].who.identifier.value == "staff-po"

    r = await broker.client.get("/audit/export", params={"format": "xml"}, headers=auditor)
    assert r.status_code == 400
