"""Schemathesis against the committed OpenAPI document, in-process: with real tokens and without.

Every generated request must get a response that is not a 5xx and that the document allows: a
documented status code, a documented content type, and a body that matches the documented schema
(``not_a_server_error``, ``status_code_conformance``, ``content_type_conformance``,
``response_schema_conformance``). Three callers: a team member (``cw``, of the lead agency, on every
team: it reaches the most routes), a privacy officer (the audit routes), and no token at all.

The normal suite runs a small seeded sample (about 100 requests per caller, positive and negative
cases). ``scripts/fuzz`` runs the long target: ``FUZZ_EXAMPLES`` examples per operation and caller
plus schemathesis's coverage phase (every boundary and negation the document implies), at least
5,000 requests, with a fresh random seed each run.

Generated path and query values are mixed with the seeded ids (``mdt-alpha``, ``y-alpha``, the
source's resource types...) so that a share of the requests gets past the "no such team" 403 and
through the whole pipeline to the real FHIR server.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import hypothesis.strategies as st
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi as schemathesis_asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from broker.app import create_app
from broker.auth.keys import BrokerKey
from broker.runtime import build_runtime
from broker.settings import Settings
from broker.store.models import Agency, OAuthClient, Staff
from tests.audit.auditors import AUDIT_AGENCY, AUDIT_STAFF
from tests.scenarios.harness import (
    AGENCIES,
    EHR_TYPES,
    PERSONAS,
    Broker,
    client_id,
    make_settings,
    seed,
    write_key,
)

DOCUMENT = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
LONG = int(os.environ.get("FUZZ_EXAMPLES", "0"))
EXAMPLES = LONG or 3
MIN_REQUESTS = 5_000 if LONG else 300
SEED = int(os.environ.get("FUZZ_SEED") or (random.randrange(2**32) if LONG else 7))  # printed; FUZZ_SEED replays
TOKEN_MAX_AGE = 600  # seconds; access tokens live at most 15 minutes
CALLERS = {"member": (PERSONAS["cw"].agency, PERSONAS["cw"].sub, PERSONAS["cw"].role),
           "privacy-officer": (AUDIT_AGENCY, *AUDIT_STAFF["privacy"])}
KNOWN_IDS = {"mdt_id": ["mdt-alpha", "mdt-bravo"], "youth_id": ["y-alpha"], "youth": ["y-alpha"],
             "resource_type": sorted(EHR_TYPES), "source": ["county-ehr"],
             "membership_id": ["m-cw-mdt-alpha", "m-po-ended-mdt-alpha"]}
# The fuzzer sends thousands of requests from one client in a minute or two; quotas are tested elsewhere.
UNLIMITED = {name: 1_000_000 for name in ("rate_limit_per_minute", "token_rate_limit_per_minute",
                                          "token_rate_limit_per_address_per_minute")
             if name in Settings.model_fields}
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=not LONG, database=None,
                         suppress_health_check=list(HealthCheck), print_blob=True)


@dataclass
class FuzzTarget:
    """The app under test as schemathesis calls it, the requests it got, and real tokens."""

    app: object
    broker: Broker
    closing: bool = False
    requests: dict[str, int] = field(default_factory=dict)
    _tokens: dict[str, tuple[str, float]] = field(default_factory=dict)

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        await self.app(scope, receive, send)  # type: ignore[operator]

    async def _lifespan(self, receive, send) -> None:  # type: ignore[no-untyped-def]
        """Schemathesis ends the lifespan after every test; the runtime is closed once, at the end of the
        module, in schemathesis's event loop (the one its connectors' sessions were opened in)."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.closing:
                    await self.broker.runtime.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def token(self, caller: str) -> str:
        """A real access token from the token endpoint, renewed before it expires."""
        token, issued = self._tokens.get(caller, ("", 0.0))
        if time.monotonic() - issued > TOKEN_MAX_AGE:
            agency, sub, role = CALLERS[caller]
            form = {"grant_type": "client_credentials",
                    "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    "client_assertion": self.broker.assertion(agency), "staff_sub": sub, "staff_role": role}
            with schemathesis_asgi.get_client(self) as client:
                r = client.post("/oauth/token", data=form)
            assert r.status_code == 200, r.text
            token = r.json()["access_token"]
            self._tokens[caller] = (token, time.monotonic())
        return token


def _seed_audit_office(target_url: str, keys: dict[str, BrokerKey], runtime) -> None:  # type: ignore[no-untyped-def]
    """The audit office of tests/audit/auditors.py: its system and its auditor and privacy officer."""
    with runtime.sessions() as s:
        s.add(Agency(id=AUDIT_AGENCY, name="Test audit office", roles=["auditor", "privacy-officer"]))
        s.flush()
        s.add(OAuthClient(client_id=client_id(AUDIT_AGENCY), agency_id=AUDIT_AGENCY, name="audit system",
                          jwks=keys[AUDIT_AGENCY].public_jwks(), active=True, created_at=datetime.now(timezone.utc)))
        for sub, role in AUDIT_STAFF.values():
            s.add(Staff(sub=sub, agency_id=AUDIT_AGENCY, roles=[role], active=True))
        s.commit()


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory, fhir_server):  # type: ignore[no-untyped-def]
    """A broker on SQLite with the harness's agencies, teams and FHIR source, and the audit office."""
    tmp = tmp_path_factory.mktemp("fuzz")
    url = f"sqlite:///{tmp / 'broker.sqlite'}"
    keys = {a: BrokerKey.from_pem(write_key(tmp / f"{a}.pem").read_bytes()) for a in [*AGENCIES, AUDIT_AGENCY]}
    seed(url, {a: keys[a] for a in AGENCIES})
    runtime = build_runtime(make_settings(tmp, url, fhir_server.base_url, **UNLIMITED))
    _seed_audit_office(url, keys, runtime)
    target = FuzzTarget(app=create_app(runtime=runtime), broker=Broker(runtime=runtime, client=None, keys=keys))  # type: ignore[arg-type]
    yield target
    target.closing = True
    with schemathesis_asgi.get_client(target):  # start a lifespan so that ending it closes the runtime
        pass
    schemathesis_asgi.shutdown_lifespans()
    print(f"\nfuzz: {sum(target.requests.values())} requests {target.requests}, seed {SEED}")
    assert sum(target.requests.values()) >= MIN_REQUESTS, target.requests


