"""Issue 7: secrets only from environment or files, never logged; no PHI in any log line or span.

The broker here is started the way ``broker serve`` starts it: ``BROKER_*`` environment variables
name the key files and carry the database URL (``broker.cli._settings_from_env``), then
``create_app(settings)`` runs under uvicorn with ``log_config=None`` and ``access_log=False``, on a
real loopback socket. ``BROKER_LOG_LEVEL=DEBUG``, and every logger that sets its own level
(SQLAlchemy, the broker's Casbin logger, ...) is opened to DEBUG too, so uvicorn, SQLAlchemy,
psycopg, aiohttp and asyncio records all reach the broker's handler; ``BROKER_OTEL_EXPORTER=console``
with the console exporter swapped for an in-memory one, so ``configure_tracing`` builds the real
provider, resource and batch processor. Everything the process writes to its stdout and stderr
(``capfd``) is the log, and no other log handler may exist; every span name, attribute, event,
link, status and resource attribute is the trace. The test's own HTTP client is aiohttp, which
logs nothing per request, so every captured line is the broker's.

Seeded secrets: the token-signing key (RSA, PEM file), the audit checkpoint key (Ed25519, PEM
file), every agency system's client-assertion private key, the passwords in the broker's database
URL and in two source database URLs, and every access token and client assertion used. Seeded PHI:
a youth's name, birth date, address, phone, record numbers and clinical free text in a FHIR server
and in a SQL agency database, and the same kind of values typed into requests (identifier lookups,
consents, court orders, a break-glass reason, a review note, malformed inputs).

The traffic mixes token issuance and refusals, FHIR searches and reads, the record view, registry,
consent, court-order, break-glass, policy and audit routes, refused and malformed requests, and
failures (a source that refuses connections, a database that does not exist, injected faults in a
connector, a pipeline stage and the audit sink). Positive controls prove that logs and spans were
captured and that the seeded PHI really went through the broker.

A second test starts ``broker serve``'s settings loader on broken sources files: the error must
name the problem, never echo the database password written next to it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import time
import traceback
import uuid
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
import uvicorn
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwt
from joserfc.jwk import OKPKey
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import create_engine, make_url

from broker import observability
from broker.audit.checkpoint import generate_audit_key_pem, write_checkpoint
from broker.auth.keys import BrokerKey, generate_private_key_pem
from broker.pipeline.context_cache import ContextCache
from broker.store.db import make_engine, make_sessionmaker
from connectors import synthetic
from connectors.synthetic.schema import METADATA
from tests.audit.auditors import AUDIT_AGENCY, AUDIT_STAFF, seed_audit_office
from tests.scenarios.consents import consent
from tests.scenarios.harness import AGENCIES, EHR_SYSTEM, EHR_TYPES, PERSONAS, PUBLIC_URL, client_id, seed

pytestmark = [pytest.mark.postgres, pytest.mark.fhirserver]

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CWS_SYSTEM = synthetic.identifier_system("cws-cms")
LAB_SYSTEM = "urn:mdt-broker:test:county-lab"
ARCHIVE_SYSTEM = "urn:mdt-broker:test:cws-archive"

# ---- seeded PHI (all invented) --------------------------------------------------------------
EHR_ID = "cnry-ehr-QX7Z"  # the youth's patient id in the EHR (an identifier)
CWS_ID = "CWS-CNRY-5531"  # and in the child welfare system
LAB_ID = "LAB-CNRY-0917"
ARCHIVE_ID = "ARC-CNRY-3318"
MRN = "MRN-ZQX-4471"
GIVEN, FAMILY = "Canaryname", "Zyxwqu"
BIRTH = "2009-02-17"
ADDRESS, CITY, PHONE = "4417 Quillfeather Terrace", "Marrowbeck", "555-0142-7781"
OBS_NOTE = "Canary weight note: Pellucidar clinic recheck"
COND_NOTE = "Quibblewick disclosed canary detail at intake"
DOC_DESC = "Snollygoster canary narrative"
ATTACHMENT = "Flibbertigibbet canary attachment text"
ENC_REASON = "Gallimaufry canary visit reason"
PART2_NOTE = "Hornswoggle canary Part 2 treatment note"
PSYCH_NOTE = "Bumfuzzle canary psychotherapy note"
CWS_GIVEN, CWS_FAMILY = "Canarygiven", "Wobblesnort"
CAREGIVER, CWS_ADDRESS, CWS_CITY = "Carekeeper Thistlewaite", "88 Obscura Mews", "Vexhollow"
WORKER, REPORTER = "Caseworker Snickerdoodle", "Reporter Kerfuffle"
ALLEGATION, NOTE, STATEMENT = ("Canary allegation Widdershins", "Contact note Lollygag canary",
                               "Youth statement Cattywampus canary")
# typed into requests
CONSENT_TEXT, SIGNER = "Canary consent scope Brouhaha", "rp-Fizzwhistle"
CASE_NUMBER, COURT = "JV-CNRY-Skedaddle-77", "Superior Court of Canaryshire"
BG_REASON = f"Canary emergency: {FAMILY} overdose risk at Quillfeather shelter, Discombobulate"
REVIEW_NOTE = "Canary review note Rigmarole: justified"
BAD_INPUT = "Kerplunk-canary-input"

PHI = [EHR_ID, CWS_ID, LAB_ID, ARCHIVE_ID, MRN, GIVEN, FAMILY, BIRTH, ADDRESS, "Quillfeather", CITY, PHONE,
       OBS_NOTE, "Pellucidar", COND_NOTE, "Quibblewick", DOC_DESC, "Snollygoster", ATTACHMENT, "Flibbertigibbet",
       base64.b64encode(ATTACHMENT.encode()).decode(), ENC_REASON, "Gallimaufry", PART2_NOTE, "Hornswoggle",
       PSYCH_NOTE, "Bumfuzzle", CWS_GIVEN, CWS_FAMILY, CAREGIVER, "Thistlewaite", CWS_ADDRESS, "Obscura Mews",
       CWS_CITY, WORKER, "Snickerdoodle", REPORTER, "Kerfuffle", ALLEGATION, "Widdershins", NOTE, "Lollygag",
       STATEMENT, "Cattywampus", CONSENT_TEXT, "Brouhaha", SIGNER, "Fizzwhistle", CASE_NUMBER, "Skedaddle", COURT,
       "Canaryshire", BG_REASON, "Discombobulate", REVIEW_NOTE, "Rigmarole", BAD_INPUT, "Kerplunk"]

# ---- seeded secrets that are free text ------------------------------------------------------
BROKER_DB_PASSWORD = "S3CRET-canary-brokerdb-Xq9v"
SOURCE_DB_PASSWORD = "S3CRET-canary-cwsdb-Vb4k"
BROKEN_DB_PASSWORD = "S3CRET-canary-archivedb-Lm2p"

WINDOW = 24  # key material is also searched for in slices this long, so a truncated leak is caught
PASSWORD_WINDOW = 10  # and passwords in slices this long


# ---- data ------------------------------------------------------------------------------------

def _canary_bundle() -> dict:
    """A FHIR transaction: the youth's EHR chart, every free-text element a canary."""
    ref = {"reference": f"Patient/{EHR_ID}"}
    part2 = [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "42CFRPart2"},
             {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}]
    psych = [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSYTHPN"},
             {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "V"}]
    resources = [
        {"resourceType": "Patient", "id": EHR_ID, "identifier": [{"system": EHR_SYSTEM, "value": EHR_ID},
                                                                 {"system": "urn:test:mrn", "value": MRN}],
         "name": [{"family": FAMILY, "given": [GIVEN]}], "birthDate": BIRTH, "gender": "female",
         "address": [{"line": [ADDRESS], "city": CITY, "state": "CA"}],
         "telecom": [{"system": "phone", "value": PHONE}]},
        {"resourceType": "Observation", "id": "cnry-obs-weight", "status": "final", "subject": ref,
         "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body weight"}]},
         "effectiveDateTime": "2025-03-04T08:00:00Z",
         "valueQuantity": {"value": 51.2, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"},
         "note": [{"text": OBS_NOTE}]},
        {"resourceType": "Condition", "id": "cnry-cond-asthma", "subject": ref, "recordedDate": "2024-05-11",
         "code": {"coding": [{"system": "http://snomed.info/sct", "code": "195967001", "display": "Asthma"}]},
         "note": [{"text": COND_NOTE}]},
        {"resourceType": "DocumentReference", "id": "cnry-doc-visit", "status": "current", "subject": ref,
         "date": "2025-03-04T10:00:00Z", "description": DOC_DESC,
         "content": [{"attachment": {"contentType": "text/plain",
                                     "data": base64.b64encode(ATTACHMENT.encode()).decode()}}]},
        {"resourceType": "Encounter", "id": "cnry-enc-visit", "status": "finished", "subject": ref,
         "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
         "reasonCode": [{"text": ENC_REASON}], "period": {"start": "2025-03-04T08:00:00Z"}},
        {"resourceType": "Condition", "id": "cnry-cond-sud", "meta": {"security": part2}, "subject": ref,
         "recordedDate": "2025-04-23", "code": {"text": "Substance use disorder"}, "note": [{"text": PART2_NOTE}]},
        {"resourceType": "DocumentReference", "id": "cnry-doc-psych", "meta": {"security": psych},
         "status": "current", "subject": ref, "date": "2025-06-13T08:00:00Z", "description": PSYCH_NOTE,
         "content": [{"attachment": {"contentType": "text/plain",
                                     "data": base64.b64encode(PSYCH_NOTE.encode()).decode()}}]},
    ]
    return {"resourceType": "Bundle", "type": "transaction",
            "entry": [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                      for r in resources]}


