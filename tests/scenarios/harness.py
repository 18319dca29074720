"""A real broker for scenario tests: real keys, real tokens, a real database and FHIR server.

Personas are staff of invented agencies; each agency system has its own key pair and gets
its tokens through ``POST /oauth/token`` exactly as a county system would.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
from joserfc import jwt

from broker.app import create_app
from broker.auth.keys import BrokerKey, generate_private_key_pem
from broker.runtime import Runtime, build_runtime
from broker.settings import REPO_POLICY_DIR, Settings, SourceConfig
from broker.store.db import make_engine, make_sessionmaker, upgrade
from broker.store.models import Agency, Mdt, MembershipRow, OAuthClient, Staff, Youth, YouthIdentifier

PUBLIC_URL = "http://127.0.0.1:8000"
EHR_SYSTEM = "urn:mdt-broker:demo:county-ehr"
EHR_TYPES = ["Patient", "Observation", "Condition", "DocumentReference", "MedicationRequest", "Immunization",
             "Encounter"]
CWS_SYSTEM = "urn:mdt-broker:test:county-cws"
CWS_TYPES = ["EpisodeOfCare", "DocumentReference"]

AGENCIES = {
    "cws": ["child-welfare-worker", "registry-admin"],
    "probation": ["probation-officer"],
    "bh": ["mental-health-clinician", "substance-use-counselor"],
    "ph": ["public-health-nurse"],
    "schools": ["education-liaison"],
    "advocates": ["survivor-advocate"],
    "childrens-law": ["dependency-attorney"],
    "placement": ["caregiver"],
    "da": ["district-attorney"],
    "sheriff": ["law-enforcement"],
}

ACTIVE, ENDED = "active", "ended"


@dataclass(frozen=True)
class Persona:
    """A staff member and their place on each team."""

    alias: str
    agency: str
    role: str
    statutory: bool = False
    teams: dict[str, str] = field(default_factory=dict)

    @property
    def sub(self) -> str:
        return f"staff-{self.alias}"


ALL_TEAMS = {"mdt-alpha": ACTIVE, "mdt-bravo": ACTIVE, "mdt-charlie": ACTIVE}
PERSONAS = {p.alias: p for p in (
    Persona("cw", "cws", "child-welfare-worker", True, ALL_TEAMS),
    Persona("po", "probation", "probation-officer", True, ALL_TEAMS),
    Persona("mh", "bh", "mental-health-clinician", True, ALL_TEAMS),
    Persona("mh-team", "bh", "mental-health-clinician", False, ALL_TEAMS),
    Persona("sud", "bh", "substance-use-counselor", True, ALL_TEAMS),
    Persona("sud-team", "bh", "substance-use-counselor", False, ALL_TEAMS),
    Persona("phn", "ph", "public-health-nurse", True, ALL_TEAMS),
    Persona("ed", "schools", "education-liaison", False, ALL_TEAMS),
    Persona("advocate", "advocates", "survivor-advocate", False, ALL_TEAMS),
    Persona("depatty", "childrens-law", "dependency-attorney", True, ALL_TEAMS),
    Persona("caregiver", "placement", "caregiver", False, ALL_TEAMS),
    Persona("da", "da", "district-attorney"),
    Persona("le", "sheriff", "law-enforcement"),
    Persona("po-ended", "probation", "probation-officer", True, {"mdt-alpha": ENDED}),
    Persona("cw-other", "cws", "child-welfare-worker", True, {"mdt-bravo": ACTIVE}),
    Persona("admin", "cws", "registry-admin"),
)}
YOUTH = {"y-alpha": "pt-alpha", "y-bravo": "pt-bravo", "y-charlie": "pt-charlie"}
TEAMS = {"mdt-alpha": "y-alpha", "mdt-bravo": "y-bravo", "mdt-charlie": "y-charlie"}


def client_id(agency: str) -> str:
    """Each agency has one registered system."""
    return f"{agency}-system"


def write_key(path: Path) -> Path:
    """A fresh EC P-256 private key, readable only by its owner."""
    path.write_bytes(generate_private_key_pem("EC"))
    os.chmod(path, 0o600)
    return path


def make_settings(tmp: Path, database_url: str, fhir_base_url: str, cws_base_url: str | None = None,
                  **overrides) -> Settings:
    """Production-mode settings on loopback; optionally a child welfare source on a second server."""
    sources = [SourceConfig(name="county-ehr", kind="fhir", base_url=fhir_base_url, identifier_system=EHR_SYSTEM,
                            default_categories=["general-health"], resource_types=EHR_TYPES, timeout=5)]
    if cws_base_url:
        sources.append(SourceConfig(name="county-cws", kind="fhir", base_url=cws_base_url,
                                    identifier_system=CWS_SYSTEM, default_categories=["child-welfare-case"],
                                    resource_types=CWS_TYPES, timeout=5))
    values = dict(
        mode="production",
        database_url=database_url,
        public_url=PUBLIC_URL,
        issuer=PUBLIC_URL,
        signing_key_file=write_key(tmp / "broker.pem"),
        policy_dir=REPO_POLICY_DIR,
        sources=sources,
        log_level="WARNING",
    )
    values.update(overrides)
    return Settings(**values)


def seed(database_url: str, keys: dict[str, BrokerKey], *, cws: bool = False) -> None:
    """Agencies, clients, staff, three youth and their teams."""
    upgrade(database_url)
    engine = make_engine(database_url)
    now = datetime.now(timezone.utc)
    with make_sessionmaker(engine)() as s:
        for agency, roles in AGENCIES.items():
            s.add(Agency(id=agency, name=f"Test {agency}", roles=roles))
        s.flush()
        for agency in AGENCIES:
            s.add(OAuthClient(client_id=client_id(agency), agency_id=agency, name=f"{agency} system",
                              jwks=keys[agency].public_jwks(), active=True, created_at=now))
        for p in PERSONAS.values():
            s.add(Staff(sub=p.sub, agency_id=p.agency, roles=[p.role], active=True))
        for youth, patient in YOUTH.items():
            s.add(Youth(id=youth, birth_date=None, created_at=now, created_by="seed"))
            s.flush()
            s.add(YouthIdentifier(youth_id=youth, source="county-ehr", system=EHR_SYSTEM, value=patient))
        if cws:
            s.add(YouthIdentifier(youth_id="y-alpha", source="county-cws", system=CWS_SYSTEM, value="cws-0001"))
        for mdt, youth in TEAMS.items():
            s.add(Mdt(id=mdt, youth_id=youth, lead_agency_id="cws", opened_at=now - timedelta(days=60),
                      closed_at=None, created_by="seed"))
        s.flush()
        for p in PERSONAS.values():
            for mdt, state in p.teams.items():
                s.add(MembershipRow(id=f"m-{p.alias}-{mdt}", mdt_id=mdt, agency_id=p.agency, sub=p.sub,
                                    team_role=p.role, statutory=p.statutory,
                                    valid_from=now - timedelta(days=30),
                                    valid_to=(now - timedelta(days=1)) if state == ENDED else None,
                                    added_by="seed"))
        s.commit()
    engine.dispose()


@dataclass
class Broker:
    """An app, its runtime, an HTTP client on it, and the agency systems' keys."""

    runtime: Runtime
    client: httpx.AsyncClient
    keys: dict[str, BrokerKey]

    def assertion(self, agency: str, **claims) -> str:
        """An RFC 7523 client assertion signed by the agency system's key."""
        key = self.keys[agency]
        now = int(time.time())
        body = {"iss": client_id(agency), "sub": client_id(agency), "aud": f"{PUBLIC_URL}/oauth/token",
                "iat": now, "exp": now + 60, "jti": uuid.uuid4().hex}
        body.update(claims)
        return jwt.encode({"alg": key.alg, "kid": key.kid}, body, key.jwk, algorithms=[key.alg])

    async def request_token(self, *, agency: str, sub: str, role: str, **extra) -> httpx.Response:
        """POST /oauth/token as the agency's system."""
        form = {"grant_type": "client_credentials",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": self.assertion(agency), "staff_sub": sub, "staff_role": role, **extra}
        return await self.client.post("/oauth/token", data=form)

    async def token(self, alias: str) -> str:
        """A real access token for a persona, through the token endpoint."""
        p = PERSONAS[alias]
        r = await self.request_token(agency=p.agency, sub=p.sub, role=p.role)
        assert r.status_code == 200, r.text
        return r.json()["access_token"]

    async def get(self, path: str, *, alias: str | None = None, token: str | None = None,
                  purpose: str | None = "TREAT", **params) -> httpx.Response:
        """GET with a persona's token and a purpose of use."""
        headers = {}
        if alias is not None:
            token = await self.token(alias)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if purpose is not None:
            headers["X-Purpose-Of-Use"] = purpose
        return await self.client.get(path, headers=headers, params=params or None)

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.runtime.aclose()


async def start_broker(tmp: Path, database_url: str, fhir_base_url: str, cws_base_url: str | None = None,
                       **overrides) -> Broker:
    """Seed a database and build a broker on it."""
    keys = {}
    for agency in AGENCIES:
        keys[agency] = BrokerKey.from_pem(write_key(tmp / f"{agency}.pem").read_bytes())
    seed(database_url, keys, cws=cws_base_url is not None)
    settings = make_settings(tmp, database_url, fhir_base_url, cws_base_url, **overrides)
    runtime = build_runtime(settings)
    app = create_app(runtime=runtime)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=PUBLIC_URL)
    return Broker(runtime=runtime, client=client, keys=keys)
