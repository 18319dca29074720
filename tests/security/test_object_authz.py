"""Object-level authorization: nobody outside a youth's team gets the youth's data or learns it exists.

Every route of the app is either probed here or listed in ``NOT_PROBED`` with the reason, and a test
fails when a new route is neither. Each probe is sent twice by each of four callers: once naming
the real object (mdt-alpha, y-alpha, its consent, court order, break-glass grant, membership, source
id) and once naming an object that does not exist. The two answers must be the same status and the
same bytes apart from the request id and the ids the caller itself sent, and neither may carry the
youth's data. The callers:

* ``cw-other`` — an active member of another team (mdt-bravo), asking about mdt-alpha and y-alpha;
  on mdt-bravo it also asks for y-alpha's records by their ids;
* ``po-ended`` — a former member of mdt-alpha whose membership has ended;
* ``auditor`` — audit staff (tests/audit/auditors.py), on everything but the audit routes it is for;
* ``da`` — another agency's staff through its own system (the district attorney, on no team); and
  the da system asking the token endpoint for child welfare staff, which must not tell real staff
  from invented ones.

``BY_DESIGN`` lists, with the reason, the few (route, caller) pairs where the documented design gives
the caller an answer that differs (the lead agency's staff manage its teams; registrars learn of a
duplicate registration; auditors read the audit log of every youth).

Runs on SQLite only; one broker for the module.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi.routing import iter_route_contexts

from broker.app import create_app
from broker.auth.keys import generate_private_key_pem
from broker.settings import REPO_POLICY_DIR, Settings
from broker.store.db import upgrade
from tests.audit.auditors import start_audit_broker, token
from tests.scenarios.consents import consent
from tests.scenarios.harness import EHR_SYSTEM, PERSONAS, Broker

ATTACKERS = ("cw-other", "po-ended", "auditor", "da")
FAKE_IDS = {"youth": "y-omega", "mdt": "mdt-omega", "membership": "m-cw-mdt-omega", "patient": "pt-omega",
            "resource": "omega-obs-weight-2025"}
# The real consent, order and grant ids are made by the fixture; their fakes keep the same shape.
MADE = ("consent", "order", "grant")


@dataclass(frozen=True)
class Probe:
    """A request with ``{youth}``-style placeholders in its path, query and JSON body."""

    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    body: dict | None = None
    purpose: str | None = None
    content_type: str = "application/json"


ORDER_BODY = {"youth_id": "{youth}", "case_number": "JV-2026-0099", "court": "Superior Court, Juvenile Division",
              "categories": ["mental-health"], "purposes": ["HLEGAL"],
              "recipients": [{"kind": "agency", "value": "probation"}]}
MEMBER_BODY = {"sub": PERSONAS["po-ended"].sub, "agency": "probation", "team_role": "probation-officer"}

# Keyed by (method, route path as the app declares it).
PROBES: dict[tuple[str, str], Probe] = {
    # data
    ("GET", "/mdts/{mdt_id}/fhir/metadata"): Probe("GET", "/mdts/{mdt}/fhir/metadata"),
    ("GET", "/mdts/{mdt_id}/fhir/{resource_type}"): Probe("GET", "/mdts/{mdt}/fhir/Observation", purpose="COC"),
    ("GET", "/mdts/{mdt_id}/fhir/{resource_type}/{resource_id}"):
        Probe("GET", "/mdts/{mdt}/fhir/Observation/{resource}", purpose="COC"),
    ("GET", "/mdts/{mdt_id}/record"): Probe("GET", "/mdts/{mdt}/record", purpose="COC"),
    # registry
    ("POST", "/youth"): Probe("POST", "/youth", body={"identifiers": [
        {"source": "county-ehr", "system": EHR_SYSTEM, "value": "{patient}"}]}),
    ("GET", "/youth"): Probe("GET", "/youth", query={"identifier": f"{EHR_SYSTEM}|{{patient}}"}),
    ("GET", "/youth/{youth_id}"): Probe("GET", "/youth/{youth}"),
    ("POST", "/youth/{youth_id}/identifiers"): Probe("POST", "/youth/{youth}/identifiers", body={"identifiers": [
        {"source": "county-ehr", "system": EHR_SYSTEM, "value": "pt-probe-0001"}]}),
    ("DELETE", "/youth/{youth_id}/identifiers/{source}"): Probe("DELETE", "/youth/{youth}/identifiers/county-ehr"),
    ("POST", "/mdts"): Probe("POST", "/mdts", body={"youth_id": "{youth}", "lead_agency": "{agency}"}),
    ("GET", "/mdts/{mdt_id}"): Probe("GET", "/mdts/{mdt}"),
    ("POST", "/mdts/{mdt_id}/members"): Probe("POST", "/mdts/{mdt}/members", body=MEMBER_BODY),
    ("DELETE", "/mdts/{mdt_id}/members/{membership_id}"): Probe("DELETE", "/mdts/{mdt}/members/{membership}"),
    # consents
    ("POST", "/consents"): Probe("POST", "/consents", content_type="application/fhir+json", body=consent(
        "{youth}", categories=["mental-health"], recipients=[("agency", "probation")], purposes=["COC"])),
    ("GET", "/consents"): Probe("GET", "/consents", query={"youth": "{youth}"}),
    ("GET", "/consents/{consent_id}"): Probe("GET", "/consents/{consent}"),
    ("POST", "/consents/{consent_id}/revoke"): Probe("POST", "/consents/{consent}/revoke"),
    # court orders
    ("POST", "/court-orders"): Probe("POST", "/court-orders", body=ORDER_BODY),
    ("GET", "/court-orders"): Probe("GET", "/court-orders", query={"youth": "{youth}"}),
    ("GET", "/court-orders/{order_id}"): Probe("GET", "/court-orders/{order}"),
    ("POST", "/court-orders/{order_id}/revoke"): Probe("POST", "/court-orders/{order}/revoke"),
    # break-glass
    ("POST", "/mdts/{mdt_id}/break-glass"): Probe("POST", "/mdts/{mdt}/break-glass",
                                                 body={"purpose": "ETREAT", "reason": "probing a team I am not on"}),
    ("GET", "/mdts/{mdt_id}/break-glass"): Probe("GET", "/mdts/{mdt}/break-glass"),
    # audit
    ("GET", "/audit/events"): Probe("GET", "/audit/events", query={"youth": "{youth}"}),
    ("GET", "/audit/accounting"): Probe("GET", "/audit/accounting", query={"youth": "{youth}"}),
    ("GET", "/audit/accounting/print"): Probe("GET", "/audit/accounting/print", query={"youth": "{youth}"}),
    ("GET", "/audit/break-glass"): Probe("GET", "/audit/break-glass", query={"status": "all"}),
    ("GET", "/audit/break-glass/overdue"): Probe("GET", "/audit/break-glass/overdue"),
    ("POST", "/audit/break-glass/{grant_id}/review"): Probe("POST", "/audit/break-glass/{grant}/review",
                                                            body={"finding": "justified", "note": "probe"}),
    ("GET", "/audit/verify"): Probe("GET", "/audit/verify"),
    ("GET", "/audit/export"): Probe("GET", "/audit/export"),
}

NOT_PROBED = {
    ("GET", "/healthz"): "public liveness: no data",
    ("GET", "/readyz"): "public readiness: database up or not, no data",
    ("GET", "/.well-known/jwks.json"): "public keys that verify the broker's tokens",
    ("GET", "/audit/checkpoint-key"): "public key that verifies audit checkpoints",
    ("GET", "/openapi.json"): "the API description",
    ("POST", "/oauth/token"): "names no youth; probed by test_a_client_cannot_tell_other_agencies_staff_apart",
    ("POST", "/policy/decide"): "a what-if question about the policy; names no youth or team",
    ("GET", "/policy/version"): "the policy version in force; names no youth or team",
    ("POST", "/policy/reload"): "registry admin reloads the policy files; names no youth or team",
}

LEAD_AGENCY = ("cw-other is staff of cws, the lead agency of mdt-alpha: the lead agency's staff manage the team's "
               "roster and the youth's source links (README, 'who may do what'; docs/identity-linking.md)")
AUDITORS = ("auditors read the audit metadata of every youth, never record content (README, 'Audit for "
            "auditors'); test_auditors_see_metadata_and_no_record_content checks the content")
REGISTRAR = ("a registrar told that a source id is already registered: refusing a duplicate youth needs it "
             "(docs/identity-linking.md, 'Limits worth knowing')")
BY_DESIGN = {
    (("POST", "/mdts/{mdt_id}/members"), "cw-other"): LEAD_AGENCY,
    (("DELETE", "/mdts/{mdt_id}/members/{membership_id}"), "cw-other"): LEAD_AGENCY,
    (("POST", "/youth/{youth_id}/identifiers"), "cw-other"): LEAD_AGENCY,
    (("POST", "/mdts"), "cw-other"): LEAD_AGENCY + "; it is told the youth already has an open team",
    (("POST", "/youth"), "cw-other"): REGISTRAR,
    (("POST", "/youth"), "po-ended"): REGISTRAR,
    **{(route, "auditor"): AUDITORS for route in PROBES
       if route[1].startswith("/audit/") and route[1] != "/audit/break-glass/{grant_id}/review"},
}

# Probes on the caller's own team that name the other youth's records by their ids: cw-other on mdt-bravo
# (COC lets a child welfare worker read Patient there) asks for y-alpha's Patient and Observation.
OWN_TEAM = {
    "read-the-other-youths-patient": Probe("GET", "/mdts/mdt-bravo/fhir/Patient/{patient}", purpose="COC"),
    "search-the-other-youths-patient": Probe("GET", "/mdts/mdt-bravo/fhir/Patient", query={"_id": "{patient}"},
                                             purpose="COC"),
    "read-the-other-youths-observation": Probe("GET", "/mdts/mdt-bravo/fhir/Observation/{resource}", purpose="COC"),
}


@dataclass
class Table:
    """The broker, real tokens per caller, and the real and fake ids to fill the probes with."""

    broker: Broker
    tokens: dict[str, str]
    real: dict[str, str]
    fake: dict[str, str]
    secrets: tuple[str, ...]


async def _as(b: Broker, alias: str, method: str, path: str, tokens: dict[str, str], body=None, purpose=None,
              query=None, content_type: str = "application/json"):  # type: ignore[no-untyped-def]
    if alias not in tokens:
        tokens[alias] = await token(b, alias)
    headers = {"Authorization": f"Bearer {tokens[alias]}"}
    if purpose:
        headers["X-Purpose-Of-Use"] = purpose
    if body is not None:
        headers["Content-Type"] = content_type
        return await b.client.request(method, path, headers=headers, params=query, content=json.dumps(body))
    return await b.client.request(method, path, headers=headers, params=query)


@pytest.fixture(scope="module")
async def table(tmp_path_factory, fhir_server) -> Table:  # type: ignore[no-untyped-def]
    """The harness broker with the audit office; cw files a consent, records an order and breaks the glass
    on mdt-alpha; mh reads y-alpha's records so the audit log has disclosures to account for."""
    tmp = tmp_path_factory.mktemp("authz")
    b = await start_audit_broker(tmp, f"sqlite:///{tmp / 'broker.sqlite'}", fhir_server.base_url)
    tokens: dict[str, str] = {}
    made = {}
    r = await _as(b, "cw", "POST", "/consents", tokens, content_type="application/fhir+json", body=consent(
        "y-alpha", categories=["sud-part2"], recipients=[("agency", "bh")], purposes=["TREAT"]))
    assert r.status_code == 201, r.text
    made["consent"] = r.json()["id"]
    r = await _as(b, "cw", "POST", "/court-orders", tokens, body={**ORDER_BODY, "youth_id": "y-alpha",
                                                                   "recipients": [{"kind": "person", "value": "staff-mh"}]})
    assert r.status_code == 201, r.text
    made["order"] = r.json()["id"]
    r = await _as(b, "cw", "POST", "/mdts/mdt-alpha/break-glass", tokens,
                  body={"purpose": "ETREAT", "reason": "the youth is in the emergency room"})
    assert r.status_code == 201, r.text
    made["grant"] = r.json()["id"]
    r = await _as(b, "mh", "GET", "/mdts/mdt-alpha/fhir/Observation", tokens, purpose="TREAT")
    assert r.status_code == 200 and r.json().get("entry"), r.text
    real = {"youth": "y-alpha", "mdt": "mdt-alpha", "membership": "m-cw-mdt-alpha", "patient": "pt-alpha",
            "resource": "alpha-obs-weight-2025", **made}
    fake = {**FAKE_IDS, **{k: _same_shape(v) for k, v in made.items()}}
    secrets = ("pt-alpha", "alpha-obs", "y-alpha", "mdt-alpha", *made.values())
    yield Table(b, tokens, real, fake, secrets)
    await b.aclose()


