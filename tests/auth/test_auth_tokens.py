"""Access tokens: what the broker issues, and every forged or stale token it must refuse."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from joserfc import jws

from broker.auth.tokens import MAX_TTL_SECONDS, AuthError, TokenIssuer
from broker.domain import Principal

from .conftest import BROKER, IDP_AUDIENCE, IDP_ISSUER, SKEW, World, make_key, sign

SENTINEL_SUB = "sentinel-sub-8c1f"  # must never be echoed in an error


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def b64json(obj: Any) -> str:
    return b64(json.dumps(obj, separators=(",", ":")))


def claims(t: int | None = None, **over: Any) -> dict[str, Any]:
    """A complete, valid claim set; tests change one thing at a time."""
    t = int(time.time()) if t is None else t
    c: dict[str, Any] = {
        "iss": BROKER, "aud": "mdt-broker", "sub": SENTINEL_SUB, "iat": t, "nbf": t, "exp": t + 300,
        "jti": str(uuid.uuid4()), "agency": "cw", "role": "cw-social-worker", "client_id": "cw-cms",
        "scope": "fhir.read mdt.read", "purpose_of_use": "TREAT",
    }
    c.update(over)
    return c


def forge(w: World, c: dict[str, Any] | None = None, key=None, **header: Any) -> str:
    """Signed with the broker key (or ``key``), typ at+jwt, unless the header says otherwise."""
    header.setdefault("typ", "at+jwt")
    return sign(c if c is not None else claims(), key or w.broker_key, **header)


def unsigned(header: dict[str, Any], payload: dict[str, Any], signature: str = "") -> str:
    return f"{b64json(header)}.{b64json(payload)}.{signature}"


def hs256(secret: bytes, header: dict[str, Any], payload: dict[str, Any]) -> str:
    signing_input = f"{b64json(header)}.{b64json(payload)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def without(name: str) -> Callable[[World], str]:
    def build(w: World) -> str:
        c = claims()
        del c[name]
        return forge(w, c)
    return build


def _tampered(w: World) -> str:
    head, _payload, sig = forge(w).split(".")
    return f"{head}.{b64json(claims(role='cw-supervisor'))}.{sig}"


def _now() -> int:
    return int(time.time())


# Each entry is a token that must be refused with 401 invalid_token; each is otherwise valid,
# so removing the check it names lets it through.
ATTACKS: list[Any] = [
    pytest.param(lambda w: unsigned({"alg": "none", "typ": "at+jwt", "kid": w.broker_key.kid}, claims()),
                 id="alg-none"),
    pytest.param(lambda w: unsigned({"alg": "none", "typ": "at+jwt", "kid": w.broker_key.kid}, claims(),
                                    b64(b"sig")), id="alg-none-with-signature"),
    pytest.param(lambda w: unsigned({"alg": "None", "kid": w.broker_key.kid}, claims(), b64(b"x")),
                 id="alg-None-capitalised"),
    pytest.param(lambda w: hs256(w.broker_key.verification_key().as_pem(),
                                 {"alg": "HS256", "typ": "at+jwt", "kid": w.broker_key.kid}, claims()),
                 id="hs256-with-public-key-pem"),
    pytest.param(lambda w: hs256(json.dumps(w.broker_key.public_jwk()).encode(),
                                 {"alg": "HS256", "typ": "at+jwt", "kid": w.broker_key.kid}, claims()),
                 id="hs256-with-public-jwk"),
    pytest.param(lambda w: forge(w, key=make_key("RSA"), alg="RS256", kid=w.broker_key.kid),
                 id="rs256-header-on-es256-kid"),
    pytest.param(lambda w: forge(w, claims(exp=_now() - SKEW - 5, iat=_now() - 400, nbf=_now() - 400)),
                 id="expired"),
    pytest.param(lambda w: forge(w, claims(nbf=_now() + SKEW + 60)), id="nbf-in-future"),
    pytest.param(lambda w: forge(w, claims(iat=_now() + SKEW + 60, exp=_now() + SKEW + 300)),
                 id="iat-in-future"),
    pytest.param(lambda w: forge(w, claims(exp=_now() + MAX_TTL_SECONDS + 60)), id="lifetime-over-900s"),
    pytest.param(lambda w: forge(w, claims(iss="https://evil.test")), id="wrong-issuer"),
    pytest.param(lambda w: forge(w, claims(iss=BROKER + "/")), id="issuer-trailing-slash"),
    pytest.param(lambda w: forge(w, claims(iss=IDP_ISSUER)), id="broker-key-claiming-idp-issuer"),
    pytest.param(lambda w: forge(w, claims(aud="some-other-api")), id="wrong-audience"),
    pytest.param(lambda w: forge(w, claims(aud=["some-other-api", IDP_AUDIENCE])), id="audience-list-without-us"),
    pytest.param(lambda w: forge(w, claims(aud=[])), id="audience-empty-list"),
    pytest.param(lambda w: forge(w, kid="no-such-key"), id="unknown-kid"),
    pytest.param(lambda w: forge(w, kid=None), id="no-kid"),
    pytest.param(lambda w: forge(w, key=make_key("EC"), kid=w.broker_key.kid), id="other-key-same-kid"),
    pytest.param(lambda w: forge(w, typ="JWT"), id="typ-not-at+jwt"),
    pytest.param(lambda w: forge(w, typ=None), id="typ-missing"),
    pytest.param(_tampered, id="payload-tampered"),
    pytest.param(lambda w: forge(w, crit=["kid"]), id="crit-header"),
    *[pytest.param(without(name), id=f"missing-{name}")
      for name in ("sub", "agency", "role", "client_id", "jti", "exp", "iat", "iss", "aud", "scope")],
    pytest.param(lambda w: forge(w, claims(sub="")), id="empty-sub"),
    pytest.param(lambda w: forge(w, claims(role=["cw-social-worker"])), id="role-not-a-string"),
    pytest.param(lambda w: forge(w, claims(exp=True)), id="exp-boolean"),
    pytest.param(lambda w: forge(w, claims(exp="9999999999")), id="exp-string"),
    pytest.param(lambda w: forge(w, claims(exp=1e300)), id="exp-huge"),
    pytest.param(lambda w: forge(w, claims(scope=["fhir.read"])), id="scope-not-a-string"),
    pytest.param(lambda w: forge(w, claims(purpose_of_use=7)), id="purpose-not-a-string"),
]

GARBAGE = [
    "", "x", "a.b.c", "..", "...", "a.b.c.d", "Bearer abc", "€.€.€", " " * 20, "e30.e30.e30",
    f"{b64('[]')}.{b64json(claims())}.{b64(b'x')}",
    f"{b64json({'alg': ['ES256']})}.{b64json(claims())}.{b64(b'x')}",
    f"{b64json({'alg': 'ES256', 'kid': 5})}.{b64json(claims())}.{b64(b'x')}",
    f"{b64(b'{not json')}.{b64json(claims())}.{b64(b'x')}",
    f"{b64json({'alg': 'ES256'})}.{b64(b'NaN')}.{b64(b'x')}",
    f"{b64json({'alg': 'ES256'})}.{b64(bytes([0xff, 0xfe]))}.{b64(b'x')}",
    "eyJhbGciOiJFUzI1NiJ9.eyJ+fQ.c2ln",  # characters outside base64url
    "a" * 50_000,
]


@pytest.fixture
def valid_token(world: World) -> str:
    return forge(world)


def test_forged_baseline_is_accepted(world: World, valid_token: str) -> None:
    """The attack table is meaningful only if the unmodified forgery passes."""
    p = world.verifier.verify(valid_token)
    assert (p.sub, p.agency, p.role, p.client_id, p.purpose) == (
        SENTINEL_SUB, "cw", "cw-social-worker", "cw-cms", "TREAT")
    assert p.scopes == frozenset({"fhir.read", "mdt.read"})


@pytest.mark.parametrize("build", ATTACKS)
async def test_attack_token_is_refused(world: World, build: Callable[[World], str]) -> None:
    token = build(world)
    with pytest.raises(AuthError) as info:
        world.verifier.verify(token)
    assert info.value.error == "invalid_token"
    assert SENTINEL_SUB not in str(info.value)
    async with world.http() as http:
        resp = await http.get("/whoami", headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 401
    assert resp.json()["error"] == "invalid_token"
    assert 'error="invalid_token"' in resp.headers["www-authenticate"]
    assert SENTINEL_SUB not in resp.text
    assert all(part not in resp.text for part in token.split(".") if len(part) > 8)


# Ids by position: some tokens embed the current time, and xdist workers must collect the same ids.
@pytest.mark.parametrize("token", [*GARBAGE, None, 42, b"a.b.c", ["a", "b", "c"]],
                         ids=[f"garbage-{i}" for i in range(len(GARBAGE) + 4)])
def test_garbage_is_only_ever_an_auth_error(world: World, token: Any) -> None:
    with pytest.raises(AuthError) as info:
        world.verifier.verify(token)
    assert info.value.error == "invalid_token"
    assert info.value.status_code == 401


@pytest.mark.parametrize("token", GARBAGE, ids=[f"garbage-{i}" for i in range(len(GARBAGE))])
async def test_garbage_over_http_is_401(world: World, token: str) -> None:
    async with world.http() as http:
        resp = await http.get("/whoami", headers={"Authorization": f"Bearer {token}".encode()})
    assert resp.status_code == 401
    assert resp.json()["error"] == "invalid_token"


def test_clock_skew_is_honoured_both_ways(world: World) -> None:
    t = _now()
    just_expired = forge(world, claims(t - 300, exp=t - SKEW + 10))
    early = forge(world, claims(t, nbf=t + SKEW - 10))
    assert world.verifier.verify(just_expired).sub == SENTINEL_SUB
    assert world.verifier.verify(early).sub == SENTINEL_SUB
    with pytest.raises(AuthError):
        world.verifier.verify(just_expired, now=datetime.fromtimestamp(t + 20, timezone.utc))
    with pytest.raises(AuthError):
        world.verifier.verify(early, now=datetime.fromtimestamp(t - 20, timezone.utc))


def test_audience_list_containing_ours_is_accepted(world: World) -> None:
    token = forge(world, claims(aud=["other", "mdt-broker"]))
    assert world.verifier.verify(token).agency == "cw"


def test_expiry_and_not_yet_valid_are_told_apart_without_contents(world: World) -> None:
    t = _now()
    with pytest.raises(AuthError) as expired:
        world.verifier.verify(forge(world, claims(t - 1000, exp=t - 600)))
    with pytest.raises(AuthError) as early:
        world.verifier.verify(forge(world, claims(t, nbf=t + 600)))
    assert "expired" in expired.value.description
    assert "not yet valid" in early.value.description


def test_issued_token_carries_the_documented_claims(world: World) -> None:
    now = datetime.now(timezone.utc)
    token, expires_in = world.issuer.issue(sub="cw-worker-1", agency="cw", role="cw-social-worker",
                                           client_id="cw-cms", scopes=frozenset({"b", "a"}),
                                           purpose="COC", now=now)
    header = jws.extract_compact(token.encode()).headers()
    body = json.loads(jws.extract_compact(token.encode()).payload)
    assert header == {"alg": "ES256", "kid": world.broker_key.kid, "typ": "at+jwt"}
    assert body["iss"] == BROKER and body["aud"] == "mdt-broker"
    assert body["exp"] - body["iat"] == expires_in == 600
    assert body["nbf"] == body["iat"] == int(now.timestamp())
    assert body["scope"] == "a b" and body["purpose_of_use"] == "COC"
    uuid.UUID(body["jti"])
    assert world.verifier.verify(token) == Principal(
        sub="cw-worker-1", agency="cw", role="cw-social-worker", client_id="cw-cms",
        scopes=frozenset({"a", "b"}), token_id=body["jti"], purpose="COC")


def test_issued_tokens_have_unique_ids_and_no_purpose_unless_given(world: World) -> None:
    now = datetime.now(timezone.utc)
    kwargs = dict(sub="cw-worker-1", agency="cw", role="cw-social-worker", client_id="cw-cms",
                  scopes=frozenset(), purpose=None, now=now)
    a, _ = world.issuer.issue(**kwargs)
    b, _ = world.issuer.issue(**kwargs)
    pa, pb = world.verifier.verify(a), world.verifier.verify(b)
    assert pa.token_id != pb.token_id
    assert pa.purpose is None and pa.scopes == frozenset()
    assert "purpose_of_use" not in json.loads(jws.extract_compact(a.encode()).payload)


def test_issuer_never_exceeds_fifteen_minutes(world: World) -> None:
    """Even if validation were bypassed, the issuer clamps the lifetime."""
    loose = world.settings.model_copy(update={"access_token_ttl_seconds": 3600})
    token, expires_in = TokenIssuer(loose, world.broker_key).issue(
        sub="cw-worker-1", agency="cw", role="cw-social-worker", client_id="cw-cms",
        scopes=frozenset(), purpose=None, now=datetime.now(timezone.utc))
    body = json.loads(jws.extract_compact(token.encode()).payload)
    assert expires_in == MAX_TTL_SECONDS == body["exp"] - body["iat"]


def test_issued_token_expires(world: World) -> None:
    issued_at = datetime.now(timezone.utc)
    token, ttl = world.issuer.issue(sub="cw-worker-1", agency="cw", role="cw-social-worker",
                                    client_id="cw-cms", scopes=frozenset(), purpose=None, now=issued_at)
    assert world.verifier.verify(token, now=issued_at + timedelta(seconds=ttl)).sub == "cw-worker-1"
    with pytest.raises(AuthError):
        world.verifier.verify(token, now=issued_at + timedelta(seconds=ttl + SKEW))


def test_issuer_refuses_naive_time_and_empty_identity(world: World) -> None:
    base = dict(sub="cw-worker-1", agency="cw", role="cw-social-worker", client_id="cw-cms",
                scopes=frozenset(), purpose=None)
    with pytest.raises(ValueError):
        world.issuer.issue(**{**base, "now": datetime.now()})
    with pytest.raises(ValueError):
        world.issuer.issue(**{**base, "agency": "", "now": datetime.now(timezone.utc)})


def test_rsa_broker_key_round_trips(world: World) -> None:
    from broker.auth.tokens import TokenVerifier

    key = make_key("RSA")
    token, _ = TokenIssuer(world.settings, key).issue(
        sub="s", agency="cw", role="cw-social-worker", client_id="cw-cms", scopes=frozenset(),
        purpose=None, now=datetime.now(timezone.utc))
    assert TokenVerifier(world.settings, key).verify(token).sub == "s"
    with pytest.raises(AuthError):  # a different broker instance's key is not ours
        world.verifier.verify(token)


def test_auth_error_rejects_unknown_codes() -> None:
    with pytest.raises(ValueError):
        AuthError("made_up", "x")
    assert AuthError("insufficient_scope", "x").status_code == 403


@pytest.mark.parametrize("alg", ["none", "None", "HS256", "HS512", "RS512", "PS256", "ES384", "EdDSA"])
def test_both_layers_refuse_algorithms_other_than_rs256_and_es256(world: World, alg: str) -> None:
    """The header check and the signature check each refuse on their own (defence in depth)."""
    from broker.auth import _jose

    token = unsigned({"alg": alg, "kid": world.broker_key.kid, "typ": "at+jwt"}, claims(), b64(b"sig"))
    with pytest.raises(_jose.JoseInputError) as info:
        _jose.parse_compact(token)
    assert info.value.reason == "algorithm_not_allowed"
    header = {"alg": alg, "kid": world.broker_key.kid}
    forged = _jose.UnverifiedJws(token=token, header=header, claims=claims())
    assert not _jose.signature_valid(forged, world.broker_key.verification_key())


# --- The verified-token cache: header and signature checked once per token, claims every time ---


@pytest.fixture
def signature_checks(monkeypatch) -> list[str]:
    """Every signature check the verifier makes, by token."""
    from broker.auth import _jose

    seen: list[str] = []
    real = _jose.signature_valid

    def counting(jws_value, key):  # type: ignore[no-untyped-def]
        seen.append(jws_value.token)
        return real(jws_value, key)

    monkeypatch.setattr(_jose, "signature_valid", counting)
    return seen


def test_a_token_sent_again_is_not_signature_checked_again(world: World, signature_checks: list[str]) -> None:
    token = forge(world)
    for _ in range(3):
        assert world.verifier.verify(token).sub == SENTINEL_SUB
    assert signature_checks == [token]
    head, payload, signature = token.split(".")
    other = f"{head}.{payload}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}"
    with pytest.raises(AuthError):  # the same claims under another signature are a new token
        world.verifier.verify(other)
    assert signature_checks == [token, other]
    assert all(len(k) == 32 for k in world.verifier._verified)  # sha256 digests: no token is kept
    assert token.encode() not in world.verifier._verified


def test_a_remembered_token_still_expires_and_still_must_be_valid_yet(world: World) -> None:
    t = _now()
    token = forge(world, claims(t, exp=t + 60))
    assert world.verifier.verify(token).sub == SENTINEL_SUB
    with pytest.raises(AuthError) as late:
        world.verifier.verify(token, now=datetime.fromtimestamp(t + 60 + SKEW, timezone.utc))
    assert "expired" in late.value.description
    with pytest.raises(AuthError):
        world.verifier.verify(token, now=datetime.fromtimestamp(t - SKEW - 60, timezone.utc))  # before iat/nbf


def test_a_refused_token_is_not_remembered(world: World, signature_checks: list[str]) -> None:
    token = forge(world, claims(iss="https://elsewhere.example"))
    for _ in range(2):
        with pytest.raises(AuthError):
            world.verifier.verify(token)
    assert signature_checks == [token, token]


def test_the_cache_is_bounded(world: World, monkeypatch) -> None:
    from broker.auth import tokens

    monkeypatch.setattr(tokens, "VERIFIED_CACHE_SIZE", 2)
    first, *rest = [forge(world) for _ in range(3)]
    for token in (first, *rest):
        world.verifier.verify(token)
    assert len(world.verifier._verified) == 2
    assert hashlib.sha256(first.encode()).digest() not in world.verifier._verified  # the oldest went first
