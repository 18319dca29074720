"""The broker signs only with keys verifiers can trust: EC P-256 or RSA of 2048+ bits."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from broker.auth.keys import BrokerKey, SigningKeyError, generate_private_key_pem, load_signing_key

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth"}


def _pem(native, password: bytes | None = None) -> bytes:
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return native.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def _thumbprint(members: dict) -> str:
    """RFC 7638 computed by hand, independently of the JOSE library."""
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()


def test_ec_key_is_es256_named_by_its_rfc7638_thumbprint(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(generate_private_key_pem("EC"))
    key = load_signing_key(path)
    jwk = key.public_jwk()
    assert key.alg == "ES256"
    assert key.kid == _thumbprint({"crv": jwk["crv"], "kty": "EC", "x": jwk["x"], "y": jwk["y"]})
    assert load_signing_key(path).kid == key.kid  # stable across restarts


def test_rsa_key_is_rs256_and_thumbprint_named() -> None:
    key = BrokerKey.from_pem(_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    jwk = key.public_jwk()
    assert key.alg == "RS256"
    assert key.kid == _thumbprint({"e": jwk["e"], "kty": "RSA", "n": jwk["n"]})


def test_generated_rsa_key_loads() -> None:
    assert BrokerKey.from_pem(generate_private_key_pem("RSA")).alg == "RS256"


@pytest.mark.parametrize("native", [
    pytest.param(lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024), id="rsa-1024"),
    pytest.param(lambda: ec.generate_private_key(ec.SECP384R1()), id="ec-p384"),
    pytest.param(lambda: ec.generate_private_key(ec.SECP256K1()), id="ec-secp256k1"),
    pytest.param(lambda: ed25519.Ed25519PrivateKey.generate(), id="ed25519"),
])
def test_other_key_kinds_are_refused(native) -> None:
    with pytest.raises(SigningKeyError):
        BrokerKey.from_pem(_pem(native()))


@pytest.mark.parametrize("pem", [
    pytest.param(b"", id="empty"),
    pytest.param(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n", id="garbage"),
    pytest.param(_pem(ec.generate_private_key(ec.SECP256R1()), b"hunter2"), id="encrypted"),
])
def test_unreadable_pem_is_refused_without_echoing_it(pem: bytes) -> None:
    with pytest.raises(SigningKeyError) as info:
        BrokerKey.from_pem(pem)
    assert "not a key" not in str(info.value)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError):
        load_signing_key(tmp_path / "absent.pem")


def test_unknown_kind_to_generate_is_refused() -> None:
    with pytest.raises(ValueError):
        generate_private_key_pem("DSA")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["EC", "RSA"])
def test_public_jwks_carries_no_private_members(kind: str) -> None:
    key = BrokerKey.from_pem(generate_private_key_pem(kind))  # type: ignore[arg-type]
    (jwk,) = key.public_jwks()["keys"]
    assert PRIVATE_MEMBERS.isdisjoint(jwk)
    assert jwk["kid"] == key.kid and jwk["alg"] == key.alg and jwk["use"] == "sig"
    assert key.jwk.as_dict(private=True)["d"] not in repr(key)
    assert PRIVATE_MEMBERS.isdisjoint(key.verification_key().as_dict())


def test_broker_key_is_frozen() -> None:
    key = BrokerKey.from_pem(generate_private_key_pem())
    with pytest.raises(AttributeError):
        key.kid = "other"  # type: ignore[misc]
