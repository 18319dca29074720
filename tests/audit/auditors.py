"""A real broker with the audit routes and two audit staff (an auditor and a privacy officer).

The harness's agencies stay as they are; an extra agency "audit" with its own system and key
is seeded next to them, and its staff get tokens from the token endpoint like anyone else.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.auth.keys import BrokerKey
from broker.store.models import Agency, AuditEventRow, OAuthClient, Staff
from tests.scenarios.harness import Broker, client_id, start_broker, write_key

AUDIT_AGENCY = "audit"
AUDIT_STAFF = {"auditor": ("staff-auditor", "auditor"), "privacy": ("staff-privacy", "privacy-officer")}




async def start_audit_broker(tmp: Path, database_url: str, fhir_base_url: str, **overrides) -> Broker:
    """The harness broker plus the audit agency, its system and its two staff, serving the audit routes."""
    b = await start_broker(tmp, database_url, fhir_base_url, **overrides)
    key = BrokerKey.from_pem(write_key(tmp / f"{AUDIT_AGENCY}.pem").read_bytes())
    b.keys[AUDIT_AGENCY] = key
    with b.runtime.sessions() as s:
        seed_audit_office(s, key)
    return b


def seed_audit_office(s: Session, key: BrokerKey) -> None:
    """The audit office agency, its system (signing with ``key``) and its two staff; commits."""
    s.add(Agency(id=AUDIT_AGENCY, name="Test audit office", roles=["auditor", "privacy-officer"]))
    s.flush()
    s.add(OAuthClient(client_id=client_id(AUDIT_AGENCY), agency_id=AUDIT_AGENCY, name="audit system",
                      jwks=key.public_jwks(), active=True, created_at=datetime.now(timezone.utc)))
    for sub, role in AUDIT_STAFF.values():
        s.add(Staff(sub=sub, agency_id=AUDIT_AGENCY, roles=[role], active=True))
    s.commit()


async def token(b: Broker, alias: str) -> str:
    """A real token for a harness persona or one of the audit staff."""
    if alias in AUDIT_STAFF:
        sub, role = AUDIT_STAFF[alias]
        r = await b.request_token(agency=AUDIT_AGENCY, sub=sub, role=role)
        assert r.status_code == 200, r.text
        return r.json()["access_token"]
    return await b.token(alias)


async def call(b: Broker, method: str, path: str, *, alias: str, params=None, body=None,
               purpose: str | None = None) -> httpx.Response:
    """One request as ``alias`` (JSON body, optional purpose of use)."""
    headers = {"Authorization": f"Bearer {await token(b, alias)}"}
    if purpose:
        headers["X-Purpose-Of-Use"] = purpose
    if body is not None:
        headers["Content-Type"] = "application/fhir+json" if path.startswith("/consents") else "application/json"
        return await b.client.request(method, path, headers=headers, params=params, content=json.dumps(body))
    return await b.client.request(method, path, headers=headers, params=params)


def all_events(b: Broker) -> list[tuple[int, dict]]:
    """Every stored event, straight from the table (the oracle the API is compared with)."""
    with b.runtime.sessions() as s:
        return [(seq, json.loads(body)) for seq, body in
                s.execute(select(AuditEventRow.seq, AuditEventRow.body).order_by(AuditEventRow.seq)).all()]


def event_of(b: Broker, request_id: str) -> dict:
    """The stored event of one request."""
    return next(e for _s, e in all_events(b) if e["request_id"] == request_id)