def _with_known_ids(_context, values):  # type: ignore[no-untyped-def]
    """Keep the generated values, or swap in seeded ids where a parameter has some."""
    known = {name: st.sampled_from(KNOWN_IDS[name]) for name in values or {} if name in KNOWN_IDS}
    if not known:
        return st.just(values)
    return st.one_of(st.just(values), st.fixed_dictionaries(known).map(lambda ids: {**values, **ids}))


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_target):  # type: ignore[no-untyped-def]
    """The committed document, bound to the app in-process."""
    config = schemathesis.Config.from_dict({
        "seed": SEED,
        "generation": {"mode": "all", "max-examples": EXAMPLES},
        "phases": {"coverage": {"enabled": bool(LONG)}, "stateful": {"enabled": False}},
    })
    schema = schemathesis.openapi.from_dict(json.loads(DOCUMENT.read_text()), config=config)
    schema.app = fuzz_target
    schema.hook("flatmap_path_parameters")(_with_known_ids)
    schema.hook("flatmap_query")(_with_known_ids)
    return schema


lazy = schemathesis.pytest.from_fixture("fuzz_schema")


def _send(case, target: FuzzTarget, caller: str | None) -> None:  # type: ignore[no-untyped-def]
    """Send the case as ``caller`` (None: no Authorization header at all) and check the response."""
    headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    if caller is not None:
        headers["Authorization"] = f"Bearer {target.token(caller)}"
        if not any(k.lower() == "x-purpose-of-use" for k in headers):
            headers["X-Purpose-Of-Use"] = "TREAT"
    case.headers = headers
    label = caller or "no-token"
    target.requests[label] = target.requests.get(label, 0) + 1
    response = case.call()
    case.validate_response(response, checks=CHECKS)


@lazy.parametrize()
@FUZZ_SETTINGS
def test_fuzz_as_a_team_member(case, fuzz_target):  # type: ignore[no-untyped-def]
    _send(case, fuzz_target, "member")


@lazy.parametrize()
@FUZZ_SETTINGS
def test_fuzz_as_a_privacy_officer(case, fuzz_target):  # type: ignore[no-untyped-def]
    _send(case, fuzz_target, "privacy-officer")


@lazy.parametrize()
@FUZZ_SETTINGS
def test_fuzz_without_a_token(case, fuzz_target):  # type: ignore[no-untyped-def]
    _send(case, fuzz_target, None)
