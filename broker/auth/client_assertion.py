"""RFC 7523 ``private_key_jwt`` client authentication for ``POST /oauth/token``.

An agency system proves who it is by signing a short-lived JWT with a key whose public half
is registered for it (``OAuthClient.jwks``). The header is read only to learn the algorithm
and key id; the client is found by ``iss``/``sub``; nothing else is believed until the
signature verifies. Each assertion is usable once: its ``jti`` is recorded in
``used_assertions`` until it expires, and the primary key decides any race between two
concurrent uses (an IntegrityError means replay), on SQLite and PostgreSQL alike.

Every failure is ``AuthError("invalid_client")`` with a fixed ``reason`` code for the audit
record. Until the signature verifies the description is the same for every cause; the token
endpoint answers every ``invalid_client`` with one fixed description anyway, so callers learn
nothing about which check failed. Once the signature has verified, the error names the client
(``client_id``), so that a replayed or stale assertion is audited against the client it came from.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from datetime import datetime, timezone

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from broker.auth import _jose
from broker.auth.tokens import AuthError
from broker.settings import Settings
from broker.store.models import OAuthClient, UsedAssertion

__all__ = ["CLIENT_ASSERTION_TYPE", "purge_used_assertions", "replay_key", "verify_client_assertion"]

log = logging.getLogger(__name__)

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
PURGE_INTERVAL_SECONDS = 60.0
MAX_JTI_CHARS = 255

_FAILED = "Client authentication failed"

_purge_lock = threading.Lock()
_last_purge: float = float("-inf")


def _fail(reason: str, description: str = _FAILED, *, client_id: str | None = None) -> AuthError:
    log.info("client assertion rejected", extra={"reason": reason})
    return AuthError("invalid_client", description, reason=reason, client_id=client_id)


def replay_key(client_id: str, jti: str) -> str:
    """The ``used_assertions.jti`` value: per-client (one client cannot burn another's ids) and fixed-length."""
    return hashlib.sha256(f"{client_id}\n{jti}".encode()).hexdigest()


def verify_client_assertion(session: Session, assertion: str, *, settings: Settings, now: datetime) -> OAuthClient:
    """Authenticate the client and consume the assertion; commits ``session`` so the jti is spent."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    now = now.astimezone(timezone.utc)
    try:
        parsed = _jose.parse_compact(assertion)
    except _jose.JoseInputError as exc:
        raise _fail(exc.reason) from None
    claims = parsed.claims
    iss, sub = claims.get("iss"), claims.get("sub")
    if not isinstance(iss, str) or not iss or len(iss) > 128 or iss != sub:
        raise _fail("iss_sub")
    client = session.get(OAuthClient, iss)
    if client is None or not client.active:
        raise _fail("unknown_or_inactive_client")
    keys = _jose.candidate_keys(_jose.public_keys_from_jwks(client.jwks), parsed)
    if not any(_jose.signature_valid(parsed, key) for key in keys):
        raise _fail("bad_signature")

    # From here on the assertion is known to be signed with the client's key (it may be a replay).
    signed_by = client.client_id
    exp = _check_times(claims, settings=settings, now=now, client_id=signed_by)
    if not _jose.audience_matches(claims.get("aud"), settings.token_endpoint):
        raise _fail("wrong_audience", "The client assertion audience must be the token endpoint", client_id=signed_by)
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_CHARS:
        raise _fail("missing_jti", "The client assertion needs a jti", client_id=signed_by)
    _consume(session, client.client_id, jti, exp)
    _maybe_purge(session, settings=settings, now=now)
    return client


def _check_times(claims: dict, *, settings: Settings, now: datetime, client_id: str) -> float:
    t, skew = now.timestamp(), settings.clock_skew_seconds
    exp = _jose.numeric_date(claims.get("exp"))
    if exp is None:
        raise _fail("missing_exp", "The client assertion needs an exp", client_id=client_id)
    if t >= exp + skew:
        raise _fail("expired", "The client assertion has expired", client_id=client_id)
    if exp > t + settings.client_assertion_max_age_seconds + skew:
        raise _fail("exp_too_far", "The client assertion lifetime is too long", client_id=client_id)
    for name in ("iat", "nbf"):
        if name in claims:
            value = _jose.numeric_date(claims[name])
            if value is None:
                raise _fail(f"bad_{name}", f"The client assertion {name} is not a NumericDate", client_id=client_id)
            if value > t + skew:
                raise _fail(f"future_{name}", "The client assertion is not yet valid", client_id=client_id)
    return exp


def _consume(session: Session, client_id: str, jti: str, exp: float) -> None:
    """Record the jti durably before the client is trusted; the primary key settles races."""
    session.add(UsedAssertion(
        jti=replay_key(client_id, jti),
        client_id=client_id,
        expires_at=datetime.fromtimestamp(exp, tz=timezone.utc),
    ))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise _fail("replayed", "The client assertion has already been used", client_id=client_id) from None


def purge_used_assertions(session: Session, *, settings: Settings, now: datetime) -> int:
    """Delete replay records no assertion could still match (expired beyond the skew); commits."""
    cutoff = now.astimezone(timezone.utc).timestamp() - settings.clock_skew_seconds - 1
    result = session.execute(
        delete(UsedAssertion).where(UsedAssertion.expires_at < datetime.fromtimestamp(cutoff, tz=timezone.utc))
    )
    session.commit()
    return int(result.rowcount or 0)


def _maybe_purge(session: Session, *, settings: Settings, now: datetime) -> None:
    """Purge at most once a minute per process; a failed purge never fails a token request."""
    global _last_purge
    with _purge_lock:
        if time.monotonic() - _last_purge < PURGE_INTERVAL_SECONDS:
            return
        _last_purge = time.monotonic()
    try:
        purge_used_assertions(session, settings=settings, now=now)
    except SQLAlchemyError as exc:
        session.rollback()
        log.warning("used assertion purge failed", extra={"error_type": type(exc).__name__})
