"""The token attack table, end to end: forged, stale and misdirected tokens and client assertions.

Against the real app (scenario harness: real keys, real token endpoint, real FHIR server): every
access-token attack on a data route is the same 401, byte for byte apart from the request id;
every client-assertion attack at ``POST /oauth/token`` is an RFC 6749 §5.2 error whose body is
fixed per error code. Every refusal is in the audit chain, with the check that failed recorded
there (and only there), and never the token or assertion itself.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from joserfc import jwt
from sqlalchemy import select

from broker.api.oauth import DESCRIPTIONS, UNKNOWN_ROLE
from broker.auth.keys import BrokerKey, generate_private_key_pem
from broker.store.models import AuditEventRow
from tests.scenarios.harness import PERSONAS, PUBLIC_URL, Broker, client_id, start_broker

PATH = "/mdts/mdt-alpha/fhir/Observation"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SKEW = 30  # Settings.clock_skew_seconds default
ME = PERSONAS["mh"]  # a mental health clinician on every team: Observations are hers to see


@pytest.fixture(scope="module")
async def broker(tmp_path_factory, fhir_server) -> Broker:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("token-attacks")
    b = await start_broker(tmp, f"sqlite:///{tmp / 'broker.sqlite'}", fhir_server.base_url)
    yield b
    await b.aclose()


# ---- helpers ---------------------------------------------------------------------------------

def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj: Any) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


def fresh_key(kid: str | None = None) -> BrokerKey:
    key = BrokerKey.from_pem(generate_private_key_pem("EC"))
    return BrokerKey(jwk=key.jwk, kid=kid, alg=key.alg) if kid else key


def access_claims(**over: Any) -> dict[str, Any]:
    """What the broker itself puts in a token for the clinician; tests change one thing."""
    t = int(time.time())
    claims = {"iss": PUBLIC_URL, "aud": "mdt-broker", "sub": ME.sub, "iat": t, "nbf": t, "exp": t + 300,
              "jti": str(uuid.uuid4()), "agency": "bh", "role": "mental-health-clinician",
              "client_id": client_id("bh"), "scope": "", "purpose_of_use": "TREAT"}
    claims.update(over)
    return claims


def forge(b: Broker, claims: dict[str, Any] | None = None, *, key: BrokerKey | None = None,
          **header: Any) -> str:
    """Signed with the broker's own key (or ``key``), header as the broker writes it unless overridden."""
    signer = key or b.runtime.signing_key
    hdr = {"alg": signer.alg, "kid": b.runtime.signing_key.kid, "typ": "at+jwt", **header}
    hdr = {k: v for k, v in hdr.items() if v is not None}
    return jwt.encode(hdr, claims or access_claims(), signer.jwk, algorithms=[hdr["alg"]])


def unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{b64json(header)}.{b64json(claims)}."


def hs256(secret: bytes, header: dict[str, Any], claims: dict[str, Any]) -> str:
    signing_input = f"{b64json(header)}.{b64json(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def public_pem(key: BrokerKey) -> bytes:
    return key.verification_key().as_pem()


def audit_row(b: Broker, request_id: str) -> AuditEventRow:
    with b.runtime.sessions() as s:
        return s.scalars(select(AuditEventRow).where(AuditEventRow.request_id == request_id)).one()


def assert_secret_not_in(secret: str, text: str) -> None:
    assert all(part not in text for part in secret.split(".") if len(part) > 8)


# ---- access tokens at a data route -------------------------------------------------------------

def _now() -> int:
    return int(time.time())


