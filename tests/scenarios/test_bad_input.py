"""Bad input gets a clear 4xx with an OperationOutcome, and never a stack trace."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey

from tests.scenarios.harness import PERSONAS, PUBLIC_URL

PATH = "/mdts/mdt-alpha/fhir/Observation"


def _b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def _claims(**over) -> dict:
    now = int(time.time())
    p = PERSONAS["mh"]
    c = {"iss": PUBLIC_URL, "aud": "mdt-broker", "sub": p.sub, "iat": now, "nbf": now, "exp": now + 300,
         "jti": "t", "agency": p.agency, "role": p.role, "client_id": "bh-system", "scope": "records.read"}
    c.update(over)
    return c


def _signed(broker, claims: dict) -> str:
    key = broker.runtime.signing_key
    return jwt.encode({"alg": key.alg, "kid": key.kid, "typ": "at+jwt"}, claims, key.jwk, algorithms=[key.alg])


def bad_tokens(broker) -> dict[str, str]:
    key = broker.runtime.signing_key
    pub_pem = key.verification_key().as_pem(private=False)
    # joserfc refuses to do this, so sign by hand: the classic key-confusion attack.
    signing_input = f"{_b64({'alg': 'HS256', 'kid': key.kid, 'typ': 'at+jwt'})}.{_b64(_claims())}"
    mac = hmac.new(pub_pem, signing_input.encode(), hashlib.sha256).digest()
    hs = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    other = ECKey.generate_key("P-256")
    foreign = jwt.encode({"alg": "ES256", "kid": key.kid}, _claims(), other, algorithms=["ES256"])
    return {
        "malformed": "not-a-jwt",
        "alg-none": f"{_b64({'alg': 'none', 'kid': key.kid})}.{_b64(_claims())}.",
        "hs256-with-public-key": hs,
        "expired": _signed(broker, _claims(iat=int(time.time()) - 3600, nbf=int(time.time()) - 3600,
                                           exp=int(time.time()) - 1800)),
        "wrong-audience": _signed(broker, _claims(aud="someone-else")),
        "wrong-issuer": _signed(broker, _claims(iss="https://evil.example")),
        "signed-by-another-key": foreign,
    }


@pytest.mark.parametrize("case", ["malformed", "alg-none", "hs256-with-public-key", "expired", "wrong-audience",
                                  "wrong-issuer", "signed-by-another-key"])
async def test_bad_tokens_get_401(broker, case):
    token = bad_tokens(broker)[case]
    r = await broker.get(PATH, token=token, purpose="TREAT")
    assert r.status_code == 401
    assert r.json()["resourceType"] == "OperationOutcome"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert "Traceback" not in r.text


async def test_a_valid_handmade_token_works(broker):
    """Guards the table above: the same claims, properly signed, are accepted."""
    r = await broker.get(PATH, token=_signed(broker, _claims()), purpose="TREAT")
    assert r.status_code == 200


async def test_missing_token_is_401(broker):
    r = await broker.get(PATH, purpose="TREAT")
    assert r.status_code == 401


@pytest.mark.parametrize(("path", "params", "purpose", "status"), [
    ("/mdts/mdt-alpha/fhir/Spaceship", {}, "TREAT", 400),
    ("/mdts/mdt-alpha/fhir/observation", {}, "TREAT", 400),
    (PATH, {"_count": "lots"}, "TREAT", 400),
    (PATH, {"_count": "-1"}, "TREAT", 400),
    (PATH, {"date": "yesterday"}, "TREAT", 400),
    (PATH, {"patient": "Patient/pt-bravo"}, "TREAT", 400),
    (PATH, {"subject": "Patient/pt-bravo"}, "TREAT", 400),
    (PATH, {"_include": "Observation:patient"}, "TREAT", 400),
    (PATH, {"code:below": "x"}, "TREAT", 400),
    (PATH, {}, None, 400),
    (PATH, {}, "MARKETING", 400),
])
async def test_malformed_requests_get_400_with_an_outcome(broker, path, params, purpose, status):
    token = await broker.token("mh")
    r = await broker.get(path, token=token, purpose=purpose, **params)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["diagnostics"]
    assert "pt-bravo" not in r.text and "Traceback" not in r.text


async def test_purpose_in_token_and_header_must_agree(broker):
    p = PERSONAS["mh"]
    r = await broker.request_token(agency=p.agency, sub=p.sub, role=p.role, purpose_of_use="TREAT")
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    assert (await broker.get(PATH, token=token, purpose=None)).status_code == 200
    assert (await broker.get(PATH, token=token, purpose="COC")).status_code == 400


async def test_oversized_body_gets_413(broker):
    token = await broker.token("cw")
    big = b'{"identifiers": [], "pad": "' + b"x" * 2_000_000 + b'"}'
    r = await broker.client.post("/youth", content=big, headers={"Authorization": f"Bearer {token}",
                                                                 "Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.json()["resourceType"] == "OperationOutcome"


async def test_valid_search_parameters_narrow_the_result(broker):
    token = await broker.token("mh")
    r = await broker.get(PATH, token=token, purpose="TREAT", code="http://loinc.org|29463-7", date="ge2025-01-01")
    assert r.status_code == 200
    ids = {e["resource"]["id"] for e in r.json().get("entry", [])}
    assert ids == {"alpha-obs-weight-2025", "alpha-obs-weight-2026"}
    r = await broker.get(PATH, token=token, purpose="TREAT", _lastUpdated="lt2024-12-31")
    ids = {e["resource"]["id"] for e in r.json().get("entry", [])}
    assert ids and all(i.endswith("2024") for i in ids), ids


async def test_count_pages_without_totals(broker):
    token = await broker.token("mh")
    r = await broker.get(PATH, token=token, purpose="TREAT", _count="2")
    bundle = r.json()
    assert len(bundle["entry"]) == 2 and "total" not in bundle
    nxt = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
    assert nxt and "_offset=2" in nxt[0]
    seen = {e["resource"]["id"] for e in bundle["entry"]}
    while nxt:
        page = (await broker.client.get(nxt[0].removeprefix(PUBLIC_URL), headers={
            "Authorization": f"Bearer {token}", "X-Purpose-Of-Use": "TREAT"})).json()
        seen |= {e["resource"]["id"] for e in page.get("entry", [])}
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
    everything = {e["resource"]["id"] for e in (await broker.get(PATH, token=token, purpose="TREAT")).json()["entry"]}
    assert seen == everything