@pytest.fixture(scope="module")
def canary_fhir(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A FHIR R4 server holding only the canary chart."""
    from tests.support.fhir_server import start_fhir_server

    path = tmp_path_factory.mktemp("canary-fhir") / "canary.json"
    path.write_text(json.dumps(_canary_bundle()))
    server = start_fhir_server([path])
    try:
        yield server
    finally:
        server.stop()


def _with_password(url: str, password: str, database: str | None = None) -> str:
    parsed = make_url(url).set(password=password)
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


def _fill_cws(url: str) -> None:
    """The synthetic child welfare database plus the canary youth's case, placement, referral and notes."""
    synthetic.create_and_fill("cws-cms", url)
    tables = METADATA["cws-cms"].tables
    at = datetime(2025, 2, 2, 10, tzinfo=timezone.utc)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(tables["cws_youth"].insert(), {"youth_id": CWS_ID, "given_name": CWS_GIVEN,
                                                         "family_name": CWS_FAMILY, "birth_date": date(2009, 2, 17)})
            conn.execute(tables["cws_case"].insert(), {
                "case_id": 990001, "youth_id": CWS_ID, "case_type": "family-reunification", "status": "open",
                "opened_on": date(2025, 2, 1), "closed_on": None, "worker_name": WORKER, "updated_at": at})
            conn.execute(tables["cws_placement"].insert(), {
                "placement_id": 990001, "youth_id": CWS_ID, "case_id": 990001, "placement_type": "strtp",
                "start_on": date(2025, 2, 1), "end_on": None, "caregiver_name": CAREGIVER,
                "address_line": CWS_ADDRESS, "city": CWS_CITY, "state": "CA", "postal_code": "99521",
                "updated_at": at})
            conn.execute(tables["cws_referral"].insert(), {
                "referral_id": 990001, "youth_id": CWS_ID, "received_at": at, "allegation_code": "csec",
                "allegation_summary": ALLEGATION, "reporter_name": REPORTER, "reporter_role": "teacher",
                "disposition": "substantiated", "updated_at": at})
            conn.execute(tables["cws_contact_note"].insert(), [
                {"note_id": 990001, "youth_id": CWS_ID, "case_id": 990001, "contact_at": at,
                 "contact_type": "collateral", "worker_name": WORKER, "youth_spoke": False, "note_text": NOTE,
                 "updated_at": at},
                {"note_id": 990002, "youth_id": CWS_ID, "case_id": 990001, "contact_at": at,
                 "contact_type": "face-to-face", "worker_name": WORKER, "youth_spoke": True,
                 "note_text": STATEMENT, "updated_at": at}])
    finally:
        engine.dispose()


def _add_audit_staff(database_url: str, key: BrokerKey) -> None:
    """The audit office, its system and its two staff (as tests/audit/auditors.py seeds them)."""
    engine = make_engine(database_url)
    try:
        with make_sessionmaker(engine)() as s:
            seed_audit_office(s, key)
    finally:
        engine.dispose()


# ---- secrets -----------------------------------------------------------------------------------

def _write_private(path: Path, pem: bytes) -> Path:
    path.write_bytes(pem)
    path.chmod(0o600)
    return path


def _rsa_pem() -> bytes:
    native = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return native.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())


