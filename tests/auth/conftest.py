"""A real little broker for the auth tests: real keys, real Settings, a migrated database."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from joserfc import jwt

from broker.api.oauth import router
from broker.auth.client_assertion import CLIENT_ASSERTION_TYPE
from broker.auth.keys import BrokerKey, generate_private_key_pem, load_signing_key
from broker.audit.sink import SqlAuditSink
from broker.auth.tokens import AuthError, TokenIssuer, TokenVerifier
from broker.pipeline import Pipeline
from broker.settings import Settings
from broker.store.db import make_engine, make_sessionmaker, upgrade
from broker.store.models import Agency, OAuthClient, Staff
from broker.vocabulary import Vocabulary
from tests.support.ports import free_port


BROKER = "https://broker.test"
IDP_ISSUER = "https://idp.county.test/realms/mdt"
IDP_AUDIENCE = "mdt-broker-api"
SKEW = 30


def make_key(kind: str = "EC") -> BrokerKey:
    """A fresh key wrapped for signing (clients and IdPs use the same wrapper)."""
    return BrokerKey.from_pem(generate_private_key_pem(kind))  # type: ignore[arg-type]


def sign(claims: dict[str, Any], key: BrokerKey, **header: Any) -> str:
    """A real JWS over ``claims`` with ``key``; header defaults to the key's alg and kid."""
    hdr = {"alg": key.alg, "kid": key.kid, **header}
    hdr = {k: v for k, v in hdr.items() if v is not None}
    return jwt.encode(hdr, claims, key.jwk, algorithms=[hdr["alg"]])


