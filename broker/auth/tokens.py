"""Access tokens: the broker issues short-lived JWTs and verifies them (or an external IdP's).

Pipeline step 1 (authenticate). Tokens are RFC 9068 JWT access tokens signed with the
broker's key (ES256 or RS256). Verification accepts only RS256/ES256, picks the key by
``kid`` from keys it already trusts (never from the token), then checks the signature
before it believes a single claim. Every failure is an :class:`AuthError` whose
description is one of a few fixed sentences: no token content or claim value ever appears
in an error or a log line.

Concurrency: ``TokenIssuer`` and ``TokenVerifier`` are immutable after construction and
safe to share across threads and tasks; ``ExternalJwks`` guards its cache with a lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from broker.auth import _jose
from broker.auth.keys import BrokerKey
from broker.domain import Principal
from broker.settings import Settings

__all__ = ["ACCESS_TOKEN_TYPE", "MAX_TTL_SECONDS", "AuthError", "ExternalJwks", "TokenIssuer",
           "TokenVerifier"]

log = logging.getLogger(__name__)

MAX_TTL_SECONDS: Final = 900
ACCESS_TOKEN_TYPE: Final = "at+jwt"  # RFC 9068 section 2.1
_EXTERNAL_TYPES = frozenset({None, "jwt", "at+jwt", "application/jwt", "application/at+jwt"})

# Fixed, content-free descriptions (RFC 6750 section 3: error_description is for developers).
_MALFORMED = "The access token is malformed"
_BAD_KEY = "The access token signature could not be verified"
_EXPIRED = "The access token has expired"
_NOT_YET = "The access token is not yet valid"
_WRONG_PARTY = "The access token was not issued for this service"
_MISSING = "The access token lacks required claims"
_INVALID = "The access token is invalid"


class AuthError(Exception):
    """An authentication failure carrying an OAuth error code (RFC 6750 §3.1 / RFC 6749 §5.2)."""

    STATUS: Final = {
        "invalid_request": 400,
        "invalid_token": 401,
        "insufficient_scope": 403,
        "invalid_client": 401,
        "invalid_grant": 400,
        "unauthorized_client": 400,
        "unsupported_grant_type": 400,
        "invalid_scope": 400,
    }

    def __init__(self, error: str = "invalid_token", description: str = _INVALID, *, reason: str | None = None,
                 client_id: str | None = None) -> None:
        if error not in self.STATUS:
            raise ValueError(f"unknown OAuth error code {error!r}")
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.reason = reason
        """A fixed code naming the check that failed: for the audit record, never for the caller."""
        self.client_id = client_id
        """Set once a client assertion's signature has verified with that client's key."""

    @property
    def status_code(self) -> int:
        """The HTTP status this error is answered with."""
        return self.STATUS[self.error]

    def www_authenticate(self, realm: str = "mdt-broker") -> str:
        """The ``WWW-Authenticate`` challenge for a 401/403 on a protected resource."""
        return f'Bearer realm="{realm}", error="{self.error}", error_description="{self.description}"'


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(timezone.utc)


class TokenIssuer:
    """Signs access tokens for one staff member, as requested through one agency system."""

    def __init__(self, settings: Settings, key: BrokerKey) -> None:
        self._settings = settings
        self._key = key
        self._ttl = min(int(settings.access_token_ttl_seconds), MAX_TTL_SECONDS)

    @property
    def ttl_seconds(self) -> int:
        """Lifetime of every token issued; never over 15 minutes."""
        return self._ttl

    def issue(
        self,
        *,
        sub: str,
        agency: str,
        role: str,
        client_id: str,
        scopes: frozenset[str],
        purpose: str | None,
        now: datetime,
    ) -> tuple[str, int]:
        """Return ``(jwt, expires_in)``; the caller has already checked who may have it."""
        for name, value in (("sub", sub), ("agency", agency), ("role", role), ("client_id", client_id)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string")
        iat = int(_utc(now).timestamp())
        claims: dict[str, Any] = {
            "iss": self._settings.issuer,
            "aud": self._settings.audience,
            "sub": sub,
            "iat": iat,
            "nbf": iat,
            "exp": iat + self._ttl,
            "jti": str(uuid.uuid4()),
            "agency": agency,
            "role": role,
            "client_id": client_id,
            "scope": " ".join(sorted(scopes)),
        }
        if purpose:
            claims["purpose_of_use"] = purpose
        header = {"alg": self._key.alg, "kid": self._key.kid, "typ": ACCESS_TOKEN_TYPE}
        token = jwt.encode(header, claims, self._key.jwk, algorithms=[self._key.alg])
        return token, self._ttl


class ExternalJwks:
    """The county IdP's signing keys, fetched over HTTPS, cached, refetched sparingly.

    An unknown ``kid`` (key rotation) triggers a refetch, but at most one fetch starts per
    ``min_refresh_interval`` seconds, so a flood of tokens with made-up kids cannot turn the
    broker into a load generator against the IdP. Keys older than ``max_age`` are refreshed on
    next use; if that fetch fails the cached keys stay in use. Thread-safe.
    """

    def __init__(
        self,
        url: str,
        *,
        min_refresh_interval: float = 60.0,
        max_age: float = 3600.0,
        timeout: float = 5.0,
        max_bytes: int = 256_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        parts = urlsplit(url)
        loopback = parts.hostname in {"127.0.0.1", "localhost", "::1"}
        if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
            raise ValueError("external_jwks_url must be https (plain http only on loopback)")
        self.url = url
        self._min_interval = min_refresh_interval
        self._max_age = max_age
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._clock = clock
        self._state = threading.Lock()  # held only for dictionary reads and swaps, never during I/O
        self._fetching = threading.Lock()  # serialises fetches; waiting on it never holds _state
        self._keys: dict[str, ECKey | RSAKey] = {}
        self._fetched_at: float | None = None
        self._last_attempt: float | None = None
        self._in_flight = False
        self.fetches = 0
        """Number of fetches started (for tests and metrics)."""

    def _wants_fetch_locked(self, kid: str) -> bool:
        missing_or_stale = kid not in self._keys or self._fetched_at is None or (
            self._clock() - self._fetched_at >= self._max_age)
        may_fetch = self._last_attempt is None or self._clock() - self._last_attempt >= self._min_interval
        return missing_or_stale and may_fetch

    def _should_wait_locked(self, kid: str) -> bool:
        # a fetch is due, or one is under way that may bring this kid
        return self._wants_fetch_locked(kid) or (self._in_flight and kid not in self._keys)

    def needs_fetch(self, kid: str) -> bool:
        """True when ``get_key(kid)`` would fetch or wait for a fetch; async callers then use a thread."""
        with self._state:
            return self._should_wait_locked(kid)

    def get_key(self, kid: str, *, allow_fetch: bool = True) -> ECKey | RSAKey | None:
        """The verification key named ``kid``, fetching the JWKS first if needed and allowed."""
        with self._state:
            if not (allow_fetch and self._should_wait_locked(kid)):
                return self._keys.get(kid)
        with self._fetching:
            with self._state:  # another thread may have fetched while we waited
                if not self._wants_fetch_locked(kid):
                    return self._keys.get(kid)
                self._last_attempt = self._clock()
                self._in_flight = True
                self.fetches += 1
            keys: list[ECKey | RSAKey] = []
            try:
                keys = self._fetch()
            finally:
                with self._state:
                    if keys:
                        self._keys = {k.kid: k for k in keys if k.kid}
                        self._fetched_at = self._clock()
                    self._in_flight = False
            with self._state:
                return self._keys.get(kid)

    async def aget_key(self, kid: str) -> ECKey | RSAKey | None:
        """Like ``get_key`` but any network fetch runs in a worker thread."""
        if self.needs_fetch(kid):
            return await asyncio.to_thread(self.get_key, kid)
        return self.get_key(kid, allow_fetch=False)

    def _fetch(self) -> list[ECKey | RSAKey]:
        """Download and parse the JWKS; on any failure keep what is cached (returns [])."""
        try:
            keys = _jose.public_keys_from_jwks(_jose.json_object(self._download()))
        except Exception as exc:  # noqa: BLE001 - any I/O or parse failure just means "no new keys"
            log.warning("external JWKS fetch failed", extra={"error_type": type(exc).__name__})
            return []
        if not keys:
            log.warning("external JWKS held no usable signing keys")
        return keys

    def _download(self) -> bytes:
        with httpx.Client(timeout=self._timeout, follow_redirects=False) as client:
            with client.stream("GET", self.url, headers={"Accept": "application/json"}) as resp:
                if resp.status_code != 200:
                    raise _jose.JoseInputError("jwks_http_status")
                chunks: list[bytes] = []
                size = 0
                for chunk in resp.iter_bytes():
                    size += len(chunk)
                    if size > self._max_bytes:
                        raise _jose.JoseInputError("jwks_too_large")
                    chunks.append(chunk)
                return b"".join(chunks)


class _Profile:
    """What a token from one issuer must look like."""

    __slots__ = ("issuer", "audience", "external")

    def __init__(self, issuer: str, audience: str, external: bool) -> None:
        self.issuer, self.audience, self.external = issuer, audience, external


VERIFIED_CACHE_SIZE = 4096
"""Own-key tokens whose header and signature were checked, remembered by hash (see TokenVerifier)."""


class TokenVerifier:
    """Turns a bearer token into a :class:`Principal`, or raises :class:`AuthError`.

    An agency system sends the same token with every request for its lifetime, and parsing it
    and checking an ES256 signature cost ~5% of a request. So the claims of a token signed by
    the broker's own key (whose header and signature depend on nothing but the token's bytes
    and that key, fixed for this verifier's life) are kept, keyed by the token's sha256 (the
    token itself is not kept), for up to VERIFIED_CACHE_SIZE tokens. Every claim check --
    expiry, not-before, issuer, audience, the claims a principal needs -- runs on every
    request, cached or not. External IdP tokens are never kept (their keys can rotate).
    """

    def __init__(self, settings: Settings, key: BrokerKey, external: ExternalJwks | None = None) -> None:
        self._settings = settings
        self._kid = key.kid
        self._alg = key.alg
        self._key = key.verification_key()
        self._skew = int(settings.clock_skew_seconds)
        self._own = _Profile(settings.issuer, settings.audience, external=False)
        self._verified: OrderedDict[bytes, dict[str, Any]] = OrderedDict()
        self._verified_lock = threading.Lock()
        if external is None and settings.external_jwks_url:
            external = ExternalJwks(settings.external_jwks_url)
        self._external = external
        self._ext: _Profile | None = None
        if external is not None:
            if not (settings.external_issuer and settings.external_audience):
                raise ValueError("an external JWKS needs external_issuer and external_audience")
            self._ext = _Profile(settings.external_issuer, settings.external_audience, external=True)

    def verify(self, token: str, *, now: datetime | None = None) -> Principal:
        """Verify synchronously; may fetch the external JWKS (use ``averify`` on the event loop)."""
        return self._guarded(token, now, allow_fetch=True)

    async def averify(self, token: str, *, now: datetime | None = None) -> Principal:
        """Verify without blocking the event loop: any JWKS fetch runs in a worker thread."""
        if self._external is not None:
            try:
                kid = _jose.parse_compact(token).kid
            except _jose.JoseInputError:
                kid = None
            if kid and kid != self._kid and self._external.needs_fetch(kid):
                try:
                    await asyncio.to_thread(self._external.get_key, kid)
                except Exception as exc:  # noqa: BLE001 - verification below then fails closed
                    log.warning("external JWKS prefetch failed", extra={"error_type": type(exc).__name__})
        return self._guarded(token, now, allow_fetch=False)

    def _guarded(self, token: str, now: datetime | None, *, allow_fetch: bool) -> Principal:
        instant = _utc(now) if now is not None else datetime.now(timezone.utc)
        try:
            return self._verify(token, instant, allow_fetch)
        except AuthError:
            raise
        except Exception as exc:  # noqa: BLE001 - contract: malformed input is only ever AuthError
            log.info("token rejected", extra={"reason": "unexpected", "error_type": type(exc).__name__})
            raise AuthError("invalid_token", _INVALID) from None

    def _reject(self, reason: str, description: str) -> AuthError:
        log.info("token rejected", extra={"reason": reason})
        return AuthError("invalid_token", description)

    def _verify(self, token: str, now: datetime, allow_fetch: bool) -> Principal:
        digest = None
        if isinstance(token, str) and token.isascii() and len(token) <= _jose.MAX_COMPACT_CHARS:
            digest = hashlib.sha256(token.encode("ascii")).digest()
            claims = self._verified.get(digest)
            if claims is not None:
                return self._principal(claims, self._own, now)
        try:
            parsed = _jose.parse_compact(token)
        except _jose.JoseInputError as exc:
            desc = _BAD_KEY if exc.reason in ("algorithm_not_allowed", "header_not_allowed") else _MALFORMED
            raise self._reject(exc.reason, desc) from None
        kid = parsed.kid
        if kid is None:
            raise self._reject("no_kid", _BAD_KEY)
        key: ECKey | RSAKey | None
        if kid == self._kid:
            profile, key = self._own, self._key
            if parsed.alg != self._alg:
                raise self._reject("alg_key_mismatch", _BAD_KEY)
            if parsed.header.get("typ") != ACCESS_TOKEN_TYPE:
                raise self._reject("wrong_typ", _BAD_KEY)
        elif self._external is not None and self._ext is not None:
            profile = self._ext
            key = self._external.get_key(kid, allow_fetch=allow_fetch)
            typ = parsed.header.get("typ")
            if typ is not None and (not isinstance(typ, str) or typ.lower() not in _EXTERNAL_TYPES):
                raise self._reject("wrong_typ", _BAD_KEY)
        else:
            raise self._reject("unknown_kid", _BAD_KEY)
        if key is None:
            raise self._reject("unknown_kid", _BAD_KEY)
        if not _jose.signature_valid(parsed, key):
            raise self._reject("bad_signature", _BAD_KEY)
        principal = self._principal(parsed.claims, profile, now)
        if profile is self._own and digest is not None:
            self._remember(digest, parsed.claims)
        return principal

    def _remember(self, digest: bytes, claims: dict[str, Any]) -> None:
        """Keep a valid own-key token's claims (oldest dropped first); only after every check passed."""
        with self._verified_lock:
            self._verified[digest] = claims
            while len(self._verified) > VERIFIED_CACHE_SIZE:
                self._verified.popitem(last=False)

    def _principal(self, claims: dict[str, Any], profile: _Profile, now: datetime) -> Principal:
        t = now.timestamp()
        exp = _jose.numeric_date(claims.get("exp"))
        if exp is None:
            raise self._reject("missing_exp", _MISSING)
        if t >= exp + self._skew:
            raise self._reject("expired", _EXPIRED)
        if "nbf" in claims:
            nbf = _jose.numeric_date(claims["nbf"])
            if nbf is None:
                raise self._reject("bad_nbf", _MALFORMED)
            if nbf > t + self._skew:
                raise self._reject("not_yet_valid", _NOT_YET)
        iat = None
        if "iat" in claims or not profile.external:
            iat = _jose.numeric_date(claims.get("iat"))
            if iat is None:
                raise self._reject("missing_iat", _MISSING)
            if iat > t + self._skew:
                raise self._reject("issued_in_future", _NOT_YET)
        if not profile.external and exp - iat > MAX_TTL_SECONDS:  # type: ignore[operator]
            raise self._reject("lifetime_too_long", _INVALID)
        if claims.get("iss") != profile.issuer:
            raise self._reject("wrong_issuer", _WRONG_PARTY)
        if not _jose.audience_matches(claims.get("aud"), profile.audience):
            raise self._reject("wrong_audience", _WRONG_PARTY)

        sub = _text(claims.get("sub"))
        agency = _text(claims.get("agency"))
        role = _text(claims.get("role"))
        client_id = _text(claims.get("client_id")) or (_text(claims.get("azp")) if profile.external else None)
        jti = _text(claims.get("jti"))
        if not (sub and agency and role and client_id) or (not profile.external and not jti):
            raise self._reject("missing_claims", _MISSING)
        scopes = _scopes(claims, external=profile.external)
        if scopes is None:
            raise self._reject("bad_scope", _MALFORMED)
        purpose = claims.get("purpose_of_use")
        if purpose is not None and _text(purpose) is None:
            raise self._reject("bad_purpose", _MALFORMED)
        return Principal(
            sub=sub,
            agency=agency,
            role=role,
            client_id=client_id,
            scopes=scopes,
            token_id=jti or "",
            purpose=purpose,
        )


def _text(value: object, limit: int = 256) -> str | None:
    if isinstance(value, str) and value and len(value) <= limit:
        return value
    return None


def _scopes(claims: dict[str, Any], *, external: bool) -> frozenset[str] | None:
    raw = claims.get("scope")
    if raw is None and external:
        raw = claims.get("scp")
    if raw is None:
        return None if not external else frozenset()
    if isinstance(raw, str):
        return frozenset(raw.split())
    if external and isinstance(raw, list) and all(isinstance(s, str) for s in raw):
        return frozenset(raw)
    return None