ACCESS_ATTACKS: list[Any] = [
    pytest.param(lambda b: unsigned({"alg": "none", "typ": "at+jwt", "kid": b.runtime.signing_key.kid},
                                    access_claims()), id="alg-none"),
    pytest.param(lambda b: hs256(public_pem(b.runtime.signing_key),
                                 {"alg": "HS256", "typ": "at+jwt", "kid": b.runtime.signing_key.kid},
                                 access_claims()), id="hs256-keyed-with-public-key-pem"),
    pytest.param(lambda b: hs256(json.dumps(b.runtime.signing_key.public_jwk()).encode(),
                                 {"alg": "HS256", "typ": "at+jwt", "kid": b.runtime.signing_key.kid},
                                 access_claims()), id="hs256-keyed-with-public-jwk"),
    pytest.param(lambda b: forge(b, access_claims(exp=_now() - SKEW - 5, iat=_now() - 400, nbf=_now() - 400)),
                 id="expired"),
    pytest.param(lambda b: forge(b, access_claims(nbf=_now() + SKEW + 60)), id="nbf-in-future"),
    pytest.param(lambda b: forge(b, access_claims(iat=_now() + SKEW + 60, nbf=_now() + SKEW + 60,
                                                  exp=_now() + SKEW + 300)), id="iat-in-future"),
    pytest.param(lambda b: forge(b, access_claims(iss="https://broker.other-county.example")), id="wrong-issuer"),
    pytest.param(lambda b: forge(b, access_claims(aud="some-other-api")), id="wrong-audience"),
    pytest.param(lambda b: forge(b, kid="no-such-key"), id="unknown-kid"),
    pytest.param(lambda b: forge(b, key=fresh_key()), id="another-environments-key-own-kid"),
    pytest.param(lambda b: forge(b, key=fresh_key(b.runtime.signing_key.kid)), id="another-environments-key-same-kid"),
    pytest.param(lambda b: forge(b, typ=None), id="typ-missing"),
    pytest.param(lambda b: forge(b, typ="JWT"), id="typ-jwt"),
    pytest.param(lambda b: forge(b, typ="at+jwt\u0000"), id="typ-garbled"),
    pytest.param(lambda b: forge(b, access_claims(role="child-welfare-worker")).rsplit(".", 1)[0] + "."
                 + forge(b).rsplit(".", 1)[1], id="claims-swapped-under-a-real-signature"),
    pytest.param(lambda b: "not-a-token", id="garbage"),
]


async def _get(b: Broker, token: str):  # type: ignore[no-untyped-def]
    return await b.client.get(PATH, headers={"Authorization": f"Bearer {token}", "X-Purpose-Of-Use": "TREAT"})


async def test_the_forged_baseline_is_accepted(broker: Broker) -> None:
    """The table means something only if the unmodified forgery gets data."""
    r = await _get(broker, forge(broker))
    assert r.status_code == 200, r.text
    assert r.json()["resourceType"] == "Bundle" and r.json().get("entry")


@pytest.mark.parametrize("build", ACCESS_ATTACKS)
async def test_access_token_attack_is_the_one_401_and_audited(
        broker: Broker, build: Callable[[Broker], str]) -> None:
    reference = await _get(broker, "not-a-token")
    token = build(broker)
    r = await _get(broker, token)
    assert r.status_code == 401
    assert r.content == reference.content  # byte-identical: nothing says which check failed
    same = {k: v for k, v in r.headers.items() if k != "x-request-id"}
    assert same == {k: v for k, v in reference.headers.items() if k != "x-request-id"}
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert r.headers["x-request-id"] != reference.headers["x-request-id"]
    assert ME.sub not in r.text
    row = audit_row(broker, r.headers["x-request-id"])
    assert (row.action, row.outcome, row.client_id, row.actor_sub) == ("fhir.search", 401, None, None)
    event = json.loads(row.body)
    assert event["error"] == "Unauthorized" and event["released_count"] == 0
    assert_secret_not_in(token, row.body)


# ---- client assertions at the token endpoint ----------------------------------------------------

def assertion(b: Broker, agency: str = "bh", *, key: BrokerKey | None = None,
              header: dict[str, Any] | None = None, **claims: Any) -> str:
    """An RFC 7523 assertion as the harness makes it, with a different key or header if asked."""
    if key is None and header is None:
        return b.assertion(agency, **claims)
    signer = key or b.keys[agency]
    t = int(time.time())
    body = {"iss": client_id(agency), "sub": client_id(agency), "aud": f"{PUBLIC_URL}/oauth/token",
            "iat": t, "exp": t + 60, "jti": uuid.uuid4().hex, **claims}
    hdr = {"alg": signer.alg, "kid": b.keys[agency].kid, **(header or {})}
    return jwt.encode(hdr, body, signer.jwk, algorithms=[hdr["alg"]])


