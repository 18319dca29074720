"""Tokens from the county IdP: verified against its JWKS, fetched over loopback HTTP here."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from broker.auth.keys import BrokerKey
from broker.auth.tokens import AuthError, ExternalJwks, TokenVerifier

from .conftest import BROKER, IDP_AUDIENCE, IDP_ISSUER, JwksServer, World, make_key, sign


class FakeClock:
    """Monotonic time the test moves by hand, to exercise the refetch limit without sleeping."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def idp_claims(**over: Any) -> dict[str, Any]:
    t = int(time.time())
    c = {"iss": IDP_ISSUER, "aud": IDP_AUDIENCE, "sub": "cw-worker-1", "iat": t, "exp": t + 300,
         "jti": str(uuid.uuid4()), "azp": "county-portal", "agency": "cw", "role": "cw-social-worker",
         "scope": "openid fhir.read"}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(autouse=True)
def _idp_publishes_its_key(jwks_server: JwksServer, idp_key: BrokerKey):
    """Tests below change what the IdP serves; every test starts and ends with the real key."""
    jwks_server.jwks = idp_key.public_jwks()
    yield
    jwks_server.jwks = idp_key.public_jwks()


@pytest.fixture
def verifier(world: World, jwks_server: JwksServer, clock: FakeClock):
    """A verifier with its own JWKS cache, so request counts belong to this test alone."""
    external = ExternalJwks(jwks_server.url, clock=clock)
    return TokenVerifier(world.settings, world.broker_key, external), external


def test_idp_token_verifies_against_fetched_jwks(verifier, idp_key: BrokerKey) -> None:
    v, external = verifier
    p = v.verify(sign(idp_claims(), idp_key, typ="JWT"))
    assert (p.sub, p.agency, p.role, p.client_id) == ("cw-worker-1", "cw", "cw-social-worker", "county-portal")
    assert p.scopes == frozenset({"openid", "fhir.read"})
    assert external.fetches == 1
    v.verify(sign(idp_claims(), idp_key))
    assert external.fetches == 1  # cached


async def test_idp_token_verifies_through_averify(verifier, idp_key: BrokerKey) -> None:
    v, external = verifier
    p = await v.averify(sign(idp_claims(client_id="cms-2", azp=None), idp_key))
    assert p.client_id == "cms-2"
    assert external.fetches == 1


@pytest.mark.parametrize("build", [
    pytest.param(lambda k: sign(idp_claims(), make_key("RSA"), kid=k.kid), id="other-key-same-kid"),
    pytest.param(lambda k: sign(idp_claims(), make_key("EC")), id="other-key-unknown-kid"),
    pytest.param(lambda k: sign(idp_claims(agency=None), k), id="no-agency"),
    pytest.param(lambda k: sign(idp_claims(role=None), k), id="no-role"),
    pytest.param(lambda k: sign(idp_claims(azp=None), k), id="no-client"),
    pytest.param(lambda k: sign(idp_claims(sub=None), k), id="no-sub"),
    pytest.param(lambda k: sign(idp_claims(aud="mdt-broker"), k), id="broker-audience-not-idp-audience"),
    pytest.param(lambda k: sign(idp_claims(aud="account"), k), id="wrong-audience"),
    pytest.param(lambda k: sign(idp_claims(iss=BROKER, aud="mdt-broker", client_id="x", typ=None), k,
                                typ="at+jwt"), id="idp-key-minting-broker-tokens"),
    pytest.param(lambda k: sign(idp_claims(iss="https://other-idp.test"), k), id="wrong-issuer"),
    pytest.param(lambda k: sign(idp_claims(exp=int(time.time()) - 120), k), id="expired"),
    pytest.param(lambda k: sign(idp_claims(), k, typ="dpop+jwt"), id="foreign-typ"),
])
def test_bad_idp_tokens_are_refused(verifier, idp_key: BrokerKey, build) -> None:
    v, _ = verifier
    with pytest.raises(AuthError) as info:
        v.verify(build(idp_key))
    assert info.value.error == "invalid_token"


def test_broker_key_cannot_mint_idp_tokens(verifier, world: World) -> None:
    v, _ = verifier
    with pytest.raises(AuthError):
        v.verify(sign(idp_claims(), world.broker_key, typ="at+jwt"))