class JwksServer:
    """Serves a JWK Set on loopback and counts requests, standing in for a county IdP."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] = {"keys": []}
        self.requests = 0
        self.delay = 0.0  # seconds to stall each answer, to play a slow IdP
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.requests += 1
                time.sleep(outer.delay)
                body = json.dumps(outer.jwks).encode()
                self.send_response(200 if self.path == "/jwks.json" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.port = free_port()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="session")
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def idp_key(jwks_server: JwksServer) -> BrokerKey:
    key = make_key("RSA")
    jwks_server.jwks = key.public_jwks()
    return key


@dataclass
class World:
    """Everything a test needs to talk to the broker as several agency systems."""

    settings: Settings
    broker_key: BrokerKey
    issuer: TokenIssuer
    verifier: TokenVerifier
    sessions: Any
    app: FastAPI
    client_keys: dict[str, BrokerKey] = field(default_factory=dict)

    def assertion(self, client_id: str, /, *, key: BrokerKey | None = None, now: float | None = None,
                  drop: tuple[str, ...] = (), **overrides: Any) -> str:
        """A signed RFC 7523 client assertion; ``overrides``/``drop`` make it wrong on purpose."""
        t = int(now if now is not None else time.time())
        claims: dict[str, Any] = {
            "iss": client_id,
            "sub": client_id,
            "aud": self.settings.token_endpoint,
            "iat": t,
            "exp": t + 120,
            "jti": str(uuid.uuid4()),
        }
        claims.update(overrides)
        for name in drop:
            claims.pop(name, None)
        return sign(claims, key or self.client_keys[client_id])

    def form(self, client: str, /, *, assertion: str | None = None, **fields: Any) -> dict[str, str]:
        """A complete token request from ``client``; ``fields`` replace or add form fields."""
        data = {
            "grant_type": "client_credentials",
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": assertion or self.assertion(client),
            "staff_sub": "cw-worker-1",
            "staff_role": "cw-social-worker",
        }
        data.update(fields)
        return {k: v for k, v in data.items() if v is not None}

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url=BROKER)


def write_settings_files(tmp: Path) -> tuple[Path, Path]:
    """A 0600 signing key and a policy dir with the three files Settings insists on."""
    key_file = tmp / "signing-key.pem"
    key_file.write_bytes(generate_private_key_pem("EC"))
    key_file.chmod(0o600)
    policy = tmp / "policies"
    policy.mkdir()
    for name in ("model.conf", "policy.csv", "vocabulary.yaml"):
        (policy / name).write_text("# placeholder for auth tests\n")
    return key_file, policy


def seed(sessions: Any, keys: dict[str, BrokerKey]) -> None:
    """Two agencies, their staff, and three agency systems (one retired)."""
    now = datetime.now(timezone.utc)
    with sessions() as s:
        s.add_all([
            Agency(id="cw", name="Child Welfare", roles=["cw-social-worker", "cw-supervisor"]),
            Agency(id="mh", name="Behavioral Health", roles=["mental-health-clinician"]),
        ])
        s.flush()
        s.add_all([
            Staff(sub="cw-worker-1", agency_id="cw", roles=["cw-social-worker"], active=True),
            Staff(sub="cw-worker-gone", agency_id="cw", roles=["cw-social-worker"], active=False),
            # holds a role her agency is not allowed to act in (a roster error the broker must not honour)
            Staff(sub="cw-worker-odd", agency_id="cw", roles=["mental-health-clinician"], active=True),
            Staff(sub="mh-clinician-1", agency_id="mh", roles=["mental-health-clinician"], active=True),
        ])
        s.add_all([
            OAuthClient(client_id="cw-cms", agency_id="cw", name="CWS case management",
                        jwks=keys["cw-cms"].public_jwks(), active=True, created_at=now),
            OAuthClient(client_id="mh-ehr", agency_id="mh", name="Behavioral health EHR",
                        jwks=keys["mh-ehr"].public_jwks(), active=True, created_at=now),
            OAuthClient(client_id="cw-retired", agency_id="cw", name="Retired CWS system",
                        jwks=keys["cw-retired"].public_jwks(), active=False, created_at=now),
        ])
        s.commit()


SHIPPED_VOCABULARY = Vocabulary.load(Path(__file__).resolve().parents[2] / "policies")
"""The token endpoint names a requested role it has never heard of as "(unknown-role)"."""


def build_world(tmp: Path, database_url: str, jwks_url: str) -> World:
    key_file, policy = write_settings_files(tmp)
    settings = Settings(
        database_url=database_url,
        public_url=BROKER,
        issuer=BROKER,
        audience="mdt-broker",
        signing_key_file=key_file,
        policy_dir=policy,
        access_token_ttl_seconds=600,
        client_assertion_max_age_seconds=300,
        clock_skew_seconds=SKEW,
        external_jwks_url=jwks_url,
        external_issuer=IDP_ISSUER,
        external_audience=IDP_AUDIENCE,
    )
    upgrade(database_url)
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    broker_key = load_signing_key(settings.signing_key_file)
    keys = {"cw-cms": make_key("EC"), "mh-ehr": make_key("RSA"), "cw-retired": make_key("EC")}
    seed(sessions, keys)
    issuer = TokenIssuer(settings, broker_key)
    verifier = TokenVerifier(settings, broker_key)
    app = FastAPI()
    app.include_router(router)
    app.state.runtime = SimpleNamespace(settings=settings, engine=engine, sessions=sessions, issuer=issuer,
                                        signing_key=broker_key, verifier=verifier,
                                        audit=SqlAuditSink(sessions), policy=SimpleNamespace(version="auth-tests"),
                                        vocabulary=SHIPPED_VOCABULARY)
    app.state.pipeline = Pipeline(app.state.runtime)  # the token endpoint audits through it

    @app.get("/whoami")
    async def whoami(request: Request) -> JSONResponse:
        """A protected resource, to see verification errors the way an agency system does."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        try:
            if scheme.lower() != "bearer" or not token:
                raise AuthError("invalid_token", "A bearer token is required")
            p = await request.app.state.runtime.verifier.averify(token)
        except AuthError as exc:
            return JSONResponse({"error": exc.error, "error_description": exc.description},
                                status_code=exc.status_code,
                                headers={"WWW-Authenticate": exc.www_authenticate()})
        return JSONResponse({"sub": p.sub, "agency": p.agency, "role": p.role, "client_id": p.client_id})

    return World(settings=settings, broker_key=broker_key, issuer=issuer, verifier=verifier,
                 sessions=sessions, app=app, client_keys=keys)


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory, jwks_server: JwksServer, idp_key: BrokerKey) -> World:
    """The SQLite-backed broker most tests use."""
    tmp = tmp_path_factory.mktemp("auth-sqlite")
    return build_world(tmp, f"sqlite:///{tmp / 'broker.sqlite'}", jwks_server.url)


@pytest.fixture(scope="session")
def pg_world(tmp_path_factory: pytest.TempPathFactory, pg_server: Any, jwks_server: JwksServer,
             idp_key: BrokerKey) -> World:
    """The same broker on PostgreSQL (``pg_server`` comes from tests/conftest.py)."""
    tmp = tmp_path_factory.mktemp("auth-pg")
    return build_world(tmp, pg_server.create_database(), jwks_server.url)


@pytest.fixture(params=["sqlite", "postgres"])
def any_world(request: pytest.FixtureRequest) -> World:
    """Both backends, for the checks whose correctness rests on the database."""
    return request.getfixturevalue("world" if request.param == "sqlite" else "pg_world")