def _same_shape(value: str) -> str:
    """An id of the same form that names nothing: same prefix, same length."""
    prefix, _, rest = value.partition("-")
    return f"{prefix}-{'0' * len(rest)}"


def _fill(value, ids: dict[str, str]):  # type: ignore[no-untyped-def]
    if isinstance(value, str):
        return re.sub(r"\{(\w+)\}", lambda m: ids.get(m.group(1), m.group(0)), value)
    if isinstance(value, list):
        return [_fill(v, ids) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    return value


async def _send(t: Table, probe: Probe, alias: str, ids: dict[str, str]):  # type: ignore[no-untyped-def]
    ids = {**ids, "agency": PERSONAS[alias].agency if alias in PERSONAS else "audit"}
    return await _as(t.broker, alias, probe.method, _fill(probe.path, ids), t.tokens, body=_fill(probe.body, ids),
                     purpose=probe.purpose, query=_fill(probe.query, ids) or None, content_type=probe.content_type)


def _comparable(response, t: Table) -> tuple[int, dict, bytes]:  # type: ignore[no-untyped-def]
    """Status, headers and body with the request id, the clock, and the ids the caller sent made neutral."""
    body = response.content
    for key in (*FAKE_IDS, *MADE):
        for ids in (t.real, t.fake):
            body = body.replace(ids[key].encode(), f"<{key}>".encode())
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("resourceType") == "Bundle":
        data.pop("id", None)
        data.get("meta", {}).pop("lastUpdated", None)
        body = json.dumps(data, sort_keys=True).encode()
    headers = {k: v for k, v in response.headers.items() if k not in ("x-request-id", "content-length")}
    return response.status_code, headers, body


def _no_secrets(response, sent: str, t: Table) -> None:  # type: ignore[no-untyped-def]
    """Nothing about y-alpha in the answer, apart from ids the caller itself sent."""
    leaked = [s for s in t.secrets if s not in sent and s in response.text]
    assert not leaked, (leaked, response.status_code, response.text[:300])


def _indistinguishable(real, fake, t: Table, sent: str) -> None:  # type: ignore[no-untyped-def]
    assert _comparable(real, t) == _comparable(fake, t), (real.status_code, real.text[:300], fake.status_code,
                                                          fake.text[:300])
    _no_secrets(real, sent, t)


CASES = [(route, alias) for route in PROBES for alias in ATTACKERS if (route, alias) not in BY_DESIGN]


@pytest.mark.parametrize(("route", "alias"), CASES, ids=[f"{a}:{m} {p}" for (m, p), a in CASES])
async def test_no_data_and_no_existence_oracle(table, route, alias):
    probe = PROBES[route]
    real = await _send(table, probe, alias, table.real)
    fake = await _send(table, probe, alias, table.fake)
    _indistinguishable(real, fake, table, _fill(json.dumps([probe.path, probe.query, probe.body]), table.real))
    if route != ("GET", "/mdts/{mdt_id}/fhir/metadata"):  # the public capability statement
        assert real.status_code in (401, 403, 404), (real.status_code, real.text[:300])


@pytest.mark.parametrize("name", list(OWN_TEAM))
async def test_on_its_own_team_a_member_cannot_reach_the_other_youths_records(table, name):
    probe = OWN_TEAM[name]
    real = await _send(table, probe, "cw-other", table.real)
    fake = await _send(table, probe, "cw-other", table.fake)
    _indistinguishable(real, fake, table, _fill(json.dumps([probe.path, probe.query]), table.real))


async def test_the_probes_reach_real_objects(table):
    """Guards the table: entitled callers do get each real object, and cw-other does read its own youth."""
    t, ok = table, []
    for alias, path, purpose in [
        ("cw", "/mdts/mdt-alpha", None), ("cw", "/youth/y-alpha", None), ("mh", "/mdts/mdt-alpha/record", "TREAT"),
        ("mh", "/mdts/mdt-alpha/fhir/Observation/alpha-obs-weight-2025", "TREAT"),
        ("cw", f"/consents/{t.real['consent']}", None), ("cw", f"/court-orders/{t.real['order']}", None),
        ("cw", "/mdts/mdt-alpha/break-glass", None), ("cw-other", "/mdts/mdt-bravo/fhir/Patient/pt-bravo", "COC"),
        ("privacy", "/audit/break-glass?status=all", None),
    ]:
        r = await _as(t.broker, alias, "GET", path, t.tokens, purpose=purpose)
        ok.append((path, r.status_code))
    assert all(status == 200 for _path, status in ok), ok
    r = await _as(t.broker, "privacy", "GET", "/audit/break-glass", t.tokens, query={"status": "all"})
    assert t.real["grant"] in r.text
    r = await _as(t.broker, "cw", "GET", "/youth", t.tokens, query={"identifier": f"{EHR_SYSTEM}|pt-alpha"})
    assert r.status_code == 200 and r.json()["youth_id"] == "y-alpha"


async def test_auditors_see_metadata_and_no_record_content(table):
    """The audit routes are the auditor's job; what they return names no record and no source id."""
    t = table
    for route in [r for r, a in BY_DESIGN if a == "auditor"]:
        r = await _send(t, PROBES[route], "auditor", t.real)
        assert r.status_code == 200, (route, r.status_code, r.text[:300])
        assert "alpha-obs" not in r.text and "pt-alpha" not in r.text, route
    r = await _send(t, PROBES[("GET", "/audit/accounting")], "auditor", t.real)
    assert r.json()["disclosures"], "mh's read of y-alpha's records is a disclosure the table should see"


async def test_a_client_cannot_tell_other_agencies_staff_apart(table):
    """The da system asks for tokens for child welfare staff (and in its own role): the refusals are identical
    for real staff and for invented ones, so one agency cannot enumerate another's staff."""
    b = table.broker
    answers = {}
    for sub, role in [(PERSONAS["cw"].sub, PERSONAS["cw"].role), (PERSONAS["cw-other"].sub, "child-welfare-worker"),
                      ("staff-invented", "child-welfare-worker"), (PERSONAS["cw"].sub, "district-attorney"),
                      ("staff-invented", "district-attorney"), (PERSONAS["admin"].sub, "registry-admin"),
                      ("staff-invented", "registry-admin")]:
        r = await b.request_token(agency="da", sub=sub, role=role)
        answers[(sub, role)] = (r.status_code, r.content, r.headers.get("www-authenticate"))
    assert len(set(answers.values())) == 1, answers
    status, content, _ = next(iter(answers.values()))
    assert status in (400, 401, 403) and b"access_token" not in content
    r = await b.request_token(agency="da", sub=PERSONAS["da"].sub, role="district-attorney")
    assert r.status_code == 200, r.text  # guards the table: the client does get tokens for its own staff


def test_every_route_is_probed_or_listed():
    """A new route must be added to PROBES or, with a reason, to NOT_PROBED."""
    routes = {(method, path) for path, methods in _app_routes() for method in methods if method != "HEAD"}
    assert routes - set(PROBES) - set(NOT_PROBED) == set(), "route neither probed nor listed with a reason"
    assert (set(PROBES) | set(NOT_PROBED)) - routes == set(), "a probed or listed route no longer exists"
    assert not set(PROBES) & set(NOT_PROBED)
    assert {route for route, _alias in BY_DESIGN} <= set(PROBES) and {a for _r, a in BY_DESIGN} <= set(ATTACKERS)


def _app_routes() -> list[tuple[str, set[str]]]:
    """(path, methods) of every route of the production app, included routers flattened."""
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "key.pem"
        key.write_bytes(generate_private_key_pem("EC"))
        key.chmod(0o600)
        url = f"sqlite:///{tmp}/routes.sqlite"
        upgrade(url)
        app = create_app(Settings(mode="production", database_url=url, public_url="http://127.0.0.1:8000",
                                  issuer="http://127.0.0.1:8000", signing_key_file=key, policy_dir=REPO_POLICY_DIR))
        routes = [(r.path, set(r.methods or ())) for r in iter_route_contexts(app.routes) if r.path]
        app.state.runtime.engine.dispose()
    return routes
