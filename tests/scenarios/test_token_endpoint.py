"""An agency system may speak only for its own agency's staff, in roles they hold."""

from __future__ import annotations

import pytest

from tests.scenarios.harness import PERSONAS


@pytest.mark.parametrize(("agency", "alias", "role"), [
    ("probation", "cw", "child-welfare-worker"),    # another agency's staff member
    ("probation", "po", "child-welfare-worker"),    # own staff, a role the agency does not hold
    ("bh", "mh", "substance-use-counselor"),        # own staff, a role this person does not hold
    ("da", "depatty", "dependency-attorney"),       # the DA's system speaking for defence counsel
])
async def test_no_token_for_staff_or_roles_outside_the_clients_agency(broker, agency, alias, role):
    r = await broker.request_token(agency=agency, sub=PERSONAS[alias].sub, role=role)
    assert r.status_code in (400, 401)
    assert "access_token" not in r.json()
    assert r.json()["error"] in ("invalid_grant", "unauthorized_client", "invalid_request")
    assert r.headers["cache-control"] == "no-store"


async def test_token_lifetime_and_claims(broker):
    p = PERSONAS["po"]
    r = await broker.request_token(agency=p.agency, sub=p.sub, role=p.role)
    body = r.json()
    assert r.status_code == 200 and body["token_type"] == "Bearer" and 0 < body["expires_in"] <= 900
    principal = broker.runtime.verifier.verify(body["access_token"])
    assert (principal.sub, principal.agency, principal.role, principal.client_id) == \
        (p.sub, "probation", "probation-officer", "probation-system")


async def test_a_replayed_client_assertion_is_refused(broker):
    p = PERSONAS["po"]
    assertion = broker.assertion(p.agency)
    form = {"grant_type": "client_credentials",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion, "staff_sub": p.sub, "staff_role": p.role}
    assert (await broker.client.post("/oauth/token", data=form)).status_code == 200
    again = await broker.client.post("/oauth/token", data=form)
    assert again.status_code == 401 and again.json()["error"] == "invalid_client"


async def test_an_unknown_purpose_is_refused_at_the_token_endpoint(broker):
    p = PERSONAS["po"]
    r = await broker.request_token(agency=p.agency, sub=p.sub, role=p.role, purpose_of_use="MARKETING")
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    r = await broker.request_token(agency=p.agency, sub=p.sub, role=p.role, purpose_of_use="COC")
    assert r.status_code == 200