def _windows(value: str, size: int = WINDOW) -> list[str]:
    """The value and overlapping slices of it, so a partial copy is caught too."""
    if len(value) <= size:
        return [value]
    step = max(size // 2, 1)
    return [value, *(value[i:i + size] for i in range(0, len(value) - size + 1, step)), value[-size:]]


def _pem_needles(pem: bytes) -> list[str]:
    """Every base64 line of the PEM body, whole and in windows."""
    body = [line for line in pem.decode().splitlines() if line and not line.startswith("-----")]
    return [w for line in body for w in _windows(line)]


def _jwk_needles(jwk: dict[str, Any]) -> list[str]:
    """The private members of a JWK (d, and p, q, dp, dq, qi for RSA), whole and in windows."""
    out: list[str] = []
    for member in ("d", "p", "q", "dp", "dq", "qi"):
        if member in jwk:
            raw = base64.urlsafe_b64decode(jwk[member] + "=" * (-len(jwk[member]) % 4))
            for form in (jwk[member], base64.b64encode(raw).decode(), raw.hex()):
                out += _windows(form)
    return out


def _key_needles(pem: bytes) -> list[str]:
    """PEM lines and JWK private members of a private key file."""
    native = serialization.load_pem_private_key(pem, password=None)
    if hasattr(native, "private_bytes_raw"):  # Ed25519: the audit checkpoint key
        jwk = OKPKey.import_key(native).as_dict(private=True)
    else:
        jwk = dict(BrokerKey.from_pem(pem).jwk.as_dict(private=True))
    return _pem_needles(pem) + _jwk_needles(jwk)


# ---- capture ---------------------------------------------------------------------------------

class _Levels:
    """Open every logger to DEBUG (third-party loggers set their own levels); put them back afterwards."""

    def __init__(self) -> None:
        self.saved: dict[str, int] = {}

    def open_all(self) -> None:
        for name, logger in list(logging.root.manager.loggerDict.items()):
            if isinstance(logger, logging.Logger) and logger.level not in (logging.NOTSET, logging.DEBUG):
                self.saved.setdefault(name, logger.level)
                logger.setLevel(logging.DEBUG)

    def restore(self) -> None:
        for name, level in self.saved.items():
            logging.getLogger(name).setLevel(level)


@pytest.fixture
def restore_telemetry():  # type: ignore[no-untyped-def]
    """Leave structlog, the root logger, logger levels and the tracer as the next test expects them."""
    root = logging.getLogger()
    level = root.level
    levels = _Levels()
    yield levels
    levels.restore()
    observability.install_tracer_provider(None)
    structlog.reset_defaults()
    for handler in [h for h in root.handlers if getattr(h, observability._HANDLER_MARK, False)]:
        root.removeHandler(handler)
    root.setLevel(level)


def _span_text(spans) -> list[str]:  # type: ignore[no-untyped-def]
    """Every string a trace backend would receive: names, attributes, events, links, status, resource."""
    out: list[str] = []
    for s in spans:
        out.append(s.name)
        out += [f"{k}={v}" for k, v in (s.attributes or {}).items()]
        for e in s.events:
            out.append(e.name)
            out += [f"{k}={v}" for k, v in (e.attributes or {}).items()]
        for link in s.links:
            out += [f"{k}={v}" for k, v in (link.attributes or {}).items()]
        if s.status.description:
            out.append(s.status.description)
        out += [f"{k}={v}" for k, v in s.resource.attributes.items()]
        out.append(s.instrumentation_scope.name if s.instrumentation_scope else "")
    return out


def _other_handlers() -> list[str]:
    """Log handlers anywhere in the process other than the broker's (and pytest's own capture)."""
    loggers = [logging.getLogger(), *(lg for lg in logging.root.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    return sorted({f"{lg.name}: {type(h).__module__}.{type(h).__name__}" for lg in loggers for h in lg.handlers
                   if not getattr(h, observability._HANDLER_MARK, False) and not isinstance(h, logging.NullHandler)
                   and not type(h).__module__.startswith("_pytest")})


# ---- the client side ---------------------------------------------------------------------------

class Caller:
    """Agency systems calling the broker over HTTP; remembers every credential it sent or received."""

    def __init__(self, session: aiohttp.ClientSession, keys: dict[str, BrokerKey]) -> None:
        self.session, self.keys = session, keys
        self.credentials: list[str] = []
        self.tokens: dict[str, str] = {}
        self.ids: dict[str, str] = {}
        """The broker's own ids of the canary youth, her team and the documents filed about her."""

    def assertion(self, agency: str, *, key: BrokerKey | None = None, **claims: Any) -> str:
        key = key or self.keys[agency]
        now = int(time.time())
        body = {"iss": client_id(agency), "sub": client_id(agency), "aud": f"{PUBLIC_URL}/oauth/token",
                "iat": now, "exp": now + 60, "jti": uuid.uuid4().hex, **claims}
        signed = jwt.encode({"alg": key.alg, "kid": key.kid}, body, key.jwk, algorithms=[key.alg])
        self.credentials.append(signed)
        return signed

    async def token_request(self, agency: str, sub: str, role: str, *, assertion: str | None = None,
                            **extra: str) -> tuple[int, dict]:
        form = {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": assertion or self.assertion(agency), "staff_sub": sub, "staff_role": role,
                **extra}
        async with self.session.post("/oauth/token", data=form) as r:
            body = await r.json(content_type=None)
        if "access_token" in body:
            self.credentials.append(body["access_token"])
        return r.status, body

    async def token(self, alias: str) -> str:
        if alias not in self.tokens:
            if alias in AUDIT_STAFF:
                agency, (sub, role) = AUDIT_AGENCY, AUDIT_STAFF[alias]
            else:
                p = PERSONAS[alias]
                agency, sub, role = p.agency, p.sub, p.role
            status, body = await self.token_request(agency, sub, role)
            assert status == 200, body
            self.tokens[alias] = body["access_token"]
        return self.tokens[alias]

    async def call(self, method: str, path: str, *, alias: str | None = None, token: str | None = None,
                   purpose: str | None = None, params: Any = None, body: Any = None,
                   content_type: str = "application/json") -> tuple[int, str]:
        headers = {}
        if alias is not None:
            token = await self.token(alias)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if purpose is not None:
            headers["X-Purpose-Of-Use"] = purpose
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        async with self.session.request(method, path, headers=headers, params=params, data=data) as r:
            return r.status, await r.text()


async def _ok(caller: Caller, method: str, path: str, expect: int | tuple[int, ...] = 200, **kw: Any) -> str:
    status, text = await caller.call(method, path, **kw)
    expected = expect if isinstance(expect, tuple) else (expect,)
    assert status in expected, (method, path, status, text[:500])
    return text


# ---- the test --------------------------------------------------------------------------------------

async def test_no_secret_or_phi_in_any_log_line_or_span(request, tmp_path, monkeypatch, capfd, pg_server,
                                                        canary_fhir, restore_telemetry):
    from broker.app import create_app
    from broker.cli import _settings_from_env

    # -- secrets in files, and databases whose URLs carry passwords
    signing_pem = _rsa_pem()
    audit_pem = generate_audit_key_pem()
    agency_pems = {agency: generate_private_key_pem("EC") for agency in [*AGENCIES, AUDIT_AGENCY]}
    keys = {agency: BrokerKey.from_pem(pem) for agency, pem in agency_pems.items()}
    broker_db = _with_password(pg_server.create_database(), BROKER_DB_PASSWORD)
    cws_db = _with_password(pg_server.create_database(), SOURCE_DB_PASSWORD)
    missing_db = _with_password(pg_server.url("postgres"), BROKEN_DB_PASSWORD, database="t_no_such_database")
    seed(broker_db, {a: keys[a] for a in AGENCIES})
    _add_audit_staff(broker_db, keys[AUDIT_AGENCY])
    _fill_cws(cws_db)

    secrets: dict[str, list[str]] = {
        "signing key": _key_needles(signing_pem),
        "audit key": _key_needles(audit_pem),
        "client keys": [n for pem in agency_pems.values() for n in _key_needles(pem)],
        "database passwords": [w for pw in (BROKER_DB_PASSWORD, SOURCE_DB_PASSWORD, BROKEN_DB_PASSWORD)
                               for w in _windows(pw, PASSWORD_WINDOW)],
    }
    refusing = socket.socket()  # bound, never listening: connections to it are refused, and nobody can take it
    refusing.bind(("127.0.0.1", 0))
    request.addfinalizer(refusing.close)
    sources = {"sources": [
        {"name": "county-ehr", "kind": "fhir", "base_url": canary_fhir.base_url, "identifier_system": EHR_SYSTEM,
         "default_categories": ["general-health"], "resource_types": EHR_TYPES, "timeout": 5},
        {"name": "county-lab", "kind": "fhir", "base_url": f"http://127.0.0.1:{refusing.getsockname()[1]}/fhir/R4",
         "identifier_system": LAB_SYSTEM, "default_categories": ["general-health"],
         "resource_types": ["Observation"], "timeout": 2},
        {"name": "cws-cms", "kind": "sql", "database_url": cws_db, "identifier_system": CWS_SYSTEM,
         "mapping_file": str(synthetic.mapping_file("cws-cms")), "default_categories": ["child-welfare-case"],
         "timeout": 5},
        {"name": "cws-archive", "kind": "sql", "database_url": missing_db, "identifier_system": ARCHIVE_SYSTEM,
         "mapping_file": str(synthetic.mapping_file("cws-cms")), "default_categories": ["child-welfare-case"],
         "timeout": 2},
    ]}
    sources_file = tmp_path / "sources.yaml"
    sources_file.write_text(yaml.safe_dump(sources))
    for name in [n for n in os.environ if n.startswith("BROKER_")]:
        monkeypatch.delenv(name)
    env = {"DATABASE_URL": broker_db, "PUBLIC_URL": PUBLIC_URL, "ISSUER": PUBLIC_URL,
           "SIGNING_KEY_FILE": str(_write_private(tmp_path / "signing.pem", signing_pem)),
           "AUDIT_KEY_FILE": str(_write_private(tmp_path / "audit.pem", audit_pem)),
           "SOURCES_FILE": str(sources_file), "LOG_LEVEL": "DEBUG", "OTEL_EXPORTER": "console",
           "AUDIT_CHECKPOINT_INTERVAL_SECONDS": "5"}
    for name, value in env.items():
        monkeypatch.setenv(f"BROKER_{name}", value)

    # -- the console exporter becomes an in-memory one; everything else is configure_tracing's own
    exporter = InMemorySpanExporter()
    monkeypatch.setattr(observability, "ConsoleSpanExporter", lambda **_kw: exporter)
    capfd.readouterr()  # only what the broker writes from here on
    restore_telemetry.open_all()
    app = create_app(_settings_from_env())
    runtime = app.state.runtime
    assert observability._provider is not None, "tracing was not configured from the settings"
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, server_header=False, access_log=False,
                                           log_config=None, lifespan="on"))
    serving = asyncio.get_running_loop().create_task(server.serve())
    released: list[str] = []  # response bodies: proof that the canaries went through the broker
    try:
        for _ in range(500):
            if server.started or serving.done():
                break
            await asyncio.sleep(0.02)
        assert server.started, "uvicorn did not start"
        restore_telemetry.open_all()  # loggers created while the server started
        port = server.servers[0].sockets[0].getsockname()[1]
        # the test's client is aiohttp, which logs nothing per request: every line captured is the broker's
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as session:
            caller = Caller(session, keys)
            released += await _drive(caller, runtime, monkeypatch)
        assert _other_handlers() == [], "a log handler that bypasses the broker's allow-list"
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, timeout=30)
        observability._provider.force_flush()

    captured = capfd.readouterr()
    log_text = captured.out + captured.err
    spans = exporter.get_finished_spans()
    span_text = "\n".join(_span_text(spans))

    # -- positive controls: the canaries went through the broker, and its telemetry was captured
    everything_released = "\n".join(released)
    # (the psychotherapy note and the reporter's name are fetched but withheld from everyone here; they are
    # sought in the telemetry all the same)
    never = [needle for needle in (FAMILY, GIVEN, BIRTH, ADDRESS, PHONE, MRN, OBS_NOTE, COND_NOTE, DOC_DESC,
                                   ENC_REASON, PART2_NOTE, WORKER, NOTE, STATEMENT, ALLEGATION, CAREGIVER, CWS_ADDRESS)
             if needle not in everything_released]
    assert not never, f"seeded PHI never released, so never at risk: {never}"
    lines = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    assert len(lines) > 100
    events = {(line.get("logger"), line.get("event")) for line in lines}
    requests = [line for line in lines if line.get("event") == "request" and line.get("request_id")]
    routes = {line.get("route") for line in requests}
    assert {"/mdts/{id}/record", "/oauth/token", "/consents", "/audit/events"} <= routes, routes
    assert any(line.get("route", "").startswith("/mdts/{id}/fhir") for line in requests), routes
    assert {"source_failed", "stage_failed", "audit_write_failed"} <= {e for _l, e in events}, events
    loggers = {logger for logger, _e in events}
    assert {"broker.auth.tokens", "broker.auth.client_assertion", "uvicorn.error",
            "sqlalchemy.engine.Engine"} <= loggers, loggers
    names = {s.name for s in spans}
    assert {"request", "authenticate", "context", "grounds", "decide", "fetch", "filter", "label", "audit",
            "registry"} <= names, names
    assert any(s.attributes.get("route") == "/mdts/{id}/record" for s in spans)
    assert any(s.attributes.get("source_status") == "unavailable" for s in spans)
    assert {s.resource.attributes.get("service.name") for s in spans} == {"mdt-broker"}

    # -- the assertion: no seeded secret, credential or PHI in any log line or span
    secrets["tokens and client assertions"] = [c for cred in caller.credentials
                                                for c in (cred, *_windows(cred.rsplit(".", 1)[-1]))]
    found = {(what, where, needle)
             for what, needles in [("PHI", PHI), ("ids", list(caller.ids.values()))] + list(secrets.items())
             for needle in needles
             for where, text in (("log", log_text), ("span", span_text)) if needle in text}
    assert not found, _report(found, log_text, span_text)