def test_unknown_kid_refetches_at_most_once_a_minute(verifier, jwks_server: JwksServer,
                                                     idp_key: BrokerKey, clock: FakeClock) -> None:
    v, external = verifier
    v.verify(sign(idp_claims(), idp_key))
    rotated = make_key("EC")
    jwks_server.jwks = {"keys": [idp_key.public_jwk(), rotated.public_jwk()]}
    before = jwks_server.requests

    clock.t += 10  # within a minute of the last fetch: no new fetch, the new key is unknown
    for _ in range(5):
        with pytest.raises(AuthError):
            v.verify(sign(idp_claims(), rotated))
        with pytest.raises(AuthError):
            v.verify(sign(idp_claims(), make_key("EC")))  # made-up kids
    assert jwks_server.requests == before

    clock.t += 60  # a minute later an unknown kid may trigger one refetch
    assert v.verify(sign(idp_claims(), rotated)).agency == "cw"
    assert jwks_server.requests == before + 1
    with pytest.raises(AuthError):
        v.verify(sign(idp_claims(), make_key("EC")))
    assert jwks_server.requests == before + 1


async def test_averify_keeps_the_event_loop_responsive_during_a_slow_fetch(
        jwks_server: JwksServer, world: World, idp_key: BrokerKey) -> None:
    external = ExternalJwks(jwks_server.url)
    v = TokenVerifier(world.settings, world.broker_key, external)
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        for _ in range(16):
            await asyncio.sleep(0.05)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async def verify_soon() -> Any:
        await asyncio.sleep(0.1)  # the ticker is running by then
        return await v.averify(sign(idp_claims(), idp_key))

    jwks_server.delay = 0.6
    try:
        _, p1, p2 = await asyncio.gather(ticker(), verify_soon(), verify_soon())
    finally:
        jwks_server.delay = 0.0
    assert p1.agency == p2.agency == "cw"
    assert external.fetches == 1  # the second waiter reused the first fetch
    assert max(gaps) < 0.3


def test_keys_dropped_by_the_idp_stop_working_after_max_age(jwks_server: JwksServer, world: World,
                                                            idp_key: BrokerKey, clock: FakeClock) -> None:
    external = ExternalJwks(jwks_server.url, clock=clock, max_age=600)
    v = TokenVerifier(world.settings, world.broker_key, external)
    token = sign(idp_claims(), idp_key)
    v.verify(token)
    jwks_server.jwks = make_key("EC").public_jwks()  # the IdP retired its key
    clock.t += 601
    with pytest.raises(AuthError):
        v.verify(token)


def test_unreachable_idp_is_an_auth_error(world: World, idp_key: BrokerKey) -> None:
    from tests.support.ports import free_port

    external = ExternalJwks(f"http://127.0.0.1:{free_port()}/jwks.json", timeout=2)
    v = TokenVerifier(world.settings, world.broker_key, external)
    with pytest.raises(AuthError):
        v.verify(sign(idp_claims(), idp_key))


def test_jwks_with_unusable_keys_is_ignored(jwks_server: JwksServer, world: World, clock: FakeClock) -> None:
    weak = make_key("EC")
    jwks_server.jwks = {"keys": [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        {**weak.public_jwk(), "use": "enc"},
        {"kty": "RSA", "kid": "broken", "n": "AQAB", "e": "AQAB"},
    ]}
    external = ExternalJwks(jwks_server.url, clock=clock)
    assert external.get_key("hmac") is None
    assert external.get_key(weak.kid) is None
    assert external.get_key("broken") is None


@pytest.mark.parametrize("url", ["http://idp.county.test/jwks", "ftp://127.0.0.1/jwks", "file:///etc/jwks"])
def test_jwks_must_come_over_https(url: str) -> None:
    with pytest.raises(ValueError):
        ExternalJwks(url)


def test_verifier_builds_its_jwks_client_from_settings(world: World, idp_key: BrokerKey) -> None:
    assert world.verifier.verify(sign(idp_claims(), idp_key)).client_id == "county-portal"


def test_idp_tokens_are_signature_checked_every_time(verifier, idp_key: BrokerKey, monkeypatch) -> None:
    """The IdP's keys can rotate: only the broker's own tokens are remembered."""
    from broker.auth import _jose

    v, _external = verifier
    checks = []
    real = _jose.signature_valid
    monkeypatch.setattr(_jose, "signature_valid", lambda t, k: checks.append(t.token) or real(t, k))
    token = sign(idp_claims(), idp_key, typ="JWT")
    v.verify(token)
    v.verify(token)
    assert checks == [token, token]
    assert not v._verified
