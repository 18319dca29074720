"""POST /oauth/token: an agency system gets a token only for its own active staff, in their role."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from joserfc import jws

from .conftest import SKEW, World, make_key


async def post(w: World, data: dict[str, str] | None = None, **kwargs: Any):
    async with w.http() as http:
        return await http.post("/oauth/token", data=data, **kwargs)


def assert_refused(resp, status: int, error: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == error
    assert "access_token" not in body
    assert resp.headers["cache-control"] == "no-store"


async def test_happy_path_issues_a_token_that_verifies(world: World) -> None:
    resp = await post(world, world.form("cw-cms", purpose_of_use="TREAT", scope="fhir.read mdt.read"))
    assert resp.status_code == 200, resp.text
    assert resp.headers["cache-control"] == "no-store"
    body = resp.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    assert body["token_type"] == "Bearer" and body["expires_in"] == 600
    assert body["scope"] == "fhir.read mdt.read"
    p = world.verifier.verify(body["access_token"])
    assert (p.sub, p.agency, p.role, p.client_id, p.purpose) == (
        "cw-worker-1", "cw", "cw-social-worker", "cw-cms", "TREAT")
    assert p.scopes == frozenset({"fhir.read", "mdt.read"})
    claims = json.loads(jws.extract_compact(body["access_token"].encode()).payload)
    assert 0 < claims["exp"] - claims["iat"] <= 900


async def test_rsa_client_of_another_agency_gets_its_own_staff(world: World) -> None:
    resp = await post(world, world.form("mh-ehr", staff_sub="mh-clinician-1",
                                        staff_role="mental-health-clinician"))
    assert resp.status_code == 200, resp.text
    p = world.verifier.verify(resp.json()["access_token"])
    assert (p.agency, p.client_id, p.scopes, p.purpose) == ("mh", "mh-ehr", frozenset(), None)


async def test_replayed_assertion_is_refused(any_world: World) -> None:
    form = any_world.form("cw-cms")
    assert (await post(any_world, form)).status_code == 200
    assert_refused(await post(any_world, form), 401, "invalid_client")


async def test_assertion_reused_for_another_staff_member_is_refused(world: World) -> None:
    assertion = world.assertion("cw-cms")
    assert (await post(world, world.form("cw-cms", assertion=assertion))).status_code == 200
    again = world.form("cw-cms", assertion=assertion, staff_sub="cw-worker-odd", staff_role="x")
    assert_refused(await post(world, again), 401, "invalid_client")


def _bad_assertions() -> list[Any]:
    now = lambda: int(time.time())  # noqa: E731
    return [
        pytest.param(lambda w: w.assertion("cw-cms", aud="https://other.test/oauth/token"), id="wrong-aud"),
        pytest.param(lambda w: w.assertion("cw-cms", aud=w.settings.public_url), id="aud-is-base-url"),
        pytest.param(lambda w: w.assertion("cw-cms", aud=["https://other.test"]), id="aud-list-without-us"),
        pytest.param(lambda w: w.assertion("cw-cms", key=w.client_keys["mh-ehr"]),
                     id="signed-by-another-clients-key"),
        pytest.param(lambda w: w.assertion("cw-cms", key=make_key("EC")), id="signed-by-unregistered-key"),
        pytest.param(lambda w: w.assertion("cw-cms", key=_with_kid(make_key("EC"), w.client_keys["cw-cms"].kid)),
                     id="unregistered-key-same-kid"),
        pytest.param(lambda w: w.assertion("cw-retired"), id="inactive-client"),
        pytest.param(lambda w: w.assertion("no-such-client", key=make_key("EC")), id="unknown-client"),
        pytest.param(lambda w: w.assertion("cw-cms", sub="mh-ehr"), id="iss-differs-from-sub"),
        pytest.param(lambda w: w.assertion("cw-cms", drop=("sub",)), id="no-sub"),
        pytest.param(lambda w: w.assertion("cw-cms", drop=("exp",)), id="no-exp"),
        pytest.param(lambda w: w.assertion("cw-cms", drop=("jti",)), id="no-jti"),
        pytest.param(lambda w: w.assertion("cw-cms", drop=("aud",)), id="no-aud"),
        pytest.param(lambda w: w.assertion("cw-cms", exp=now() - SKEW - 1), id="expired"),
        pytest.param(lambda w: w.assertion("cw-cms", exp=now() + 300 + SKEW + 60), id="exp-too-far-ahead"),
        pytest.param(lambda w: w.assertion("cw-cms", iat=now() + SKEW + 60), id="iat-in-future"),
        pytest.param(lambda w: w.assertion("cw-cms", nbf=now() + SKEW + 60), id="nbf-in-future"),
        pytest.param(lambda w: w.assertion("cw-cms", jti=""), id="empty-jti"),
        pytest.param(lambda w: w.assertion("cw-cms", jti=7), id="jti-not-a-string"),
        pytest.param(lambda w: _alg_none(w), id="alg-none"),
        pytest.param(lambda w: "not.a.jwt", id="garbage"),
    ]


def _with_kid(key, kid: str):
    from broker.auth.keys import BrokerKey

    return BrokerKey(jwk=key.jwk, kid=kid, alg=key.alg)


def _alg_none(w: World) -> str:
    import base64

    def enc(o: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(o).encode()).rstrip(b"=").decode()

    good = w.assertion("cw-cms").split(".")[1]
    return f"{enc({'alg': 'none'})}.{good}."


@pytest.mark.parametrize("build", _bad_assertions())
async def test_bad_assertion_is_invalid_client(world: World, build) -> None:
    assertion = build(world)
    resp = await post(world, world.form("cw-cms", assertion=assertion))
    assert_refused(resp, 401, "invalid_client")
    assert all(part not in resp.text for part in assertion.split(".") if len(part) > 8)


async def test_unknown_client_and_bad_signature_look_the_same(world: World) -> None:
    unknown = await post(world, world.form("cw-cms", assertion=world.assertion("nobody", key=make_key("EC"))))
    forged = await post(world, world.form("cw-cms", assertion=world.assertion("cw-cms", key=make_key("EC"))))
    retired = await post(world, world.form("cw-cms", assertion=world.assertion("cw-retired")))
    assert unknown.json() == forged.json() == retired.json()


async def test_audience_list_naming_the_token_endpoint_is_accepted(world: World) -> None:
    assertion = world.assertion("cw-cms", aud=["https://other.test", world.settings.token_endpoint])
    assert (await post(world, world.form("cw-cms", assertion=assertion))).status_code == 200


async def test_assertion_lifetime_at_the_limit_is_accepted(world: World) -> None:
    t = int(time.time())
    assertion = world.assertion("cw-cms", now=t, exp=t + world.settings.client_assertion_max_age_seconds)
    assert (await post(world, world.form("cw-cms", assertion=assertion))).status_code == 200


@pytest.mark.parametrize(("fields", "error"), [
    pytest.param({"staff_sub": "mh-clinician-1", "staff_role": "mental-health-clinician"}, "invalid_grant",
                 id="staff-of-another-agency"),
    pytest.param({"staff_sub": "mh-clinician-1", "staff_role": "cw-social-worker"}, "invalid_grant",
                 id="staff-of-another-agency-in-our-role"),
    pytest.param({"staff_role": "cw-supervisor"}, "invalid_grant", id="role-not-held-by-staff"),
    pytest.param({"staff_sub": "cw-worker-gone"}, "invalid_grant", id="inactive-staff"),
    pytest.param({"staff_sub": "nobody-here"}, "invalid_grant", id="unknown-staff"),
    pytest.param({"staff_sub": "cw-worker-odd", "staff_role": "mental-health-clinician"}, "unauthorized_client",
                 id="role-not-one-of-the-agencys"),
])
async def test_client_may_only_speak_for_its_own_staff_in_their_roles(
        world: World, fields: dict[str, str], error: str) -> None:
    resp = await post(world, world.form("cw-cms", **fields))
    assert_refused(resp, 400, error)


async def test_staff_refusals_do_not_reveal_which_agency_a_person_is_in(world: World) -> None:
    other = await post(world, world.form("cw-cms", staff_sub="mh-clinician-1",
                                         staff_role="mental-health-clinician"))
    missing = await post(world, world.form("cw-cms", staff_sub="nobody-here",
                                           staff_role="mental-health-clinician"))
    assert other.json() == missing.json()


@pytest.mark.parametrize("grant_type", ["password", "authorization_code", "urn:ietf:params:oauth:grant-type:jwt-bearer"])
async def test_unsupported_grant_type(world: World, grant_type: str) -> None:
    assert_refused(await post(world, world.form("cw-cms", grant_type=grant_type)), 400, "unsupported_grant_type")


@pytest.mark.parametrize("missing", ["grant_type", "client_assertion_type", "client_assertion", "staff_sub",
                                     "staff_role"])
async def test_missing_field_is_invalid_request(world: World, missing: str) -> None:
    form = world.form("cw-cms")
    del form[missing]
    assert_refused(await post(world, form), 400, "invalid_request")


@pytest.mark.parametrize(("fields", "error"), [
    pytest.param({"client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:saml2-bearer"},
                 "invalid_request", id="wrong-assertion-type"),
    pytest.param({"staff_role": "has spaces"}, "invalid_request", id="malformed-role"),
    pytest.param({"purpose_of_use": "TREAT; DROP"}, "invalid_request", id="malformed-purpose"),
    pytest.param({"scope": "ok bad\"quote"}, "invalid_scope", id="malformed-scope"),
    pytest.param({"client_secret": "s3cret"}, "invalid_request", id="second-auth-method"),
])
async def test_malformed_request_fields(world: World, fields: dict[str, str], error: str) -> None:
    assert_refused(await post(world, world.form("cw-cms", **fields)), 400, error)


async def test_client_id_must_match_the_assertion(world: World) -> None:
    assert_refused(await post(world, world.form("cw-cms", client_id="mh-ehr")), 401, "invalid_client")
    assert (await post(world, world.form("cw-cms", client_id="cw-cms"))).status_code == 200


async def test_repeated_parameter_is_invalid_request(world: World) -> None:
    form = world.form("cw-cms")
    body = "&".join(f"{k}={v}" for k, v in form.items()) + "&staff_sub=mh-clinician-1"
    resp = await post(world, content=body.encode(),
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_refused(resp, 400, "invalid_request")


async def test_json_body_is_invalid_request(world: World) -> None:
    async with world.http() as http:
        resp = await http.post("/oauth/token", json=world.form("cw-cms"))
    assert_refused(resp, 400, "invalid_request")


async def test_basic_auth_alongside_assertion_is_invalid_request(world: World) -> None:
    resp = await post(world, world.form("cw-cms"), headers={"Authorization": "Basic Y3ctY21zOng="})
    assert_refused(resp, 400, "invalid_request")


async def test_failed_request_still_spends_the_assertion(world: World) -> None:
    """A jti is consumed once the signature checks out, whatever else the request gets wrong."""
    assertion = world.assertion("cw-cms")
    assert_refused(await post(world, world.form("cw-cms", assertion=assertion, staff_sub="nobody-here")),
                   400, "invalid_grant")
    assert_refused(await post(world, world.form("cw-cms", assertion=assertion)), 401, "invalid_client")


async def test_jwks_endpoint_publishes_only_the_public_key(world: World) -> None:
    async with world.http() as http:
        resp = await http.get("/.well-known/jwks.json")
    assert resp.status_code == 200
    (jwk,) = resp.json()["keys"]
    assert jwk["kid"] == world.broker_key.kid and jwk["alg"] == "ES256"
    assert {"d", "p", "q"}.isdisjoint(jwk)
    assert jwk == world.broker_key.public_jwk()