def _report(found: set, log_text: str, span_text: str) -> str:
    """Which seeded values leaked, and the first line each was found on."""
    out = []
    for what, where, needle in sorted(found)[:20]:
        text = log_text if where == "log" else span_text
        line = next(line for line in text.splitlines() if needle in line)
        out.append(f"{what} in {where}: {needle[:40]!r} on: {line[:300]}")
    return "\n".join(out)


async def _drive(c: Caller, runtime: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A realistic mix of calls; returns the bodies of successful data responses."""
    out: list[str] = []
    ids = c.ids

    # unauthenticated public documents
    await _ok(c, "GET", "/healthz")
    await _ok(c, "GET", "/readyz")
    await _ok(c, "GET", "/.well-known/jwks.json")
    await _ok(c, "GET", "/audit/checkpoint-key")

    # token requests: granted, and refused for every kind of reason
    for alias in ("admin", "cw", "mh", "po", "sud", "depatty", "cw-other", "da", "auditor", "privacy"):
        await c.token(alias)
    mh = PERSONAS["mh"]
    refusals = [
        dict(assertion=c.assertion("bh", exp=int(time.time()) - 600, iat=int(time.time()) - 900)),  # expired
        dict(assertion=c.assertion("bh", aud="https://elsewhere.example/token")),  # wrong audience
        dict(assertion=c.assertion("bh", key=BrokerKey.from_pem(generate_private_key_pem("EC")))),  # unknown key
        dict(assertion=f"eyJ{BAD_INPUT}.{FAMILY}.{EHR_ID}"),  # garbage quoting PHI
        dict(role="probation-officer"),  # a role the staff member does not hold
        dict(role=MRN),  # the youth's record number typed into the role field by a confused client
        dict(sub=f"staff-{FAMILY}"),  # an unknown staff member named like the youth
        dict(purpose_of_use=BAD_INPUT),  # a malformed purpose
    ]
    for refusal in refusals:
        extra = {"purpose_of_use": refusal["purpose_of_use"]} if "purpose_of_use" in refusal else {}
        status, _body = await c.token_request("bh", refusal.get("sub", mh.sub), refusal.get("role", mh.role),
                                              assertion=refusal.get("assertion"), **extra)
        assert status in (400, 401), (refusal, status)
    replayed = c.assertion("bh")
    assert (await c.token_request("bh", mh.sub, mh.role, assertion=replayed))[0] == 200
    assert (await c.token_request("bh", mh.sub, mh.role, assertion=replayed))[0] == 401
    assert (await c.token_request("cws", mh.sub, mh.role))[0] == 400  # another agency's staff

    # registry: the canary youth, her identifiers in four systems, a team
    identifiers = [{"source": "county-ehr", "system": EHR_SYSTEM, "value": EHR_ID},
                   {"source": "cws-cms", "system": CWS_SYSTEM, "value": CWS_ID},
                   {"source": "county-lab", "system": LAB_SYSTEM, "value": LAB_ID}]
    text = await _ok(c, "POST", "/youth", 201, alias="admin", body={"birth_date": BIRTH, "identifiers": identifiers})
    youth = ids["youth"] = json.loads(text)["id"]
    await _ok(c, "POST", "/youth", (400, 422), alias="admin", body={"birth_date": BAD_INPUT, "note": FAMILY})
    await _ok(c, "POST", f"/youth/{youth}/identifiers", 200, alias="admin", body={"identifiers": [
        {"source": "cws-archive", "system": ARCHIVE_SYSTEM, "value": ARCHIVE_ID}]})
    await _ok(c, "POST", f"/youth/{youth}/identifiers", (400, 422), alias="admin", body={"identifiers": [
        {"source": "cws-archive", "system": ARCHIVE_SYSTEM, "value": f"{FAMILY} {BIRTH}"}]})
    mdt = ids["mdt"] = json.loads(await _ok(c, "POST", "/mdts", 201, alias="admin",
                                            body={"youth_id": youth, "lead_agency": "cws"}))["id"]
    for alias, statutory in (("cw", True), ("mh", True), ("po", True), ("sud", False), ("depatty", True)):
        p = PERSONAS[alias]
        text = await _ok(c, "POST", f"/mdts/{mdt}/members", 201, alias="admin",
                         body={"sub": p.sub, "agency": p.agency, "team_role": p.role, "statutory": statutory})
        ids[f"membership-{alias}"] = json.loads(text)["id"]
    await _ok(c, "GET", f"/mdts/{mdt}", alias="cw")
    await _ok(c, "GET", f"/youth/{youth}", alias="cw")
    await _ok(c, "GET", "/youth", alias="mh", params={"identifier": f"{EHR_SYSTEM}|{EHR_ID}"})
    await _ok(c, "GET", "/youth", 404, alias="da", params={"identifier": f"{CWS_SYSTEM}|{CWS_ID}"})
    await _ok(c, "GET", "/youth", (400, 404), alias="mh", params={"identifier": f"{FAMILY} {GIVEN}"})

    # data: searches, reads and the record view, for each member
    base = f"/mdts/{mdt}/fhir"
    searches = {("mh", "TREAT"): ("Patient", "Observation", "Condition", "DocumentReference", "Encounter"),
                ("cw", "COC"): ("EpisodeOfCare", "Communication", "Patient"),
                ("po", "COC"): ("Communication", "DocumentReference"),
                ("sud", "TREAT"): ("Condition",)}
    for (alias, purpose), rtypes in searches.items():
        if alias in ("mh", "cw"):
            out.append(await _ok(c, "GET", f"/mdts/{mdt}/record", alias=alias, purpose=purpose))
        for rtype in rtypes:
            out.append(await _ok(c, "GET", f"{base}/{rtype}", alias=alias, purpose=purpose))
    out.append(await _ok(c, "GET", f"{base}/Observation", alias="mh", purpose="TREAT",
                         params={"code": "http://loinc.org|29463-7", "date": "ge2025-01-01", "_count": "5"}))
    out.append(await _ok(c, "GET", f"{base}/Patient", alias="mh", purpose="TREAT", params={"_id": EHR_ID}))
    out.append(await _ok(c, "GET", f"{base}/Patient/{EHR_ID}", alias="mh", purpose="TREAT"))
    out.append(await _ok(c, "GET", f"{base}/Observation/cnry-obs-weight", alias="mh", purpose="TREAT"))
    await _ok(c, "GET", f"{base}/Observation/{FAMILY}-{EHR_ID}", (200, 403, 404), alias="mh", purpose="TREAT")
    await _ok(c, "GET", f"{base}/metadata", (200,), alias="mh", purpose="TREAT")

    # refused and malformed data requests
    await _ok(c, "GET", f"{base}/Observation", 400, alias="mh", purpose="TREAT",
              params={"patient": f"Patient/{EHR_ID}"})
    await _ok(c, "GET", f"{base}/Patient", 400, alias="mh", purpose="TREAT", params={"name": FAMILY})
    await _ok(c, "GET", f"{base}/Observation", 400, alias="mh", purpose="TREAT", params={"_count": BAD_INPUT})
    await _ok(c, "GET", f"{base}/{BAD_INPUT}", (400, 404), alias="mh", purpose="TREAT")
    await _ok(c, "GET", f"/mdts/{mdt}/record", 400, alias="mh", purpose=f"{BAD_INPUT}-{FAMILY}")
    await _ok(c, "GET", f"/mdts/{mdt}/record", 403, alias="cw-other", purpose="COC")  # not on this team
    await _ok(c, "GET", f"/mdts/{mdt}/record", 403, alias="da", purpose="HLEGAL")
    await _ok(c, "GET", f"/mdts/{mdt}/record", 401, token=f"{BAD_INPUT}.{FAMILY}.{EHR_ID}", purpose="TREAT")
    expired, _ttl = runtime.issuer.issue(sub=mh.sub, agency=mh.agency, role=mh.role, client_id=client_id("bh"),
                                         scopes=frozenset(), purpose=None,
                                         now=datetime.now(timezone.utc) - timedelta(hours=2))
    c.credentials.append(expired)
    await _ok(c, "GET", f"/mdts/{mdt}/record", 401, token=expired, purpose="TREAT")
    good = await c.token("mh")
    head, payload, signature = good.split(".")
    forged = f"{head}.{payload}.{signature[::-1]}"
    c.credentials.append(forged)
    await _ok(c, "GET", f"/mdts/{mdt}/record", 401, token=forged, purpose="TREAT")
    await _ok(c, "POST", "/youth", 413, alias="admin", body={"birth_date": BIRTH, "pad": FAMILY * 200_000})

    # consents
    filed = consent(youth, categories=["sud-part2"], recipients=[("person", PERSONAS["po"].sub)], purposes=["COC"])
    filed["identifier"] = [{"system": "urn:test:consent-form", "value": SIGNER}]
    filed["provision"]["code"] = [{"text": CONSENT_TEXT}]
    text = await _ok(c, "POST", "/consents", 201, alias="mh", body=filed, content_type="application/fhir+json")
    consent_id = ids["consent"] = json.loads(text)["id"]
    out.append(await _ok(c, "GET", f"{base}/Condition", alias="po", purpose="COC"))  # the Part 2 note, by consent
    await _ok(c, "GET", "/consents", alias="mh", params={"youth": youth})
    await _ok(c, "GET", f"/consents/{consent_id}", alias="mh")
    await _ok(c, "POST", f"/consents/{consent_id}/revoke", alias="mh")
    broken = dict(filed)
    broken.pop("provision")
    broken["note"] = CONSENT_TEXT
    await _ok(c, "POST", "/consents", (400, 422), alias="mh", body=broken, content_type="application/fhir+json")
    await _ok(c, "POST", "/consents", (400, 422), alias="mh", body=f"{{not json {FAMILY}",
              content_type="application/fhir+json")

    # court orders
    order = {"youth_id": youth, "case_number": CASE_NUMBER, "court": COURT, "categories": ["general-health"],
             "purposes": ["HLEGAL"], "recipients": [{"kind": "person", "value": PERSONAS["da"].sub}]}
    order_id = ids["order"] = json.loads(await _ok(c, "POST", "/court-orders", 201, alias="cw", body=order))["id"]
    out.append(await _ok(c, "GET", f"{base}/Observation", (200, 403), alias="da", purpose="HLEGAL"))
    await _ok(c, "GET", "/court-orders", alias="cw", params={"youth": youth})
    await _ok(c, "GET", f"/court-orders/{order_id}", alias="cw")
    await _ok(c, "POST", f"/court-orders/{order_id}/revoke", alias="cw")
    await _ok(c, "POST", "/court-orders", (400, 422), alias="cw", body={**order, "case_number": f"{CASE_NUMBER}\n{FAMILY}"})

    # break-glass, and its review
    text = await _ok(c, "POST", f"/mdts/{mdt}/break-glass", 201, alias="sud",
                     body={"purpose": "ETREAT", "reason": BG_REASON})
    grant = ids["grant"] = json.loads(text)["id"]
    await _ok(c, "POST", f"/mdts/{mdt}/break-glass", (400, 422), alias="sud", body={"purpose": "ETREAT", "reason": "Zyxwqu"})
    await _ok(c, "GET", f"/mdts/{mdt}/break-glass", alias="sud")
    out.append(await _ok(c, "GET", f"/mdts/{mdt}/record", alias="sud", purpose="ETREAT"))

    # policy
    await _ok(c, "GET", "/policy/version", alias="mh")
    await _ok(c, "POST", "/policy/decide", 400, alias="mh", body={"role": FAMILY, "category": BAD_INPUT,
                                                                    "purpose": "COC"})

    # audit routes, with a signed checkpoint to verify
    await asyncio.to_thread(write_checkpoint, runtime.sessions, runtime.audit_key, reason="manual")
    for params in ({"youth": youth}, {"mdt": mdt}, {"actor": PERSONAS["mh"].sub}, {"break_glass": "true"}):
        await _ok(c, "GET", "/audit/events", alias="auditor", params=params)
    await _ok(c, "GET", "/audit/events", 400, alias="auditor", params={"youth": f"{FAMILY} {BIRTH}"})
    await _ok(c, "GET", "/audit/events", 403, alias="cw")
    await _ok(c, "GET", "/audit/accounting", alias="auditor", params={"youth": youth})
    await _ok(c, "GET", "/audit/accounting/print", alias="depatty", params={"youth": youth})
    await _ok(c, "GET", "/audit/break-glass", alias="privacy", params={"status": "pending"})
    await _ok(c, "GET", "/audit/break-glass/overdue", alias="privacy")
    await _ok(c, "POST", f"/audit/break-glass/{grant}/review", alias="privacy",
              body={"finding": "justified", "note": REVIEW_NOTE})
    await _ok(c, "GET", "/audit/verify", alias="auditor")
    for fmt in ("ndjson", "csv", "fhir"):
        await _ok(c, "GET", "/audit/export", alias="auditor", params={"format": fmt})

    # failures: a connector raising with PHI in its message, a failing stage, a failing audit write
    def leaky(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError(f"upstream said: {FAMILY}, {GIVEN}, born {BIRTH}, {EHR_ID}")

    with monkeypatch.context() as m:
        m.setattr(runtime.connectors["county-ehr"], "search", leaky)
        out.append(await _ok(c, "GET", f"/mdts/{mdt}/record", alias="cw", purpose="COC"))
    with monkeypatch.context() as m:
        m.setattr(runtime.grounds, "resolve", leaky)
        m.setattr(ContextCache, "get", lambda *_a: None)  # resolve afresh, so the fault is reached
        await _ok(c, "GET", f"{base}/Observation", 503, alias="mh", purpose="TREAT")
    with monkeypatch.context() as m:
        m.setattr(runtime.audit, "append_async", leaky)
        await _ok(c, "GET", f"{base}/Observation", 503, alias="mh", purpose="TREAT")

    # the roster and links change
    await _ok(c, "DELETE", f"/mdts/{mdt}/members/{ids['membership-sud']}", alias="admin")
    await _ok(c, "DELETE", f"/youth/{youth}/identifiers/county-lab", alias="admin")
    return out


# ---- start-up: a bad configuration is reported without echoing what it holds -----------------------

@pytest.mark.parametrize("sources_yaml", [
    # a YAML syntax error on the line that holds the password
    "sources:\n  - name: cws\n    kind: sql\n    database_url: postgresql://u:{pw}@db.example/cws: x\n",
    # a source entry that is only a URL
    "sources:\n  - postgresql://u:{pw}@db.example/cws\n",
    # a valid URL next to an invalid field
    "sources:\n  - name: cws\n    kind: sql\n    database_url: postgresql://u:{pw}@db.example/cws\n"
    "    identifier_system: x\n    pool_size: 0\n",
], ids=["yaml-syntax", "entry-is-a-url", "bad-field"])
def test_configuration_errors_do_not_echo_secrets(tmp_path, monkeypatch, capfd, sources_yaml):
    """``broker serve`` with a broken sources file: the error names the problem, never the value."""
    from broker.cli import _settings_from_env

    key = _write_private(tmp_path / "signing.pem", generate_private_key_pem("EC"))
    sources = tmp_path / "sources.yaml"
    sources.write_text(sources_yaml.format(pw=SOURCE_DB_PASSWORD))
    for name in [n for n in os.environ if n.startswith("BROKER_")]:
        monkeypatch.delenv(name)
    for name, value in {"DATABASE_URL": f"postgresql://u:{BROKER_DB_PASSWORD}@db.example/broker",
                        "PUBLIC_URL": PUBLIC_URL, "ISSUER": PUBLIC_URL, "SIGNING_KEY_FILE": str(key),
                        "SOURCES_FILE": str(sources)}.items():
        monkeypatch.setenv(f"BROKER_{name}", value)
    with pytest.raises(BaseException) as raised:
        _settings_from_env()
    # an uncaught error would be printed with its traceback (and a YAML error quotes the offending line)
    printed = "" if raised.type is SystemExit else "".join(traceback.format_exception(raised.value))
    captured = capfd.readouterr()
    output = captured.out + captured.err + printed
    for secret in (SOURCE_DB_PASSWORD, BROKER_DB_PASSWORD):
        for fragment in _windows(secret, PASSWORD_WINDOW):
            assert fragment not in output, output
    assert raised.type is SystemExit and raised.value.code == 2, output
    assert "configuration error" in captured.err