def _alg_none(b: Broker) -> str:
    good = b.assertion("bh").split(".")[1]
    return f"{b64json({'alg': 'none', 'kid': b.keys['bh'].kid})}.{good}."


def _hs256_assertion(b: Broker) -> str:
    t = int(time.time())
    body = {"iss": client_id("bh"), "sub": client_id("bh"), "aud": f"{PUBLIC_URL}/oauth/token",
            "iat": t, "exp": t + 60, "jti": uuid.uuid4().hex}
    return hs256(public_pem(b.keys["bh"]), {"alg": "HS256", "kid": b.keys["bh"].kid}, body)


# (id, build the form fields, status, error, audit reason, client recorded as authenticated,
#  client whose key signed the refused assertion)
TOKEN_ATTACKS: list[Any] = [
    pytest.param(lambda b: {"client_assertion": assertion(b, key=fresh_key(b.keys["bh"].kid))},
                 401, "invalid_client", "bad_signature", None, None, id="assertion-key-not-registered-same-kid"),
    pytest.param(lambda b: {"client_assertion": assertion(b, key=b.keys["cws"])},
                 401, "invalid_client", "bad_signature", None, None, id="assertion-signed-by-another-client"),
    pytest.param(lambda b: {"client_assertion": _alg_none(b)},
                 401, "invalid_client", "malformed", None, None, id="assertion-alg-none"),  # empty signature
    pytest.param(lambda b: {"client_assertion": _hs256_assertion(b)},
                 401, "invalid_client", "algorithm_not_allowed", None, None, id="assertion-hs256-public-key"),
    pytest.param(lambda b: {"client_assertion": assertion(b, iss="nobody", sub="nobody", key=fresh_key())},
                 401, "invalid_client", "unknown_or_inactive_client", None, None, id="unknown-client"),
    pytest.param(lambda b: {"client_assertion": assertion(b, exp=int(time.time()) - SKEW - 5)},
                 401, "invalid_client", "expired", None, "bh-system", id="assertion-expired"),
    pytest.param(lambda b: {"client_assertion": assertion(b, iat=int(time.time()) + SKEW + 60)},
                 401, "invalid_client", "future_iat", None, "bh-system", id="assertion-not-yet-valid"),
    pytest.param(lambda b: {"client_assertion": assertion(b, aud="https://broker.other-county.example/oauth/token")},
                 401, "invalid_client", "wrong_audience", None, "bh-system", id="assertion-wrong-aud"),
    pytest.param(lambda b: {"client_assertion": assertion(b, aud=PUBLIC_URL)},
                 401, "invalid_client", "wrong_audience", None, "bh-system", id="assertion-aud-base-url"),
    pytest.param(lambda b: {"staff_sub": PERSONAS["cw"].sub, "staff_role": "child-welfare-worker"},
                 400, "invalid_grant", "staff_of_another_agency", "bh-system", None,
                 id="staff-of-another-agency"),
    pytest.param(lambda b: {"staff_role": "child-welfare-worker"},
                 400, "invalid_grant", "role_not_held", "bh-system", None, id="role-outside-the-agency"),
    pytest.param(lambda b: {"staff_sub": "staff-nobody"},
                 400, "invalid_grant", "staff_unknown_or_inactive", "bh-system", None, id="unknown-staff"),
    # free text in the role field (here a record number) is not a role: the event does not repeat it
    pytest.param(lambda b: {"staff_role": "MRN-00417-TEST"},
                 400, "invalid_grant", "role_not_held", "bh-system", None, id="role-nobody-has-heard-of"),
]


