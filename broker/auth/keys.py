"""The broker's own signing key: loaded from a PEM file, named by its RFC 7638 thumbprint.

Only two key kinds are accepted, so that every token the broker signs is one a county IdP
or FHIR client can verify without surprises: EC P-256 (ES256) and RSA of 2048 bits or more
(RS256). Anything else is refused at start-up rather than producing weak tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc.jwk import ECKey, RSAKey

__all__ = ["BrokerKey", "SigningKeyError", "MIN_RSA_BITS", "generate_private_key_pem", "load_signing_key"]

MIN_RSA_BITS = 2048
GENERATED_RSA_BITS = 3072


class SigningKeyError(ValueError):
    """A signing key the broker refuses to use; the message never contains key material."""


@dataclass(frozen=True)
class BrokerKey:
    """The private key that signs access tokens; ``kid`` is stable across restarts."""

    jwk: ECKey | RSAKey = field(repr=False)
    kid: str
    alg: Literal["ES256", "RS256"]

    @classmethod
    def from_pem(cls, pem: bytes) -> "BrokerKey":
        """Build from an unencrypted PEM private key, refusing key kinds we do not sign with."""
        try:
            native = serialization.load_pem_private_key(pem, password=None)
        except TypeError as exc:  # encrypted PEM without a password
            raise SigningKeyError("the signing key must be an unencrypted PEM private key") from exc
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise SigningKeyError("the signing key is not a readable PEM private key") from exc
        return cls.from_private_key(native)

    @classmethod
    def from_private_key(cls, native: Any) -> "BrokerKey":
        """Wrap a ``cryptography`` private key after checking its kind and strength."""
        key_cls: type[ECKey] | type[RSAKey]
        alg: Literal["ES256", "RS256"]
        if isinstance(native, ec.EllipticCurvePrivateKey):
            if not isinstance(native.curve, ec.SECP256R1):
                raise SigningKeyError("EC signing keys must use the P-256 curve (ES256)")
            key_cls, alg = ECKey, "ES256"
        elif isinstance(native, rsa.RSAPrivateKey):
            if native.key_size < MIN_RSA_BITS:
                raise SigningKeyError(f"RSA signing keys must have at least {MIN_RSA_BITS} bits")
            key_cls, alg = RSAKey, "RS256"
        else:
            raise SigningKeyError("the signing key must be an EC P-256 or RSA private key")
        bare = key_cls.import_key(native)
        kid = bare.thumbprint()  # RFC 7638: over the required public members only
        data = dict(bare.as_dict(private=True))
        data.update({"kid": kid, "alg": alg, "use": "sig"})
        return cls(jwk=key_cls.import_key(data), kid=kid, alg=alg)

    def __hash__(self) -> int:
        return hash(self.kid)

    def public_jwk(self) -> dict[str, Any]:
        """The public half as a JWK, with kid, alg and use so verifiers pick the right key."""
        data = dict(self.jwk.as_dict(private=False))
        data.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return data

    def public_jwks(self) -> dict[str, Any]:
        """The JWK Set published at ``/.well-known/jwks.json``."""
        return {"keys": [self.public_jwk()]}

    def verification_key(self) -> ECKey | RSAKey:
        """A public-only key object, so verification never touches the private half."""
        cls = ECKey if self.alg == "ES256" else RSAKey
        return cls.import_key(self.public_jwk())


def load_signing_key(path: str | Path) -> BrokerKey:
    """Read the broker's signing key from a PEM file (Settings has already checked its mode)."""
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise SigningKeyError("the signing key file cannot be read") from exc
    return BrokerKey.from_pem(pem)


def generate_private_key_pem(kind: Literal["EC", "RSA"] = "EC") -> bytes:
    """A fresh unencrypted PKCS#8 PEM key, for ``broker`` set-up commands and tests."""
    native: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if kind == "EC":
        native = ec.generate_private_key(ec.SECP256R1())
    elif kind == "RSA":
        native = rsa.generate_private_key(public_exponent=65537, key_size=GENERATED_RSA_BITS)
    else:
        raise ValueError("kind must be 'EC' or 'RSA'")
    return native.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
