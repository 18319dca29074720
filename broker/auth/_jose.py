"""Small, strict JOSE helpers shared by access-token and client-assertion verification.

Built on ``joserfc`` (authlib's successor: ``authlib.jose`` is deprecated in authlib 1.9 and
warns on import). Everything here treats its input as hostile: a compact JWS is parsed
without trusting its header, only RS256 and ES256 are ever accepted, only RSA keys of 2048
bits or more and EC P-256 keys are ever used to verify, and every failure is a
:class:`JoseInputError` whose ``reason`` is a fixed code, never a value taken from the input.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, JWKRegistry, RSAKey

ALLOWED_ALGS: frozenset[str] = frozenset({"RS256", "ES256"})
KTY_FOR_ALG = {"RS256": "RSA", "ES256": "EC"}
MIN_RSA_BITS = 2048
MAX_COMPACT_CHARS = 16_384
MAX_KID_CHARS = 256
MAX_KEYS_PER_SET = 50

_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")
# Header parameters that change how the payload or signature is processed (RFC 7515 crit,
# RFC 7797 b64) or that try to supply a key; none has a legitimate use here.
_REFUSED_HEADERS = frozenset({"crit", "b64", "jwk", "jku", "x5u", "x5c", "zip", "enc"})


class JoseInputError(Exception):
    """Input that must be rejected; ``reason`` is a fixed code safe to log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class UnverifiedJws:
    """A compact JWS split into its parts; nothing here is trusted until verified."""

    token: str
    header: dict[str, Any]
    claims: dict[str, Any]

    @property
    def alg(self) -> str:
        return self.header["alg"]

    @property
    def kid(self) -> str | None:
        return self.header.get("kid")


def _b64decode(segment: str) -> bytes:
    if not _B64URL.match(segment):
        raise JoseInputError("malformed")
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as exc:
        raise JoseInputError("malformed") from exc


def json_object(raw: bytes) -> dict[str, Any]:
    """Decode UTF-8 JSON that must be an object; NaN/Infinity and other junk are refused."""
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise JoseInputError("malformed") from exc
    if not isinstance(value, dict):
        raise JoseInputError("malformed")
    return value


def _refuse_constant(_name: str) -> Any:
    raise ValueError("NaN and Infinity are not JSON")


def parse_compact(token: object) -> UnverifiedJws:
    """Split a compact JWS and decode header and claims without trusting either."""
    if not isinstance(token, str) or not token or len(token) > MAX_COMPACT_CHARS:
        raise JoseInputError("malformed")
    if not token.isascii():
        raise JoseInputError("malformed")
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        raise JoseInputError("malformed")
    header = json_object(_b64decode(parts[0]))
    claims = json_object(_b64decode(parts[1]))
    _b64decode(parts[2])
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGS:
        raise JoseInputError("algorithm_not_allowed")
    if _REFUSED_HEADERS.intersection(header):
        raise JoseInputError("header_not_allowed")
    kid = header.get("kid")
    if kid is not None and (not isinstance(kid, str) or not kid or len(kid) > MAX_KID_CHARS):
        raise JoseInputError("malformed")
    return UnverifiedJws(token=token, header=header, claims=claims)


def signature_valid(jws_value: UnverifiedJws, key: ECKey | RSAKey) -> bool:
    """True only if ``key`` (of the kind the alg needs) verifies the signature."""
    alg = jws_value.alg
    if alg not in ALLOWED_ALGS or key.key_type != KTY_FOR_ALG[alg]:
        return False
    try:
        jws.deserialize_compact(jws_value.token, key, algorithms=[alg])
    except (JoseError, ValueError, TypeError):
        return False
    return True


def public_key_from_jwk(data: object) -> ECKey | RSAKey | None:
    """A public verification key from one JWK, or None if it is not one we may use."""
    if not isinstance(data, dict):
        return None
    kty = data.get("kty")
    if kty not in ("EC", "RSA"):
        return None
    if data.get("use") not in (None, "sig"):
        return None
    key_ops = data.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        return None
    alg = data.get("alg")
    if alg is not None and (alg not in ALLOWED_ALGS or KTY_FOR_ALG[alg] != kty):
        return None
    kid = data.get("kid")
    if kid is not None and (not isinstance(kid, str) or not kid or len(kid) > MAX_KID_CHARS):
        return None
    try:
        key = JWKRegistry.import_key(data)
        public = {k: v for k, v in key.as_dict(private=False).items() if k != "key_ops"}
        key = JWKRegistry.import_key(public)
    except (JoseError, ValueError, TypeError, KeyError, binascii.Error):
        return None
    if isinstance(key, ECKey):
        if key.curve_name != "P-256":
            return None
    elif isinstance(key, RSAKey):
        if key.public_key.key_size < MIN_RSA_BITS:
            return None
    else:
        return None
    if kid is None:
        key.ensure_kid()  # RFC 7638 thumbprint stands in for a missing kid
    return key


def public_keys_from_jwks(jwks: object) -> list[ECKey | RSAKey]:
    """The usable verification keys of a JWK Set; unusable entries are skipped (RFC 7517 §5)."""
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        return []
    keys = [k for k in (public_key_from_jwk(d) for d in jwks["keys"][:MAX_KEYS_PER_SET]) if k]
    return keys


def candidate_keys(keys: Iterable[ECKey | RSAKey], jws_value: UnverifiedJws) -> list[ECKey | RSAKey]:
    """Keys that may verify this JWS: same kid when it names one, and the kind its alg needs."""
    kty = KTY_FOR_ALG[jws_value.alg]
    kid = jws_value.kid
    return [k for k in keys if k.key_type == kty and (kid is None or k.kid == kid)]


def numeric_date(value: object) -> float | None:
    """A JSON NumericDate as float, or None when it is not one (bools, NaN, huge values)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        out = float(value)
    except OverflowError:
        return None
    if not math.isfinite(out) or abs(out) > 1e11:
        return None
    return out


def audience_matches(aud: object, expected: str) -> bool:
    """RFC 7519 §4.1.3: a string equal to ours, or a list of strings containing it."""
    if isinstance(aud, str):
        return aud == expected
    if isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud):
        return expected in aud
    return False