def _form(b: Broker, **fields: str) -> dict[str, str]:
    return {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": b.assertion("bh"), "staff_sub": ME.sub, "staff_role": ME.role, **fields}


def _assert_refusal(b: Broker, r, status: int, error: str, secret: str) -> dict:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    assert r.content == json.dumps({"error": error, "error_description": DESCRIPTIONS[error]},
                                   separators=(",", ":")).encode()
    assert r.headers["cache-control"] == "no-store"
    row = audit_row(b, r.headers["x-request-id"])
    assert (row.action, row.outcome) == ("oauth.token", status)
    assert_secret_not_in(secret, row.body)
    event = json.loads(row.body)
    assert event["error"] == error
    return event


@pytest.mark.parametrize(("build", "status", "error", "reason", "client", "signed_by"), TOKEN_ATTACKS)
async def test_token_endpoint_attack_is_a_fixed_oauth_error_and_audited(
        broker: Broker, build, status: int, error: str, reason: str, client: str | None,
        signed_by: str | None) -> None:
    form = _form(broker, **build(broker))
    r = await broker.client.post("/oauth/token", data=form)
    event = _assert_refusal(broker, r, status, error, form["client_assertion"])
    assert event["detail"]["reason"] == reason
    assert event["client_id"] == client
    assert event["detail"].get("assertion_client") == signed_by
    if client is None:
        assert event["actor"] is None
    else:  # the client authenticated: the event names whom it asked to speak for, in a role it has heard of
        role = form["staff_role"] if form["staff_role"] != "MRN-00417-TEST" else UNKNOWN_ROLE
        assert event["actor"] == {"sub": form["staff_sub"], "agency": "bh", "role": role}
        assert "MRN-00417-TEST" not in audit_row(b=broker, request_id=r.headers["x-request-id"]).body


async def test_a_replayed_assertion_is_refused_and_audited_against_its_client(broker: Broker) -> None:
    form = _form(broker)
    first = await broker.client.post("/oauth/token", data=form)
    assert first.status_code == 200
    again = await broker.client.post("/oauth/token", data=form)
    event = _assert_refusal(broker, again, 401, "invalid_client", form["client_assertion"])
    assert event["detail"]["reason"] == "replayed"
    assert event["detail"]["assertion_client"] == "bh-system" and event["client_id"] is None


async def test_a_granted_token_is_audited_without_the_token(broker: Broker) -> None:
    form = _form(broker, purpose_of_use="COC")
    r = await broker.client.post("/oauth/token", data=form)
    assert r.status_code == 200
    row = audit_row(broker, r.headers["x-request-id"])
    assert (row.action, row.outcome, row.client_id, row.actor_sub, row.actor_agency, row.actor_role) == (
        "oauth.token", 200, "bh-system", ME.sub, "bh", ME.role)
    event = json.loads(row.body)
    assert event["purpose"] == "COC" and event["error"] is None
    assert_secret_not_in(r.json()["access_token"], row.body)
    assert_secret_not_in(form["client_assertion"], row.body)


async def test_refusals_of_one_code_are_byte_identical(broker: Broker) -> None:
    """Unknown client, forged signature, expired and replayed assertions all read the same."""
    bodies = set()
    for fields in ({"client_assertion": assertion(broker, iss="x", sub="x", key=fresh_key())},
                   {"client_assertion": assertion(broker, key=fresh_key(broker.keys["bh"].kid))},
                   {"client_assertion": assertion(broker, exp=int(time.time()) - 300)},
                   {"client_assertion": "a.b.c"}):
        r = await broker.client.post("/oauth/token", data=_form(broker, **fields))
        assert r.status_code == 401
        bodies.add(r.content)
    assert len(bodies) == 1


async def test_malformed_requests_are_audited_with_the_fixed_description(broker: Broker) -> None:
    r = await broker.client.post("/oauth/token", data=_form(broker, grant_type=""))
    event = _assert_refusal(broker, r, 400, "invalid_request", "")
    assert event["detail"]["reason"] == "grant_type_missing" and event["client_id"] is None
    r = await broker.client.post("/oauth/token", json=_form(broker))
    assert _assert_refusal(broker, r, 400, "invalid_request", "")["detail"]["reason"] == "content_type"


class _FailingSink:
    def append(self, _event: dict) -> None:
        raise RuntimeError("audit store unavailable")


async def test_no_token_leaves_when_the_audit_write_fails(broker: Broker, monkeypatch) -> None:
    form = _form(broker)
    monkeypatch.setattr(broker.runtime, "audit", _FailingSink())
    r = await broker.client.post("/oauth/token", data=form)
    assert r.status_code == 503
    assert "access_token" not in r.text and r.json()["resourceType"] == "OperationOutcome"
    assert r.headers["cache-control"] == "no-store"
    refused = await broker.client.post("/oauth/token", data=_form(broker, staff_sub="staff-nobody"))
    assert refused.status_code == 503  # a refusal that cannot be audited is not answered either
